"""Site validation: each test corrupts one thing of a valid site and checks the message names it.

Every validation goes through ``check``, which also asserts that no file changed (hash before and after).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from shared.schema import EPISODE_COLUMNS
from shared.task import TaskSpec
from shared.validation import (
    MAX_LISTED,
    Problem,
    SiteDataError,
    ValidationReport,
    load_site,
    validate_site,
)
from tests.sitefactory import (
    drop_column,
    file_hashes,
    read_rows,
    set_cell,
    write_rows,
    write_site,
    write_task_csv,
    write_task_toml,
)


def check(path: Path, task: TaskSpec | None = None) -> ValidationReport:
    """Validate and assert the site's files are byte-for-byte unchanged."""
    before = file_hashes(path) if path.exists() else {}
    report = validate_site(path, task)
    after = file_hashes(path) if path.exists() else {}
    assert before == after
    return report


def only_error(report: ValidationReport) -> Problem:
    assert len(report.errors) == 1, report.format()
    return report.errors[0]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path)


def episodes(site: Path) -> Path:
    return site / "episodes.csv"


def vitals(site: Path) -> Path:
    return site / "vitals.csv"


# --- a valid site ------------------------------------------------------------------------------------------


def test_valid_site_passes_without_problems_and_is_summarised(site):
    report = check(site)
    assert report.ok and report.problems == []
    assert report.summary["site"] == "alpha"
    assert report.summary["n_episodes"] == 12
    assert report.summary["n_patients"] == 6
    assert report.summary["n_formulations"] == 2
    assert report.summary["n_vitals"] == 36
    assert 0 < report.summary["response_rate"] < 1
    assert "OK" in report.format()


def test_load_site_returns_typed_frames_with_nan_for_missing(site):
    data = load_site(site)
    assert data.name == "alpha"
    assert data.config["privacy"]["epsilon"] == 3.0
    assert len(data.episodes) == 12 and len(data.vitals) == 36
    assert data.episodes["particle_size_nm"].dtype == float
    assert data.episodes["cycle"].dtype == "int64"
    assert data.episodes["pegylated"].dtype == "int64"
    assert data.episodes["response"].dtype == float
    assert data.episodes["bilirubin_umol_l"].isna().sum() == 2  # patient 6 has no bilirubin
    assert set(data.episodes["sex"]) == {"F", "M"}
    assert isinstance(data.episodes["tumour_type"].iloc[0], str)


def test_load_site_raises_site_data_error_carrying_the_report(site):
    set_cell(episodes(site), 4, "particle_size_nm", "-5")
    with pytest.raises(SiteDataError) as caught:
        load_site(site)
    assert not caught.value.report.ok
    assert "particle_size_nm" in str(caught.value)


# --- missing, empty and unreadable files -----------------------------------------------------------------


def test_site_path_that_does_not_exist_is_rejected(tmp_path):
    report = check(tmp_path / "nowhere")
    assert "does not exist" in str(only_error(report))


def test_site_without_episodes_file_is_rejected_naming_the_file(site):
    episodes(site).rename(site / "Episodes_2024.csv")
    problem = only_error(check(site))
    assert problem.file == "episodes.csv"
    assert "missing" in problem.message and "Episodes_2024.csv" in problem.message


def test_empty_episodes_file_is_rejected_as_empty(site):
    episodes(site).write_bytes(b"")
    problem = only_error(check(site))
    assert str(problem).startswith("episodes.csv: ")
    assert "empty (0 bytes)" in problem.message


def test_header_only_episodes_file_is_rejected_as_having_no_data_rows(site):
    write_rows(episodes(site), read_rows(episodes(site))[:1])
    assert "no data rows" in only_error(check(site)).message


def test_binary_garbage_is_rejected_as_not_a_csv_text_file(site):
    episodes(site).write_bytes(bytes(range(256)) * 8)
    problem = only_error(check(site))
    assert "not a CSV text file" in problem.message and "NUL" in problem.message


def test_control_bytes_without_nul_are_rejected_as_not_a_csv_text_file(site):
    noise = bytes(random.Random(0).choice(range(1, 32)) for _ in range(2000))
    episodes(site).write_bytes(b"episode_id,patient_id\n" + noise)
    assert "not a CSV text file" in only_error(check(site)).message


