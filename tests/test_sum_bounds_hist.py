"""Histogram boosting's summed releases checked against what is public (``shared.hist_bounds``): honest runs pass,
plain, masked, recovering, without row counts and under DP; a site inflating its gradient and hessian histograms
is dropped and named (``secure-sum = off``, the trees then those of the other sites' rows) and an inflated masked
sum stops the heads, naming the release, the entry and the bound, never a value.

In process: the real site handlers and server phase over ``tests.test_hist_wire``'s stand-in Grid; the attack is
``simulation.attacks.inflated_hist`` (the site's histograms multiplied before noise, masks and packing).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from server import hist_phase as hp
from shared import hist_boosting as hb
from shared import hist_bounds, hist_wire
from shared.hist_learner import HistGradientBoosting
from shared.protocol import messages
from shared.sum_bounds import Contributors, InfeasibleSum
from simulation.attacks import inflated_hist
from tests.test_hist_wire import federate, federate_heads, same_trees

PARTS = {11: slice(0, 200), 12: slice(200, 550), 13: slice(550, 900)}
BOUND_MESSAGE = re.compile(r"^hist boosting: head '[^']+', round \d+, depth \d+: the summed [a-z ]+ is infeasible: "
                           r"it must satisfy .+ \(refused: ")
VALUE = re.compile(r"\d{3}|\d\.\d")
"""What a patient-derived value would look like in a message (the bounds' texts have constants like 1/4 only)."""


@pytest.fixture
def checks(monkeypatch):
    """Every level and count check the phase runs (release names), through the real checks."""
    seen = []
    level, counts = hp.check_level, hp.check_counts

    def spy_level(phase, *args):
        seen.append(phase)
        return level(phase, *args)

    def spy_counts(phase, *args):
        seen.append(phase)
        return counts(phase, *args)

    monkeypatch.setattr(hp, "check_level", spy_level)
    monkeypatch.setattr(hp, "check_counts", spy_counts)
    return seen


def pooled_trees(x, specs, labels, thresholds, rows, rounds=3):
    out = {}
    for spec in specs:
        y = labels[spec.key][rows]
        keep = ~np.isnan(y)
        out[spec.key] = HistGradientBoosting(spec.objective, n_estimators=rounds, max_depth=3,
                                             base_score=spec.base_score, scale_bits=hb.SCALE_BITS
                                             ).fit(x[rows][keep], y[keep], thresholds)
    return out


# -- honest runs: never refused ----------------------------------------------------------------------------


@pytest.mark.parametrize("secure_sum,legacy", [("off", False), ("pairwise", False), ("recovering", False),
                                               ("pairwise", True)])
def test_honest_runs_are_never_refused_and_every_release_was_checked(monkeypatch, checks, secure_sum, legacy):
    failures: dict[int, str] = {}
    _, session, trees, (x, specs, labels, thresholds) = federate_heads(monkeypatch, True, secure_sum, legacy,
                                                                       failures=failures)
    assert failures == {} and session.infeasible == {}
    assert {len(rounds) for rounds in trees.values()} == {3}
    pooled = pooled_trees(x, specs, labels, thresholds, np.arange(900))
    for spec in specs:
        same_trees(trees[spec.key], pooled[spec.key])
    per_site = 3 if secure_sum == "off" else 1  # off: each site's own release; else the one sum
    counts = [c for c in checks if c.startswith("hist boosting: hist_")]
    levels = [c for c in checks if c.startswith("hist boosting: head")]
    count_releases = session.exchanges[messages.HIST_BINS.type] + session.exchanges.get(messages.HIST_CELLS.type, 0)
    assert count_releases >= 1 and len(counts) == per_site * count_releases
    assert {c.split(",")[0] for c in levels} == {f"hist boosting: head {s.key!r}" for s in specs}


def test_honest_runs_capped_by_the_site_checks_rows_are_never_refused(monkeypatch):
    # the sites report no training rows (as without compact encodings), the site check's counts cap the sums
    declared = {node: float(s.stop - s.start) for node, s in PARTS.items()}
    monkeypatch.setattr(hp, "HistSession", functools.partial(hp.HistSession, declared=declared))
    failures: dict[int, str] = {}
    _, session, trees, _ = federate_heads(monkeypatch, True, "pairwise", legacy=True, failures=failures)
    assert failures == {} and session.infeasible == {} and session.site_rows == {}


def test_honest_dp_runs_are_never_refused(monkeypatch, tmp_path):
    from client.dp import SiteDP
    from client.ledger import PrivacyLedger

    for draw in range(3):
        dp = {node: SiteDP(PrivacyLedger.open(tmp_path / f"{draw}-{node}" / "ledger.json", 50.0, 1e-5),
                           {"boosting": 1.0}) for node in PARTS}
        failures: dict[int, str] = {}
        _, session, trees, _ = federate_heads(monkeypatch, True, rounds=2, dp=dp, failures=failures)
        assert session.n_rows is None and session.privacy  # noised releases, no row counts
        assert failures == {} and session.infeasible == {}, draw
        assert {len(rounds) for rounds in trees.values()} == {2}


# -- an inflating site -------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_an_inflating_site_is_dropped_alone_and_the_trees_are_the_other_sites(monkeypatch, checks, legacy):
    if legacy:  # no training rows reported: the site check's count caps the site's sums
        declared = {node: float(s.stop - s.start) for node, s in PARTS.items()}
        monkeypatch.setattr(hp, "HistSession", functools.partial(hp.HistSession, declared=declared))
    failures: dict[int, str] = {}
    with inflated_hist({12}, 2.0):
        _, session, trees, (x, specs, labels, thresholds) = federate_heads(monkeypatch, True, "off", legacy,
                                                                           failures=failures)
    assert failures == {} and list(session.infeasible) == [12] and session.nodes == [11, 13]
    assert session.lost[12].startswith("dropped: hist boosting: head 'y=0', round 0, depth 0: the summed hessian")
    assert BOUND_MESSAGE.match(session.infeasible[12].removeprefix("dropped: "))
    assert not VALUE.search(session.infeasible[12])
    rows = np.r_[np.arange(900)[PARTS[11]], np.arange(900)[PARTS[13]]]
    pooled = pooled_trees(x, specs, labels, thresholds, rows)  # the bins still count site 12's rows
    for spec in specs:
        same_trees(trees[spec.key], pooled[spec.key])


@pytest.mark.parametrize("secure_sum", ["pairwise", "recovering"])
@pytest.mark.parametrize("factor", [2.0, 1.25])
def test_an_inflated_masked_sum_stops_the_heads_naming_release_entry_and_bound(monkeypatch, secure_sum, factor):
    failures: dict[int, str] = {}
    with inflated_hist({12}, factor):
        _, session, trees, _ = federate_heads(monkeypatch, True, secure_sum, failures=failures)
    assert {len(rounds) for rounds in trees.values()} == {0}  # refused at the first level: no round kept
    assert list(failures) == [-1] and list(session.infeasible) == ["sum"]
    reason = session.infeasible["sum"]
    assert failures[-1] == f"y=0, y=1, y=2, effect: stopped after 0 rounds: {reason}"
    assert BOUND_MESSAGE.match(reason) and "hessian node totals" in reason and "the rows" in reason
    assert not VALUE.search(reason)


def test_the_attack_without_the_check_would_have_moved_the_trees(monkeypatch):
    # the old code's outcome: the same attack, the check switched off, grows other trees than the honest sites'
    monkeypatch.setattr(hp, "check_level", lambda *args: None)
    with inflated_hist({12}, 2.0):
        _, _, attacked, _ = federate_heads(monkeypatch, True, "pairwise")
    _, _, honest, _ = federate_heads(monkeypatch, True, "pairwise")
    differs = [any(list(a.leaf_value) != list(b.leaf_value) for a, b in zip(ra, rb, strict=True))
               for key in honest for ra, rb in zip(attacked[key], honest[key], strict=True)]
    assert any(differs)


def test_the_inflate_hist_attack_kind_rewrites_only_the_attackers_level_replies(monkeypatch, task_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import client.hist_handlers as hh
    from shared.protocol import hist as h
    from shared.protocol import messages as m
    from simulation.attacks import Attack, attack_mod

    assert Attack.parse("clinic_01:inflate-hist") == Attack("clinic_01", "inflate-hist", 2.0)
    seen = []

    def level_histograms(config, arrays, x, y, clip, context):  # what the site computes its bins from
        seen.append((hb.gradients("reg:squarederror", np.array([1.0, -2.0]), np.zeros((2, 1))),
                     h.GRADIENT_BOUND in config))
        return None, {}

    def handler(msg, context):
        hh.level_histograms(ConfigRecord({h.GRADIENT_BOUND: 3.0}), None, None, None, False, context)
        return msg

    monkeypatch.setattr(hh, "level_histograms", level_histograms)
    mod = attack_mod({0: Attack("clinic_01", "inflate-hist", 2.0)})
    for partition in (0, 1):
        context = Context(run_id=1, node_id=7, node_config={"partition-id": partition}, state=RecordDict(),
                          run_config={})
        mod(Message(RecordDict(), dst_node_id=7, message_type=m.HIST_LEVEL.type), context, handler)
    (g0, h0), bound0 = seen[0]
    (g1, h1), bound1 = seen[1]
    assert g0.ravel().tolist() == [-2.0, 4.0] and h0.ravel().tolist() == [2.0, 2.0] and not bound0  # the bound ignored
    assert g1.ravel().tolist() == [-1.0, 2.0] and h1.ravel().tolist() == [1.0, 1.0] and bound1


def test_a_site_claiming_more_training_rows_than_its_site_check_declared_is_left_out(monkeypatch):
    declared = {11: 200.0, 12: 349.0, 13: 350.0}  # site 12 has 350 training rows here, declared 349
    monkeypatch.setattr(hp, "HistSession", functools.partial(hp.HistSession, declared=declared))
    _, session, trees, _ = federate_heads(monkeypatch, True, "off")
    assert list(session.infeasible) == [12] and session.nodes == [11, 13] and session.n_rows == 550
    assert "its declared row count (site check)" in session.infeasible[12]


def test_a_wrong_hessian_floor_proof_is_refused_by_the_server_before_any_site_refuses(monkeypatch):
    # the floor says every row's fixed-point hessian is >= 1, but at 2 bits a logistic row can round to 0:
    # a root bin then holds gradient without hessian, beyond |G| <= H · ⌈B 2^s⌉ / floor
    monkeypatch.setattr(hist_wire, "hessian_floor", lambda *args: 1)
    with pytest.raises(hp.HistProtocolError, match="gradient bins is infeasible"):
        federate(monkeypatch, "binary:logistic", scale_bits=2, learning_rate=1.0, rounds=4)


# -- the bounds themselves ---------------------------------------------------------------------------------


def root(objective="binary:logistic", n=300, scale=hb.SCALE_BITS, seed=0):
    """One root's honest fixed-point histograms over 3 features of 8 bins, and its widths."""
    rng = np.random.default_rng(seed)
    bins = rng.integers(0, 8, size=(n, 3))
    g, h = hb.gradients(objective, rng.integers(0, 2, n).astype(float), np.zeros((n, 1)))
    out = hb.level_histograms(bins, np.zeros((1, n), dtype=np.int64), [(0, 0)], g, h, 8, scale)
    return out, np.array([8, 8, 8])


def level(hist, widths, who, rows=300.0, objective="binary:logistic"):
    hist_bounds.check_level("hist boosting: test", hist, widths, objective, hb.SCALE_BITS, 1.0,
                            hist_wire.hessian_floor(objective, 0.0, 1, hb.SCALE_BITS), 3.0, [None], False, who,
                            rows)


def test_the_bounds_pass_honest_histograms_and_name_each_broken_constraint():
    hist, widths = root()
    who = Contributors(1, 300.0)
    level(hist, widths, who)
    cases = {"hessian node totals": lambda a: a.__setitem__((..., 1), a[..., 1] * 2),  # 2 · 300 · 1/4 > cap
             "hessian bins": lambda a: a.__setitem__((0, 0, 3, 1), -1),
             "gradient bins": lambda a: a.__setitem__((0, 1, slice(2, 4), 0),  # the node's total kept
                                                      a[0, 1, 2:4, 0] + np.array([10, -10]) * a[0, 1, 2, 1]),
             "gradient node totals": lambda a: a.__setitem__((0, 2, 0, 0), a[0, 2, 0, 0] + 1)}
    for entry, poison in cases.items():
        bad = hist.copy()
        poison(bad)
        with pytest.raises(InfeasibleSum, match=f"the summed {entry} is infeasible") as err:
            level(bad, widths, who)
        assert not VALUE.search(str(err.value))  # names the bound, never a value
    squared, _ = root("reg:squarederror")
    level(squared, widths, who, objective="reg:squarederror")
    with pytest.raises(InfeasibleSum, match="hessian node totals"):  # h = 1 a row: H ≤ rows exactly
        level(squared, widths, Contributors(1, 299.0), 299.0, "reg:squarederror")


def test_count_releases_must_add_to_the_reported_rows_or_stay_below_the_declared_ones():
    counts = [np.array([3.0, 0.0, 7.0]), np.array([10.0, 0.0])]
    hist_bounds.check_counts("c", counts, Contributors(1, 10.0), exact=True)
    hist_bounds.check_counts("c", counts, Contributors(1, 12.0), exact=False)
    for who, exact in ((Contributors(1, 12.0), True), (Contributors(1, 9.0), False)):
        with pytest.raises(InfeasibleSum, match="cell counts"):
            hist_bounds.check_counts("c", counts, who, exact)
    with pytest.raises(InfeasibleSum, match="the same total"):  # no row count known: features must agree
        hist_bounds.check_counts("c", [counts[0], counts[1] * 2], Contributors(1), exact=False)
    with pytest.raises(InfeasibleSum, match="every count ≥ 0"):
        hist_bounds.check_counts("c", [np.array([-1.0, 11.0])], Contributors(1, 10.0), exact=True)
