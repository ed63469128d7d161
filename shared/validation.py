"""Validation of a site's data — a folder (episodes.csv, vitals.csv, site.toml) or one task CSV — before use.

Why hand-written rather than pandera or ``pandas.read_csv`` with dtypes: the checks that matter most come
before any dataframe library sees the file. An empty file, an Excel workbook saved as ``.csv``, bytes that
are not UTF-8, a row cut off at the end, a row with an extra field or two columns with the same name are
silently padded, dropped, coerced or renamed by pandas. And every message must name the file, the column,
the data rows (with their line numbers), what was expected and, for the common unit mistakes, a hint
(``Column.hint_below`` / ``hint_above``) — so each cell is read as text and converted here, where we know
which cell failed.

The stages, each a small function:

1. bytes → table of text cells (``read_csv_table``): size, binary sniff, strict UTF-8, ragged rows, header;
2. header → declared columns (``check_header``): missing required columns, unknown extra columns;
3. text cells → values (``parse_column``): dtype, missing where not nullable, range with unit hint;
4. cross-checks: duplicate episode ids, dose vs dose per m² × BSA, BSA vs Mosteller, vitals references.

Validation never modifies a file and never raises on bad data: every finding becomes a ``Problem`` in the
``ValidationReport``. ``load_site`` validates first, then returns typed frames or raises ``SiteDataError``.

Example
-------
>>> report = validate_site("sites/alpha")              # doctest: +SKIP
>>> print(report.format())                             # doctest: +SKIP
>>> site = load_site("sites/alpha")                    # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from shared.schema import (
    EPISODE_COLUMNS,
    EPISODES_FILE,
    SCHEMA_VERSION,
    SITE_FILE,
    VITALS_COLUMNS,
    VITALS_FILE,
    Column,
)
from shared.task import NANOPARTICLE_TASK, SPLITS, TaskSpec

Severity = Literal["error", "warning"]

MISSING_TOKENS = frozenset({"", "NA", "NaN", "nan"})
"""Cell texts (after stripping spaces) that mean "not measured"."""

MAX_LISTED = 5
"""How many row numbers or values a message lists before saying "and N more"."""

DOSE_TOLERANCE = 0.05
"""Allowed relative gap between dose_mg and dose_mg_m2 × bsa_m2 (rounding, not a wrong dose)."""

BSA_TOLERANCE = 0.10
"""Allowed relative gap between bsa_m2 and the Mosteller formula (other BSA formulas differ by a few %)."""

SNIFF_BYTES = 8192
"""How much of a file's start is inspected to tell text from binary."""

MAX_CONTROL_FRACTION = 0.05
"""Share of control bytes (other than tab, newline, carriage return, form feed) that makes a file binary."""

SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION,)

BINARY_SIGNATURES = {
    b"PK\x03\x04": "a ZIP archive or an Excel workbook (.xlsx); export the sheet as CSV (UTF-8)",
    b"\xd0\xcf\x11\xe0": "an old Excel workbook (.xls); export the sheet as CSV (UTF-8)",
    b"\x1f\x8b": "a gzip archive; decompress it first",
    b"%PDF": "a PDF document",
    b"\x89PNG": "a PNG image",
    b"\xff\xfe": "UTF-16 text; save it as CSV (UTF-8)",
    b"\xfe\xff": "UTF-16 text; save it as CSV (UTF-8)",
}

_TEXT_BYTES = bytes([9, 10, 12, 13, *range(32, 127), *range(128, 256)])

SITE_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "site": {"name": "text", "schema_version": "text"},
    "privacy": {"dp": "true or false", "epsilon": "a number", "delta": "a number",
                "adjuster_share": "a number in [0, 1): share of ε the dose adjuster may spend (default 0)"},
}
"""Sections and keys of site.toml, with the kind of value each holds."""


# ---------------------------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Problem:
    """One finding about a site file.

    Parameters
    ----------
    severity : {"error", "warning"}
        Errors stop the site from being used; warnings do not.
    file : str
        File name as given (``"episodes.csv"``, or the CSV's path for a single-file task site).
    column : str or None
        Column the finding is about, if any.
    rows : tuple of int
        1-based data-row numbers (header excluded).
    message : str
        What is wrong and what was expected.
    lines : tuple of int, default ()
        1-based physical line numbers in the file (of ``rows``, or on their own for file-level findings).
    """

    severity: Severity
    file: str
    column: str | None
    rows: tuple[int, ...]
    message: str
    lines: tuple[int, ...] = ()

    def __str__(self) -> str:
        where = [self.file]
        if self.column is not None:
            where.append(f"column {self.column!r}")
        if self.rows:
            text = f"{_plural('row', self.rows)} {_listed(self.rows)}"
            if self.lines:
                text += f" ({_plural('line', self.lines)} {_listed(self.lines, more='…')})"
            where.append(text)
        elif self.lines:
            where.append(f"{_plural('line', self.lines)} {_listed(self.lines)}")
        return ", ".join(where) + ": " + self.message


