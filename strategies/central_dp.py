"""Central differential privacy for the ANN: each site's whole update is clipped on the coordinator and the
average is noised, so the sequence of global models is (ε, δ)-DP at the level of a site (user-level DP).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018
(https://arxiv.org/abs/1710.06963): DP-FedAvg clips each user's update to C, averages over a fixed number of users
n and adds N(0, (z·C/n)²) per coordinate; Andrew et al., NeurIPS 2021 (https://arxiv.org/abs/1905.03871) adapt C
to a quantile of the update norms under the same guarantee. Flower 1.42 ships both as strategy wrappers; this module
builds the run's central-DP strategy from them:

    CentralDP(                                          # records what each round released (this module)
      DifferentialPrivacyServerSideFixedClipping(       # Flower's: clip each update to C, noise z·C/n
      | AdaptiveClipping(                               # Flower's adaptive, corrected (strategies.adaptive_clipping)
        EqualSiteMean(FedAvg | FedProx, n)))            # weight 1 per site, fixed denominator n

What it protects, and from whom: the coordinator is trusted (it sees each site's update, as in McMahan et al.);
anyone who sees the global models (every site each round, whoever receives the final model) learns about any one
site's data no more than (ε, δ) allows — adjacency: adding or removing one site's whole contribution. It covers the
ANN's weights only: the other phases of a run (statistics for the encoder, boosting, importance, policy sums) are
released as the sites' own DP choice says (``server.central_accounting`` lists them in the record).

Only a mean can be noised this way: ``fedadam`` / ``fedyogi`` run their optimiser on the mean inside the strategy
(the noise would land on the optimiser's output, whose sensitivity is not C/n), and the robust aggregators (Krum,
medians, trimmed means) are not means; update-norm clipping on top would be a second, non-private bound (the
median-based one reads every site's norm). Those combinations are refused (:func:`central_dp_problem`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from flwr.supercore.differential_privacy import compute_stdv

from strategies.adaptive_clipping import AdaptiveClipping
from strategies.equal_site_mean import EqualSiteMean

MECHANISMS = ("fixed", "adaptive")
MEAN_STRATEGIES = ("fedavg", "fedprox")
"""The strategies whose aggregate is FedAvg's mean, the only one central DP's noise is calibrated for."""
COUNT_SHARE = 0.1
"""Adaptive clipping: the share of each round's privacy loss (of 1/z², which adds up over Gaussian releases) spent on
the count of unclipped updates, so σ_b = z / (2·sqrt(share)) and z_Δ = z / sqrt(1 − share). Andrew et al.'s own
default, σ_b = n/20, assumes thousands of sites a round: with 10 it is 0.5, which caps z below 1 (Flower refuses
z ≥ 2σ_b) and makes the count as noisy as a coin. A fixed share keeps the count's noise proportional to z."""


@dataclass(frozen=True)
class CentralDPParameters:
    """The coordinator's central-DP choice for the ANN.

    Parameters
    ----------
    mechanism : str
        ``fixed`` (McMahan et al. 2018) or ``adaptive`` (Andrew et al. 2021).
    noise_multiplier : float
        z ≥ 0: the noise sd over the sensitivity C/n (adaptive: of the round's two releases together).
    clip : float
        C > 0: the fixed clipping norm, or the adaptive one's initial norm C_0.
    """

    mechanism: str
    noise_multiplier: float
    clip: float

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"central-dp: expected one of {', '.join(MECHANISMS)}; got {self.mechanism!r}")
        if not self.noise_multiplier >= 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"central-noise-multiplier: expected a number ≥ 0; got {self.noise_multiplier}")
        if not self.clip > 0 or not math.isfinite(self.clip):
            raise ValueError(f"central-clip: expected a clipping norm > 0; got {self.clip}")


