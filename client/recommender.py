"""The telemedicine recommender's inputs and outputs: the signed policy, a patient record, a cycle's vitals.

``fednano recommend`` and ``fednano serve`` (:mod:`client.service`) share everything here:

- :func:`load_policy` verifies the policy bundle against the site's trust key and loads it once;
- :func:`read_patient` reads a patient record (``examples/patient.json``) with errors naming the file, the
  line (for broken JSON) or the field and the rule, never the value; the HTTP service reads its bodies with
  the same strict reader (:func:`json_document`, :func:`validate_record`, :func:`validate_batch`): UTF-8,
  no repeated keys, no NaN, Infinity or overflowing numbers, no ``true`` for 1 or ``"66"`` for 66;
- :func:`read_vitals` reads the raw daily wearable readings of the patient's last cycle (the columns of
  ``shared.schema.VITALS_COLUMNS``), validated with the site-data checks of :mod:`shared.validation` (file,
  column, rows), and :func:`with_vitals` puts their summary (:func:`shared.wearables.summarise_cycle`) in
  place of the record's ``wearable_summary``;
- :func:`catalogue_problems` names the records whose catalogue the policy knows nothing of, before the
  policy is asked (it would refuse the whole batch);
- :func:`recommend` returns the JSON of :class:`shared.dosing_policy.Recommendation` or, as FHIR, a
  MedicationRequest (:mod:`client.fhir`).

Every user mistake raises :class:`RecommenderInputError` (a ``ValueError``) whose ``problems`` say what is
wrong, one :class:`InputProblem` per problem (``lines`` as text); nothing here prints.

Example
-------
>>> policy = load_policy(Path("runs/simulate/policy/v1"), Path("runs/simulate/kit/sites/clinic_00/"
...                      "policy_signing.pub"))                                     # doctest: +SKIP
>>> record = with_vitals(read_patient(Path("examples/patient.json")), Path("vitals.csv"))  # doctest: +SKIP
>>> recommend(policy, record)["dose_mg"]                                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from shared import strict_json
from shared.patient_record import MAX_ERROR_LINES, PatientRecord, WearableSummary, error_lines, field_problems
from shared.schema import VITALS_COLUMNS
from shared.validation import CsvTable, Problem, check_header, parse_table, read_csv_table
from shared.wearables import summarise_cycle

MAX_RECORD_FILE_BYTES = 1 << 20
"""Largest patient-record file read (1 MiB): a record is about 1 kB; anything far larger is not one."""


@dataclass(frozen=True)
class InputProblem:
    """One thing wrong with an input: where (a file, ``body`` or ``body[3]``), the field path, the rule.

    Never the value: the line may leave the process (a terminal, an HTTP client, a log), the value may be a
    patient's data, and the input may be megabytes long."""

    source: str
    field: tuple[str | int, ...] = ()
    rule: str = ""

    @property
    def line(self) -> str:
        if not self.field:
            return f"{self.source}: {self.rule}"
        return f"{self.source}: field {'.'.join(str(part) for part in self.field)}: {self.rule}"


class RecommenderInputError(ValueError):
    """A patient record, vitals file or policy bundle the recommender cannot use; ``problems`` (and ``lines``,
    their text): one per problem."""

    def __init__(self, lines: list[str] | list[InputProblem]) -> None:
        self.problems = [p if isinstance(p, InputProblem) else InputProblem("", (), p) for p in lines]
        self.lines = [p.line if p.source else p.rule for p in self.problems]
        super().__init__("\n".join(self.lines))


# ---------------------------------------------------------------------------------------------------------
# The policy


def load_policy(bundle: Path, trust_key: Path):
    """Verify the bundle against the trust key and load the policy (either kind, ``shared.policy_loader``);
    ``RecommenderInputError`` if the key is not a usable trust key (saying what the file is instead), or the
    bundle does not verify or cannot be read."""
    from shared.policy_bundle import BundleRejected
    from shared.policy_loader import policy_from_bundle

    check_trust_key(trust_key)
    if not bundle.exists():
        raise RecommenderInputError([f"{bundle}: no such policy bundle folder"])
    try:
        return policy_from_bundle(bundle, trust_key)  # the ANN + XGBoost or the structured policy
    except BundleRejected as err:
        raise RecommenderInputError([f"{err} (trust key {trust_key})"]) from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecommenderInputError([f"{bundle}: the policy bundle verified but could not be loaded: "
                                     f"{type(err).__name__}: {err}"]) from err


def check_trust_key(trust_key: Path) -> None:
    """``RecommenderInputError`` unless ``trust_key`` holds an Ed25519 public key (what the file is, if not)."""
    from shared.policy_bundle import load_trust_key

    if not trust_key.exists():
        raise RecommenderInputError([f"{trust_key}: no such trust key file"])
    try:
        load_trust_key(trust_key)
    except ValueError as err:
        raise RecommenderInputError([f"trust key {err}"]) from None
    except OSError as err:
        raise RecommenderInputError([f"trust key {trust_key}: cannot read it: {err.strerror or err}"]) from None


