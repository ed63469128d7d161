"""Feasible evaluation summaries: a site's lies about how well a model does bounded by the summaries' own arithmetic.

Every site sends its evaluation summaries in the clear (``shared.metrics``: score histograms, confusion counts,
error sums per outcome), and the run record adds them into the overall metrics (``server.run_record``). What an
honest site's exact summary satisfies (``shared.metrics.summarise_binary`` / ``_multiclass`` / ``_regression``),
with N its declared row count (site check):

- binary, B score bins on the logit clipped to ±``LOGIT_CLIP``: counts ≥ 0; ``n ≤ N``; ``Σ hist_pos + Σ hist_neg
  = n``; ``tp + fn = Σ hist_pos``, ``fp + tn = Σ hist_neg``; for even B (a bin edge at logit 0, p = 0.5 =
  ``THRESHOLD``) ``tp`` and ``fp`` are exactly the upper half's positives and negatives; a row of bin b has p in
  ``[expit(e_b), expit(e_{b+1})]`` (0 and 1 at the clipped ends), so ``Σ|p − y|`` and ``Σ(p − y)²`` lie between
  the histograms' interval sums (``1 − p`` for a positive, ``p`` for a negative), and ``Σ(p − y)² ≥ (Σ|p − y|)² /
  n`` (Cauchy–Schwarz);
- multiclass, K classes: counts ≥ 0; ``n ≤ N``; the confusion adds to n; per class c, ``Σ hist_pos[c] + Σ
  hist_neg[c] = n`` and ``Σ hist_pos[c]`` is the confusion's row c (the rows of class c);
- regression on the declared range [lo, hi]: ``n ≤ N``; ``n · lo ≤ Σy ≤ n · hi``; ``(Σy)² / n ≤ Σy² ≤ n ·
  max(lo², hi²)``; ``Σ|err| ≥ |Σerr|``; ``Σerr² ≥ (Σ|err|)² / n`` (the prediction is the model's: no upper limit).

Why this catches lies: with 2,000 bins the error sums are pinned to the histograms within a bin's width (0.012
in logit), so a site inflating its error sums, or swapping its positives and negatives (``--attack SITE:lie``:
histograms and confusion swapped, error sums as computed) breaks them.

A DP site's summaries are noised, rounded and floored (``client.evaluation``) and its site check declares no row
count: they are not checked (what remains unprotected). The check, and its refusal naming outcome, entry and bound
(never a value), are ``shared.sum_bounds.check_bounds``; ``server.run_record`` leaves an infeasible site out of the
overall metrics and names it (``infeasible``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.special import expit

from shared import metrics
from shared.bounds import declared_range
from shared.sum_bounds import RELATIVE_TOLERANCE, Bound, Contributors, check_bounds
from shared.task import TaskSpec


def _equal(entry: str, value: float, text: str) -> Bound:
    return Bound(entry, np.array([float(value)]), 0.0, 0.0, 0.0, text)


def _at_least(entry: str, value: float, floor: float, text: str) -> Bound:
    return Bound(entry, np.array([float(value) - floor]), -RELATIVE_TOLERANCE * (abs(floor) + 1.0), np.inf, 0.0, text)


def _bin_probabilities(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per score bin the smallest and largest probability a row in it can have."""
    edges = np.linspace(-metrics.LOGIT_CLIP, metrics.LOGIT_CLIP, n_bins + 1)
    low, high = expit(edges[:-1]), expit(edges[1:])
    low[0], high[-1] = 0.0, 1.0  # the clipped ends hold every score beyond them
    return low, high


