"""The analytics' summed releases checked against what is public (``shared.analytics_bounds``): honest answers pass,
plain or DP, at the edge of their ranges too; an inflating site is dropped and named (``secure-sum = off``) and an
inflated secure sum is refused naming the query, the entry and the bound, never a value.

In process: the sites' own analytics code (``simulation.analytics_run.run_in_process``, and the secure-sum
tests' in-process Grid over the real handlers for masked runs); the attack is ``simulation.attacks.
inflated_analytics`` (the site's sums multiplied before noise and masks).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from client.analytics import describe, linear_sums
from client.dp import SiteDP
from client.ledger import PrivacyLedger
from server.analytics_phase import AnalyticsSession, SecureGridAsker, run_analyses
from server.analytics_plan import AnalyticsSettings, plan_for
from shared.analytics_bounds import check_analytics
from shared.protocol import messages
from shared.sum_bounds import Contributors, InfeasibleSum
from simulation.analytics_run import run_in_process
from simulation.attacks import inflated_analytics
from simulation.clinics import make_world, simulate_clinic
from tests.test_secure_analytics import Grid

SETTINGS = AnalyticsSettings(k=2, seed=0, lloyd_iterations=10)
DESCRIBE = messages.ANALYTICS_DESCRIBE.action


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    world = make_world(3, seed=4, patients_per_clinic=60)
    return {clinic.name: simulate_clinic(world, clinic)[0] for clinic in world.clinics}


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """The masked runs here run server code: Flower's task identity set (conftest's ``task_identity``)."""


def analyses_done(result: dict) -> set[str]:
    done = {"describe"} if result["describe"] else set()
    done |= {k for k in ("anova", "pca", "kmeans") if result[k]}
    done |= {f"regression/{k}" for k in ("linear", "logistic") if result["regression"][k]}
    return done


EVERY_ANALYSIS = {"describe", "anova", "pca", "kmeans", "regression/linear", "regression/logistic"}


def test_an_honest_plain_run_is_never_refused_and_every_query_was_checked(frames, monkeypatch):
    checked = []
    import server.analytics_phase as phase

    def spy(query, config, arrays, released, who, ranges):
        checked.append((query, who.declared))
        return check_analytics(query, config, arrays, released, who, ranges)

    monkeypatch.setattr(phase, "check_analytics", spy)
    result = run_in_process(frames, SETTINGS)
    assert result["infeasible"] == {} and analyses_done(result) == EVERY_ANALYSIS
    assert {q for q, _ in checked} == {m.action for m in messages.ANALYTICS}
    # each site alone, capped by its own declared rows (its table's length, as the site check's n_episodes)
    assert {d for _, d in checked} == {float(len(f)) for f in frames.values()}


def test_honest_dp_runs_are_never_refused(frames, tmp_path):
    for draw in range(4):
        dps = {name: SiteDP(PrivacyLedger.open(tmp_path / f"{draw}-{name}.json", 3.0, 1e-5), {"analytics": 1.0})
               for name in list(frames)[:2]}
        result = run_in_process(frames, SETTINGS, dps=dps, rng=np.random.default_rng(draw))
        assert result["infeasible"] == {}, draw
        assert analyses_done(result) == EVERY_ANALYSIS, result["skipped"]


def test_a_plain_sites_exact_sums_are_bounded_by_the_declared_ranges_not_the_dp_narrowed_ones(frames):
    """After a DP describe the later requests carry narrower ranges (``dp_analysis_bounds``): a site without DP
    clips its sums to them but sends its raw sum and M2 of unclipped values, within the declared range only."""
    plan = plan_for(SETTINGS.task(), True)
    response, factor = plan.anova
    frame = next(iter(frames.values()))
    lo, hi = plan.range_of(response)
    values = pd.to_numeric(frame[response]).dropna()
    narrowed = np.array([[values.quantile(0.3), values.quantile(0.7)]])
    from client.analytics import group_moments
    released = group_moments(frame, response, factor, narrowed).exact_arrays()
    config, arrays = {"response": response, "factor": factor}, {"bounds": narrowed}
    who = Contributors(1, float(len(frame)))
    with pytest.raises(InfeasibleSum, match="group (raw sum|centred sum of squares)"):
        check_analytics(messages.ANALYTICS_ANOVA.action, config, arrays, released, who)
    check_analytics(messages.ANALYTICS_ANOVA.action, config, arrays, released, who, {response: (lo, hi)})


def test_every_value_at_the_edge_of_its_range_passes_alone(frames):
    """The check's limits are the per-row terms' extremes: a site whose every value sits at the top of its
    declared range is feasible (what the check cannot tell from honest)."""
    plan = plan_for(SETTINGS.task(), False)
    columns = list(plan.columns)
    bounds = plan.bounds_array(columns)
    frame = next(iter(frames.values())).copy()
    for j, column in enumerate(columns):
        if np.isfinite(bounds[j]).all():
            frame[column] = bounds[j, 1]
    release = describe(frame, columns, bounds, SETTINGS.bins)
    check_analytics(DESCRIBE, {"columns": columns, "bins": SETTINGS.bins}, {"bounds": bounds},
                    release.exact_arrays(), Contributors(1, float(len(frame))))
    covariates, outcomes = list(plan.covariates), list(plan.linear)
    both = list(covariates) + list(outcomes)
    arrays = {"centre": np.zeros(len(both)), "scale": np.ones(len(both)), "bounds": plan.bounds_array(both)}
    from client.analytics import Standardiser
    x = Standardiser(arrays["centre"][:len(covariates)], arrays["scale"][:len(covariates)],
                     arrays["bounds"][:len(covariates)])
    y = Standardiser(arrays["centre"][len(covariates):], arrays["scale"][len(covariates):],
                     arrays["bounds"][len(covariates):])
    check_analytics(messages.ANALYTICS_LINEAR.action, {"covariates": covariates, "outcomes": outcomes}, arrays,
                    linear_sums(frame, covariates, outcomes, x, y).exact_arrays(), Contributors(1, float(len(frame))))


def test_a_site_claiming_more_rows_than_it_declared_is_refused_naming_the_bound(frames):
    plan = plan_for(SETTINGS.task(), False)
    columns = list(plan.columns)
    frame = next(iter(frames.values()))
    release = describe(frame, columns, plan.bounds_array(columns), SETTINGS.bins).exact_arrays()
    config, arrays = {"columns": columns, "bins": SETTINGS.bins}, {"bounds": plan.bounds_array(columns)}
    check_analytics(DESCRIBE, config, arrays, release, Contributors(1, float(len(frame))))
    with pytest.raises(InfeasibleSum, match=r"analytics_describe: the summed count is infeasible: it must satisfy "
                                            r"count ≤ the sum of the sites' declared row counts"):
        check_analytics(DESCRIBE, config, arrays, release, Contributors(1, float(len(frame)) / 2))


@pytest.mark.parametrize("factor", [2.0, 10.0])
def test_an_inflating_site_is_dropped_and_named_and_the_rest_equal_the_others_run(frames, factor):
    attacker = max(frames, key=lambda name: len(frames[name]))
    with inflated_analytics(frames[attacker], factor):
        result = run_in_process(frames, SETTINGS)
    others = run_in_process({n: f for n, f in frames.items() if n != attacker}, SETTINGS)
    assert set(result["infeasible"]) == {DESCRIBE} and set(result["infeasible"][DESCRIBE]) == {attacker}
    assert "declared range" in result["infeasible"][DESCRIBE][attacker]
    for column, stats in others["describe"].items():
        assert result["describe"][column]["count"] == stats["count"], column
        assert result["describe"][column]["mean"] == pytest.approx(stats["mean"], rel=1e-12), column
    assert analyses_done(result) == EVERY_ANALYSIS


def secure_run(frames: dict[str, pd.DataFrame], attacker: str | None, factor: float) -> dict:
    nodes = {31 + i: frame for i, frame in enumerate(frames.values())}
    grid = Grid(nodes)
    plan = plan_for(SETTINGS.task(), SETTINGS.dp)
    session = AnalyticsSession(SecureGridAsker(grid, "pairwise"), list(nodes), plan.queries(SETTINGS),
                               {n: f"clinic_{n}" for n in nodes}, plan.schedule(SETTINGS),
                               {n: float(len(f)) for n, f in nodes.items()})
    if attacker is None:
        return run_analyses(session, plan, SETTINGS)
    with inflated_analytics(frames[attacker], factor):
        return run_analyses(session, plan, SETTINGS)


def test_an_inflated_secure_sum_is_refused_naming_query_entry_and_bound_never_a_value(frames):
    honest = secure_run(frames, None, 1.0)
    assert honest["infeasible"] == {} and analyses_done(honest) == EVERY_ANALYSIS
    attacker = max(frames, key=lambda name: len(frames[name]))
    result = secure_run(frames, attacker, 10.0)
    why = result["skipped"]["describe"]
    assert why.startswith("analytics_describe: the summed column") and "must satisfy" in why
    assert result["infeasible"][DESCRIBE] == {"sum": why} and result["describe"] == {}
    assert not re.search(r"\d+\.\d", why)  # no released value in the reason, only the bound's form