def policy_to_serve(bundle: Path | None, trust_key: Path, site: Path | None = None):
    """The policy the recommender may serve: the site's installed one.

    With ``site`` (a site's data folder), its store (:func:`client.policy_store.site_store_root`) decides: its
    current version is served, and an explicit ``bundle`` is refused unless it is that version (older is a
    rollback, newer is not installed). A policy a store governs comes wrapped with the release gate's verdict
    on the site's own logs (:class:`client.site_gate.GatedPolicy`, ``site_gate``): standard of care is served
    where that verdict is ``worse``. Without ``site``, a store is looked for around ``bundle`` (a bundle
    inside a store's ``versions/``) and in the working directory (``./.fednano/policy``); with none found, the
    verified ``bundle`` is served (a coordinator trying a policy out).
    """
    return _resolved(bundle, trust_key, site)[0]


def followed_policy(bundle: Path | None, trust_key: Path, site: Path | None = None):
    """What a long-running service serves: :func:`policy_to_serve`'s policy, followed in the site's store
    (:class:`InstalledPolicy`) when a store governs it, so a newer install is served once installed."""
    policy, store = _resolved(bundle, trust_key, site)
    return policy if store is None else InstalledPolicy(store, trust_key, policy)


def _resolved(bundle: Path | None, trust_key: Path, site: Path | None):
    """(the policy to serve, the store that governs it or None): see :func:`policy_to_serve`."""
    from client.policy_store import PolicyStore, PolicyStoreError
    from client.site_gate import StandardOfCareUnknown
    from shared.policy_bundle import BundleRejected, verify_bundle

    if bundle is None and site is None:
        raise RecommenderInputError(["give --site SITE_DIR (serve the site's installed policy) or --policy BUNDLE"])
    root = _store_for(site, bundle)
    if root is None:
        return load_policy(bundle, trust_key), None
    check_trust_key(trust_key)
    store = PolicyStore(root, trust_key)
    try:
        if store.current() is None:
            raise RecommenderInputError([f"{root}: no policy installed at this site (its store is empty); the "
                                         "site installs the coordinator's policy at the end of a federated run"])
        if bundle is None:
            bundle = store.installed_path()
        else:
            store.check_serving(bundle, verify_bundle(bundle, trust_key))
        return gated(load_policy(bundle, trust_key), store), store
    except (BundleRejected, PolicyStoreError, StandardOfCareUnknown) as err:
        raise RecommenderInputError([str(err)]) from err


def gated(policy, store):
    """``policy`` (the store's current version, loaded) with the verdict the site stored with it
    (:class:`client.site_gate.GatedPolicy`: standard of care when the verdict is ``worse``). Raises
    ``PolicyStoreError`` for a damaged verdict file, ``StandardOfCareUnknown`` if standard of care cannot be
    named."""
    from client.site_gate import GatedPolicy

    gate = store.site_gate()
    if gate is not None and gate.version != policy.version:
        gate = None  # the store moved on meanwhile: the next look at it loads the newer version
    return GatedPolicy(policy, gate)


class PolicyUnavailable(RuntimeError):
    """The site's store no longer holds a policy the service may serve (it answers 503 until it does)."""


class InstalledPolicy:
    """The policy a site's store holds, followed while a service runs.

    Each :meth:`current` looks at the store's ``current`` file and the served version's verdict file (two
    ``stat``). When either
    changed — the site installed a newer version, or someone deleted or edited them — the store's current
    bundle is verified again and loaded, with the verdict stored with it (:func:`gated`), before anything more
    is served; if the store cannot vouch for one (``current`` deleted or
    pointing at an older version, a damaged bundle, another federation's key), :class:`PolicyUnavailable` is
    raised until it can: the service fails closed rather than serve an older policy than the site installed.
    """

    def __init__(self, store, trust_key: Path, policy) -> None:
        self.store, self.trust_key = store, trust_key
        self._verdict = store.verdict_path()
        self._policy, self._seen = policy, self._signature()
        self._lock = threading.Lock()

    def current(self):
        """The policy to serve now."""
        if self._signature() != self._seen:
            with self._lock:
                seen = self._signature()
                if seen != self._seen:
                    self._policy = self._reload()
                    self._seen = seen
        return self._policy

    def _reload(self):
        from client.policy_store import PolicyStoreError
        from client.site_gate import StandardOfCareUnknown

        try:
            if self.store.current() is None:
                raise PolicyUnavailable(f"{self.store.root}: no policy installed any more")
            self._verdict = self.store.verdict_path()  # the new version's (one more reload follows: harmless)
            return gated(load_policy(self.store.installed_path(), self.trust_key), self.store)
        except (PolicyStoreError, RecommenderInputError, StandardOfCareUnknown) as err:
            raise PolicyUnavailable(str(err)) from None

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        """The identity (inode, mtime, size; None where missing) of ``current`` and of the verdict file of the
        version served."""
        from client.policy_store import CURRENT_FILE

        def identity(path: Path | None) -> tuple[int, int, int] | None:
            try:
                stat = path.stat()
            except (OSError, AttributeError):
                return None
            return stat.st_ino, stat.st_mtime_ns, stat.st_size

        return identity(self.store.root / CURRENT_FILE), identity(self._verdict)