def test_excel_workbook_saved_as_csv_is_rejected_with_export_hint(site):
    episodes(site).write_bytes(b"PK\x03\x04" + b"\x14\x00" * 100)
    message = only_error(check(site)).message
    assert "not a CSV text file" in message and "Excel" in message


def test_non_utf8_bytes_are_rejected_naming_line_and_byte_offset(site):
    text = episodes(site).read_bytes()
    offset = text.index(b"ovarian", text.index(b"\n", text.index(b"\n") + 1))  # on line 3
    episodes(site).write_bytes(text[:offset] + "é".encode("latin-1") + text[offset + 1:])
    problem = only_error(check(site))
    assert problem.lines == (3,)
    assert f"byte offset {offset}" in problem.message and "0xE9" in problem.message
    assert "UTF-8" in problem.message
    assert "line 3" in str(problem)


def test_utf8_byte_order_mark_is_accepted(site):
    episodes(site).write_bytes(b"\xef\xbb\xbf" + episodes(site).read_bytes())
    assert check(site).ok


def test_semicolon_separated_file_is_rejected_with_separator_hint(site):
    rows = read_rows(episodes(site))
    episodes(site).write_text("\n".join(";".join(r) for r in rows) + "\n", encoding="utf-8")
    message = only_error(check(site)).message
    assert "';'" in message and "separator" in message


# --- rows and header -------------------------------------------------------------------------------------


def test_truncated_last_row_is_rejected_naming_the_row(site):
    data = episodes(site).read_bytes()
    episodes(site).write_bytes(data[: data.rindex(b",", 0, len(data) - 40)])  # cut mid-row, no newline
    problem = only_error(check(site))
    assert problem.rows == (12,) and problem.lines == (13,)
    width = len(EPISODE_COLUMNS)
    assert "truncated" in problem.message and f"of the header's {width} fields" in problem.message
    assert "row 12 (line 13)" in str(problem)


def test_row_with_too_many_fields_is_rejected_naming_the_row(site):
    rows = read_rows(episodes(site))
    rows[5].append("surplus")
    write_rows(episodes(site), rows)
    problem = only_error(check(site))
    assert problem.rows == (5,)
    width = len(EPISODE_COLUMNS)
    assert f"more fields than the header's {width} (got {width + 1})" in problem.message


def test_row_with_too_few_fields_in_the_middle_is_rejected_naming_the_row(site):
    rows = read_rows(episodes(site))
    rows[3] = rows[3][:-2]
    write_rows(episodes(site), rows)
    problem = only_error(check(site))
    assert problem.rows == (3,) and "fewer fields" in problem.message


def test_blank_lines_are_skipped_and_line_numbers_still_point_at_the_right_line(site):
    lines = episodes(site).read_text(encoding="utf-8").splitlines()
    lines.insert(2, "")  # blank line after data row 1
    lines[4] = lines[4].replace("8.5", "abc", 1)  # data row 3 is now on line 5
    episodes(site).write_text("\n".join(lines) + "\n", encoding="utf-8")
    problem = only_error(check(site))
    assert problem.rows == (3,) and problem.lines == (5,)


def test_unclosed_quote_is_rejected_naming_the_line_where_the_row_starts(site):
    data = episodes(site).read_bytes()
    episodes(site).write_bytes(data.replace(b"ovarian", b'"ovarian', 1))  # data row 1, line 2
    problem = only_error(check(site))
    assert problem.lines == (2,) and "malformed CSV" in problem.message and "quote" in problem.message


def test_duplicate_header_names_are_rejected_naming_the_column_and_positions(site):
    rows = read_rows(episodes(site))
    rows[0][10] = "age_years"
    write_rows(episodes(site), rows)
    problem = only_error(check(site))
    assert problem.column == "age_years"
    assert "duplicate column names" in problem.message and "positions 5, 11" in problem.message


def test_missing_required_column_is_rejected_naming_the_column(site):
    drop_column(episodes(site), "zeta_mv")
    problem = only_error(check(site))
    assert problem.column == "zeta_mv"
    assert "required column is missing" in problem.message and "mV" in problem.message


def test_misspelt_column_is_rejected_with_the_close_match(site):
    rows = read_rows(episodes(site))
    rows[0][rows[0].index("zeta_mv")] = "Zeta_mV"
    write_rows(episodes(site), rows)
    report = check(site)
    assert "found 'Zeta_mV'; column names are case-sensitive" in only_error(report).message


