"""The strategies a run may select by name (run config ``strategy``), all Flower's own but
``rowtrimmedavg`` (:mod:`strategies.weighted_trimmed_mean`).

- ``fedavg``: McMahan et al., AISTATS 2017 (https://arxiv.org/abs/1602.05629).
- ``fedprox``: Li et al., MLSys 2020 (https://arxiv.org/abs/1812.06127); the site applies the proximal
  term with the ``proximal-mu`` the strategy sends (``client.training``).
- ``fedadam`` / ``fedyogi``: Reddi et al., ICLR 2021 (https://arxiv.org/abs/2003.00295), server-side
  adaptive optimisers over the averaged update.
- ``krum``, ``multikrum``, ``bulyan``, ``fedmedian``, ``fedtrimmedavg``, ``rowtrimmedavg``: robust aggregation
  against poisoned sites, their parameters derived from the number of sites and checked (:mod:`strategies.robust`,
  which also says what they leave unprotected).

Any of them can be wrapped in update-norm clipping (:mod:`strategies.update_clipping`): to a fixed bound
(``clip_norm`` > 0) or to a multiple of each round's median update norm (``clip_median_factor`` > 0). FedAvg and
FedProx can instead be wrapped in central DP (:mod:`strategies.central_dp`: Flower's server-side fixed or adaptive
clipping wrapper, user-level DP of the global models). FedAvg, FedProx, FedAdam and FedYogi can instead take their
mean from a masked sum (:mod:`strategies.pairwise_masked_mean`, Bonawitz et al. 2017): the coordinator never
sees one site's model; everything that needs each site's update (robust aggregators, clipping, central DP) refuses
it.

Evaluation replies carry sums (``shared.metrics`` summaries), so every strategy here aggregates them with
:func:`strategies.summation.sum_metricrecords`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from strategies.central_dp import CentralDP, CentralDPParameters, central_dp_problem
from strategies.pairwise_masked_mean import PairwiseMaskedMean, SessionFactory, masking_problem
from strategies.robust import ROBUST_STRATEGIES, RobustParameters, robust_strategy
from strategies.summation import sum_metricrecords
from strategies.update_clipping import MedianNormClipping, UpdateNormClipping

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", *ROBUST_STRATEGIES)


def make_strategy(name: str, n_sites: int, proximal_mu: float = 0.1, server_lr: float = 0.05,
                  robust: RobustParameters | None = None, clip_norm: float = 0.0,
                  clip_median_factor: float = 0.0, central: CentralDPParameters | None = None,
                  masked: bool = False, masked_nodes: Collection[int] | None = None,
                  site_names: Mapping[int, str] | None = None,
                  session_factory: SessionFactory | None = None) -> Strategy:
    """Flower strategy ``name`` that trains and evaluates on every connected site each round.

    ``n_sites`` (the usable sites) is what a round expects, but a round goes on with the sites still
    connected: requiring all of them would stall the run for good when one site is lost (measured in
    tests/test_deployment.py, a SuperNode killed mid-run); the run record names the missing site. A robust
    strategy takes its parameters from ``robust`` (default: derived from ``n_sites``) and raises
    :class:`strategies.robust.ImpossibleAggregation` if ``n_sites`` cannot meet them. ``clip_norm`` > 0 wraps
    the strategy in :class:`strategies.update_clipping.UpdateNormClipping`, ``clip_median_factor`` > 0 in
    :class:`strategies.update_clipping.MedianNormClipping` (not both: ``ValueError``). ``central`` wraps it in
    :class:`strategies.central_dp.CentralDP` over ``n_sites`` (``ValueError`` saying why for a strategy that is not a
    mean, or with update-norm clipping too). ``masked`` wraps it in
    :class:`strategies.pairwise_masked_mean.PairwiseMaskedMean` among ``masked_nodes``, named by ``site_names``, its
    secure-sum sessions from ``session_factory`` (``ValueError`` saying why for a strategy, clipping or central DP
    that needs each site's update, or without a factory)."""
    if masked and (problem := masking_problem(name, clip_norm, clip_median_factor,
                                              central.mechanism if central is not None else "")):
        raise ValueError(problem)
    if central is not None and (problem := central_dp_problem(name, clip_norm, clip_median_factor)):
        raise ValueError(problem)
    if clip_norm > 0 and clip_median_factor > 0:
        raise ValueError("clip-norm and clip-median-factor: choose one update norm bound, the fixed one or the "
                         f"median-based one; got {clip_norm} and {clip_median_factor}")
    strategy = _named_strategy(name, n_sites, proximal_mu, server_lr, robust)
    if masked:
        if session_factory is None:
            raise ValueError("masked ANN rounds need the secure sum's sessions (session_factory)")
        return PairwiseMaskedMean(strategy, session_factory, masked_nodes, site_names)
    if central is not None:
        return CentralDP(strategy, central, n_sites)
    if clip_median_factor > 0:
        return MedianNormClipping(strategy, clip_median_factor)
    return UpdateNormClipping(strategy, clip_norm) if clip_norm > 0 else strategy


def _named_strategy(name: str, n_sites: int, proximal_mu: float, server_lr: float,
                    robust: RobustParameters | None) -> Strategy:
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 1,
              "min_evaluate_nodes": 1, "min_available_nodes": 1,
              "evaluate_metrics_aggr_fn": sum_metricrecords}
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=server_lr, eta_l=server_lr)
    if name == "fedyogi":
        return FedYogi(**common, eta=server_lr, eta_l=server_lr)
    if name in ROBUST_STRATEGIES:
        return robust_strategy(name, n_sites, robust or RobustParameters.of(n_sites), **common)
    raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
