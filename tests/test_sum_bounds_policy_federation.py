"""Flower simulation, sites without DP, pairwise masks: an honest run's model fits, release gate and evaluation
summaries are not refused; a site inflating its fit sums by 1.02 refuses both dosing-model fits (the policy is
built without them), and a site lying about its labels is left out of the overall metrics and named."""

import dataclasses

import pytest

from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import (
    ExperimentConfig,
    flower_environment,
    prepare_kit,
    prepare_sites,
    quiet_flower,
    run_federation,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("bounded-policy")
    flower_environment(out)
    quiet_flower()
    base = ExperimentConfig(out=out / "run", clinics=3, rounds=2, seed=2, models="ann", compare=False,
                            fqi_iterations=2, dp=False, secure_sum="pairwise")

    def run(name: str, **changes):
        """One federation of fresh sites without DP, with the coordinator's signing kit (so a policy is built)."""
        clinics = generate_sites(base.clinics, base.seed, out / name / "sites", privacy=SitePrivacy(dp=False)).clinics
        cfg = dataclasses.replace(base, out=out / name / "run", sites=[out / name / "sites" / c.name for c in clinics],
                                  **changes)
        sources, _ = prepare_sites(cfg)
        return run_federation(cfg, prepare_kit(cfg, sources, fresh=True))

    return run, "clinic_01"


def infeasible_anywhere(record) -> list:
    ann = record.models["ann"]
    return [r["infeasible"] for r in ann.rounds if r.get("infeasible")] + [
        v for v in (ann.final.get("infeasible"), record.policy["structured"].get("infeasible"),
                    record.policy["adjustment"].get("infeasible")) if v] + [
        s for s in record.policy["gate"]["per_site"].values() if "dropped" in s]


@pytest.mark.parametrize("policy_model", ["structured", "ensemble"])
def test_an_honest_run_is_not_refused_anywhere(federation, policy_model):
    run, _ = federation
    record = run(f"honest-{policy_model}", policy_model=policy_model)
    assert infeasible_anywhere(record) == []
    fitted = "structured" if policy_model == "structured" else "adjustment"
    assert record.policy[fitted]["fitted"] is True and record.policy["gate"]["n"] > 100


def test_a_site_inflating_its_fit_sums_refuses_the_masked_fits(federation):
    run, attacker = federation
    record = run("inflate-fit", attacks=[f"{attacker}:inflate-fit=1.02"])
    assert record.policy["structured"]["fitted"] is False
    assert "the dose-response fit was refused: dose-response: " in record.policy["structured"]["reason"]
    assert "the dose adjuster's fit was refused: fitted-Q: " in record.policy["adjustment"]["reason"]


def test_a_lying_site_is_left_out_of_the_overall_metrics_and_named(federation):
    run, attacker = federation
    record = run("lie", attacks=[f"{attacker}:lie"])
    assert list(record.models["ann"].final["infeasible"]) == [attacker]
    assert "'response' sum of |error|" in record.models["ann"].final["infeasible"][attacker]
