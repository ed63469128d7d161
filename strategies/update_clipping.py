"""A wrapper that bounds the L2 norm of each site's model update before any Flower strategy aggregates it.

Norm bounding as a defence against model poisoning: Sun et al., "Can you really backdoor federated
learning?", 2019 (https://arxiv.org/abs/1911.07963). A site's update is its trained weights minus the global
weights the round sent it; an update longer than ``max_norm`` is scaled down to ``max_norm``, keeping its
direction. A site that scales its update up (a "boosted" or model-replacement attack) then moves the global
model no further than an honest site may. It does not stop a site whose update stays within the bound (a
sign-flipped honest update, or poisoned labels), and it covers the model weights only: statistics, analytics,
histogram and evaluation sums are untouched (see :mod:`strategies.robust`).

Like Flower's ``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``, it wraps any strategy and leaves
every decision to it; it changes only the arrays of the training replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


def update_norm(global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``local − global`` over every array (the update as one flat vector)."""
    return float(np.sqrt(sum(np.sum((np.asarray(local_arrays[k], dtype=np.float64) - g) ** 2)
                             for k, g in global_arrays.items())))


def clip_update(global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray],
                max_norm: float) -> dict[str, np.ndarray]:
    """``local_arrays`` with their update from ``global_arrays`` scaled to at most ``max_norm`` (L2, all arrays
    as one vector): ``global + update · min(1, max_norm / ‖update‖)``; arrays keep their dtypes."""
    norm = update_norm(global_arrays, local_arrays)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (g + scale * (np.asarray(local_arrays[k], dtype=np.float64) - g)).astype(local_arrays[k].dtype)
            for k, g in global_arrays.items()}


class UpdateNormClipping(Strategy):
    """Clip each site's model update to ``max_norm`` (L2), then let ``strategy`` aggregate as usual.

    Implementation of the norm bound of Sun et al. 2019 (https://arxiv.org/abs/1911.07963), on top of any
    Flower strategy.

    Parameters
    ----------
    strategy : Strategy
        The strategy that samples sites and aggregates (FedAvg, Krum, FedMedian, ...).
    max_norm : float
        The largest L2 norm of a site's update (its weights minus the round's global weights), > 0.
    arrayrecord_key : str (default: "arrays")
        Key of the ArrayRecord in the training replies (Flower's default).

    Attributes
    ----------
    norms : dict of int to list of float
        Per round, the update norms the sites sent, before clipping (to see how often the bound bites).
    """

    def __init__(self, strategy: Strategy, max_norm: float, arrayrecord_key: str = "arrays") -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm: the update norm bound must be positive; got {max_norm}")
        self.strategy = strategy
        self.max_norm = float(max_norm)
        self.arrayrecord_key = arrayrecord_key
        self.norms: dict[int, list[float]] = {}
        self._global: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: np.asarray(a.numpy(), dtype=np.float64) for k, a in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        norms = self.norms.setdefault(server_round, [])
        for reply in replies:
            if reply.has_error() or self.arrayrecord_key not in reply.content:
                continue
            local = {k: a.numpy() for k, a in reply.content[self.arrayrecord_key].items()}
            norms.append(update_norm(self._global, local))
            clipped = clip_update(self._global, local, self.max_norm)
            reply.content[self.arrayrecord_key] = ArrayRecord({k: Array(v) for k, v in clipped.items()})
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
