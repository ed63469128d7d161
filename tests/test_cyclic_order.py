"""Cyclic boosting visits the sites in a fixed order (by site name in a run), not in the order of Flower's first
random sample of the nodes, so a run's cyclic trees do not change from one run to the next."""

from __future__ import annotations

import random

from flwr.app import ArrayRecord, ConfigRecord

from server.boosting_phase import boosting_strategy


class NodesGrid:
    """Flower's Grid as far as node sampling uses it."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def visits(order: list[int] | None, seed: int) -> list[int]:
    random.seed(seed)  # what Flower's sample_nodes draws from
    strategy = boosting_strategy("cyclic", 4, order)
    grid = NodesGrid([41, 7, 1000, 3])
    return [next(iter(strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid))).metadata.dst_node_id
            for r in range(1, 9)]


def test_the_cycle_follows_the_given_order_whatever_the_random_sample(task_identity):
    order = [1000, 3, 41, 7]
    for seed in range(6):
        assert visits(order, seed) == order * 2


def test_without_an_order_flower_cycles_in_the_order_of_its_random_sample(task_identity):
    """Why the order is given: Flower's own cycle depends on the global generator's state."""
    assert len({tuple(visits(None, seed)[:4]) for seed in range(6)}) > 1
