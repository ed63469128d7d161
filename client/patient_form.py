"""The clinician's patient form: its fields derived from the patient record's contract, and a submission read back.

Every field of :class:`shared.patient_record.PatientRecord` (and of its previous-cycle and wearable-summary
parts) becomes one :class:`FormField` with the label, unit, allowed range and choices the record's JSON schema
declares — which come from the site-data contract (:mod:`shared.schema`) — so the form never holds a number of
its own and cannot drift from what the recommender accepts. Fields start blank: the form invents no default.

A submission (text per field) is read by :func:`record_from_form`: blank fields are left out (the record's
validator then names a required one as missing), numbers are parsed strictly (finite, an integer where the
contract says integer, short), and the record is validated by the recommender's own
:func:`client.recommender.validate_record`. Every problem is an :class:`client.recommender.InputProblem`
located at its field, never holding the value typed: the page shows it next to that field.

Example
-------
>>> [f.name for f in patient_form_fields()][:3]
['patient_id', 'cycle', 'age_years']
>>> record_from_form({"cycle": "two"})[1][0].rule                                    # doctest: +ELLIPSIS
'not a number...'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from client.recommender import InputProblem, RecommenderInputError, validate_record
from shared.patient_record import PatientRecord
from shared.schema import EPISODE_COLUMNS, columns_by_name

CONTRACT = columns_by_name(EPISODE_COLUMNS)
"""The site-data contract's columns, for the words of a field the record declares without a description."""
FORM_SOURCE = "form"
"""The ``source`` of a problem found in the form's fields."""
MAX_NUMBER_CHARS = 32
"""Longest text read as a number: a measured value needs a dozen characters; a longer one is a mistake (and
Python refuses integers of more than 4,300 digits with an error of its own)."""
CATALOGUE_SEPARATOR = ","
"""The catalogue is typed as formulation ids separated by commas."""
GROUP_TITLES = {"": "Patient", "previous_cycle": "Previous cycle (from cycle 2 on)",
                "wearable_summary": "Wearable summary of the previous cycle (or upload the readings below)"}
"""Fieldset titles: the record's top level and its two optional parts."""


@dataclass(frozen=True)
class FormField:
    """One input of the patient form, as the record's contract declares it.

    ``name`` is the field's path in the record (``previous_cycle.dose_mg_m2``), also the form input's name;
    ``kind`` one of ``number``, ``integer``, ``choice``, ``text``, ``list``; ``low``/``high`` the inclusive
    range (``low_exclusive``: the value must be above ``low``); ``unit`` as the contract writes it (empty for
    unitless values)."""

    name: str
    group: str
    label: str
    kind: str
    required: bool
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    choices: tuple[str, ...] = ()
    max_length: int | None = None

    @property
    def key(self) -> str:
        """The field's own name, without its group."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def input_id(self) -> str:
        """An HTML id for the input (dots are awkward in CSS selectors)."""
        return "f-" + self.name.replace(".", "-")

    @property
    def allowed(self) -> str:
        """The rule in words: ``18 – 110 year``, ``one of F, M``, ``0 or 1``."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "list":
            return f"formulation ids separated by '{CATALOGUE_SEPARATOR}'"
        if self.kind == "text":
            return f"text, at most {self.max_length} characters" if self.max_length else "text"
        if self.low is None or self.high is None:
            return "an integer" if self.kind == "integer" else "a number"
        if self.kind == "integer" and self.high - self.low == 1:
            return f"{self.low:g} or {self.high:g}"
        low = f"above {self.low:g}" if self.low_exclusive else f"{self.low:g}"
        unit = f" {self.unit}" if self.unit else ""
        return f"{low} – {self.high:g}{unit}" if not self.low_exclusive else f"{low}, at most {self.high:g}{unit}"

    @property
    def step(self) -> str:
        """The HTML ``step`` of a numeric input: whole numbers, or any."""
        return "1" if self.kind == "integer" else "any"


@cache
def patient_form_fields() -> tuple[FormField, ...]:
    """Every field of the patient record, in the record's order, its nested parts' fields after their group."""
    schema = PatientRecord.model_json_schema()
    definitions = schema.get("$defs", {})
    fields: list[FormField] = []
    for name, spec in schema["properties"].items():
        reference = _reference(spec)
        if reference is not None:
            part = definitions[reference]
            fields += [_field(f"{name}.{key}", name, sub, key in part.get("required", ()))
                       for key, sub in part["properties"].items()]
        else:
            fields.append(_field(name, "", spec, name in schema.get("required", ())))
    return tuple(fields)


def form_groups() -> list[tuple[str, str, list[FormField]]]:
    """The form's fieldsets: (group, title, fields), the record's top level first."""
    groups: dict[str, list[FormField]] = {}
    for field in patient_form_fields():
        groups.setdefault(field.group, []).append(field)
    return [(group, GROUP_TITLES.get(group, group), fields) for group, fields in groups.items()]


def _reference(spec: Mapping[str, Any]) -> str | None:
    """The name of the nested model a property holds (``$ref``, possibly in an ``anyOf`` with null), else None."""
    for option in (spec, *spec.get("anyOf", ())):
        if "$ref" in option:
            return option["$ref"].rsplit("/", 1)[-1]
    return None


