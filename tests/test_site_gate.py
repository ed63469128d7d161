"""A site whose own logs find the shipped policy worse than its standard of care installs it but serves standard
of care, and says so (issue 12 item 3): the verdict in the install message, in the store, in the answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from flwr.app import ConfigRecord, Message, RecordDict
from typer.testing import CliRunner

from client.policy_store import PolicyStore, PolicyStoreError, site_store_root, verdict_path
from client.recommender import InstalledPolicy, followed_policy, read_patient, recommend
from client.service import make_app
from client.site_gate import (
    SITE_GATE_RULE,
    GatedPolicy,
    SiteGate,
    StandardOfCareUnknown,
    UsualFormulations,
)
from fednano.cli import app
from shared.dosing_policy import label_actions
from shared.patient_record import PatientRecord, records_frame
from shared.protocol import records as r
from shared.protocol.messages import INSTALL_POLICY
from shared.protocol.policy import SiteVerdict, install_request, verdict_of
from tests.test_recommender import EXAMPLE, example_dict, make_toy_policy, real_bundle

WORSE = SiteVerdict(worse=True, estimate=-0.052, lower=-0.090, upper=-0.014, n=120.0)
NOT_WORSE = SiteVerdict(worse=False, estimate=0.031, lower=-0.010, upper=0.072, n=120.0)
USUAL = UsualFormulations({"ovarian": "NP04", "breast": "NP00"}, "NP00")


@pytest.fixture(scope="module")
def toy():
    return make_toy_policy(version=7)


def gate(verdict: SiteVerdict = WORSE, usual: UsualFormulations | None = USUAL, version: int = 7) -> SiteGate:
    return SiteGate(version, verdict, usual)


# ---------------------------------------------------------------------------------------------------------
# The message: a site's own figures only


def test_the_verdict_travels_with_the_bundle_and_reads_back():
    content = install_request({"manifest.json": b"{}"}, WORSE)
    assert verdict_of(content) == WORSE
    assert verdict_of(install_request({"manifest.json": b"{}"})) is None
    unjudged = SiteVerdict.of_gate({"estimate": float("nan"), "lower": float("nan"), "upper": float("nan"),
                                    "n": 1.0, "worse": False, "candidate": 0.1, "standard_of_care": 0.2})
    assert unjudged == SiteVerdict(False, None, None, None, 1.0)
    assert verdict_of(install_request({}, unjudged)) == unjudged
    assert SiteVerdict.of_gate({"failed": "timeout"}) is None and SiteVerdict.of_gate(None) is None


@pytest.mark.parametrize("config", [
    {"site-worse": "yes", "site-cycles": 10.0},
    {"site-worse": True},
    {"site-worse": True, "site-cycles": 10.0, "site-estimate": "low"},
    {"site-worse": True, "site-cycles": -1.0},
    {"site-worse": True, "site-cycles": 10.0, "other-site-estimate": 0.1},
])
def test_a_malformed_verdict_is_a_value_error(config):
    with pytest.raises(ValueError, match="verdict"):
        verdict_of(RecordDict({r.BUNDLE: ConfigRecord({}), r.VERDICT: ConfigRecord(config)}))


class _Grid:
    """Records what the coordinator sends; every site installs."""

    def __init__(self):
        self.sent = []

    def send_and_receive(self, messages):
        from shared.protocol.policy import Installed

        self.sent = list(messages)
        return [Message(Installed(1, "/x").to_records(), reply_to=m) for m in messages]


def test_the_coordinator_sends_each_site_its_own_verdict_only(tmp_path, monkeypatch, task_identity):
    import server.policy_phase as phase

    monkeypatch.setattr(phase, "bundle_contents", lambda bundle: {"manifest.json": b"{}"})
    per_site = {"alpha": {"estimate": -0.05, "lower": -0.09, "upper": -0.01, "n": 120.0, "worse": True,
                          "candidate": 0.1, "standard_of_care": 0.15},
                "beta": {"estimate": 0.04, "lower": 0.01, "upper": 0.07, "n": 90.0, "worse": False,
                         "candidate": 0.2, "standard_of_care": 0.16},
                "gamma": {"failed": "timeout"}}
    grid = _Grid()
    phase.distribute(grid, [1, 2, 3], {1: "alpha", 2: "beta", 3: "gamma"}, tmp_path, per_site)
    got = {m.metadata.dst_node_id: verdict_of(m.content) for m in grid.sent}
    assert got == {1: SiteVerdict.of_gate(per_site["alpha"]), 2: SiteVerdict.of_gate(per_site["beta"]), 3: None}
    assert got[1].worse and not got[2].worse
    for m in grid.sent:  # nothing of another site: one verdict record, its five keys at most
        assert set(m.content) <= {r.BUNDLE, r.VERDICT}
        assert set(m.content.get(r.VERDICT, {})) <= set(SiteVerdict.KEYS.values())


# ---------------------------------------------------------------------------------------------------------
# The store: a verdict belongs to one version


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate-bundles")
    made = {v: real_bundle(folder / f"received-v{v}", v) for v in (1, 2, 3)}
    return {v: b for v, (b, _) in made.items()}, made[1][1]


def test_the_store_keeps_a_verdict_with_its_version_and_a_new_version_without_one_clears_it(bundles, tmp_path):
    received, trust = bundles
    store = PolicyStore(site_store_root(tmp_path), trust)
    assert store.site_gate() is None
    store.install(received[1], WORSE, USUAL)
    assert store.site_gate() == SiteGate(1, WORSE, USUAL)
    assert verdict_path(store.installed_path()).exists()
    store.install(received[2])  # no verdict: version 1's does not carry over
    assert store.current_version() == 2 and store.site_gate() is None
    store.install(received[3], NOT_WORSE, None)
    assert store.site_gate() == SiteGate(3, NOT_WORSE, None)
    stored = json.loads(verdict_path(store.installed_path()).read_text())
    assert stored["version"] == 3 and stored["verdict"]["worse"] is False


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text("{not json"),
    lambda p: p.write_bytes(b"\xff\xfe\x00"),
    lambda p: p.write_text("[]"),
    lambda p: p.write_text(json.dumps({"version": 1})),
    lambda p: p.write_text(p.read_text().replace('"worse": true', '"worse": "yes"')),
    lambda p: p.write_text(p.read_text().replace('"n": 120.0', '"n": "NaN"')),
    lambda p: p.write_text(p.read_text().replace('"overall": "NP00"', '"overall": 3')),
    lambda p: p.write_text(p.read_text().replace('"version": 1', '"version": true')),
    lambda p: p.write_text(p.read_text().replace('"manifest_sha256": "', '"manifest_sha256": "0')),
])
def test_a_damaged_verdict_file_is_an_error_naming_the_file(bundles, tmp_path, damage):
    received, trust = bundles
    store = PolicyStore(site_store_root(tmp_path), trust)
    store.install(received[1], WORSE, USUAL)
    path = verdict_path(store.installed_path())
    damage(path)
    with pytest.raises(PolicyStoreError, match=str(path)):
        store.site_gate()
    result = CliRunner().invoke(app, ["recommend", "--patient", str(EXAMPLE), "--site", str(tmp_path),
                                      "--trust", str(trust)])
    assert result.exit_code == 1 and result.stdout == "" and str(path) in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------
# Serving: standard of care with the rule, under the policy's own safety rules


def test_a_worse_verdict_serves_standard_of_care_with_the_rule(toy):
    served = GatedPolicy(toy, gate())
    with TestClient(make_app(served), raise_server_exceptions=False) as client:
        body = client.post("/recommend", json=example_dict()).json()
        health = client.get("/health").json()
        fhir = client.post("/recommend/fhir", json=example_dict())
    rule = body["rules"][0]
    assert rule["rule"] == SITE_GATE_RULE and rule["effect"] == "standard of care: NP04 at the label dose"
    assert rule["reason"] == ("policy v7 installed; this site's own logs find it worse than standard of care "
                              "(estimate -0.052 utility per patient, 95 % interval [-0.090, -0.014], n = 120): "
                              "standard of care served")
    # ovarian: the label's 50 mg/m², every 28 days, with the usual formulation; the policy's own rules still apply
    assert body["action"] == "give" and body["formulation_id"] == "NP04" and body["dose_mg_m2"] == 50.0
    assert body["interval_days"] == 28 and body["dose_mg"] == pytest.approx(round(50.0 * 1.731, 1))
    assert body["response"] is None and body["toxicity"] is None and body["policy_version"] == 7
    assert "dose-change-limit" in [r["rule"] for r in body["rules"]]  # 40 mg/m² last cycle: at most +25 %
    assert health["serving"] == "standard of care" and health["site_gate"]["worse"] is True
    assert health["site_gate"]["verdict"] == WORSE.to_dict() and health["policy_version"] == 7
    assert fhir.status_code == 200 and fhir.json()["resourceType"] == "MedicationRequest"


def test_standard_of_care_meets_every_safety_rule_the_policy_applies(toy):
    base = example_dict()
    records = {
        "low-anc": base | {"anc_baseline_e9_l": 0.8},
        "near-limit": base | {"cumulative_dose_mg_m2": 530.0},
        "at-limit": base | {"cumulative_dose_mg_m2": 548.0},
        "jaundiced": base | {"bilirubin_umol_l": 60.0},
        "large": base | {"weight_kg": 150.0, "height_cm": 195.0, "bsa_m2": 2.85},
        "after-toxicity": base | {"previous_cycle": base["previous_cycle"] | {"toxicity_grade3": 1}},
    }
    parsed = [PatientRecord.model_validate(v | {"patient_id": k}) for k, v in records.items()]
    got = {rec.patient_id: rec for rec in GatedPolicy(toy, gate()).recommend(parsed)}
    cap, verdict = toy.safety_limits(records_frame(parsed))
    for i, rec in enumerate(got.values()):
        assert rec.rules[0].rule == SITE_GATE_RULE
        assert rec.action == verdict[i] and (rec.action != "give" or rec.dose_mg_m2 <= cap[i] + 1e-9)
    assert got["low-anc"].action == "withhold" and got["low-anc"].dose_mg == 0.0
    assert "neutropenia-hold" in [r.rule for r in got["low-anc"].rules]
    assert got["near-limit"].dose_mg_m2 == 20.0 and "cumulative-limit" in [r.rule for r in got["near-limit"].rules]
    assert got["at-limit"].action == "stop" and got["at-limit"].formulation_id is None
    assert got["jaundiced"].dose_mg_m2 == 25.0  # the label's 50 % above 51 µmol/L
    assert got["large"].bsa_m2 == 2.0 and "bsa-cap" in [r.rule for r in got["large"].rules]
    assert got["after-toxicity"].dose_mg_m2 <= 40.0 * 0.75 + 1e-9


def test_standard_of_care_is_the_one_the_gate_measured(toy):
    """``client.ope.standard_of_care`` (what the site's verdict compared against) and the served answer agree."""
    from client.ope import standard_of_care

    logged = pd.DataFrame({"formulation_id": ["NP04", "NP04", "NP00", "NW00"],
                           "tumour_type": ["ovarian", "ovarian", "breast", "kaposi"]})
    usual = UsualFormulations.of(logged)
    assert usual == UsualFormulations({"ovarian": "NP04", "breast": "NP00", "kaposi": "NW00"}, "NP04")
    assert UsualFormulations.from_dict(usual.to_dict()) == usual
    frame = records_frame([read_patient(EXAMPLE)])
    measured = standard_of_care(toy, None, frame, logged)
    served = GatedPolicy(toy, gate(usual=usual)).recommend_frame(frame)
    assert measured["formulation_id"].tolist() == served["formulation_id"].tolist() == ["NP04"]
    np.testing.assert_array_equal(measured["dose_mg_m2"], served["dose_mg_m2"])
    np.testing.assert_array_equal(measured["interval_days"], served["interval_days"])


def test_a_verdict_not_worse_serves_the_policy_and_reports_the_verdict(toy):
    served = GatedPolicy(toy, gate(NOT_WORSE))
    with TestClient(make_app(served), raise_server_exceptions=False) as client:
        body = client.post("/recommend", json=example_dict()).json()
        health = client.get("/health").json()
    assert body == recommend(toy, read_patient(EXAMPLE))
    assert health["serving"] == "policy" and health["site_gate"]["worse"] is False
    assert "do not find it worse" in health["site_gate"]["summary"]


def test_no_standard_of_care_in_the_catalogue_is_a_422_saying_why_never_another_dose(toy):
    with TestClient(make_app(GatedPolicy(toy, gate())), raise_server_exceptions=False) as client:
        one = client.post("/recommend", json=example_dict() | {"catalogue": ["NP00", "NW00"]})
        batch = client.post("/recommend/batch", json=[example_dict(), example_dict() | {"catalogue": ["NP00"]}])
        fhir = client.post("/recommend/fhir", json=example_dict() | {"catalogue": ["NP00"]})
    for response in (one, batch, fhir):
        assert response.status_code == 422, response.text
    assert one.json()["errors"] == ["body: field catalogue: site-gate: standard of care is NP04, the site's usual "
                                    "formulation for ovarian, and it is not in the record's catalogue: no dose "
                                    "is recommended"]
    assert batch.json()["detail"][0]["loc"] == ["body", 1, "catalogue"]


def test_a_worse_verdict_without_usual_formulations_refuses_to_serve(toy):
    with pytest.raises(StandardOfCareUnknown, match="standard of care cannot be named"):
        GatedPolicy(toy, gate(usual=None))
    with pytest.raises(ValueError, match="version 3"):
        GatedPolicy(toy, gate(version=3))


def test_the_structured_policy_serves_standard_of_care_the_same_way():
    from shared.structured_policy import catalogue_of, fit_structured_policy
    from simulation.clinics import make_world, simulate_clinic

    world = make_world(3, seed=7, patients_per_clinic=120)
    sites = [simulate_clinic(world, clinic)[0] for clinic in world.clinics]
    catalogue = catalogue_of(pd.concat(sites, ignore_index=True))
    structured = fit_structured_policy(sites, catalogue)
    record = read_patient(EXAMPLE).model_copy(update={"catalogue": sorted(catalogue)})
    usual = UsualFormulations({}, sorted(catalogue)[-1])
    rec = GatedPolicy(structured, SiteGate(None, WORSE, usual)).recommend([record])[0]
    frame = records_frame([record])
    expected = label_actions(structured, frame, np.array([usual.overall], dtype=object))
    assert rec.rules[0].rule == SITE_GATE_RULE and "standard-of-care" not in [r.rule for r in rec.rules]
    assert rec.formulation_id == usual.overall and rec.dose_mg_m2 == expected["dose_mg_m2"][0]
    assert rec.response is None and rec.toxicity is None


# ---------------------------------------------------------------------------------------------------------
# The product end to end: install with the verdict, recommend and serve from the site's store


def test_recommend_and_serve_from_a_store_holding_a_worse_verdict(bundles, tmp_path):
    received, trust = bundles
    site = tmp_path / "alpha"
    site.mkdir()
    store = PolicyStore(site_store_root(site), trust)
    store.install(received[1], NOT_WORSE, USUAL)
    result = CliRunner().invoke(app, ["recommend", "--patient", str(EXAMPLE), "--site", str(site), "--trust",
                                      str(trust)])
    assert result.exit_code == 0, result.output
    assert "site gate: policy v1 installed; this site's own logs do not find it worse" in result.stderr
    assert SITE_GATE_RULE not in [r["rule"] for r in json.loads(result.stdout)["rules"]]

    served = followed_policy(None, trust, site)
    assert isinstance(served, InstalledPolicy)
    with TestClient(make_app(served), raise_server_exceptions=False) as client:
        assert client.get("/health").json()["serving"] == "policy"
        store.install(received[2], WORSE, USUAL)  # the next version comes with a worse verdict
        body = client.post("/recommend", json=example_dict()).json()
        assert body["policy_version"] == 2 and body["rules"][0]["rule"] == SITE_GATE_RULE
        assert body["formulation_id"] == "NP04" and client.get("/health").json()["serving"] == "standard of care"
        path = verdict_path(store.installed_path())
        path.write_text("{")  # damaged while serving: no answer until it is repaired
        response = client.post("/recommend", json=example_dict())
        assert response.status_code == 503 and str(path) in response.json()["errors"][0]
        assert client.get("/health").status_code == 503


def test_the_site_installs_the_message_with_its_verdict_and_its_usual_formulations(bundles, tmp_path,
                                                                                   task_identity):
    from client.policy_handlers import install_from_message
    from client.site import SiteSource
    from shared.policy_bundle import bundle_contents
    from simulation.clinics import generate_sites

    received, trust = bundles
    world = generate_sites(1, seed=3, out=tmp_path / "sites", patients_per_clinic=40)
    site = tmp_path / "sites" / world.clinics[0].name
    source = SiteSource(site, trust_key=trust)
    msg = Message(install_request(bundle_contents(received[1]), WORSE), dst_node_id=1, message_type=INSTALL_POLICY.type)
    reply = install_from_message(msg, source)
    assert not reply.has_error(), reply.error.reason
    stored = PolicyStore(site_store_root(site), trust).site_gate()
    assert stored.verdict == WORSE and stored.version == 1
    from client.ope import first_cycles
    from shared.validation import load_site

    assert stored.usual == UsualFormulations.of(first_cycles(load_site(site).episodes))
    hostile = install_request(bundle_contents(received[2]))
    hostile[r.VERDICT] = ConfigRecord({"site-worse": 1.5, "site-cycles": "many"})
    reply = install_from_message(Message(hostile, dst_node_id=1, message_type=INSTALL_POLICY.type), source)
    assert reply.has_error() and "verdict" in reply.error.reason
    assert PolicyStore(site_store_root(site), trust).current_version() == 1  # refused whole: v1 stays