def binary_bounds(name: str, s: Mapping, declared: float) -> list[Bound]:
    pos, neg = np.asarray(s["hist_pos"], dtype=float), np.asarray(s["hist_neg"], dtype=float)
    n = float(s["n"])
    counts = np.concatenate([pos, neg, [s["tp"], s["fp"], s["tn"], s["fn"], n]]).astype(float)
    out = [Bound(f"{name!r} counts", counts, 0.0, np.inf, 0.0, "every count ≥ 0"),
           Bound(f"{name!r} row count", np.array([n]), 0.0, declared, 0.0,
                 "n ≤ the site's declared row count (site check)"),
           _equal(f"{name!r} histograms", pos.sum() + neg.sum() - n, "Σ hist_pos + Σ hist_neg = n"),
           _equal(f"{name!r} confusion counts", s["tp"] + s["fn"] - pos.sum(), "tp + fn = Σ hist_pos"),
           _equal(f"{name!r} confusion counts", s["fp"] + s["tn"] - neg.sum(), "fp + tn = Σ hist_neg")]
    bins = len(pos)
    if bins % 2 == 0:
        out += [_equal(f"{name!r} confusion counts", s["tp"] - pos[bins // 2:].sum(),
                       "tp = the positives of the bins above logit 0 (p ≥ 0.5)"),
                _equal(f"{name!r} confusion counts", s["fp"] - neg[bins // 2:].sum(),
                       "fp = the negatives of the bins above logit 0 (p ≥ 0.5)")]
    low, high = _bin_probabilities(bins)
    abs_low, abs_high = pos @ (1 - high) + neg @ low, pos @ (1 - low) + neg @ high
    sq_low, sq_high = pos @ (1 - high) ** 2 + neg @ low ** 2, pos @ (1 - low) ** 2 + neg @ high ** 2
    slack = RELATIVE_TOLERANCE * max(n, 1.0)
    out += [Bound(f"{name!r} sum of |error|", np.array([float(s["sum_abs_err"])]), abs_low - slack, abs_high + slack,
                  0.0, "Σ|p − y| within the score histograms' bin ranges (1 − p a positive, p a negative)"),
            Bound(f"{name!r} sum of squared errors", np.array([float(s["sum_sq_err"])]), sq_low - slack,
                  sq_high + slack, 0.0, "Σ(p − y)² within the score histograms' bin ranges")]
    if n > 0:
        out.append(_at_least(f"{name!r} sum of squared errors", s["sum_sq_err"], float(s["sum_abs_err"]) ** 2 / n,
                             "Σ(p − y)² ≥ (Σ|p − y|)² / n (Cauchy–Schwarz)"))
    return out


def multiclass_bounds(name: str, s: Mapping, declared: float) -> list[Bound]:
    confusion = np.asarray(s["confusion"], dtype=float)
    k = int(round(np.sqrt(confusion.size)))
    confusion = confusion.reshape(k, k)
    pos = np.asarray(s["hist_pos"], dtype=float).reshape(k, -1)
    neg = np.asarray(s["hist_neg"], dtype=float).reshape(k, -1)
    n = float(s["n"])
    counts = np.concatenate([pos.ravel(), neg.ravel(), confusion.ravel(), [n]])
    return [Bound(f"{name!r} counts", counts, 0.0, np.inf, 0.0, "every count ≥ 0"),
            Bound(f"{name!r} row count", np.array([n]), 0.0, declared, 0.0,
                  "n ≤ the site's declared row count (site check)"),
            _equal(f"{name!r} confusion counts", confusion.sum() - n, "the confusion matrix adds to n"),
            Bound(f"{name!r} histograms", pos.sum(axis=1) + neg.sum(axis=1) - n, 0.0, 0.0, 0.0,
                  "every class's Σ hist_pos + Σ hist_neg = n"),
            Bound(f"{name!r} histograms", pos.sum(axis=1) - confusion.sum(axis=1), 0.0, 0.0, 0.0,
                  "every class's Σ hist_pos = its confusion row (the rows of the class)")]


def regression_bounds(name: str, s: Mapping, declared: float, bounds: tuple[float, float] | None) -> list[Bound]:
    n = float(s["n"])
    out = [Bound(f"{name!r} row count", np.array([n]), 0.0, declared, 0.0,
                 "0 ≤ n ≤ the site's declared row count (site check)"),
           _at_least(f"{name!r} sum of |error|", s["sum_abs_err"], abs(float(s["sum_err"])), "Σ|err| ≥ |Σ err|")]
    if n > 0:
        out += [_at_least(f"{name!r} sum of squared errors", s["sum_sq_err"], float(s["sum_abs_err"]) ** 2 / n,
                          "Σ err² ≥ (Σ|err|)² / n (Cauchy–Schwarz)"),
                _at_least(f"{name!r} sum of squares", s["sum_y2"], float(s["sum_y"]) ** 2 / n,
                          "Σy² ≥ (Σy)² / n (Cauchy–Schwarz)")]
    if bounds is not None:
        lo, hi = bounds
        top = max(lo * lo, hi * hi)
        out += [Bound(f"{name!r} sum", np.array([float(s["sum_y"])]), n * lo - RELATIVE_TOLERANCE * abs(n * lo),
                      n * hi + RELATIVE_TOLERANCE * abs(n * hi), 0.0, f"n · {lo:g} ≤ Σy ≤ n · {hi:g} (declared range)"),
                Bound(f"{name!r} sum of squares", np.array([float(s["sum_y2"])]), -np.inf,
                      n * top * (1 + RELATIVE_TOLERANCE), 0.0, f"Σy² ≤ n · {top:g} (declared range)")]
    return out


def evaluation_bounds(task: TaskSpec, record: Mapping, declared: float) -> list[Bound]:
    """The constraints of one site's evaluation record (every outcome's summary; module docstring)."""
    out = []
    for outcome in task.outcomes:
        try:
            summary = metrics.from_metric_record(record, prefix=outcome.name)
        except KeyError:
            continue  # the site recorded none of this outcome
        if outcome.kind == "binary":
            out += binary_bounds(outcome.name, summary, declared)
        elif outcome.kind == "multiclass":
            out += multiclass_bounds(outcome.name, summary, declared)
        else:
            out += regression_bounds(outcome.name, summary, declared, declared_range(task, outcome.name))
    return out


def check_evaluation(phase: str, task: TaskSpec, record: Mapping, declared: float | None) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if one site's evaluation record breaks
    :func:`evaluation_bounds`; None if it is feasible, or if the site declared no row count (a DP site: its
    noised summaries are not checked)."""
    if declared is None:
        return
    check_bounds(phase, evaluation_bounds(task, record, declared), Contributors(1, declared))
