"""What the clinician's page shows for one recommendation: a plain view model, computed from the policy itself.

:func:`answer_view` turns a :class:`shared.dosing_policy.Recommendation` and the policy that made it into an
:class:`AnswerView` the template only prints: the action, formulation, dose in mg/m² and mg, interval, the
predicted response and grade ≥ 3 toxicity with their bounds, every rule applied and why, the standard-of-care
alternative beside it, a chart of predicted benefit and harm against dose, the policy's version, signature and
release-gate figures, and the FHIR resource to download. Nothing here is a number of its own:

- the chart's curves are the loaded policy's own predictions (``predicted_bounds`` of
  :class:`~shared.dosing_policy.DosingPolicy` or :class:`~shared.structured_policy.StructuredDosingPolicy`)
  for the recommended formulation at every dose of the policy's action space, with the bounds the policy ranks
  by as bands, the recommended dose marked and the hard rules' cap for this patient said in words;
- standard of care is :func:`shared.dosing_policy.label_actions` under the same policy's hard rules (the code
  the release gate and a site serving standard of care run), with the formulation the site's own verdict
  names (:mod:`client.site_gate`), else the structured policy's own fallback, else the previous cycle's;
- the FHIR resource is :func:`client.fhir.fhir_resource`, what ``POST /recommend/fhir`` answers.

Separate from the HTTP routes (:mod:`client.clinician_page`) so it is tested without a server or a browser.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from shared.dosing_policy import RESPONSE, TOXICITY, Estimate, Recommendation, RuleApplied, label_actions
from shared.patient_record import PatientRecord, records_frame
from shared.web.svg import Series, line_chart

ACTION_WORDS = {"give": "give this cycle", "withhold": "withhold: delay the cycle", "stop": "stop treatment"}
"""The policy's three verdicts in words."""
OUTCOME_LABELS = {RESPONSE: "P(response)", TOXICITY: "P(grade ≥ 3 toxicity)"}
"""The chart's series, named by what they predict (``shared.schema``: response is shrinkage ≥ 30 %,
toxicity_grade3 any grade ≥ 3 toxicity)."""
ADJUSTER_RULE, GUARD_RULE = "fitted-q-adjustment", "monotone-guard"
"""Rules (``shared.dosing_policy``) after which the chosen dose is not simply the best point of the chart."""
CHART_SIZE = (720, 340)
"""Width and height of the dose chart (px): the page's answer column at 1280 px."""


@dataclass(frozen=True)
class EstimateView:
    """A predicted probability with its bounds, as numbers and in words."""

    mean: float
    low: float
    high: float

    @property
    def text(self) -> str:
        return f"{self.mean:.0%} (bounds {self.low:.0%} – {self.high:.0%})"

    @classmethod
    def of(cls, estimate: Estimate | None) -> EstimateView | None:
        return None if estimate is None else cls(estimate.mean, estimate.low, estimate.high)


@dataclass(frozen=True)
class AlternativeView:
    """Standard of care for the same patient under the same hard rules, and why this formulation."""

    action: str
    formulation_id: str | None
    dose_mg_m2: float
    dose_mg: float
    interval_days: int
    response: EstimateView | None
    toxicity: EstimateView | None
    formulation_reason: str

    @property
    def action_words(self) -> str:
        return ACTION_WORDS.get(self.action, self.action)


@dataclass(frozen=True)
class PolicyView:
    """Which policy answered: version, provenance, signature status, release-gate figures, the site's verdict."""

    version: int | None
    created_utc: str | None
    run_id: str | None
    signature: str
    gate: tuple[tuple[str, str], ...]
    site_gate: str | None
    serving: str


@dataclass(frozen=True)
class AnswerView:
    """Everything the answer part of the page shows (see the module docstring)."""

    patient_id: str
    action: str
    formulation_id: str | None
    dose_mg_m2: float
    dose_mg: float
    bsa_m2: float | None
    interval_days: int
    response: EstimateView | None
    toxicity: EstimateView | None
    rules: tuple[RuleApplied, ...]
    standard_of_care: AlternativeView | None
    chart_svg: str | None
    chart_note: str
    policy: PolicyView
    fhir_href: str
    fhir_filename: str
    fhir_kind: str
    warnings: tuple[str, ...] = ()

    @property
    def action_words(self) -> str:
        return ACTION_WORDS.get(self.action, self.action)


