"""The clinician's page without a browser: the form comes from the contract, the answer from the policy, and every
bad input is a page naming the field and the rule (4xx, never a 500, never the value in a log)."""

from __future__ import annotations

import html
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from client.clinician_view import answer_view, dose_curve, standard_of_care_view
from client.patient_form import form_values, patient_form_fields, problems_by_field, validated_form
from client.recommender import RecommenderInputError, read_patient, recommendation_json
from client.service import make_app
from client.site_gate import GatedPolicy, SiteGate, UsualFormulations
from shared.dosing_policy import RESPONSE, TOXICITY, label_actions
from shared.patient_record import PatientRecord, records_frame
from shared.protocol.policy import SiteVerdict
from shared.schema import EPISODE_COLUMNS, VITALS_COLUMNS, columns_by_name
from tests.test_recommender import EXAMPLE, example_dict, make_toy_policy, vitals_frame


@pytest.fixture(scope="module")
def policy():
    return make_toy_policy(version=7)


@pytest.fixture(scope="module")
def structured():
    """The structured policy fitted on a small simulated world (seconds), as tests/test_site_gate.py fits it."""
    from shared.structured_policy import catalogue_of, fit_structured_policy
    from simulation.clinics import make_world, simulate_clinic

    world = make_world(3, seed=7, patients_per_clinic=120)
    sites = [simulate_clinic(world, clinic)[0] for clinic in world.clinics]
    return fit_structured_policy(sites, catalogue_of(pd.concat(sites, ignore_index=True)))


@pytest.fixture(scope="module")
def client(policy):
    with TestClient(make_app(policy), raise_server_exceptions=False) as test_client:
        yield test_client


def errors_of(page: str) -> dict[str, list[str]]:
    """The messages shown next to each input (by the input's id)."""
    found: dict[str, list[str]] = {}
    for input_id, text in re.findall(r'<span class="error" id="error-([^"]+)">([^<]*)</span>', page):
        found.setdefault(input_id, []).append(html.unescape(text))
    return found


def assert_a_page_with_messages(response, status: int = 422) -> dict[str, list[str]]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("text/html")
    assert "Traceback" not in response.text and 'id="patient-form"' in response.text
    return errors_of(response.text)


# ---------------------------------------------------------------------------------------------------------
# The form: derived from the contract


def test_every_record_field_is_in_the_form_with_the_contracts_unit_and_range():
    fields = {f.name: f for f in patient_form_fields()}
    record_fields = set(PatientRecord.model_fields) - {"previous_cycle", "wearable_summary"}
    assert record_fields <= set(fields)
    assert {f"previous_cycle.{k}" for k in ("formulation_id", "dose_mg_m2", "interval_days")} <= set(fields)
    contract, vitals = columns_by_name(EPISODE_COLUMNS), columns_by_name(VITALS_COLUMNS)
    for name in ("age_years", "weight_kg", "bsa_m2", "bilirubin_umol_l", "cumulative_dose_mg_m2"):
        assert (fields[name].low, fields[name].high, fields[name].unit) == (
            contract[name].low, contract[name].high, contract[name].unit)
    assert fields["wearable_summary.max_temperature_c"].unit == vitals["temperature_c"].unit
    assert fields["tumour_type"].choices == contract["tumour_type"].categories
    assert fields["previous_cycle.dose_mg_m2"].low_exclusive  # a previous dose of 0 is no previous cycle
    assert fields["bilirubin_umol_l"].required is False and fields["age_years"].required is True


