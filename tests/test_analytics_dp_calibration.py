"""Issue 19, calibration: the 95 % intervals of DP analytics cover what they claim to over seeded noise draws
(fixed synthetic data, the noise redrawn with its known sd), and every released number carries its noise sd.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from client.analytics import describe
from server.analytics_phase import SiteAnswer, combine_describe
from server.analytics_plan import plan_for
from shared.analytics import linear_fit, unpack_triu
from shared.task import NANOPARTICLE_TASK


@pytest.fixture(scope="module")
def correlated_regression() -> dict:
    """20,000 standardised rows, 8 covariates clipped to ±4, the first two correlated 0.9 and with opposite
    effects (+1, −1): their difference is the Gram matrix's weak direction, where a ridge shrinks."""
    rng = np.random.default_rng(0)
    n, p = 20_000, 8
    z = rng.standard_normal((n, p))
    z[:, 1] = 0.9 * z[:, 0] + math.sqrt(1 - 0.81) * z[:, 1]
    z = np.clip(z, -4, 4)
    beta = np.zeros(p)
    beta[:2] = 1.0, -1.0
    y = np.clip(z @ beta + 0.3 * rng.standard_normal(n), -4, 4)
    design = np.column_stack([np.ones(n), z])
    gram = design.T @ design
    return {"gram": gram, "xty": design.T @ y, "yty": float(y @ y), "p": p,
            "x": {"centre": np.zeros(p), "scale": np.ones(p), "bounds": np.tile([-4.0, 4.0], (p, 1))},
            "truth": np.linalg.solve(gram, design.T @ y)}


def test_dp_least_squares_intervals_cover_the_noise_free_fit_along_a_weak_direction(correlated_regression):
    """60 noise draws (sd 30 per unit of scale): ``estimate ± 1.96 se_dp_noise`` covers the noise-free least
    squares 0.93-0.99 of the time overall and ≥ 0.85 on each correlated term. With the old matrix-wide floor
    and the delta method: 0.911 overall, 0.70 and 0.77 on the two correlated terms (the ridge's shrinkage)."""
    r = correlated_regression
    d, tau = r["p"] + 1, 30.0
    b = np.array([1.0] + [4.0] * r["p"])
    upper = np.triu_indices(d)
    names = [f"z{i}" for i in range(r["p"])]
    hits = []
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        gram = unpack_triu(r["gram"][upper] + rng.standard_normal(len(upper[0])) * tau * np.outer(b, b)[upper], d)
        xty = r["xty"] + rng.standard_normal(d) * tau * b * 4.0
        fit = linear_fit(gram, xty, r["yty"], names, r["x"], 0.0, 1.0, tau, 4.0)
        rows = list(fit["coefficients"].values())
        hits.append([abs(row["estimate"] - t) <= 1.96 * row["se_dp_noise"] for row, t in zip(rows, r["truth"],
                                                                                               strict=True)])
    hits = np.array(hits)
    assert 0.93 <= hits.mean() <= 0.99, hits.mean(axis=0)
    assert hits[:, 1].mean() >= 0.85 and hits[:, 2].mean() >= 0.85, hits.mean(axis=0)


def test_a_whole_number_quantile_snapped_to_its_bin_adds_no_bin_resolution_to_its_noise_sd():
    """ecog's bins (0.04 wide) hold one whole number each: its DP median is exact when the noise leaves it in
    the right bin, so its noise sd is the bootstrap's alone, without a bin-resolution term; a continuous column
    keeps one (``shared.analytics.bin_resolution_sd``: never below Sheppard's ``width / √12`` / (2√2), the
    least a mix of its half-Sheppard smooth part and its larger spike part can give)."""
    plan = replace(plan_for(NANOPARTICLE_TASK, dp=True), columns=("ecog", "age_years"))
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"ecog": rng.integers(0, 3, 500), "age_years": rng.normal(55, 10, 500)})
    blocks = describe(frame, list(plan.columns), plan.bounds_array(plan.columns), 100).blocks
    released = {name: np.asarray(block.values, dtype=np.float64) for name, block in blocks.items()}
    answer = SiteAnswer("a", released, meta={"dp": True, "noise-sd": 1e-3, "epsilon-planned": 1.0})
    got = combine_describe([answer], list(plan.columns), plan, 100)
    ecog_width = np.diff(plan.range_of("ecog"))[0] / 100
    age_width = np.diff(plan.range_of("age_years"))[0] / 100
    assert got["ecog"]["noise"]["p50"]["noise_sd"] < 0.01 * ecog_width / math.sqrt(12)
    assert got["age_years"]["noise"]["p50"]["noise_sd"] >= age_width / math.sqrt(12) / (2 * math.sqrt(2))


def test_the_dp_inertia_noise_sd_is_the_spread_of_k_noised_cluster_sums():
    """The inertia's reported noise sd (τ · bound · √k) matches the spread of the sum of k released
    per-cluster sums, each noised with sd τ · bound as a site does, over 400 draws (within 10 %)."""
    from server.analytics_phase import kmeans_diagnostics_noise

    k, tau, bound, inertia = 4, 3.0, 7.5, 5_000.0
    rng = np.random.default_rng(1)
    released = [inertia + float((rng.standard_normal(k) * tau * bound).sum()) for _ in range(400)]
    got = kmeans_diagnostics_noise(inertia, 0.4, 1_000.0, k, bound, tau, 1.0)
    assert got["inertia"]["noise_sd"] == pytest.approx(np.std(released, ddof=1), rel=0.1)
    assert got["silhouette_simplified"]["noise_sd"] > 0
