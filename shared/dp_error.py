"""What the DP noise does to each statistic the analytics release: its noise sd, a 95 % interval, "not estimable".

A DP site adds Gaussian noise of a known sd to every released sum (``client.dp``: sd ``noise_sd × scale`` per
entry, ``noise_sd = σ × Δ`` sent with the release). The server turns sums into statistics, so the noise of a
statistic follows from the noise of the sums it was computed from — never from the rows, which the server
does not have:

- **ratios and moments** (means = noisy sum / noisy count, variances from noisy sums of squares, cluster
  profiles): the delta method (first-order Taylor expansion of the estimator in the noisy sums, whose noise
  is independent between entries and sites);
- **sds**: the delta method on the variance, and the interval the square roots of the variance's (so it
  keeps its shape near 0, where the square root is far from linear);
- **quantiles** from a noisy histogram and anything else without a usable derivative (ANOVA's F, PCA
  eigenvalues): a parametric bootstrap of the noise, at the server — the released sums re-noised
  ``BOOTSTRAP_DRAWS`` times with the known sd and the estimator re-run; the sd of the re-runs is the noise
  sd (for quantiles their root-mean-square distance from the released value, which adds the estimator's
  bias under noise, and the bin's own resolution, ``width / √12``);
- **least-squares coefficients**: the noise of ``Xᵀy`` propagated exactly through the released Gram's floored
  inverse (the coefficients are linear in ``Xᵀy`` given the Gram), plus the same bootstrap's root-mean-square
  distance for the Gram's own noise (``shared.analytics.linear_noise_rmse``: the delta method missed the
  floor's shrinkage), added to the sampling variance; **logistic coefficients**: the delta method on the last
  Newton step, ``δβ ≈ H⁻¹(δg − δH · step)`` (:func:`gram_noise_covariance`), added to the inverse Hessian.

The 95 % interval is ``estimate ± 1.96 sd`` (clipped to the declared range where there is one): it is about
the noise, around the sites' pooled rows, not about a population. A number whose interval is wider than
``ESTIMABLE_WIDTH_SHARE`` of its column's declared range (of the estimate itself, for counts), or that the
estimator had to clamp to a bound, is *not estimable* at the run's ε: it is reported with the ε that would
make it estimable, from ``sd ∝ 1/ε`` (the Gaussian mechanism's noise multiplier at a fixed δ scales about as
1/ε; Dwork & Roth 2014, Thm A.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054
"""Two-sided 95 % normal quantile."""
ESTIMABLE_WIDTH_SHARE = 0.1
"""A DP number is estimable when its 95 % interval is at most this share of its column's declared range wide
(for a count: of the count). A tenth of the range keeps a mean's interval to ±5 % of the range, the
precision asked of describe (issue 19: means within 2 % of the range at ε = 1, medians within 5 %)."""
CLAMPED_NOISE_REDUCTION = 2.0
"""A number the estimator clamped to a bound (a mean outside the range, a negative variance or count) is
estimable, by this rule, at ``max(2 × width / allowed, 2) × ε``: its interval at most half the allowed width,
and at least the noise halved. Its distance from the bound is unknown, so this is a rule, not a guarantee."""
BOOTSTRAP_DRAWS = 200
"""Re-noised copies of a release for a parametric-bootstrap noise sd (Monte-Carlo error of an sd ≈ 5 %)."""
BOOTSTRAP_SEED = 20261202
"""Seed of the server's bootstrap noise: the same release gives the same reported sds."""


