"""Cross-checks between the columns of episodes.csv: unique episode ids, dose against BSA, BSA against Mosteller."""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.validation.problems import MAX_LISTED, Problem, echo, listed
from shared.validation.reading import CsvTable

DOSE_TOLERANCE = 0.05
"""Allowed relative gap between dose_mg and dose_mg_m2 × bsa_m2 (rounding, not a wrong dose)."""

BSA_TOLERANCE = 0.10
"""Allowed relative gap between bsa_m2 and the Mosteller formula (other BSA formulas differ by a few %)."""


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
    detail = [f"row {r}: {given[r]:g} m², Mosteller gives {expected[r]:.2f} m²"
              for r in off.index[off][:MAX_LISTED]]
    rule = f"bsa_m2 differs from Mosteller sqrt(height_cm · weight_kg / 3600) by more than {BSA_TOLERANCE:.0%}"
    return [table.problem("bsa_m2", off, f"{rule}: " + listed(detail, sep="; ", total=int(off.sum())),
                          severity="warning", shareable=rule)]


def episode_cross_checks(table: CsvTable, episodes: pd.DataFrame) -> list[Problem]:
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