def test_unknown_extra_column_is_a_warning_and_the_site_stays_usable(site):
    rows = read_rows(episodes(site))
    write_rows(episodes(site), [r + (["ward"] if i == 0 else ["B2"]) for i, r in enumerate(rows)])
    report = check(site)
    assert report.ok
    [warning] = report.warnings
    assert warning.column == "ward" and "unknown column" in warning.message
    assert "ward" not in load_site(site).episodes.columns


# --- cells -----------------------------------------------------------------------------------------------


def test_text_in_number_column_is_rejected_naming_row_and_value(site):
    set_cell(episodes(site), 7, "weight_kg", "abc")
    problem = only_error(check(site))
    assert str(problem) == ("episodes.csv, column 'weight_kg', row 7 (line 8): "
                            "expected a number in [25, 250] kg, got 'abc'")


def test_fraction_in_integer_column_is_rejected(site):
    set_cell(episodes(site), 2, "cycle", "1.5")
    problem = only_error(check(site))
    assert problem.column == "cycle" and "expected an integer in [1, 30], got '1.5'" in problem.message


def test_empty_cell_where_not_nullable_is_rejected(site):
    set_cell(episodes(site), 3, "age_years", "")
    set_cell(episodes(site), 6, "age_years", "NA")
    problem = only_error(check(site))
    assert problem.column == "age_years" and problem.rows == (3, 6)
    assert "value is required" in problem.message


def test_empty_and_na_cells_where_nullable_are_accepted(site):
    set_cell(episodes(site), 3, "anc_baseline_e9_l", "NaN")
    set_cell(episodes(site), 4, "efficacy_pct", "nan")
    set_cell(episodes(site), 5, "response", "NA")
    assert check(site).ok


def test_site_with_negative_particle_size_is_rejected_naming_the_column(site):
    set_cell(episodes(site), 4, "particle_size_nm", "-85")
    problem = only_error(check(site))
    assert problem.file == "episodes.csv" and problem.column == "particle_size_nm" and problem.rows == (4,)
    assert "expected a number in [1, 1000] nm, got -85" in problem.message
    assert "cannot be negative" in problem.message


def test_particle_size_in_micrometres_is_rejected_with_the_unit_hint(site):
    set_cell(episodes(site), 4, "particle_size_nm", "0.12")
    set_cell(episodes(site), 9, "particle_size_nm", "0.15")
    problem = only_error(check(site))
    assert str(problem) == (
        "episodes.csv, column 'particle_size_nm', rows 4, 9 (lines 5, 10): "
        "expected a number in [1, 1000] nm, got 0.12, 0.15 — "
        "values below 1 look like micrometres; multiply by 1000 for nm")


def test_zeta_potential_beyond_100_mv_is_rejected(site):
    set_cell(episodes(site), 2, "zeta_mv", "-150")
    problem = only_error(check(site))
    assert problem.column == "zeta_mv" and problem.rows == (2,)
    assert "expected a number in [-100, 100] mV, got -150" in problem.message
    assert "±100 mV" in problem.message


def test_encapsulation_efficiency_above_100_percent_is_rejected(site):
    set_cell(episodes(site), 1, "encapsulation_pct", "950")
    problem = only_error(check(site))
    assert problem.column == "encapsulation_pct"
    assert "expected a number in [0, 100] %, got 950" in problem.message


def test_bool_column_with_2_is_rejected(site):
    set_cell(episodes(site), 8, "pegylated", "2")
    problem = only_error(check(site))
    assert problem.column == "pegylated" and problem.rows == (8,)
    assert "expected 0 or 1, got '2'" in problem.message


def test_unknown_category_is_rejected_listing_the_allowed_values(site):
    set_cell(episodes(site), 5, "tumour_type", "lung")
    problem = only_error(check(site))
    assert problem.column == "tumour_type" and problem.rows == (5,)
    assert "expected one of ovarian, breast, kaposi, myeloma, sarcoma, got 'lung'" in problem.message