def answer_view(policy, record: PatientRecord, recommendation: Recommendation, warnings: tuple[str, ...] = (),
                authored_on: datetime | None = None) -> AnswerView:
    """The page's view of ``recommendation`` (the policy's answer for ``record``); ``warnings``: lines to show
    (e.g. the vitals file's)."""
    from client.fhir import fhir_resource  # slow to import (fhir.resources): when a page answers, as the API does

    frame = records_frame([record])
    resource = fhir_resource(recommendation, authored_on)
    kind = str(resource.get("resourceType", "resource"))
    chart_svg, chart_note = dose_chart(policy, frame, recommendation)
    return AnswerView(
        patient_id=recommendation.patient_id, action=recommendation.action,
        formulation_id=recommendation.formulation_id, dose_mg_m2=recommendation.dose_mg_m2,
        dose_mg=recommendation.dose_mg, bsa_m2=recommendation.bsa_m2, interval_days=recommendation.interval_days,
        response=EstimateView.of(recommendation.response), toxicity=EstimateView.of(recommendation.toxicity),
        rules=tuple(recommendation.rules), standard_of_care=standard_of_care_view(policy, frame, recommendation),
        chart_svg=chart_svg, chart_note=chart_note, policy=policy_view(policy), fhir_href=data_url(resource),
        fhir_filename=f"{kind}.fhir.json", fhir_kind=kind, warnings=tuple(warnings))


def data_url(resource: dict[str, Any]) -> str:
    """A ``data:`` URL of the FHIR JSON, for a download link that needs no second request (and so records no
    second decision in a site's decision log)."""
    text = json.dumps(resource, indent=2, ensure_ascii=False)
    return "data:application/fhir+json;base64," + base64.b64encode(text.encode("utf-8")).decode("ascii")


# ---------------------------------------------------------------------------------------------------------
# The chart: predicted benefit and harm against dose


def dose_curve(policy, frame: pd.DataFrame, formulation_id: str, interval_days: float) -> pd.DataFrame:
    """The policy's predicted outcomes (mean, low, high of response and toxicity) of ``formulation_id`` at
    every dose of its action space for the one patient of ``frame``."""
    doses = policy.action_space.doses()
    actions = pd.DataFrame({"row": np.zeros(len(doses), dtype=int), "formulation_id": formulation_id,
                            "dose_mg_m2": doses, "interval_days": float(interval_days)})
    return policy.predicted_bounds(frame, actions)


def dose_chart(policy, frame: pd.DataFrame, recommendation: Recommendation) -> tuple[str | None, str]:
    """The chart's SVG (None when there is nothing to chart) and a sentence saying what it shows or why not."""
    if recommendation.action != "give" or recommendation.formulation_id is None:
        return None, f"No dose this cycle ({ACTION_WORDS.get(recommendation.action, recommendation.action)}): " \
                     "nothing to chart."
    if getattr(policy, "serves_standard_of_care", False):
        return None, "This site serves standard of care (its own release-gate verdict): the policy's predictions " \
                     "are not what is served, so none are charted."
    formulation = recommendation.formulation_id
    curve = dose_curve(policy, frame, formulation, recommendation.interval_days)
    doses = curve["dose_mg_m2"].to_numpy(dtype=float)
    series = [Series(OUTCOME_LABELS[o], tuple(doses), *(tuple(curve[f"{o}_{b}"].to_numpy(dtype=float))
                                                        for b in ("mean", "low", "high")))
              for o in (RESPONSE, TOXICITY)]
    svg = line_chart(series, title=f"Predicted benefit and harm of {formulation} against dose",
                     x_label="dose (mg/m²)", y_label="probability", marker_x=recommendation.dose_mg_m2,
                     marker_label=f"recommended {recommendation.dose_mg_m2:g} mg/m²", y_range=(0.0, 1.0),
                     width=CHART_SIZE[0], height=CHART_SIZE[1])
    cap, _ = policy.safety_limits(frame)
    note = (f"Lines: the policy's mean prediction for this patient; bands: the pessimistic and optimistic bounds it "
            f"ranks doses by; at interval {recommendation.interval_days} days.")
    if math.isfinite(cap[0]) and cap[0] < doses.max():
        note += f" The hard safety rules allow at most {cap[0]:g} mg/m² for this patient."
    applied = {rule.rule for rule in recommendation.rules}
    if ADJUSTER_RULE in applied:
        note += (" The dose itself was chosen by the fitted-Q adjuster, which weighs later cycles too, not by these "
                 "one-cycle predictions alone.")
    if GUARD_RULE in applied:
        note += " The monotone guard capped it (see the rules above)."
    return svg, note


# ---------------------------------------------------------------------------------------------------------
# Standard of care beside the recommendation


