"""Writes the bad-input corpus of site folders: a tiny valid site, then one broken copy per case.

Run from the repository root to rebuild the committed folders after a schema change::

    PYTHONPATH=. python tests/corpus/sites/build.py

then check the lines of ``expected.toml`` against what ``validate_site`` now says, case by case. Cases whose
input is large or cannot be committed (a symbolic link out of the folder, a FIFO, a header of a million
columns) are made at test time by ``tests/test_validation_corpus.py`` from the ``valid`` case.

The base site holds 2 patients × 2 cycles: rows 1-2 are P01 (days 0 and 28), rows 3-4 P02; vitals.csv has
day 0 of each episode, in the same order.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from shared.schema import EPISODE_COLUMNS, VITALS_COLUMNS
from tests.sitefactory import (
    SITE_TOML,
    drop_column,
    episode_rows,
    read_rows,
    set_cell,
    vitals_rows,
    write_dicts,
    write_rows,
)

CORPUS = Path(__file__).resolve().parent
BUDGET = SITE_TOML.replace('name = "alpha"\n', "")


def write_valid(folder: Path) -> None:
    folder.mkdir(parents=True)
    episodes = episode_rows(n_patients=2, n_cycles=2)
    write_dicts(folder / "episodes.csv", [c.name for c in EPISODE_COLUMNS], episodes)
    write_dicts(folder / "vitals.csv", [c.name for c in VITALS_COLUMNS], vitals_rows(episodes, n_days=1))
    (folder / "site.toml").write_text(BUDGET, encoding="utf-8")


def cell(file: str, row: int, column: str, value: str) -> Callable[[Path], None]:
    return lambda folder: set_cell(folder / file, row, column, value)


def cells(*edits: tuple[str, int, str, str]) -> Callable[[Path], None]:
    return lambda folder: [set_cell(folder / f, r, c, v) for f, r, c, v in edits]


def episodes_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / "episodes.csv"
        path.write_bytes(edit(path.read_bytes()))
    return apply


def episodes_rows(edit: Callable[[list[list[str]]], list[list[str]]]) -> Callable[[Path], None]:
    return lambda folder: write_rows(folder / "episodes.csv", edit(read_rows(folder / "episodes.csv")))


def site_toml(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "site.toml").write_text(text, encoding="utf-8")


def add_columns(names: list[str], value: str) -> Callable[[list[list[str]]], list[list[str]]]:
    return lambda rows: [rows[0] + names] + [r + [value] * len(names) for r in rows[1:]]


def rename_column(old: str, new: str) -> Callable[[list[list[str]]], list[list[str]]]:
    return lambda rows: [[new if h == old else h for h in rows[0]]] + rows[1:]


def with_row(index: int, edit: Callable[[list[str]], list[str]]) -> Callable[[list[list[str]]], list[list[str]]]:
    return lambda rows: [edit(r) if i == index else r for i, r in enumerate(rows)]


CASES: dict[str, Callable[[Path], None]] = {
    "valid": lambda folder: None,
    # files and bytes
    "episodes_missing": lambda folder: (folder / "episodes.csv").rename(folder / "Episodes_MRN-0047113.csv"),
    "episodes_empty": episodes_bytes(lambda data: b""),
    "episodes_header_only": episodes_bytes(lambda data: data[: data.index(b"\n") + 1]),
    "episodes_binary_garbage": episodes_bytes(lambda data: bytes(range(256)) * 4),
    "episodes_excel_workbook": episodes_bytes(lambda data: b"PK\x03\x04" + b"\x14\x00" * 64),
    "episodes_utf16": episodes_bytes(lambda data: data.decode().encode("utf-16")),
    "episodes_latin1_cell": episodes_bytes(lambda data: data.replace(b"P02", "Pé02".encode("latin-1"), 1)),
    "episodes_semicolon_separated": episodes_bytes(lambda data: data.replace(b",", b";")),
    "episodes_truncated": episodes_bytes(lambda data: data[: data.rindex(b",", 0, len(data) - 30)]),
    "episodes_row_too_long": episodes_rows(with_row(2, lambda r: r + ["MRN-0047113"])),
    "episodes_row_too_short": episodes_rows(with_row(2, lambda r: r[:-3])),
    "episodes_unclosed_quote": episodes_bytes(lambda data: data.replace(b"breast", b'"breast MRN-0047113', 1)),
    "episodes_duplicate_header": episodes_rows(rename_column("weight_kg", "age_years")),
    "episodes_missing_column": lambda folder: drop_column(folder / "episodes.csv", "zeta_mv"),
    "episodes_misspelt_column": episodes_rows(rename_column("zeta_mv", "Zeta_mV")),
    "episodes_unknown_columns": episodes_rows(add_columns(["ward", "MRN-0047113"], "B2")),
    "episodes_without_header": episodes_rows(lambda rows: rows[1:]),
    "episodes_crlf_and_bom": episodes_bytes(lambda data: b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")),
    # cells
    "age_out_of_range": cell("episodes.csv", 2, "age_years", "131.7"),
    "weight_as_text": cell("episodes.csv", 3, "weight_kg", "heavy-MRN-0047113"),
    "weight_in_pounds": cells(("episodes.csv", 1, "weight_kg", "331"), ("episodes.csv", 2, "weight_kg", "332")),
    "height_in_metres": cell("episodes.csv", 4, "height_cm", "1.63"),
    "cycle_as_fraction": cell("episodes.csv", 2, "cycle", "1.5"),
    "age_empty": cell("episodes.csv", 1, "age_years", ""),
    "weight_nan": cell("episodes.csv", 1, "weight_kg", "NaN"),
    "dose_infinity": cell("episodes.csv", 3, "dose_mg_m2", "Infinity"),
    "particle_size_negative": cell("episodes.csv", 4, "particle_size_nm", "-85.25"),
    "particle_size_micrometres": cell("episodes.csv", 1, "particle_size_nm", "0.085"),
    "pegylated_two": cell("episodes.csv", 2, "pegylated", "2"),
    "tumour_type_unknown": cell("episodes.csv", 3, "tumour_type", "glioblastoma"),
    "sex_lower_case": cells(("episodes.csv", 1, "sex", "f"), ("episodes.csv", 2, "sex", "f")),
    "bilirubin_mg_dl": cell("episodes.csv", 2, "bilirubin_umol_l", "0.51"),
    "anc_cells_per_ul": cell("episodes.csv", 3, "anc_baseline_e9_l", "4200"),
    # cross-checks
    "episode_ids_duplicated": cells(("episodes.csv", 1, "episode_id", "E-MRN-0047113"),
                                    ("episodes.csv", 3, "episode_id", "E-MRN-0047113"),
                                    ("vitals.csv", 1, "episode_id", "E-MRN-0047113")),
    "dose_not_dose_per_m2_times_bsa": cell("episodes.csv", 2, "dose_mg", "120.5"),
    "bsa_not_mosteller": cells(("episodes.csv", 3, "bsa_m2", "2.25"), ("episodes.csv", 3, "dose_mg", "112.5")),
    "patient_sex_changes": cell("episodes.csv", 2, "sex", "M"),
    "patient_age_70_to_19": cells(("episodes.csv", 3, "age_years", "70.4"), ("episodes.csv", 4, "age_years", "19.6")),
    "patient_height_changes": cell("episodes.csv", 2, "height_cm", "171.5"),
    "vitals_unknown_patient": cell("vitals.csv", 2, "patient_id", "MRN-0047113"),
    "vitals_episode_of_another_patient": cell("vitals.csv", 1, "episode_id", "E04"),
    "vitals_temperature_fahrenheit": cell("vitals.csv", 3, "temperature_c", "101.3"),
    "vitals_spo2_fraction": cell("vitals.csv", 4, "spo2_pct", "0.97"),
    "age_and_unknown_patient": cells(("episodes.csv", 3, "age_years", "131.7"),
                                     ("vitals.csv", 4, "patient_id", "MRN-0047113")),
    # site.toml
    "toml_syntax_error": site_toml('[site]\nschema_version = 1.0.0\n'),
    "toml_schema_version_unsupported": site_toml('[site]\nschema_version = "MRN-2.0"\n'),
    "toml_unknown_section": site_toml(BUDGET + "[MRN-0047113]\nbeds = 300\n"),
    "toml_epsilon_1e308": site_toml(BUDGET.replace("epsilon = 3.0", "epsilon = 1e308")),
    "toml_epsilon_negative": site_toml(BUDGET.replace("epsilon = 3.0", "epsilon = -1.5")),
    "toml_epsilon_text": site_toml(BUDGET.replace("epsilon = 3.0", 'epsilon = "MRN-0047113"')),
    "toml_delta_too_large": site_toml(BUDGET.replace("delta = 1e-5", "delta = 0.25")),
    "toml_dp_without_epsilon": site_toml(BUDGET.replace("epsilon = 3.0\n", "")),
    "toml_adjuster_share_5": site_toml(BUDGET + "adjuster_share = 5.0\n"),
    "toml_adjuster_share_deprecated": site_toml(BUDGET + "adjuster_share = 0.25\n"),
    "toml_shares_unknown_phase": site_toml(BUDGET + "[privacy.shares]\nMRN-0047113 = 0.1\n"),
    "toml_shares_above_one": site_toml(BUDGET + "[privacy.shares]\nboosting = 0.75\npolicy = 0.5\n"),
    "toml_shares_as_text": site_toml(BUDGET + '[privacy.shares]\nstatistics = "0.2"\n'),
}


def build() -> None:
    for old in CORPUS.iterdir():
        if old.is_dir() and old.name in CASES:
            shutil.rmtree(old)
    for name, breaks in CASES.items():
        write_valid(CORPUS / name)
        breaks(CORPUS / name)


if __name__ == "__main__":
    build()
    print(f"{len(CASES)} cases in {CORPUS}")