def _plural(word: str, items: tuple[int, ...]) -> str:
    return word if len(items) == 1 else word + "s"


def _listed(items: tuple[Any, ...] | list[Any], more: str | None = None, sep: str = ", ") -> str:
    """The first ``MAX_LISTED`` items joined by ``sep``, then "and N more" (or ``more``)."""
    shown = sep.join(str(i) for i in items[:MAX_LISTED])
    hidden = len(items) - MAX_LISTED
    if hidden <= 0:
        return shown
    return f"{shown}{sep}{more}" if more else f"{shown} and {hidden} more"


@dataclass
class ValidationReport:
    """Everything found while validating one site, and a summary of what the site holds."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        """Human-readable report: verdict, summary, then every problem on its own line."""
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        verdict = "OK" if self.ok else "NOT USABLE"
        lines = [f"Site data at {self.path}: {verdict} ({counts})"]
        lines += [f"  {key}: {_format_value(value)}" for key, value in self.summary.items()]
        lines += [f"  {p.severity}: {p}" for p in self.errors + self.warnings]
        return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


class SiteDataError(ValueError):
    """A site whose data cannot be used; ``report`` holds every problem found."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.format())
        self.report = report


@dataclass
class SiteData:
    """A validated site: typed tables plus its site.toml settings.

    ``episodes`` holds the task table for a generic task. Numeric columns are float (int for integer and
    0/1 columns that may not be missing) with NaN for missing cells; text and category columns are str.
    """

    name: str
    path: Path
    episodes: pd.DataFrame
    vitals: pd.DataFrame | None
    config: dict[str, Any]
    task: TaskSpec


# ---------------------------------------------------------------------------------------------------------
# Stage 1: bytes → table of text cells


@dataclass
class CsvTable:
    """A CSV file read as text cells; ``cells`` is indexed by 1-based data-row number."""

    file: str
    header: list[str]
    cells: pd.DataFrame
    line_of_row: dict[int, int]
    dropped_rows: tuple[int, ...] = ()
    """Ragged rows, reported and left out of ``cells``."""

    def problem(self, column: str | None, rows: pd.Series, message: str,
                severity: Severity = "error") -> Problem:
        """A finding about the data rows where the boolean mask ``rows`` (indexed like ``cells``) is true."""
        numbers = sorted(int(r) for r in rows[rows].index)
        return Problem(severity, self.file, column, tuple(numbers),
                       message, tuple(self.line_of_row[r] for r in numbers))


def read_csv_table(path: Path, label: str) -> tuple[CsvTable | None, list[Problem]]:
    """Read a CSV file's bytes once and split them into header and text cells.

    Returns no table when the file cannot be read as CSV text at all (empty, binary, not UTF-8, malformed
    quoting, duplicate or missing header, no data rows); ragged rows are reported and left out.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, [Problem("error", label, None, (), f"cannot read the file: {exc.strerror or exc}")]
    problem = _binary_or_empty(data, label)
    if problem is not None:
        return None, [problem]
    text, problem = _decode_utf8(data, label)
    if problem is not None:
        return None, [problem]
    return _split_records(text, label)


def _binary_or_empty(data: bytes, label: str) -> Problem | None:
    """A problem if the bytes are empty or do not look like text."""
    if not data:
        return Problem("error", label, None, (), "the file is empty (0 bytes); expected a header and rows")
    for signature, what in BINARY_SIGNATURES.items():
        if data.startswith(signature):
            return Problem("error", label, None, (), f"not a CSV text file: it looks like {what}")
    nul = data.find(b"\x00")
    if nul >= 0:
        return Problem("error", label, None, (),
                       f"not a CSV text file: it contains NUL bytes (first at byte offset {nul})")
    sample = data[:SNIFF_BYTES]
    control = len(sample.translate(None, _TEXT_BYTES))
    if control > MAX_CONTROL_FRACTION * len(sample):
        return Problem("error", label, None, (),
                       f"not a CSV text file: {control} of its first {len(sample)} bytes are control bytes")
    return None


def _decode_utf8(data: bytes, label: str) -> tuple[str, Problem | None]:
    """Decode strictly as UTF-8 (a leading byte-order mark is allowed and dropped)."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8"), None
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        message = (f"not valid UTF-8 text: byte 0x{data[offset]:02X} at byte offset {offset} — "
                   f"re-save the file as CSV (UTF-8); Latin-1 or Windows-1252 text (é, µ, °) causes this")
        return "", Problem("error", label, None, (), message, (line,))


