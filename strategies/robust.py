"""Flower's Byzantine-robust aggregators by name, their parameters derived from the number of sites, and what
each one needs to hold.

Every one but ``rowtrimmedavg`` is Flower's own class (``flwr.serverapp.strategy``); this module only chooses
their parameters and refuses a federation too small for the number of malicious sites assumed (``f`` of ``n``
training sites):

- ``krum``: Blanchard et al., NeurIPS 2017 (https://arxiv.org/abs/1703.02757). The one update whose n − f − 2
  nearest updates are closest to it. Needs n ≥ 2f + 3.
- ``multikrum``: same paper; the mean of the n − f best-scored updates. Needs n ≥ 2f + 3.
- ``bulyan``: El Mhamdi et al., ICML 2018 (https://arxiv.org/abs/1802.07927). Multi-Krum selects n − 2f
  updates, then per coordinate the mean of the n − 4f closest to their median. Needs n ≥ 4f + 3.
- ``fedmedian``: Yin et al., ICML 2018 (https://arxiv.org/abs/1803.01498); the coordinate-wise median.
  Needs n ≥ 2f + 1.
- ``fedtrimmedavg``: Yin et al., ICML 2018; per coordinate the mean without the ⌊βn⌋ largest and smallest.
  Needs ⌊βn⌋ ≥ f and β < 0.5.
- ``rowtrimmedavg``: the same trim, the values left averaged with the sites' row weights as FedAvg does
  (:mod:`strategies.weighted_trimmed_mean`, ours, not Flower's). Needs what ``fedtrimmedavg`` needs.

Defaults (:func:`RobustParameters.of`): f = one site in ten, at least one (:func:`default_malicious_sites`);
β = (f + ½)/n, which trims f sites at each end and still f when one site is missing from a round
(:func:`default_trim_fraction`).

What they do not protect
------------------------
They aggregate the neural network's weights only. The federated statistics that build the feature encoder
(summed counts, sums, sums of squares and grid histograms) are bounded instead by a feasibility check
(:mod:`shared.sum_bounds`, used by ``server.statistics_phase``): the summed release must lie where honest
contributions could (counts ≤ the summed and declared row counts, a column's sum in [count · lo, count · hi] of
its declared range, its sum of squares between count · min x² and count · max x² and at least sum² / count),
widened for DP sites by their stated noise (an honest release is refused with probability < 1e−6 per DP
site). With ``secure-sum = off`` each site is checked alone and a site that breaks it is dropped and named
(``statistics.infeasible`` in the run record): within its allowance it can still move a column's mean by its
share C_a / C of the column's values times the declared range. Under masks (pairwise, recovering) only the sum
is checked, so an infeasible sum stops the run naming the entry and bound, but a site that stays inside the
pooled allowance (it can spend the other sites' headroom, and its contribution may be negative) can still move
a pooled mean anywhere in the declared range: bounding one site's share under masks needs per-site range
proofs (Prio, Corrigan-Gibbs & Boneh 2017; RoFL, Lycklama et al. 2023), not built. Row counts: a site
declares its rows in the site check (not under DP: a DP site declares none, so a sum that includes one has no
row cap); the declaration is the site's own word, so an over-declaring site whose statistics are consistent
with it is not detected.

The analytics sums are bounded the same way (:mod:`shared.analytics_bounds`, used by
``server.analytics_phase``: each query's released arrays within their rows times their per-row terms' public
ranges, counts within the declared row counts; alone a failing site is dropped, masked the analysis is refused),
with the same residue inside the box. So are histogram boosting's counts and gradient/hessian histograms
(:mod:`shared.hist_bounds`, used by ``server.hist_phase``: counts adding to the reported rows, hessians ≥ 0, within
the parent's and at most h_max per row, every feature's bins adding to the node's total, |G| ≤ H · B / h_min;
alone a failing site is dropped and the round regrown, masked the heads stop); inside those limits a site still
moves its gradients freely, and under DP (no row counts) a site scaling gradients and hessians alike is not
detected.

Still open to a poisoned site: the XGBoost bagging/cyclic trees, the dose-response and fitted-Q sums, the
importance's loss sums, the release gate's off-policy estimates, and the evaluation summaries, which every
strategy still adds up (:mod:`strategies.summation`): a site that lies there moves the released metrics. Robust
aggregation also assumes at most f of the sites are malicious; it says nothing once more are.

What they cost
--------------
The median, the trimmed mean and Krum's choice weigh every site alike (FedAvg weighs by rows), and Krum keeps
one site's model only: on clinics as unequal as the simulator's they learn less without any attack
(``benchmarks/robust_aggregation.py``; 10 clinics, 3 rounds: response AUC 0.843 with FedAvg, 0.812
FedTrimmedAvg, 0.777 FedMedian, 0.678 Krum; 10 rounds: 0.872 FedAvg, 0.854 FedTrimmedAvg). ``rowtrimmedavg``
keeps FedAvg's weights where it does not trim and costs less (3 rounds: 0.833, and 0.835 with the largest
clinic flipping its labels; ``benchmarks/results/robust_aggregation_attempts.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from strategies.weighted_trimmed_mean import RowWeightedTrimmedAvg

ROBUST_STRATEGIES = ("krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg", "rowtrimmedavg")
TRIMMING_STRATEGIES = ("fedtrimmedavg", "rowtrimmedavg")

SITES_PER_ASSUMED_ATTACKER = 10
"""Default assumption: one malicious site in every ten, at least one (a rule of thumb, not a measurement)."""


class ImpossibleAggregation(ValueError):
    """The robust strategy cannot tolerate the assumed malicious sites with this many sites; says what it needs."""


def default_malicious_sites(n_sites: int) -> int:
    """f when none is given: one site in :data:`SITES_PER_ASSUMED_ATTACKER`, at least one."""
    return max(1, n_sites // SITES_PER_ASSUMED_ATTACKER)


def default_trim_fraction(n_sites: int, malicious_sites: int) -> float:
    """β when none is given: (f + ½)/n, so ⌊βn⌋ = f, and still f with one site fewer (as long as β ≤ ½)."""
    return (malicious_sites + 0.5) / n_sites


@dataclass(frozen=True)
class RobustParameters:
    """The parameters of a robust strategy.

    Parameters
    ----------
    malicious_sites : int
        f, the number of malicious sites the strategy must tolerate.
    trim_fraction : float
        β, the share of updates FedTrimmedAvg drops at each end of every coordinate.
    """

    malicious_sites: int
    trim_fraction: float

    @classmethod
    def of(cls, n_sites: int, malicious_sites: int | None = None,
           trim_fraction: float | None = None) -> RobustParameters:
        """The given parameters, the missing ones derived from ``n_sites`` (a negative value counts as missing)."""
        f = default_malicious_sites(n_sites) if malicious_sites is None or malicious_sites < 0 else malicious_sites
        beta = default_trim_fraction(n_sites, f) if trim_fraction is None or trim_fraction < 0 else trim_fraction
        return cls(malicious_sites=f, trim_fraction=beta)


def check_robust(name: str, n_sites: int, params: RobustParameters) -> None:
    """Raise :class:`ImpossibleAggregation` saying what ``name`` needs if ``n_sites`` cannot meet it."""
    f, beta = params.malicious_sites, params.trim_fraction
    if f < 0:
        raise ImpossibleAggregation(f"{name}: the number of malicious sites cannot be negative; got {f}")
    if name in ("krum", "multikrum"):
        needed, rule = 2 * f + 3, "n ≥ 2f + 3"
    elif name == "bulyan":
        needed, rule = 4 * f + 3, "n ≥ 4f + 3"
    elif name == "fedmedian":
        needed, rule = 2 * f + 1, "n ≥ 2f + 1"
    elif name in TRIMMING_STRATEGIES:
        if not 0.0 <= beta < 0.5:
            raise ImpossibleAggregation(f"{name}: the trim fraction must be in [0, 0.5); got {beta}")
        trimmed = math.floor(beta * n_sites)
        if trimmed < f:
            raise ImpossibleAggregation(
                f"{name}: a trim fraction of {beta:g} drops {trimmed} of {n_sites} sites at each end, fewer "
                f"than the {f} malicious sites assumed: raise the trim fraction to at least {f / n_sites:g} (below "
                f"0.5) or assume fewer malicious sites")
        return
    else:
        raise ValueError(f"unknown robust strategy {name!r}: expected one of {', '.join(ROBUST_STRATEGIES)}")
    if n_sites < needed:
        raise ImpossibleAggregation(
            f"{name} tolerating {f} malicious site{'s' if f != 1 else ''} needs {rule}, at least {needed} training "
            f"sites; this run has {n_sites}: add sites, assume fewer malicious sites, or choose another strategy")


def robust_strategy(name: str, n_sites: int, params: RobustParameters, **common) -> Strategy:
    """Flower's strategy ``name`` with ``params`` (checked against ``n_sites``); ``common``: the sampling and
    metric-aggregation arguments every strategy of the run takes (``strategies.choice``)."""
    check_robust(name, n_sites, params)
    f = params.malicious_sites
    if name == "krum":
        return Krum(**common, num_malicious_nodes=f)
    if name == "multikrum":
        return MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=n_sites - f)
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=f)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "rowtrimmedavg":
        return RowWeightedTrimmedAvg(**common, beta=params.trim_fraction)
    return FedTrimmedAvg(**common, beta=params.trim_fraction)
