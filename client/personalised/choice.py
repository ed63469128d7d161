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
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

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


ALPHA = 0.05
"""Family-wise level of the one-sided test that moves a site off the global model (:func:`choose_by_margin`)."""


def one_sided_z(alternatives: int) -> float:
    """z of the one-sided Bonferroni test at :data:`ALPHA` over ``alternatives`` comparisons with the default:
    ``Φ⁻¹(1 − α/m)`` (2.24 for the four alternatives of global + three methods + local)."""
    return NormalDist().inv_cdf(1 - ALPHA / max(alternatives, 1))


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


def choose_by_margin(scores: Mapping[str, float], difference_sd: Mapping[str, float],
                     order: Sequence[str]) -> tuple[str, str]:
    """Keep the default (``order[0]``) unless a candidate beats it on validation by more than
    the noise of the comparison: a one-sided test per alternative, Bonferroni over them (:func:`one_sided_z`).

    ``difference_sd[c]`` is the standard deviation of ``score[c] − score[default]`` under the validation split's
    sampling and, at a DP site, the release's Gaussian noise. A candidate passes when its gain exceeds
    ``z · difference_sd[c]``; among those that pass, the largest lower bound ``gain − z·sd`` wins (``order`` breaks
    ties). Choosing the best raw score instead (:func:`choose`) picks whichever candidate the noise favoured: with
    five candidates, a noise sd of 0.1 and no true difference the expected maximum is ≈ 0.12 above the rest
    (Blom's approximation), so an untrained local model wins whenever the noise says so. The test is the standard
    guard against that winner's curse in model selection (Cawley & Talbot, JMLR 2010;11:2079, on selection bias
    from a noisy validation estimate; Hanley & McNeil 1983, Radiology 148:839, for the SE of a difference of
    AUCs); it only loses to the best candidate by a gain the split could not tell from noise.

    Every input is computed from what the site releases (or, without DP, from its own exact rows, which a site
    without DP may use), so under DP the choice stays post-processing of the validation release.

    Example
    -------
    >>> choose_by_margin({"global": 0.70, "ditto": 0.74, "local": 0.90}, {"ditto": 0.01, "local": 0.2},
    ...                  ("global", "ditto", "local"))[0]
    'ditto'
    """
    default = order[0]
    if not math.isfinite(scores.get(default, math.nan)):
        return choose(scores, order)
    z = one_sided_z(len(order) - 1)
    bounds = {}
    for name in order[1:]:
        gain, sd = scores.get(name, math.nan) - scores[default], difference_sd.get(name, math.nan)
        if math.isfinite(gain) and math.isfinite(sd) and gain - z * sd > TIE_MARGIN:
            bounds[name] = gain - z * sd
    tests = ", ".join(f"{name} {scores.get(name, math.nan) - scores[default]:+.3f} vs "
                      f"{z * difference_sd.get(name, math.nan):.3f}" for name in order[1:])
    if not bounds:
        return default, (f"kept {default} (validation score {scores[default]:.3f}): no candidate beat it by more "
                         f"than z·sd at z = {z:.2f} (gain, margin: {tests})")
    chosen = max(bounds, key=lambda name: (bounds[name], -order.index(name)))
    return chosen, (f"{chosen} beat {default} ({scores[default]:.3f}) on validation by "
                    f"{scores[chosen] - scores[default]:.3f}, more than z·sd at z = {z:.2f} (gain, margin: {tests})")
