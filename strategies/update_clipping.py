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

:class:`MedianNormClipping` chooses the bound from the data instead of a guess: each round, a multiple of the
median of that round's update norms. It follows the idea of Andrew et al., "Differentially private learning with
adaptive clipping", NeurIPS 2021 (https://arxiv.org/abs/1905.03871): clip at a quantile of the norms seen, here
the median (0.5 quantile), taken exactly since nothing about the norms is released. The median of n norms is
set by honest sites while fewer than n/2 sites are malicious, so an attacker cannot raise its own bound.
"""

from __future__ import annotations

import math
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
    norms : dict of int to dict of int to float
        Per round, each site's (node id's) update norm before clipping (to see how often the bound bites).
    bounds : dict of int to float
        Per round, the bound applied.
    """

    def __init__(self, strategy: Strategy, max_norm: float, arrayrecord_key: str = "arrays") -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm: the update norm bound must be positive; got {max_norm}")
        self.strategy = strategy
        self.max_norm = float(max_norm)
        self.arrayrecord_key = arrayrecord_key
        self.norms: dict[int, dict[int, float]] = {}
        self.bounds: dict[int, float] = {}
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
        updates = [r for r in replies if not r.has_error() and self.arrayrecord_key in r.content]
        locals_ = [{k: a.numpy() for k, a in r.content[self.arrayrecord_key].items()} for r in updates]
        norms = [update_norm(self._global, local) for local in locals_]
        self.norms[server_round] = {r.metadata.src_node_id: n for r, n in zip(updates, norms, strict=True)}
        bound = self.bounds[server_round] = self.bound(norms)
        for reply, local in zip(updates, locals_, strict=True):
            clipped = clip_update(self._global, local, bound)
            reply.content[self.arrayrecord_key] = ArrayRecord({k: Array(v) for k, v in clipped.items()})
        return self.strategy.aggregate_train(server_round, replies)

    def bound(self, norms: list[float]) -> float:
        """The bound of a round whose sites sent updates of these ``norms``: the fixed ``max_norm``."""
        return self.max_norm

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


class MedianNormClipping(UpdateNormClipping):
    """Clip each site's update to ``factor`` × the median of the round's update norms, then let ``strategy``
    aggregate as usual.

    The bound follows the norms seen, in the manner of the quantile-based adaptive clipping of Andrew et al.
    2021 (https://arxiv.org/abs/1905.03871), without its private quantile estimate: the server sees the norms.

    Parameters
    ----------
    strategy : Strategy
        The strategy that samples sites and aggregates (FedAvg, Krum, FedMedian, ...).
    factor : float
        The bound as a multiple of the median update norm of the round, > 0 (1: half the sites are clipped).
    arrayrecord_key : str (default: "arrays")
        Key of the ArrayRecord in the training replies (Flower's default).

    Attributes
    ----------
    norms, bounds : as :class:`UpdateNormClipping`; ``bounds`` holds the bound each round chose.
    """

    def __init__(self, strategy: Strategy, factor: float, arrayrecord_key: str = "arrays") -> None:
        if not factor > 0:
            raise ValueError(f"factor: the multiple of the median update norm must be positive; got {factor}")
        super().__init__(strategy, max_norm=math.inf, arrayrecord_key=arrayrecord_key)
        self.factor = float(factor)

    def bound(self, norms: list[float]) -> float:
        """``factor`` × the median of ``norms`` (no bound if no site sent an update, or all updates are 0)."""
        median = float(np.median(norms)) if norms else 0.0
        return self.factor * median if median > 0 else math.inf