def test_problem_lists_at_most_five_rows_then_says_how_many_more(site):
    for row in range(1, 9):
        set_cell(episodes(site), row, "height_cm", "1.7")
    text = str(next(p for p in check(site).errors if p.column == "height_cm"))
    assert "rows 1, 2, 3, 4, 5 and 3 more (lines 2, 3, 4, 5, 6, …)" in text
    assert "looks like metres" in text
    assert MAX_LISTED == 5


# --- cross-checks ----------------------------------------------------------------------------------------


def test_duplicate_episode_ids_are_rejected_naming_both_rows(site):
    set_cell(episodes(site), 9, "episode_id", "E03")
    report = check(site)
    problem = next(p for p in report.errors if p.column == "episode_id" and p.file == "episodes.csv")
    assert problem.rows == (3, 9)
    assert "'E03' in rows 3, 9" in problem.message and "unique" in problem.message


def test_dose_inconsistent_with_dose_per_m2_times_bsa_is_rejected_naming_rows(site):
    set_cell(episodes(site), 6, "dose_mg", "120")
    problem = only_error(check(site))
    assert problem.column == "dose_mg" and problem.rows == (6,)
    assert "dose_mg_m2 × bsa_m2" in problem.message and "5%" in problem.message
    assert "row 6: 120 mg, expected 70.8 mg (40 mg/m² × 1.77 m²)" in problem.message


def test_dose_within_five_percent_is_accepted(site):
    set_cell(episodes(site), 6, "dose_mg", "73")  # 70.8 mg expected, +3 %
    assert check(site).ok


def test_bsa_inconsistent_with_mosteller_is_a_warning(site):
    rows = read_rows(episodes(site))
    header = rows[0]
    row = rows[2]
    row[header.index("bsa_m2")] = "2.2"  # Mosteller gives 1.63 m²
    row[header.index("dose_mg")] = f"{float(row[header.index('dose_mg_m2')]) * 2.2:.1f}"
    write_rows(episodes(site), rows)
    report = check(site)
    assert report.ok
    [warning] = report.warnings
    assert warning.column == "bsa_m2" and warning.rows == (2,)
    assert "Mosteller" in warning.message and "10%" in warning.message


def test_vitals_rows_of_a_patient_absent_from_episodes_are_rejected_naming_the_rows(site):
    set_cell(vitals(site), 4, "patient_id", "P99")
    set_cell(vitals(site), 5, "patient_id", "P99")
    problem = only_error(check(site))
    assert problem.file == "vitals.csv" and problem.column == "patient_id" and problem.rows == (4, 5)
    assert "'P99'" in problem.message and "episodes.csv" in problem.message


def test_vitals_episode_of_another_patient_is_rejected(site):
    set_cell(vitals(site), 1, "episode_id", "E05")
    problem = only_error(check(site))
    assert problem.file == "vitals.csv" and problem.column == "episode_id" and problem.rows == (1,)
    assert "'E05' for patient 'P01' (it belongs to 'P03')" in problem.message


def test_vitals_episode_absent_from_episodes_is_rejected(site):
    set_cell(vitals(site), 2, "episode_id", "E77")
    problem = only_error(check(site))
    assert problem.rows == (2,) and "'E77' for patient 'P01' (no such episode)" in problem.message


def test_vitals_are_optional(site):
    vitals(site).unlink()
    report = check(site)
    assert report.ok and "n_vitals" not in report.summary
    assert load_site(site).vitals is None


# --- site.toml -------------------------------------------------------------------------------------------


def write_site_toml(site: Path, text: str) -> None:
    (site / "site.toml").write_text(text, encoding="utf-8")


def test_site_toml_syntax_error_is_rejected_naming_the_line(site):
    write_site_toml(site, '[site]\nname = "alpha"\nschema_version = 1.0.0\n')
    problem = only_error(check(site))
    assert problem.file == "site.toml" and problem.lines == (3,)
    assert "invalid TOML" in problem.message and "site.toml, line 3" in str(problem)


def test_unsupported_schema_version_is_rejected(site):
    write_site_toml(site, '[site]\nname = "alpha"\nschema_version = "2.0"\n')
    message = only_error(check(site)).message
    assert "schema_version '2.0' is not supported" in message and "'1.0'" in message


