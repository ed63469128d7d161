"""The patient record a dosing recommendation starts from (``examples/patient.json``), as a pydantic model.

One record is a patient at the start of a cycle: covariates, cycle number, cumulative anthracycline dose,
the previous cycle's treatment and outcome (from cycle 2 on), the summary of that cycle's wearable readings
(:func:`shared.wearables.summarise_cycle`) and the ids of the formulations the site stocks. Ranges and units
are those of the site-data contract (:mod:`shared.schema`), so a record the recommender accepts is one a
site's ``episodes.csv`` could hold. Both the CLI (``fednano recommend``) and the HTTP service
(``fednano serve``, where FastAPI turns a failed check into a 422 naming the field) validate with it.

Example
-------
>>> record = PatientRecord.model_validate_json(Path("examples/patient.json").read_text())  # doctest: +SKIP
>>> record.bsa_m2                                                                          # doctest: +SKIP
1.731
"""

from __future__ import annotations

from typing import Annotated, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.schema import EPISODE_COLUMNS, SEXES, TUMOUR_TYPES, VITALS_COLUMNS, columns_by_name

_EPISODE = columns_by_name(EPISODE_COLUMNS)
_VITALS = columns_by_name(VITALS_COLUMNS)


def _bounded(column: str, kind: type = float, table: dict = _EPISODE):
    """A field type with the range, unit and description of ``column`` in the site-data contract."""
    col = table[column]
    unit = "" if col.unit == "-" else f" ({col.unit})"
    return Annotated[kind, Field(ge=col.low, le=col.high, description=col.description + unit)]


Sex = Literal[SEXES]  # type: ignore[valid-type]
TumourType = Literal[TUMOUR_TYPES]  # type: ignore[valid-type]


class _Strict(BaseModel):
    """No unknown keys (a misspelt field is an error, not silently ignored); numbers must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class PreviousCycle(_Strict):
    """What was given in the previous cycle and what came of it."""

    formulation_id: Annotated[str, Field(min_length=1, description="Formulation given")]
    dose_mg_m2: _bounded("dose_mg_m2")
    interval_days: _bounded("interval_days", int)
    efficacy_pct: _bounded("efficacy_pct") | None = None
    toxicity_grade3: Annotated[int, Field(ge=0, le=1, description="Any grade >= 3 toxicity (0 or 1)")]
    anc_nadir_e9_l: _bounded("anc_nadir_e9_l") | None = None


class WearableSummary(_Strict):
    """Summary of the previous cycle's wearable readings (``shared.wearables.summarise_cycle``)."""

    days_recorded: Annotated[int, Field(ge=0, le=43, description="Days with at least one reading")]
    fever_days: Annotated[int, Field(ge=0, le=43, description="Days with temperature >= 38.0 °C")]
    max_temperature_c: _bounded("temperature_c", float, _VITALS) | None = None
    mean_heart_rate_bpm: _bounded("heart_rate_bpm", float, _VITALS) | None = None
    min_spo2_pct: _bounded("spo2_pct", float, _VITALS) | None = None
    mean_steps: _bounded("steps", float, _VITALS) | None = None
    steps_change_pct: Annotated[float, Field(ge=-100, le=10000, description="Activity change (%)")] | None = None

    @model_validator(mode="after")
    def _fever_within_recorded(self) -> WearableSummary:
        if self.fever_days > self.days_recorded:
            raise ValueError(f"fever_days ({self.fever_days}) cannot exceed days_recorded ({self.days_recorded})")
        return self


class PatientRecord(_Strict):
    """A patient at the start of a treatment cycle, as the recommender takes it."""

    patient_id: Annotated[str, Field(min_length=1, description="Pseudonymous patient id")]
    cycle: _bounded("cycle", int)
    age_years: _bounded("age_years")
    sex: Sex
    weight_kg: _bounded("weight_kg")
    height_cm: _bounded("height_cm")
    bsa_m2: _bounded("bsa_m2")
    bilirubin_umol_l: _bounded("bilirubin_umol_l") | None = None
    creatinine_clearance_ml_min: _bounded("creatinine_clearance_ml_min") | None = None
    anc_baseline_e9_l: _bounded("anc_baseline_e9_l") | None = None
    ecog: _bounded("ecog", int)
    tumour_type: TumourType
    tumour_burden_mm: _bounded("tumour_burden_mm") | None = None
    cumulative_dose_mg_m2: _bounded("cumulative_dose_mg_m2")
    previous_cycle: PreviousCycle | None = None
    wearable_summary: WearableSummary | None = None
    catalogue: Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1, description="Ids of the formulations the site stocks")]
    source: str | None = None

    @model_validator(mode="after")
    def _history_matches_cycle(self) -> PatientRecord:
        if self.cycle > 1 and self.previous_cycle is None:
            raise ValueError(f"cycle {self.cycle} needs previous_cycle (the treatment and outcome of cycle "
                             f"{self.cycle - 1})")
        return self


def error_lines(error, source: str = "patient record") -> list[str]:
    """A pydantic ``ValidationError`` as one line per problem: where (``source``, field path), the value and
    what was expected — the form the CLI prints."""
    lines = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(p) for p in problem["loc"]) or "(record)"
        value = problem.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{source}: field {where}{shown}: {problem['msg']}")
    return lines


PREVIOUS_PREFIX, WEARABLE_PREFIX = "previous_", "wearable_"


def records_frame(records: list[PatientRecord]) -> pd.DataFrame:
    """Records as one flat table, one row per record: the top-level fields under their own names, the previous
    cycle's as ``previous_<field>`` and the wearable summary's as ``wearable_<field>`` (NaN when absent), the
    catalogue as a tuple of ids. This is the form the policy computes on, vectorised over patients."""
    rows = []
    for record in records:
        row = record.model_dump(exclude={"previous_cycle", "wearable_summary", "source"})
        row["catalogue"] = tuple(record.catalogue)
        for prefix, part, model in ((PREVIOUS_PREFIX, record.previous_cycle, PreviousCycle),
                                    (WEARABLE_PREFIX, record.wearable_summary, WearableSummary)):
            values = part.model_dump() if part is not None else {}
            row.update({prefix + name: values.get(name) for name in model.model_fields})
        rows.append(row)
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c.startswith((PREVIOUS_PREFIX, WEARABLE_PREFIX))
               and c != PREVIOUS_PREFIX + "formulation_id"]
    frame[numeric] = frame[numeric].astype(float)
    return frame
