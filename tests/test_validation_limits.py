"""Validation against absurd inputs: it streams, stops early at named limits and collapses repeated findings.

Each limit is tested by lowering it (``monkeypatch``) on a small site rather than by writing gigabytes; the
wide headers are generated at test time. ``test_large_episodes_file_stays_within_a_small_multiple_of_its_size``
is the one big file (marked slow).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import shared.validation.reading as reading
from shared.schema import EPISODE_COLUMNS
from shared.validation import (
    MAX_COLUMNS,
    MAX_LISTED,
    load_site,
    parse_table,
    read_csv_table,
    validate_site,
)
from tests.sitefactory import read_rows, set_cell, write_rows, write_site

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path)


def episodes(site: Path) -> Path:
    return site / "episodes.csv"


def widen(path: Path, n_columns: int) -> None:
    """Add undeclared columns (empty cells) until the header has ``n_columns`` columns."""
    rows = read_rows(path)
    extra = n_columns - len(rows[0])
    with path.open("w", encoding="utf-8") as f:
        f.write(",".join(rows[0] + [f"x{i}" for i in range(extra)]) + "\n")
        for row in rows[1:]:
            f.write(",".join(row) + "," * extra + "\n")


def test_header_wider_than_max_columns_is_refused_naming_the_count_and_the_limit(site):
    widen(episodes(site), MAX_COLUMNS + 1)
    [error] = validate_site(site).errors
    assert error.file == "episodes.csv" and error.lines == (1,)
    assert f"the header has {MAX_COLUMNS + 1:,} columns; at most {MAX_COLUMNS} are read" in error.message


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_million_column_header_is_refused_before_any_row_is_read(site):
    widen(episodes(site), 1_000_000)
    report = validate_site(site)
    [error] = report.errors
    assert error.lines == (1,) and "the header line is longer than" in error.message
    assert report.warnings == [] and len(report.format()) < 2000


def test_hundreds_of_unknown_columns_give_one_warning_with_their_count(site):
    widen(episodes(site), len(EPISODE_COLUMNS) + 300)
    report = validate_site(site)
    assert report.ok
    [warning] = report.warnings
    assert warning.column is None and warning.lines == (1,)
    assert warning.message.startswith("300 unknown columns, ignored: 'x0', 'x1', 'x2', 'x3', 'x4' and 295 more")
    assert list(load_site(site).episodes.columns) == [c.name for c in EPISODE_COLUMNS]


@pytest.mark.parametrize("block", [7, 100, 1 << 20])
@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_line_longer_than_the_limit_is_refused_naming_its_line(site, monkeypatch, block, line_end):
    monkeypatch.setattr(reading, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(reading, "READ_BLOCK_BYTES", block)
    set_cell(episodes(site), 4, "tumour_type", "x" * 1200)  # data row 4 is on line 5
    episodes(site).write_bytes(episodes(site).read_bytes().replace(b"\n", line_end.encode()))
    [error] = validate_site(site).errors
    assert error.lines == (5,) and "a line longer than 1,000 bytes" in error.message


def test_a_file_of_lines_just_within_the_limit_passes(site, monkeypatch):
    longest = max(len(line) for line in episodes(site).read_bytes().split(b"\n"))
    monkeypatch.setattr(reading, "MAX_LINE_BYTES", longest)
    monkeypatch.setattr(reading, "READ_BLOCK_BYTES", 64)
    assert validate_site(site).ok


def test_file_larger_than_the_limit_is_refused_before_it_is_read(site, monkeypatch):
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", 1000)
    (site / "vitals.csv").unlink()
    size = episodes(site).stat().st_size
    [error] = validate_site(site).errors
    assert error.file == "episodes.csv"
    assert f"the file is {size:,} bytes; at most 1,000 bytes are read" in error.message


def test_more_rows_than_the_limit_are_refused_naming_the_first_line_beyond(site, monkeypatch):
    monkeypatch.setattr(reading, "MAX_ROWS", 10)
    (site / "vitals.csv").unlink()
    [error] = validate_site(site).errors
    assert error.lines == (12,) and "more than 10 data rows" in error.message


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_utf8_is_checked_across_block_boundaries_with_the_same_offset_and_line(site, monkeypatch, block):
    data = episodes(site).read_bytes()
    at = data.index(b"ovarian", data.index(b"\n", data.index(b"\n") + 1))  # on line 3
    episodes(site).write_bytes(data[:at] + "µ".encode() + data[at:at + 40] + b"\xe9" + data[at + 41:])
    monkeypatch.setattr(reading, "READ_BLOCK_BYTES", block)
    [error] = validate_site(site).errors
    assert error.lines == (3,) and f"byte 0xE9 at byte offset {at + 2 + 40}" in error.message


def test_a_multibyte_character_cut_off_at_the_end_of_the_file_is_not_utf8(site, monkeypatch):
    monkeypatch.setattr(reading, "READ_BLOCK_BYTES", 4)
    data = episodes(site).read_bytes()
    episodes(site).write_bytes(data + "µ".encode()[:1])
    [error] = validate_site(site).errors
    assert f"byte 0xC2 at byte offset {len(data)}" in error.message


def test_chunked_parsing_gathers_one_problem_per_rule_over_all_chunks(site, monkeypatch):
    expected = load_site(site).episodes
    monkeypatch.setattr(reading, "CHUNK_ROWS", 5)
    pd.testing.assert_frame_equal(load_site(site).episodes, expected)
    for row in (3, 9, 12):
        set_cell(episodes(site), row, "weight_kg", f"heavy{row}")
    [error] = validate_site(site).errors
    assert error.rows == (3, 9, 12) and error.lines == (4, 10, 13)
    assert error.message == "expected a number in [25, 250] kg, got 'heavy3', 'heavy9', 'heavy12'"


def test_a_message_lists_five_distinct_values_then_says_there_are_more(site):
    for row in range(1, 9):
        set_cell(episodes(site), row, "ecog", f"grade {row}")
    [error] = validate_site(site).errors
    assert error.message.endswith("got 'grade 1', 'grade 2', 'grade 3', 'grade 4', 'grade 5' and more")
    assert MAX_LISTED == 5


def test_a_long_cell_is_cut_in_the_message(site):
    set_cell(episodes(site), 2, "sex", "F" + "e" * 5000)
    [error] = validate_site(site).errors
    assert len(error.message) < 200 and "…'" in error.message


def test_a_file_changed_between_reading_and_parsing_is_reported(site):
    table, problems = read_csv_table(episodes(site), "episodes.csv")
    assert table is not None and problems == []
    rows = read_rows(episodes(site))
    write_rows(episodes(site), rows + [rows[1]])
    _, problems = parse_table(table, EPISODE_COLUMNS)
    assert [p.message for p in problems] == [
        "the file changed while it was being validated; validate it again once it is complete"]


# --- one big file, measured in a fresh process ----------------------------------------------------------

MEASURE = textwrap.dedent("""
    import resource, sys
    from shared.validation import load_site
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    site = load_site(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(site.episodes), (after - before) * 1024)
""")


def write_big_episodes(site: Path, target_bytes: int) -> int:
    """Repeat the site's episode rows (with fresh ids) until the file holds ``target_bytes``; return its rows."""
    rows = read_rows(episodes(site))
    header, data = rows[0], rows[1:]
    e, p = header.index("episode_id"), header.index("patient_id")
    n, written = 0, 0
    with episodes(site).open("w", encoding="utf-8") as f:
        f.write(",".join(header) + "\n")
        while written < target_bytes:
            for row in data:
                row = list(row)
                row[e], row[p] = f"{row[e]}-{n}", f"{row[p]}-{n // len(data)}"
                line = ",".join(row) + "\n"
                f.write(line)
                written += len(line)
                n += 1
    (site / "vitals.csv").unlink()
    return n


@pytest.mark.slow
def test_large_episodes_file_stays_within_a_small_multiple_of_its_size(site):
    n_rows = write_big_episodes(site, 60_000_000)
    size = episodes(site).stat().st_size
    result = subprocess.run([sys.executable, "-c", MEASURE, str(site)], capture_output=True, text=True,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, check=True)
    rows, grown = map(int, result.stdout.split())
    assert rows == n_rows
    assert grown < 5 * size, f"peak memory grew by {grown / size:.1f} × the file's {size:,} bytes"


def test_many_unknown_site_toml_keys_give_one_warning_per_section(site):
    keys = "".join(f"key{i} = {i}\n" for i in range(1000))
    (site / "site.toml").write_text('[site]\nschema_version = "1.0"\n' + keys, encoding="utf-8")
    report = validate_site(site)
    assert report.ok
    [warning] = report.warnings
    assert warning.message.startswith("1000 unknown keys, ignored: site.key0, site.key1, site.key2, site.key3, "
                                      "site.key4 and 995 more; expected name, schema_version")
    assert warning.shareable == "site.toml: 1000 unknown keys in [site], ignored; expected name, schema_version"
