"""The feasibility check of the permutation importance's loss sums (``shared.importance_bounds``): honest sums
pass, masked and in the clear; sums beyond the declared rows or the log loss's range are dropped (clear) or give
no importance (masked), the refusal naming outcome, entry and bound."""

from __future__ import annotations

from unittest import mock

import pytest

from client import boosting_handlers as bh
from client.site import load
from server.importance_phase import federated_importance
from server.site_check import SiteCheck
from shared.importance_bounds import LOG_LOSS_MAX, check_importance
from shared.sum_bounds import Contributors, InfeasibleSum
from tests.test_secure_importance import NODES, Grid, federation  # noqa: F401 - the module's fixture

ATTACKER = 33


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Server code runs here: Flower's task identity set (conftest's ``task_identity``)."""


class PoisonGrid(Grid):
    """The attacker's importance sums multiplied by ``factor`` (``which``: its row counts or its loss sums) before
    they are masked."""

    def __init__(self, sources, factor: float = 1.0, which: str = "loss") -> None:
        super().__init__(sources)
        self.factor, self.which = factor, which

    def answer(self, msg, node, kind):
        if node != ATTACKER or kind in self.rounds:
            return super().answer(msg, node, kind)
        honest = bh.permutation_sums

        def poisoned(*args, **kwargs):
            sums = honest(*args, **kwargs)
            return {k: v * self.factor if k.endswith("/n") == (self.which == "n") else v for k, v in sums.items()}

        with mock.patch.object(bh, "permutation_sums", poisoned):
            return super().answer(msg, node, kind)


def run(federation, mode, factor=1.0, which="loss"):  # noqa: F811 - the fixture
    sources, encoder, config, models = federation
    grid = PoisonGrid(sources, factor, which)
    summaries = {n: {"n_episodes": float(len(load(sources[n]).episodes))} for n in NODES}
    sites = SiteCheck(usable={n: f"site-{n}" for n in NODES}, summaries=summaries)
    return federated_importance(grid, sites, encoder, config, "ann", models["ann"], secure_sum=mode)


@pytest.mark.parametrize("mode", ["off", "pairwise"])
def test_honest_importance_passes_the_check(federation, mode):  # noqa: F811
    result = run(federation, mode)
    assert result["features"] and result["infeasible"] == {}
    assert result["secure_sum"].get("infeasible", {}) == {}


@pytest.mark.parametrize(("which", "factor"), [("n", 50.0), ("loss", 2 * LOG_LOSS_MAX)])
def test_sums_beyond_the_rows_or_the_loss_range_are_dropped_in_the_clear(federation, which, factor):  # noqa: F811
    result = run(federation, "off", factor, which)
    assert set(result["infeasible"]) == {f"site-{ATTACKER}"} and result["features"]
    assert result["infeasible"][f"site-{ATTACKER}"].startswith("dropped: importance: the summed '")


@pytest.mark.parametrize(("which", "factor"), [("n", 500.0), ("loss", 20 * LOG_LOSS_MAX)])
def test_a_masked_sum_beyond_them_gives_no_importance_and_names_the_bound(federation, which, factor):  # noqa: F811
    # under masks the check sees the pooled sum: the attacker spends the other sites' headroom first (larger factors)
    result = run(federation, "pairwise", factor, which)
    assert result["features"] == {}
    assert result["secure_sum"]["infeasible"]["sum"].startswith("importance: the summed '")
    assert "it must satisfy" in result["secure_sum"]["error"]


def test_the_bound_names_the_outcome_and_never_a_value(federation):  # noqa: F811
    _, encoder, _, _ = federation
    outcome = encoder.task.outcomes[0].name
    sums = {f"{outcome}/n": 10.0, f"{outcome}/base": 1234.5}
    with pytest.raises(InfeasibleSum) as caught:
        check_importance("importance", encoder, sums, Contributors(1, 100.0))
    assert repr(outcome) in str(caught.value) and "1234" not in str(caught.value)
    assert abs(LOG_LOSS_MAX - 16.118) < 1e-3
