"""``fednano simulate --personalise`` end to end in Flower's simulation runtime: 3 DP clinics, 2 rounds.

results.json has ``models.ann.personalised`` in the shape of ``models.ann.federated`` and
``personalisation.<site>.{chosen, reason, validation}``; every DP site's ε grows in the personalisation phase,
and its ledger holds the steps under that phase.
"""

from __future__ import annotations

import json

import pytest

from client.dp import SiteDP
from client.personalisation_handlers import PHASE
from shared.protocol.personalisation import METHODS
from shared.validation import load_site
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("personalised")
    flower_environment(out)
    quiet_flower()
    cfg = ExperimentConfig(out=out, clinics=3, rounds=2, dp=True, seed=1, models="ann", compare=False,
                           fqi_iterations=0, policy_model="ensemble", personalise=",".join(METHODS))
    run_experiment(cfg)
    return out, json.loads((out / "results.json").read_text())


def test_results_have_the_personalised_models_in_the_federated_models_shape(run):
    _, results = run
    ann = results["models"]["ann"]
    personalised, federated = ann["personalised"], ann["federated"]
    assert set(personalised["per_site"]) == set(federated["per_site"]) == set(results["sites"])
    for site in results["sites"]:
        assert set(personalised["per_site"][site]) == set(federated["per_site"][site])
        assert set(personalised["per_site"][site]["response"]) == set(federated["per_site"][site]["response"])
    assert set(personalised["overall"]) == set(federated["overall"])
    assert set(personalised["candidates"]) == {"global", "local", *METHODS}


def test_each_site_says_what_it_chose_why_and_on_which_validation_figures(run):
    _, results = run
    for site in results["sites"]:
        part = results["personalisation"][site]
        assert part["chosen"] in {"global", "local", *METHODS}
        # the mix is among the methods, so it is what a site keeps unless beaten (ann_order)
        assert part["reason"].startswith(("kept mix", f"{part['chosen']} beat mix")), part["reason"]
        assert set(part["validation"]) == {"global", "local", *METHODS}
        assert "auc" in part["validation"]["global"]["response"]
        assert results["models"]["ann"]["personalised"]["chosen"][site] == part["chosen"]
        # the default rule pools only sites without DP: every site here is under DP, so its own rule decided
        assert part["rule"] == "own" and part["evidence_dp"] is True and "site_chosen" not in part
        assert part["decided_by"].startswith("its own rule: its validation evidence is a DP release")


def test_a_dp_sites_epsilon_grows_in_the_personalisation_phase_and_its_ledger_says_so(run):
    out, results = run
    for site, privacy in results["privacy"].items():
        phases = privacy["phases"]
        assert phases[PHASE]["epsilon_after"] > phases["evaluation"]["epsilon_after"] > 0
        assert privacy["epsilon"] <= privacy["budget"] + 1e-6
        data = load_site(out / "sites" / site)
        ledger = SiteDP.of(out / "sites" / site, data.config, state_dir=out / "sites" / ".ledger-heads").ledger
        spent = [e["epsilon_after"] for e in ledger.entries if e["phase"] == PHASE]
        # the local-only, fine-tuned, Ditto and FedPer fits (the mix has none), then the two releases
        assert len(spent) == 4 + 2 and spent[0] > phases["evaluation"]["epsilon_after"] - 1e-9
        assert phases[PHASE]["releases"] == len(spent)  # the record counts every entry of the phase's ledger


def test_the_report_has_the_per_site_table(run):
    out, _ = run
    report = (out / "report.md").read_text()
    assert "## Personalised ANNs (each site's choice)" in report
    assert "| site | global | finetune | ditto | fedper | mix | local | chosen |" in report
