"""The federated statistics through the one secure-sum protocol (``server.secure_aggregation``).

The federation runs in-process: a stand-in for Flower's Grid hands each request to the real site handlers
(``client.secure_statistics``, ``client.secure_aggregation``, ``client.training_handlers.statistics``) with one
Flower Context per node, as ``tests/test_hist_wire.py`` does for histogram boosting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context
from scipy import stats

from client import secure_aggregation as sa
from client import secure_statistics as cs
from client.training_handlers import statistics as plain_statistics
from server import statistics_phase as sp
from server.run_record import RunRecord
from server.secure_aggregation import FIXED_POINT_BITS, from_fixed
from server.site_check import SiteCheck
from shared.encoding import FeatureEncoder, SiteStatistics, combine
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RunPlan
from shared.statistics_vector import VALUES, StatisticsLayout
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic
from tests.handler_grid import HandlerGrid

NODES = (21, 22, 23)


@pytest.fixture(scope="module")
def frames() -> dict[int, pd.DataFrame]:
    """Three simulated clinics' episode tables (their whole tables stand for the training split here)."""
    world = make_world(3, seed=4, patients_per_clinic=40)
    return {node: simulate_clinic(world, clinic)[0] for node, clinic in zip(NODES, world.clinics, strict=True)}


@dataclass
class Site:
    task: object = NANOPARTICLE_TASK


@dataclass
class Request:
    """``client.site.SiteRequest`` as the statistics handlers use it: a site without DP, its rows, the message."""

    frame: pd.DataFrame
    config: ConfigRecord
    context: Context
    site: Site = field(default_factory=Site)
    dp = None
    name = "clinic"

    def rows(self, split: str) -> pd.DataFrame:
        return self.frame