def _store_for(site: Path | None, bundle: Path | None) -> Path | None:
    """The policy store that governs what may be served, if any (see :func:`policy_to_serve`)."""
    from client.policy_store import CURRENT_FILE, STORE_FOLDER, VERSIONS_FOLDER, site_store_root

    if site is not None:
        if not site.is_dir():
            raise RecommenderInputError([f"{site}: no such site folder"])
        return site_store_root(site)
    for folder in Path(bundle).resolve().parents:
        if folder.name == VERSIONS_FOLDER and (folder.parent / CURRENT_FILE).exists():
            return folder.parent
    here = Path.cwd() / STORE_FOLDER
    return here if (here / CURRENT_FILE).exists() or (here / VERSIONS_FOLDER).is_dir() else None


# ---------------------------------------------------------------------------------------------------------
# The patient record


def read_patient(path: Path) -> PatientRecord:
    """Read and validate one patient record (JSON object); errors name the file and the line or field."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD_FILE_BYTES + 1)
    except OSError as err:
        raise RecommenderInputError([f"{path}: cannot read the file: {err.strerror or err}"]) from err
    if len(raw) > MAX_RECORD_FILE_BYTES:
        raise RecommenderInputError([f"{path}: larger than {MAX_RECORD_FILE_BYTES // 1024} kB; a patient record "
                                     "is about 1 kB"])
    try:
        data = json_document(raw)
    except UnicodeDecodeError as err:
        raise RecommenderInputError([f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02X} at byte offset "
                                     f"{err.start}); save the record as UTF-8 JSON"]) from err
    except json.JSONDecodeError as err:
        raise RecommenderInputError([f"{path}, line {err.lineno} column {err.colno}: invalid JSON: "
                                     f"{err.msg}"]) from err
    except strict_json.StrictJsonError as err:
        raise RecommenderInputError([f"{path}: {err}"]) from err
    return validate_record(data, str(path))


def json_document(raw: bytes) -> Any:
    """Parse JSON bytes strictly (:func:`shared.strict_json.loads` of UTF-8, a byte-order mark allowed): the one
    reader of patient records, from a file or an HTTP body.

    Raises ``UnicodeDecodeError``, ``json.JSONDecodeError`` or ``strict_json.StrictJsonError``."""
    return strict_json.loads(raw.decode("utf-8-sig"))


def validate_record(data: Any, source: str = "patient record", index: int | None = None) -> PatientRecord:
    """A :class:`PatientRecord` from parsed JSON (strict types), or :class:`RecommenderInputError` naming
    every field and rule broken (``source[index]`` for a record of a list)."""
    try:
        return PatientRecord.model_validate(data)
    except ValidationError as err:
        where = source if index is None else f"{source}[{index}]"
        raise RecommenderInputError(bounded_problems([InputProblem(where, loc, rule)
                                                      for loc, rule in field_problems(err)])) from err


def validate_batch(data: Any, max_records: int, source: str = "body") -> list[PatientRecord]:
    """Records from a parsed JSON list of 1 to ``max_records`` records; the length is checked before any record
    is, and the problems of all records are reported together (at most ``MAX_ERROR_LINES``)."""
    if not isinstance(data, list):
        raise RecommenderInputError([InputProblem(source, (), "expected a JSON list of patient records")])
    if not 1 <= len(data) <= max_records:
        raise RecommenderInputError([InputProblem(source, (), f"expected a list of 1 to {max_records} records, "
                                                              f"got {len(data)}")])
    records, found = [], []
    for i, item in enumerate(data):
        try:
            records.append(validate_record(item, source, i))
        except RecommenderInputError as err:
            found += err.problems
    if found:
        raise RecommenderInputError(bounded_problems(found))
    return records


def bounded_problems(found: list[InputProblem]) -> list[InputProblem]:
    """At most ``MAX_ERROR_LINES`` problems, and one counting the rest (50,000 unknown keys make 21 lines)."""
    if len(found) <= MAX_ERROR_LINES:
        return found
    return found[:MAX_ERROR_LINES] + [InputProblem(found[0].source, (), f"... and {len(found) - MAX_ERROR_LINES} "
                                                                        "more problems")]


# ---------------------------------------------------------------------------------------------------------
# The last cycle's vitals


def read_vitals(path: Path, patient_id: str, label: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The daily readings of one patient's last cycle, validated; returns the typed rows and warnings.

    The file holds the columns of ``shared.schema.VITALS_COLUMNS`` (as a site's ``vitals.csv``) for one
    patient (``patient_id``) and one cycle (one ``episode_id``), at most one row per day. Problems name the
    file as ``label`` (default: its path; the clinician's page names an upload, not its temporary copy).
    """
    label = str(path) if label is None else label
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
    problems = []  # rows and rules, never the ids themselves (they identify patients)
    other = values["patient_id"] != patient_id
    if other.any():
        problems.append(table.problem("patient_id", other, "expected the patient of the record (its patient_id); "
                                                           "these rows are another patient's"))
    episodes = list(dict.fromkeys(values["episode_id"]))
    if len(episodes) > 1:
        first = values["episode_id"] != episodes[0]
        problems.append(table.problem("episode_id", first, f"expected the readings of one cycle (one episode_id); "
                                                           f"found {len(episodes)} — keep only the last cycle's "
                                                           "rows"))
    repeated = values["day"].duplicated(keep=False)
    if repeated.any():
        days = ", ".join(f"{d:g}" for d in dict.fromkeys(values.loc[repeated, "day"]))
        problems.append(table.problem("day", repeated, f"expected one row per day; day(s) {days} repeated"))
    return problems


