"""The policy phase end to end in Flower's simulation runtime: build, sign, distribute, install, evaluate.

One small ``fednano simulate`` run (3 clinics, 2 rounds, ANN + XGBoost): every site must hold the verified
bundle with its own release-gate verdict, the bundle must be what ``results.json`` names, and the simulator's
judgement must be coherent (no policy beats the oracle, per site and overall). Then the site's install step
must refuse a tampered, a wrongly signed and an older bundle, keeping its policy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.policy_handlers import install_contents
from client.policy_store import PolicyStore
from client.policy_store import site_store_root as policy_root
from shared.dosing_policy import DosingPolicy
from shared.patient_record import PatientRecord
from shared.policy_bundle import BundleRejected, bundle_contents, verify_bundle
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_ray) -> tuple[Path, dict]:
    flower_environment(ROOT)
    quiet_flower()
    out = tmp_path_factory.mktemp("policy-run")
    # the gate's estimate is recorded; the distribution and the installed policy are what is under test here
    cfg = ExperimentConfig(out=out, clinics=3, rounds=2, seed=4, xgb_rounds=5, patients_per_clinic=150,
                           compare=False, release_gate=False)
    return out, run_experiment(cfg)


def test_bundle_is_signed_written_to_out_policy_and_held_by_every_site(run):
    out, results = run
    policy = results["policy"]
    bundle, trust = Path(policy["bundle"]), Path(policy["trust_key"])
    assert bundle == out / "policy" / "v1" and trust.is_relative_to(out / "kit")
    manifest = verify_bundle(bundle, trust)
    assert manifest.version == policy["version"] == 1
    # DP sites (the simulator's default) grow no histogram trees unless they opt in: the bundle holds the run's
    # models, the ANN, and no booster
    assert set(manifest.files) == {"policy.json", "encoder.json", "ann_federated.pt"}
    assert "xgboost" not in results["models"]
    assert all("no share of ε" in why for why in results["not_trained"]["xgboost"]["refused"].values())
    assert set(manifest.privacy) == set(results["sites"])  # ε spent per site travels with the policy
    assert all(p["epsilon"] <= p["budget"] + 1e-9 for p in manifest.privacy.values())
    assert manifest.metrics["ann"]["response"]["auc"] == pytest.approx(  # what the sites released (DP)
        results["models"]["ann"]["federated"]["released"]["overall"]["response"]["auc"])
    assert policy["sites"] == {site: {"installed": True, "version": 1} for site in results["sites"]}
    for i, site in enumerate(sorted(results["sites"])):
        trust = out / "kit" / "sites" / f"site-{i}" / "policy_signing.pub"
        store = PolicyStore(policy_root(out / "sites" / site), trust)
        assert store.current().version == 1
        assert (store.installed_path() / "manifest.json").read_bytes() == (bundle / "manifest.json").read_bytes()


def test_each_site_stores_its_own_gate_verdict_with_the_version(run):
    """The coordinator sends each site the gate's figures on that site's own logs, and no other site's."""
    from shared.protocol.policy import SiteVerdict

    out, results = run
    per_site, trust = results["policy"]["gate"]["per_site"], Path(results["policy"]["trust_key"])
    verdicts = {}
    for site in results["sites"]:
        gate = PolicyStore(policy_root(out / "sites" / site), trust).site_gate()
        assert gate is not None and gate.version == 1 and gate.usual is not None
        assert gate.verdict == SiteVerdict.of_gate(per_site[site])
        verdicts[site] = gate.verdict
    assert len(set(verdicts.values())) == len(verdicts)  # each its own figures (the sites' logs differ)


