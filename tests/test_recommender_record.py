"""A patient record the recommender accepts is consistent and plain: checked body size, history and types.

Each case is tried through both doors, the CLI (``fednano recommend --patient``) and HTTP (``POST /recommend``),
which must answer alike: one strict reader behind both.
"""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from client.service import MAX_BATCH, MAX_BATCH_BYTES, MAX_RECORD_BYTES, make_app
from fednano.cli import app
from shared.patient_record import MAX_CATALOGUE, PatientRecord
from shared.validation import BSA_TOLERANCE
from tests.test_recommender import example_dict, make_toy_policy


@pytest.fixture(scope="module")
def policy():
    return make_toy_policy(version=7)


@pytest.fixture(scope="module")
def client(policy):
    with TestClient(make_app(policy), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def cli(policy, monkeypatch, tmp_path):
    """``fednano recommend`` on a record (a dict, or raw text), with the toy policy: (exit code, stderr)."""
    import client.recommender

    monkeypatch.setattr(client.recommender, "load_policy", lambda bundle, trust: policy)

    def run(record) -> tuple[int, str]:
        path = tmp_path / "p.json"
        path.write_text(record if isinstance(record, str) else json.dumps(record))
        result = CliRunner().invoke(app, ["recommend", "--policy", "b", "--trust", "k", "--patient", str(path)])
        return result.exit_code, result.stderr.replace(str(path), "FILE")

    return run


def both_refuse(client, cli, record, *expected: str) -> None:
    """CLI exit 1 and HTTP 422, each with every expected line (``FILE`` / ``body`` as the source)."""
    code, stderr = cli(record)
    assert code == 1, stderr
    body = record if isinstance(record, str) else json.dumps(record)
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    for line in expected:
        assert f"error: FILE: {line}" in stderr, (line, stderr)
        assert f"body: {line}" in response.json()["errors"], (line, response.json()["errors"])


def with_previous(**changes) -> dict:
    record = example_dict()
    record["previous_cycle"] = record["previous_cycle"] | changes
    return record


# ---------------------------------------------------------------------------------------------------------
# Body size: the absolute dose follows the BSA, so the BSA is checked


def test_bsa_far_from_height_and_weight_is_refused_naming_the_three_fields(client, cli):
    # issue 14.2: 25 kg, 100 cm and 3.2 m² gave 40 mg/m² = 128 mg; Mosteller's BSA is 0.83 m² (33 mg)
    record = example_dict() | {"weight_kg": 25.0, "height_cm": 100.0, "bsa_m2": 3.2}
    both_refuse(client, cli, record, "field bsa_m2, height_cm, weight_kg: bsa_m2 differs from Mosteller's "
                                     "sqrt(height_cm × weight_kg / 3600) by more than 10%; check the three fields")
    assert client.post("/recommend/fhir", json=record).status_code == 422


@pytest.mark.parametrize(("factor", "accepted"), [(1.0, True), (1 + BSA_TOLERANCE - 0.005, True),
                                                  (1 - BSA_TOLERANCE + 0.005, True),
                                                  (1 + BSA_TOLERANCE + 0.005, False), (0.85, False)])
def test_bsa_within_the_stated_tolerance_of_mosteller_is_accepted(factor, accepted):
    mosteller = math.sqrt(160.8 * 67.1 / 3600)
    data = example_dict() | {"bsa_m2": round(mosteller * factor, 3)}
    assert BSA_TOLERANCE == 0.10
    if accepted:
        assert PatientRecord.model_validate(data).mosteller_bsa_m2 == pytest.approx(1.7312, abs=1e-4)
    else:
        with pytest.raises(ValueError, match="differs from Mosteller"):
            PatientRecord.model_validate(data)


# ---------------------------------------------------------------------------------------------------------
# History: a record that could escape the lifetime limit or the dose-change rules is refused


@pytest.mark.parametrize(("record", "line"), [
    (example_dict() | {"cycle": 30, "cumulative_dose_mg_m2": 0.0},
     "field cumulative_dose_mg_m2, previous_cycle.dose_mg_m2: the cumulative dose before this cycle must include "
     "the previous cycle's dose (it is smaller)"),
    (with_previous(dose_mg_m2=150.0) | {"cumulative_dose_mg_m2": 0.0},
     "field cumulative_dose_mg_m2, previous_cycle.dose_mg_m2: the cumulative dose before this cycle must include"),
    (with_previous(anc_nadir_e9_l=0.1),
     "field previous_cycle.anc_nadir_e9_l, previous_cycle.toxicity_grade3: an ANC nadir below 1 × 10⁹/L is grade "
     "≥ 3 neutropenia, so toxicity_grade3 must be 1"),
    (example_dict() | {"cycle": 1},
     "field cycle, previous_cycle: cycle 1 has no previous cycle of this treatment"),
    (example_dict() | {"previous_cycle": None},
     "field cycle, previous_cycle: cycle 3 needs previous_cycle"),
    (with_previous(dose_mg_m2=0.0), "field previous_cycle.dose_mg_m2: Input should be greater than 0"),
])
def test_inconsistent_history_is_refused_naming_the_fields(client, cli, record, line):
    code, stderr = cli(record)
    assert code == 1 and f"error: FILE: {line}" in stderr, stderr
    response = client.post("/recommend", json=record)
    assert response.status_code == 422 and any(e.startswith(f"body: {line}") for e in response.json()["errors"])


def test_a_consistent_later_cycle_is_accepted(client):
    record = with_previous(anc_nadir_e9_l=0.4, toxicity_grade3=1)
    assert client.post("/recommend", json=record).status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Types: exactly as JSON gives them, over HTTP as from a file


@pytest.mark.parametrize(("text", "line"), [
    (json.dumps(example_dict() | {"cycle": True}), "field cycle: Input should be a valid integer"),
    (json.dumps(example_dict() | {"age_years": "66"}), "field age_years: Input should be a valid number"),
    (json.dumps(example_dict() | {"cycle": 3.0}), "field cycle: Input should be a valid integer"),
    (json.dumps(with_previous(toxicity_grade3=False)), "field previous_cycle.toxicity_grade3: Input should be a "
                                                       "valid integer"),
    (json.dumps(example_dict()).replace('"cycle": 3,', '"cycle": 3, "cycle": 1,'),
     "key 'cycle' appears more than once in one object; give it once"),
])
def test_http_refuses_what_the_cli_refuses(client, cli, text, line):
    both_refuse(client, cli, text, line)


@pytest.mark.parametrize("field", ["age_years", "weight_kg", "height_cm", "bsa_m2", "bilirubin_umol_l",
                                   "creatinine_clearance_ml_min", "anc_baseline_e9_l", "ecog", "cycle",
                                   "tumour_burden_mm", "cumulative_dose_mg_m2", "previous_cycle.dose_mg_m2",
                                   "previous_cycle.anc_nadir_e9_l", "previous_cycle.efficacy_pct",
                                   "previous_cycle.interval_days", "wearable_summary.max_temperature_c",
                                   "wearable_summary.steps_change_pct", "wearable_summary.fever_days"])
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000])
def test_non_finite_or_huge_numbers_in_any_field_are_422_never_500(client, field, token):
    name = field.split(".")[-1]
    text = json.dumps(example_dict())
    key = f'"{name}": '
    start = text.index(key) + len(key)
    end = min(i for i in (text.find(",", start), text.find("}", start)) if i > 0)
    for path in ("/recommend", "/recommend/fhir"):
        response = client.post(path, content=text[:start] + token + text[end:],
                               headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        (line,) = response.json()["errors"]
        assert line.startswith(f"body: key '{name}': ") and len(response.content) < 500


# ---------------------------------------------------------------------------------------------------------
# Identifiers: printable, bounded; what reaches FHIR identifier.value is what was checked


@pytest.mark.parametrize("patient_id", ["MRN\n0047", "MRN\t0047", "MRN\x1b[31m", "MRN\u202e7400", "MRN\x00",
                                        "MRN\u2028x", "M" * 65])
def test_patient_ids_with_control_characters_or_too_long_are_refused(client, cli, patient_id):
    code, stderr = cli(example_dict() | {"patient_id": patient_id})
    assert code == 1 and "error: FILE: field patient_id: " in stderr
    response = client.post("/recommend/fhir", json=example_dict() | {"patient_id": patient_id})
    assert response.status_code == 422
    assert response.json()["errors"][0].startswith("body: field patient_id: ")
    assert patient_id not in response.text


def test_a_printable_id_that_is_not_a_fhir_id_reaches_fhir_as_an_identifier_unchanged(client):
    resource = client.post("/recommend/fhir", json=example_dict() | {"patient_id": "MRN 0047/113 é"}).json()
    assert resource["subject"]["identifier"]["value"] == "MRN 0047/113 é"


def test_catalogue_and_formulation_ids_are_bounded_and_printable(client):
    long = example_dict() | {"catalogue": ["NP00"] * (MAX_CATALOGUE + 1)}
    response = client.post("/recommend", json=long)
    assert response.status_code == 422
    assert response.json()["errors"] == [f"body: field catalogue: List should have at most {MAX_CATALOGUE} items "
                                         f"after validation, not {MAX_CATALOGUE + 1}"]
    odd = client.post("/recommend", json=example_dict() | {"catalogue": ["NP00", "NP\r04"]})
    assert odd.json()["errors"][0].startswith("body: field catalogue.1: Value error, contains a control character")


# ---------------------------------------------------------------------------------------------------------
# Size: refused before the work, and never echoed back


def test_a_body_above_the_limit_is_413_without_being_parsed(client):
    record = example_dict() | {"source": "x" * MAX_RECORD_BYTES}
    response = client.post("/recommend", json=record)
    assert response.status_code == 413
    assert response.json()["errors"] == [f"body: larger than {MAX_RECORD_BYTES} bytes, the limit of /recommend"]
    batch = client.post("/recommend/batch", content=b"[" + b" " * MAX_BATCH_BYTES + b"]",
                        headers={"content-type": "application/json"})
    assert batch.status_code == 413


def test_a_batch_above_the_limit_is_refused_before_any_record_is_read(client):
    body = json.dumps([{"not": "a record"}] * (MAX_BATCH + 1))
    response = client.post("/recommend/batch", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"] == [f"body: expected a list of 1 to {MAX_BATCH} records, got {MAX_BATCH + 1}"]


def test_errors_of_a_large_batch_are_bounded_and_echo_nothing(client):
    records = [example_dict() | {"ecog": 9, "patient_id": f"secret-{i}"} for i in range(MAX_BATCH)]
    response = client.post("/recommend/batch", json=records)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert len(errors) == 21 and errors[-1] == f"body[0]: ... and {MAX_BATCH - 20} more problems"
    assert "secret" not in response.text and len(response.content) < 5000
