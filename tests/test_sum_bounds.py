"""The feasibility check of summed releases (``shared.sum_bounds``): honest sums pass, DP ones too, poisoned ones
are refused (masked) or their site dropped (``secure-sum = off``), and what a site within its allowance can do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from client.dp import gaussian_release, sensitivity
from client.secure_statistics import declared_layout
from client.statistics import private_statistics
from server import statistics_phase as sp
from server.run_record import RunRecord
from server.site_check import SiteCheck
from shared.bounds import declared_range
from shared.encoding import SiteStatistics
from shared.protocol.privacy import ReleaseFacts, RunPlan
from shared.statistics_vector import StatisticsLayout
from shared.sum_bounds import Contributors, InfeasibleSum, check_statistics
from shared.task import NANOPARTICLE_TASK
from simulation.attacks import Attack, attack_mod
from simulation.clinics import make_world, simulate_clinic
from tests.test_secure_statistics import Grid

NODES = (31, 32, 33)
TASK = NANOPARTICLE_TASK


@pytest.fixture(scope="module")
def frames() -> dict[int, pd.DataFrame]:
    world = make_world(3, seed=7, patients_per_clinic=40)
    return {node: simulate_clinic(world, clinic)[0] for node, clinic in zip(NODES, world.clinics, strict=True)}


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Server code runs here: Flower's task identity set (conftest's ``task_identity``)."""


class FakeRelease:
    """``client.dp.PhaseRelease`` without a ledger: the real Gaussian noise at ``sigma``, the facts it states."""

    def __init__(self, sigma: float, rng: np.random.Generator) -> None:
        self.sigma, self.rng = sigma, rng

    def release(self, blocks, index):
        noise_sd = self.sigma * sensitivity(blocks)
        return (gaussian_release(blocks, self.sigma, self.rng),
                ReleaseFacts("statistics", index, self.sigma, noise_sd, 0.0, 1.0, 1e-5))


def exact(frames) -> dict[int, SiteStatistics]:
    return {n: SiteStatistics.from_frame(f, TASK) for n, f in frames.items()}


def layout_of(stats) -> StatisticsLayout:
    layout = None
    for s in stats:
        layout = StatisticsLayout.of(s) if layout is None else layout.union(StatisticsLayout.of(s))
    return layout


def test_honest_exact_sums_are_feasible_alone_and_summed(frames):
    stats = exact(frames)
    layout = layout_of(stats.values())
    vectors = {n: layout.vector(s) for n, s in stats.items()}
    for n, v in vectors.items():
        check_statistics(layout, v, TASK, Contributors(1, float(len(frames[n]))))
    check_statistics(layout, sum(vectors.values()), TASK,
                     Contributors(3, float(sum(len(f) for f in frames.values()))))


@pytest.mark.parametrize("sigma", [0.5, 5.0, 50.0])
def test_honest_dp_sites_are_never_refused(frames, sigma):
    """200 noise draws per σ: two DP sites and one exact site summed, and each DP site alone. The bounds allow
    Φ⁻¹(1 − 1e-6 / entries) σ (p < 1e-6 per release and site): a refusal here is a wrong bound, not bad luck."""
    rng = np.random.default_rng(11)
    stats = exact(frames)
    layout = declared_layout(stats[NODES[0]], TASK)
    exact_part = layout.vector(stats[NODES[2]])
    for _ in range(200):
        noised, sds = [], []
        for n in NODES[:2]:
            s, facts = private_statistics(stats[n], TASK, FakeRelease(sigma, rng))
            noised.append(layout.vector(s))
            sds.append(facts.noise_sd)
            check_statistics(layout, noised[-1], TASK, Contributors(1, None, (facts.noise_sd,)))
        check_statistics(layout, sum(noised) + exact_part, TASK, Contributors(3, None, tuple(sds)))


def numeric_entry(layout: StatisticsLayout, column: str) -> int:
    return 2 + 3 * layout.numeric.index(column)


def test_an_inflated_sum_is_refused_naming_entry_and_bound_never_the_value(frames):
    stats = exact(frames)
    layout = layout_of(stats.values())
    total = sum(layout.vector(s) for s in stats.values())
    column = layout.numeric[0]
    lo, hi = declared_range(TASK, column)
    at = numeric_entry(layout, column)
    poisoned = total.copy()
    poisoned[at + 1] += 10 * hi * 40  # one site of 40 rows claiming ten times the largest allowed value
    who = Contributors(3, float(sum(len(f) for f in frames.values())))
    with pytest.raises(InfeasibleSum) as err:
        check_statistics(layout, poisoned, TASK, who)
    message = str(err.value)
    assert "statistics" in message and f"numeric column {column!r}" in message and f"{hi:g}" in message
    assert f"{poisoned[at + 1]:g}" not in message and f"{poisoned[at + 1]}" not in message
    assert err.value.entry == f"sum of numeric column {column!r}"


def test_row_count_beyond_the_declared_counts_is_refused(frames):
    stats = exact(frames)
    layout = layout_of(stats.values())
    total = sum(layout.vector(s) for s in stats.values())
    declared = float(sum(len(f) for f in frames.values()))
    check_statistics(layout, total, TASK, Contributors(3, declared))
    with pytest.raises(InfeasibleSum, match="declared row counts"):
        check_statistics(layout, total, TASK, Contributors(3, float(total[0]) - 1))


