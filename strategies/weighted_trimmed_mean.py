"""A trimmed mean that still weighs sites by their rows: per coordinate, drop the extreme sites, then FedAvg the rest.

Flower's ``FedTrimmedAvg`` (Yin et al., ICML 2018, https://arxiv.org/abs/1803.01498) drops the ⌊βn⌋ largest and
smallest values of every coordinate and takes the plain mean of the others: every remaining site counts alike,
so on clinics as unequal as the simulator's (12 to 800 patients) a small clinic's noisy update weighs as much as
the largest clinic's, which costs accuracy without any attack (``benchmarks/robust_aggregation.py``). Here the
values that survive the trim are averaged with FedAvg's weights (the ``num-examples`` each site reports), as in
McMahan et al. 2017. Which values are trimmed does not depend on the weights, so a site cannot buy its way past
the trim by claiming rows; but a site that is not trimmed on a coordinate weighs there by the rows it claims,
so it relies on the sites' row counts more than ``FedTrimmedAvg`` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedTrimmedAvg


def row_weighted_trim_mean(values: np.ndarray, weights: np.ndarray, cut_fraction: float) -> np.ndarray:
    """Per coordinate of ``values`` (sites along axis 0), the ``weights``-weighted mean of the values left after
    dropping the ⌊``cut_fraction`` · n⌋ smallest and as many largest (ties broken by site order)."""
    if not 0.0 <= cut_fraction < 0.5:
        raise ValueError(f"cut_fraction: must be in [0, 0.5); got {cut_fraction}")
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    n = values.shape[0]
    cut = int(cut_fraction * n)
    kept = np.argsort(values, axis=0, kind="stable")[cut:n - cut]
    kept_weights = weights[kept]
    return (np.take_along_axis(values, kept, axis=0) * kept_weights).sum(axis=0) / kept_weights.sum(axis=0)


class RowWeightedTrimmedAvg(FedTrimmedAvg):
    """``FedTrimmedAvg`` whose untrimmed values are averaged with the sites' row weights (module docstring).

    Implementation based on https://arxiv.org/abs/1803.01498 (the trim) and https://arxiv.org/abs/1602.05629
    (the weights).

    Parameters
    ----------
    beta : float (default: 0.2)
        Fraction of the sites dropped at each end of every coordinate, in [0, 0.5).
    **kwargs
        As :class:`flwr.serverapp.strategy.FedTrimmedAvg`; ``weighted_by_key`` (default "num-examples") names the
        training metric that weighs a site.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        weights = np.array([float(next(iter(m.content.metric_records.values()))[self.weighted_by_key])
                            for m in valid])
        record_key = next(iter(valid[0].content.array_records))
        arrays = ArrayRecord()
        for key in valid[0].content[record_key]:
            layers = np.stack([m.content[record_key][key].numpy() for m in valid])
            arrays[key] = Array(row_weighted_trim_mean(layers, weights, self.beta).astype(layers.dtype))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
