"""Flower simulation: a site inflating its statistics is named and dropped (``secure-sum = off``) or its masked
sum refused (the run stops at the statistics phase); an honest run of DP sites is not refused."""

import dataclasses

import pytest

from simulation.clinics import generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("bounded")
    flower_environment(out)
    quiet_flower()
    base = ExperimentConfig(out=out / "run", clinics=3, rounds=1, seed=2, models="ann", compare=False,
                            fqi_iterations=0)

    def run(name: str, **changes):
        """One federation of fresh DP sites (the simulator's default; a run spends a site's whole budget)."""
        clinics = generate_sites(base.clinics, base.seed, out / name / "sites").clinics
        cfg = dataclasses.replace(base, out=out / name / "run", **changes)
        sources, _ = prepare_sites(dataclasses.replace(cfg, sites=[out / name / "sites" / c.name for c in clinics]))
        return run_federation(cfg, sources)

    return run, "clinic_01"


def test_an_honest_masked_run_of_dp_sites_is_not_refused(federation):
    run, _ = federation
    record = run("honest", secure_sum="pairwise")
    assert record.statistics["secure_sum"] == "pairwise" and len(record.statistics["sites"]) == 3
    assert record.statistics["infeasible"] == {}


def test_an_inflating_site_is_dropped_and_named_in_the_clear(federation):
    run, attacker = federation
    record = run("off", secure_sum="off", attacks=[f"{attacker}:inflate=10"])
    assert list(record.statistics["infeasible"]) == [attacker]
    assert "declared range" in record.statistics["infeasible"][attacker]
    assert attacker not in record.statistics["sites"] and len(record.statistics["sites"]) == 2


def test_an_inflated_masked_sum_stops_the_run_at_the_statistics(federation):
    run, attacker = federation
    with pytest.raises(Exception, match=r"statistics was refused: .*numeric column .*declared range"):
        run("masked", secure_sum="pairwise", attacks=[f"{attacker}:inflate=10"])