def _field(name: str, group: str, spec: Mapping[str, Any], required: bool) -> FormField:
    """A :class:`FormField` from one property of the record's JSON schema (its non-null option)."""
    options = [o for o in spec.get("anyOf", (spec,)) if o.get("type") != "null"]
    value = {**spec, **options[0]} if options else dict(spec)
    unit = value.get("unit", "")
    column = CONTRACT.get(name.rsplit(".", 1)[-1])
    description = value.get("description") or (column.description if column else value.get("title") or name)
    suffix = f" ({unit})"
    label = description[:-len(suffix)] if unit and description.endswith(suffix) else description
    kinds = {"number": "number", "integer": "integer", "array": "list"}
    kind = "choice" if "enum" in value else kinds.get(value.get("type"), "text")
    inclusive, exclusive = value.get("minimum"), value.get("exclusiveMinimum")
    low_exclusive = exclusive is not None and (inclusive is None or exclusive >= inclusive)
    return FormField(name=name, group=group, label=label, kind=kind, required=required, unit=unit,
                     low=exclusive if low_exclusive else inclusive, high=value.get("maximum"),
                     low_exclusive=low_exclusive, choices=tuple(value.get("enum", ())),
                     max_length=value.get("maxLength"))


# ---------------------------------------------------------------------------------------------------------
# Reading a submission


def record_from_form(values: Mapping[str, str]) -> tuple[dict[str, Any], list[InputProblem]]:
    """The record (JSON form, not yet validated) that the submitted texts spell, and the problems of parsing
    them (one per field that is not a number, not finite, not whole, or too long). Blank fields are left out;
    a nested part is left out when all its fields are blank."""
    record: dict[str, Any] = {}
    problems: list[InputProblem] = []
    for field in patient_form_fields():
        text = str(values.get(field.name, "") or "").strip()
        if not text:
            continue
        try:
            value = _parsed(field, text)
        except ValueError as err:
            problems.append(InputProblem(FORM_SOURCE, tuple(field.name.split(".")), str(err)))
            continue
        target = record.setdefault(field.group, {}) if field.group else record
        target[field.key] = value
    return record, problems


def _parsed(field: FormField, text: str) -> Any:
    """The value of one field's text; ``ValueError`` naming the rule (never the text) if it is not one."""
    if field.kind == "list":
        return [item.strip() for item in text.split(CATALOGUE_SEPARATOR) if item.strip()]
    if field.kind in ("text", "choice"):
        return text
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"too long for a number (more than {MAX_NUMBER_CHARS} characters); expected {field.allowed}")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"not a number; expected {field.allowed}") from None
    if not math.isfinite(number):
        raise ValueError(f"not a finite number; expected {field.allowed}")
    if field.kind == "integer":
        if not number.is_integer():
            raise ValueError(f"not a whole number; expected {field.allowed}")
        return int(number)
    return number


def validated_form(values: Mapping[str, str]) -> PatientRecord:
    """The :class:`PatientRecord` the form spells, or :class:`RecommenderInputError` with every problem: the
    parsing problems first, then the record validator's for the fields that parsed (a field that did not parse
    is not reported again as missing)."""
    data, problems = record_from_form(values)
    try:
        record = validate_record(data, FORM_SOURCE)
    except RecommenderInputError as err:
        unparsed = {p.field for p in problems}
        raise RecommenderInputError(problems + [p for p in err.problems if tuple(p.field) not in unparsed]) from None
    if problems:
        raise RecommenderInputError(problems)
    return record


def form_values(record: PatientRecord | Mapping[str, Any]) -> dict[str, str]:
    """The form's texts for a record (to show a loaded patient JSON in the form): one per field, blank where the
    record has no value."""
    data = record.model_dump() if isinstance(record, PatientRecord) else record
    values = {}
    for field in patient_form_fields():
        part = data.get(field.group) if field.group else data
        value = part.get(field.key) if isinstance(part, Mapping) else None
        values[field.name] = _text(value)
    return values


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return f"{CATALOGUE_SEPARATOR} ".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value)


def problems_by_field(problems: list[InputProblem], inputs: tuple[str, ...] = ()
                      ) -> tuple[dict[str, list[str]], list[str]]:
    """The problems shown next to their fields (field path → rules) and the rest (lines for the page's top);
    ``inputs``: the page's other inputs a problem may be located at (its file uploads).

    A contradiction between fields (``bsa_m2, height_cm, weight_kg``) is shown next to each field it names; a
    problem of a whole part (``previous_cycle``) next to its fieldset, under the part's name; one of a list's
    item (``catalogue.1``) next to the list."""
    fields = patient_form_fields()
    known = {f.name for f in fields} | {f.group for f in fields if f.group} | set(inputs)
    by_field: dict[str, list[str]] = {}
    rest: list[str] = []
    for problem in problems:
        path = ".".join(str(part) for part in problem.field)
        placed = [place for name in (path.split(",") if path else ()) if (place := _place(name.strip(), known))]
        for name in dict.fromkeys(placed):
            by_field.setdefault(name, []).append(problem.rule)
        if not placed:
            rest.append(problem.line if path else problem.rule)
    return by_field, rest


def _place(path: str, known: set[str]) -> str | None:
    """The longest known field or part that ``path`` starts with (``catalogue.1`` → ``catalogue``), or None."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None
