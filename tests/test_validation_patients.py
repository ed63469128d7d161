"""One patient id, one person: sex, age and height must agree over a patient's episodes.

Rows of ``tests.sitefactory.write_site`` are patient-major: rows 1-2 are P01 (cycles on day 0 and 28),
rows 3-4 P02, rows 5-6 P03, ...
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.validation import AGE_TOLERANCE_YEARS, HEIGHT_TOLERANCE_CM, validate_site
from tests.sitefactory import set_cell, write_site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path)


def episodes(site: Path) -> Path:
    return site / "episodes.csv"


def test_a_patient_whose_sex_changes_between_episodes_is_an_error_naming_both_rows(site):
    set_cell(episodes(site), 2, "sex", "M")
    [error] = validate_site(site).errors
    assert error.column == "sex" and error.rows == (1, 2) and error.lines == (2, 3)
    assert error.message == ("a patient's sex must be the same in all of their episodes; "
                             "'P01': F in row 1 and M in row 2")
    assert error.shareable.endswith("all of their episodes; one patient in rows 1, 2")


def test_a_patient_whose_age_drops_from_70_to_19_is_an_error(site):
    set_cell(episodes(site), 3, "age_years", "70")
    set_cell(episodes(site), 4, "age_years", "19")
    [error] = validate_site(site).errors
    assert error.column == "age_years" and error.rows == (3, 4)
    assert "'P02': age 70 on day 0 (row 3) but age 19 on day 28 (row 4)" in error.message
    assert "19" not in error.shareable and "70" not in error.shareable


def test_ages_in_whole_years_rounded_either_way_are_accepted(site):
    set_cell(episodes(site), 3, "age_years", "50")  # 50.9 at day 0, rounded down ...
    set_cell(episodes(site), 4, "age_years", "51.4")  # ... and 51.0 at day 28, exact
    assert validate_site(site).ok
    assert AGE_TOLERANCE_YEARS == 1.5


def test_an_age_that_grows_faster_than_start_day_is_an_error(site):
    set_cell(episodes(site), 4, "age_years", f"{50 + 28 / 365.25 + AGE_TOLERANCE_YEARS + 0.1:.2f}")
    [error] = validate_site(site).errors
    assert error.column == "age_years" and error.rows == (3, 4)


def test_a_height_that_moves_beyond_the_tolerance_is_a_warning_not_an_error(site):
    set_cell(episodes(site), 6, "height_cm", "150")  # P03 is 166 cm on row 5
    report = validate_site(site)
    assert report.ok
    [warning] = [w for w in report.warnings if w.column == "height_cm"]
    assert warning.rows == (5, 6)
    assert warning.message.endswith(f"within {HEIGHT_TOLERANCE_CM:g} cm over their episodes; "
                                    f"'P03': 150 cm (row 6) to 166 cm (row 5)")


def test_a_height_within_the_tolerance_passes(site):
    set_cell(episodes(site), 6, "height_cm", "163")
    report = validate_site(site)
    assert report.ok and not [w for w in report.warnings if w.column == "height_cm"]


def test_many_inconsistent_patients_give_one_problem_listing_five(site):
    for row in (2, 4, 6, 8, 10, 12):
        set_cell(episodes(site), row, "sex", "M" if row % 4 == 2 else "F")
    [error] = validate_site(site).errors
    assert error.rows == tuple(range(1, 13))
    assert error.message.endswith("and 1 more")
