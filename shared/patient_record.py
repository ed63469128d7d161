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

import unicodedata
from typing import Annotated, Literal

import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.bsa import BSA_TOLERANCE, mosteller_bsa_m2
from shared.schema import EPISODE_COLUMNS, SEXES, TUMOUR_TYPES, VITALS_COLUMNS, columns_by_name

_EPISODE = columns_by_name(EPISODE_COLUMNS)
_VITALS = columns_by_name(VITALS_COLUMNS)

MAX_ID_CHARS = 64
"""Longest patient or formulation id: FHIR's ``id`` datatype allows 64 characters (R4 §2.24.0.1)."""
MAX_CATALOGUE = 50
"""Most formulations one record may list: a site stocks a handful (the simulated clinics up to 12); a longer
list is a mistake, and each entry multiplies the policy's work."""
MAX_SOURCE_CHARS = 200
"""Longest free-text ``source`` note."""
NEUTROPENIA_GRADE3_E9_L = 1.0
"""ANC below 1.0 × 10⁹/L is grade ≥ 3 neutropenia (CTCAE v5.0, "neutrophil count decreased"), which
``toxicity_grade3`` counts (``shared.schema``: any grade ≥ 3 toxicity, neutropenia included)."""
FORBIDDEN_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible formatting character",
                        "Zl": "a line separator", "Zp": "a paragraph separator"}
"""Unicode categories refused in ids: they do not print, can split a log line or a FHIR ``identifier.value``,
or reorder what a reader sees (U+202E)."""


def _bounded(column: str, kind: type = float, table: dict = _EPISODE):
    """A field type with the range, unit and description of ``column`` in the site-data contract (the unit also
    as the JSON schema's ``unit``, which the clinician's form shows: :mod:`client.patient_form`)."""
    col = table[column]
    unit = "" if col.unit == "-" else f" ({col.unit})"
    extra = {} if col.unit == "-" else {"unit": col.unit}
    return Annotated[kind, Field(ge=col.low, le=col.high, description=col.description + unit, json_schema_extra=extra)]


Sex = Literal[SEXES]  # type: ignore[valid-type]
TumourType = Literal[TUMOUR_TYPES]  # type: ignore[valid-type]


def _printable(text: str) -> str:
    """An id or note: refuse characters that do not print (see ``FORBIDDEN_CATEGORIES``)."""
    for char in text:
        what = FORBIDDEN_CATEGORIES.get(unicodedata.category(char))
        if what is not None:
            raise ValueError(f"contains {what} (U+{ord(char):04X}); ids and notes must be printable text")
    return text


Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_printable)]


