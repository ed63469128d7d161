"""Permutation feature importance computed at a site, as sums that add up across sites.

The sums become importances with :func:`shared.importance.importance_from_sums` (on the server, for the sum
over sites).

Permutation importance (Breiman, Machine Learning 2001;45:5; Fisher, Rudin & Dominici, JMLR 2019) of a
feature is how much a model's loss grows when that feature's values are shuffled among the rows. At a site
the shuffling happens among its own test rows; the site returns, per outcome, the summed loss before and
after shuffling each feature, and the row count, so no row leaves a site.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from client.split import EncodedSplit
from shared.encoding import FeatureEncoder
from shared.importance import EPS, feature_groups, sum_keys

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


def row_losses(encoder: FeatureEncoder, targets: dict[str, np.ndarray],
               predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row loss of each outcome where it is recorded: log loss for classes, squared error (standardised
    scale) for a regression outcome."""
    losses = {}
    for outcome in encoder.task.outcomes:
        y, p = targets[outcome.name], predictions[outcome.name]
        known = ~np.isnan(y)
        y, p = y[known], p[known]
        if outcome.kind == "binary":
            p = np.clip(p, EPS, 1 - EPS)
            losses[outcome.name] = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        elif outcome.kind == "multiclass":
            losses[outcome.name] = -np.log(np.clip(p[np.arange(len(y)), y.astype(int)], EPS, None))
        else:
            losses[outcome.name] = (p - y) ** 2
    return losses


def permutation_sums(predict: Predict, encoder: FeatureEncoder, data: EncodedSplit, seed: int) -> dict[str, float]:
    """``{outcome}/n``, ``{outcome}/base`` and ``{outcome}/{feature}`` loss sums at this site."""
    if len(data) == 0:  # every site answers with the same keys, so the sums add up
        return dict.fromkeys(sum_keys(encoder), 0.0)
    rng = np.random.default_rng(seed)
    base = row_losses(encoder, data.targets, predict(data.x))
    sums = {}
    for outcome, loss in base.items():
        sums[f"{outcome}/n"] = float(len(loss))
        sums[f"{outcome}/base"] = float(loss.sum())
    for feature, columns in feature_groups(encoder).items():
        shuffled = data.x.copy()
        shuffled[:, columns] = data.x[rng.permutation(len(data))][:, columns]
        permuted = row_losses(encoder, data.targets, predict(shuffled))
        for outcome, loss in permuted.items():
            sums[f"{outcome}/{feature}"] = float(loss.sum())
    return sums
