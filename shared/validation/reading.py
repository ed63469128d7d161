"""Reading a CSV file safely: bytes → header and text cells, refusing what is not CSV text (stage 1)."""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from shared.validation.problems import Problem, Severity, listed

SNIFF_BYTES = 8192
"""How much of a file's start is inspected to tell text from binary."""

MAX_CONTROL_FRACTION = 0.05
"""Share of control bytes (other than tab, newline, carriage return, form feed) that makes a file binary."""


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
            got = listed(sorted({len(r.fields) for r in records}))
            problems.append(Problem("error", label, None, tuple(r.row for r in records),
                                    messages[kind].format(got=got, width=width),
                                    tuple(r.line for r in records)))
    return problems
