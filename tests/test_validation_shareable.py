"""Two renderings of every problem: the full text stays at the site, the shareable text may leave it.

The shareable text names file, column, rows, lines and the rule (with its public range, unit, dtype or
categories) and holds no cell value, no identifier and no local path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.task import TaskSpec
from shared.validation import WITHHELD, Problem, SiteDataError, load_site, validate_site
from tests.sitefactory import read_rows, set_cell, write_rows, write_site, write_task_csv, write_task_toml


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path)


def test_age_and_unknown_patient_id_stay_at_the_site_while_file_column_and_row_are_shared(site):
    set_cell(site / "episodes.csv", 4, "age_years", "131.7")
    set_cell(site / "vitals.csv", 7, "patient_id", "MRN-0047113")
    report = validate_site(site)
    shared = report.shareable_errors()
    assert shared == [
        "episodes.csv, column 'age_years', row 4 (line 5): expected a number in [18, 110] year; "
        "1 cell above the range",
        "vitals.csv, column 'patient_id', row 7 (line 8): patient not found in episodes.csv (1 patient id)",
    ]
    full = report.format()
    assert "got 131.7" in full and "'MRN-0047113'" in full  # the site's own log keeps the values
    for text in (*shared, report.format_shareable()):
        assert "131.7" not in text and "MRN-0047113" not in text


def test_site_data_error_carries_the_shareable_report_and_keeps_values_in_its_full_text(site):
    set_cell(site / "episodes.csv", 2, "tumour_type", "Glioblastoma-MRN-1234")
    with pytest.raises(SiteDataError) as caught:
        load_site(site)
    err = caught.value
    assert "Glioblastoma-MRN-1234" in str(err)
    assert "Glioblastoma-MRN-1234" not in err.shareable and str(site.parent) not in err.shareable
    assert err.shareable_errors == [
        "episodes.csv, column 'tumour_type', row 2 (line 3): expected one of ovarian, breast, kaposi, myeloma, "
        "sarcoma; 1 cell not among them"]
    assert err.shareable.splitlines()[0] == "Site data: NOT USABLE (1 error(s), 0 warning(s))"


def test_a_file_without_its_header_line_shares_no_header_name(site):
    rows = read_rows(site / "episodes.csv")
    write_rows(site / "episodes.csv", rows[1:])  # the first patient's row is now taken as the header
    report = validate_site(site)
    assert not report.ok
    first_row = rows[1]
    for text in report.shareable_errors() + report.shareable_warnings():
        for cell in first_row:
            if len(cell) > 2:
                assert f"'{cell}'" not in text, text
    assert report.shareable_errors() == [
        "episodes.csv, line 1: duplicate column names in the header: the same name at positions 4, 13, 16, 29, "
        "31, 32; the same name at positions 3, 21; the same name at positions 15, 25"]


def test_duplicate_episode_ids_are_shared_as_rows_holding_one_id(site):
    set_cell(site / "episodes.csv", 9, "episode_id", "E03")
    [problem] = [p for p in validate_site(site).errors if p.column == "episode_id" and p.file == "episodes.csv"]
    assert "'E03'" in problem.message
    assert problem.shareable == ("episodes.csv, column 'episode_id', rows 3, 9 (lines 4, 10): episode ids must "
                                 "be unique; one id in rows 3, 9")


def test_dose_and_bsa_values_stay_at_the_site(site):
    set_cell(site / "episodes.csv", 6, "dose_mg", "120")
    [problem] = validate_site(site).errors
    assert "120 mg" in problem.message
    assert problem.shareable == ("episodes.csv, column 'dose_mg', row 6 (line 7): dose_mg differs from "
                                 "dose_mg_m2 × bsa_m2 by more than 5%")


def test_vitals_episode_of_another_patient_names_no_id(site):
    set_cell(site / "vitals.csv", 1, "episode_id", "E05")
    set_cell(site / "vitals.csv", 2, "episode_id", "E77")
    [problem] = validate_site(site).errors
    assert "'P03'" in problem.message
    assert problem.shareable.endswith("expected an episode of the row's patient in episodes.csv; 1 row with "
                                      "another patient's episode, 1 row with an episode absent from episodes.csv")


def test_site_toml_values_and_unknown_keys_stay_at_the_site(site):
    (site / "site.toml").write_text('[site]\nschema_version = "MRN-0047113"\n[privacy]\nMRN-0047114 = 1\n'
                                    'epsilon = "MRN-0047115"\n')
    report = validate_site(site)
    assert "MRN-0047115" in report.format()
    for text in report.shareable_errors() + report.shareable_warnings():
        assert "MRN" not in text
    assert "site.toml: privacy.epsilon: expected a number" in report.shareable_errors()


def test_a_task_csv_is_shared_by_its_name_without_the_local_folder(tmp_path):
    task = TaskSpec.from_toml(write_task_toml(tmp_path / "task.toml"))
    (tmp_path / "private_folder").mkdir()
    csv_path = write_task_csv(tmp_path / "private_folder" / "heart.csv")
    set_cell(csv_path, 3, "age", "431")
    [problem] = validate_site(csv_path, task).errors
    assert str(csv_path) in str(problem)
    assert problem.shareable == "heart.csv, column 'age', row 3 (line 4): expected a number in [0, 120]; 1 cell " \
                                "above the range"


def test_a_problem_made_without_a_shareable_text_shares_only_its_location():
    problem = Problem("error", "vitals.csv", "patient_id", (2,), "expected the record's patient 'P07'", (3,))
    assert problem.shareable == f"vitals.csv, column 'patient_id', row 2 (line 3): {WITHHELD}"


def test_every_problem_of_a_badly_broken_site_has_its_own_shareable_text(site):
    set_cell(site / "episodes.csv", 1, "cycle", "1.5")
    set_cell(site / "episodes.csv", 2, "height_cm", "1.7")
    set_cell(site / "episodes.csv", 3, "particle_size_nm", "-3")
    set_cell(site / "episodes.csv", 4, "sex", "f")
    set_cell(site / "episodes.csv", 5, "age_years", "")
    rows = read_rows(site / "episodes.csv")
    write_rows(site / "episodes.csv", [rows[0] + ["ward"]] + [r + ["B"] for r in rows[1:]])
    report = validate_site(site)
    assert len(report.problems) >= 6
    assert all(p.shareable_message is not None for p in report.problems)
