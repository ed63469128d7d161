"""Issue 19: every DP-released analytics number carries its noise sd and 95 % interval, a number the noise
swamps or that hit a bound is "not estimable at ε = …", and the run's ε is planned for the analyses asked.

In process (``simulation.analytics_run.run_in_process``) with the site code and server code a Flower run uses.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from client.analytics import describe, linear_sums, release_weights
from client.dp import gaussian_release, sensitivity
from client.ledger import calibrate_noise
from fednano.cli import app
from server.analytics_phase import SiteAnswer, combine_describe, standardisation
from server.analytics_plan import REGRESSION_COVARIATES, AnalyticsSettings, chosen_analyses, plan_for
from shared import dp_error
from shared.analytics import linear_fit, row_bound, unpack_triu
from shared.protocol import analytics as wire
from shared.protocol.privacy import RELEASE_WEIGHTS
from shared.task import NANOPARTICLE_TASK
from simulation.analytics_run import markdown, run_in_process, write_report
from simulation.clinics import make_world, simulate_clinic
from tests.test_analytics import dp_site


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    """Three simulated clinics (about 1,000 episodes each)."""
    world = make_world(3, seed=11, patients_per_clinic=260)
    return {clinic.name: simulate_clinic(world, clinic)[0] for clinic in world.clinics}


@pytest.fixture(scope="module")
def pooled(frames) -> pd.DataFrame:
    return pd.concat(list(frames.values()), ignore_index=True)


def redraw(frames, plan, sigma: float, seed: int) -> list[SiteAnswer]:
    """Each site's describe release noised afresh with σ (what a site sends)."""
    cols, bounds = list(plan.columns), plan.bounds_array(plan.columns)
    rng = np.random.default_rng(seed)
    answers = []
    for i, frame in enumerate(frames.values()):
        blocks = describe(frame, cols, bounds, 100).blocks
        answers.append(SiteAnswer(f"s{i}", gaussian_release(blocks, sigma, rng),
                                  meta={"dp": True, "noise-sd": sigma * sensitivity(blocks), "epsilon-planned": 1.0}))
    return answers


def test_dp_mean_interval_covers_the_pooled_mean_and_its_noise_sd_matches_the_noise(frames, pooled):
    """Over 40 noise draws at ε = 1 the reported noise sd of a mean equals the spread of the released means
    (within 25 %) and the 95 % intervals cover the pooled mean 88-100 % of the time."""
    plan = replace(plan_for(NANOPARTICLE_TASK, dp=True), columns=("age_years", "dose_mg_m2"))
    sigma = calibrate_noise(1.0, 1e-5, 1.0, 1)
    truth = {c: float(pd.to_numeric(pooled[c]).mean()) for c in plan.columns}
    means, sds, covered = {c: [] for c in truth}, {c: [] for c in truth}, {c: 0 for c in truth}
    for seed in range(40):
        got = combine_describe(redraw(frames, plan, sigma, seed), list(plan.columns), plan, 100)
        for c in truth:
            noise = got[c]["noise"]["mean"]
            means[c].append(got[c]["mean"])
            sds[c].append(noise["noise_sd"])
            covered[c] += noise["ci95"][0] <= truth[c] <= noise["ci95"][1]
    for c in truth:
        assert np.mean(sds[c]) == pytest.approx(np.std(means[c], ddof=1), rel=0.25), c
        assert 35 <= covered[c] <= 40, (c, covered[c])


def test_seeded_dp_run_reports_an_interval_that_covers_the_pooled_truth(frames, pooled, tmp_path):
    """One seeded run, describe only at ε = 1: age's mean and median intervals cover the pooled values."""
    sites = {name: dp_site(tmp_path / f"{name}.json", 1.0) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True, analyses="describe"), sites, np.random.default_rng(3))
    age = pd.to_numeric(pooled["age_years"])
    noise = got["describe"]["age_years"]["noise"]
    assert noise["mean"]["ci95"][0] <= age.mean() <= noise["mean"]["ci95"][1]
    assert noise["p50"]["ci95"][0] <= age.median() <= noise["p50"]["ci95"][1]
    assert noise["mean"]["estimable"] and noise["mean"]["epsilon"] == pytest.approx(1.0)
    assert set(noise) == {"count", "mean", "sd", "p01", "p25", "p50", "p75", "p99"}


