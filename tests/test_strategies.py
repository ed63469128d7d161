"""Strategies: Flower's own, selected by name; evaluation summaries are summed, not averaged."""

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from shared import metrics
from strategies.choice import STRATEGIES, make_strategy
from strategies.summation import sum_metricrecords


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam),
                                           ("fedyogi", FedYogi)])
def test_each_named_strategy_is_flowers_own_and_uses_every_connected_site(name, cls):
    strategy = make_strategy(name, n_sites=4)
    assert type(strategy) is cls
    assert strategy.fraction_train == strategy.fraction_evaluate == 1.0  # every connected site, every round
    # a lost site must not stall the run (tests/test_deployment.py kills one mid-run)
    assert strategy.min_train_nodes == strategy.min_available_nodes == strategy.min_evaluate_nodes == 1
    assert strategy.evaluate_metrics_aggr_fn is sum_metricrecords


def test_unknown_strategy_is_refused_listing_the_choices():
    with pytest.raises(ValueError, match="fedavg, fedprox, fedadam, fedyogi, krum"):
        make_strategy("mean", n_sites=3)
    assert STRATEGIES == ("fedavg", "fedprox", "fedadam", "fedyogi", "krum", "multikrum", "bulyan", "fedmedian",
                          "fedtrimmedavg", "rowtrimmedavg")


def test_summed_summaries_give_the_metrics_of_the_union_of_test_sets():
    a = metrics.summarise("binary", [0, 1, 1, 0], [0.2, 0.9, 0.6, 0.4])
    b = metrics.summarise("binary", [1, 0, 0], [0.3, 0.1, 0.7])
    union = metrics.summarise("binary", [0, 1, 1, 0, 1, 0, 0], [0.2, 0.9, 0.6, 0.4, 0.3, 0.1, 0.7])
    replies = [RecordDict({"metrics": MetricRecord({"num-examples": 4, **metrics.to_metric_record(a, "y")})}),
               RecordDict({"metrics": MetricRecord({"num-examples": 3, **metrics.to_metric_record(b, "y")})})]
    total = sum_metricrecords(replies, "num-examples")
    assert total["num-examples"] == 7
    assert metrics.binary_metrics(metrics.from_metric_record(total, "y")) == metrics.binary_metrics(union)
