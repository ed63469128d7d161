"""Issue 19, fifth pass: the DP least-squares coefficients' noise sd counts the Gram's noise once.

Fixed synthetic sums (2,000 rows, 10 covariates in ±4, whitened Gram eigenvalues 5.6-11 noise sds: the
regime of 10 sites × 10⁴ rows at ε = 1), seeded noise draws of the Gram and ``Xᵀy`` with their known sds, the
coefficients' reported ``se_dp_noise`` against the draws' root-mean-square distance from the noise-free fit.
Re-noising both around the release passed ``Xᵀy``'s noise through inverses that saw the Gram's noise twice:
reported sd 1.13 × the real error on average (1.35 × on the intercept), coverage 0.975."""

from __future__ import annotations

import numpy as np
import pytest

from shared.analytics import linear_fit, row_bound

P, N, TAU, DRAWS = 10, 2_000, 15.0, 200
X = {"centre": np.zeros(P), "scale": np.ones(P), "bounds": np.tile([-4.0, 4.0], (P, 1))}
NAMES = [f"c{i}" for i in range(P)]


@pytest.fixture(scope="module")
def sums() -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(7)
    z = rng.standard_normal((N, P))
    z[:, 1] = 0.3 * z[:, 0] + np.sqrt(1 - 0.09) * z[:, 1]
    z = np.clip(z, -4, 4)
    y = np.clip(1.0 + z @ np.linspace(0.5, -0.5, P) + rng.standard_normal(N), -4, 4)
    design = np.column_stack([np.ones(N), z])
    return design.T @ design, design.T @ y, float(y @ y)


def test_noise_sd_matches_the_spread_of_seeded_draws(sums):
    gram, xty, yty = sums
    b = np.concatenate([[1.0], row_bound(X)])
    truth = np.array([r["estimate"] for r in linear_fit(gram, xty, yty, NAMES, X, 0.0, 1.0, TAU, 4.0)
                      ["coefficients"].values()])
    rng = np.random.default_rng(1)
    estimates, reported = [], []
    for _ in range(DRAWS):
        e = rng.standard_normal((P + 1, P + 1))
        noisy_gram = gram + (np.triu(e) + np.triu(e, 1).T) * TAU * np.outer(b, b)
        noisy_xty = xty + rng.standard_normal(P + 1) * TAU * b * 4.0
        fit = linear_fit(noisy_gram, noisy_xty, yty, NAMES, X, 0.0, 1.0, TAU, 4.0)["coefficients"].values()
        estimates.append([r["estimate"] for r in fit])
        reported.append([r["se_dp_noise"] for r in fit])
    error = np.array(estimates) - truth
    reported = np.array(reported)
    ratio = np.median(reported, axis=0) / np.sqrt(np.mean(error ** 2, axis=0))
    assert 0.95 < ratio.mean() < 1.08  # before: 1.13; after: 1.04
    assert 0.93 <= np.mean(np.abs(error) <= 1.96 * reported) <= 0.975  # before: 0.975 (0.9750); after: 0.970