def test_a_mean_the_noise_pushed_past_its_bound_is_clamped_and_reported_not_estimable():
    """A noisy sum below the range: the mean is clamped to the bound and shown "not estimable at ε = 2" with
    a larger ε that would make it estimable."""
    plan = replace(plan_for(NANOPARTICLE_TASK, dp=True), columns=("age_years",))
    low, high = plan.range_of("age_years")
    half = (high - low) / 2
    arrays = {"count": np.array([100.0]), "sum": np.array([-1.3 * half * 100]), "sumsq": np.array([half ** 2 * 100]),
              "histogram": np.zeros((1, 100))}
    got = combine_describe([SiteAnswer("a", arrays, meta={"dp": True, "noise-sd": 2.0, "epsilon-planned": 2.0})],
                           ["age_years"], plan, 100)["age_years"]
    assert got["mean"] == low
    assert not got["noise"]["mean"]["estimable"] and got["noise"]["mean"]["epsilon_needed"] >= 4.0
    text = markdown({"describe": {"age_years": got}, "queries": {"asked": 1, "planned": 1},
                     "privacy": {"a": {"dp": True}}}, [])
    assert "**Sites that answered with DP: a.**" in text


def test_an_interval_wider_than_the_allowed_share_names_the_epsilon_that_would_narrow_it():
    """Interval 3 × the allowed width at ε = 0.5 → not estimable; estimable at ε = 1.5 (sd ∝ 1/ε)."""
    allowed = 10.0
    noise_sd = 3 * allowed / (2 * dp_error.Z95)
    got = dp_error.judged(50.0, noise_sd, allowed, 0.5)
    assert not got["estimable"] and got["epsilon_needed"] == pytest.approx(1.5)
    assert got["reason"].startswith("not estimable at ε = 0.5")
    fine = dp_error.judged(50.0, noise_sd / 4, allowed, 0.5)
    assert fine["estimable"] and fine["ci95"] == pytest.approx([50 - dp_error.Z95 * noise_sd / 4,
                                                                 50 + dp_error.Z95 * noise_sd / 4])


def test_linear_regression_standard_errors_include_the_dp_noise(frames):
    """se² = se_sampling² + se_dp_noise², and se_dp_noise matches the root-mean-square distance of the
    coefficients from the noise-free fit over 30 noise draws (0.85-1.6 times it): their spread and the floor's
    shrinkage, both of which the interval must hold. Conservative up to 1.55 times (age_years): here, with the
    declared ranges, two whitened eigenvalues (2.9, 11.5) are under the floor (14), directions the noise
    swamps, where re-noising the noisy release overstates the noise."""
    plan = plan_for(NANOPARTICLE_TASK, dp=True)
    covariates = list(REGRESSION_COVARIATES)
    exact = run_in_process(frames, AnalyticsSettings(analyses="describe"))["describe"]
    x = standardisation(exact, covariates, plan)
    y = standardisation(exact, ["efficacy_pct"], plan)
    from client.analytics import Standardiser

    sums = [linear_sums(f, covariates, ["efficacy_pct"], Standardiser(x["centre"], x["scale"], x["bounds"]),
                        Standardiser(y["centre"], y["scale"], y["bounds"])) for f in frames.values()]
    sigma = calibrate_noise(20.0, 1e-5, 1.0, 1)
    tau = sigma * sensitivity(sums[0].blocks) * math.sqrt(len(sums))
    d = len(covariates) + 1
    estimates, reported = [], []
    exact_gram = unpack_triu(sum(np.asarray(sm.blocks["efficacy_pct/gram"].values) for sm in sums), d)
    exact_xty = sum(np.asarray(sm.blocks["efficacy_pct/xty"].values) for sm in sums)
    exact_yty = float(sum(np.asarray(sm.blocks["efficacy_pct/yty"].values) for sm in sums)[0])
    noise_free = linear_fit(exact_gram, exact_xty, exact_yty, covariates, x, float(y["centre"][0]),
                            float(y["scale"][0]))["coefficients"]
    truth = np.array([noise_free[c]["estimate"] for c in ("dose_mg_m2", "age_years")])
    for seed in range(30):
        rng = np.random.default_rng(seed)
        noised = [gaussian_release(s.blocks, sigma, rng) for s in sums]
        yty = float(sum(n["efficacy_pct/yty"] for n in noised)[0])
        fit = linear_fit(unpack_triu(sum(n["efficacy_pct/gram"] for n in noised), d),
                         sum(n["efficacy_pct/xty"] for n in noised), yty,
                         covariates, x, float(y["centre"][0]), float(y["scale"][0]), tau, float(row_bound(y)[0]))
        rows = fit["coefficients"]
        estimates.append([rows[c]["estimate"] for c in ("dose_mg_m2", "age_years")])
        reported.append([rows[c]["se_dp_noise"] for c in ("dose_mg_m2", "age_years")])
        for row in rows.values():
            assert row["se"] ** 2 == pytest.approx(row["se_sampling"] ** 2 + row["se_dp_noise"] ** 2)
    ratio = np.mean(reported, axis=0) / np.sqrt(np.mean(np.square(np.array(estimates) - truth), axis=0))
    assert np.all((ratio > 0.85) & (ratio < 1.6)), ratio