def test_the_installed_policy_recommends_for_the_example_patient(run):
    out, results = run
    policy = DosingPolicy.from_bundle(Path(results["policy"]["bundle"]), Path(results["policy"]["trust_key"]))
    record = PatientRecord.model_validate_json((ROOT / "examples" / "patient.json").read_text())
    rec = policy.recommend([record])[0]
    assert rec.policy_version == 1 and rec.action == "give"
    assert rec.formulation_id in record.catalogue
    assert 10.0 <= rec.dose_mg_m2 <= 60.0 and rec.dose_mg == pytest.approx(rec.dose_mg_m2 * record.bsa_m2, abs=0.05)
    assert rec.interval_days == 28  # ovarian: label q4w
    assert 0.0 <= rec.toxicity.low <= rec.toxicity.mean <= rec.toxicity.high <= 1.0


def test_no_policy_beats_the_oracle_and_the_numbers_add_up(run):
    _, results = run
    evaluation = results["policy"]["evaluation"]
    assert set(evaluation["overall"]) == {"oracle", "standard_of_care", "site_standard_of_care", "federated", "local",
                                          "pooled", "random"}
    # the bottom of the scale is a random allowed action, not zero: the oracle beats it clearly
    assert evaluation["overall"]["random"]["value"] < evaluation["overall"]["oracle"]["value"] - 0.02
    for scope in [evaluation["overall"], *evaluation["per_site"].values()]:
        oracle = scope["oracle"]["value"]
        for name, m in scope.items():
            assert m["value"] <= oracle + 1e-12, name
            assert m["regret"] == pytest.approx(oracle - m["value"])
            assert m["value_ratio"] == pytest.approx(m["value"] / oracle)
            assert 0 <= m["toxicity_rate"] <= 1 and 0 <= m["response_rate"] <= 1
    # the oracle must gain on fixed label dosing (else the evaluation could not tell policies apart)
    assert evaluation["overall"]["oracle"]["value"] > evaluation["overall"]["standard_of_care"]["value"] + 0.02
    n = evaluation["patients_per_site"]
    assert evaluation["overall"]["federated"]["patients"] == n * len(evaluation["per_site"])
    report = (Path(results["policy"]["bundle"]).parent.parent / "report.md").read_text()
    assert "## Dosing policy" in report and "| federated |" in report and "**Release gate**" in report
    gate = results["policy"]["gate"]
    assert gate["lower"] <= gate["estimate"] <= gate["upper"] and "true_difference" in gate
    assert set(gate["per_site"]) == set(results["sites"])
    # the truth of what the gate estimates: candidate − each site's own SOC, sites weighted by the cycles valued
    weights = {site: e["n"] for site, e in gate["per_site"].items() if e.get("n")}
    truth = {site: evaluation["per_site"][site]["federated"]["value"]
             - evaluation["per_site"][site]["site_standard_of_care"]["value"] for site in weights}
    assert gate["true_difference"] == pytest.approx(sum(weights[s] * truth[s] for s in weights) / sum(weights.values()))


def test_site_refuses_tampered_foreign_and_older_bundles_and_keeps_its_policy(run, tmp_path):
    out, results = run
    bundle, trust = Path(results["policy"]["bundle"]), Path(results["policy"]["trust_key"])
    site = tmp_path / "site"
    site.mkdir()
    contents = bundle_contents(bundle)
    assert install_contents(contents, site, trust)[0] == 1
    store = PolicyStore(policy_root(site), trust)

    tampered = dict(contents, **{"policy.json": contents["policy.json"].replace(b'"toxicity_ceiling": 0.35',
                                                                                   b'"toxicity_ceiling": 0.95')})
    assert tampered != contents
    with pytest.raises(BundleRejected, match="policy.json"):
        install_contents(tampered, site, trust)
    with pytest.raises(BundleRejected, match="rollback|not newer"):
        install_contents(contents, site, trust)  # the same version again
    from server.provision import provision

    provision("other", ["x"], tmp_path / "other-kit")
    other_trust = tmp_path / "other-kit" / "sites" / "x" / "policy_signing.pub"
    foreign = tmp_path / "foreign"
    shutil.copytree(bundle, foreign)
    with pytest.raises(BundleRejected):
        verify_bundle(foreign, other_trust)
    assert store.current().version == 1
    assert json.loads((policy_root(site) / "current").read_text())["version"] == 1
