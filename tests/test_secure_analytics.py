"""Federated analytics through the one secure-sum protocol (``server.analytics_phase.SecureGridAsker``).

In-process: a stand-in for Flower's Grid hands each request to the real site handlers
(``client.analytics``'s ``query.analytics_*`` answerers, ``client.secure_aggregation``'s rounds), one Flower
Context per node; the plain reference is ``simulation.analytics_run.run_in_process`` on the same tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context
from scipy import stats

from client import analytics as ca
from client.dp import SiteDP
from client.ledger import PrivacyLedger
from server.analytics_phase import AnalyticsSession, SecureGridAsker, run_analyses
from server.analytics_plan import AnalyticsSettings, plan_for
from shared.protocol import analytics as wire
from shared.protocol import messages
from shared.protocol import records as r
from simulation.analytics_run import run_in_process
from simulation.clinics import make_world, simulate_clinic
from tests.handler_grid import HandlerGrid

NODES = (31, 32, 33)
SETTINGS = AnalyticsSettings(k=2, seed=0, lloyd_iterations=30)
SKIPPED_KEYS = ("min", "max", "quantiles", "sites", "seconds", "timing", "skipped", "budget", "noise")
"""Not compared: min and max are not sums (null under the secure sum), quantiles are clipped to them without
it; who answered and how long it took."""


@pytest.fixture(scope="module")
def frames() -> dict[int, pd.DataFrame]:
    world = make_world(3, seed=2, patients_per_clinic=60)
    return {node: simulate_clinic(world, clinic)[0] for node, clinic in zip(NODES, world.clinics, strict=True)}


@dataclass
class Site:
    episodes: pd.DataFrame


@dataclass
class Request:
    """``client.site.SiteRequest`` as the analytics handlers use it: a site without DP."""

    site: Site
    config: ConfigRecord
    context: Context
    name: str
    dp = None


class Grid(HandlerGrid):
    """Flower's Grid as far as the analytics phase uses it: each message to that node's real handler."""

    answers = {m.type: ca._answerer(m.action) for m in messages.ANALYTICS}

    def __init__(self, frames: dict[int, pd.DataFrame], dps: dict | None = None) -> None:
        super().__init__(frames)
        self.frames, self.dps = frames, dict(dps or {})

    def request(self, node, msg, context):
        request = Request(Site(self.frames[node]), msg.content[r.CONFIG], context, f"clinic_{node}")
        request.dp = self.dps.get(node)
        return request


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Every test here runs server code: Flower's task identity set (conftest's ``task_identity``)."""


def secure_run(frames, mode, lost_at=None, settings=SETTINGS, dps=None):
    grid = Grid(frames, dps)
    grid.lost_at = lost_at or {}
    plan = plan_for(settings.task(), settings.dp)
    session = AnalyticsSession(SecureGridAsker(grid, mode), list(frames), plan.queries(settings),
                               {n: f"clinic_{n}" for n in frames}, plan.schedule(settings))
    return run_analyses(session, plan, settings), session, grid


