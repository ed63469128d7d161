"""The strategies a run may select by name (run config ``strategy``), all Flower's own.

- ``fedavg``: McMahan et al., AISTATS 2017 (https://arxiv.org/abs/1602.05629).
- ``fedprox``: Li et al., MLSys 2020 (https://arxiv.org/abs/1812.06127); the site applies the proximal
  term with the ``proximal-mu`` the strategy sends (``client.training``).
- ``fedadam`` / ``fedyogi``: Reddi et al., ICLR 2021 (https://arxiv.org/abs/2003.00295), server-side
  adaptive optimisers over the averaged update.

Evaluation replies carry sums (``shared.metrics`` summaries), so every strategy here aggregates them with
:func:`strategies.summation.sum_metricrecords`.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from strategies.summation import sum_metricrecords

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


def make_strategy(name: str, n_sites: int, proximal_mu: float = 0.1, server_lr: float = 0.05) -> Strategy:
    """Flower strategy ``name`` that trains and evaluates on every connected site each round.

    ``n_sites`` (the usable sites) is what a round expects, but a round goes on with the sites still
    connected: requiring all of them would stall the run for good when one site is lost (measured in
    tests/test_deployment.py, a SuperNode killed mid-run); the run record names the missing site."""
    del n_sites  # kept in the signature: callers say how many sites they expect
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
    raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