def test_describe_only_spends_the_run_on_describe_and_planned_equals_spent(frames, tmp_path):
    """--analyses describe: one query, one ledger entry, ε spent = ε planned (calibration within 0.1 %), the
    other analyses ask and spend nothing and the rest of the budget stays in the ledger."""
    sites = {name: dp_site(tmp_path / f"{name}.json", 3.0, 1 / 3) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True, analyses="describe"), sites, np.random.default_rng(0))
    assert got["queries"] == {"planned": 1, "asked": 1}
    assert got["analyses"] == ["describe"] and got["not_chosen"] == ["regression", "anova", "pca", "kmeans"]
    assert got["pca"] is None and got["anova"] is None and got["regression"]["linear"] == {}
    assert list(got["budget"]["analyses"]) == ["describe"]
    for name, site in sites.items():
        booked = got["budget"]["sites"][name]
        assert booked["epsilon_planned"] == pytest.approx(1.0)
        assert booked["epsilon_spent"] == pytest.approx(booked["epsilon_planned"], rel=1e-3)
        assert booked["epsilon_spent_by_analysis"] == {"describe": pytest.approx(booked["epsilon_spent"])}
        assert len(site.ledger.entries) == 1 and site.ledger.remaining() == pytest.approx(2.0, rel=1e-3)


def test_all_analyses_spend_exactly_the_planned_epsilon_split_by_queries(frames, tmp_path):
    """Every announced query is asked under DP (no early stop), so spent = planned; the ε booked to the
    analyses adds up to it and each analysis's query count is its planned share."""
    sites = {name: dp_site(tmp_path / f"{name}.json", 2.0, 0.5) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True), sites, np.random.default_rng(0))
    budget = got["budget"]
    assert got["queries"]["asked"] == got["queries"]["planned"] == 15
    assert all(a["queries_asked"] == a["queries_planned"] for a in budget["analyses"].values())
    assert sum(a["share_of_queries"] for a in budget["analyses"].values()) == pytest.approx(1.0)
    for booked in budget["sites"].values():
        assert booked["epsilon_spent"] == pytest.approx(booked["epsilon_planned"], rel=1e-3)
        assert sum(booked["epsilon_spent_by_analysis"].values()) == pytest.approx(booked["epsilon_spent"])
    dose = got["regression"]["linear"]["efficacy_pct"]["coefficients"]["dose_mg_m2"]
    assert dose["se_dp_noise"] > 0 and dose["ci95"][0] < dose["estimate"] < dose["ci95"][1]
    assert len(got["pca"]["noise"]["eigenvalues_noise_sd"]) == len(got["pca"]["eigenvalues"])
    assert got["anova"]["f_noise_sd"] is not None
    assert all("noise" in g for g in got["anova"]["groups"].values())
    assert all("noise" in p for p in got["kmeans"]["profiles"])
    assert got["anova"]["eta_squared_noise_sd"] > 0
    pca_noise = np.array(got["pca"]["noise"]["components_noise_sd"])
    assert pca_noise.shape == np.array(got["pca"]["components"]).shape and np.all(pca_noise > 0)
    kmeans_noise = got["kmeans"]["noise"]
    assert kmeans_noise["inertia"]["noise_sd"] > 0 and kmeans_noise["silhouette_simplified"]["noise_sd"] > 0
    low, high = kmeans_noise["inertia"]["ci95"]
    assert low < got["kmeans"]["inertia"] < high


