"""``fednano simulate --personalise site-trees`` in Flower's simulation runtime: 2 clinics without DP, 1 with.

Each site without DP chooses among the federation's histogram boosters, its local-only boosters and the
federation's trees with its own added, on its validation split; results.json has ``models.xgboost.personalised``
in the shape of the federated entry and ``personalisation_xgboost.<site>.{chosen, reason, validation}``; the DP
site is not asked (its trees would have no DP form) and the record says why; no tree comes back.
"""

from __future__ import annotations

import json

import pytest

from client.personalisation_handlers import BOOSTING_RECORD, site_record_folder
from shared.protocol.personalisation import BOOSTING_DP_REFUSAL
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

pytestmark = pytest.mark.slow
CANDIDATES = {"global", "site-trees", "local"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("personalised_boosting")
    flower_environment(out)
    quiet_flower()
    generate_sites(2, seed=3, out=out / "sites", patients_per_clinic=150, privacy=SitePrivacy(dp=False))
    generate_sites(3, seed=3, out=out / "dp_sites", patients_per_clinic=150, privacy=SitePrivacy(dp=True, epsilon=3.0))
    (out / "dp_sites" / "clinic_02").rename(out / "sites" / "clinic_02")
    cfg = ExperimentConfig(out=out / "run", seed=3, models="xgboost", boosting="hist", xgb_rounds=8,
                           compare=False, policy=False, personalise="site-trees",
                           sites=[out / "sites" / f"clinic_{i:02d}" for i in range(3)])
    run_experiment(cfg)
    return out, json.loads((out / "run" / "results.json").read_text())


def test_each_site_without_dp_chose_among_the_three_and_the_dp_site_was_not_asked(run):
    _, results = run
    entry = results["models"]["xgboost"]["personalised"]
    assert set(entry["candidates"]) == CANDIDATES
    assert set(entry["per_site"]) == set(results["personalisation_xgboost"]) == {"clinic_00", "clinic_01"}
    assert entry["refused"] == {"clinic_02": BOOSTING_DP_REFUSAL}
    for site, part in results["personalisation_xgboost"].items():
        assert part["chosen"] in CANDIDATES and entry["chosen"][site] == part["chosen"]
        # the site trees are the default, kept unless another candidate beats them by more than the noise
        assert part["reason"].startswith(("kept site-trees", f"{part['chosen']} beat site-trees"))
        assert set(part["validation"]) == CANDIDATES
        # the chosen candidate's test figures are the chosen entry's
        assert entry["per_site"][site] == entry["candidates"][part["chosen"]]["per_site"][site]


def test_the_global_candidate_is_the_federated_boosters_on_the_same_test_rows(run):
    _, results = run
    federated = results["models"]["xgboost"]["federated"]["per_site"]
    candidates = results["models"]["xgboost"]["personalised"]["candidates"]
    for site in ("clinic_00", "clinic_01"):
        for outcome, figures in candidates["global"]["per_site"][site].items():
            assert figures["n"] == federated[site][outcome]["n"]
            for name in ("auc", "r2"):
                if name in figures and figures[name] is not None:
                    assert figures[name] == pytest.approx(federated[site][outcome][name], abs=1e-9)


def test_site_trees_differ_from_the_global_boosters_and_stay_at_the_site(run):
    out, results = run
    candidates = results["models"]["xgboost"]["personalised"]["candidates"]
    moved = [abs(candidates["site-trees"]["per_site"][s]["response"]["auc"]
                 - candidates["global"]["per_site"][s]["response"]["auc"]) for s in ("clinic_00", "clinic_01")]
    assert max(moved) > 1e-4  # the site's trees change its predictions
    cost = results["models"]["xgboost"]["personalised"]["cost"]
    assert cost["bytes"]["received"] < cost["bytes"]["sent"] / 4  # metrics came back, not boosters
    for site in ("clinic_00", "clinic_01"):
        chosen = results["personalisation_xgboost"][site]["chosen"]
        run_id = json.loads((out / "run" / "federated" / "federation.json").read_text())["run_id"]
        folder = site_record_folder(out / "sites" / site, site)
        stem = BOOSTING_RECORD.format(run=run_id)
        assert json.loads((folder / f"{stem}.json").read_text())["chosen"] == chosen
        assert sorted(p.name for p in (folder / f"{stem}-{chosen}").iterdir())  # the chosen boosters, one per head


def test_the_report_has_the_boosters_table_and_says_why_the_dp_site_was_not_asked(run):
    out, _ = run
    report = (out / "run" / "report.md").read_text()
    assert "## Personalised boosters (each site's choice)" in report
    assert "| site | global | site-trees | local | chosen |" in report
    assert "- clinic_02: not asked — " + BOOSTING_DP_REFUSAL in report


@pytest.fixture(scope="module")
def generic(tmp_path_factory, shared_ray):
    """The real liposome release-class table (a generic multiclass task) over 3 sites split by drug."""
    from simulation.paper_liposome import TASK_EXAMPLE, load_table, noniid_sites

    out = tmp_path_factory.mktemp("personalised_generic")
    flower_environment(out)
    quiet_flower()
    table = load_table()
    parts, _ = noniid_sites(table)
    paths = []
    for k, rows in enumerate(parts):
        paths.append(out / f"site_{k + 1}.csv")
        table.iloc[rows].to_csv(paths[-1], index=False)
    cfg = ExperimentConfig(out=out / "run", seed=0, rounds=3, models="ann,xgboost", boosting="hist", xgb_rounds=5,
                           compare=False, policy=False, dp=False, personalise="finetune,site-trees",
                           sites=paths, task=TASK_EXAMPLE)
    run_experiment(cfg)
    return json.loads((out / "run" / "results.json").read_text())


def test_both_families_personalise_on_a_generic_task_at_every_site(generic):
    sites = set(generic["sites"])
    assert len(sites) == 3
    for family, key, candidates in (("ann", "personalisation", {"global", "finetune", "local"}),
                                    ("xgboost", "personalisation_xgboost", CANDIDATES)):
        entry = generic["models"][family]["personalised"]
        assert set(entry["candidates"]) == candidates and set(entry["per_site"]) == sites
        for site in sites:
            assert generic[key][site]["chosen"] in candidates
            assert set(entry["per_site"][site]) == {"cluster"}  # the task's one outcome
    # the ANN choice's default rule: no site has DP, so every site was told the default its pooled evidence set
    for site in sites:
        part = generic["personalisation"][site]
        assert part["rule"] == "pooled" and part["evidence_dp"] is False and "site_chosen" in part
        assert part["decided_by"].startswith("pooled default ")