@dataclass
class _Record:
    row: int
    line: int
    fields: list[str]


def _split_records(text: str, label: str) -> tuple[CsvTable | None, list[Problem]]:
    """Parse CSV text with the csv module: header, data records with their lines, ragged rows."""
    records: list[_Record] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    next_line = 1
    try:
        for fields in reader:
            if not _is_blank(fields):
                records.append(_Record(len(records), next_line, fields))
            next_line = reader.line_num + 1
    except csv.Error as exc:
        message = f"malformed CSV in the row starting on this line: {exc} — is a quote (\") left unclosed?"
        return None, [Problem("error", label, None, (), message, (next_line,))]
    if not records:
        return None, [Problem("error", label, None, (), "the file has no header line; expected a CSV header")]
    header_record, data = records[0], records[1:]
    header = [name.strip() for name in header_record.fields]
    problem = _header_problem(header, label)
    if problem is not None:
        return None, [problem]
    if not data:
        return None, [Problem("error", label, None, (), "the file has a header but no data rows")]
    good = [r for r in data if len(r.fields) == len(header)]
    ragged = [r for r in data if len(r.fields) != len(header)]
    problems = _ragged_problems(ragged, len(header), data[-1].row, label)
    cells = pd.DataFrame([r.fields for r in good], columns=header, index=[r.row for r in good], dtype=str)
    line_of_row = {r.row: r.line for r in data}
    return CsvTable(label, header, cells, line_of_row, tuple(r.row for r in ragged)), problems


def _is_blank(fields: list[str]) -> bool:
    """A line with nothing on it (or only spaces) is skipped; a line of empty fields (",,,") is a row."""
    return len(fields) <= 1 and not "".join(fields).strip()


def _header_problem(header: list[str], label: str) -> Problem | None:
    """A problem if the header cannot name columns: wrong separator or repeated names."""
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        separator = "';'" if ";" in header[0] else "a tab"
        return Problem("error", label, None, (), f"the header has one column; the file seems to use "
                       f"{separator} as separator — save it with ',' as separator", (1,))
    repeated = sorted({name for name in header if header.count(name) > 1})
    if not repeated:
        return None
    where = "; ".join(
        f"{name!r} at positions " + ", ".join(str(i + 1) for i, n in enumerate(header) if n == name)
        for name in repeated
    )
    return Problem("error", label, repeated[0], (), f"duplicate column names in the header: {where}", (1,))


def _ragged_problems(ragged: list[_Record], width: int, last_row: int, label: str) -> list[Problem]:
    """One problem per kind of ragged row: truncated last row, too few fields, too many fields."""
    kinds: dict[str, list[_Record]] = {"truncated": [], "short": [], "long": []}
    for r in ragged:
        if len(r.fields) > width:
            kinds["long"].append(r)
        else:
            kinds["truncated" if r.row == last_row else "short"].append(r)
    messages = {
        "truncated": "the last row has only {got} of the header's {width} fields — the file looks truncated "
                     "(cut off mid-row); re-export it",
        "short": "rows have fewer fields than the header's {width} (got {got}) — a missing separator?",
        "long": "rows have more fields than the header's {width} (got {got}) — a value with an unquoted "
                "comma? Quote it",
    }
    problems = []
    for kind, records in kinds.items():
        if records:
            got = _listed(sorted({len(r.fields) for r in records}))
            problems.append(Problem("error", label, None, tuple(r.row for r in records),
                                    messages[kind].format(got=got, width=width),
                                    tuple(r.line for r in records)))
    return problems


# ---------------------------------------------------------------------------------------------------------
# Stage 2: header → declared columns


def check_header(table: CsvTable, declared: tuple[Column, ...]) -> list[Problem]:
    """Every declared column must be present; undeclared columns are reported as warnings and ignored."""
    names = {c.name for c in declared}
    extra = [h for h in table.header if h not in names]
    problems = []
    for column in declared:
        if column.name not in table.header:
            problems.append(Problem("error", table.file, column.name, (),
                                    f"required column is missing ({column.description}; "
                                    f"{column.expectation()}){_did_you_mean(column.name, extra)}", (1,)))
    for name in extra:
        what = "unknown column" if name else "unnamed column"
        problems.append(Problem("warning", table.file, name, (), f"{what}, ignored", (1,)))
    return problems


