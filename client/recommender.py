"""The telemedicine recommender's inputs and outputs: the signed policy, a patient record, a cycle's vitals.

``fednano recommend`` and ``fednano serve`` (:mod:`client.service`) share everything here:

- :func:`load_policy` verifies the policy bundle against the site's trust key and loads it once;
- :func:`read_patient` reads a patient record (``examples/patient.json``) with errors naming the file, the
  line (for broken JSON) or the field (:func:`shared.patient_record.error_lines`);
- :func:`read_vitals` reads the raw daily wearable readings of the patient's last cycle (the columns of
  ``shared.schema.VITALS_COLUMNS``), validated with the site-data checks of :mod:`shared.validation` (file,
  column, rows), and :func:`with_vitals` puts their summary (:func:`shared.wearables.summarise_cycle`) in
  place of the record's ``wearable_summary``;
- :func:`catalogue_problems` names the records whose catalogue the policy knows nothing of, before the
  policy is asked (it would refuse the whole batch);
- :func:`recommend` returns the JSON of :class:`shared.dosing_policy.Recommendation` or, as FHIR, a
  MedicationRequest (:mod:`client.fhir`).

Every user mistake raises :class:`RecommenderInputError` (a ``ValueError``) whose ``lines`` say what is
wrong, one problem per line; nothing here prints.

Example
-------
>>> policy = load_policy(Path("runs/simulate/policy/v1"), Path("runs/simulate/kit/sites/clinic_00/"
...                      "policy_signing.pub"))                                     # doctest: +SKIP
>>> record = with_vitals(read_patient(Path("examples/patient.json")), Path("vitals.csv"))  # doctest: +SKIP
>>> recommend(policy, record)["dose_mg"]                                              # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from shared import strict_json
from shared.patient_record import PatientRecord, WearableSummary, error_lines
from shared.schema import VITALS_COLUMNS
from shared.validation import CsvTable, Problem, check_header, parse_table, read_csv_table
from shared.wearables import summarise_cycle


class RecommenderInputError(ValueError):
    """A patient record, vitals file or policy bundle the recommender cannot use; ``lines``: one per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# ---------------------------------------------------------------------------------------------------------
# The policy


def load_policy(bundle: Path, trust_key: Path):
    """Verify the bundle against the trust key and load the policy; ``RecommenderInputError`` if it does not
    verify or cannot be read (the reason is the verifier's)."""
    from shared.policy_bundle import BundleRejected
    from shared.policy_loader import policy_from_bundle

    for path, what in ((bundle, "policy bundle folder"), (trust_key, "trust key file")):
        if not path.exists():
            raise RecommenderInputError([f"{path}: no such {what}"])
    try:
        return policy_from_bundle(bundle, trust_key)  # the ANN + XGBoost or the structured policy
    except BundleRejected as err:
        raise RecommenderInputError([f"{err} (trust key {trust_key})"]) from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecommenderInputError([f"{bundle}: the policy bundle verified but could not be loaded: "
                                     f"{type(err).__name__}: {err}"]) from err


# ---------------------------------------------------------------------------------------------------------
# The patient record


def read_patient(path: Path) -> PatientRecord:
    """Read and validate one patient record (JSON object); errors name the file and the line or field."""
    data = _json_document(path)
    try:
        return PatientRecord.model_validate(data)
    except ValidationError as err:
        raise RecommenderInputError(error_lines(err, str(path))) from err


