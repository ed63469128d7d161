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
    findings = (("probability", (total - 1.0).abs() > SUM_TOLERANCE, "the options of each decision (patient_id, "
                 "cycle) to sum to 1", "sum to", total, "{:.6g}"),
                ("chosen", chosen != 1, "exactly one chosen option (1) per decision (patient_id, cycle)", "have",
                 chosen, "{:.0f}"))
    problems = []
    for column, bad, expected, verb, values, number in findings:
        if bad.any():
            n = int(frame[bad].groupby(list(KEY)).ngroups)
            low, high = number.format(values[bad].min()), number.format(values[bad].max())
            problems.append(table.problem(column, bad, f"expected {expected}; {n} decision{'' if n == 1 else 's'} "
                                                       f"{verb} {low if low == high else f'{low}–{high}'}"))
    return problems
