"""Federated analytics equal the pooled computation without DP, degrade gracefully with DP, and pay the ledger.

Fast tests call the site functions (``client.analytics``) and server phases (``server.analytics_phase``) directly,
in process (``simulation.analytics_run.run_in_process``); one slow test runs the whole thing in Flower's
simulation runtime. Pooled references are plain numpy / scipy on the concatenated rows.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import stats

from client.analytics import Release, answer, describe
from client.dp import Block, PhaseRelease, SiteDP, gaussian_release, sensitivity
from client.ledger import PrivacyLedger, calibrate_noise
from server.analytics_phase import SiteAnswer, combine_describe
from server.analytics_plan import (
    KMEANS_FEATURES,
    LOGISTIC_OUTCOMES,
    REGRESSION_COVARIATES,
    AnalyticsSettings,
    plan_for,
)
from shared.protocol.privacy import RELEASE_INDEX, RELEASES
from shared.task import NANOPARTICLE_TASK
from simulation.analytics_run import run_in_process
from simulation.clinics import make_world, simulate_clinic

RTOL = 1e-6


def dp_site(path, budget: float, analytics_share: float = 1.0) -> SiteDP:
    """A DP site's terms: a ledger at ``path`` and the share of its ε it grants analytics."""
    return SiteDP(PrivacyLedger.open(path, budget, 1e-5), {"analytics": analytics_share})


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    """Three simulated clinics' episode tables (a few hundred rows each)."""
    world = make_world(3, seed=1, patients_per_clinic=80)
    return {clinic.name: simulate_clinic(world, clinic)[0] for clinic in world.clinics}


@pytest.fixture(scope="module")
def pooled(frames) -> pd.DataFrame:
    """The clinics' rows in one table: what the federation must reproduce."""
    return pd.concat(list(frames.values()), ignore_index=True)


@pytest.fixture(scope="module")
def result(frames) -> dict:
    """Every analysis, in process, without DP."""
    return run_in_process(frames, AnalyticsSettings(k=3, seed=0))


def columns(frame: pd.DataFrame, names) -> np.ndarray:
    """Columns as a float matrix with NaN for missing."""
    return np.column_stack([pd.to_numeric(frame[n]).to_numpy(dtype=float, na_value=np.nan) for n in names])


def complete(frame: pd.DataFrame, names) -> np.ndarray:
    """Rows complete in the columns (complete-case analysis)."""
    values = columns(frame, names)
    return values[~np.isnan(values).any(axis=1)]


