"""A dosing recommendation as a FHIR R4 MedicationRequest (a decision-support proposal, not an order).

Which FHIR library and release: ``fhir.resources`` 8.x ships FHIR R5 as its top-level package and R4B
(4.3.0) and STU3 as sub-packages; it has no R4 (4.0.1) package of its own. R4B is the R4 technical
correction: every element used here (``status``, ``intent``, ``medicationCodeableConcept``, ``subject``,
``dosageInstruction.doseAndRate.doseQuantity``, ``dosageInstruction.timing.repeat``, ``statusReason``,
``note``) has the same name, cardinality and type in R4 4.0.1 and R4B 4.3.0, whereas R5 replaced
``medicationCodeableConcept`` with a ``CodeableReference``. So the resource is built and validated with
``fhir.resources.R4B`` and is a valid R4 MedicationRequest.

The mapping:

- ``action`` "give" → status ``active``; "withhold" → ``on-hold`` with a ``statusReason``; "stop" → no
  request at all: :func:`fhir_resource` returns an ``OperationOutcome`` saying why (the rules applied);
- ``intent`` ``proposal`` (HL7: "a suggestion made by someone/something that doesn't have an intention to
  ensure it occurs"), the status of a decision-support output;
- ``subject``: ``Patient/<patient_id>`` when the id is a valid FHIR id, else a logical reference by
  identifier;
- ``medicationCodeableConcept.text``: liposomal doxorubicin and the formulation id;
- ``dosageInstruction``: the dose in mg as ``doseQuantity`` (UCUM ``mg``), the dose per m² and the BSA it
  was computed on (checked against height and weight, capped at 2.0 m²: :class:`shared.dosing_policy.SafetyRules`)
  in ``text``, the interval as ``timing.repeat`` (1 per ``period`` days, UCUM ``d``), intravenous route;
- ``note``: one annotation per rule applied (rule, effect, reason), one for the predicted response and
  toxicity risk with their bounds, one for the policy version.

Example
-------
>>> resource = fhir_resource(recommendation)              # doctest: +SKIP
>>> resource["resourceType"], resource["intent"]          # doctest: +SKIP
('MedicationRequest', 'proposal')
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from shared.dosing_policy import Estimate, Recommendation

FHIR_RELEASE = "R4 (validated with fhir.resources.R4B, FHIR 4.3.0)"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
INTRAVENOUS_ROUTE = {"system": SNOMED, "code": "47625008", "display": "Intravenous route"}
"""SNOMED CT 47625008 |Intravenous route (qualifier value)|: liposomal doxorubicin is given as an infusion."""

DRUG_NAME = "liposomal doxorubicin"
PATIENT_ID_SYSTEM = "urn:fednano:patient-id"
"""Identifier system of a patient id that is not a valid FHIR resource id (a logical reference)."""

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""A FHIR resource id (R4 datatype ``id``)."""

STATUS_OF_ACTION = {"give": "active", "withhold": "on-hold"}


def fhir_resource(recommendation: Recommendation, authored_on: datetime | None = None) -> dict[str, Any]:
    """The recommendation as FHIR JSON: a MedicationRequest, or for "stop" an OperationOutcome saying why.

    Both are validated by constructing the ``fhir.resources`` model; a failure there is a bug here, not a
    user's mistake, and raises ``pydantic.ValidationError``.
    """
    if recommendation.action == "stop":
        return json.loads(stop_outcome(recommendation).json())
    return json.loads(medication_request(recommendation, authored_on).json())


def medication_request(recommendation: Recommendation, authored_on: datetime | None = None) -> MedicationRequest:
    """The MedicationRequest (validated model) of a "give" or "withhold" recommendation."""
    status = STATUS_OF_ACTION.get(recommendation.action)
    if status is None:
        raise ValueError(f"action {recommendation.action!r} has no MedicationRequest; expected give or withhold "
                         "(a stop is an OperationOutcome: use fhir_resource)")
    moment = (authored_on or datetime.now(UTC)).astimezone(UTC)
    body: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "status": status,
        "intent": "proposal",
        "medicationCodeableConcept": {"text": medication_text(recommendation.formulation_id)},
        "subject": patient_reference(recommendation.patient_id),
        "authoredOn": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dosageInstruction": [dosage(recommendation)],
        "note": notes(recommendation),
    }
    if recommendation.action == "withhold":
        body["statusReason"] = {"text": "; ".join(f"{r.rule}: {r.reason}" for r in recommendation.rules)
                                or "withheld by the dosing policy"}
    return MedicationRequest.model_validate(body)


