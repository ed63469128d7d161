"""Permutation feature importance computed at a site, as sums that add up across sites.

Permutation importance (Breiman, Machine Learning 2001;45:5; Fisher, Rudin & Dominici, JMLR 2019) of a
feature is how much a model's loss grows when that feature's values are shuffled among the rows. At a site
the shuffling happens among its own test rows; the site returns, per outcome, the summed loss before and
after shuffling each feature, and the row count. The server adds the sums of all sites, so the federated
importance is the mean loss increase over the union of the test sets, and no row leaves a site.

A feature is an *original* column: a numeric feature with its missing-value indicator, or all one-hot
columns of a categorical feature, are shuffled together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from client.training import EncodedSplit
from shared.encoding import FeatureEncoder

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]
EPS = 1e-7


def feature_groups(encoder: FeatureEncoder) -> dict[str, list[int]]:
    """Encoded column indices of each original feature."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(encoder.feature_names_out_):
        feature = name.split("__", 1)[0]
        groups.setdefault(feature, []).append(index)
    return groups


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
    keys = [f"{o.name}/{part}" for o in encoder.task.outcomes for part in ("n", "base", *feature_groups(encoder))]
    if len(data) == 0:  # every site answers with the same keys, so the sums add up
        return dict.fromkeys(keys, 0.0)
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


def importance_from_sums(encoder: FeatureEncoder, sums: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean loss increase per outcome and feature from (summed) site sums, largest first."""
    result = {}
    for outcome in encoder.task.outcomes:
        n = sums.get(f"{outcome.name}/n", 0.0)
        if n == 0:
            continue
        base = sums[f"{outcome.name}/base"]
        values = {feature: (sums[f"{outcome.name}/{feature}"] - base) / n for feature in feature_groups(encoder)
                  if f"{outcome.name}/{feature}" in sums}
        result[outcome.name] = dict(sorted(values.items(), key=lambda kv: -kv[1]))
    return result
