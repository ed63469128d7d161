"""A site's choice among its local-only model, the global model and its personalised models.

The site scores every candidate on its own validation split — the mean over the task's outcomes of each
outcome's headline metric (AUC for a binary or multiclass outcome, R² for a regression one, floored at 0: no
better than predicting the mean; both 1 at best, so their mean ranks candidates on every outcome at once, and
one hopeless regression fit cannot outweigh the other outcomes) — and keeps the best. A tie (within
:data:`TIE_MARGIN`) goes to the earlier candidate in the plan's order (global, the methods, local): the model
shared by more data wins when the site's own rows cannot tell them apart. Under DP the scores come from the
site's noised validation release, so the choice is post-processing of a DP release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from shared import metrics
from shared.task import TaskSpec

HEADLINE = {"binary": "auc", "multiclass": "auc", "regression": "r2"}
"""The metric of each outcome kind a site chooses by."""
R2_FLOOR = 0.0
"""R² below this counts as this (a model worse than the mean is as useless as the mean; noised sums at a DP site
can make R² arbitrarily negative)."""

TIE_MARGIN = 1e-9
"""Scores closer than this are a tie (float noise only: a small validation split's own noise is the site's to
judge, the rule does not guess it)."""


def validation_score(task: TaskSpec, summaries: Mapping[str, Mapping]) -> float:
    """Mean of the outcomes' headline metrics (:data:`HEADLINE`, R² floored at :data:`R2_FLOOR`) from one
    candidate's validation summaries; NaN if no outcome has one (e.g. a split with one class only)."""
    values = []
    for outcome in task.outcomes:
        value = metrics.metrics(outcome.kind, summaries[outcome.name])[HEADLINE[outcome.kind]]
        if math.isfinite(value):
            values.append(max(value, R2_FLOOR) if outcome.kind == "regression" else value)
    return sum(values) / len(values) if values else math.nan


def choose(scores: Mapping[str, float], order: Sequence[str]) -> tuple[str, str]:
    """The best-scoring candidate (``order`` breaks ties and ranks NaN last) and the reason in words.

    Example
    -------
    >>> choose({"global": 0.70, "ditto": 0.74, "local": 0.66}, ("global", "ditto", "local"))
    ('ditto', 'best validation score 0.740 (global 0.700, local 0.660)')
    """
    finite = {name: scores[name] for name in order if math.isfinite(scores.get(name, math.nan))}
    if not finite:
        return order[0], f"no candidate has a validation score (too few rows or one class only): kept {order[0]}"
    best = max(finite.values())
    chosen = next(name for name in order if name in finite and finite[name] >= best - TIE_MARGIN)
    others = ", ".join(f"{name} {scores[name]:.3f}" if math.isfinite(scores.get(name, math.nan)) else f"{name} n/a"
                       for name in order if name != chosen and name in scores)
    return chosen, f"best validation score {finite[chosen]:.3f} ({others})"
