"""Reading a CSV file safely: bytes → header and text cells, refusing what is not CSV text (stage 1).

The file is streamed, never held whole: one pass over its bytes (binary sniff, strict UTF-8), one pass over
its records (header, ragged rows, the line each row starts on), then ``CsvTable.chunks`` hands the text
cells out ``CHUNK_ROWS`` rows at a time. Time is linear in the file's size and memory is one chunk plus
one line number per row. Absurd shapes stop the reading early, each at a named limit: ``MAX_FILE_BYTES``,
``MAX_LINE_BYTES``, ``MAX_COLUMNS``, ``MAX_ROWS``.
"""

from __future__ import annotations

import codecs
import csv
import os
import stat
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from shared.validation.problems import Problem, Severity, echo, listed, public_problem

SNIFF_BYTES = 8192
"""How much of a file's start is inspected to tell text from binary."""

MAX_CONTROL_FRACTION = 0.05
"""Share of control bytes (other than tab, newline, carriage return, form feed) that makes a file binary."""

MAX_FILE_BYTES = 1 << 30
"""Largest site file read (1 GiB). A large hospital's 10^5 treatment cycles are ~20 MB of episodes.csv and,
at ~25 daily readings per cycle, ~150 MB of vitals.csv; 1 GiB leaves several times that while keeping the
typed tables (2-4 × the file) within a client container's memory."""

MAX_ROWS = 10_000_000
"""Most data rows read from one file: 4 × the ~2.5 million daily readings of the largest site we expect,
and the bound that stops a file of tiny rows (``"1\\n"`` repeated) long before ``MAX_FILE_BYTES`` does."""

MAX_COLUMNS = 512
"""Most columns a header may have. The nanoparticle contract has 33; a generic task spec declares a few
dozen features. A wider header is not a site table (a transposed export, a matrix, a file on one line), and
checking its names against the declared ones is wasted work."""

MAX_LINE_BYTES = 1 << 20
"""Longest physical line read (1 MiB): ``MAX_COLUMNS`` cells of 2,000 bytes each. Checked on the bytes,
before the csv module splits a line into fields, so a line of 10^8 separators never becomes 10^8 strings."""

CHUNK_ROWS = 32_768
"""Data rows converted at a time: a few MB of text, enough to amortise pandas' per-call overhead."""

