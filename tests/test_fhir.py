"""A recommendation as a FHIR R4 MedicationRequest (validated with fhir.resources.R4B) and round-tripped."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from client.fhir import PATIENT_ID_SYSTEM, UCUM, fhir_resource, medication_request
from shared.dosing_policy import Estimate, Recommendation, RuleApplied

WHEN = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)


def give(**changes) -> Recommendation:
    values = dict(patient_id="example-001", action="give", formulation_id="NP04", dose_mg_m2=37.5, dose_mg=64.9,
                  interval_days=28, response=Estimate(0.62, 0.55, 0.69), toxicity=Estimate(0.21, 0.15, 0.27),
                  rules=(RuleApplied("hepatic-reduction", "dose capped at 45 mg/m² (75% of 60)",
                                     "bilirubin 25 µmol/L above 20.5 (label hepatic reduction)"),),
                  policy_version=3)
    return Recommendation(**(values | changes))


def test_give_is_an_active_proposal_with_dose_in_mg_and_interval_in_days():
    resource = fhir_resource(give(), WHEN)
    assert resource["resourceType"] == "MedicationRequest"
    assert resource["status"] == "active" and resource["intent"] == "proposal"
    assert resource["subject"] == {"reference": "Patient/example-001"}
    assert resource["medicationCodeableConcept"]["text"] == "liposomal doxorubicin, formulation NP04"
    assert resource["authoredOn"] == "2026-11-27T09:30:00Z"
    (instruction,) = resource["dosageInstruction"]
    assert instruction["doseAndRate"][0]["doseQuantity"] == {"value": 64.9, "unit": "mg", "system": UCUM,
                                                             "code": "mg"}
    assert instruction["timing"]["repeat"] == {"frequency": 1, "period": 28, "periodUnit": "d"}
    # 64.9 mg / 37.5 mg/m² = 1.73 m²
    assert instruction["text"] == "37.5 mg/m² × 1.73 m² BSA = 64.9 mg intravenous infusion, every 28 days"
    assert instruction["route"]["coding"][0]["code"] == "47625008"


def test_notes_carry_every_rule_and_the_predicted_risks_with_bounds():
    notes = [n["text"] for n in fhir_resource(give(), WHEN)["note"]]
    assert notes[0] == ("rule hepatic-reduction: dose capped at 45 mg/m² (75% of 60) — bilirubin 25 µmol/L above "
                        "20.5 (label hepatic reduction)")
    assert notes[1] == "predicted response: 62.0% (range 55.0% to 69.0%)"
    assert notes[2] == "predicted grade >= 3 toxicity risk: 21.0% (range 15.0% to 27.0%)"
    assert "version 3" in notes[3] and "a clinician decides" in notes[3]


def test_resource_round_trips_through_json_and_the_fhir_model():
    resource = fhir_resource(give(), WHEN)
    parsed = MedicationRequest.model_validate_json(json.dumps(resource))
    assert json.loads(parsed.json()) == resource
    assert float(parsed.dosageInstruction[0].doseAndRate[0].doseQuantity.value) == pytest.approx(64.9)


def test_withhold_is_on_hold_without_a_dose_and_says_why():
    hold = give(action="withhold", dose_mg_m2=0.0, dose_mg=0.0, interval_days=7, response=None, toxicity=None,
                rules=(RuleApplied("neutropenia-hold", "no dose now; re-assess in 7 days",
                                   "ANC 0.8 × 10⁹/L below 1 (grade ≥ 3 neutropenia)"),))
    resource = fhir_resource(hold, WHEN)
    assert resource["status"] == "on-hold"
    assert resource["statusReason"]["text"] == "neutropenia-hold: ANC 0.8 × 10⁹/L below 1 (grade ≥ 3 neutropenia)"
    (instruction,) = resource["dosageInstruction"]
    assert "doseAndRate" not in instruction
    assert instruction["text"] == "no dose now; re-assess in 7 days"
    assert not any(n["text"].startswith("predicted") for n in resource["note"])
    MedicationRequest.model_validate(resource)


def test_stop_gives_no_request_but_an_operation_outcome_saying_why():
    stop = give(action="stop", formulation_id=None, dose_mg_m2=0.0, dose_mg=0.0, interval_days=0, response=None,
                toxicity=None, rules=(RuleApplied("cumulative-limit", "no further anthracycline",
                                                  "cumulative 545 of 550 mg/m² leaves less than the smallest dose"),))
    resource = fhir_resource(stop, WHEN)
    assert resource["resourceType"] == "OperationOutcome"
    issue = resource["issue"][0]
    assert issue["severity"] == "information"
    assert issue["diagnostics"] == ("cumulative-limit: no further anthracycline (cumulative 545 of 550 mg/m² "
                                    "leaves less than the smallest dose)")
    OperationOutcome.model_validate(resource)
    with pytest.raises(ValueError, match="has no MedicationRequest"):
        medication_request(stop)


def test_patient_id_that_is_not_a_fhir_id_becomes_a_logical_reference():
    resource = fhir_resource(give(patient_id="clinic_03/patient 17"), WHEN)
    assert resource["subject"] == {"identifier": {"system": PATIENT_ID_SYSTEM, "value": "clinic_03/patient 17"},
                                   "display": "clinic_03/patient 17"}
