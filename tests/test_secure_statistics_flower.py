"""The masked statistics phase in Flower's simulation runtime: real SuperNodes' ClientApps, one under DP."""

from __future__ import annotations

import pytest

from client.site import SiteSource
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation

pytestmark = pytest.mark.slow


def test_a_recovering_secure_sum_of_statistics_runs_in_flower_with_a_dp_site(tmp_path, shared_ray):
    flower_environment(tmp_path)
    quiet_flower()
    generate_sites(2, seed=7, out=tmp_path / "sites", privacy=SitePrivacy(dp=False))
    generate_sites(3, seed=7, out=tmp_path / "dp_sites", privacy=SitePrivacy(dp=True, epsilon=3.0))
    (tmp_path / "dp_sites" / "clinic_02").rename(tmp_path / "sites" / "clinic_02")
    cfg = ExperimentConfig(out=tmp_path / "run", rounds=1, seed=7, models="ann", compare=False, policy=False,
                           secure_sum="recovering")
    sites = ("clinic_00", "clinic_01", "clinic_02")
    record = run_federation(cfg, [SiteSource(tmp_path / "sites" / s) for s in sites])
    assert record.statistics["secure_sum"] == "recovering"
    assert record.statistics["sites"] == list(sites) and record.statistics["failures"] == {}
    assert record.statistics["bytes"]["up"] > 0
    assert record.privacy["clinic_02"].dp  # the DP site's statistics release was booked from its masked reply
    assert record.models["ann"].rounds  # the run went on with the encoder of the masked sums