def pooled_newton(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Logistic MLE and its inverse-Hessian covariance on the raw design [1, x]."""
    design = np.column_stack([np.ones(len(x)), x])
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-design @ beta))
        hessian = design.T @ (design * (p * (1 - p))[:, None])
        beta = beta + np.linalg.solve(hessian, design.T @ (y - p))
    p = 1 / (1 + np.exp(-design @ beta))
    return beta, np.linalg.inv(design.T @ (design * (p * (1 - p))[:, None]))


def pooled_lloyd(z: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Plain Lloyd iterations on pooled rows from given centroids (empty cluster: kept)."""
    for _ in range(iterations):
        nearest = np.argmin(np.square(z[:, None, :] - centroids[None]).sum(axis=2), axis=1)
        centroids = np.array([z[nearest == c].mean(axis=0) if (nearest == c).any() else centroids[c]
                              for c in range(len(centroids))])
    return centroids


def estimates(fit: dict, key: str = "estimate") -> np.ndarray:
    """One field of every term of a fitted regression, in order."""
    return np.array([row[key] for row in fit["coefficients"].values()], dtype=float)


# ---------------------------------------------------------------------------------------------------------
# Without DP: every statistic equals the pooled one


def test_descriptive_statistics_equal_the_pooled_table(result, pooled):
    """count, mean, sd (n − 1), min, max equal numpy on pooled rows."""
    assert set(result["describe"]) >= set(NANOPARTICLE_TASK.numeric) | {"efficacy_pct", "response"}
    for column, got in result["describe"].items():
        values = columns(pooled, [column])[:, 0]
        values = values[~np.isnan(values)]
        assert got["count"] == len(values), column
        np.testing.assert_allclose(got["mean"], values.mean(), rtol=RTOL, err_msg=column)
        np.testing.assert_allclose(got["sd"], values.std(ddof=1), rtol=RTOL, atol=1e-12, err_msg=column)
        assert (got["min"], got["max"]) == (values.min(), values.max()), column
        assert got["min"] <= got["quantiles"]["p50"] <= got["max"]


def test_linear_regression_equals_pooled_least_squares_with_standard_errors(result, pooled):
    """Coefficients, SEs, p-values and R² equal numpy lstsq on the pooled complete cases."""
    fit = result["regression"]["linear"]["efficacy_pct"]
    rows = complete(pooled, (*REGRESSION_COVARIATES, "efficacy_pct"))
    design, y = np.column_stack([np.ones(len(rows)), rows[:, :-1]]), rows[:, -1]
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ beta
    df = len(y) - design.shape[1]
    se = np.sqrt(np.diag(residual @ residual / df * np.linalg.inv(design.T @ design)))
    assert fit["n"] == len(y) and list(fit["coefficients"]) == ["intercept", *REGRESSION_COVARIATES]
    np.testing.assert_allclose(estimates(fit), beta, rtol=RTOL)
    np.testing.assert_allclose(estimates(fit, "se"), se, rtol=RTOL)
    np.testing.assert_allclose(estimates(fit, "p"), 2 * stats.t.sf(np.abs(beta / se), df), rtol=1e-5)
    np.testing.assert_allclose(fit["r2"], 1 - residual @ residual / np.square(y - y.mean()).sum(), rtol=RTOL)


@pytest.mark.parametrize("outcome", LOGISTIC_OUTCOMES)
def test_logistic_regression_equals_a_pooled_newton_fit(result, pooled, outcome):
    """Coefficients and inverse-Hessian SEs equal a pooled Newton fit on the raw design."""
    fit = result["regression"]["logistic"][outcome]
    rows = complete(pooled, (*REGRESSION_COVARIATES, outcome))
    beta, covariance = pooled_newton(rows[:, :-1], rows[:, -1])
    assert fit["converged"] and fit["n"] == len(rows)
    np.testing.assert_allclose(estimates(fit), beta, rtol=RTOL)
    np.testing.assert_allclose(estimates(fit, "se"), np.sqrt(np.diag(covariance)), rtol=RTOL)


def test_anova_across_formulations_equals_scipy_f_oneway(result, pooled):
    """F and p equal scipy.stats.f_oneway on the pooled formulation groups."""
    rows = pooled[pooled["efficacy_pct"].notna()]
    groups = [g["efficacy_pct"].to_numpy(float) for _, g in rows.groupby("formulation_id")]
    reference = stats.f_oneway(*groups)
    anova = result["anova"]
    assert anova["k"] == len(groups) and anova["n"] == len(rows)
    np.testing.assert_allclose(anova["f"], reference.statistic, rtol=RTOL)
    np.testing.assert_allclose(anova["p"], reference.pvalue, rtol=RTOL)


def test_pca_eigenvalues_equal_numpy_on_pooled_standardised_rows(result, pooled):
    """Eigenvalues equal those of the pooled complete-case correlation matrix."""
    rows = complete(pooled, KMEANS_FEATURES)
    z = (rows - rows.mean(axis=0)) / rows.std(axis=0, ddof=1)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(z.T)))[::-1]
    pca = result["pca"]
    np.testing.assert_allclose(pca["eigenvalues"], eigenvalues, rtol=RTOL)
    np.testing.assert_allclose(pca["explained_variance_ratio"], eigenvalues / eigenvalues.sum(), rtol=RTOL)
    np.testing.assert_allclose(list(pca["mean"].values()), rows.mean(axis=0), rtol=RTOL)


def test_kmeans_equals_pooled_lloyd_from_the_same_initial_centroids(result, pooled):
    """Centroids, inertia, silhouette and profiles equal pooled Lloyd from the same start."""
    km = result["kmeans"]
    rows = complete(pooled, KMEANS_FEATURES)
    z = (rows - rows.mean(axis=0)) / rows.std(axis=0, ddof=1)
    centroids = pooled_lloyd(z, np.array(km["initial_centroids_standardised"]), km["iterations"])
    assert km["converged"]
    np.testing.assert_allclose(km["centroids_standardised"], centroids, rtol=RTOL, atol=1e-9)
    distances = np.square(z[:, None, :] - centroids[None]).sum(axis=2)
    order = np.sort(distances, axis=1)
    nearest = np.argmin(distances, axis=1)
    a, b = np.sqrt(order[:, 0]), np.sqrt(order[:, 1])
    np.testing.assert_allclose(km["inertia"], order[:, 0].sum(), rtol=RTOL)
    np.testing.assert_allclose(km["silhouette_simplified"], np.mean((b - a) / np.maximum(a, b)), rtol=RTOL)
    outcomes = columns(pooled.loc[~np.isnan(columns(pooled, KMEANS_FEATURES)).any(axis=1)], ["response"])[:, 0]
    for c, profile in enumerate(km["profiles"]):
        mine = nearest == c
        assert profile["n"] == mine.sum()
        np.testing.assert_allclose(list(profile["means"].values()), rows[mine].mean(axis=0), rtol=RTOL)
        np.testing.assert_allclose(profile["outcomes"]["response"]["mean"], np.nanmean(outcomes[mine]), rtol=RTOL)


