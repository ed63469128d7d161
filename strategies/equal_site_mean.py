"""A wrapper that makes a mean-aggregating Flower strategy average the sites' updates with equal weight over a
fixed number of sites: the quantity central DP noises.

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018
(https://arxiv.org/abs/1710.06963), bound one user's influence on the average by weighting users equally (capped
weights) and dividing by a fixed, public number of users (their "fixed-denominator estimator"): a site's clipped
update of norm ≤ C then moves the average by at most C / n, whoever else took part, and Gaussian noise of sd
σ·C / n makes the average (ε, δ)-DP for the whole site. FedAvg weights by each site's row count and divides by the
replies' sum, so one site's influence depends on its size and on the others'. This wrapper gives every answering
site the weight 1 and scales each update by (sites that answered) / n before the wrapped strategy averages, so the
average is global + Σ updates / n with n fixed: a site lost in a round contributes a zero update, and a round in which
no site sent one returns the global model, which the DP wrapper noises like any other round's.

Put it between a clipping DP wrapper and the strategy, since the scaling must follow the clipping
(:func:`strategies.central_dp.central_dp_strategy`). Only strategies whose aggregate is FedAvg's weighted mean
(FedAvg, FedProx) are meant: for them the result is exactly the fixed-denominator mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy


class EqualSiteMean(Strategy):
    """Average with weight 1 per site and the fixed denominator ``n_sites``, through ``strategy``'s own mean.

    Implementation of the fixed-denominator estimator of McMahan et al. 2018 (https://arxiv.org/abs/1710.06963)
    on top of Flower's FedAvg aggregation.

    Parameters
    ----------
    strategy : FedAvg
        FedAvg or a strategy with FedAvg's aggregation (FedProx).
    n_sites : int
        The fixed denominator: the sites sent training each round (public; > 0).
    arrayrecord_key : str (default: "arrays")
        Key of the ArrayRecord in the training replies.

    Attributes
    ----------
    answered : dict of int to int
        Per round, the sites whose update was averaged.
    """

    def __init__(self, strategy: FedAvg, n_sites: int, arrayrecord_key: str = "arrays") -> None:
        if not isinstance(strategy, FedAvg):
            raise ValueError(f"EqualSiteMean averages through FedAvg's mean; got {type(strategy).__name__}")
        if n_sites < 1:
            raise ValueError(f"n_sites: the fixed denominator must be at least 1; got {n_sites}")
        self.strategy = strategy
        self.n_sites = int(n_sites)
        self.arrayrecord_key = arrayrecord_key
        self.answered: dict[int, int] = {}
        self._global: dict[str, np.ndarray] = {}
        self._sent: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {k: a.numpy() for k, a in arrays.items()}
        self._global = {k: np.asarray(v, dtype=np.float64) for k, v in self._sent.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error() and self.arrayrecord_key in r.content]
        if len(replies) > self.n_sites:
            raise ValueError(f"round {server_round}: {len(replies)} updates for a fixed denominator of "
                             f"{self.n_sites} sites (each site counts once)")
        self.answered[server_round] = len(replies)
        if not replies:  # the mean of no update is the global model: still released (and noised) as in any round,
            return ArrayRecord({k: Array(v) for k, v in self._sent.items()}), None  # so silence is not revealed
        scale = len(replies) / self.n_sites
        weight_key = self.strategy.weighted_by_key
        for reply in replies:
            local = reply.content[self.arrayrecord_key]
            reply.content[self.arrayrecord_key] = ArrayRecord({
                k: Array((g + scale * (np.asarray(local[k].numpy(), dtype=np.float64) - g))
                         .astype(local[k].numpy().dtype)) for k, g in self._global.items()})
            for name, record in list(reply.content.metric_records.items()):
                if weight_key in record:
                    reply.content[name] = MetricRecord({**dict(record), weight_key: 1})
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