class RecordInconsistent(ValueError):
    """Fields that are each valid but contradict one another: ``problems`` is a list of (fields, rule)."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]) -> None:
        super().__init__("; ".join(f"{', '.join(fields)}: {rule}" for fields, rule in problems))
        self.problems = problems


class _Strict(BaseModel):
    """No unknown keys (a misspelt field is an error, not silently ignored); numbers must be finite; strict
    types: ``true`` is not the integer 1 and ``"66"`` is not a number (pydantic's strict mode)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


class PreviousCycle(_Strict):
    """What was given in the previous cycle and what came of it."""

    formulation_id: Annotated[Identifier, Field(description="Formulation given")]
    dose_mg_m2: Annotated[_bounded("dose_mg_m2"), Field(gt=0)]
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
            raise RecordInconsistent([(("fever_days", "days_recorded"), "fever_days cannot exceed days_recorded")])
        return self


class PatientRecord(_Strict):
    """A patient at the start of a treatment cycle, as the recommender takes it."""

    patient_id: Annotated[Identifier, Field(description="Pseudonymous patient id (printable, at most 64 "
                                                        "characters)")]
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
    catalogue: Annotated[list[Identifier], Field(
        min_length=1, max_length=MAX_CATALOGUE, description="Ids of the formulations the site stocks")]
    source: Annotated[str, Field(max_length=MAX_SOURCE_CHARS), AfterValidator(_printable)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PatientRecord:
        problems = history_problems(self) + body_size_problems(self)
        if problems:
            raise RecordInconsistent(problems)
        return self

    @property
    def mosteller_bsa_m2(self) -> float:
        """Body-surface area from height and weight (Mosteller, N Engl J Med 1987;317:1098)."""
        return float(mosteller_bsa_m2(self.height_cm, self.weight_kg))


def history_problems(record: PatientRecord) -> list[tuple[tuple[str, ...], str]]:
    """Contradictions between the cycle number, the cumulative dose and the previous cycle.

    A bad history would let a record escape the lifetime anthracycline limit (a cycle-30 patient with a
    cumulative dose of 0) or the dose-change rules, so a contradiction is refused, never guessed at:

    - from cycle 2 on, ``previous_cycle`` is required; at cycle 1 there is none;
    - ``cumulative_dose_mg_m2`` counts every earlier cycle, so it is at least the previous cycle's dose;
    - a previous-cycle ANC nadir below ``NEUTROPENIA_GRADE3_E9_L`` is a grade ≥ 3 toxicity, so
      ``toxicity_grade3`` must say 1.
    """
    previous = record.previous_cycle
    if record.cycle > 1 and previous is None:
        return [(("cycle", "previous_cycle"), f"cycle {record.cycle} needs previous_cycle (the treatment and "
                                              f"outcome of cycle {record.cycle - 1})")]
    if previous is None:
        return []
    if record.cycle == 1:
        return [(("cycle", "previous_cycle"), "cycle 1 has no previous cycle of this treatment; give the cycle "
                                              "number or leave previous_cycle out")]
    problems = []
    if record.cumulative_dose_mg_m2 < previous.dose_mg_m2:
        problems.append((("cumulative_dose_mg_m2", "previous_cycle.dose_mg_m2"),
                         "the cumulative dose before this cycle must include the previous cycle's dose "
                         "(it is smaller)"))
    nadir = previous.anc_nadir_e9_l
    if nadir is not None and nadir < NEUTROPENIA_GRADE3_E9_L and previous.toxicity_grade3 == 0:
        problems.append((("previous_cycle.anc_nadir_e9_l", "previous_cycle.toxicity_grade3"),
                         f"an ANC nadir below {NEUTROPENIA_GRADE3_E9_L:g} × 10⁹/L is grade ≥ 3 neutropenia, "
                         "so toxicity_grade3 must be 1"))
    return problems


def body_size_problems(record: PatientRecord) -> list[tuple[tuple[str, ...], str]]:
    """``bsa_m2`` must agree with Mosteller's BSA from height and weight within ``BSA_TOLERANCE``.

    The absolute dose is dose per m² × BSA, so one wrong field (a BSA of 3.2 m² for a 25 kg, 100 cm
    patient whose BSA is 0.83 m²) would be a 3.8-fold overdose. Sites may use another formula (Du Bois,
    Haycock), which differ from Mosteller by a few per cent in adults; beyond the tolerance, one of the three
    fields is wrong and the record is refused.
    """
    expected = record.mosteller_bsa_m2
    if abs(record.bsa_m2 - expected) <= BSA_TOLERANCE * expected:  # the rule of the site-data check
        return []
    return [(("bsa_m2", "height_cm", "weight_kg"),
             f"bsa_m2 differs from Mosteller's sqrt(height_cm × weight_kg / 3600) by more than "
             f"{BSA_TOLERANCE:.0%}; check the three fields")]


MAX_ERROR_LINES = 20
"""Most problems listed for one input; the rest are counted (a record with 50,000 unknown keys gets 21
lines, not 50,000)."""


def field_problems(error) -> list[tuple[tuple, str]]:
    """A pydantic ``ValidationError`` as (location, message) pairs, without the input values.

    A :class:`RecordInconsistent` becomes one pair per contradiction, located at the fields it names.
    Values are never repeated back: an error names the field and the rule, since it may leave the process
    (a terminal, an HTTP client, a log) and the input may be a patient's data or megabytes long.
    """
    found = []
    for problem in error.errors(include_url=False, include_input=False):
        cause = (problem.get("ctx") or {}).get("error")
        if isinstance(cause, RecordInconsistent):
            prefix = "".join(f"{part}." for part in problem["loc"])  # the fields of a nested model, in full
            found += [((", ".join(prefix + f for f in fields),), rule) for fields, rule in cause.problems]
        else:
            found.append((tuple(problem["loc"]), problem["msg"]))
    return found


def error_lines(error, source: str = "patient record") -> list[str]:
    """A pydantic ``ValidationError`` as one line per problem (at most ``MAX_ERROR_LINES``): where
    (``source``, field path) and what was expected — the form the CLI prints. No input value is shown."""
    lines = [f"{source}: field {'.'.join(str(p) for p in loc) or '(record)'}: {message}"
             for loc, message in field_problems(error)]
    return bounded(lines)


def bounded(lines: list[str]) -> list[str]:
    """The first ``MAX_ERROR_LINES`` lines and, if there are more, one saying how many were left out."""
    if len(lines) <= MAX_ERROR_LINES:
        return lines
    return lines[:MAX_ERROR_LINES] + [f"... and {len(lines) - MAX_ERROR_LINES} more problems"]


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