def test_initial_centroids_lie_on_the_one_sd_ellipse_of_the_top_two_components(result):
    """The aggregate-only initialisation is what the docs say."""
    km, pca = result["kmeans"], result["pca"]
    components, sd = np.array(pca["components"]), np.sqrt(pca["eigenvalues"])
    scores = np.array(km["initial_centroids_standardised"]) @ components[:2].T / sd[:2]
    np.testing.assert_allclose(np.hypot(scores[:, 0], scores[:, 1]), 1.0, rtol=1e-9)
    assert len(km["initial_centroids_standardised"]) == 3


def test_an_aliased_covariate_is_reported_null_and_the_rest_equal_pooled(frames):
    """A constant covariate is aliased (null); the others equal lstsq without it."""
    constant = {name: frame.assign(pegylated=1) for name, frame in frames.items()}
    fit = run_in_process(constant, AnalyticsSettings())["regression"]["linear"]["efficacy_pct"]
    assert fit["coefficients"]["pegylated"]["aliased"] and fit["coefficients"]["pegylated"]["estimate"] is None
    kept = [c for c in REGRESSION_COVARIATES if c != "pegylated"]
    rows = complete(pd.concat(list(constant.values())), (*kept, "efficacy_pct"))
    beta = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), rows[:, :-1]]), rows[:, -1], rcond=None)[0]
    got = [fit["coefficients"][t]["estimate"] for t in ["intercept", *kept]]
    np.testing.assert_allclose(got, beta, rtol=RTOL)


def test_generic_regression_task_is_analysed_and_inapplicable_analyses_say_why(tmp_path):
    """A task spec's regression target is fitted; logistic is skipped with a reason."""
    rng = np.random.default_rng(0)
    task = tmp_path / "task.toml"
    task.write_text('[task]\nkind = "regression"\ntarget = "y"\n[features]\nnumeric = ["a", "b"]\n'
                    'categorical = ["g"]\n[ranges]\na = [-10, 10]\ny = [-50, 50]\n')
    sites = {}
    for s in range(3):
        a, b = rng.normal(size=60), rng.normal(size=60)
        sites[f"s{s}"] = pd.DataFrame({"a": a, "b": b, "g": rng.choice(["u", "v", "w"], 60),
                                       "y": 1 + 2 * a - b + rng.normal(size=60)})
    got = run_in_process(sites, AnalyticsSettings(task_path=str(task), k=2))
    rows = pd.concat(list(sites.values()))
    beta = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), rows[["a", "b"]]]), rows["y"], rcond=None)[0]
    np.testing.assert_allclose(estimates(got["regression"]["linear"]["y"]), beta, rtol=RTOL)
    assert "logistic" in got["skipped"] and got["anova"]["factor"] == "g" and got["kmeans"]["k"] == 2
    assert got["describe"]["b"]["quantiles"] is None  # no declared range: no grid for a histogram
    dp_plan = plan_for(AnalyticsSettings(task_path=str(task)).task(), dp=True)
    assert "b" not in dp_plan.columns and any("b" in note for note in dp_plan.notes)


# ---------------------------------------------------------------------------------------------------------
# With DP


def test_a_gaussian_mechanism_is_the_ledger_history_entry_sigma_rate_one_one_step():
    """RDP of (σ, q = 1, 1 step) in Opacus is α / (2σ²): the Gaussian mechanism."""
    orders = [1.5, 2.0, 8.0, 32.0]
    for sigma in (0.7, 2.0, 15.0):
        np.testing.assert_allclose(rdp_analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders),
                                   np.array(orders) / (2 * sigma ** 2), rtol=1e-12)


