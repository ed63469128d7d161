"""The recommender's HTTP service: endpoints, OpenAPI schema, and 422 (never 500) for every bad request."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from client.recommender import read_patient, recommend
from client.service import MAX_BATCH, make_app
from tests.test_recommender import EXAMPLE, example_dict, make_toy_policy


@pytest.fixture(scope="module")
def policy():
    return make_toy_policy(version=7)


@pytest.fixture(scope="module")
def client(policy):
    with TestClient(make_app(policy), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_422_naming(response, *fields: str) -> list[str]:
    """A 422 whose FastAPI detail and readable errors both name every field; returns the readable lines."""
    assert response.status_code == 422, response.text
    body = response.json()
    locations = [".".join(str(p) for p in problem["loc"]) for problem in body["detail"]]
    for name in fields:
        assert any(loc.endswith(name) for loc in locations), (name, locations)
        assert any(name in line for line in body["errors"]), (name, body["errors"])
    return body["errors"]


def test_health_reports_status_version_and_manifest(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["policy_version"] == 7
    assert body["manifest"]["run_id"] == "toy" and body["manifest"]["files"] == ["policy.json"]
    assert body["manifest"]["privacy"]["clinic_00"]["epsilon"] == 2.5
    assert set(example_dict()["catalogue"]) <= set(body["formulations"])


def test_recommend_returns_what_the_cli_prints(client, policy):
    response = client.post("/recommend", json=example_dict())
    assert response.status_code == 200
    assert response.json() == recommend(policy, read_patient(EXAMPLE))
    assert response.json()["rules"] == [] or all(set(r) == {"rule", "effect", "reason"}
                                                 for r in response.json()["rules"])


def test_batch_returns_one_recommendation_per_record_in_order(client, policy):
    records = [example_dict() | {"patient_id": f"p{i}", "cumulative_dose_mg_m2": max(40.0, 100.0 * i)}
               for i in range(6)]  # at least the previous cycle's 40 mg/m²
    response = client.post("/recommend/batch", json=records)
    assert response.status_code == 200
    body = response.json()
    assert [r["patient_id"] for r in body] == [f"p{i}" for i in range(6)]
    assert body[5]["action"] == "give" and body[5]["dose_mg_m2"] <= 50.0  # 500 of 550 mg/m² leaves 50
    assert any(r["rule"] == "cumulative-limit" for r in body[5]["rules"])


def test_fhir_endpoint_returns_a_medication_request_proposal(client):
    response = client.post("/recommend/fhir", json=example_dict())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "MedicationRequest" and body["intent"] == "proposal"
    assert body["subject"] == {"reference": "Patient/example-001"}


def test_openapi_schema_documents_the_endpoints_and_the_record(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/recommend", "/recommend/batch", "/recommend/fhir"} <= set(schema["paths"])
    record = schema["components"]["schemas"]["PatientRecord"]
    assert record["properties"]["age_years"]["maximum"] == 110
    assert record["additionalProperties"] is False
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("body", [b"{", b"not json", b'{"patient_id": "a",}', b"[1, 2"])
def test_malformed_json_is_a_422(client, body):
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert len(errors) == 1 and errors[0].startswith("body: not valid JSON at character")


def test_empty_body_is_a_422_saying_the_record_is_required(client):
    response = client.post("/recommend", content=b"", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"] == ["body: empty; expected JSON"]


def test_json_error_says_where_and_why(client):
    response = client.post("/recommend", content=b'{"patient_id": "a",}', headers={"content-type": "application/json"})
    assert response.json()["errors"] == ["body: not valid JSON at character 19: Expecting property name enclosed "
                                         "in double quotes"]


def test_wrong_types_are_422_naming_the_field(client):
    record = example_dict() | {"age_years": "old", "cycle": 2.5, "catalogue": "NP00"}
    assert_422_naming(client.post("/recommend", json=record), "age_years", "cycle", "catalogue")


def test_out_of_range_values_are_422_naming_the_field_and_rule_not_the_value(client):
    record = example_dict() | {"bsa_m2": 9.0}
    record["wearable_summary"] = record["wearable_summary"] | {"max_temperature_c": 104.0}
    errors = assert_422_naming(client.post("/recommend", json=record), "bsa_m2", "max_temperature_c")
    assert "body: field bsa_m2: Input should be less than or equal to 3.2" in errors
    assert not any("9.0" in line or "104" in line for line in errors)


def test_unknown_fields_are_422_naming_them(client):
    record = example_dict() | {"wieght_kg": 60}
    errors = assert_422_naming(client.post("/recommend", json=record), "wieght_kg")
    assert errors == ["body: field wieght_kg: Extra inputs are not permitted"]


def test_missing_history_for_a_later_cycle_is_a_422(client):
    record = example_dict() | {"previous_cycle": None}
    response = client.post("/recommend", json=record)
    assert response.status_code == 422
    assert "cycle 3 needs previous_cycle" in response.json()["errors"][0]


def test_empty_batch_and_non_list_batch_are_422(client):
    errors = assert_422_naming(client.post("/recommend/batch", json=[]), "body")
    assert errors == [f"body: expected a list of 1 to {MAX_BATCH} records, got 0"]
    assert client.post("/recommend/batch", json=example_dict()).status_code == 422


def test_batch_errors_name_the_record_index(client):
    records = [example_dict(), example_dict() | {"ecog": 7}]
    response = client.post("/recommend/batch", json=records)
    assert response.json()["detail"] == [{"loc": ["body", 1, "ecog"], "msg": "Input should be less than or equal to "
                                                                         "4", "type": "value_error"}]
    errors = assert_422_naming(response, "ecog")
    assert errors == ["body[1]: field ecog: Input should be less than or equal to 4"]


def test_batch_above_the_limit_is_a_422(client):
    response = client.post("/recommend/batch", content=json.dumps([example_dict()] * (MAX_BATCH + 1)),
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"] == [f"body: expected a list of 1 to {MAX_BATCH} records, got {MAX_BATCH + 1}"]


def test_catalogue_the_policy_does_not_know_is_a_422_naming_it(client):
    for path in ("/recommend", "/recommend/fhir"):
        response = client.post(path, json=example_dict() | {"catalogue": ["XX09"]})
        assert response.status_code == 422
        assert response.json()["errors"][0].startswith("body: field catalogue: none of its 1 formulation(s) is "
                                                       "known to the policy; expected at least one of")
    response = client.post("/recommend/batch", json=[example_dict(), example_dict() | {"catalogue": ["XX09"]}])
    assert response.status_code == 422
    assert response.json()["errors"][0].startswith("body[1]: field catalogue")
    assert response.json()["detail"][0]["loc"] == ["body", 1, "catalogue"]


def test_wrong_method_and_path_are_not_500(client):
    assert client.get("/recommend").status_code == 405
    assert client.post("/recommend/nothing", json={}).status_code == 404


def test_serve_refuses_to_start_when_the_bundle_does_not_verify(tmp_path):
    from typer.testing import CliRunner

    from fednano.cli import app
    from tests.test_recommender import _key_pair

    _, public = _key_pair(tmp_path, "site")
    result = CliRunner().invoke(app, ["serve", "--policy", str(tmp_path), "--trust", str(public)])
    assert result.exit_code == 1
    assert f"policy bundle {tmp_path} rejected" in result.stderr
    assert "error: not starting the recommender service" in result.stderr


def test_serve_listens_on_localhost_by_default(policy, monkeypatch):
    from typer.testing import CliRunner

    import client.recommender
    import client.service
    from fednano.cli import app

    calls = []
    monkeypatch.setattr(client.recommender, "load_policy", lambda bundle, trust: policy)
    monkeypatch.setattr(client.service, "serve", lambda p, host, port, log, token, tls: calls.append(
        (p, host, port, log, token, tls)))
    monkeypatch.delenv("FEDNANO_WEB_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--policy", "b", "--trust", "k"])
    assert result.exit_code == 0, result.output
    assert calls == [(policy, "127.0.0.1", 8000, None, None, None)]  # no site folder: nothing to log in
    assert "policy version 7 verified; serving on http://127.0.0.1:8000" in result.stdout


def test_serve_refuses_another_address_without_a_token_and_tls(policy, monkeypatch):
    from typer.testing import CliRunner

    import client.recommender
    import client.service
    from fednano.cli import app

    calls = []
    monkeypatch.setattr(client.recommender, "load_policy", lambda bundle, trust: policy)
    monkeypatch.setattr(client.service, "serve", lambda *args, **kwargs: calls.append(args))
    monkeypatch.delenv("FEDNANO_WEB_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--policy", "b", "--trust", "k", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and calls == []
    assert "needs an access token (--token or $FEDNANO_WEB_TOKEN) and TLS (--tls-cert and --tls-key)" in result.stderr
    result = CliRunner().invoke(app, ["serve", "--policy", "b", "--trust", "k", "--tls-cert", "c.pem"])
    assert result.exit_code == 1 and "give both --tls-cert and --tls-key" in result.stderr and calls == []


def test_the_page_asks_for_the_token_when_the_service_has_one(policy):
    from shared.web.access import protect

    app = make_app(policy)
    protect(app, "a-token-of-24-characters")
    with TestClient(app) as guarded:
        assert guarded.get("/").status_code == 401
        assert guarded.get("/", headers={"Authorization": "Bearer a-token-of-24-characters"}).status_code == 200


def test_a_real_uvicorn_server_answers_over_tcp(policy):
    import threading
    import time

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(make_app(policy), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/health").json()["policy_version"] == 7
            assert http.post("/recommend", json=example_dict()).json()["patient_id"] == "example-001"
            assert http.post("/recommend", content=b"{").status_code == 422
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