class Grid(HandlerGrid):
    """Flower's Grid as far as the statistics phase uses it: each message to that node's real handler."""

    answers = {messages.STATISTICS.type: plain_statistics, messages.STATISTICS_LAYOUT.type: cs.layout,
               messages.STATISTICS_MASKED.type: cs.masked_statistics}

    def __init__(self, frames: dict[int, pd.DataFrame]) -> None:
        super().__init__(frames)
        self.frames = frames

    def request(self, node, msg, context):
        return Request(self.frames[node], msg.content[r.CONFIG], context)


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Every test here runs server code: Flower's task identity set (conftest's ``task_identity``)."""


def federate(frames, mode, lost_at=None) -> tuple[FeatureEncoder, RunRecord, Grid]:
    grid = Grid(frames)
    grid.lost_at = lost_at or {}
    sites = SiteCheck(usable={n: f"clinic_{n}" for n in frames})
    record = RunRecord(run_id="t", settings={})
    encoder = sp.federated_encoder(grid, sites, NANOPARTICLE_TASK, 0, RunPlan(("statistics",)), record, mode)
    return encoder, record, grid


def pooled_statistics(frames, nodes) -> SiteStatistics:
    return combine([SiteStatistics.from_frame(frames[n], NANOPARTICLE_TASK) for n in nodes])


def assert_same_encoder(encoder: FeatureEncoder, expected: FeatureEncoder) -> None:
    """Equal within the fixed-point rounding (3 sites × 2^-41 per summed entry) and the float64 cancellation of
    Σx² − sum² / n (module docstring of ``shared.statistics_vector``)."""
    assert encoder.feature_names_out_ == expected.feature_names_out_
    assert encoder.classes_ == expected.classes_
    for name, mean in expected.means_.items():
        assert encoder.means_[name] == pytest.approx(mean, rel=1e-12, abs=1e-12), name
        assert encoder.scales_[name] == pytest.approx(expected.scales_[name], rel=1e-9, abs=1e-9), name
    for name, mean in expected.target_means_.items():
        assert encoder.target_means_[name] == pytest.approx(mean, rel=1e-12, abs=1e-12), name
        assert encoder.target_scales_[name] == pytest.approx(expected.target_scales_[name], rel=1e-9), name


def test_the_layout_vector_sums_to_the_pooled_statistics(frames):
    own = [SiteStatistics.from_frame(f, NANOPARTICLE_TASK) for f in frames.values()]
    union = own[0]
    layout = StatisticsLayout.of(union)
    for s in own[1:]:
        layout = layout.union(StatisticsLayout.of(s))
    total = np.sum([layout.vector(s) for s in own], axis=0)
    pooled = combine(own)
    minima = {c: pooled.numeric[c].min for c in layout.numeric}
    maxima = {c: pooled.numeric[c].max for c in layout.numeric}
    summed = layout.statistics(total, minima, maxima)
    assert summed.n_rows == pooled.n_rows and summed.categorical == pooled.categorical
    assert summed.classification == pooled.classification
    for name, col in pooled.numeric.items():
        assert summed.numeric[name].moments.count == col.moments.count
        assert summed.numeric[name].moments.sum == pytest.approx(col.moments.sum, rel=1e-12)
        assert summed.numeric[name].moments.m2 == pytest.approx(col.moments.m2, rel=1e-8, abs=1e-6)
    for name, counts in pooled.histograms.items():
        np.testing.assert_array_equal(summed.histograms[name], counts)


@pytest.mark.parametrize("mode", ["off", "pairwise", "recovering"])
def test_masked_statistics_give_the_encoder_of_the_plain_sum(frames, mode):
    encoder, record, grid = federate(frames, mode)
    expected = FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(pooled_statistics(frames, NODES))
    assert_same_encoder(encoder, expected)
    assert record.statistics["sites"] == [f"clinic_{n}" for n in NODES]
    assert record.statistics["secure_sum"] == mode
    if mode == "off":  # unchanged: one query.statistics, each site's statistics in the clear
        assert grid.calls == [messages.STATISTICS.type]
    else:
        assert messages.STATISTICS.type not in grid.calls  # no site sends its own statistics in the clear
        masked = [c for kind, _, c in grid.replies if kind == messages.STATISTICS_MASKED.type]
        assert len(masked) == 3 and all(set(c[r.ARRAYS]) == {VALUES} for c in masked)


def test_exchanges_per_mode_batch_the_whole_release_into_one_masked_vector(frames):
    calls = {mode: federate(frames, mode)[2].calls for mode in ("pairwise", "recovering")}
    assert calls["pairwise"] == [messages.STATISTICS_LAYOUT.type, messages.SECURE_KEYS.type,
                                 messages.STATISTICS_MASKED.type]
    assert calls["recovering"] == [messages.STATISTICS_LAYOUT.type, messages.SECURE_KEYS.type,
                                   messages.SECURE_SHARES.type, messages.STATISTICS_MASKED.type,
                                   messages.SECURE_UNMASK.type]


@pytest.mark.parametrize("mode", ["pairwise", "recovering"])
def test_one_sites_masked_vector_is_indistinguishable_from_uniform(frames, mode):
    _, _, grid = federate(frames, mode)
    words = next(c[r.ARRAYS][VALUES].numpy() for kind, node, c in grid.replies
                 if kind == messages.STATISTICS_MASKED.type and node == NODES[0])
    own = [SiteStatistics.from_frame(frames[n], NANOPARTICLE_TASK) for n in NODES]
    layout = StatisticsLayout.of(own[0]).union(StatisticsLayout.of(own[1])).union(StatisticsLayout.of(own[2]))
    plain = sa.to_fixed(layout.vector(own[0]), ConfigRecord({sa.SECURE_SCALE: FIXED_POINT_BITS, sa.SECURE_SITES: 3}))
    assert words.dtype == np.uint64 and words.shape == plain.shape and plain.size > 100
    assert stats.kstest(words.astype(np.float64) / 2.0 ** 64, "uniform").pvalue > 1e-3
    # the same test tells the unmasked vector (small non-negative fixed-point sums) from uniform
    assert stats.kstest(plain.view(np.uint64).astype(np.float64) / 2.0 ** 64, "uniform").pvalue < 1e-6


def test_recovering_a_site_lost_before_sending_its_masked_vector_sums_the_others(frames):
    encoder, record, _ = federate(frames, "recovering", lost_at={23: (messages.STATISTICS_MASKED.type, 1, False)})
    assert_same_encoder(encoder, FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(pooled_statistics(frames,
                                                                                                    (21, 22))))
    assert record.statistics["sites"] == ["clinic_21", "clinic_22"]
    assert record.statistics["failures"] == {"clinic_23": "no reply"}


def test_recovering_a_site_lost_after_sending_its_masked_vector_keeps_it_in_the_sum(frames):
    encoder, record, _ = federate(frames, "recovering", lost_at={23: (messages.SECURE_UNMASK.type, 1, False)})
    assert_same_encoder(encoder, FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(pooled_statistics(frames, NODES)))
    assert record.statistics["sites"] == [f"clinic_{n}" for n in NODES]
    assert record.statistics["failures"] == {"clinic_23": "no reply"}  # lost, but its input was recovered


def test_recovering_more_sites_lost_than_the_threshold_allows_fails_clearly(frames):
    lost = {22: (messages.SECURE_UNMASK.type, 1, False), 23: (messages.SECURE_UNMASK.type, 1, False)}
    with pytest.raises(sp.NoStatistics, match="cannot be recovered"):
        federate(frames, "recovering", lost_at=lost)


def test_pairwise_a_site_lost_after_the_key_exchange_fails_the_sum_naming_it(frames):
    with pytest.raises(sp.NoStatistics, match=r"clinic_22: no reply .*pairwise masks.*recovering survives it"):
        federate(frames, "pairwise", lost_at={22: (messages.STATISTICS_MASKED.type, 1, False)})


def test_a_site_lost_at_the_layout_is_left_out_as_one_failing_query_statistics(frames):
    encoder, record, _ = federate(frames, "pairwise", lost_at={21: (messages.STATISTICS_LAYOUT.type, 1, False)})
    assert_same_encoder(encoder, FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(pooled_statistics(frames,
                                                                                                    (22, 23))))
    assert record.statistics["sites"] == ["clinic_22", "clinic_23"]


def test_one_site_alone_is_asked_in_the_clear_there_is_nothing_to_hide_its_sum_among(frames):
    encoder, record, grid = federate({21: frames[21]}, "recovering")
    assert grid.calls == [messages.STATISTICS.type] and record.statistics["secure_sum"] == "off"


# -- fixed point -----------------------------------------------------------------------------------------


def test_fixed_point_sums_decode_within_the_rounding_and_the_bound_is_refused():
    rng = np.random.default_rng(0)
    parts = [rng.normal(0, 1e6, 500) for _ in range(3)]
    config = ConfigRecord({sa.SECURE_SCALE: FIXED_POINT_BITS, sa.SECURE_SITES: 3})
    total = from_fixed(np.sum([sa.to_fixed(p, config) for p in parts], axis=0))
    exact = np.array([math.fsum(column) for column in zip(*parts, strict=True)])
    error = np.abs(total - exact)  # each site's rounding, then the decoded sum's float64 rounding
    assert np.all(error <= 3 * 2.0 ** -(FIXED_POINT_BITS + 1) + np.spacing(np.abs(exact)))
    bound = 2.0 ** 63 / 3 * 2.0 ** (32 - FIXED_POINT_BITS)  # ≈ 1.2e16 for 3 sites at 2^-40
    parts = [np.array([bound * 0.999, -bound * 0.999]) for _ in range(3)]
    total = from_fixed(np.sum([sa.to_fixed(p, config) for p in parts], axis=0))  # wraps nowhere: the bound holds
    np.testing.assert_allclose(total, [3 * bound * 0.999, -3 * bound * 0.999], rtol=1e-15)
    with pytest.raises(ShareableError, match="fixed-point bound 2\\^63 / 3 sites"):
        sa.to_fixed(np.array([1.0, -bound * 1.001]), config)
    with pytest.raises(ShareableError, match="not finite"):
        sa.to_fixed(np.array([np.nan]), config)
