"""Permutation importance through the one secure-sum protocol (``server.importance_phase``).

The federation runs in-process (``tests.handler_grid``): each request goes to the real site handler
(``client.boosting_handlers.importance``, with a real ``client.site.SiteRequest`` over simulated site folders)
and the real secure-sum rounds (``client.secure_aggregation``), one Flower Context per node. The masked
importance is compared with the same phase asked in the clear (``secure-sum off``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message

from client import boosting_handlers as bh
from client.boosting import train_pooled_heads
from client.dp import PrivacyRefused
from client.site import SiteRequest, SiteSource, load
from client.split import encode
from server.importance_phase import federated_importance
from server.site_check import SiteCheck
from shared.ann import build_model, to_arrays
from shared.boosting import BoostingConfig
from shared.encoding import fit_local
from shared.importance import sum_keys, sums_layout
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import importance_request
from shared.protocol.hist import SECURE_SESSION
from shared.protocol.privacy import RunPlan, SitePrivacy
from shared.protocol.training import AnnTraining
from shared.sum_vector import VALUES
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import SitePrivacy as WrittenPrivacy
from simulation.clinics import generate_sites
from tests.handler_grid import HandlerGrid

NODES = (31, 32, 33)
IMPORTANCE = messages.IMPORTANCE.type


class Grid(HandlerGrid):
    answers = {IMPORTANCE: bh.importance}

    def __init__(self, sources: dict[int, SiteSource]) -> None:
        super().__init__(sources)
        self.sources = sources

    def request(self, node, msg, context):
        return SiteRequest(self.sources[node], load(self.sources[node]), msg.content[r.CONFIG], context)


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Every test here runs server code: Flower's task identity set (conftest's ``task_identity``)."""


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three simulated site folders (no DP), an encoder fitted on their pooled rows, the training config, and
    the two final models: ANN weights and boosters trained on the pooled rows."""
    folder = tmp_path_factory.mktemp("sites")
    world = generate_sites(3, 11, folder, patients_per_clinic=80, privacy=WrittenPrivacy(dp=False))
    sources = {n: SiteSource(folder / c.name) for n, c in zip(NODES, world.clinics, strict=True)}
    pooled = pd.concat([load(s).episodes for s in sources.values()], ignore_index=True)
    encoder = fit_local(pooled, NANOPARTICLE_TASK)
    config = AnnTraining(local_epochs=1, batch_size=32, lr=0.01, seed=4, split_seed=0, max_grad_norm=1.0,
                         num_rounds=1, hidden=(8,), plan=RunPlan(("statistics", "training", "importance"))
                         ).to_config(encoder)
    train = encode(encoder, pooled)
    models = {"ann": to_arrays(build_model(encoder, NANOPARTICLE_TASK, (8,), seed=2)),
              "xgboost": train_pooled_heads(encoder, train.x, train.targets, BoostingConfig(max_depth=3), 5)}
    return sources, encoder, config, models


def importance(federation, mode, family="ann", nodes=NODES, lost_at=None, dp_nodes=()):
    sources, encoder, config, models = federation
    grid = Grid({n: sources[n] for n in nodes})
    grid.lost_at = lost_at or {}
    sites = SiteCheck(usable={n: f"site-{n}" for n in nodes},
                      privacy={n: SitePrivacy(dp=True, epsilon_budget=3.0, delta=1e-5) for n in dp_nodes})
    return federated_importance(grid, sites, encoder, config, family, models[family], secure_sum=mode), grid


def assert_same_importance(got: dict, want: dict) -> None:
    """Equal within the fixed-point rounding: relative 1e-9 of the largest importance of the outcome."""
    assert got.keys() == want.keys() and want
    for outcome, features in want.items():
        assert set(got[outcome]) == set(features), outcome
        scale = max(abs(v) for v in features.values())
        for feature, value in features.items():
            assert got[outcome][feature] == pytest.approx(value, rel=1e-9, abs=1e-9 * scale), (outcome, feature)


def masked_replies_only(grid: Grid) -> bool:
    """Every site's importance reply is the one masked vector, nothing in the clear."""
    replies = [c for kind, _, c in grid.replies if kind == IMPORTANCE and c is not None]
    return bool(replies) and all(set(c.keys()) == {r.ARRAYS} and set(c[r.ARRAYS].keys()) == {VALUES}
                                 for c in replies)


@pytest.mark.parametrize(("mode", "family"), [("pairwise", "ann"), ("recovering", "ann"), ("pairwise", "xgboost")])
def test_masked_importance_equals_the_plain_importance(federation, mode, family):
    plain, plain_grid = importance(federation, "off", family)
    masked, grid = importance(federation, mode, family)
    assert_same_importance(masked["features"], plain["features"])
    assert plain["secure_sum"] == {"mode": "off"} and plain_grid.calls == [IMPORTANCE]
    assert masked["secure_sum"]["mode"] == mode and masked["secure_sum"]["releases"] == 1
    assert masked["secure_sum"]["lost"] == {} and masked["failures"] == {} == plain["failures"]
    assert masked_replies_only(grid)
    assert len(grid.calls) == {"pairwise": 2, "recovering": 4}[mode]  # keys + request; keys, shares, request, unmask
    # the features are ranked and not all zero: the comparison is of a real importance
    for features in plain["features"].values():
        assert list(features.values()) == sorted(features.values(), reverse=True)
    assert max(abs(v) for f in plain["features"].values() for v in f.values()) > 1e-3


def message(content):
    return Message(content, dst_node_id=NODES[0], message_type=IMPORTANCE)