def central_dp_problem(strategy: str, clip_norm: float = 0.0, clip_median_factor: float = 0.0) -> str | None:
    """Why central DP cannot wrap the run's ``strategy`` with these update-norm options, or None."""
    if strategy not in MEAN_STRATEGIES:
        return (f"central DP noises a mean of clipped updates (sd z·C/n): it runs with {' or '.join(MEAN_STRATEGIES)}, "
                f"not {strategy} (fedadam/fedyogi apply their optimiser to the mean inside the strategy; robust "
                "aggregators are not means)")
    if clip_norm > 0 or clip_median_factor > 0:
        return ("central DP clips every update to its own bound (--central-clip): drop --clip-norm / "
                "--clip-median-factor (the median-based bound reads every site's norm without noise)")
    return None


@dataclass
class CentralRound:
    """What one round released: the updates averaged, the bound they were clipped to, the noise added."""

    updates: int
    clip_norm: float
    noise_sd: float
    noise_multiplier: float
    """The round's accounted noise multiplier (adaptive: z of the update and count releases together)."""
    unclipped_fraction: float | None = None
    """Adaptive: the noisy fraction of updates left unclipped, b̃ (itself a DP release)."""


@dataclass
class CentralDPHistory:
    """Per round, what the central-DP strategy released (rounds that released nothing are absent)."""

    rounds: dict[int, CentralRound] = field(default_factory=dict)