def stop_outcome(recommendation: Recommendation) -> OperationOutcome:
    """Why no MedicationRequest is proposed: treatment is to stop (e.g. the cumulative anthracycline limit)."""
    reasons = "; ".join(f"{r.rule}: {r.effect} ({r.reason})" for r in recommendation.rules) or "no rule recorded"
    return OperationOutcome.model_validate({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "information",
            "code": "informational",
            "details": {"text": f"no MedicationRequest: the dosing policy recommends stopping {DRUG_NAME} "
                                f"for patient {recommendation.patient_id}"},
            "diagnostics": reasons,
        }],
    })


def medication_text(formulation_id: str | None) -> str:
    """The medication as text: the drug and the formulation of the site's catalogue."""
    return f"{DRUG_NAME}, formulation {formulation_id}" if formulation_id else DRUG_NAME


def patient_reference(patient_id: str) -> dict[str, Any]:
    """``Patient/<id>`` when the id is a valid FHIR id; otherwise a logical reference by identifier."""
    if FHIR_ID.fullmatch(patient_id):
        return {"reference": f"Patient/{patient_id}"}
    return {"identifier": {"system": PATIENT_ID_SYSTEM, "value": patient_id}, "display": patient_id}


def dosage(recommendation: Recommendation) -> dict[str, Any]:
    """One dosage instruction: mg as doseQuantity (none when withheld), mg/m² in text, interval as timing."""
    r = recommendation
    timing = {"repeat": {"frequency": 1, "period": r.interval_days, "periodUnit": "d"}}
    if r.action == "withhold" or r.dose_mg <= 0:
        return {"text": f"no dose now; re-assess in {r.interval_days} days", "timing": timing,
                "route": {"coding": [INTRAVENOUS_ROUTE], "text": "intravenous infusion"}}
    bsa = r.bsa_m2 if r.bsa_m2 is not None else (r.dose_mg / r.dose_mg_m2 if r.dose_mg_m2 else None)
    capped = any(rule.rule == "bsa-cap" for rule in r.rules)
    per_m2 = f"{r.dose_mg_m2:g} mg/m²" + (f" × {bsa:.2f} m² {'capped ' if capped else ''}BSA" if bsa else "")
    return {
        "text": f"{per_m2} = {r.dose_mg:g} mg intravenous infusion, every {r.interval_days} days",
        "timing": timing,
        "route": {"coding": [INTRAVENOUS_ROUTE], "text": "intravenous infusion"},
        "doseAndRate": [{"doseQuantity": {"value": r.dose_mg, "unit": "mg", "system": UCUM, "code": "mg"}}],
    }


def notes(recommendation: Recommendation) -> list[dict[str, str]]:
    """Annotations: every rule applied and why, the predicted risks with their bounds, the policy."""
    r = recommendation
    lines = [f"rule {rule.rule}: {rule.effect} — {rule.reason}" for rule in r.rules]
    risks = [f"predicted {name}: {estimate_text(e)}" for name, e in
             (("response", r.response), ("grade >= 3 toxicity risk", r.toxicity)) if e is not None]
    lines += risks
    version = "unversioned" if r.policy_version is None else f"version {r.policy_version}"
    lines.append(f"decision-support proposal of the fednano federated dosing policy ({version}); "
                 "a clinician decides")
    return [{"text": line} for line in lines]


def estimate_text(estimate: Estimate) -> str:
    """A probability with its pessimistic/optimistic bounds, in percent."""
    return f"{estimate.mean:.1%} (range {estimate.low:.1%} to {estimate.high:.1%})"