def _json_document(path: Path) -> Any:
    """Parse a JSON file strictly: UTF-8, no duplicate keys, no NaN/Infinity."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RecommenderInputError([f"{path}: cannot read the file: {err.strerror or err}"]) from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecommenderInputError([f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02X} at byte offset "
                                     f"{err.start}); save the record as UTF-8 JSON"]) from err
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as err:
        raise RecommenderInputError([f"{path}, line {err.lineno} column {err.colno}: invalid JSON: "
                                     f"{err.msg}"]) from err
    except strict_json.StrictJsonError as err:
        raise RecommenderInputError([f"{path}: {err}"]) from err


# ---------------------------------------------------------------------------------------------------------
# The last cycle's vitals


def read_vitals(path: Path, patient_id: str) -> tuple[pd.DataFrame, list[str]]:
    """The daily readings of one patient's last cycle, validated; returns the typed rows and warnings.

    The file holds the columns of ``shared.schema.VITALS_COLUMNS`` (as a site's ``vitals.csv``) for one
    patient (``patient_id``) and one cycle (one ``episode_id``), at most one row per day.
    """
    label = str(path)
    table, problems = read_csv_table(path, label)
    if table is None:
        raise RecommenderInputError([str(p) for p in problems])
    problems += check_header(table, VITALS_COLUMNS)
    values, found = parse_table(table, VITALS_COLUMNS)
    problems += found
    if not any(p.severity == "error" for p in problems):
        problems += _one_patient_one_cycle(table, values, patient_id)
    errors = [str(p) for p in problems if p.severity == "error"]
    if errors:
        raise RecommenderInputError(errors)
    warnings = [str(p) for p in problems if p.severity == "warning"]
    return values.drop(index=list(table.dropped_rows), errors="ignore"), warnings


def _one_patient_one_cycle(table: CsvTable, values: pd.DataFrame, patient_id: str) -> list[Problem]:
    """The rows must be the record's patient's, of a single cycle, one per day."""
    problems = []
    other = values["patient_id"] != patient_id
    if other.any():
        got = ", ".join(repr(p) for p in dict.fromkeys(values.loc[other, "patient_id"]))
        problems.append(table.problem("patient_id", other, f"expected the patient of the record "
                                                           f"({patient_id!r}), got {got}"))
    episodes = list(dict.fromkeys(values["episode_id"]))
    if len(episodes) > 1:
        first = values["episode_id"] != episodes[0]
        problems.append(table.problem("episode_id", first, f"expected the readings of one cycle (one episode_id); "
                                                           f"found {len(episodes)}: {', '.join(map(repr, episodes))}"
                                                           f" — keep only the last cycle's rows"))
    repeated = values["day"].duplicated(keep=False)
    if repeated.any():
        days = ", ".join(f"{d:g}" for d in dict.fromkeys(values.loc[repeated, "day"]))
        problems.append(table.problem("day", repeated, f"expected one row per day; day(s) {days} repeated"))
    return problems


def vitals_summary(path: Path, patient_id: str) -> tuple[WearableSummary, list[str]]:
    """:func:`shared.wearables.summarise_cycle` of the file's readings, as the record's summary type."""
    readings, warnings = read_vitals(path, patient_id)
    summary = summarise_cycle(readings)
    try:
        return WearableSummary.model_validate(summary), warnings
    except ValidationError as err:
        raise RecommenderInputError(error_lines(err, f"{path} (summary of its readings)")) from err


def with_vitals(record: PatientRecord, path: Path) -> tuple[PatientRecord, list[str]]:
    """The record with its ``wearable_summary`` replaced by the summary of the vitals file; and warnings."""
    summary, warnings = vitals_summary(path, record.patient_id)
    return record.model_copy(update={"wearable_summary": summary}), warnings


# ---------------------------------------------------------------------------------------------------------
# Recommending


def catalogue_problems(policy, records: Sequence[PatientRecord], source: str = "patient record") -> list[str]:
    """One line per record none of whose catalogue formulations the policy knows (it could not choose)."""
    known = set(policy.formulations)
    lines = []
    for i, record in enumerate(records):
        if known.isdisjoint(record.catalogue):
            where = source if len(records) == 1 else f"{source}[{i}]"
            lines.append(f"{where}: field catalogue (got {record.catalogue!r}): none of these formulations is "
                         f"known to the policy; expected at least one of {', '.join(sorted(known))}")
    return lines


def recommend_many(policy, records: Sequence[PatientRecord], source: str = "patient record") -> list:
    """The policy's recommendations for the records (one batched call); bad catalogues raise first."""
    problems = catalogue_problems(policy, records, source)
    if problems:
        raise RecommenderInputError(problems)
    return policy.recommend(list(records))


def recommend(policy, record: PatientRecord, fhir: bool = False, source: str = "patient record") -> dict[str, Any]:
    """One recommendation as JSON: the policy's fields, or with ``fhir`` a FHIR R4 resource
    (:func:`client.fhir.fhir_resource`: a MedicationRequest, or an OperationOutcome when treatment stops)."""
    recommendation = recommend_many(policy, [record], source)[0]
    if fhir:
        from client.fhir import fhir_resource

        return fhir_resource(recommendation)
    return recommendation_json(recommendation)


def recommendation_json(recommendation) -> dict[str, Any]:
    """The JSON form of a recommendation (``Recommendation.to_dict`` with lists for tuples)."""
    return json.loads(json.dumps(recommendation.to_dict()))
