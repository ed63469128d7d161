"""The deployed telemedicine service records each dose it recommends in the site's decision log (decisions.csv):
probability 1, the served version (none where the site gate serves standard of care), one decision per patient's
cycle, valid for the site's own checks, and never in the way of an answer."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from client.decision_log import DecisionLog
from client.policy_store import PolicyStore, site_store_root
from client.recommender import followed_policy
from client.service import make_app
from client.site_gate import SITE_GATE_RULE
from fednano.cli import app
from shared.validation import load_site
from tests.sitefactory import write_site
from tests.test_recommender import EXAMPLE, example_dict, real_bundle
from tests.test_site_gate import NOT_WORSE, USUAL, WORSE


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("log-bundles")
    made = {v: real_bundle(folder / f"received-v{v}", v) for v in (1, 2)}
    return {v: b for v, (b, _) in made.items()}, made[1][1]


@pytest.fixture()
def site(bundles, tmp_path):
    received, trust = bundles
    folder = write_site(tmp_path)
    PolicyStore(site_store_root(folder), trust).install(received[1], NOT_WORSE, USUAL)
    return folder, trust


def logged(folder) -> pd.DataFrame:
    decisions = load_site(folder).decisions  # the log validates with the site, as the next gate reads it
    assert decisions is not None
    return decisions


def test_recommend_with_site_logs_the_dose_it_recommended(site):
    folder, trust = site
    result = CliRunner().invoke(app, ["recommend", "--patient", str(EXAMPLE), "--site", str(folder),
                                      "--trust", str(trust)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    decisions = logged(folder)
    assert len(decisions) == 1
    row = decisions.iloc[0]
    record = example_dict()
    assert (row["patient_id"], int(row["cycle"])) == (record["patient_id"], record["cycle"])
    assert (row["formulation_id"], float(row["dose_mg_m2"]), int(row["interval_days"])) == (
        answer["formulation_id"], answer["dose_mg_m2"], answer["interval_days"])
    assert int(row["policy_version"]) == 1 and row["probability"] == 1.0 and int(row["chosen"]) == 1


def test_a_service_logs_every_dose_once_per_cycle_and_standard_of_care_without_a_version(site, bundles):
    folder, trust = site
    received, _ = bundles
    record = example_dict()
    later = record | {"patient_id": "P-LATER"}
    with TestClient(make_app(followed_policy(None, trust, folder), DecisionLog(folder))) as client:
        assert client.post("/recommend", json=record).status_code == 200
        assert client.post("/recommend", json=record).status_code == 200  # asked again: still one decision
        assert client.post("/recommend/batch", json=[later]).status_code == 200
        assert client.get("/health").json()["decision_log"] == {"file": "decisions.csv", "problem": None}
        decisions = logged(folder)
        assert sorted(decisions["patient_id"]) == sorted([record["patient_id"], "P-LATER"])
        assert decisions["policy_version"].tolist() == [1, 1]

        PolicyStore(site_store_root(folder), trust).install(received[2], WORSE, USUAL)
        body = client.post("/recommend/fhir", json=record).json()
        assert body["resourceType"] == "MedicationRequest"
        decisions = logged(folder)
        again = decisions[decisions["patient_id"] == record["patient_id"]]
        assert len(again) == 1 and pd.isna(again["policy_version"].iloc[0])  # standard of care, the site's own
        answer = client.post("/recommend", json=record).json()
        assert answer["rules"][0]["rule"] == SITE_GATE_RULE and answer["formulation_id"] == \
            again["formulation_id"].iloc[0]


def test_a_log_the_service_cannot_update_is_left_alone_and_the_answer_still_given(site):
    folder, trust = site
    damaged = "patient,cycle\nX,1\n"
    (folder / "decisions.csv").write_text(damaged)
    with TestClient(make_app(followed_policy(None, trust, folder), DecisionLog(folder))) as client:
        response = client.post("/recommend", json=example_dict())
        assert response.status_code == 200 and response.json()["action"] == "give"
        problem = client.get("/health").json()["decision_log"]["problem"]
    assert (folder / "decisions.csv").read_text() == damaged  # nothing destroyed
    assert "decisions.csv" in problem and "not logged" in problem
    assert example_dict()["patient_id"] not in problem  # no patient identifier in the message
