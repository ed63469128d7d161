"""Permutation importance from loss sums: the arithmetic both the sites and the server use.

A site returns, per outcome, its row count, its summed loss and its summed loss with each original feature
shuffled (:func:`client.importance.permutation_sums`); the server adds the sites' sums and turns them into
the mean loss increase per feature here (Breiman, Machine Learning 2001;45:5; Fisher, Rudin & Dominici,
JMLR 2019). A feature is an *original* column: a numeric feature with its missing-value indicator, or all
one-hot columns of a categorical feature, are shuffled together.

Every site returns the same keys (:func:`sum_keys`), so the sums add up, in the clear or as the one masked
vector of :func:`sums_layout` (``server.importance_phase``'s secure sum).
"""

from __future__ import annotations

from shared.encoding import FeatureEncoder
from shared.sum_vector import SumsLayout

EPS = 1e-7
"""Probabilities are clipped to [EPS, 1 − EPS] before a log loss (``client.importance.row_losses``), so a row's
log loss is at most −log EPS (``shared.importance_bounds``)."""


def feature_groups(encoder: FeatureEncoder) -> dict[str, list[int]]:
    """Encoded column indices of each original feature."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(encoder.feature_names_out_):
        feature = name.split("__", 1)[0]
        groups.setdefault(feature, []).append(index)
    return groups


def sum_keys(encoder: FeatureEncoder) -> list[str]:
    """The keys of a site's sums, in order: per outcome ``{outcome}/n``, ``{outcome}/base`` and
    ``{outcome}/{feature}`` for each original feature."""
    return [f"{o.name}/{part}" for o in encoder.task.outcomes for part in ("n", "base", *feature_groups(encoder))]


def sums_layout(encoder: FeatureEncoder) -> SumsLayout:
    """A site's sums as one float vector (:func:`sum_keys`' order, one entry each) for the secure sum."""
    return SumsLayout.of(dict.fromkeys(sum_keys(encoder), ()))


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