def test_describe_gets_half_the_privacy_loss_and_less_noise_than_under_an_equal_split(frames, tmp_path):
    """BUDGET_RULE: with all five analyses describe gets half the run's Rényi loss (σ₁·√2) and each of the other
    14 queries 1/28 (σ₁·√28), against σ₁·√15 for every query under the old equal split, σ₁ the noise of one
    query spending the whole ε = 1; each site still spends exactly the ε it planned, never more."""
    sites = {name: dp_site(tmp_path / f"{name}.json", 1.0) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True), sites, np.random.default_rng(0))
    one = calibrate_noise(1.0, 1e-5, 1.0, 1)
    equal_split = calibrate_noise(1.0, 1e-5, 1.0, 15)
    assert equal_split == pytest.approx(one * math.sqrt(15), rel=2e-3)
    shares = {name: a["share_of_privacy_loss"] for name, a in got["budget"]["analyses"].items()}
    assert shares == pytest.approx({"describe": 0.5, "regression": 0.5 * 6 / 14, "anova": 0.5 / 14,
                                    "pca": 0.5 / 14, "kmeans": 0.5 * 6 / 14})
    for name, site in sites.items():
        describe_sigma, other_sigma = (step[0] for step in site.ledger.history)
        assert describe_sigma == pytest.approx(one * math.sqrt(2), rel=2e-3)
        assert other_sigma == pytest.approx(one * math.sqrt(28), rel=2e-3)
        assert describe_sigma < equal_split / 2.7  # √(15/2) ≈ 2.74 times less noise on every describe number
        booked = got["budget"]["sites"][name]
        assert booked["epsilon_spent"] == pytest.approx(booked["epsilon_planned"], rel=1e-3)
        assert booked["epsilon_spent"] <= 1.0 + 1e-9


def test_kmeans_alone_brings_pca_and_nothing_else_is_asked(frames, tmp_path):
    sites = {name: dp_site(tmp_path / f"{name}.json", 1.0) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True, analyses="kmeans"), sites, np.random.default_rng(0))
    assert got["analyses"] == ["pca", "kmeans"] and got["describe"] == {}
    assert got["queries"]["asked"] == 1 + 1 + AnalyticsSettings().dp_lloyd_iterations