def numbers(tree, path=()):
    """Every number of a result, by its path (keys in SKIPPED_KEYS left out)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in SKIPPED_KEYS:
                yield from numbers(value, (*path, str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from numbers(value, (*path, str(i)))
    elif isinstance(tree, int | float) and not isinstance(tree, bool) and tree is not None:
        yield "/".join(path), float(tree)


def assert_same_numbers(secure: dict, plain: dict) -> list[str]:
    """Every number equal within the fixed-point rounding; returns the paths that differ beyond it."""
    want, got = dict(numbers(plain)), dict(numbers(secure))
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    differ = []
    for path, value in want.items():
        same = math.isnan(got[path]) if math.isnan(value) else got[path] == pytest.approx(value, rel=1e-9, abs=1e-9)
        if not same:
            differ.append(f"{path}: {got[path]} vs {value}")
    return differ


@pytest.fixture(scope="module")
def plain(frames) -> dict:
    return run_in_process({f"clinic_{n}": f for n, f in frames.items()}, SETTINGS)


@pytest.mark.parametrize("mode", ["pairwise", "recovering"])
def test_every_analysis_through_the_secure_sum_equals_the_plain_run(frames, plain, mode):
    secure, session, grid = secure_run(frames, mode)
    assert not secure.get("skipped"), secure.get("skipped")
    assert assert_same_numbers(secure, plain) == []  # within the 2^-40 fixed-point rounding
    assert len(dict(numbers(plain))) > 1000  # describe, both regressions, ANOVA, PCA and k-means profiles
    assert secure["describe"]["age_years"]["min"] is None  # not a sum: not sent under the secure sum
    assert plain["describe"]["age_years"]["min"] is not None
    assert secure["anova"]["sites"] == [f"clinic_{n}" for n in NODES]
    queries = [c for c in grid.calls if c.startswith("query.analytics_")]
    keys = grid.calls.count(messages.SECURE_KEYS.type)
    assert keys == (1 if mode == "pairwise" else len(queries) - 1)  # recovering: one per release (not labels)


def test_a_sites_masked_answer_is_uniform_and_carries_no_array_in_the_clear(frames):
    _, _, grid = secure_run(frames, "pairwise", settings=AnalyticsSettings(analyses="describe"))
    content = next(c for kind, node, c in grid.replies if kind == messages.ANALYTICS_DESCRIBE.type and node == 31)
    assert dict(content[r.RELEASE]) == {}  # nothing released in the clear
    words = content[r.ARRAYS][wire.SECURE_VALUES].numpy()
    assert words.dtype == np.uint64 and words.size > 1000
    assert stats.kstest(words.astype(np.float64) / 2.0 ** 64, "uniform").pvalue > 1e-3


def test_recovering_a_site_lost_after_sending_is_in_the_sum_and_one_lost_before_is_left_out(frames):
    describe = AnalyticsSettings(analyses="describe")
    after, session, _ = secure_run(frames, "recovering", {33: (messages.SECURE_UNMASK.type, 1, False)}, describe)
    everyone = run_in_process({f"clinic_{n}": f for n, f in frames.items()}, describe)
    assert assert_same_numbers(after, everyone) == []  # 33 answered describe before it was lost: in the sum
    assert session.failures == {}  # lost after its answer; the describe query had it
    before, session, _ = secure_run(frames, "recovering", {33: (messages.ANALYTICS_DESCRIBE.type, 1, False)},
                                    describe)
    survivors = run_in_process({f"clinic_{n}": frames[n] for n in (31, 32)}, describe)
    assert assert_same_numbers(before, survivors) == []
    assert before["describe"]["age_years"]["count"] == survivors["describe"]["age_years"]["count"]
    assert before["describe"]["age_years"]["count"] < everyone["describe"]["age_years"]["count"]


def test_pairwise_a_lost_site_fails_the_query_clearly_and_the_next_query_rekeys(frames):
    settings = AnalyticsSettings(analyses="describe,regression")
    result, session, grid = secure_run(frames, "pairwise", {33: (messages.ANALYTICS_LINEAR.type, 1, False)},
                                       settings)
    reason = result["skipped"]["linear"]
    assert "secure sum failed at node 33: no reply" in reason and "recovering survives it" in reason
    assert session.sites == [31, 32] and session.failures == {"analytics_linear": {"clinic_33": "no reply"}}
    assert grid.calls.count(messages.SECURE_KEYS.type) == 2  # fresh keys for the two sites left
    logistic = result["regression"]["logistic"]
    assert logistic and all(entry["sites"] == ["clinic_31", "clinic_32"] for entry in logistic.values())


def test_pairwise_a_site_lost_in_the_anova_labels_round_fails_anova_not_a_silent_sum_and_pca_rekeys(frames):
    settings = AnalyticsSettings(analyses="describe,anova,pca")
    result, session, grid = secure_run(frames, "pairwise", {32: (messages.ANALYTICS_ANOVA.type, 1, False)}, settings)
    assert "node 32" in result["skipped"]["anova"] and "masks would stay in the sum" in result["skipped"]["anova"]
    assert result["anova"] is None and result["pca"]["sites"] == ["clinic_31", "clinic_33"]
    survivors = run_in_process({f"clinic_{n}": frames[n] for n in (31, 33)}, AnalyticsSettings(analyses="pca"))
    np.testing.assert_allclose(result["pca"]["eigenvalues"], survivors["pca"]["eigenvalues"], rtol=1e-9)
    assert grid.calls.count(messages.SECURE_KEYS.type) == 2


def test_a_dp_site_noises_before_masking_so_the_sum_holds_its_noise_and_its_ledger_is_charged_once(frames, tmp_path):
    dp = SiteDP(PrivacyLedger.open(tmp_path / "ledger.json", 3.0, 1e-5), {"analytics": 1.0})
    settings = AnalyticsSettings(analyses="describe", dp=True)
    result, session, grid = secure_run(frames, "recovering", settings=settings, dps={33: dp})
    assert result["describe"]["age_years"]["dp"] and result["describe"]["age_years"]["min"] is None
    facts = session.privacy["clinic_33"]
    assert facts["dp"] and facts["epsilon-spent"] == pytest.approx(facts["epsilon-planned"], rel=1e-3)  # one release
    assert not session.privacy["clinic_31"]["dp"]
    # the sum less the two exact sites' counts is site 33's count as it left the site: noised, within the noise
    plan = plan_for(settings.task(), True)
    columns = list(plan.columns)
    exact = {n: ca.answer(messages.ANALYTICS_DESCRIBE.action, frames[n],
                          {"columns": columns, "bins": settings.bins}, {"bounds": plan.bounds_array(columns)},
                          None).arrays["count"] for n in NODES}
    summed = np.array([result["describe"][c]["count"] for c in columns])
    released = summed - exact[31] - exact[32]
    assert np.all(np.abs(released - exact[33]) < 6 * facts["noise-sd"])
    assert np.mean(np.abs(released - exact[33]) > 1e-6) > 0.9  # noise on (almost) every entry
    assert result["describe"]["age_years"]["noise"]  # reported with the noise of the sum


def test_the_analytics_run_takes_the_runs_secure_sum_mode_and_refuses_an_unknown_one():
    assert AnalyticsSettings().secure_sum == "pairwise" and AnalyticsSettings(secure_sum=False).secure_sum == "off"
    with pytest.raises(ValueError, match="secure-sum"):
        AnalyticsSettings(secure_sum="sometimes")