def test_a_sites_sums_are_laid_out_in_one_order_one_entry_per_key(federation):
    sources, encoder, config, models = federation
    grid = Grid(sources)
    msg = message(importance_request(config, "ann", models["ann"]))
    sums = dict(bh.importance(msg, grid.request(31, msg, grid.contexts[31]))[r.METRICS])
    keys = sum_keys(encoder)
    features = {name.split("__", 1)[0] for name in encoder.feature_names_out_}
    assert set(sums) == set(keys) and len(keys) == len(NANOPARTICLE_TASK.outcomes) * (len(features) + 2)
    assert all(sums[f"{o.name}/n"] > 0 for o in NANOPARTICLE_TASK.outcomes)
    assert sums_layout(encoder).size == len(keys)
    np.testing.assert_array_equal(sums_layout(encoder).vector(sums), [sums[k] for k in keys])


def test_recovering_a_site_lost_before_answering_leaves_the_importance_of_the_survivors(federation):
    lost, grid = importance(federation, "recovering", lost_at={33: (IMPORTANCE, 1, False)})
    survivors, _ = importance(federation, "off", nodes=(31, 32))
    everyone, _ = importance(federation, "off")
    assert_same_importance(lost["features"], survivors["features"])
    assert lost["failures"] == {"site-33": "no reply"} and lost["secure_sum"]["lost"] == {"33": "no reply"}
    assert grid.calls.count(messages.SECURE_KEYS.type) == 1  # recovered, not asked again
    differences = [abs(lost["features"][o][f] - everyone["features"][o][f])
                   for o in everyone["features"] for f in everyone["features"][o]]
    assert max(differences) > 1e-6  # not the importance over all three


def test_recovering_a_site_lost_after_sending_its_masked_sums_is_in_the_sum(federation):
    late, _ = importance(federation, "recovering", lost_at={33: (messages.SECURE_UNMASK.type, 1, False)})
    everyone, _ = importance(federation, "off")
    assert_same_importance(late["features"], everyone["features"])
    assert late["failures"] == {"site-33": "no reply"}


def test_recovering_more_sites_lost_than_the_threshold_allows_gives_no_importance(federation):
    result, _ = importance(federation, "recovering",
                           lost_at={32: (IMPORTANCE, 1, False), 33: (IMPORTANCE, 1, False)})
    assert result["features"] == {} and "error" in result["secure_sum"]
    assert result["failures"]["site-32"] == result["failures"]["site-33"] == "no reply"
    # the survivor refuses to unmask a sum that would be its own sums alone (client.secure_aggregation)
    assert "fewer than the threshold 2" in result["failures"]["site-31"]


def test_pairwise_a_site_failing_the_request_is_left_out_under_new_keys(federation):
    left_out, grid = importance(federation, "pairwise", lost_at={31: (IMPORTANCE, 1, False)})
    survivors, _ = importance(federation, "off", nodes=(32, 33))
    assert_same_importance(left_out["features"], survivors["features"])
    assert left_out["failures"] == {"site-31": "no reply"}
    assert grid.calls.count(messages.SECURE_KEYS.type) == 2  # keys exchanged anew without it
    assert masked_replies_only(grid)


def test_pairwise_with_one_site_left_gives_no_importance_rather_than_its_sums(federation):
    result, grid = importance(federation, "pairwise", nodes=(31, 32), lost_at={32: (IMPORTANCE, 1, False)})
    assert result["features"] == {} and result["failures"] == {"site-32": "no reply"}
    assert "importance: 1 site(s) left to ask (lost: node 32: no reply), fewer than 2" in result["secure_sum"]["error"]
    assert not [c for kind, n, c in grid.replies if kind == IMPORTANCE and n == 31 and c is not None
                and r.METRICS in c]  # 31's sums never travelled in the clear


def test_pairwise_key_exchange_leaving_one_site_gives_no_importance_and_asks_nothing(federation):
    lost_at = {32: (messages.SECURE_KEYS.type, 1, False), 33: (messages.SECURE_KEYS.type, 1, False)}
    result, grid = importance(federation, "pairwise", lost_at=lost_at)
    assert result["features"] == {} and result["failures"] == {"site-32": "no reply", "site-33": "no reply"}
    assert ("importance: 1 site(s) left after the pairwise key exchange (lost: node 32: no reply; node 33: no "
            "reply), fewer than 2") in result["secure_sum"]["error"]
    assert grid.calls == [messages.SECURE_KEYS.type]  # the lone site is asked nothing


def test_one_site_alone_and_off_ask_in_the_clear(federation):
    alone, grid = importance(federation, "recovering", nodes=(31,))
    assert alone["secure_sum"] == {"mode": "off"} and grid.calls == [IMPORTANCE] and alone["features"]


def test_dp_sites_are_not_asked_and_the_others_are_summed_masked(federation):
    result, grid = importance(federation, "pairwise", dp_nodes=(33,))
    survivors, _ = importance(federation, "off", nodes=(31, 32))
    assert_same_importance(result["features"], survivors["features"])
    assert (33, IMPORTANCE) not in grid.seen and not any(n == 33 for _, n, _ in grid.replies)
    assert "site-33" in result["refused"] and result["failures"] == {}


def test_a_dp_site_asked_anyway_refuses_before_anything_is_computed_or_masked(federation):
    sources, encoder, config, models = federation
    grid = Grid(sources)
    msg = message(importance_request(config, "ann", models["ann"]))
    request = grid.request(31, msg, grid.contexts[31])
    request.config = ConfigRecord({**dict(request.config), SECURE_SESSION: "s", "secure-sum": True})
    request.__dict__["dp"] = object()  # the site's DP terms (client.site.SiteRequest.dp, cached)
    with pytest.raises(PrivacyRefused, match="no DP form"):
        bh.importance(msg, request)