def test_an_unknown_analysis_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="expected a comma-separated list of describe, regression, anova, pca, "
                                         "kmeans"):
        AnalyticsSettings(analyses="describe,tsne")
    with pytest.raises(ValueError, match="no analysis chosen"):
        chosen_analyses(" , ")
    result = CliRunner().invoke(app, ["analytics", "--clinics", "2", "--analyses", "describe,tsne"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'tsne'" in result.output and "describe, regression, anova, pca, kmeans" in result.output


def test_without_dp_the_numbers_carry_no_invented_intervals(frames, tmp_path):
    got = run_in_process(frames, AnalyticsSettings(analyses="describe,regression"))
    assert all("noise" not in s for s in got["describe"].values())
    assert "se_dp_noise" not in got["regression"]["linear"]["efficacy_pct"]["coefficients"]["dose_mg_m2"]
    assert got["budget"]["sites"] == {}
    write_report(tmp_path, got)
    text = (tmp_path / "analytics.md").read_text()
    assert "No site answered with DP" in text and "not estimable" not in text


def test_dp_report_shows_intervals_not_estimable_and_planned_against_spent(frames, tmp_path):
    sites = {name: dp_site(tmp_path / f"{name}.json", 0.3) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True, analyses="describe,anova"), sites,
                         np.random.default_rng(0))
    write_report(tmp_path, got)
    text = (tmp_path / "analytics.md").read_text()
    assert "not estimable at ε = 0.3" in text and "| ε planned | ε spent |" in text
    assert "nothing spent: regression, pca, kmeans" in text
    table = pd.read_csv(tmp_path / "describe.csv")
    hidden = table[~table["mean_estimable"]]
    assert len(hidden) and hidden["mean"].isna().all() and hidden["mean_note"].str.startswith("not estimable").all()


def test_error_against_epsilon_plot_scales_this_runs_noise_as_one_over_epsilon(frames, tmp_path):
    """The report's plot is drawn from the released noise sds: at this run's ε the curve is the reported noise
    sd over the declared range, at twice the ε half of it; the sites' affordable ε is spent + left."""
    from simulation.analytics_run import affordable_epsilon, error_curves

    sites = {name: dp_site(tmp_path / f"{name}.json", 3.0, 1 / 3) for name in frames}
    got = run_in_process(frames, AnalyticsSettings(dp=True, analyses="describe"), sites, np.random.default_rng(0))
    write_report(tmp_path, got)
    assert (tmp_path / "dp_error_vs_epsilon.png").stat().st_size > 10_000
    assert "dp_error_vs_epsilon.png" in (tmp_path / "analytics.md").read_text()
    assert affordable_epsilon(got) == pytest.approx(3.0, rel=1e-6)
    curves = error_curves(got, np.array([1.0, 2.0]))
    low, high = got["plan"]["bounds"]["age_years"]
    sd = got["describe"]["age_years"]["noise"]["mean"]["noise_sd"]
    assert curves["mean"]["age_years"] == pytest.approx([sd / (high - low), sd / (high - low) / 2])
    assert set(curves) == {"mean", "sd", "p50"} and len(curves["p50"]) == len(got["describe"])


@pytest.mark.slow
def test_flower_dp_run_of_chosen_analyses_spends_what_it_planned_and_keeps_the_rest(tmp_path, shared_ray):
    """Through Flower's runtime: DP clinics with ε = 3 of which 1 for this run, --analyses describe,anova: two
    queries asked, ε spent = planned per site, 2 left in each ledger, the report opens with the privacy table."""
    from simulation.analytics_run import run_analytics

    got = run_analytics(tmp_path, clinics=3, dp=True, epsilon=1.0, site_budget=3.0, analyses="describe,anova",
                        patients_per_clinic=60)
    assert got["queries"] == {"planned": 2, "asked": 2} and got["not_chosen"] == ["regression", "pca", "kmeans"]
    assert len(got["budget"]["sites"]) == 3
    for booked in got["budget"]["sites"].values():
        assert booked["epsilon_planned"] == pytest.approx(1.0)
        assert booked["epsilon_spent"] == pytest.approx(1.0, rel=1e-3)
        assert booked["epsilon_left_in_ledger"] == pytest.approx(2.0, rel=1e-3)
        assert set(booked["epsilon_spent_by_analysis"]) == {"describe", "anova"}
    text = (tmp_path / "analytics.md").read_text()
    assert "**Sites that answered with DP:" in text and "| ε planned | ε spent |" in text
    assert (tmp_path / "dp_error_vs_epsilon.png").exists()


def test_the_release_weights_reach_the_site_through_the_wire():
    """The server's per-query shares cross the message format intact (the Flower path's request → site)."""
    weights = plan_for(NANOPARTICLE_TASK, dp=True).schedule(AnalyticsSettings(dp=True)).weights()
    config, _ = wire.request_parts(wire.request({RELEASE_WEIGHTS: weights}, {}))
    assert release_weights(config) == pytest.approx(weights)
    assert weights[0] == pytest.approx(0.5) and sum(weights) == pytest.approx(1.0) and len(weights) == 15