def test_the_empty_form_has_every_field_blank(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for field in patient_form_fields():
        if field.kind == "choice":
            assert re.search(rf'name="{field.name}"[^>]*>\s*<option value="" selected>', page.text), field.name
        else:
            assert re.search(rf'name="{re.escape(field.name)}" value=""', page.text), field.name
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text


def test_the_example_patient_typed_into_the_form_is_the_example_record():
    assert validated_form(form_values(example_dict())) == read_patient(EXAMPLE)


def test_a_contradiction_is_shown_next_to_each_field_it_names():
    values = form_values(example_dict()) | {"bsa_m2": "2.9"}
    with pytest.raises(RecommenderInputError) as caught:
        validated_form(values)
    by_field, rest = problems_by_field(caught.value.problems)
    assert {"bsa_m2", "height_cm", "weight_kg"} <= set(by_field) and rest == []


# ---------------------------------------------------------------------------------------------------------
# The answer: the policy's own


def test_the_page_shows_what_recommend_returns(client, policy):
    page = client.post("/", data=form_values(example_dict()))
    assert page.status_code == 200, page.text[:500]
    expected = recommendation_json(policy.recommend([read_patient(EXAMPLE)])[0])
    shown = dict(re.findall(r'id="answer-([a-z0-9-]+)" data-value="([^"]*)"', page.text))
    assert shown["formulation"] == expected["formulation_id"] and shown["action"] == expected["action"]
    assert float(shown["dose-mg-m2"]) == expected["dose_mg_m2"] and float(shown["dose-mg"]) == expected["dose_mg"]
    assert int(shown["interval"]) == expected["interval_days"]
    assert all(rule["reason"] in page.text for rule in expected["rules"])
    assert 'role="img"' in page.text and "recommended 45 mg/m²" in page.text  # the chart, its marker


@pytest.mark.parametrize("which", ["toy", "structured"])
def test_the_chart_at_the_recommended_dose_is_the_recommendations_own_estimate(which, policy, structured):
    chosen = policy if which == "toy" else structured
    record = read_patient(EXAMPLE)
    if which == "structured":
        record = record.model_copy(update={"catalogue": sorted(structured.formulations)})
    rec = chosen.recommend([record])[0]
    assert rec.action == "give"
    curve = dose_curve(chosen, records_frame([record]), rec.formulation_id, rec.interval_days)
    assert np.array_equal(curve["dose_mg_m2"].to_numpy(), chosen.action_space.doses())
    at = curve[np.isclose(curve["dose_mg_m2"], rec.dose_mg_m2)].iloc[0]
    for outcome, estimate in ((RESPONSE, rec.response), (TOXICITY, rec.toxicity)):
        assert [round(float(at[f"{outcome}_{b}"]), 4) for b in ("mean", "low", "high")] == [
            estimate.mean, estimate.low, estimate.high]
    view = answer_view(chosen, record, rec)
    assert view.chart_svg is not None and f"recommended {rec.dose_mg_m2:g} mg/m²" in view.chart_svg


def test_standard_of_care_beside_it_is_the_label_dose_under_the_same_rules(policy):
    record = read_patient(EXAMPLE)
    rec = policy.recommend([record])[0]
    frame = records_frame([record])
    soc = standard_of_care_view(policy, frame, rec)
    expected = label_actions(policy, frame, np.array([soc.formulation_id], dtype=object)).iloc[0]
    assert soc.formulation_id == record.previous_cycle.formulation_id  # the ensemble policy: the patient's own
    assert (soc.action, soc.dose_mg_m2, soc.interval_days) == (expected["action"], expected["dose_mg_m2"],
                                                               expected["interval_days"])
    assert soc.dose_mg == round(soc.dose_mg_m2 * rec.bsa_m2, 1) and soc.response is not None


def test_a_site_serving_standard_of_care_says_so_and_charts_nothing(policy):
    worse = SiteVerdict(worse=True, estimate=-0.052, lower=-0.090, upper=-0.014, n=120.0)
    gated = GatedPolicy(policy, SiteGate(7, worse, UsualFormulations({"ovarian": "NP04"}, "NP00")))
    record = read_patient(EXAMPLE)
    view = answer_view(gated, record, gated.recommend([record])[0])
    assert view.chart_svg is None and "standard of care" in view.chart_note
    assert view.standard_of_care.formulation_id == "NP04" and "usual formulation for ovarian" in \
        view.standard_of_care.formulation_reason
    assert view.policy.serving.startswith("standard of care") and "worse" in view.policy.site_gate


def test_the_policy_panel_shows_version_signature_and_release_gate_figures(policy):
    import dataclasses

    gate = {"estimate": 0.031, "lower": 0.004, "upper": 0.058, "n": 240.0, "passed": True, "reason": "better"}
    signed = dataclasses.replace(policy, manifest=dataclasses.replace(policy.manifest, metrics={"gate": gate}))
    view = answer_view(signed, read_patient(EXAMPLE), signed.recommend([read_patient(EXAMPLE)])[0]).policy
    assert view.version == 7 and view.signature.startswith("verified")
    assert dict(view.gate)["passed"] == "yes" and dict(view.gate)["95 % interval, lower"] == "+0.004"


def test_the_fhir_link_holds_what_the_fhir_endpoint_returns(client):
    import base64

    page = client.post("/", data=form_values(example_dict())).text
    href = re.search(r'id="fhir-download" href="data:application/fhir\+json;base64,([^"]+)"', page).group(1)
    linked = json.loads(base64.b64decode(href))
    served = client.post("/recommend/fhir", json=example_dict()).json()
    for resource in (linked, served):
        resource.pop("authoredOn", None)
    assert linked == served and linked["resourceType"] == "MedicationRequest"


def test_a_patient_json_upload_fills_the_form_and_answers(client):
    page = client.post("/", files={"patient_json": ("patient.json", EXAMPLE.read_bytes(), "application/json")})
    assert page.status_code == 200 and 'id="answer"' in page.text
    assert 'name="age_years" value="66.1"' in page.text


def test_a_wearable_csv_replaces_the_summary_as_fednano_recommend_does(client, tmp_path):
    csv = vitals_frame(fever_on=(3, 4)).to_csv(index=False).encode()
    page = client.post("/", data=form_values(example_dict()), files={"vitals_csv": ("vitals.csv", csv, "text/csv")})
    assert page.status_code == 200, errors_of(page.text)
    assert 'name="wearable_summary.fever_days" value="2"' in page.text


# ---------------------------------------------------------------------------------------------------------
# Hostile inputs: a page with messages, 4xx, never a 500


@pytest.mark.parametrize("field, text, says", [
    ("age_years", "sixty", "not a number"),
    ("age_years", "NaN", "not a finite number"),
    ("weight_kg", "1e400", "not a finite number"),
    ("height_cm", "9" * 5000, "too long for a number"),
    ("cycle", "2.5", "not a whole number"),
    ("age_years", "1000", "less than or equal to 110"),
    ("sex", "X", "'F' or 'M'"),
    ("patient_id", "a\u202eb", "invisible formatting character"),
])
def test_a_bad_value_is_named_next_to_its_field(client, field, text, says):
    errors = assert_a_page_with_messages(client.post("/", data=form_values(example_dict()) | {field: text}))
    messages = errors.get("f-" + field.replace(".", "-"), [])
    assert any(says in m for m in messages), errors
    assert text not in " ".join(sum(errors.values(), []))


def test_a_missing_required_field_is_named(client):
    errors = assert_a_page_with_messages(client.post("/", data=form_values(example_dict()) | {"ecog": ""}))
    assert errors["f-ecog"] == ["Field required"]


def test_an_empty_form_names_every_required_field(client):
    errors = assert_a_page_with_messages(client.post("/", data={}))
    required = [f.name for f in patient_form_fields() if f.required and not f.group]
    assert all("f-" + name in errors for name in required), errors


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not valid JSON at line 1 column 2"),
    (b'{"age_years": NaN}', "NaN"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "valid dictionary"),
    (b"", None),  # no file content: the typed fields are read (and are missing)
])
def test_a_corrupt_patient_json_is_named_at_its_upload(client, content, says):
    response = client.post("/", files={"patient_json": ("p.json", content, "application/json")})
    errors = assert_a_page_with_messages(response)
    if says is not None:
        assert any(says in m for m in errors.get("f-patient_json", []) + re.findall(r"<li>([^<]*)</li>",
                                                                                    response.text)), errors


