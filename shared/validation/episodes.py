"""Cross-checks of episodes.csv: unique episode ids, dose against BSA, BSA against Mosteller, one patient per id.

The per-patient checks ask whether the rows sharing a ``patient_id`` can be one person. Sex and age are
identity facts: rows that disagree on them mean the id joins two people (or a record was typed into the
wrong patient), so that id's history — cycle numbers, cumulative anthracycline dose, last cycle's
toxicity — cannot be trusted, and training and the dose adjuster learn from exactly that history: an
error. Height is a measurement, re-taken and rounded, and each row's BSA and dose are already checked
against that row's own height and weight: a height that moves more than a measurement would is a warning.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from shared.bsa import BSA_TOLERANCE, mosteller_bsa_m2
from shared.validation.problems import MAX_LISTED, Problem, Severity, echo, listed
from shared.validation.reading import CsvTable

DOSE_TOLERANCE = 0.05
"""Allowed relative gap between dose_mg and dose_mg_m2 × bsa_m2 (rounding, not a wrong dose)."""


DAYS_PER_YEAR = 365.25

AGE_TOLERANCE_YEARS = 1.5
"""Allowed spread of a patient's age at their day 0 (``age_years - start_day / DAYS_PER_YEAR``) over their
episodes. Ages in whole years are off by < 1 year (floor) or < 0.5 (rounding); a site mixing the two can
be off by < 1.5. More is not one person's age, however it was rounded."""

HEIGHT_TOLERANCE_CM = 5.0
"""Allowed spread of a patient's height over their episodes: stadiometer readings repeat within ~1 cm,
measured and self-reported heights differ by 2-3 cm, and adults lose well under 1 cm a year."""