def standard_of_care_formulation(policy, frame: pd.DataFrame) -> tuple[str | None, str]:
    """Standard of care's formulation for the one patient of ``frame``, and where it comes from."""
    catalogue = list(frame["catalogue"].iloc[0])
    tumour = str(frame["tumour_type"].iloc[0])
    gate = getattr(policy, "site_gate", None)
    if gate is not None and gate.usual is not None:
        usual = str(gate.usual.for_records(frame["tumour_type"])[0])
        if usual in catalogue:
            return usual, f"this site's usual formulation for {tumour} (recorded from its logs at install)"
    inner = getattr(policy, "policy", policy)  # a site's GatedPolicy wraps the loaded policy
    if hasattr(inner, "standard_of_care"):
        chosen = str(inner.standard_of_care(frame)["formulation_id"].iloc[0])
        return chosen, "the catalogue's formulation the federation logged most (the structured policy's own " \
                       "standard of care)"
    previous = frame["previous_formulation_id"].iloc[0] if "previous_formulation_id" in frame else None
    if isinstance(previous, str) and previous in catalogue:
        return previous, "the formulation of the previous cycle"
    known = [f for f in catalogue if f in policy.formulations]
    return (known[0], "the first formulation of the catalogue the policy knows") if known else (None, "")


def standard_of_care_view(policy, frame: pd.DataFrame, recommendation: Recommendation) -> AlternativeView | None:
    """Standard of care (the label dose of the tumour type with the label hepatic reduction, under the policy's
    hard rules, at the label interval) for the patient, with the policy's predictions for it; None if no
    formulation of the catalogue can be named."""
    formulation, reason = standard_of_care_formulation(policy, frame)
    if formulation is None:
        return None
    soc = label_actions(policy, frame, np.asarray([formulation], dtype=object)).iloc[0]
    action = str(soc["action"])
    give = action == "give"
    dose = float(soc["dose_mg_m2"]) if give else 0.0
    bsa = recommendation.bsa_m2 if recommendation.bsa_m2 is not None else float(frame["bsa_m2"].iloc[0])
    interval = int(soc["interval_days"]) if action != "withhold" else recommendation.interval_days
    response = toxicity = None
    if give and formulation in policy.formulations and not getattr(policy, "serves_standard_of_care", False):
        actions = pd.DataFrame({"row": [0], "formulation_id": [formulation], "dose_mg_m2": [dose],
                                "interval_days": [float(interval)]})
        predicted = policy.predicted_bounds(frame, actions).iloc[0]
        response, toxicity = (EstimateView(*(round(float(predicted[f"{o}_{b}"]), 4) for b in ("mean", "low", "high")))
                              for o in (RESPONSE, TOXICITY))
    return AlternativeView(action=action, formulation_id=None if action == "stop" else formulation,
                           dose_mg_m2=dose, dose_mg=round(dose * bsa, 1), interval_days=interval if action != "stop"
                           else 0, response=response, toxicity=toxicity, formulation_reason=reason)


# ---------------------------------------------------------------------------------------------------------
# The policy: version, signature, release gate


GATE_FIGURES = (("passed", "passed"), ("estimate", "improvement over standard of care (utility per patient)"),
                ("lower", "95 % interval, lower"), ("upper", "95 % interval, upper"),
                ("candidate_estimate", "policy's value"), ("soc_estimate", "standard of care's value"),
                ("n", "cycles behind it"), ("reason", "verdict"))
"""The release gate's figures the manifest carries (``server.policy_phase.sign``: ``metrics.gate``), in order."""


def policy_view(policy) -> PolicyView:
    """The policy's identity for the page: a policy with a manifest was verified against the site's trust key
    when it was loaded (:func:`client.recommender.load_policy` refuses any other)."""
    manifest = policy.manifest
    gate = getattr(policy, "site_gate", None)
    serving = "standard of care (site gate)" if gate is not None and gate.worse else "the policy"
    if manifest is None:
        return PolicyView(None, None, None, "no signed manifest: not a verified bundle", (), None, serving)
    signature = (f"verified: Ed25519 signature of key {manifest.signing_key_id[:16]}… checked against this "
                 "site's trust key when the policy was loaded")
    figures = manifest.metrics.get("gate") if isinstance(manifest.metrics, dict) else None
    gate_rows = tuple((label, _figure(figures[key])) for key, label in GATE_FIGURES
                      if isinstance(figures, dict) and key in figures)
    return PolicyView(manifest.version, manifest.created_utc, manifest.run_id, signature, gate_rows,
                      None if gate is None else gate.describe(), serving)


def _figure(value: Any) -> str:
    if value is None:
        return "not estimable"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.3f}" if not value.is_integer() else f"{value:g}"
    return str(value)