def test_noise_sd_is_sigma_times_l2_sensitivity_times_each_entrys_scale():
    """The noise an entry gets is σ × sqrt(Σ touched) × its scale."""
    release = Release(blocks={"a": Block(np.zeros(40_000), 2.0, 3), "b": Block(np.zeros(2), 1.0, 1)})
    noised = gaussian_release(release.blocks, sigma=1.5, rng=np.random.default_rng(0))
    assert sensitivity(release.blocks) == 2.0
    assert noised["a"].std() == pytest.approx(1.5 * 2.0 * 2.0, rel=0.02)


def test_released_means_get_closer_to_pooled_as_epsilon_grows(frames, pooled):
    """Mean error of DP means, averaged over seeds, falls as ε goes 0.5 → 2 → 8."""
    plan = plan_for(NANOPARTICLE_TASK, dp=True)
    cols, bounds = list(plan.columns), plan.bounds_array(plan.columns)
    releases = [describe(frame, cols, bounds, 100) for frame in frames.values()]
    truth = {c: (np.nanmean(columns(pooled, [c])), np.nanstd(columns(pooled, [c]))) for c in cols}
    errors = []
    for epsilon in (0.5, 2.0, 8.0):
        sigma = calibrate_noise(epsilon, 1e-5, 1.0, 1)
        runs = []
        for seed in range(8):
            rng = np.random.default_rng(seed)
            answers = [SiteAnswer(f"s{i}", gaussian_release(r.blocks, sigma, rng), meta={"dp": True, "noise-sd": sigma})
                       for i, r in enumerate(releases)]
            got = combine_describe(answers, cols, plan, 100)
            runs.append(np.mean([abs(got[c]["mean"] - m) / max(s, 1e-9) for c, (m, s) in truth.items()]))
        errors.append(np.mean(runs))
    assert errors[0] > errors[1] > errors[2], errors


def test_a_dp_site_never_sends_min_max_or_other_unbounded_values(frames, tmp_path):
    """A DP site sends noised sums only, and refuses a column without a range."""
    frame = next(iter(frames.values()))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    release = PhaseRelease.for_phase(context, dp_site(tmp_path / "ledger.json", 10.0, 0.1), "analytics", releases=2)
    config = {"columns": ["age_years"], "bins": 10, RELEASES: 2, RELEASE_INDEX: 0}
    got = answer("analytics_describe", frame, config, {"bounds": np.array([[18.0, 110.0]])}, release)
    assert set(got.arrays) == {"count", "sum", "sumsq", "histogram"} and got.meta["dp"]
    with pytest.raises(ValueError, match="no finite bound per row"):
        answer("analytics_describe", frame, config | {RELEASE_INDEX: 1}, {"bounds": np.array([[np.nan, np.nan]])},
               release)


def test_dp_run_is_charged_to_the_site_ledger_and_refused_past_budget(frames, tmp_path):
    """Each query is one (σ, 1, 1) ledger entry, describe's at the noise of half the run's privacy loss and the
    other 14 at the noise of 1/28 each (BUDGET_RULE); a run past the budget is refused."""
    sites = {name: dp_site(tmp_path / f"{name}.json", 1.0) for name in frames}
    ledgers = {name: site.ledger for name, site in sites.items()}
    settings = AnalyticsSettings(dp=True)
    first = run_in_process(frames, settings, sites, np.random.default_rng(0))
    planned = first["queries"]["planned"]
    assert first["queries"]["asked"] == planned and not first["failures"]
    for name, ledger in ledgers.items():
        reopened = PrivacyLedger.open(ledger.path, 1.0, 1e-5)
        assert 0.9 < reopened.spent() <= 1.0 + 1e-9
        assert len(reopened.entries) == planned and [h[1:] for h in reopened.history] == [(1.0, 1), (1.0, planned - 1)]
        (describe_sigma, _, _), (other_sigma, _, _) = reopened.history
        assert other_sigma / describe_sigma == pytest.approx(math.sqrt(planned - 1))
        assert first["privacy"][name]["dp"] and first["describe"]["age_years"]["min"] is None
    for key in ("describe", "regression", "anova", "pca", "kmeans"):
        json.dumps(first[key], allow_nan=False)
    second = run_in_process(frames, settings, {name: dp_site(lg.path, 1.0) for name, lg in ledgers.items()},
                            np.random.default_rng(1))
    assert "budget" in second["skipped"]["describe"]
    assert set(second["failures"]["analytics_describe"]) == set(frames)
    assert all(len(PrivacyLedger.open(lg.path, 1.0, 1e-5).entries) == planned for lg in ledgers.values())