class CentralDP(Strategy):
    """Central DP around a mean-aggregating strategy: Flower's fixed or (corrected) adaptive clipping wrapper over
    an :class:`strategies.equal_site_mean.EqualSiteMean`, and the record of what each round released.

    Implementation of DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963) and its adaptive-clipping
    variant (Andrew et al. 2021, https://arxiv.org/abs/1905.03871), built on Flower's wrappers.

    Parameters
    ----------
    strategy : FedAvg
        FedAvg or FedProx, as the run configured it.
    parameters : CentralDPParameters
        Mechanism, noise multiplier z, clipping norm C (adaptive: C_0).
    n_sites : int
        n, the sites trained each round: the fixed denominator of the average.

    Attributes
    ----------
    dp : Strategy
        Flower's wrapper doing the clipping and the noise.
    history : CentralDPHistory
        Per round, the updates averaged, the bound, the noise sd and the accounted noise multiplier.
    """

    def __init__(self, strategy: FedAvg, parameters: CentralDPParameters, n_sites: int) -> None:
        self.parameters = parameters
        self.n_sites = int(n_sites)
        self.mean = EqualSiteMean(strategy, self.n_sites)
        if parameters.mechanism == "fixed":
            self.dp: Strategy = DifferentialPrivacyServerSideFixedClipping(
                self.mean, parameters.noise_multiplier, parameters.clip, self.n_sites)
        else:
            z = parameters.noise_multiplier
            self.dp = AdaptiveClipping(self.mean, z, self.n_sites,
                                       clipped_count_stddev=z / (2 * math.sqrt(COUNT_SHARE)),
                                       initial_clipping_norm=parameters.clip)
        self.history = CentralDPHistory()
        self._global: dict[str, np.ndarray] = {}
        # Flower's wrappers draw the noise (and the adaptive count's) from numpy's global generator; the run keeps
        # its own copy of that generator's state, taken now and advanced only by the noise, so a checkpoint can
        # carry it (:meth:`state`) and a resumed run draws what the uninterrupted one would have
        self._noise_state = np.random.get_state()

    @property
    def fraction_train(self) -> float:
        """The share of the sites sent training each round (the accountant's sampling rate)."""
        return float(self.mean.strategy.fraction_train)

    def summary(self) -> None:
        self.dp.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: a.numpy() for k, a in arrays.items()}
        return self.dp.configure_train(server_round, arrays, config, grid)

    def _unchanged(self, reply: Message) -> bool:
        """Whether ``reply`` sends back the round's global arrays unchanged (an update of norm 0)."""
        local = reply.content.array_records.get(self.mean.arrayrecord_key)
        return local is not None and all(np.array_equal(local[k].numpy(), g) for k, g in self._global.items())

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # A failed reply (a site lost) would make Flower's wrappers skip the round, and an update of norm 0 makes
        # their clipping divide by zero: both are a zero update in the fixed-denominator mean, so they are left out
        # of it (a failure is already in the run record: strategies.per_site). For adaptive clipping a zero update
        # then goes uncounted among the unclipped ones.
        answered = [r for r in replies if not r.has_error() and not self._unchanged(r)]
        outside = np.random.get_state()
        np.random.set_state(self._noise_state)
        try:
            arrays, metrics = self.dp.aggregate_train(server_round, answered)
        finally:
            self._noise_state = np.random.get_state()
            np.random.set_state(outside)
        if arrays is not None:
            self.history.rounds[server_round] = self._released(server_round)
        return arrays, metrics

    def _released(self, server_round: int) -> CentralRound:
        updates = self.mean.answered.get(server_round, 0)
        if isinstance(self.dp, AdaptiveClipping):
            clip, z_update = self.dp.round_clipping_norm, self.dp.noise_multiplier
            sd_count = self.dp.clipped_count_stddev
            return CentralRound(updates=updates, clip_norm=clip, noise_sd=compute_stdv(z_update, clip, self.n_sites),
                                noise_multiplier=combined_noise_multiplier(z_update, sd_count),
                                unclipped_fraction=self.dp.noisy_unclipped_fraction)
        clip, z = self.dp.clipping_norm, self.dp.noise_multiplier
        return CentralRound(updates=updates, clip_norm=clip, noise_sd=compute_stdv(z, clip, self.n_sites),
                            noise_multiplier=z)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a resumed run needs to clip, noise and account as the uninterrupted one: the rounds released
        (the accountant's history), the adaptive bound of the next round and the last round's, and the noise
        generator's state (its key array apart, as an array)."""
        kind, key, position, has_gauss, cached = self._noise_state
        state: dict[str, Any] = {"rounds": {str(r): asdict(h) for r, h in self.history.rounds.items()},
                                 "generator": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss),
                                               "cached_gaussian": float(cached)}}
        if isinstance(self.dp, AdaptiveClipping):
            state["adaptive"] = {"clipping_norm": float(self.dp.clipping_norm),
                                 "round_clipping_norm": float(self.dp.round_clipping_norm),
                                 "noisy_unclipped_fraction": self.dp.noisy_unclipped_fraction}
        return state, {"generator_key": np.asarray(key)}

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Put :meth:`state`'s ``state`` and ``arrays`` back (this strategy built with the checkpointed run's
        parameters)."""
        self.history = CentralDPHistory({int(r): CentralRound(**h) for r, h in state["rounds"].items()})
        generator = state["generator"]
        self._noise_state = (generator["kind"], np.asarray(arrays["generator_key"], dtype=np.uint32),
                             int(generator["position"]), int(generator["has_gauss"]),
                             float(generator["cached_gaussian"]))
        if isinstance(self.dp, AdaptiveClipping):
            adaptive = state["adaptive"]
            self.dp.clipping_norm = float(adaptive["clipping_norm"])
            self.dp.round_clipping_norm = float(adaptive["round_clipping_norm"])
            fraction = adaptive["noisy_unclipped_fraction"]
            self.dp.noisy_unclipped_fraction = None if fraction is None else float(fraction)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)


def combined_noise_multiplier(update_noise_multiplier: float, count_noise_sd: float) -> float:
    """z of the update release (z_Δ) and the sensitivity-½ count release (σ_b) together: (z_Δ⁻² + (2σ_b)⁻²)^(−1/2)
    (Andrew et al. 2021, §3.1); 0 if either carries no noise."""
    if update_noise_multiplier <= 0 or count_noise_sd <= 0:
        return 0.0
    return (update_noise_multiplier ** -2 + (2 * count_noise_sd) ** -2) ** -0.5
