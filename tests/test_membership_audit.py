"""The membership-inference audit (simulation.membership_audit): its metrics on scores whose answer is known, its
per-row statistics and scores, its member/non-member rows, and `fednano audit membership` on a simulated run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from shared.task import NANOPARTICLE_TASK, assign_split
from simulation.membership_audit import (
    ALL_HEADS,
    FRESH_PREFIX,
    REPORT_SECTION,
    AuditRows,
    RowStatistics,
    add_to_report,
    attack_metrics,
    attack_scores,
    audit_rows,
    balanced,
    hanley_mcneil_se,
    non_member_check,
    outsiders_needed,
    row_statistics,
    tpr_at_fpr,
)


def test_perfectly_separated_scores_give_auc_one_and_full_tpr_at_one_percent_fpr():
    rng = np.random.default_rng(0)
    m = attack_metrics(rng.uniform(2, 3, 300), rng.uniform(0, 1, 300))
    assert m["auc"] == 1.0
    assert m["tpr_at_1pct_fpr"] == 1.0
    assert (m["members"], m["non_members"], m["false_positives_at_1pct"]) == (300, 300, 3)


def test_identical_distributions_give_auc_within_sampling_error_of_one_half():
    rng = np.random.default_rng(1)
    aucs = []
    for _ in range(20):
        m = attack_metrics(rng.normal(size=500), rng.normal(size=500))
        aucs.append(m["auc"])
        assert abs(m["auc"] - 0.5) < 4 * m["auc_se"]
    # the standard error is the null's: sqrt((n1 + n0 + 1) / (12 n1 n0)) at AUC 0.5 (Mann-Whitney)
    assert m["auc_se"] == pytest.approx(math.sqrt(1001 / (12 * 500 * 500)), rel=0.05)
    assert np.std(aucs) == pytest.approx(math.sqrt(1001 / (12 * 500 * 500)), rel=0.5)


def test_tpr_at_one_percent_fpr_is_the_empirical_roc_point_not_an_interpolation():
    non_members = np.arange(100.0)  # exactly one non-member (99) may score above the 1 % threshold
    members = np.r_[np.full(5, 99.5), np.full(5, 98.5), np.full(90, 0.5)]
    labels = np.r_[np.ones(100), np.zeros(100)]
    assert tpr_at_fpr(labels, np.r_[members, non_members]) == pytest.approx(0.10)
    # with 50 non-members no false positive is allowed: only the members above every non-member count
    assert tpr_at_fpr(np.r_[np.ones(100), np.zeros(50)], np.r_[members, np.arange(50.0) + 50]) == pytest.approx(0.05)
    assert attack_metrics(members, np.arange(50.0) + 50)["false_positives_at_1pct"] == 0


def test_mann_whitney_auc_is_sklearns_auc_ties_included():
    from sklearn.metrics import roc_auc_score

    from simulation.membership_audit import mann_whitney_auc

    rng = np.random.default_rng(2)
    m, n = np.round(rng.normal(0.4, 1, 70), 1), np.round(rng.normal(0, 1, 50), 1)  # rounded: many ties
    assert mann_whitney_auc(m, n) == pytest.approx(roc_auc_score(np.r_[np.ones(70), np.zeros(50)], np.r_[m, n]))


def test_hanley_mcneil_standard_error_matches_the_paper_example():
    # Hanley & McNeil 1982, eq. 2 by hand for A = 0.8 and 50 + 50 cases: Q1 = 2/3, Q2 = 32/45 -> SE 0.0445
    assert hanley_mcneil_se(0.8, 50, 50) == pytest.approx(0.0445, abs=5e-4)


def test_row_statistics_are_the_training_losses_and_logit_confidences():
    targets = {"response": np.array([1.0, 0.0, np.nan]), "toxicity_grade3": np.array([0.0, 1.0, 1.0]),
               "efficacy_pct": np.array([0.5, np.nan, -1.0])}
    predictions = {"response": np.array([0.9, 0.2, 0.5]), "toxicity_grade3": np.array([0.3, 0.6, 0.99]),
                   "efficacy_pct": np.array([0.0, 2.0, -0.5])}
    s = row_statistics(NANOPARTICLE_TASK, predictions, targets)
    assert s.loss["response"][0] == pytest.approx(log_loss([1], [0.9], labels=[0, 1]))
    assert s.loss["response"][1] == pytest.approx(-math.log(0.8))
    assert np.isnan(s.loss["response"][2]) and np.isnan(s.confidence["efficacy_pct"][1])
    assert s.confidence["toxicity_grade3"][1] == pytest.approx(math.log(0.6 / 0.4))
    assert s.loss["efficacy_pct"][2] == pytest.approx(0.25)
    assert s.confidence["efficacy_pct"][0] == pytest.approx(-0.25)
    total = s.loss["response"][0] + s.loss["toxicity_grade3"][0] + 0.25
    assert s.loss[ALL_HEADS][0] == pytest.approx(total)
    assert s.loss[ALL_HEADS][2] == pytest.approx(-math.log(0.99) + 0.25)  # unrecorded response left out
    assert s.confidence[ALL_HEADS][0] == pytest.approx(-total)


def test_calibrated_score_subtracts_the_reference_models_mean_loss_and_lira_needs_two_references():
    target = RowStatistics({"h": np.array([1.0, 1.0])}, {"h": np.array([0.0, 2.0])})
    refs = [RowStatistics({"h": np.array([3.0, 1.0])}, {"h": np.array([-1.0, 2.0])}),
            RowStatistics({"h": np.array([5.0, 1.0])}, {"h": np.array([1.0, 4.0])})]
    assert set(attack_scores(target, [], "h")) == {"loss"}
    assert set(attack_scores(target, refs[:1], "h")) == {"loss", "calibrated"}
    scores = attack_scores(target, refs, "h")
    np.testing.assert_allclose(scores["loss"], [-1.0, -1.0])
    np.testing.assert_allclose(scores["calibrated"], [3.0, 0.0])  # row 0 is hard for models without it
    # μ_out = (0, 3); per-row variances (ddof 1) 2 and 2 -> global σ = √2
    np.testing.assert_allclose(scores["lira"], [0.5, norm_cdf(-1 / math.sqrt(2))])


def norm_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_audit_rows_are_balanced_training_members_and_test_non_members():
    patients = np.repeat([f"P{i:03d}" for i in range(200)], 3)
    frame = pd.DataFrame({"patient_id": patients, "row": np.arange(len(patients))})
    task = NANOPARTICLE_TASK
    rows = audit_rows(frame, task, split_seed=4, rng=np.random.default_rng(0))
    labels = pd.Series(assign_split(frame, task, 4), index=frame["row"])
    members = rows.frame[rows.is_member]
    non_members = rows.frame[~rows.is_member]
    assert len(members) == len(non_members) == int((labels == "test").sum())
    assert set(labels[members["row"]]) == {"train"} and set(labels[non_members["row"]]) == {"test"}
    assert members["row"].is_unique


def test_fresh_outsiders_let_every_training_patient_be_a_member():
    patients = np.repeat([f"P{i:03d}" for i in range(200)], 3)
    frame = pd.DataFrame({"patient_id": patients, "row": np.arange(len(patients))})
    task = NANOPARTICLE_TASK
    labels = pd.Series(assign_split(frame, task, 4), index=frame["row"])
    n_train, n_test = (int((labels == s).sum()) // 3 for s in ("train", "test"))
    needed = outsiders_needed(frame, task, 4)
    assert needed == n_train - n_test > 0
    # outsiders reuse the site's own patient names: their units must still be distinct non-members
    outsiders = pd.DataFrame({"patient_id": np.repeat([f"P{i:03d}" for i in range(needed)], 2),
                              "row": -1 - np.arange(2 * needed)})
    rows = audit_rows(frame, task, split_seed=4, rng=np.random.default_rng(0), outsiders=outsiders)
    members, non_members = rows.frame[rows.is_member], rows.frame[~rows.is_member]
    assert set(labels[members["row"]]) == {"train"} and len(members) == 3 * n_train  # every training patient
    assert len(np.unique(rows.unit[rows.is_member])) == len(np.unique(rows.unit[~rows.is_member])) == n_train
    fresh = np.char.startswith(rows.unit.astype(str), FRESH_PREFIX)
    assert not (fresh & rows.is_member).any() and int(fresh.sum()) == 2 * needed
    assert set(labels[non_members["row"][non_members["row"] >= 0]]) == {"test"}
    assert len(set(rows.unit[rows.is_member]) & set(rows.unit[~rows.is_member])) == 0


def test_non_member_check_is_chance_for_exchangeable_fresh_patients_and_flags_a_shifted_cohort():
    rng = np.random.default_rng(5)

    def site(shift: float) -> tuple[np.ndarray, AuditRows]:
        units = np.r_[[f"M{i}" for i in range(100)], [f"T{i}" for i in range(100)],
                      [f"{FRESH_PREFIX}F{i}" for i in range(300)]]
        units = np.repeat(units, 2)
        is_member = np.char.startswith(units, "M")
        score = rng.normal(0, 1, len(units)) + np.where(np.char.startswith(units, FRESH_PREFIX), shift, 0.0)
        score[::17] = np.nan  # an unrecorded outcome is left out, not counted
        return score, AuditRows(pd.DataFrame({"unit": units}), is_member, units)

    same = {name: site(0.0) for name in ("a", "b")}
    check = non_member_check({k: v[0] for k, v in same.items()}, {k: v[1] for k, v in same.items()})
    assert check["patients"]["members"] == 200 and check["patients"]["non_members"] == 600  # test vs fresh
    assert abs(check["auc"] - 0.5) < 3 * check["auc_se_clustered"]
    assert abs(check["patients"]["auc"] - 0.5) < 3 * check["patients"]["auc_se"]
    assert check["members_vs_test"]["patients"]["members"] == 200  # members against test patients only
    assert check["members_vs_test"]["patients"]["non_members"] == 200
    shifted = {name: site(1.0) for name in ("a", "b")}  # fresh patients that look different: detected
    check = non_member_check({k: v[0] for k, v in shifted.items()}, {k: v[1] for k, v in shifted.items()})
    assert check["auc"] < 0.5 - 5 * check["auc_se_clustered"]
    assert abs(check["members_vs_test"]["auc"] - 0.5) < 3 * check["members_vs_test"]["auc_se_clustered"]


def test_fresh_patients_are_new_patients_of_the_same_clinic_drawn_until_enough():
    from types import SimpleNamespace

    from simulation.clinics import make_world, simulate_clinic
    from simulation.membership_audit import fresh_patients

    world = make_world(2, 3, patients_per_clinic=15)
    run = SimpleNamespace(world=world, task=NANOPARTICLE_TASK, sites={})
    own, _ = simulate_clinic(world, world.clinics[1])
    fresh = fresh_patients(run, "clinic_01", 40)  # more than one cohort of 15 holds: three draws
    assert fresh["patient_id"].nunique() == 40
    assert set(fresh["patient_id"].str.split(":").str[0]) == {"d0", "d1", "d2"}
    assert list(fresh.columns) == list(own.columns)
    assert not own["age_years"].isin(fresh["age_years"]).all()  # other patients than the site's
    pd.testing.assert_frame_equal(fresh, fresh_patients(run, "clinic_01", 40))  # seeded
    assert fresh_patients(run, "clinic_01", 0).empty


def test_balanced_subsamples_only_the_larger_group():
    rng = np.random.default_rng(0)
    m, n = balanced(np.arange(10.0), np.arange(4.0), rng)
    assert len(m) == len(n) == 4 and len(set(m)) == 4 and set(m) <= set(range(10))
    np.testing.assert_array_equal(n, np.arange(4))


def test_cluster_bootstrap_se_grows_when_rows_are_copies_of_their_patient():
    rng = np.random.default_rng(3)
    members, non_members = rng.normal(0.3, 1, 60), rng.normal(0, 1, 60)
    independent = attack_metrics(members, non_members, np.arange(60), np.arange(60) + 100)
    assert independent["auc_se_clustered"] == pytest.approx(independent["auc_se"], rel=0.25)
    # every patient contributes 5 identical rows: 5x the rows, the same information
    copies = attack_metrics(np.repeat(members, 5), np.repeat(non_members, 5), np.repeat(np.arange(60), 5),
                            np.repeat(np.arange(60) + 100, 5))
    assert copies["auc"] == pytest.approx(independent["auc"], abs=0.01)
    assert copies["auc_se"] < 0.6 * independent["auc_se"]  # counting rows overstates the evidence
    assert copies["auc_se_clustered"] == pytest.approx(independent["auc_se_clustered"], rel=0.25)
    assert (copies["member_units"], copies["non_member_units"]) == (60, 60)


def test_the_training_phase_named_is_a_privacy_phase_of_the_protocol():
    from shared.protocol.privacy import PHASES
    from simulation.membership_audit import TRAINING_PHASE

    assert TRAINING_PHASE in PHASES


def test_report_section_is_added_once_and_replaced_by_a_later_audit(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# Run\n\n## Privacy\n\ntext\n")
    add_to_report(report, [REPORT_SECTION, "", "first", ""])
    add_to_report(report, [REPORT_SECTION, "", "second", ""])
    text = report.read_text()
    assert text.count(REPORT_SECTION) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Run\n\n## Privacy\n\ntext\n")
    add_to_report(tmp_path / "absent.md", [REPORT_SECTION])
    assert not (tmp_path / "absent.md").exists()


def test_a_folder_without_a_simulate_result_is_refused_naming_the_file(tmp_path):
    from simulation.membership_audit import AuditError, run_membership_audit

    with pytest.raises(AuditError, match="results.json"):
        run_membership_audit(tmp_path)
    (tmp_path / "results.json").write_text('{"models": {}}')
    with pytest.raises(AuditError, match="results.json: no 'config'"):
        run_membership_audit(tmp_path)
    with pytest.raises(AuditError, match="non-members 'held-out': expected one of test, fresh"):
        run_membership_audit(tmp_path, non_members="held-out")


@pytest.mark.slow
def test_audit_of_an_overfitted_federation_finds_membership_above_chance(tmp_path, shared_ray):
    """Three clinics of 100 patients, 8 rounds of 8 local epochs, a wide ANN, no DP: a model that memorises.
    Measured with this configuration (seed 1; `fednano audit membership --references 0`): loss attack on the
    summed loss, 0.719 ± 0.038 per episode (73 pairs, cluster bootstrap) and 0.838 ± 0.053 per patient (30
    pairs). Asserted: both above chance by three standard errors."""
    from typer.testing import CliRunner

    from fednano.cli import app
    from shared.validation import load_site
    from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment
    from simulation.membership_audit import run_membership_audit

    flower_environment(tmp_path)
    quiet_flower()
    out = tmp_path / "run"
    run_experiment(ExperimentConfig(out=out, clinics=3, rounds=8, local_epochs=8, hidden="128,128", dp=False, seed=1,
                                    models="ann", patients_per_clinic=100, compare=False, policy=False))
    audit = run_membership_audit(out, references=0)
    written = json.loads((out / "audit" / "membership.json").read_text())
    assert written == json.loads(json.dumps(audit))
    assert written["headline"] == {"model": "ann", "head": ALL_HEADS, "attack": "loss"}
    assert set(written["overall"]) >= {"auc", "tpr_at_1pct_fpr"}
    assert set(written["per_site"]) == {"clinic_00", "clinic_01", "clinic_02"}
    for site, m in written["per_site"].items():
        assert m["members"] == m["non_members"] > 0
        assert m["members"] <= min(written["rows"][site]["members"], written["rows"][site]["non_members"])
        assert 0 <= m["tpr_at_1pct_fpr"] <= 1
    assert written["overall"]["members"] == sum(m["members"] for m in written["per_site"].values())
    episodes, patients = written["overall"], written["patients"]["overall"]
    assert episodes["auc"] > 0.5 + 3 * episodes["auc_se_clustered"]
    assert patients["auc"] > 0.5 + 3 * patients["auc_se"]
    assert REPORT_SECTION in (out / "report.md").read_text()

    result = CliRunner().invoke(app, ["audit", "membership", str(out), "--references", "1"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "audit" / "membership.json").read_text())
    assert again["headline"]["attack"] == "calibrated" and again["reference_models"] == 1
    assert set(again["attacks"]["ann"][ALL_HEADS]) == {"loss", "calibrated"}  # LiRA needs two reference models
    assert (out / "report.md").read_text().count(REPORT_SECTION) == 1
    missing = CliRunner().invoke(app, ["audit", "membership", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "results.json" in missing.output

    # every training patient against the test patients plus fresh patients of the same clinics
    result = CliRunner().invoke(app, ["audit", "membership", str(out), "--references", "0", "--non-members", "fresh"])
    assert result.exit_code == 0, result.output
    fresh = json.loads((out / "audit" / "membership.json").read_text())
    assert fresh["non_members"] == "fresh"
    for site, counts in fresh["rows"].items():
        split = pd.Series(assign_split(load_site(out / "sites" / site).episodes, NANOPARTICLE_TASK, 1))
        before = written["rows"][site]
        assert counts["member_units"] == counts["non_member_units"] > before["member_units"]
        assert counts["fresh_non_member_units"] == counts["non_member_units"] - before["non_member_units"]
        assert fresh["patients"]["per_site"][site]["members"] == counts["member_units"]
        assert counts["members"] == int((split == "train").sum())  # all of the training rows
    check = fresh["non_member_check"]
    assert check["patients"]["members"] == sum(r["non_member_units"] for r in written["rows"].values())
    assert abs(check["patients"]["auc"] - 0.5) < 3 * check["patients"]["auc_se"]  # fresh ≈ test non-members
    assert fresh["patients"]["overall"]["auc"] > 0.5 + 3 * fresh["patients"]["overall"]["auc_se"]
    assert fresh["patients"]["overall"]["auc_se"] < 0.6 * written["patients"]["overall"]["auc_se"]  # more pairs
    bad = CliRunner().invoke(app, ["audit", "membership", str(out), "--non-members", "val"])
    assert bad.exit_code == 2 and "expected one of test, fresh" in bad.output


def _benchmark(monkeypatch):
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("membership_audit_benchmark", folder / "membership_audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_pools_independent_worlds_and_reuses_only_the_same_run(monkeypatch, tmp_path):
    bench = _benchmark(monkeypatch)
    worlds = [{"auc": 0.60, "auc_se": 0.01, "auc_se_clustered": 0.03, "tpr_at_1pct_fpr": 0.02, "members": 400,
               "non_members": 400, "false_positives_at_1pct": 4},
              {"auc": 0.50, "auc_se": 0.04, "tpr_at_1pct_fpr": 0.04, "members": 300, "non_members": 300,
               "false_positives_at_1pct": 3}]
    pooled = bench.pool(worlds)
    assert pooled["auc"] == pytest.approx(0.55) and pooled["tpr_at_1pct_fpr"] == pytest.approx(0.03)
    assert pooled["se"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)  # the clustered se where there is one
    assert pooled["tpr_se"] == pytest.approx(0.01)
    assert (pooled["members"], pooled["false_positives_at_1pct"], pooled["worlds"]) == (700, 7, 2)
    assert bench.rounded({"delta": 1e-5, "auc": 0.503149, "n": [3, 0.123456]}) == {"delta": 1e-5, "auc": 0.5031,
                                                                                    "n": [3, 0.1235]}
    from simulation.experiment import ExperimentConfig

    cfg = ExperimentConfig(out=tmp_path, clinics=5, patients_per_clinic=120, rounds=10, dp=True, epsilon=3.0,
                           seed=1, models="ann,xgboost", xgb_rounds=10, compare=False, policy=False)
    assert not bench.same_run(tmp_path, cfg)  # nothing there
    config = {"clinics": 5, "patients_per_clinic": 120, "rounds": 10, "dp": True, "seed": 1,
              "models": "ann,xgboost", "xgb_rounds": 10, "epsilon": 3.0}
    (tmp_path / "results.json").write_text(json.dumps({"config": config}))
    assert bench.same_run(tmp_path, cfg)
    (tmp_path / "results.json").write_text(json.dumps({"config": config | {"epsilon": 1.0}}))
    assert not bench.same_run(tmp_path, cfg)  # another budget is another run