def test_dp_statistics_come_close_with_a_large_budget(frames, tmp_path, result):
    """With a large ε the DP statistics approach the exact ones."""
    sites = {name: dp_site(tmp_path / f"{name}.json", 200.0, 0.5) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True), sites, np.random.default_rng(0))
    assert got["describe"]["age_years"]["mean"] == pytest.approx(result["describe"]["age_years"]["mean"], rel=0.01)
    assert got["pca"]["eigenvalues"][0] == pytest.approx(result["pca"]["eigenvalues"][0], rel=0.1)
    assert math.isfinite(got["regression"]["linear"]["efficacy_pct"]["coefficients"]["ecog"]["estimate"])


def test_one_dp_site_in_a_run_not_started_for_dp_gets_a_run_planned_for_its_dp(frames, tmp_path):
    """The site, not the server, decides DP: a run asked without DP is planned for the DP site, as the Flower
    run plans it (DP iteration caps announced from the first query, every announced query asked), so the
    site's ledger spends exactly the ε it planned and only that site's answers are noised."""
    dp_site_name = sorted(frames)[0]
    site = dp_site(tmp_path / "ledger.json", 5.0, 0.2)
    ledger = site.ledger
    got = run_in_process(frames, AnalyticsSettings(), {dp_site_name: site}, np.random.default_rng(0))
    assert got["privacy"][dp_site_name]["dp"] and not any(p["dp"] for s, p in got["privacy"].items()
                                                          if s != dp_site_name)
    assert got["describe"]["age_years"]["min"] is None and "dp_note" not in got
    caps = AnalyticsSettings()
    planned = plan_for(NANOPARTICLE_TASK, dp=True).queries(AnalyticsSettings(dp=True))
    assert planned == 5 + caps.dp_newton_iterations + caps.dp_lloyd_iterations
    assert got["queries"] == {"planned": planned, "asked": planned} and got["settings"]["dp"]
    assert len(ledger.entries) == planned
    assert ledger.spent() == pytest.approx(1.0, rel=1e-3) and ledger.spent() <= 1.0 + 1e-9


# ---------------------------------------------------------------------------------------------------------
# Flower


@pytest.mark.slow
def test_flower_run_writes_analytics_equal_to_pooled(tmp_path):
    """The Flower simulation writes every file and its statistics equal pooled ones."""
    from shared.validation import load_site
    from simulation.analytics_run import run_analytics

    out = tmp_path / "analytics"
    got = run_analytics(out, clinics=3, k=3, seed=2, patients_per_clinic=30)
    for name in ("analytics.json", "analytics.md", "describe.csv", "regression_linear_efficacy_pct.csv",
                 "regression_logistic_response.csv", "anova.csv", "kmeans_profiles.csv", "pca_clusters.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "analytics.json").read_text()) == got
    pooled = pd.concat([load_site(out / "sites" / site).episodes for site in got["sites"]], ignore_index=True)
    assert len(got["sites"]) == 3 and not got["failures"]
    ages = columns(pooled, ["age_years"])[:, 0]
    assert got["describe"]["age_years"]["count"] == len(ages)
    np.testing.assert_allclose(got["describe"]["age_years"]["sd"], ages.std(ddof=1), rtol=RTOL)
    rows = complete(pooled, (*REGRESSION_COVARIATES, "efficacy_pct"))
    beta = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), rows[:, :-1]]), rows[:, -1], rcond=None)[0]
    np.testing.assert_allclose(estimates(got["regression"]["linear"]["efficacy_pct"]), beta, rtol=RTOL)
    groups = [g["efficacy_pct"].dropna().to_numpy(float) for _, g in pooled.groupby("formulation_id")]
    np.testing.assert_allclose(got["anova"]["f"], stats.f_oneway(*[g for g in groups if len(g)]).statistic,
                               rtol=RTOL)
    features = complete(pooled, KMEANS_FEATURES)
    z = (features - features.mean(axis=0)) / features.std(axis=0, ddof=1)
    np.testing.assert_allclose(got["pca"]["eigenvalues"], np.sort(np.linalg.eigvalsh(np.cov(z.T)))[::-1], rtol=RTOL)
    km = got["kmeans"]
    centroids = pooled_lloyd(z, np.array(km["initial_centroids_standardised"]), km["iterations"])
    np.testing.assert_allclose(km["centroids_standardised"], centroids, rtol=RTOL, atol=1e-9)