def judged(estimate: float | None, noise_sd: float, allowed_width: float, epsilon: float, clamped: bool = False,
           bounds: tuple[float, float] | None = None, interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """A DP number with its noise sd, its 95 % interval and whether it is estimable at ``epsilon``.

    ``allowed_width``: the widest interval that still counts as an estimate (``ESTIMABLE_WIDTH_SHARE`` of the
    declared range). Returns ``{"estimate", "noise_sd", "ci95", "estimable", "epsilon", "epsilon_needed",
    "reason"}``; ``epsilon_needed`` and ``reason`` are null for an estimable number. ``interval``: a 95 %
    interval of another shape than ``estimate ± 1.96 noise_sd`` (its width is what is judged).
    """
    if estimate is None or not math.isfinite(estimate) or not math.isfinite(noise_sd):
        return {"estimate": None, "noise_sd": None, "ci95": None, "estimable": False, "epsilon": epsilon,
                "epsilon_needed": None, "reason": f"not estimable at ε = {epsilon:.3g}: no finite value"}
    low, high = interval if interval is not None else (estimate - Z95 * noise_sd, estimate + Z95 * noise_sd)
    width = high - low
    if bounds is not None and all(math.isfinite(b) for b in bounds):
        low, high = max(low, bounds[0]), min(high, bounds[1])
    ratio = width / allowed_width if allowed_width > 0 else math.inf
    out = {"estimate": float(estimate), "noise_sd": float(noise_sd), "ci95": [float(low), float(high)],
           "estimable": True, "epsilon": epsilon, "epsilon_needed": None, "reason": None}
    if clamped:
        factor = max(CLAMPED_NOISE_REDUCTION * ratio, CLAMPED_NOISE_REDUCTION)
        out.update(estimable=False, epsilon_needed=_needed(epsilon, factor),
                   reason=f"not estimable at ε = {epsilon:.3g}: the noisy estimate crossed a bound and was clamped")
    elif ratio > 1:
        out.update(estimable=False, epsilon_needed=_needed(epsilon, ratio),
                   reason=f"not estimable at ε = {epsilon:.3g}: the 95 % interval is {ratio:.3g} × the allowed "
                          f"width ({ESTIMABLE_WIDTH_SHARE:g} of the declared range)")
    return out


def _needed(epsilon: float, factor: float) -> float | None:
    """ε at which the noise sd is ``factor`` times smaller (sd ∝ 1/ε)."""
    value = epsilon * factor
    return float(value) if math.isfinite(value) else None


def range_width(bounds: Sequence[float]) -> float:
    """``high − low`` of a declared range (inf without one)."""
    low, high = float(bounds[0]), float(bounds[1])
    return high - low if math.isfinite(low) and math.isfinite(high) else math.inf


def mean_noise_sd(count: float, shifted_sum: float, sum_scale: float, noise_sd: float) -> float:
    """Noise sd of ``centre + S / n`` from a noisy count (sd ``noise_sd``) and a noisy shifted sum ``S`` (sd
    ``noise_sd × sum_scale``), by the delta method: ``(noise_sd / n) √(scale² + (S / n)²)``."""
    n = max(count, 1.0)
    return noise_sd / n * math.sqrt(sum_scale ** 2 + (shifted_sum / n) ** 2)


def variance_noise_sd(count: float, shifted_sum: float, shifted_sumsq: float, half: float, noise_sd: float) -> float:
    """Noise sd of the sample variance ``(Q − S²/n) / (n − 1)`` from noisy ``n`` (sd τ), ``S`` (sd τh) and ``Q``
    (sd τh²), by the delta method: ``τ / (n − 1) √(h⁴ + 4 m² h² + (m² − v)²)`` with ``m = S / n``."""
    n = max(count, 2.0)
    m = shifted_sum / n
    variance = max((shifted_sumsq - shifted_sum ** 2 / n) / (n - 1), 0.0)
    return noise_sd / (n - 1) * math.sqrt(half ** 4 + 4 * m ** 2 * half ** 2 + (m ** 2 - variance) ** 2)


def sd_interval(variance: float, variance_sd: float) -> tuple[float, float]:
    """95 % interval of an sd: the square roots of the variance's (``v ± 1.96 sd(v)``, floored at 0), so the
    interval keeps its shape where the square root is far from linear (a variance near 0 under noise)."""
    low, high = variance - Z95 * variance_sd, variance + Z95 * variance_sd
    return math.sqrt(max(low, 0.0)), math.sqrt(max(high, 0.0))


def bootstrap_sd(released: np.ndarray, noise_scale: np.ndarray | float, estimator: Callable[[np.ndarray], Any],
                 draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Parametric bootstrap of the noise: sd over ``draws`` of ``estimator(released + noise)``, with noise of the
    known sd ``noise_scale`` per entry (post-processing of the release; no row is used). ``estimator`` returns
    an array of numbers (NaN where undefined); the result is their sd, NaN where fewer than half are finite."""
    return bootstrap(released, noise_scale, estimator, draws, seed)[0]


def bootstrap_rmse(released: np.ndarray, noise_scale: np.ndarray | float, estimator: Callable[[np.ndarray], Any],
                   draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """As :func:`bootstrap_sd`, but the root-mean-square distance of the re-runs from ``estimator(released)``:
    their sd and their shift, the bootstrap's estimate of the bias the noise gives a non-linear estimator
    (a noisy histogram's quantiles move towards where empty cells' noise adds mass)."""
    sd, mean = bootstrap(released, noise_scale, estimator, draws, seed)
    centre = np.asarray(estimator(np.asarray(released, dtype=np.float64)), dtype=np.float64)
    return np.sqrt(sd ** 2 + (mean - centre) ** 2)


def bootstrap(released: np.ndarray, noise_scale: np.ndarray | float, estimator: Callable[[np.ndarray], Any],
              draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sd and mean of ``estimator(released + noise)`` over ``draws`` (NaN where fewer than half are finite)."""
    rng = np.random.default_rng(seed)
    released = np.asarray(released, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(noise_scale, dtype=np.float64), released.shape)
    runs = np.array([np.asarray(estimator(released + rng.standard_normal(released.shape) * scale),
                                dtype=np.float64) for _ in range(draws)])
    finite = np.isfinite(runs)
    enough = finite.sum(axis=0) >= max(draws // 2, 2)
    sd = np.array([np.std(runs[finite[:, j], j], ddof=1) if enough[j] else np.nan for j in range(runs.shape[1])])
    mean = np.array([np.mean(runs[finite[:, j], j]) if enough[j] else np.nan for j in range(runs.shape[1])])
    return sd, mean


def gram_noise_covariance(beta: np.ndarray, gram_scale: np.ndarray, vector_scale: np.ndarray,
                          noise_sd: float) -> np.ndarray:
    """Covariance of ``δb − δG β`` when each distinct entry of the symmetric ``G`` carries noise of sd
    ``noise_sd × gram_scale[j, l]`` (mirrored) and ``b`` noise of sd ``noise_sd × vector_scale``; the
    coefficients' noise covariance is then ``G⁻¹ · this · G⁻¹`` (delta method on ``β = G⁻¹ b``).

    Entry (i, k), i ≠ k, of ``Cov(δG β)`` is ``τ² s_ik² β_i β_k`` (the one shared noise term ``e_ik``); entry
    (i, i) is ``τ² Σ_l s_il² β_l²``.
    """
    beta = np.asarray(beta, dtype=np.float64)
    s2 = np.square(np.asarray(gram_scale, dtype=np.float64))
    cross = s2 * np.outer(beta, beta)
    np.fill_diagonal(cross, s2 @ np.square(beta))
    return noise_sd ** 2 * (cross + np.diag(np.square(np.asarray(vector_scale, dtype=np.float64))))
