"""Central DP's privacy accounting: ε of the released global-model sequence at the run's δ, with an Opacus
accountant, and the record's ``central_dp`` entry.

Each round the central-DP strategy (``strategies.central_dp``) releases one Gaussian mechanism on the average of
the sites' clipped updates, noise multiplier z_t (adaptive clipping: the update and the clipped-count releases
together, z_t = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2), Andrew et al. 2021 §3.1), each site sampled with probability q (the
share of sites trained each round; 1 in this project's strategies, so no amplification by sampling). The rounds
compose; the accountant turns their history into ε at δ:

- ``rdp``: Opacus's ``RDPAccountant``, Rényi DP of the sampled Gaussian (Mironov 2017,
  https://arxiv.org/abs/1702.07476; Mironov, Talwar, Zhang 2019) converted with Balle et al. 2020's bound;
- ``prv``: Opacus's ``PRVAccountant``, numerical composition of privacy-loss random variables (Gopi, Lee, Wutschitz
  2021, https://arxiv.org/abs/2106.02848): tighter, within its ``eps_error``.

The unit is the site (user-level DP: adding or removing one site's whole contribution); the per-site DP-SGD ε in the
record's ``privacy`` counts one row of a site against the coordinator. The two are different promises and are never
added up or converted into each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from server.run_record import CentralDPRecord
from shared.protocol.privacy import RunPlan
from strategies.central_dp import CentralDP

PRV_EPS_ERROR = 0.01
"""The PRV accountant's allowed error on ε (Opacus's default)."""


def central_epsilon(noise_multipliers: Sequence[float], sample_rate: float, delta: float,
                    accountant: str = "rdp") -> float:
    """ε at ``delta`` after one sampled Gaussian release per entry of ``noise_multipliers`` (∞ if any carries no
    noise; 0 with no release)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        rdp = RDPAccountant()
        for z in noise_multipliers:
            rdp.step(noise_multiplier=float(z), sample_rate=float(sample_rate))
        return float(rdp.get_epsilon(delta))
    if accountant == "prv":
        prv = PRVAccountant()
        for z in noise_multipliers:
            prv.step(noise_multiplier=float(z), sample_rate=float(sample_rate))
        with np.errstate(divide="ignore"):  # at sample rate 1 Opacus takes log(1 − q) = −∞ on purpose
            return float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    raise ValueError(f"accountant: expected rdp or prv; got {accountant!r}")


def central_dp_record(strategy: CentralDP, delta: float, accountant: str, plan: RunPlan,
                      local_dp_sites: Sequence[str]) -> CentralDPRecord:
    """The record's ``central_dp`` entry from the rounds ``strategy`` released: per round the bound, the noise and
    ε after it; ε of the whole sequence; what it covers and what not (the run's other phases)."""
    rounds = sorted(strategy.history.rounds)
    history = [strategy.history.rounds[r] for r in rounds]
    q = strategy.fraction_train
    z = [h.noise_multiplier for h in history]
    parameters = strategy.parameters
    return CentralDPRecord(
        mechanism=parameters.mechanism, noise_multiplier=parameters.noise_multiplier, clip=parameters.clip,
        denominator=strategy.n_sites, sample_rate=q, delta=delta, accountant=accountant, rounds=len(rounds),
        epsilon=central_epsilon(z, q, delta, accountant),
        per_round={str(r): {"updates": h.updates, "clip_norm": h.clip_norm, "noise_sd": h.noise_sd,
                            "noise_multiplier": h.noise_multiplier, "unclipped_fraction": h.unclipped_fraction,
                            "epsilon": central_epsilon(z[: i + 1], q, delta, accountant)}
                   for i, (r, h) in enumerate(zip(rounds, history, strict=True))},
        update_noise_multiplier=float(strategy.dp.noise_multiplier),
        count_noise_sd=float(getattr(strategy.dp, "clipped_count_stddev", 0.0)) if parameters.mechanism == "adaptive"
        else None,
        not_covered=[phase for phase in plan.phases if phase != "training"],
        local_dp_sites=sorted(local_dp_sites))
