"""A site's choice among its local-only model, the global model and its personalised models.

The site scores every candidate on its own validation split — the mean over the task's outcomes of each
outcome's headline metric (AUC for a binary or multiclass outcome, R² for a regression one, floored at 0: no
better than predicting the mean; both 1 at best, so their mean ranks candidates on every outcome at once, and
one hopeless regression fit cannot outweigh the other outcomes). A site keeps its default (the fine-tuned global
model when fine-tuning is among the methods, else the global model; for the boosters the site trees:
``client.personalisation_handlers.ann_order`` / ``boosting_order``) unless another candidate beats it by more
than the comparison's noise (:func:`choose_by_margin`: a one-sided Bonferroni test,
margins from the split's sampling and, under DP, the release's own Gaussian noise); :func:`choose`, the best score
outright (ties, within :data:`TIE_MARGIN`, to the earlier candidate in the plan's order: global, the methods,
local), is what it falls back on when the global model has no score. Under DP the scores and margins come from the
site's noised validation release and its public σ, so the choice is post-processing of a DP release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shared import metrics
from shared.selection import ALPHA, TIE_MARGIN, choose, choose_by_margin, one_sided_z  # noqa: F401 (the site's rule)
from shared.task import TaskSpec

HEADLINE = {"binary": "auc", "multiclass": "auc", "regression": "r2"}
"""The metric of each outcome kind a site chooses by."""
R2_FLOOR = 0.0
"""R² below this counts as this (a model worse than the mean is as useless as the mean; noised sums at a DP site
can make R² arbitrarily negative)."""

def validation_score(task: TaskSpec, summaries: Mapping[str, Mapping]) -> float:
    """Mean of the outcomes' headline metrics (:data:`HEADLINE`, R² floored at :data:`R2_FLOOR`) from one
    candidate's validation summaries; NaN if no outcome has one (e.g. a split with one class only)."""
    values = []
    for outcome in task.outcomes:
        value = metrics.metrics(outcome.kind, summaries[outcome.name])[HEADLINE[outcome.kind]]
        if math.isfinite(value):
            values.append(max(value, R2_FLOOR) if outcome.kind == "regression" else value)
    return sum(values) / len(values) if values else math.nan


def auc_standard_error(auc: float, n_pos: float, n_neg: float) -> float:
    """Standard error of an AUC (Hanley & McNeil, Radiology 1982;143:29, eq. 2); NaN without both classes."""
    if not (n_pos >= 1 and n_neg >= 1 and math.isfinite(auc)):
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return math.sqrt(max(auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc), 0.0)
                     / (n_pos * n_neg))


def r2_standard_error(r2: float, n: float) -> float:
    """Standard error of a fixed model's R² = 1 − SSE/SST on ``n`` rows by the delta method (Casella & Berger,
    Statistical Inference, 2nd ed., 2002, §5.5.4): each sum of squares has a relative SD of ``sqrt(2/n)`` (a χ²ₙ
    under normal errors), so ``SE ≈ (1 − R²)·sqrt(2/n + 2/n)`` with their correlation taken as 0 (it is positive,
    so this over-states the SE); R² taken at :data:`R2_FLOOR` or above, as the score takes it."""
    if not (n >= 1 and math.isfinite(r2)):
        return math.nan
    return (1 - min(max(r2, R2_FLOOR), 1.0)) * math.sqrt(4 / n)


def sampling_se(task: TaskSpec, summaries: Mapping[str, Mapping]) -> float:
    """Sampling standard error of :func:`validation_score` from a candidate's (released) summaries alone: the mean
    over the scored outcomes of each headline metric's SE (:func:`auc_standard_error`, :func:`r2_standard_error`)
    — the SE of a mean of perfectly correlated metrics, so an upper bound whatever their correlation."""
    values = []
    for outcome in task.outcomes:
        summary = summaries[outcome.name]
        m = metrics.metrics(outcome.kind, summary)
        if not math.isfinite(m[HEADLINE[outcome.kind]]):
            continue
        if outcome.kind == "regression":
            values.append(r2_standard_error(m["r2"], m["n"]))
        else:
            # multiclass: K one-vs-rest histograms (K² confusion entries); the rarest class bounds the SE
            k = math.isqrt(len(summary["confusion"])) if outcome.kind == "multiclass" else 1
            pos = np.asarray(summary["hist_pos"], dtype=float).reshape(k, -1).sum(axis=1)
            neg = np.asarray(summary["hist_neg"], dtype=float).reshape(k, -1).sum(axis=1)
            rarest = int(np.argmin(pos))
            values.append(auc_standard_error(m["auc"], float(pos[rarest]), float(neg[rarest])))
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
