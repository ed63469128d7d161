"""Phase 4 (bagging, cyclic): one federated XGBoost run per head with Flower's FedXgbBagging or FedXgbCyclic,
then a final evaluation of all boosters at every site.

Heads (``shared.boosting.heads``): one booster per binary or regression outcome, one per class of a
multiclass outcome (one-vs-rest). Per-round client evaluation is off (a one-vs-rest head alone says little);
the sites evaluate the finished boosters together through ``query.xgb_evaluate``. Trees grown on a site's
rows have no DP form here, so sites under DP do not take part in bagging or cyclic boosting (the run record
says so); they do evaluate the finished boosters, as one release of their ``evaluation`` phase. Histogram
boosting (``server.hist_phase``), whose sums are noised, is the mode DP sites can join.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedXgbBagging, FedXgbCyclic, Strategy

from server.run_record import RunRecord, add_privacy
from server.settings import RunSettings
from server.site_check import SiteCheck
from server.training_phase import evaluation_config
from shared.boosting import heads
from shared.encoding import FeatureEncoder
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import BoostingRound, evaluation_request
from strategies.per_site import PerSiteRecord
from strategies.summation import sum_metricrecords

NO_DP_TREES = "bagging and cyclic trees have no DP form here: a site under DP joins --boosting hist only"


@dataclass
class BoostingOutcome:
    """Final boosters by head key, each site's evaluation record by node, failures, time."""

    models: dict[str, bytes] = field(default_factory=dict)
    evaluations: dict[int, dict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_sent: int = 0


def boosting_strategy(mode: str, n_sites: int, order: list[int] | None = None) -> Strategy:
    """Flower's own XGBoost strategy for ``mode``, training on every site it is given; ``order``: the node ids in
    the order cyclic boosting visits them (Flower 1.42's ``FedXgbCyclic`` fixes its cycle in the order of its
    first ``random.sample`` of the nodes, from Python's unseeded generator, so without it the order of the sites,
    and so the trees, changed from run to run)."""
    # FedXgbCyclic evaluates one site every round whatever fraction_evaluate says; its replies are summaries,
    # so they are summed (also safe when a site has no test rows, where a weighted mean divides by zero).
    if mode == "bagging":
        return FedXgbBagging(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_sites,
                             min_available_nodes=n_sites, evaluate_metrics_aggr_fn=sum_metricrecords)
    if mode == "cyclic":
        cyclic = FedXgbCyclic(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n_sites,
                              evaluate_metrics_aggr_fn=sum_metricrecords)
        cyclic.registered_nodes.update({node: index for index, node in enumerate(order or [], start=1)})
        return cyclic
    raise ValueError(f"unknown Flower boosting mode {mode!r}: expected bagging or cyclic")


def boosting_round(settings: RunSettings) -> BoostingRound:
    return BoostingRound(eta=settings.xgb_eta, max_depth=settings.xgb_max_depth, local_rounds=1, seed=settings.seed,
                         split_seed=settings.split_seed, mode=settings.boosting)


def run_boosting(grid: Grid, sites: SiteCheck, encoder: FeatureEncoder, settings: RunSettings,
                 record: RunRecord) -> BoostingOutcome:
    """Train every head federatedly on the sites without DP, then evaluate all heads at every site."""
    outcome = BoostingOutcome(refused={sites.usable[n]: NO_DP_TREES for n in sites.dp_nodes()})
    trainers = [n for n in sites.nodes if n not in sites.dp_nodes()]
    start = time.perf_counter()
    for head in heads(encoder):
        if not trainers:
            break
        config = boosting_round(settings).to_config(encoder, head)
        by_name = sorted(trainers, key=lambda n: sites.usable[n])  # a run's cycle: the sites in name order
        strategy = PerSiteRecord(boosting_strategy(settings.boosting, len(trainers), by_name),
                                 action=messages.XGBOOST_ACTION, train_nodes=trainers)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.frombuffer(b"", dtype=np.uint8)]),
                                num_rounds=settings.xgb_rounds, train_config=config, evaluate_config=config)
        for failures in strategy.rounds.failures.values():
            outcome.failures.update(failures)
        outcome.models[head.key] = result.arrays["0"].numpy().tobytes() if result.arrays is not None else b""
    if outcome.models:
        evaluate_boosters(grid, sites, encoder, settings, outcome, record)
    outcome.seconds = time.perf_counter() - start
    return outcome


def evaluate_boosters(grid: Grid, sites: SiteCheck, encoder: FeatureEncoder, settings: RunSettings,
                      outcome: BoostingOutcome, record: RunRecord) -> None:
    """Every site's evaluation summaries of the finished boosters (``query.xgb_evaluate``), into ``outcome``."""
    families = settings.model_names
    config = evaluation_config(boosting_round(settings).to_config(encoder), sites, len(families),
                               families.index("xgboost"))
    nodes = [n for n in sites.nodes if n not in sites.dp_nodes() or n in sites.granting("evaluation")]
    sent = [Message(evaluation_request(config, outcome.models), dst_node_id=n,
                    message_type=messages.XGB_EVALUATE.type) for n in nodes]
    for reply in grid.send_and_receive(sent):
        node = reply.metadata.src_node_id
        if reply.has_error():
            outcome.failures[node] = reply.error.reason
            continue
        outcome.evaluations[node] = dict(reply.content[r.METRICS])
        if r.PRIVACY in reply.content:
            add_privacy(record, sites.usable, node, dict(reply.content[r.PRIVACY]))
