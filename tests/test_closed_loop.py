"""The closed loop (issue 12 item 4): deployed patients return to the sites' own data, and the federation refits."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from client.ope import LoggingPolicy
from shared.validation import load_site
from simulation.deployment import append_rows, served_policy, treat_period
from tests.sitefactory import provisioned_clinics


@pytest.fixture()
def clinics(tmp_path):
    return provisioned_clinics(tmp_path, patients_per_clinic=30)


def test_a_period_appends_its_patients_to_the_sites_own_files_and_they_still_validate(clinics):
    world, sites = clinics
    before = {n: load_site(path) for n, (path, _) in sites.items()}
    periods = treat_period(world, sites, period=1, patients=12, seed=0)
    for name, (path, _) in sites.items():
        after = load_site(path)  # validated as any site file
        new = after.episodes.iloc[len(before[name].episodes):]
        assert len(new) == periods[name]["cycles"] > 12  # several cycles per patient
        assert new["patient_id"].nunique() == 12 and new["patient_id"].str.contains("-D1P").all()
        assert not set(new["episode_id"]) & set(before[name].episodes["episode_id"])
        assert len(after.vitals) > len(before[name].vitals)
        assert list(pd.read_csv(path / "episodes.csv", nrows=0).columns) == list(before[name].episodes.columns)
        # nothing installed yet: the clinic served its standard of care, so the period cost nothing against it
        assert periods[name]["served_version"] is None and "no policy installed" in periods[name]["served"]
        assert periods[name]["cost_vs_soc"] == pytest.approx(0.0, abs=1e-12)
        figures = periods[name]
        assert figures["cost_vs_soc_under_rules"] == pytest.approx(
            figures["soc_under_rules_value_per_cycle"] - figures["value_per_cycle"])
    # the clinics' practice gives cycles the label's hard rules hold (e.g. no pre-cycle blood count)
    assert any(abs(p["cost_vs_soc_under_rules"]) > 1e-6 for p in periods.values())
    # a second period gets its own identifiers
    treat_period(world, sites, period=2, patients=5, seed=0)
    ids = load_site(next(iter(sites.values()))[0]).episodes["episode_id"]
    assert ids.is_unique and ids.str.contains("-D2E").any()


def test_rows_missing_a_column_of_the_site_header_are_refused(tmp_path):
    path = tmp_path / "episodes.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['b'\]"):
        append_rows(path, pd.DataFrame({"a": [3]}))
    append_rows(path, pd.DataFrame({"b": [4], "a": [3], "extra": [0]}))  # header order, extra columns dropped
    assert path.read_text() == "a,b\n1,2\n3,4\n"


def test_nothing_installed_means_standard_of_care_with_the_reason(clinics):
    _, sites = clinics
    path, trust = next(iter(sites.values()))
    policy, served = served_policy(path, trust)
    assert policy is None and served.version is None and "no policy installed" in served.reason


def test_the_logging_model_ignores_withheld_cycles_recorded_at_dose_zero(clinics):
    _, sites = clinics
    episodes = load_site(next(iter(sites.values()))[0]).episodes
    first = episodes[episodes["cycle"] == 1].reset_index(drop=True)
    held = first.assign(dose_mg_m2=np.where(np.arange(len(first)) % 4 == 0, 0.0, first["dose_mg_m2"]))
    logging = LoggingPolicy().fit(held)  # log(0) made the dose model's target infinite before
    given = LoggingPolicy().fit(first[held["dose_mg_m2"] > 0])
    density = logging.dose_density(held, held["formulation_id"].astype(str).to_numpy(), held["dose_mg_m2"])
    assert np.all(density[held["dose_mg_m2"] == 0] == 0) and np.all(density[held["dose_mg_m2"] > 0] > 0)
    assert logging.dose_sd_ == pytest.approx(given.dose_sd_)


@pytest.mark.slow
def test_simulate_with_deploy_cycles_refits_on_the_deployed_patients_and_reports_each_version(tmp_path, shared_ray):
    from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

    flower_environment(tmp_path)
    quiet_flower()
    cfg = ExperimentConfig(out=tmp_path / "out", clinics=2, rounds=1, dp=True, epsilon=3.0, models="ann",
                           compare=False, patients_per_clinic=40, deploy_cycles=2, deploy_patients=20,
                           release_gate=False, explore=True)
    results = run_experiment(cfg)
    versions, periods = results["policy"]["versions"], results["policy"]["deployment"]
    assert [v["version"] for v in versions] == [1, 2] and all(v["shipped"] for v in versions)
    assert [p["period"] for p in periods] == [1]
    explored = periods[0]["exploration"]
    assert explored["explore"] and not explored["trial"]  # version 1 shipped: no candidate left in equipoise
    assert explored["first_cycles"] == 40 and explored["trial_arm"] == explored["equipoise"] == 0  # the ensemble
    spread = 0
    for site, figures in periods[0]["sites"].items():
        assert figures["served_version"] == 1 and figures["patients"] == 20
        logged = load_site(tmp_path / "out" / "sites" / site).decisions
        assert set(logged["policy_version"]) == {1} and logged.groupby(["patient_id", "cycle"]).ngroups >= 20
        drawn = logged[(logged["cycle"] == 1) & (logged["chosen"] == 1)]
        spread += int((drawn["probability"] < 0.6 - 1e-9).sum())  # a neighbouring dose was drawn, not the served
        assert (logged.loc[logged["cycle"] > 1, "probability"] == 1.0).all()
        assert figures["cost_vs_soc"] == pytest.approx(figures["soc_value_per_cycle"] - figures["value_per_cycle"])
        assert load_site(tmp_path / "out" / "sites" / site).episodes["patient_id"].str.contains("-D1P").any()
    assert explored["dose_spread"] == spread  # (the ensemble may serve the lowest dose to all: then none)
    for v in versions:
        # no policy beats the oracle; with the gate off a DP policy of 2 small clinics may ship at a value near or
        # below 0 (a CI draw gave -0.009), so only the ceiling is asserted
        assert math.isfinite(v["value_oracle"]) and v["value_oracle"] <= 1
        assert set(v["per_site"]) == set(periods[0]["sites"])
        # each run may spend ε / K of the site's lifetime ε = 3: two runs stay within the budget
        assert all(0 < eps <= 1.5 + 1e-9 for eps in v["epsilon_this_run"].values())
        assert all(v["epsilon_this_run"][s] <= v["epsilon_spent"][s] <= 3.0 + 1e-9 for s in v["epsilon_spent"])
    assert all(versions[1]["epsilon_spent"][s] > versions[0]["epsilon_spent"][s] for s in versions[0]["epsilon_spent"])
    record = json.loads((tmp_path / "out" / "deployment" / "federation-1.json").read_text())
    assert record["policy"]["version"] == 2
    assert "Closed loop: policy versions" in (tmp_path / "out" / "report.md").read_text()


def test_exploration_without_a_closed_loop_is_refused(tmp_path):
    from typer.testing import CliRunner

    from fednano.cli import app

    done = CliRunner().invoke(app, ["simulate", "--explore", "--out", str(tmp_path / "out")], terminal_width=200)
    words = " ".join(done.output.replace("│", " ").split())
    assert done.exit_code == 2 and "--deploy-cycles 2 or more" in words and not (tmp_path / "out").exists()


def test_the_closed_loop_is_refused_on_a_users_own_sites(tmp_path):
    from typer.testing import CliRunner

    from fednano.cli import app

    sites = [tmp_path / "a", tmp_path / "b"]
    for site in sites:
        site.mkdir()
    done = CliRunner().invoke(app, ["simulate", "--deploy-cycles", "2", "--sites", *map(str, sites), "--out",
                                    str(tmp_path / "out")], terminal_width=200)
    words = " ".join(done.output.replace("│", " ").split())
    assert done.exit_code == 2 and "simulated clinics only" in words
    assert not (tmp_path / "out").exists()


def test_the_gate_is_judged_against_the_true_value_of_what_it_estimates():
    """Candidate − each site's own standard of care, sites weighted by the cycles the gate valued there."""
    from simulation.experiment import SITE_SOC, gate_against_truth

    gate = {"estimate": -0.02, "lower": -0.08, "upper": 0.0, "per_site": {
        "a": {"estimate": 0.1, "n": 10.0}, "b": {"estimate": -0.05, "n": 30.0}, "c": {"refused": "dp"}}}
    evaluation = {"overall": {}, "per_site": {
        "a": {"federated": {"value": 0.30}, SITE_SOC: {"value": 0.20}, "standard_of_care": {"value": 0.0}},
        "b": {"federated": {"value": 0.10}, SITE_SOC: {"value": 0.20}, "standard_of_care": {"value": 0.0}}}}
    judged = gate_against_truth(gate, evaluation)
    assert judged["true_difference"] == pytest.approx((10 * 0.1 + 30 * -0.1) / 40)
    assert judged["covered"] is True
    assert judged["per_site"]["a"]["true_difference"] == pytest.approx(0.1)
    assert judged["per_site"]["c"] == {"refused": "dp"}
    nothing = gate_against_truth({**gate, "per_site": {"c": {"refused": "dp"}}}, evaluation)
    assert nothing["true_difference"] is None and nothing["covered"] is None