READ_BLOCK_BYTES = 1 << 20
"""Bytes read at a time while checking that a file is UTF-8 text."""

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
    """A CSV file's header and where each data row is; the text cells are read by ``chunks``.

    Data rows are numbered from 1 (header excluded, blank lines skipped); ``row_lines[r - 1]`` is the
    physical line data row ``r`` starts on.
    """

    file: str
    header: list[str]
    path: Path
    row_lines: np.ndarray
    dropped_rows: tuple[int, ...] = ()
    """Ragged rows, reported and left out of ``chunks``."""
    stamp: tuple[int, int] = (0, 0)
    """Size and modification time when the file was read, to notice a file that changes underneath."""

    @property
    def n_rows(self) -> int:
        """Data rows in the file, ragged ones included."""
        return len(self.row_lines)

    def problem(self, column: str | None, rows: pd.Series, message: str, severity: Severity = "error",
                shareable: str | None = None) -> Problem:
        """A finding about the data rows where the boolean mask ``rows`` (indexed by row number) is true.

        ``message`` is the full text; ``shareable`` the same without values or identifiers (see ``Problem``).
        """
        return self.problem_at(column, rows.index[rows.to_numpy(dtype=bool)], message, severity, shareable)

    def problem_at(self, column: str | None, rows: Sequence[int] | np.ndarray, message: str,
                   severity: Severity = "error", shareable: str | None = None) -> Problem:
        """A finding about the given data rows (1-based row numbers, any order)."""
        numbers = np.unique(np.asarray(rows, dtype=np.int64))
        return Problem(severity, self.file, column, tuple(numbers.tolist()), message,
                       tuple(self.row_lines[numbers - 1].tolist()), shareable_message=shareable)

    def changed(self) -> bool:
        """Whether the file's size or modification time differ from when it was read."""
        return _stamp(self.path) != self.stamp

    def chunks(self, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        """Text cells of ``columns`` for the rows that have as many fields as the header.

        Yields frames of at most ``CHUNK_ROWS`` rows, indexed by data-row number, cells as read (not stripped).
        """
        position = {name: i for i, name in enumerate(self.header)}
        picks = [position[name] for name in columns]
        every_column = picks == list(range(len(self.header)))
        width, n_rows, rows, cells, row = len(self.header), self.n_rows, [], [], 0
        records = _records(self.path)
        next(records, None)  # the header
        for _, fields in records:
            row += 1
            if row > n_rows:
                break  # the file grew since it was read; ``changed`` reports it
            if len(fields) != width:
                continue
            rows.append(row)
            cells.append(fields if every_column else [fields[i] for i in picks])
            if len(rows) == CHUNK_ROWS:
                yield pd.DataFrame(cells, columns=list(columns), index=rows, dtype=object)
                rows, cells = [], []
        if rows:
            yield pd.DataFrame(cells, columns=list(columns), index=rows, dtype=object)


def read_csv_table(path: Path, label: str) -> tuple[CsvTable | None, list[Problem]]:
    """Check a CSV file's bytes and records, streaming; return its header and row positions.

    Returns no table when the file cannot be read as CSV text at all (not a regular file, larger than
    ``MAX_FILE_BYTES``, empty, binary, not UTF-8, malformed quoting, a line longer than ``MAX_LINE_BYTES``,
    a header that is duplicated, missing or wider than ``MAX_COLUMNS``, no data rows or more than
    ``MAX_ROWS``); ragged rows are reported and left out.
    """
    try:
        problem = _not_a_readable_file(path, label) or _binary_or_not_utf8(path, label)
        if problem is not None:
            return None, [problem]
        return _scan_records(path, label)
    except OSError as exc:
        return None, [unreadable_problem(label, exc)]


def unreadable_problem(label: str, exc: OSError) -> Problem:
    """The file could not be opened or read: the OS's reason (the full text also names the path)."""
    reason = f" ({exc.strerror})" if exc.strerror else ""
    return Problem("error", label, None, (), f"cannot read the file: {exc.strerror or exc}",
                   shareable_message=f"cannot read the file{reason}")


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _not_a_readable_file(path: Path, label: str) -> Problem | None:
    """A problem if the path is not a regular file (a FIFO would block), is empty or is too large."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        return public_problem("error", label, "not a regular file; expected a CSV text file")
    if status.st_size == 0:
        return public_problem("error", label, "the file is empty (0 bytes); expected a header and rows")
    if status.st_size > MAX_FILE_BYTES:
        return public_problem("error", label,
                              f"the file is {status.st_size:,} bytes; at most {MAX_FILE_BYTES:,} bytes are read "
                       f"— a site file this large is not a site table")
    return None


def _binary_or_not_utf8(path: Path, label: str) -> Problem | None:
    """A problem if the bytes do not look like text or are not UTF-8, from one streamed pass.

    The checks keep their order of precedence: a known binary signature, then NUL bytes anywhere, then
    control bytes in the first ``SNIFF_BYTES``, then the first byte that is not UTF-8.
    """
    with path.open("rb") as stream:
        first = stream.read(READ_BLOCK_BYTES)
        for signature, what in BINARY_SIGNATURES.items():
            if first.startswith(signature):
                return public_problem("error", label, f"not a CSV text file: it looks like {what}")
        nul, utf8, long_line = _scan_bytes(first, stream)
    if nul is not None:
        return public_problem("error", label,
                              f"not a CSV text file: it contains NUL bytes (first at byte offset {nul})")
    sample = first[:SNIFF_BYTES]
    control = len(sample.translate(None, _TEXT_BYTES))
    if control > MAX_CONTROL_FRACTION * len(sample):
        return public_problem("error", label,
                              f"not a CSV text file: {control} of its first {len(sample)} bytes are control bytes")
    if utf8 is not None:
        offset, byte, line = utf8
        advice = "re-save the file as CSV (UTF-8); Latin-1 or Windows-1252 text (é, µ, °) causes this"
        return Problem("error", label, None, (), f"not valid UTF-8 text: byte 0x{byte:02X} at byte offset "
                       f"{offset} — {advice}", (line,),
                       shareable_message=f"not valid UTF-8 text at byte offset {offset} — {advice}")
    if long_line is not None:
        return _long_line_problem(long_line, label)
    return None


def _scan_bytes(first: bytes, stream: BinaryIO) -> tuple[int | None, tuple[int, int, int] | None, int | None]:
    """One pass over the bytes, block by block: where the file stops being plain CSV text.

    Returns the offset of the first NUL byte (and stops there); else (offset, byte, line) of the first byte
    that is not UTF-8, or None; and the line number of the first line longer than ``MAX_LINE_BYTES``, or
    None. A leading byte-order mark is valid UTF-8. A character cut by a block boundary is carried into the
    next block (``final=False``); one left unfinished at the end of the file is an error. Lines are numbered
    by ``\n`` as elsewhere; ``\r`` also ends a line for the length check.
    """
    utf8 = long_line = None
    lines = _LineLengths()
    block, offset, newlines, carry = first, 0, 0, b""
    while block:
        if (at := block.find(b"\x00")) >= 0:
            return offset + at, None, None
        if utf8 is None:
            buffer = carry + block
            try:
                carry = buffer[codecs.utf_8_decode(buffer, "strict", False)[1]:]
            except UnicodeDecodeError as exc:
                utf8 = (offset - len(carry) + exc.start, buffer[exc.start],
                        newlines + buffer.count(b"\n", 0, exc.start) + 1)
        if long_line is None:
            long_line = lines.first_too_long(block, newlines)
        newlines += block.count(b"\n")
        offset += len(block)
        block = stream.read(READ_BLOCK_BYTES)
    if utf8 is None and carry:
        utf8 = (offset - len(carry), carry[0], newlines + 1)
    return None, utf8, long_line


class _LineLengths:
    """Measures line lengths across blocks, with numpy: the line still open at a block's end carries over."""

    def __init__(self) -> None:
        self.open_length = 0
        self.open_line = 1

    def first_too_long(self, block: bytes, newlines_before: int) -> int | None:
        """The line number of the first line of ``block`` (or carried into it) longer than the limit."""
        data = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero((data == 10) | (data == 13))
        if ends.size == 0:
            self.open_length += len(block)
            return self.open_line if self.open_length > MAX_LINE_BYTES else None
        if self.open_length + ends[0] > MAX_LINE_BYTES:
            return self.open_line
        long = np.flatnonzero(np.diff(ends) - 1 > MAX_LINE_BYTES)
        if long.size:
            return newlines_before + block.count(b"\n", 0, int(ends[long[0]]) + 1) + 1
        self.open_length = len(block) - int(ends[-1]) - 1
        self.open_line = newlines_before + block.count(b"\n") + 1
        return self.open_line if self.open_length > MAX_LINE_BYTES else None


class _MalformedRecord(Exception):
    def __init__(self, line: int, reason: csv.Error) -> None:
        self.line, self.reason = line, reason


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """The file's non-blank CSV records with the line each starts on; the first one is the header.

    Raises ``_MalformedRecord`` with the line the bad record starts on. The file must have passed
    ``_binary_or_not_utf8`` (text, UTF-8, no line longer than ``MAX_LINE_BYTES``). Lines end at ``\n``,
    ``\r\n`` or ``\r``, as the csv module expects of a file opened with ``newline=""``.
    """
    with path.open("r", encoding="utf-8-sig", newline="") as stream:
        reader = csv.reader(stream, strict=True)
        next_line = 1
        try:
            for fields in reader:
                if len(fields) > 1 or (fields and fields[0].strip()):  # a blank line is skipped; ",,," is a row
                    yield next_line, fields
                next_line = reader.line_num + 1
        except csv.Error as exc:
            raise _MalformedRecord(next_line, exc) from exc


def _scan_records(path: Path, label: str) -> tuple[CsvTable | None, list[Problem]]:
    """One pass over the records: the header, each data row's line, ragged rows; stops at a limit."""
    stamp = _stamp(path)
    header: list[str] | None = None
    lines, ragged_rows, ragged_widths = array("q"), array("q"), array("q")
    try:
        for line, fields in _records(path):
            if header is None:
                header = [name.strip() for name in fields]
                problem = _header_problem(header, label)
                if problem is not None:
                    return None, [problem]
                continue
            lines.append(line)
            if len(fields) != len(header):
                ragged_rows.append(len(lines))
                ragged_widths.append(len(fields))
            if len(lines) > MAX_ROWS:
                return None, [public_problem("error", label, f"the file has more than {MAX_ROWS:,} data rows; "
                                             f"at most {MAX_ROWS:,} are read — split the export", (line,))]
    except _MalformedRecord as exc:
        hint = "is a quote (\") left unclosed?"
        return None, [Problem("error", label, None, (), f"malformed CSV in the row starting on this line: "
                              f"{exc.reason} — {hint}", (exc.line,),
                              shareable_message=f"malformed CSV in the row starting on this line — {hint}")]
    if header is None:
        return None, [public_problem("error", label, "the file has no header line; expected a CSV header")]
    if not lines:
        return None, [public_problem("error", label, "the file has a header but no data rows")]
    row_lines = np.frombuffer(lines, dtype=np.int64)
    problems = _ragged_problems(np.frombuffer(ragged_rows, dtype=np.int64),
                                np.frombuffer(ragged_widths, dtype=np.int64), row_lines, len(header), label)
    return CsvTable(label, header, path, row_lines, tuple(ragged_rows.tolist()), stamp), problems


def _long_line_problem(line: int, label: str) -> Problem:
    if line == 1:
        message = (f"the header line is longer than {MAX_LINE_BYTES:,} bytes; a site table has at most "
                   f"{MAX_COLUMNS} columns")
    else:
        message = (f"a line longer than {MAX_LINE_BYTES:,} bytes; a row of at most {MAX_COLUMNS} columns is "
                   f"far shorter — is this a CSV export?")
    return public_problem("error", label, message, (line,))


def _header_problem(header: list[str], label: str) -> Problem | None:
    """A problem if the header cannot name columns: too many, wrong separator or repeated names."""
    if len(header) > MAX_COLUMNS:
        return public_problem("error", label, f"the header has {len(header):,} columns; at most {MAX_COLUMNS} "
                              f"are read — this is not a site table (a transposed export?)", (1,))
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        separator = "';'" if ";" in header[0] else "a tab"
        return public_problem("error", label, f"the header has one column; the file seems to use {separator} "
                              f"as separator — save it with ',' as separator", (1,))
    counts = Counter(header)
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if not repeated:
        return None
    positions: dict[str, list[int]] = {name: [] for name in repeated}
    for i, name in enumerate(header):
        if name in positions:
            positions[name].append(i + 1)
    where = [(f"{echo(name)!r} at positions ", ", ".join(map(str, at))) for name, at in positions.items()]
    return Problem("error", label, repeated[0], (), "duplicate column names in the header: "
                   + listed([name + at for name, at in where], sep="; "), (1,),
                   shareable_message="duplicate column names in the header: the same name at positions "
                   + listed([at for _, at in where], sep="; the same name at positions "),
                   column_in_contract=False)


def _ragged_problems(rows: np.ndarray, widths: np.ndarray, row_lines: np.ndarray, width: int,
                     label: str) -> list[Problem]:
    """One problem per kind of ragged row: truncated last row, too few fields, too many fields."""
    last_row = len(row_lines)
    kinds = {
        "truncated": (widths < width) & (rows == last_row),
        "short": (widths < width) & (rows != last_row),
        "long": widths > width,
    }
    messages = {
        "truncated": "the last row has only {got} of the header's {width} fields — the file looks truncated "
                     "(cut off mid-row); re-export it",
        "short": "rows have fewer fields than the header's {width} (got {got}) — a missing separator?",
        "long": "rows have more fields than the header's {width} (got {got}) — a value with an unquoted "
                "comma? Quote it",
    }
    problems = []
    for kind, mask in kinds.items():
        if mask.any():
            got = listed(np.unique(widths[mask]).tolist())
            message = messages[kind].format(got=got, width=width)
            problems.append(Problem("error", label, None, tuple(rows[mask].tolist()), message,
                                    tuple(row_lines[rows[mask] - 1].tolist()), shareable_message=message))
    return problems