@pytest.mark.parametrize("epsilon", ["0", "-1.5"])
def test_non_positive_epsilon_is_rejected(site, epsilon):
    write_site_toml(site, f'[site]\nschema_version = "1.0"\n[privacy]\ndp = true\nepsilon = {epsilon}\n'
                          f'delta = 1e-5\n')
    assert "privacy.epsilon: expected a number > 0" in only_error(check(site)).message


@pytest.mark.parametrize("delta", ["0", "1", "1.5", "0.01"])
def test_delta_outside_zero_to_max_delta_is_rejected(site, delta):
    write_site_toml(site, f'[site]\nschema_version = "1.0"\n[privacy]\nepsilon = 3.0\ndelta = {delta}\n')
    assert "privacy.delta: expected a number in (0, 0.001]" in only_error(check(site)).message


def test_unknown_site_toml_section_is_a_warning(site):
    write_site_toml(site, '[site]\nschema_version = "1.0"\n[hospital]\nbeds = 300\n')
    report = check(site)
    assert report.ok
    assert "unknown section [hospital]" in report.warnings[0].message


def test_site_name_defaults_to_the_folder_name(site):
    (site / "site.toml").unlink()
    assert check(site).summary["site"] == site.name == "alpha"
    assert load_site(site).config == {}


# --- generic tabular task --------------------------------------------------------------------------------


@pytest.fixture
def task(tmp_path: Path) -> TaskSpec:
    return TaskSpec.from_toml(write_task_toml(tmp_path / "task.toml"))


def test_generic_task_csv_with_split_column_is_valid(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    report = check(csv_path, task)
    assert report.ok, report.format()
    assert report.summary["n_rows"] == 20
    assert report.summary["target_counts"] == {"0": 10, "1": 10}
    assert report.summary["split_counts"] == {"train": 16, "val": 2, "test": 2}


def test_generic_task_folder_with_one_csv_loads_a_typed_table(tmp_path, task):
    folder = tmp_path / "beta"
    folder.mkdir()
    write_task_csv(folder / "heart.csv")
    data = load_site(folder, task)
    assert data.name == "beta" and data.task is task and data.vitals is None
    assert list(data.episodes.columns) == ["target", "age", "chol", "sex", "cp", "split"]
    assert data.episodes["target"].dtype == "int64"
    assert data.episodes["age"].dtype == float and pd.isna(data.episodes["chol"].iloc[3])


def test_generic_task_folder_with_two_csvs_is_rejected(tmp_path, task):
    write_task_csv(tmp_path / "a.csv")
    write_task_csv(tmp_path / "b.csv")
    assert "exactly one .csv file" in only_error(check(tmp_path, task)).message


def test_generic_binary_target_with_three_values_is_rejected(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    set_cell(csv_path, 7, "target", "2")
    problem = only_error(check(csv_path, task))
    assert problem.file == str(csv_path) and problem.column == "target" and problem.rows == (7,)
    assert "at most 2 distinct values; got 3" in problem.message and "'2' (1 row)" in problem.message


def test_generic_missing_target_cell_is_rejected(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    set_cell(csv_path, 4, "target", "")
    problem = only_error(check(csv_path, task))
    assert problem.column == "target" and problem.rows == (4,) and "value is required" in problem.message


def test_generic_range_from_task_spec_is_enforced(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    set_cell(csv_path, 2, "age", "430")
    problem = only_error(check(csv_path, task))
    assert problem.column == "age" and problem.rows == (2,)
    assert "expected a number in [0, 120], got 430" in problem.message


def test_generic_numeric_feature_must_parse_as_a_number(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    set_cell(csv_path, 5, "chol", "high")
    assert "expected a number, got 'high'" in only_error(check(csv_path, task)).message


def test_generic_split_values_must_be_train_val_test(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    set_cell(csv_path, 3, "split", "validation")
    problem = only_error(check(csv_path, task))
    assert problem.column == "split"
    assert "expected one of train, val, test, got 'validation'" in problem.message


def test_generic_missing_feature_column_and_extra_column(tmp_path, task):
    csv_path = write_task_csv(tmp_path / "heart.csv")
    drop_column(csv_path, "cp")
    rows = read_rows(csv_path)
    write_rows(csv_path, [r + (["note"] if i == 0 else ["x"]) for i, r in enumerate(rows)])
    report = check(csv_path, task)
    assert only_error(report).column == "cp"
    assert [w.column for w in report.warnings] == ["note"]
