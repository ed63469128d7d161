"""Central DP with adaptive clipping: Flower's server-side wrapper with three corrections, so it does what Andrew
et al. describe and what the accountant (``server.central_accounting``) counts.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021
(https://arxiv.org/abs/1905.03871), Algorithm 1: each round the sites' updates are clipped to C_t; the server
releases the noisy fraction of updates left *unclipped*, b̃_t = (Σ b_i + N(0, σ_b²)) / n with b_i = 1[‖Δ_i‖ ≤ C_t],
and moves the bound geometrically towards the γ-quantile of the norms, C_{t+1} = C_t · exp(−η (b̃_t − γ)). The
average of the clipped updates gets Gaussian noise of sd z_Δ · C_t / n. Written with b_i − ½ (sensitivity ½, §3.1),
the two releases together are one Gaussian mechanism of noise multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2).

Flower 1.42's ``DifferentialPrivacyServerSideAdaptiveClipping`` (read in
``flwr/serverapp/strategy/dp_adaptive_clipping.py``) clips, counts, updates the bound and noises with its own
loop; this subclass keeps that loop and overrides two of its steps, because, as measured in
``tests/test_central_dp.py``:

1. it counts the *clipped* updates into the rule written for the unclipped ones, so a round in which every update
   is clipped shrinks the bound further (0.1 → 0.090 → 0.082 → 0.074 with every update of norm 10), and the bound
   runs away from the norms; here the unclipped fraction goes in, as in the paper;
2. it noises the count Σ b_i (sensitivity 1 under adding or removing a site) and divides by the replies, while its
   noise split uses the sensitivity-½ formula; here the count is released as Σ (b_i − ½) + N(0, σ_b²) over the
   fixed number of sites ``num_sampled_clients`` (+ ½ after), which is the paper's sensitivity-½ query;
3. it noises round t's average with the bound *after* that round's update, C_{t+1}, whereas the updates were clipped
   to C_t, so a shrinking bound adds less noise than the sensitivity needs; here the noise is z_Δ · C_t / n.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, Strategy

INITIAL_CLIP = 0.1
"""Andrew et al.'s recommended initial clipping norm C_0 (Flower's default too)."""
TARGET_QUANTILE = 0.5
"""γ, the fraction of updates left unclipped that the bound tracks (Andrew et al.: the median works well)."""
CLIP_LR = 0.2
"""η, the geometric learning rate of the bound (Andrew et al.'s recommendation, Flower's default)."""


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Server-side adaptive clipping of Andrew et al. 2021 (https://arxiv.org/abs/1905.03871), on Flower's wrapper.

    Parameters
    ----------
    strategy : Strategy
        The strategy that averages the clipped updates (an :class:`strategies.equal_site_mean.EqualSiteMean`).
    noise_multiplier : float
        z, the effective noise multiplier of the round's two releases together (≥ 0); Flower splits it into the
        update's z_Δ and the count's σ_b.
    num_sampled_clients : int
        n, the sites trained each round: the denominator of the average and of the count.
    clipped_count_stddev : float
        σ_b, the noise sd on the count of unclipped updates; must exceed z / 2.
    initial_clipping_norm, target_quantile, clip_norm_lr : float
        C_0, γ (the unclipped fraction tracked) and η.

    Attributes
    ----------
    round_clipping_norm : float
        The bound the last aggregated round clipped to (``clipping_norm`` is already the next round's).
    noisy_unclipped_fraction : float or None
        b̃ of the last aggregated round.
    """

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int,
                 clipped_count_stddev: float, initial_clipping_norm: float = INITIAL_CLIP,
                 target_quantile: float = TARGET_QUANTILE, clip_norm_lr: float = CLIP_LR) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, initial_clipping_norm=initial_clipping_norm,
                         target_clipped_quantile=target_quantile, clip_norm_lr=clip_norm_lr,
                         clipped_count_stddev=clipped_count_stddev)
        self.round_clipping_norm = float(initial_clipping_norm)
        self.noisy_unclipped_fraction: float | None = None

    def _noisy_fraction(self, count: int, total: int) -> float:
        """b̃ from Flower's clipped ``count`` among ``total`` updates: (Σ (b_i − ½) + N(0, σ_b²)) / n + ½ with
        b_i = 1 for an unclipped update (corrections 1 and 2 of the module docstring). Called after the round's
        updates were clipped and before the bound moves, so it also notes the bound they were clipped to."""
        self.round_clipping_norm = float(self.clipping_norm)
        centred = (total - count) - total / 2 + float(np.random.normal(0.0, self.clipped_count_stddev))
        self.noisy_unclipped_fraction = centred / self.num_sampled_clients + 0.5
        return self.noisy_unclipped_fraction

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Flower's noise, of sd z_Δ · C_t / n with the bound the round clipped to (correction 3)."""
        next_norm, self.clipping_norm = self.clipping_norm, self.round_clipping_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = next_norm