def _did_you_mean(name: str, candidates: list[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    if name.lower() in lowered:
        return f" — found {lowered[name.lower()]!r}; column names are case-sensitive"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
    return f" — did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------------------------------------------
# Stage 3: text cells → values


def parse_column(table: CsvTable, column: Column) -> tuple[pd.Series, list[Problem]]:
    """Convert one column's text cells; failed, missing and out-of-range cells become NaN and problems."""
    text = table.cells[column.name].str.strip()
    missing = text.isin(MISSING_TOKENS)
    problems = []
    if not column.nullable and missing.any():
        problems.append(table.problem(column.name, missing,
                                      f"a value is required (the cell is empty or NA); "
                                      f"expected {column.expectation()}"))
    if column.is_numeric:
        values, found = _parse_numbers(table, column, text, missing)
    elif column.dtype == "category":
        values, found = _parse_category(table, column, text, missing)
    else:
        values, found = text.where(~missing), []
    return values, problems + found


def _parse_numbers(table: CsvTable, column: Column, text: pd.Series,
                   missing: pd.Series) -> tuple[pd.Series, list[Problem]]:
    numbers = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
    invalid = ~missing & ~np.isfinite(numbers)
    if column.dtype == "int":
        invalid |= ~missing & (numbers % 1 != 0)
    if column.dtype == "bool":
        invalid |= ~missing & ~numbers.isin([0.0, 1.0])
    problems = []
    if invalid.any():
        problems.append(table.problem(column.name, invalid, f"expected {column.expectation()}, "
                                                            f"got {_sample(text[invalid], quote=True)}"))
    valid = ~missing & ~invalid
    out_of_range = valid & _outside(numbers, column.low, column.high)
    impossible_sign = out_of_range & (numbers < 0) & (column.low is not None and column.low >= 0)
    if impossible_sign.any():
        got = _sample(text[impossible_sign])
        problems.append(table.problem(column.name, impossible_sign, f"expected {column.expectation()}, "
                                                                    f"got {got} — this cannot be negative"))
    for side, hint in ((numbers < (column.low if column.low is not None else -np.inf), column.hint_below),
                       (numbers > (column.high if column.high is not None else np.inf), column.hint_above)):
        suspect = out_of_range & ~impossible_sign & side
        if suspect.any():
            suffix = f" — {hint}" if hint else ""
            problems.append(table.problem(column.name, suspect,
                                          f"expected {column.expectation()}, got {_sample(text[suspect])}{suffix}"))
    return numbers.where(valid & ~out_of_range), problems


def _outside(numbers: pd.Series, low: float | None, high: float | None) -> pd.Series:
    below = numbers < low if low is not None else pd.Series(False, index=numbers.index)
    above = numbers > high if high is not None else pd.Series(False, index=numbers.index)
    return below | above


def _parse_category(table: CsvTable, column: Column, text: pd.Series,
                    missing: pd.Series) -> tuple[pd.Series, list[Problem]]:
    unknown = ~missing & ~text.isin(column.categories)
    problems = []
    if unknown.any():
        lowered = {c.lower() for c in column.categories}
        case_hint = (" — categories are case-sensitive"
                     if text[unknown].str.lower().isin(lowered).any() else "")
        got = _sample(text[unknown], quote=True)
        problems.append(table.problem(column.name, unknown,
                                      f"expected {column.expectation()}, got {got}{case_hint}"))
    return text.where(~missing & ~unknown), problems


def _sample(texts: pd.Series, quote: bool = False) -> str:
    """Distinct cell texts in row order, as listed in a message."""
    distinct = list(dict.fromkeys(texts))
    return _listed([repr(t) if quote else t for t in distinct])


def parse_table(table: CsvTable, declared: tuple[Column, ...]) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse every declared column present in the table; index = data-row numbers."""
    values: dict[str, pd.Series] = {}
    problems: list[Problem] = []
    for column in declared:
        if column.name in table.header:
            values[column.name], found = parse_column(table, column)
            problems += found
    return pd.DataFrame(values, index=table.cells.index), problems


# ---------------------------------------------------------------------------------------------------------
# Stage 4: cross-checks of the nanoparticle contract


def duplicate_episode_ids(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """Episode ids must be unique; name every row of each repeated id."""
    ids = episodes["episode_id"]
    repeated = ids.notna() & ids.duplicated(keep=False)
    if not repeated.any():
        return []
    rows_of = ids[repeated].groupby(ids[repeated], sort=False).groups
    detail = [f"{eid!r} in rows {', '.join(str(r) for r in rows)}" for eid, rows in rows_of.items()]
    return [table.problem("episode_id", repeated, "episode ids must be unique; " + _listed(detail, sep="; "))]


def dose_inconsistent_with_bsa(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """dose_mg must equal dose_mg_m2 × bsa_m2 within ``DOSE_TOLERANCE``."""
    expected = episodes["dose_mg_m2"] * episodes["bsa_m2"]
    given = episodes["dose_mg"]
    off = (given - expected).abs() > DOSE_TOLERANCE * expected
    if not off.any():
        return []
    detail = [f"row {r}: {given[r]:g} mg, expected {expected[r]:.1f} mg "
              f"({episodes.at[r, 'dose_mg_m2']:g} mg/m² × {episodes.at[r, 'bsa_m2']:g} m²)"
              for r in off[off].index]
    return [table.problem("dose_mg", off, f"dose_mg differs from dose_mg_m2 × bsa_m2 by more than "
                                          f"{DOSE_TOLERANCE:.0%}: " + _listed(detail, sep="; "))]


def mosteller_bsa_m2(height_cm: pd.Series, weight_kg: pd.Series) -> pd.Series:
    """Body-surface area by Mosteller, N Engl J Med 1987;317:1098: sqrt(height[cm] · weight[kg] / 3600)."""
    return np.sqrt(height_cm * weight_kg / 3600.0)


def bsa_inconsistent_with_mosteller(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """bsa_m2 should match Mosteller within ``BSA_TOLERANCE`` (a warning: sites may use another formula)."""
    expected = mosteller_bsa_m2(episodes["height_cm"], episodes["weight_kg"])
    given = episodes["bsa_m2"]
    off = (given - expected).abs() > BSA_TOLERANCE * expected
    if not off.any():
        return []
    detail = [f"row {r}: {given[r]:g} m², Mosteller gives {expected[r]:.2f} m²" for r in off[off].index]
    return [table.problem("bsa_m2", off, f"bsa_m2 differs from Mosteller sqrt(height_cm · weight_kg / 3600) "
                                         f"by more than {BSA_TOLERANCE:.0%}: " + _listed(detail, sep="; "),
                          severity="warning")]


def vitals_without_episodes(table: CsvTable, vitals: pd.DataFrame, episodes: pd.DataFrame) -> list[Problem]:
    """Every vitals row must belong to a patient in episodes.csv, and to one of that patient's episodes."""
    patients = set(episodes["patient_id"].dropna())
    owner = episodes.dropna(subset=["episode_id"]).drop_duplicates("episode_id").set_index("episode_id")
    owner_of = owner["patient_id"]
    problems = []
    unknown_patient = vitals["patient_id"].notna() & ~vitals["patient_id"].isin(patients)
    if unknown_patient.any():
        problems.append(table.problem("patient_id", unknown_patient,
                                      f"patient not found in {EPISODES_FILE}: "
                                      f"{_sample(vitals['patient_id'][unknown_patient], quote=True)}"))
    known = vitals["patient_id"].notna() & ~unknown_patient & vitals["episode_id"].notna()
    episode_owner = vitals["episode_id"].map(owner_of)
    wrong_episode = known & (episode_owner != vitals["patient_id"])
    if wrong_episode.any():
        detail = [_episode_mismatch(vitals.at[r, "episode_id"], vitals.at[r, "patient_id"], episode_owner[r])
                  for r in wrong_episode[wrong_episode].index]
        problems.append(table.problem("episode_id", wrong_episode,
                                      f"expected an episode of the row's patient in {EPISODES_FILE}; got "
                                      + _listed(list(dict.fromkeys(detail)), sep="; ")))
    return problems


def _episode_mismatch(episode: str, patient: str, owner: Any) -> str:
    if isinstance(owner, str):
        return f"{episode!r} for patient {patient!r} (it belongs to {owner!r})"
    return f"{episode!r} for patient {patient!r} (no such episode)"


# ---------------------------------------------------------------------------------------------------------
# site.toml


def read_site_config(path: Path) -> tuple[dict[str, Any], list[Problem]]:
    """Parse site.toml; unknown sections and keys are warnings, wrong values errors."""
    try:
        config = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        return {}, [Problem("error", SITE_FILE, None, (), f"cannot read the file: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        return {}, [Problem("error", SITE_FILE, None, (), f"not valid UTF-8 text (byte offset {exc.start})")]
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        lines = (int(match.group(1)),) if match else ()
        return {}, [Problem("error", SITE_FILE, None, (), f"invalid TOML: {exc}", lines)]
    return config, _site_config_problems(config)


def _site_config_problems(config: dict[str, Any]) -> list[Problem]:
    problems = _unknown_or_mistyped_keys(config)
    if any(p.severity == "error" for p in problems):
        return problems  # the value checks below assume well-typed values
    version = _section(config, "site").get("schema_version")
    if version is None:
        problems.append(_config_problem("warning", f"site.schema_version not set; assuming {SCHEMA_VERSION}"))
    elif version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = " or ".join(repr(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        problems.append(_config_problem("error", f"site.schema_version {version!r} is not supported; "
                                                 f"expected {supported}"))
    return problems + _privacy_problems(_section(config, "privacy"))


def _unknown_or_mistyped_keys(config: dict[str, Any]) -> list[Problem]:
    problems = []
    for section, body in config.items():
        if section not in SITE_CONFIG_KEYS:
            problems.append(_config_problem("warning", f"unknown section [{section}], ignored; expected "
                                                       + ", ".join(f"[{s}]" for s in SITE_CONFIG_KEYS)))
            continue
        if not isinstance(body, dict):
            problems.append(_config_problem("error", f"{section}: expected a [{section}] table, "
                                                     f"got {body!r}"))
            continue
        for key, value in body.items():
            kind = SITE_CONFIG_KEYS[section].get(key)
            if kind is None:
                problems.append(_config_problem("warning", f"unknown key {section}.{key}, ignored"))
            elif not _is_kind(value, kind):
                problems.append(_config_problem("error", f"{section}.{key}: expected {kind}, got {value!r}"))
    return problems


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str) and bool(value.strip())
    if kind == "true or false":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _privacy_problems(privacy: dict[str, Any]) -> list[Problem]:
    problems = []
    epsilon, delta = privacy.get("epsilon"), privacy.get("delta")
    if epsilon is not None and epsilon <= 0:
        problems.append(_config_problem("error", f"privacy.epsilon: expected a number > 0, "
                                                 f"got {epsilon!r}"))
    if delta is not None and not 0 < delta < 1:
        problems.append(_config_problem("error", f"privacy.delta: expected a number in (0, 1), "
                                                 f"got {delta!r}"))
    if privacy.get("dp"):
        for key, value in (("epsilon", epsilon), ("delta", delta)):
            if value is None:
                problems.append(_config_problem("error", f"privacy.{key}: required when privacy.dp = true"))
    return problems


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A site.toml section as a dict ({} when absent or not a table)."""
    body = config.get(name, {})
    return body if isinstance(body, dict) else {}


def _config_problem(severity: Severity, message: str) -> Problem:
    return Problem(severity, SITE_FILE, None, (), message)


# ---------------------------------------------------------------------------------------------------------
# Whole sites


@dataclass
class _Inspection:
    """What validating a site produced: the report plus the parsed tables ``load_site`` hands out."""

    report: ValidationReport
    name: str
    config: dict[str, Any]
    task: TaskSpec
    episodes: pd.DataFrame | None = None
    vitals: pd.DataFrame | None = None
    episode_columns: tuple[Column, ...] = ()
    vitals_columns: tuple[Column, ...] = ()


def validate_site(path: str | Path, task: TaskSpec | None = None) -> ValidationReport:
    """Validate a site without changing it; never raises on bad data.

    Parameters
    ----------
    path : str or Path
        Site folder (episodes.csv, optional vitals.csv and site.toml) for the built-in nanoparticle task;
        for a generic task, one CSV file or a folder holding exactly one CSV file (and optionally site.toml).
    task : TaskSpec or None, default None
        None (or ``NANOPARTICLE_TASK``) for the built-in contract of ``shared.schema``.
    """
    return _inspect(Path(path), task).report


def load_site(path: str | Path, task: TaskSpec | None = None) -> SiteData:
    """Validate a site, then return its typed tables; raises ``SiteDataError`` (with the report) on errors."""
    inspection = _inspect(Path(path), task)
    if not inspection.report.ok or inspection.episodes is None:
        raise SiteDataError(inspection.report)
    episodes = _numeric_class_labels(_typed(inspection.episodes, inspection.episode_columns), inspection.task)
    vitals = None if inspection.vitals is None else _typed(inspection.vitals, inspection.vitals_columns)
    return SiteData(inspection.name, Path(path), episodes, vitals, inspection.config, inspection.task)


def _inspect(path: Path, task: TaskSpec | None) -> _Inspection:
    if task is None or task == NANOPARTICLE_TASK:
        return _inspect_nanoparticle_site(path)
    return _inspect_task_site(path, task)


def _site_config(folder: Path) -> tuple[dict[str, Any], list[Problem]]:
    site_file = folder / SITE_FILE
    return read_site_config(site_file) if site_file.is_file() else ({}, [])


def _site_name(config: dict[str, Any], folder: Path) -> str:
    name = _section(config, "site").get("name")
    return name if isinstance(name, str) and name.strip() else folder.resolve().name


def _inspect_nanoparticle_site(folder: Path) -> _Inspection:
    inspection = _Inspection(ValidationReport(folder), folder.name, {}, NANOPARTICLE_TASK)
    problems = inspection.report.problems
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        problems.append(Problem("error", str(folder), None, (),
                                f"the site path {what}; expected a folder holding {EPISODES_FILE}"))
        return inspection
    inspection.config, found = _site_config(folder)
    problems += found
    inspection.name = _site_name(inspection.config, folder)
    episodes_table = _read_declared(folder / EPISODES_FILE, EPISODES_FILE, EPISODE_COLUMNS, problems)
    vitals_table = None
    if (folder / VITALS_FILE).exists():
        vitals_table = _read_declared(folder / VITALS_FILE, VITALS_FILE, VITALS_COLUMNS, problems)
    if episodes_table is not None:
        inspection.episodes, inspection.episode_columns = episodes_table[1], EPISODE_COLUMNS
        problems += _episode_cross_checks(*episodes_table)
    if vitals_table is not None:
        inspection.vitals, inspection.vitals_columns = vitals_table[1], VITALS_COLUMNS
        problems += _vitals_cross_checks(vitals_table, episodes_table)
    inspection.report.summary = _nanoparticle_summary(inspection)
    return inspection


def _read_declared(path: Path, label: str, declared: tuple[Column, ...],
                   problems: list[Problem]) -> tuple[CsvTable, pd.DataFrame] | None:
    """Read and parse one declared file, adding its problems; None if the file is absent or unreadable."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*") if p.suffix.lower() == ".csv")
        found = f"; found {', '.join(others)}" if others else ""
        problems.append(Problem("error", label, None, (),
                                f"the file is missing from {path.parent}{found}"))
        return None
    table, found = read_csv_table(path, label)
    problems += found
    if table is None:
        return None
    problems += check_header(table, declared)
    values, found = parse_table(table, declared)
    problems += found
    return table, values


def _episode_cross_checks(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """Cross-column checks, each run only when its columns are present."""
    checks = (
        (("episode_id",), duplicate_episode_ids),
        (("dose_mg", "dose_mg_m2", "bsa_m2"), dose_inconsistent_with_bsa),
        (("bsa_m2", "height_cm", "weight_kg"), bsa_inconsistent_with_mosteller),
    )
    problems = []
    for needed, check in checks:
        if all(c in episodes for c in needed):
            problems += check(table, episodes)
    return problems


def _vitals_cross_checks(vitals: tuple[CsvTable, pd.DataFrame],
                         episodes: tuple[CsvTable, pd.DataFrame] | None) -> list[Problem]:
    """Vitals references, checked only when both id columns of both files were read completely."""
    ids = ("patient_id", "episode_id")
    if episodes is None or episodes[0].dropped_rows:  # ids on dropped rows are unread, not absent
        return []
    if not all(c in frame for c in ids for frame in (vitals[1], episodes[1])):
        return []
    return vitals_without_episodes(vitals[0], vitals[1], episodes[1])


def _nanoparticle_summary(inspection: _Inspection) -> dict[str, Any]:
    version = _section(inspection.config, "site").get("schema_version", SCHEMA_VERSION)
    summary: dict[str, Any] = {"site": inspection.name, "schema_version": version}
    episodes = inspection.episodes
    if episodes is not None:
        summary["n_episodes"] = len(episodes)
        for key, column in (("n_patients", "patient_id"), ("n_formulations", "formulation_id")):
            if column in episodes:
                summary[key] = int(episodes[column].nunique())
        for outcome in ("response", "toxicity_grade3"):
            if outcome in episodes and episodes[outcome].notna().any():
                summary[f"{outcome}_rate"] = float(episodes[outcome].mean())
        if "efficacy_pct" in episodes and episodes["efficacy_pct"].notna().any():
            summary["efficacy_pct_mean"] = float(episodes["efficacy_pct"].mean())
    if inspection.vitals is not None:
        summary["n_vitals"] = len(inspection.vitals)
    privacy = _section(inspection.config, "privacy")
    if privacy.get("dp"):
        summary["privacy"] = f"DP, epsilon {privacy.get('epsilon')}, delta {privacy.get('delta')}"
    return summary


# ---------------------------------------------------------------------------------------------------------
# Generic tabular task


def task_columns(task: TaskSpec) -> tuple[Column, ...]:
    """The columns a generic task's table must hold, declared like the nanoparticle schema."""
    columns: list[Column] = []
    for outcome in task.outcomes:
        if outcome.kind == "regression":
            columns.append(Column(outcome.name, "float", "-", "regression target",
                                  *task.ranges.get(outcome.name, (None, None))))
        else:
            columns.append(Column(outcome.name, "str", "-", f"{outcome.kind} target"))
    columns += [Column(name, "float", "-", "numeric feature", *task.ranges.get(name, (None, None)),
                       nullable=True) for name in task.numeric]
    columns += [Column(name, "str", "-", "categorical feature", nullable=True) for name in task.categorical]
    if task.split is not None:
        columns.append(Column(task.split, "category", "-", "train / val / test split", categories=SPLITS))
    if task.group is not None:
        columns.append(Column(task.group, "str", "-", "group id (never straddles splits)"))
    first_of_each_name: dict[str, Column] = {}
    for column in columns:
        first_of_each_name.setdefault(column.name, column)
    return tuple(first_of_each_name.values())


def _task_csv(path: Path) -> tuple[Path | None, str, list[Problem]]:
    """The one CSV file of a generic task site, its label for messages, and why none could be chosen."""
    if path.is_file():
        return path, str(path), []
    if not path.exists():
        return None, str(path), [Problem("error", str(path), None, (),
                                         "the site path does not exist; expected a CSV file or a folder "
                                         "holding one")]
    csvs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if len(csvs) == 1:
        return csvs[0], csvs[0].name, []
    found = "none" if not csvs else ", ".join(p.name for p in csvs)
    return None, str(path), [Problem("error", str(path), None, (),
                                     f"expected exactly one .csv file in the folder; found {found}")]


def _inspect_task_site(path: Path, task: TaskSpec) -> _Inspection:
    inspection = _Inspection(ValidationReport(path), path.stem, {}, task)
    problems = inspection.report.problems
    csv_path, label, found = _task_csv(path)
    problems += found
    if path.is_dir():
        inspection.config, found = _site_config(path)
        problems += found
        inspection.name = _site_name(inspection.config, path)
    if csv_path is not None:
        declared = task_columns(task)
        parsed = _read_declared(csv_path, label, declared, problems)
        if parsed is not None:
            table, values = parsed
            problems += _target_problems(table, values, task)
            inspection.episodes, inspection.episode_columns = values, declared
    inspection.report.summary = _task_summary(inspection)
    return inspection


def _target_problems(table: CsvTable, values: pd.DataFrame, task: TaskSpec) -> list[Problem]:
    """A binary target has at most 2 classes; any classifier target needs 2 classes to learn from."""
    problems = []
    for outcome in task.outcomes:
        if outcome.kind == "regression" or outcome.name not in values:
            continue
        counts = values[outcome.name].value_counts(sort=True)
        if outcome.kind == "binary" and len(counts) > 2:
            extra = values[outcome.name].isin(counts.index[2:])
            listing = ", ".join(f"{v!r} ({n} row{'' if n == 1 else 's'})" for v, n in counts.items())
            problems.append(table.problem(outcome.name, extra, f"a binary target holds at most 2 distinct "
                                                               f"values; got {len(counts)}: {listing}"))
        elif len(counts) == 1:
            problems.append(Problem("warning", table.file, outcome.name, (),
                                    f"only one class present ({counts.index[0]!r}); this site alone cannot "
                                    "train a classifier"))
    return problems


def _task_summary(inspection: _Inspection) -> dict[str, Any]:
    task, table = inspection.task, inspection.episodes
    summary: dict[str, Any] = {"site": inspection.name}
    if table is None:
        return summary
    summary["n_rows"] = len(table)
    for outcome in task.outcomes:
        if outcome.name not in table:
            continue
        if outcome.kind == "regression":
            summary[f"{outcome.name}_mean"] = float(table[outcome.name].mean())
        else:
            summary[f"{outcome.name}_counts"] = {str(k): int(v) for k, v in
                                                 table[outcome.name].value_counts().sort_index().items()}
    if task.split is not None and task.split in table:
        summary["split_counts"] = {s: int((table[task.split] == s).sum()) for s in SPLITS}
    return summary


# ---------------------------------------------------------------------------------------------------------
# Typed output


def _typed(values: pd.DataFrame, declared: tuple[Column, ...]) -> pd.DataFrame:
    """Columns in declared order: float with NaN, int where no cell may be missing, str for text."""
    typed = {}
    for column in declared:
        series = values[column.name]
        if column.dtype in ("int", "bool") and not column.nullable:
            typed[column.name] = series.astype("int64")
        elif column.is_numeric:
            typed[column.name] = series.astype(float)
        else:
            typed[column.name] = series.astype(str).where(series.notna())
    return pd.DataFrame(typed).reset_index(drop=True)


def _numeric_class_labels(table: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """A classifier target whose labels are all numbers (0/1, 1/2/3) becomes numeric; text labels stay str."""
    for outcome in task.outcomes:
        if outcome.kind == "regression" or outcome.name not in table or table.empty:
            continue
        if pd.api.types.is_numeric_dtype(table[outcome.name]):  # declared numeric already
            continue
        numbers = pd.to_numeric(table[outcome.name], errors="coerce")
        if numbers.notna().all():
            table[outcome.name] = numbers.astype("int64") if (numbers % 1 == 0).all() else numbers
    return table
