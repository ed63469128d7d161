"""The bad-input corpus: every malformed site gets exactly its shareable lines, and no planted value leaks.

``tests/corpus/sites/<case>/`` holds small broken site folders (built by ``tests/corpus/sites/build.py``);
``expected.toml`` gives, per case, the exact ``report.shareable_errors()`` and ``shareable_warnings()`` and
the ``planted`` values or ids: each must show in the site's full report (or its files) and in no shareable
text. Cases with ``generated`` (symbolic links, a FIFO, huge lines) are made here, from the ``valid`` case.
Each case is validated in a copy, which must come out byte-for-byte unchanged.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.validation import MAX_COLUMNS, MAX_LINE_BYTES, MAX_SITE_TOML_BYTES, validate_site
from tests.sitefactory import file_hashes, read_rows, write_rows

CORPUS = Path(__file__).resolve().parent / "corpus" / "sites"
EXPECTED: dict[str, dict] = tomllib.loads((CORPUS / "expected.toml").read_text(encoding="utf-8"))


def link_outside(name: str, target_text: str | None) -> Callable[[Path], None]:
    """Replace the site's ``name`` by a symbolic link to a file beside the folder (or to nowhere)."""
    def make(site: Path) -> None:
        (site / name).unlink()
        if target_text is None:
            (site / name).symlink_to("/nonexistent/" + name)
            return
        target = site.parent / f"outside_{name}"
        target.write_text(target_text, encoding="utf-8")
        (site / name).symlink_to(target)
    return make


def fifo(site: Path) -> None:
    (site / "episodes.csv").unlink()
    os.mkfifo(site / "episodes.csv")


def widen_header(n_columns: int) -> Callable[[Path], None]:
    def make(site: Path) -> None:
        header, *rows = (site / "episodes.csv").read_text(encoding="utf-8").splitlines()
        extra = n_columns - header.count(",") - 1
        lines = [header + "".join(f",x{i}" for i in range(extra))] + [row + "," * extra for row in rows]
        (site / "episodes.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return make


def long_line(site: Path) -> None:
    rows = read_rows(site / "episodes.csv")
    rows[2][rows[0].index("tumour_type")] = "MRN-0047113 " + "x" * (2 * MAX_LINE_BYTES)
    write_rows(site / "episodes.csv", rows)


def oversized_site_toml(site: Path) -> None:
    (site / "site.toml").write_text("# padding\n" * (MAX_SITE_TOML_BYTES // 10 + 1), encoding="utf-8")


GENERATORS: dict[str, Callable[[Path], None]] = {
    "episodes_link_outside": link_outside("episodes.csv", "secret-first-line:x:0:0:/root:/bin/bash\n"),
    "vitals_broken_link": link_outside("vitals.csv", None),
    "site_toml_link_outside": link_outside("site.toml", "[site]\nschema_version = \"1.0\"\n"),
    "episodes_fifo": fifo,
    "episodes_million_columns": widen_header(1_000_000),
    "episodes_513_columns": widen_header(MAX_COLUMNS + 1),
    "episodes_long_line": long_line,
    "site_toml_oversized": oversized_site_toml,
}


def prepare(case: str, spec: dict, root: Path) -> Path:
    """A copy of the case folder under ``root`` (of ``valid`` plus the generator, for generated cases)."""
    site = root / case
    shutil.copytree(CORPUS / ("valid" if "generated" in spec else case), site, symlinks=True)
    if "generated" in spec:
        GENERATORS[spec["generated"]](site)
    return site


def all_text(root: Path) -> str:
    """Every regular file under ``root`` as text, to prove a planted value was really planted."""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def test_the_corpus_is_large_and_every_generator_is_used():
    assert len(EXPECTED) >= 60
    assert {spec["generated"] for spec in EXPECTED.values() if "generated" in spec} == set(GENERATORS)
    folders = {p.name for p in CORPUS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {case for case, spec in EXPECTED.items() if "generated" not in spec}


SLOW_CASES = {"episodes_million_columns"}
"""Cases whose generation takes seconds (writing a header of 10^6 names)."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_CASES else case
                                  for case in sorted(EXPECTED)])
def test_corpus_case_gets_its_exact_shareable_lines_and_leaks_nothing_planted(case, tmp_path):
    spec = EXPECTED[case]
    site = prepare(case, spec, tmp_path)
    before = file_hashes(site)
    report = validate_site(site)
    assert file_hashes(site) == before
    assert report.shareable_errors() == spec["errors"]
    assert report.shareable_warnings() == spec.get("warnings", [])
    assert report.ok is (not spec["errors"])
    assert all(p.shareable_message is not None for p in report.problems)
    shared = report.format_shareable()
    assert str(tmp_path) not in shared
    for planted in spec.get("planted", []):
        assert planted in report.format() or planted in all_text(tmp_path), f"{planted!r} was not planted"
        assert planted not in shared, f"{planted!r} leaks into the shareable report"
