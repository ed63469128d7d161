"""The server's boosting phase: one federated XGBoost run per head with Flower's FedXgbBagging or
FedXgbCyclic, then a final evaluation of all boosters at every site.

Heads (``shared.boosting.heads``): one booster per binary or regression outcome, one per class of a
multiclass outcome (one-vs-rest). Per-round client evaluation is off (a one-vs-rest head alone says little);
the sites evaluate the finished boosters together through ``query.xgb_evaluate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedXgbBagging, FedXgbCyclic, Strategy

from shared.boosting import heads
from shared.encoding import FeatureEncoder
from strategies.per_site import PerSiteRecord
from strategies.summation import sum_metricrecords

if TYPE_CHECKING:
    from server.app import RunSettings

XGB_EVALUATE = "query.xgb_evaluate"
MODES = ("bagging", "cyclic", "hist")  # hist: server.hist_phase (summed gradient histograms)


@dataclass
class BoostingOutcome:
    """Final boosters by head key, each site's evaluation record by node, failures, time."""

    models: dict[str, bytes] = field(default_factory=dict)
    evaluations: dict[int, dict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_sent: int = 0


def boosting_strategy(mode: str, n_sites: int) -> Strategy:
    """Flower's own XGBoost strategy for ``mode``, training on every usable site."""
    # FedXgbCyclic evaluates one site every round whatever fraction_evaluate says; its replies are summaries,
    # so they are summed (also safe when a site has no test rows, where a weighted mean divides by zero).
    if mode == "bagging":
        return FedXgbBagging(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_sites,
                             min_available_nodes=n_sites, evaluate_metrics_aggr_fn=sum_metricrecords)
    if mode == "cyclic":
        return FedXgbCyclic(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n_sites,
                            evaluate_metrics_aggr_fn=sum_metricrecords)
    raise ValueError(f"unknown boosting mode {mode!r}: expected one of {', '.join(MODES)}")


def boosting_config(encoder: FeatureEncoder, settings: RunSettings) -> ConfigRecord:
    config = encoder.to_config_record()
    for key, value in {"eta": settings.xgb_eta, "max-depth": settings.xgb_max_depth, "local-rounds": 1,
                       "seed": settings.seed, "split-seed": settings.split_seed, "mode": settings.boosting}.items():
        config[key] = value
    return config


def run_boosting(grid: Grid, nodes: list[int], encoder: FeatureEncoder, settings: RunSettings) -> BoostingOutcome:
    """Train every head federatedly, then evaluate all heads at every site."""
    if settings.boosting == "hist":
        from server.hist_phase import run_hist_boosting  # imported here: hist_phase builds on this module

        return run_hist_boosting(grid, nodes, encoder, settings)
    outcome = BoostingOutcome()
    start = time.perf_counter()
    for head in heads(encoder):
        config = boosting_config(encoder, settings)
        config["outcome"], config["kind"] = head.outcome, head.kind
        config["positive-class"] = -1 if head.positive_class is None else head.positive_class
        strategy = PerSiteRecord(boosting_strategy(settings.boosting, len(nodes)), action="xgboost")
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.frombuffer(b"", dtype=np.uint8)]),
                                num_rounds=settings.xgb_rounds, train_config=config, evaluate_config=config)
        for failures in strategy.rounds.failures.values():
            outcome.failures.update(failures)
        outcome.models[head.key] = result.arrays["0"].numpy().tobytes() if result.arrays is not None else b""
    evaluate_boosters(grid, nodes, encoder, settings, outcome)
    outcome.seconds = time.perf_counter() - start
    return outcome


def evaluate_boosters(grid: Grid, nodes: list[int], encoder: FeatureEncoder, settings: RunSettings,
                      outcome: BoostingOutcome) -> None:
    """Every site's evaluation summaries of the finished boosters (``query.xgb_evaluate``), into ``outcome``."""
    config = boosting_config(encoder, settings)
    boosters = ConfigRecord({key: model for key, model in outcome.models.items()})
    messages = [Message(RecordDict({"config": config, "boosters": boosters}), dst_node_id=n,
                        message_type=XGB_EVALUATE) for n in nodes]
    for reply in grid.send_and_receive(messages):
        node = reply.metadata.src_node_id
        if reply.has_error():
            outcome.failures[node] = reply.error.reason
        else:
            outcome.evaluations[node] = dict(reply.content["metrics"])