def vitals_summary(path: Path, patient_id: str, label: str | None = None) -> tuple[WearableSummary, list[str]]:
    """:func:`shared.wearables.summarise_cycle` of the file's readings, as the record's summary type."""
    readings, warnings = read_vitals(path, patient_id, label)
    summary = summarise_cycle(readings)
    try:
        return WearableSummary.model_validate(summary), warnings
    except ValidationError as err:
        raise RecommenderInputError(error_lines(err, f"{label or path} (summary of its readings)")) from err


def with_vitals(record: PatientRecord, path: Path, label: str | None = None) -> tuple[PatientRecord, list[str]]:
    """The record with its ``wearable_summary`` replaced by the summary of the vitals file; and warnings
    (``label``: the file's name in them, default its path)."""
    summary, warnings = vitals_summary(path, record.patient_id, label)
    return record.model_copy(update={"wearable_summary": summary}), warnings


# ---------------------------------------------------------------------------------------------------------
# Recommending


def catalogue_problems(policy, records: Sequence[PatientRecord], source: str = "patient record") -> list[InputProblem]:
    """One problem per record none of whose catalogue formulations the policy knows (it could not choose)."""
    known = set(policy.formulations)
    found = []
    for i, record in enumerate(records):
        if known.isdisjoint(record.catalogue):
            where = source if len(records) == 1 else f"{source}[{i}]"
            found.append(InputProblem(where, ("catalogue",), f"none of its {len(record.catalogue)} formulation(s) "
                                                             f"is known to the policy; expected at least one of "
                                                             f"{', '.join(sorted(known))}"))
    return bounded_problems(found)


def recommend_many(policy, records: Sequence[PatientRecord], source: str = "patient record") -> list:
    """The policy's recommendations for the records (one batched call); bad catalogues raise first, and so do
    records a site serving standard of care cannot name it for (:class:`client.site_gate.StandardOfCareRefused`)."""
    from client.site_gate import StandardOfCareRefused

    problems = catalogue_problems(policy, records, source)
    if problems:
        raise RecommenderInputError(problems)
    try:
        return policy.recommend(list(records))
    except StandardOfCareRefused as err:
        raise RecommenderInputError(bounded_problems([
            InputProblem(source if len(records) == 1 else f"{source}[{i}]", ("catalogue",), why)
            for i, why in err.problems])) from None


def recommend(policy, record: PatientRecord, fhir: bool = False, source: str = "patient record",
              log=None) -> dict[str, Any]:
    """One recommendation as JSON: the policy's fields, or with ``fhir`` a FHIR R4 resource
    (:func:`client.fhir.fhir_resource`: a MedicationRequest, or an OperationOutcome when treatment stops);
    ``log``: the site's :class:`client.decision_log.DecisionLog`, which records it."""
    recommendation = recommend_many(policy, [record], source)[0]
    if log is not None:
        log.record([record], [recommendation])
    if fhir:
        from client.fhir import fhir_resource

        return fhir_resource(recommendation)
    return recommendation_json(recommendation)


def recommendation_json(recommendation) -> dict[str, Any]:
    """The JSON form of a recommendation (``Recommendation.to_dict`` with lists for tuples)."""
    return json.loads(json.dumps(recommendation.to_dict()))