def duplicate_episode_ids(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """Episode ids must be unique; name every row of each repeated id."""
    ids = episodes["episode_id"]
    repeated = ids.notna() & ids.duplicated(keep=False)
    if not repeated.any():
        return []
    rows_of = list(ids[repeated].groupby(ids[repeated], sort=False).groups.items())
    shown = rows_of[:MAX_LISTED]
    detail = [f"{echo(eid)!r} in rows {listed(list(rows))}" for eid, rows in shown]
    shared = [f"one id in rows {listed(list(rows))}" for _, rows in shown]
    return [table.problem("episode_id", repeated,
                          "episode ids must be unique; " + listed(detail, sep="; ", total=len(rows_of)),
                          shareable="episode ids must be unique; " + listed(shared, sep="; ", total=len(rows_of)))]


def dose_inconsistent_with_bsa(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """dose_mg must equal dose_mg_m2 × bsa_m2 within ``DOSE_TOLERANCE``."""
    expected = episodes["dose_mg_m2"] * episodes["bsa_m2"]
    given = episodes["dose_mg"]
    off = (given - expected).abs() > DOSE_TOLERANCE * expected
    if not off.any():
        return []
    detail = [f"row {r}: {given[r]:g} mg, expected {expected[r]:.1f} mg "
              f"({episodes.at[r, 'dose_mg_m2']:g} mg/m² × {episodes.at[r, 'bsa_m2']:g} m²)"
              for r in off.index[off][:MAX_LISTED]]
    rule = f"dose_mg differs from dose_mg_m2 × bsa_m2 by more than {DOSE_TOLERANCE:.0%}"
    return [table.problem("dose_mg", off, f"{rule}: " + listed(detail, sep="; ", total=int(off.sum())),
                          shareable=rule)]


def bsa_inconsistent_with_mosteller(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """bsa_m2 should match Mosteller within ``BSA_TOLERANCE`` (a warning: sites may use another formula)."""
    expected = mosteller_bsa_m2(episodes["height_cm"], episodes["weight_kg"])
    given = episodes["bsa_m2"]
    off = (given - expected).abs() > BSA_TOLERANCE * expected
    if not off.any():
        return []
    detail = [f"row {r}: {given[r]:g} m², Mosteller gives {expected[r]:.2f} m²"
              for r in off.index[off][:MAX_LISTED]]
    rule = f"bsa_m2 differs from Mosteller sqrt(height_cm · weight_kg / 3600) by more than {BSA_TOLERANCE:.0%}"
    return [table.problem("bsa_m2", off, f"{rule}: " + listed(detail, sep="; ", total=int(off.sum())),
                          severity="warning", shareable=rule)]


def patient_sex_inconsistent(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """A patient's sex is the same in all their episodes (an error: see the module docstring)."""
    known = episodes[["patient_id", "sex"]].dropna()
    counts = known.groupby("patient_id", sort=False)["sex"].nunique()
    patients = counts.index[counts > 1]
    if patients.empty:
        return []

    def detail(rows: pd.DataFrame) -> str:
        by_sex = rows.groupby("sex", sort=False).groups
        return " and ".join(f"{sex} in {_plural_rows(list(at))}" for sex, at in by_sex.items())

    return [_patients_problem(table, known, patients, "sex", detail, "error",
                              "a patient's sex must be the same in all of their episodes")]


def patient_age_inconsistent(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """A patient's age follows start_day: their age at day 0 agrees within ``AGE_TOLERANCE_YEARS``.

    This also catches an age that goes down while start_day goes up (the 70 → 19 of a mixed-up record).
    """
    known = episodes[["patient_id", "age_years", "start_day"]].dropna()
    known = known.assign(_age_at_day_0=known["age_years"] - known["start_day"] / DAYS_PER_YEAR)
    ages = known.groupby("patient_id", sort=False)["_age_at_day_0"]
    spread = ages.max() - ages.min()
    patients = spread.index[spread > AGE_TOLERANCE_YEARS]
    if patients.empty:
        return []

    def detail(rows: pd.DataFrame) -> str:
        low, high = rows["_age_at_day_0"].idxmin(), rows["_age_at_day_0"].idxmax()
        first, last = sorted((low, high), key=lambda r: (rows.at[r, "start_day"], r))
        return " but ".join(f"age {rows.at[r, 'age_years']:g} on day {rows.at[r, 'start_day']:g} (row {r})"
                            for r in (first, last))

    return [_patients_problem(table, known, patients, "age_years", detail, "error",
                              f"a patient's age must follow start_day (age_years − start_day / 365.25 the same "
                              f"within {AGE_TOLERANCE_YEARS:g} years)")]


def patient_height_inconsistent(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """A patient's height agrees within ``HEIGHT_TOLERANCE_CM`` over their episodes (a warning)."""
    known = episodes[["patient_id", "height_cm"]].dropna()
    heights = known.groupby("patient_id", sort=False)["height_cm"]
    spread = heights.max() - heights.min()
    patients = spread.index[spread > HEIGHT_TOLERANCE_CM]
    if patients.empty:
        return []

    def detail(rows: pd.DataFrame) -> str:
        low, high = rows["height_cm"].idxmin(), rows["height_cm"].idxmax()
        return f"{rows.at[low, 'height_cm']:g} cm (row {low}) to {rows.at[high, 'height_cm']:g} cm (row {high})"

    return [_patients_problem(table, known, patients, "height_cm", detail, "warning",
                              f"a patient's height_cm should agree within {HEIGHT_TOLERANCE_CM:g} cm over "
                              f"their episodes")]


def _patients_problem(table: CsvTable, known: pd.DataFrame, patients: pd.Index, column: str,
                      detail: Callable[[pd.DataFrame], str], severity: Severity, rule: str) -> Problem:
    """One problem for every row of the given patients: per patient, the values at the site, the rows shared."""
    rows = known["patient_id"].isin(patients)
    shown = known[known["patient_id"].isin(patients[:MAX_LISTED])].groupby("patient_id", sort=False)
    full = [f"{echo(pid)!r}: {detail(group)}" for pid, group in shown]
    shared = [f"one patient in {_plural_rows(list(group.index))}" for _, group in shown]
    return table.problem(column, rows, f"{rule}; " + listed(full, sep="; ", total=len(patients)), severity,
                         shareable=f"{rule}; " + listed(shared, sep="; ", total=len(patients)))


def _plural_rows(rows: list[int]) -> str:
    return f"row{'' if len(rows) == 1 else 's'} {listed(rows)}"


def episode_cross_checks(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
    """Cross-column checks, each run only when its columns are present."""
    checks = (
        (("episode_id",), duplicate_episode_ids),
        (("dose_mg", "dose_mg_m2", "bsa_m2"), dose_inconsistent_with_bsa),
        (("bsa_m2", "height_cm", "weight_kg"), bsa_inconsistent_with_mosteller),
        (("patient_id", "sex"), patient_sex_inconsistent),
        (("patient_id", "age_years", "start_day"), patient_age_inconsistent),
        (("patient_id", "height_cm"), patient_height_inconsistent),
    )
    problems = []
    for needed, check in checks:
        if all(c in episodes for c in needed):
            problems += check(table, episodes)
    return problems
