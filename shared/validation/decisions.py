"""Checks of decisions.csv within itself: each decision's options are a probability distribution with one draw.

A decision is the rows of one (patient_id, cycle). Its probabilities must sum to 1 (the service wrote every
option it could have recommended) and exactly one row must be ``chosen`` (what the draw recommended); an
off-policy estimate that trusts a log breaking either would divide by the wrong probability. A decision need
not have an episode in episodes.csv: the service logs when it recommends, the cycle is recorded once given.
"""

from __future__ import annotations

import pandas as pd

from shared.validation.problems import Problem
from shared.validation.reading import CsvTable

SUM_TOLERANCE = 1e-6
"""How far from 1 a decision's probabilities may sum (they are written with 9 significant digits)."""

KEY = ("patient_id", "cycle")


def decision_checks(table: CsvTable, decisions: pd.DataFrame) -> list[Problem]:
    """Problems of the decisions' shape, checked only when the key, probability and chosen were all read."""
    needed = (*KEY, "probability", "chosen")
    if table.dropped_rows or not all(c in decisions for c in needed) or decisions.empty:
        return []
    frame = decisions[list(needed)]
    if frame.isna().any().any():  # a missing cell is already an error of its column
        return []
    groups = frame.groupby(list(KEY), sort=False)
    total = groups["probability"].transform("sum").astype(float)
    chosen = groups["chosen"].transform(lambda c: (c.astype(float) == 1).sum())
    problems = []
    bad_sum = (total - 1.0).abs() > SUM_TOLERANCE
    if bad_sum.any():
        n = int(frame[bad_sum].groupby(list(KEY)).ngroups)
        problems.append(table.problem(
            "probability", bad_sum,
            f"expected the options of each decision (patient_id, cycle) to sum to 1; {n} decision"
            f"{'' if n == 1 else 's'} sum to {total[bad_sum].min():.6g}–{total[bad_sum].max():.6g}"))
    bad_draw = chosen != 1
    if bad_draw.any():
        n = int(frame[bad_draw].groupby(list(KEY)).ngroups)
        problems.append(table.problem(
            "chosen", bad_draw,
            f"expected exactly one chosen option (1) per decision (patient_id, cycle); {n} decision"
            f"{'' if n == 1 else 's'} have {int(chosen[bad_draw].min())}–{int(chosen[bad_draw].max())}"))
    return problems