@pytest.mark.parametrize("content, says", [
    (b"a,b\n1,2\n", "column"),
    (b"\x00\x01\x02", "NUL"),
    (vitals_frame().assign(temperature_c=99.0).to_csv(index=False).encode(), "°F"),
])
def test_a_corrupt_wearable_csv_is_named_at_its_upload(client, content, says):
    response = client.post("/", data=form_values(example_dict()),
                           files={"vitals_csv": ("v.csv", content, "text/csv")})
    errors = assert_a_page_with_messages(response)
    assert any(says in m for m in errors["f-vitals_csv"]), errors
    assert "/tmp" not in response.text  # the upload is named, not its temporary copy


def test_an_upload_over_the_limit_is_a_413_page(client):
    response = client.post("/", files={"patient_json": ("p.json", b" " * (2 << 20), "application/json")})
    assert response.status_code == 413 and "larger than" in response.text


def test_a_body_that_is_not_a_form_is_a_400_page(client):
    response = client.post("/", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code in (400, 422) and "Traceback" not in response.text


def test_no_patient_value_reaches_a_log_line(client, caplog):
    marker_age, marker_id = "77.77", "patient-zeta-9931"
    with caplog.at_level(logging.DEBUG):
        client.post("/", data=form_values(example_dict()) | {"age_years": marker_age, "patient_id": marker_id})
        client.post("/", data=form_values(example_dict()) | {"age_years": "abc", "patient_id": marker_id})
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert marker_age not in logged and marker_id not in logged and "abc" not in logged


def test_a_store_that_cannot_vouch_for_its_policy_gets_a_503_page_saying_so(policy):
    from client.recommender import InstalledPolicy, PolicyUnavailable

    class Withdrawn(InstalledPolicy):
        """Served once (when the app is made), then the store's ``current`` is gone."""

        def __init__(self) -> None:
            self.calls = 0

        def current(self):
            self.calls += 1
            if self.calls == 1:
                return policy
            raise PolicyUnavailable("store: no policy installed any more")

    with TestClient(make_app(Withdrawn()), raise_server_exceptions=False) as withdrawn:
        for response in (withdrawn.get("/"), withdrawn.post("/", data=form_values(example_dict()))):
            assert response.status_code == 503 and "no policy can be served" in response.text
            assert 'id="answer"' not in response.text