def test_checked_alone_a_site_moves_a_mean_by_at_most_its_share_of_the_range(frames):
    """``secure-sum = off``: each site is checked on its own, so the residual bound the docs state holds: the
    attacker's share C_a / C of the column's values (C_a ≤ its row count) times the declared range; 1 % beyond its
    own allowance is refused."""
    stats = exact(frames)
    layout = layout_of(stats.values())
    honest = {n: layout.vector(s) for n, s in stats.items()}
    attacker = NODES[0]
    alone = Contributors(1, float(len(frames[attacker])))
    for column in layout.numeric:
        lo, hi = declared_range(TASK, column)
        at = numeric_entry(layout, column)
        v = honest[attacker].copy()
        count = v[at]
        v[at + 1], v[at + 2] = count * hi, count * hi * hi  # every value at the top of the range: feasible
        check_statistics(layout, v, TASK, alone)
        total, clean = sum(honest.values()) - honest[attacker] + v, sum(honest.values())
        shift = total[at + 1] / total[at] - clean[at + 1] / clean[at]
        assert 0 <= shift <= count / clean[at] * (hi - lo) + 1e-9, column
        assert count <= v[0] <= len(frames[attacker])
        v[at + 1] = count * hi * 1.01 if hi > 0 else count * hi * 0.99
        with pytest.raises(InfeasibleSum, match="declared range"):
            check_statistics(layout, v, TASK, alone)


def test_under_masks_only_the_pooled_statistic_is_bounded(frames):
    """What remains (documented): a sum check cannot tell whose headroom is used. A site that adds to a column's
    sum up to the pooled count × the top of the range passes, moving the pooled mean to the top of the range
    whatever its share; just beyond is refused."""
    stats = exact(frames)
    layout = layout_of(stats.values())
    clean = sum(layout.vector(s) for s in stats.values())
    who = Contributors(3, float(sum(len(f) for f in frames.values())))
    column = layout.numeric[0]
    lo, hi = declared_range(TASK, column)
    at = numeric_entry(layout, column)
    poisoned = clean.copy()
    poisoned[at + 1], poisoned[at + 2] = clean[at] * hi, clean[at] * hi * hi
    check_statistics(layout, poisoned, TASK, who)
    assert poisoned[at + 1] / poisoned[at] == pytest.approx(hi)
    poisoned[at + 1] *= 1.001
    with pytest.raises(InfeasibleSum):
        check_statistics(layout, poisoned, TASK, who)


class AttackGrid(Grid):
    """The statistics phase's Grid with one node's replies through ``simulation.attacks.attack_mod``."""

    def __init__(self, frames, attacker: int, attack: Attack) -> None:
        super().__init__(frames)
        self.mod = attack_mod({0: attack})
        self.attacker = attacker

    def answer(self, msg, node, kind):
        if node != self.attacker:
            return super().answer(msg, node, kind)
        context = Context(run_id=1, node_id=node, node_config={"partition-id": 0}, state=RecordDict(),
                          run_config={})
        return self.mod(msg, context, lambda m, c: super(AttackGrid, self).answer(m, node, kind))


def run_phase(frames, mode, attack=None):
    grid = AttackGrid(frames, NODES[1], attack) if attack else Grid(frames)
    sites = SiteCheck(usable={n: f"clinic_{n}" for n in frames},
                      summaries={n: {"n_episodes": float(len(f))} for n, f in frames.items()})
    record = RunRecord(run_id="t", settings={})
    encoder = sp.federated_encoder(grid, sites, TASK, 0, RunPlan(("statistics",)), record, mode)
    return encoder, record


def test_off_mode_drops_and_names_the_inflating_site(frames):
    _, record = run_phase(frames, "off")
    assert record.statistics["infeasible"] == {} and len(record.statistics["sites"]) == 3
    _, record = run_phase(frames, "off", Attack(f"clinic_{NODES[1]}", "inflate", 10.0))
    assert list(record.statistics["infeasible"]) == [f"clinic_{NODES[1]}"]
    assert "declared range" in record.statistics["infeasible"][f"clinic_{NODES[1]}"]
    assert f"clinic_{NODES[1]}" not in record.statistics["sites"] and len(record.statistics["sites"]) == 2


@pytest.mark.parametrize("mode", ["pairwise", "recovering"])
def test_masked_mode_refuses_the_inflated_sum_and_passes_the_honest_one(frames, mode):
    run_phase(frames, mode)
    with pytest.raises(sp.NoStatistics, match="refused.*numeric column"):
        run_phase(frames, mode, Attack(f"clinic_{NODES[1]}", "inflate", 10.0))


def test_contributors_of_sites_sum_their_declared_rows_unless_one_declared_none():
    from shared.sum_bounds import Contributors

    assert Contributors.of([120.0, 80.0]) == Contributors(2, 200.0, ())
    assert Contributors.of([120.0, None, 80.0], [2.5]) == Contributors(3, None, (2.5,))  # a DP site: no cap
    assert Contributors.of([], ()).sites == 0
