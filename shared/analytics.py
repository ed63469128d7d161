"""Federated analytics' estimators: the seed paper's statistics from summed (possibly DP-noised) site releases.

Pure functions of released sums, no messaging, shared by the coordinator (``server.analytics_phase``) and any
reader of a release: linear regression from summed ``XᵀX, Xᵀy, yᵀy`` (Karr, Lin, Sanil & Reiter 2005, "Secure
regression on distributed databases", JCGS 14(2)), coefficient tables on the original scale, quantiles from
summed histograms (noisy ones with sub-threshold cells read as empty), moments merged with Chan, Golub &
LeVeque (1979), one-way ANOVA, PCA of the correlation matrix, k-means initial centroids and Lloyd (1982)
updates. Everything done with noisy sums here is post-processing, free of privacy cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from shared import dp_error
from shared.encoding import Moments

QUANTILE_LEVELS = (0.01, 0.25, 0.5, 0.75, 0.99)
DP_NOISE_THRESHOLD = 3.0
"""Under DP, a histogram cell below this many noise sds is read as empty (else the noise in the many empty
cells adds spurious mass to the tails)."""
DP_MASS_KEPT = 0.5
"""Under DP, quantiles come from the histogram with sub-threshold cells dropped when that keeps at least this
share of the noisy total (a concentrated column); otherwise from the running sum of all noisy cells."""
LINEAR_FLOOR_NOISE_SDS = 3.0
"""Under DP, least squares floors the whitened Gram's eigenvalues at this many noise sds: about 2 sds of the
noise on one eigenvalue (``vᵀEv`` has sd ≤ √2 · noise for a unit ``v``), so only directions the noise can
swamp are damped. The matrix-wide floor (``2√d`` sds, the noise's spectral norm; until issue 19's second
gaps pass also used for logistic Newton steps, now :data:`LOGISTIC_FLOOR_NOISE_SDS`) damped real directions
too: at 10 sites × 10⁴ rows, ε = 1, it sat above 3 of the 11 whitened
eigenvalues, and over 300 noise draws on fixed data the ridge shrank ``particle_size_nm`` by 2.0 noise sds
(coverage of the noise-free fit 0.896 overall, 0.55 on that term). At 3 sds the largest shrinkage was 0.6
sds, which :func:`linear_noise_rmse` reports; at 2 sds it was 0.2 but the interval over-covered (0.986)."""
LOGISTIC_FLOOR_NOISE_SDS = LINEAR_FLOOR_NOISE_SDS
"""Under DP, each logistic Newton step floors the whitened Hessian (``H / (b/2)(b/2)ᵀ``) at this many noise
sds, for least squares' reason (the matrix-wide ``2√d`` floor damps real directions too); the noise this
leaves is carried through the steps by :func:`logistic_step_noise`."""
ALIAS_TOLERANCE = 1e-9
"""A covariate whose residual sum of squares on the earlier ones is below this share of its own is aliased."""


def unpack_triu(packed: np.ndarray, d: int) -> np.ndarray:
    """The symmetric (d, d) matrix whose upper triangle (row by row) is ``packed``."""
    out = np.zeros((d, d))
    out[np.triu_indices(d)] = np.asarray(packed, dtype=np.float64).ravel()
    return out + np.triu(out, 1).T


def denoised_counts(counts: np.ndarray, noise_sd: float) -> np.ndarray:
    """Noisy counts with cells below ``DP_NOISE_THRESHOLD`` noise sds read as 0 (counts unchanged without noise)."""
    counts = np.asarray(counts, dtype=np.float64)
    if noise_sd <= 0:
        return counts
    return np.where(counts < DP_NOISE_THRESHOLD * noise_sd, 0.0, counts)


def triu_scale(bound: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """Packed upper triangle of ``factor · B Bᵀ`` with ``B = [1, bound]``: the per-row bound of each entry of a
    site's packed Gram release, hence (× the noise sd) the sd of its DP noise."""
    b = np.concatenate([[1.0], np.asarray(bound, dtype=np.float64)])
    return (factor * np.outer(b, b))[np.triu_indices(len(b))]


def floored_inverse(matrix: np.ndarray, floor: float) -> np.ndarray:
    """Inverse of a symmetric matrix with its eigenvalues raised to at least ``floor`` (and to 1e-12 × the
    largest if some are not positive, so a matrix that rounding left slightly indefinite still inverts)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    top = max(float(values.max()) if values.size else 0.0, 1e-300)
    if floor > 0 or values.min() <= 0:
        values = np.maximum(values, max(floor, 1e-12 * top))
    return (vectors / values) @ vectors.T


def row_bound(x: dict[str, np.ndarray]) -> np.ndarray:
    """Largest ``|z|`` of a clipped standardised value per column (what the sites' ``Standardiser.bound``
    gives; +inf without a range)."""
    bounds = x["bounds"]
    reach = np.maximum(np.abs(bounds[:, 0] - x["centre"]), np.abs(bounds[:, 1] - x["centre"])) / x["scale"]
    return np.where(np.isfinite(bounds).all(axis=1), reach, np.inf)


def noisy_gram_inverse(matrix: np.ndarray, bound: np.ndarray, factor: float, noise: float,
                       floor_noise_sds: float | None = None) -> np.ndarray:
    """Inverse of a Gram-type matrix ``Σ w [1, z][1, z]ᵀ`` (``0 ≤ w ≤ factor``, ``|z_j| ≤ bound_j``) that
    carries DP noise of sd ``noise × factor × b_j b_l`` on entry (j, l), with ``b = [1, bound]``.

    In the whitened coordinates ``G / (√factor b)(√factor b)ᵀ`` the noise has sd ``noise`` on every entry and
    spectral norm about ``2 √d · noise`` (a d × d symmetric Gaussian matrix); eigenvalues there are raised to
    that floor, so a least-squares or Newton step does not follow the noise along weakly identified
    directions (a ridge of the noise's own size and shape). ``floor_noise_sds``: the floor in units of
    ``noise`` instead (:data:`LINEAR_FLOOR_NOISE_SDS` for least squares). ``noise = 0``: the plain inverse.
    """
    if noise <= 0:
        return floored_inverse(matrix, 0.0)
    scale = np.maximum(math.sqrt(factor) * np.concatenate([[1.0], np.asarray(bound, dtype=np.float64)]), 1e-12)
    outer = np.outer(scale, scale)
    multiple = 2.0 * math.sqrt(len(scale)) if floor_noise_sds is None else floor_noise_sds
    return floored_inverse(matrix / outer, multiple * noise) / outer


def independent_columns(gram: np.ndarray, tolerance: float = ALIAS_TOLERANCE) -> list[int]:
    """Indices of the columns of a Gram matrix that are not linear combinations of earlier ones (column 0,
    the intercept, always kept): the pivots R's ``lm`` keeps."""
    kept = [0]
    for j in range(1, gram.shape[0]):
        if gram[j, j] <= 0:
            continue
        cross = gram[np.ix_(kept, [j])]
        residual = gram[j, j] - float((cross.T @ np.linalg.solve(gram[np.ix_(kept, kept)], cross))[0, 0])
        if residual > tolerance * gram[j, j]:
            kept.append(j)
    return kept


def design_map(centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``M`` with ``[1, (x − centre)/scale] = M [1, x]``: coefficients on the standardised design ``β'`` are
    ``Mᵀβ'`` on the original scale, and their covariance ``Mᵀ C M``."""
    d = len(centre) + 1
    m = np.eye(d)
    m[1:, 0] = -np.asarray(centre) / np.asarray(scale)
    m[1:, 1:] = np.diag(1.0 / np.asarray(scale))
    return m


def coefficient_table(names: Sequence[str], estimate: np.ndarray, covariance: np.ndarray, kept: Sequence[int],
                      df: float | None) -> dict[str, dict[str, float | None]]:
    """Per term: estimate, standard error, statistic and two-sided p-value (t with ``df``, else normal);
    aliased terms (not in ``kept``) are null."""
    table = {}
    for j, name in enumerate(["intercept", *names]):
        if j not in kept:
            table[name] = {"estimate": None, "se": None, "statistic": None, "p": None, "aliased": True}
            continue
        se = math.sqrt(covariance[j, j]) if covariance[j, j] > 0 else math.nan
        statistic = estimate[j] / se if se > 0 else math.nan
        if df is None:
            p = 2 * scipy_stats.norm.sf(abs(statistic))
        else:
            p = 2 * scipy_stats.t.sf(abs(statistic), df) if df > 0 else math.nan
        table[name] = {"estimate": float(estimate[j]), "se": se, "statistic": statistic, "p": float(p),
                       "aliased": False}
    return table


def histogram_quantiles(counts: np.ndarray, low: float, high: float,
                        levels: Sequence[float] = QUANTILE_LEVELS) -> dict[str, float] | None:
    """Quantiles interpolated linearly within the bins of a histogram on ``[low, high]`` (negative counts read
    as 0); None when the histogram is empty."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    if counts.sum() <= 0:
        return None
    return cdf_quantiles(np.cumsum(counts) / counts.sum(), low, high, levels)


def noisy_histogram_quantiles(counts: np.ndarray, noise_sd: float, low: float, high: float,
                              levels: Sequence[float] = QUANTILE_LEVELS) -> dict[str, float] | None:
    """Quantiles of a DP-noised histogram: from the cells above ``DP_NOISE_THRESHOLD`` noise sds if they hold
    at least ``DP_MASS_KEPT`` of the noisy total (few, full cells), else from the running sum of all noisy
    cells made monotone (the noise is zero-mean, so it does not pile up in the tails)."""
    counts = np.asarray(counts, dtype=np.float64)
    kept = denoised_counts(counts, noise_sd)
    if kept.sum() >= DP_MASS_KEPT * counts.sum():
        return histogram_quantiles(kept, low, high, levels)
    running = np.maximum.accumulate(np.maximum(np.cumsum(counts), 0.0))
    if running[-1] <= 0:
        return None
    return cdf_quantiles(running / running[-1], low, high, levels)


def quantile_cells(counts: np.ndarray, noise_sd: float) -> np.ndarray:
    """The cells :func:`noisy_histogram_quantiles` reads its quantiles from, as counts: the sub-threshold cells
    read as 0 when the rest hold ``DP_MASS_KEPT`` of the noisy total, else every noisy cell (negatives as 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    kept = denoised_counts(counts, noise_sd)
    return np.maximum(kept if kept.sum() >= DP_MASS_KEPT * counts.sum() else counts, 0.0)


def threshold_shift(counts: np.ndarray, noise_sd: float, low: float, high: float,
                    levels: Sequence[float] = QUANTILE_LEVELS) -> np.ndarray | None:
    """Per level, how far reading sub-threshold cells as empty moved :func:`noisy_histogram_quantiles`: the
    distance between its quantile and the quantile of the running sum of every noisy cell (made monotone);
    None where it read every cell. Against the pooled rows this shift is up to several bins for long-tailed
    columns when the noise is large (3 sites × ~1,300 rows, ε = 1: tumour burden 3.3 bins, which the noise-free
    estimator shares) and tracks it (3.4 bins); a parametric bootstrap re-thresholds already thresholded
    tails and sees only part of it."""
    counts = np.asarray(counts, dtype=np.float64)
    kept = denoised_counts(counts, noise_sd)
    running = np.maximum.accumulate(np.maximum(np.cumsum(counts), 0.0))
    if kept.sum() < DP_MASS_KEPT * counts.sum() or kept.sum() <= 0 or running[-1] <= 0:
        return None
    thresholded = histogram_quantiles(kept, low, high, levels)
    everything = cdf_quantiles(running / running[-1], low, high, levels)
    return np.abs(np.array(list(thresholded.values())) - np.array(list(everything.values())))


def bin_resolution_sd(cells: np.ndarray, value: float, low: float, high: float) -> float:
    """Root-mean-square error, against the quantile of the rows themselves, of a quantile ``value`` placed by
    linear interpolation inside its bin of the histogram ``cells`` on ``[low, high]``.

    Two parts, weighted by the share ``a`` of the bin's count above its fuller neighbour (the mass no smooth
    density through the neighbours explains: a column with few distinct values, whose quantile sits on one
    of them at an unknown point of the bin): for that share the row quantile is anywhere in the bin while the
    interpolation put it at ``u`` (0-1 along the bin), an rms distance ``w √((u − ½)² + 1/12)``; for the rest
    the density is smooth across the bin and linear interpolation misses by a fraction of Sheppard's
    ``w / √12`` (Sheppard 1898, Proc. Lond. Math. Soc. 29:353-380), taken as half of it. The two parts add as
    independent errors: ``√((a · atom)² + ((1 − a) · smooth)²)``.

    Measured (``benchmarks/analytics_interval_probes.py median``, with ``threshold_shift`` as the bias, BENCHMARKS.md
    issue 19's fourth pass): against the pooled median the fixed ``w / √12`` covered 0.98-1.00 at 10 sites × 10⁴
    rows (the interval was the bin: sd up to 2.8 × the real error); with this term 0.957-0.991, sd 1.4-1.7 ×. The
    half is the one constant here and was chosen on the 10 × 10⁴ releases among ½, ⅓ and ¼ (without the shift:
    0.948-0.957, 0.930-0.957, 0.926-0.948); the variance mixture ``a · atom² + (1 − a) · smooth²`` instead of
    this sum of squares covered 0.96-1.00. 5 × 4,000 rows, not used for the choice: 0.949-0.957."""
    cells = np.asarray(cells, dtype=np.float64)
    bins = len(cells)
    width = (high - low) / bins
    if bins == 0 or not width > 0:
        return 0.0
    i = min(max(int((value - low) / width), 0), bins - 1)
    u = min(max((value - low) / width - i, 0.0), 1.0)
    if cells[i] <= 0:
        return width / math.sqrt(12)
    neighbour = max(cells[i - 1] if i > 0 else 0.0, cells[i + 1] if i < bins - 1 else 0.0)
    share = min(max((cells[i] - neighbour) / cells[i], 0.0), 1.0)
    atom = width * math.sqrt((u - 0.5) ** 2 + 1 / 12)
    smooth = width / math.sqrt(12) / 2
    return math.hypot(share * atom, (1 - share) * smooth)


def cdf_quantiles(cdf: np.ndarray, low: float, high: float, levels: Sequence[float]) -> dict[str, float]:
    """Quantiles from a binned CDF on ``[low, high]``, linear within a bin: ``{"p01": ..., "p50": ...}``."""
    edges = np.linspace(low, high, len(cdf) + 1)
    out = {}
    for level in levels:
        i = min(int(np.searchsorted(cdf, level, side="left")), len(cdf) - 1)
        before = cdf[i - 1] if i > 0 else 0.0
        share = (level - before) / (cdf[i] - before) if cdf[i] > before else 0.0
        out[f"p{round(level * 100):02d}"] = float(edges[i] + share * (edges[i + 1] - edges[i]))
    return out


def snap_to_integers(quantiles: dict[str, float], low: float, high: float, bins: int) -> dict[str, float]:
    """Quantiles of a whole-number column: the whole number in each quantile's bin (bins narrower than 1
    hold at most one), instead of a point interpolated inside the bin; unchanged for wider bins."""
    width = (high - low) / bins
    if width >= 1:
        return quantiles
    snapped = {}
    for name, value in quantiles.items():
        i = min(int((value - low) / width), bins - 1)
        snapped[name] = float(round(low + (i + 0.5) * width))
    return snapped


@dataclass(frozen=True)
class ColumnMoments:
    """Combined count, mean and centred sum of squares (M2) of one column or group."""

    count: float
    mean: float
    m2: float

    @property
    def sd(self) -> float:
        """Sample standard deviation (``n − 1``); NaN below two values."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else math.nan


def shifted_sums(parts: Sequence[dict[str, float]], centre: float) -> tuple[float, float, float]:
    """Summed count, sum and sum of squares about ``centre`` over per-site moments (exact parts converted
    exactly, noisy parts as released)."""
    n = s1 = s2 = 0.0
    for p in parts:
        if "m2" in p:
            count = p["count"]
            mean = p["raw-sum"] / count if count else 0.0
            n, s1, s2 = n + count, s1 + p["raw-sum"] - count * centre, s2 + p["m2"] + count * (mean - centre) ** 2
        else:
            n, s1, s2 = n + p["count"], s1 + p["sum"], s2 + p["sumsq"]
    return n, s1, s2


def moments_error(parts: Sequence[dict[str, float]], centre: float, bounds: tuple[float, float], noise_sd: float,
                  epsilon: float) -> dict[str, dict[str, Any]]:
    """The DP noise of :func:`combine_moments`' count, mean and sd (``shared.dp_error``): noise sd by the delta
    method (the sd's interval: the square roots of the variance's), 95 % interval, estimable or not.
    ``noise_sd``: sd of the summed noise on an entry of scale 1 (the sum's scale is the range's half-width, the
    sum of squares' its square)."""
    raw_n, s1, s2 = shifted_sums(parts, centre)
    merged = combine_moments(parts, centre, bounds)
    half = (bounds[1] - bounds[0]) / 2
    width = dp_error.range_width(bounds)
    unclamped_mean = centre + s1 / max(raw_n, 1.0)
    mean_clamped = raw_n < 1 or not bounds[0] <= unclamped_mean <= bounds[1]
    sd_clamped = raw_n < 2 or not merged.m2 > 0
    interval = dp_error.sd_interval(merged.m2 / max(merged.count - 1, 1.0),
                                    dp_error.variance_noise_sd(raw_n, s1, s2, half, noise_sd))
    share = dp_error.ESTIMABLE_WIDTH_SHARE
    return {"count": dp_error.judged(merged.count, noise_sd, share * max(merged.count, 1.0), epsilon,
                                     clamped=raw_n < 1),
            "mean": dp_error.judged(merged.mean, dp_error.mean_noise_sd(raw_n, s1, half, noise_sd), share * width,
                                    epsilon, clamped=mean_clamped, bounds=bounds),
            "sd": dp_error.judged(merged.sd, (interval[1] - interval[0]) / (2 * dp_error.Z95), share * width,
                                  epsilon, clamped=sd_clamped, bounds=(0.0, width), interval=interval)}


def combine_moments(parts: Sequence[dict[str, float]], centre: float, bounds: tuple[float, float]) -> ColumnMoments:
    """Merge per-site moments of one column or group.

    Each part has ``count``, ``sum`` and ``sumsq`` (about ``centre``) and, from a site without DP, the exact
    ``raw-sum`` and ``m2``. All exact: Chan et al. (1979) pairwise merge, as pooled. Otherwise the shifted
    sums are added (exact parts converted exactly) and the result post-processed: count ≥ 1, M2 ≥ 0, mean
    clipped to ``bounds``.
    """
    if all("m2" in p for p in parts):
        merged = Moments()
        for p in parts:
            merged = merged + Moments(int(round(p["count"])), p["raw-sum"], p["m2"])
        return ColumnMoments(float(merged.count), merged.mean if merged.count else math.nan, merged.m2)
    n, s1, s2 = shifted_sums(parts, centre)
    n = max(n, 1.0)
    mean = centre + s1 / n
    if all(math.isfinite(b) for b in bounds):
        mean = min(max(mean, bounds[0]), bounds[1])
    return ColumnMoments(n, mean, max(s2 - n * (mean - centre) ** 2, 0.0) if math.isfinite(s2) else math.nan)


def linear_fit(gram: np.ndarray, xty: np.ndarray, yty: float, names: Sequence[str], x: dict[str, np.ndarray],
               y_centre: float, y_scale: float, noise: float = 0.0, y_bound: float = math.inf) -> dict[str, Any]:
    """Ordinary least squares from summed sufficient statistics of the standardised design and outcome,
    reported on the original scale: coefficients, SEs from ``σ²(XᵀX)⁻¹``, t, p, R², F. With DP ``noise``
    (sd per unit of scale, summed over sites) the Gram matrix is inverted by :func:`noisy_gram_inverse` with
    its eigenvalues floored at ``LINEAR_FLOOR_NOISE_SDS`` noise sds, aliasing is not tested (noise hides it),
    and the standard errors add the noise's part, ``se_dp_noise`` (:func:`linear_noise_rmse`, with ``y_bound``
    the outcome's largest standardised value): ``se`` is the total, ``se_sampling`` and ``se_dp_noise`` its
    two parts."""
    n = float(gram[0, 0])
    dp = noise > 0
    kept = list(range(gram.shape[0])) if dp else independent_columns(gram)
    bound = np.concatenate([[0.0], row_bound(x)])[kept][1:] if dp else np.zeros(len(kept) - 1)
    inverse = noisy_gram_inverse(gram[np.ix_(kept, kept)], bound, 1.0, noise,
                                 LINEAR_FLOOR_NOISE_SDS if dp else None)
    beta = np.zeros(gram.shape[0])
    beta[kept] = inverse @ xty[kept]
    rss = max(float(yty - beta[kept] @ xty[kept]), 0.0)
    tss = max(float(yty - xty[0] ** 2 / n), 0.0) if n > 0 else math.nan
    df = n - len(kept)
    sigma2 = rss / df if df > 0 else math.nan
    covariance = np.zeros_like(gram)
    covariance[np.ix_(kept, kept)] = sigma2 * inverse
    m = design_map(x["centre"], x["scale"])
    estimate = y_scale * (m.T @ beta)
    estimate[0] += y_centre
    sampling = y_scale ** 2 * (m.T @ covariance @ m)
    noise_covariance = np.zeros_like(gram)
    if dp:
        noise_covariance = np.diag(np.square(linear_noise_rmse(gram, xty, x, y_scale, noise, y_bound)))
    covariance = sampling + noise_covariance
    r2 = 1 - rss / tss if tss > 0 else math.nan
    q = len(kept) - 1
    f = ((tss - rss) / q) / (rss / df) if q > 0 and df > 0 and rss > 0 else math.nan
    return {"n": n if dp else int(round(n)), "df_residual": df,
            "sigma": y_scale * math.sqrt(sigma2) if df > 0 else None, "r2": r2,
            "adj_r2": 1 - (1 - r2) * (n - 1) / df if df > 0 else None, "f": f,
            "f_p": float(scipy_stats.f.sf(f, q, df)) if math.isfinite(f) else None,
            "coefficients": with_noise_parts(coefficient_table(names, estimate, covariance, kept, df), sampling,
                                             noise_covariance) if dp else
            coefficient_table(names, estimate, covariance, kept, df), "dp": dp,
            "scale": "original units of each covariate and of the outcome"}


def dp_linear_coefficients(gram: np.ndarray, xty: np.ndarray, x: dict[str, np.ndarray], y_scale: float,
                           noise: float) -> np.ndarray:
    """The DP least-squares coefficients (without the intercept's outcome centre) on the original scale:
    ``y_scale · Mᵀ G_f⁻¹ Xᵀy`` with ``G_f`` the Gram floored as in :func:`linear_fit`."""
    inverse = noisy_gram_inverse(gram, row_bound(x), 1.0, noise, LINEAR_FLOOR_NOISE_SDS)
    return y_scale * (design_map(x["centre"], x["scale"]).T @ (inverse @ xty))


def linear_noise_rmse(gram: np.ndarray, xty: np.ndarray, x: dict[str, np.ndarray], y_scale: float, noise: float,
                      y_bound: float) -> np.ndarray:
    """What the DP noise does to each least-squares coefficient (original scale), in two parts added as
    variances: the noise of ``Xᵀy`` exactly, given the released Gram, and the Gram's noise by a parametric
    bootstrap.

    Given the released (noisy) Gram ``G``, the coefficients ``y_scale · Mᵀ G_f⁻¹ Xᵀy`` (``G_f``: floored as in
    :func:`linear_fit`) are linear in ``Xᵀy``, whose noise is independent of the Gram's with sd ``noise × b_j ×
    y_bound`` (``b = [1, bound]``), so that part's covariance is ``A diag(sd²) Aᵀ`` with ``A = y_scale · Mᵀ G_f⁻¹``,
    the delta method's sandwich at the release (exact here, the map being linear): the conditional view of noisy
    sufficient statistics that Bernstein & Sheldon (2018, "Differentially private Bayesian inference for
    exponential families", NeurIPS; 2019 for linear regression, AISTATS) take. The Gram's noise ``noise × b_j
    b_l`` enters non-linearly (the inverse, the floor's shrinkage): its part is the root-mean-square distance of
    a parametric bootstrap (``shared.dp_error.bootstrap_rmse``; Efron & Tibshirani 1993, "An Introduction to
    the Bootstrap", ch. 6 and 10) that re-noises the released Gram's distinct entries only, ``Xᵀy`` held at its
    released value.

    Why not the bootstrap of both, as until issue 19's fifth pass: re-noising the Gram around a release that
    already carries its noise makes each draw's inverse see the Gram's noise twice, and ``Xᵀy``'s noise,
    most of the coefficients' error, was passed through those doubly noisy inverses (whose weak directions
    are weaker: ``E[G̃⁻¹ Σ G̃⁻¹]`` grows with the Gram's noise). On the fixed sums of 10 sites × 10⁴ rows, ε = 1,
    150 noise draws, that part alone was reported 1.3-1.4 × its real spread for 7 of 11 coefficients, and the
    intervals covered the noise-free fit 0.981 (BENCHMARKS.md, issue 19's fifth pass). Why not the delta method
    for both: it is first order in the Gram's noise and blind to the floor's shrinkage (0.896 coverage with the
    old floor at 10 × 10⁴, ε = 1; the floor's history in :data:`LINEAR_FLOOR_NOISE_SDS`).
    """
    d = gram.shape[0]
    upper = np.triu_indices(d)
    b = np.concatenate([[1.0], row_bound(x)])
    inverse = noisy_gram_inverse(gram, row_bound(x), 1.0, noise, LINEAR_FLOOR_NOISE_SDS)
    to_coefficients = y_scale * (design_map(x["centre"], x["scale"]).T @ inverse)
    xty_variance = np.square(to_coefficients) @ np.square(noise * b * y_bound)

    def coefficients(values: np.ndarray) -> np.ndarray:
        """The coefficients from a re-noised packed Gram and the released ``Xᵀy``."""
        return dp_linear_coefficients(unpack_triu(values, d), xty, x, y_scale, noise)

    gram_part = dp_error.bootstrap_rmse(gram[upper], noise * np.outer(b, b)[upper], coefficients)
    return np.sqrt(xty_variance + np.square(gram_part))


def logistic_step_noise(hessian: np.ndarray, gradient: np.ndarray, beta_before: np.ndarray, beta_after: np.ndarray,
                        carried: np.ndarray, bound: np.ndarray, noise: float,
                        draws: int = dp_error.BOOTSTRAP_DRAWS, seed: int = dp_error.BOOTSTRAP_SEED) -> np.ndarray:
    """Noise second-moment matrix (about the released ``beta_after``, standardised scale) of one DP Newton step
    ``β_after = β_before + H_f⁻¹ g``, given ``carried``, that of ``β_before`` (zeros at the first step).

    A parametric bootstrap of the noise through the same floored step: each draw moves ``β_before`` by
    ``e ~ N(0, carried)``, re-noises the step's release (the Hessian's distinct entries with sd
    ``noise × b_j b_l / 4``, the gradient's ``noise × b_j``, ``b = [1, bound]``), moves the gradient to the
    moved ``β`` to first order with the released Hessian (``g − H e``: the sites cannot be asked again) and
    takes the floored step. So the earlier steps' noise is carried through this step as the step carries it
    (removed along well-determined directions, kept along the ones the floor damps, spread by the noisy
    inverse), and this step's own noise is added. Why not the delta method on the last step alone, as
    before: on fixed data it covered the noise-free fit 0.69-0.71 of the time, its sd 0.47-0.54 of the real
    spread (3 sites × ~1,300, ε = 0.5-1, ``benchmarks/analytics_noise_only.py``)."""
    d = hessian.shape[0]
    upper = np.triu_indices(d)
    b = np.concatenate([[1.0], np.asarray(bound, dtype=np.float64)])
    packed = hessian[upper]
    h_scale = noise * 0.25 * np.outer(b, b)[upper]
    rng = np.random.default_rng(seed)
    values, vectors = np.linalg.eigh((carried + carried.T) / 2)
    root = vectors * np.sqrt(np.maximum(values, 0.0))
    runs = np.empty((draws, d))
    for i in range(draws):
        e = root @ rng.standard_normal(d)
        h = unpack_triu(packed + rng.standard_normal(len(packed)) * h_scale, d)
        g = gradient - hessian @ e + rng.standard_normal(d) * noise * b
        runs[i] = beta_before + e + noisy_gram_inverse(h, b[1:], 0.25, noise, LOGISTIC_FLOOR_NOISE_SDS) @ g
    shift = runs - beta_after
    return shift.T @ shift / draws


def with_noise_parts(table: dict[str, dict[str, Any]], sampling: np.ndarray,
                     noise: np.ndarray) -> dict[str, dict[str, Any]]:
    """A DP coefficient table with each term's standard error split: ``se_sampling`` (the model's), ``se_dp_noise``
    (the DP noise's, delta method), their total ``se`` (what t, p use) and the 95 % interval on it."""
    for j, row in enumerate(table.values()):
        if row["estimate"] is None:
            continue
        row["se_sampling"] = math.sqrt(max(sampling[j, j], 0.0))
        row["se_dp_noise"] = math.sqrt(max(noise[j, j], 0.0))
        row["ci95"] = [row["estimate"] - dp_error.Z95 * row["se"], row["estimate"] + dp_error.Z95 * row["se"]]
    return table


def anova_table(groups: dict[str, ColumnMoments]) -> dict[str, Any]:
    """One-way ANOVA from per-group count, mean and M2: SSB, SSW, F and ``scipy.stats.f.sf`` p-value."""
    groups = {g: m for g, m in groups.items() if m.count >= 1}
    n = sum(m.count for m in groups.values())
    k = len(groups)
    grand = sum(m.count * m.mean for m in groups.values()) / n if n else math.nan
    ssb = sum(m.count * (m.mean - grand) ** 2 for m in groups.values())
    ssw = sum(m.m2 for m in groups.values())
    df_b, df_w = k - 1, n - k
    f = (ssb / df_b) / (ssw / df_w) if df_b > 0 and df_w > 0 and ssw > 0 else math.nan
    return {"groups": {g: {"n": m.count, "mean": m.mean, "sd": m.sd} for g, m in sorted(groups.items())},
            "n": n, "k": k, "ss_between": ssb, "ss_within": ssw, "df_between": df_b, "df_within": df_w,
            "f": f, "p": float(scipy_stats.f.sf(f, df_b, df_w)) if math.isfinite(f) else None,
            "eta_squared": ssb / (ssb + ssw) if ssb + ssw > 0 else None}


def correlation_of(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The correlation matrix (entries clipped to ±1) and the sds of ``z`` from the summed Gram of ``[1, z]``."""
    n = max(float(gram[0, 0]), 2.0)
    mean_z = gram[0, 1:] / n
    covariance = (gram[1:, 1:] - n * np.outer(mean_z, mean_z)) / (n - 1)
    sd_z = np.sqrt(np.maximum(np.diag(covariance), 1e-12))
    correlation = np.clip(covariance / np.outer(sd_z, sd_z), -1.0, 1.0)
    np.fill_diagonal(correlation, 1.0)
    return correlation, sd_z


EIGENVALUES_RESOLVED_SHARE = 0.25
"""The DP eigenvalues' noise sd is the bootstrap's per-eigenvalue root-mean-square distance when the noise's 95 %
reach (:func:`eigenvalue_noise_bound`) is at most this share of the released spectrum's spread (largest minus
smallest eigenvalue): the matrix's structure, not the noise, sets the spectrum, and a re-noised release moves each
eigenvalue as the real noise did. Above it, Weyl's bound itself (:func:`eigenvalue_sd`). Measured on fixed data
with the noise redrawn (8-10 draws per row, 8 eigenvalues): at 10 sites × 10⁴ rows, reach / spread 0.02-0.10 at
ε = 3-0.5, the per-eigenvalue interval covered 0.97 where Weyl's covered 1.00 at 2.5-5 × the width; at 3 sites
× ~1,300, reach / spread 0.66 (ε = 3) covered 0.91 and about 1 (ε ≤ 1) 0.40-0.64: noise-dominated spectra, where
only the bound holds."""


def eigenvalue_sd(rmse: np.ndarray, bound: float, eigenvalues: np.ndarray) -> np.ndarray:
    """Noise sd of each DP eigenvalue: the bootstrap's root-mean-square distance ``rmse`` where the noise's reach
    ``bound`` is small against the spectrum's spread, else ``bound / 1.96`` for all (so ± 1.96 sd is Weyl's
    bound); :data:`EIGENVALUES_RESOLVED_SHARE`."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    spread = float(values.max() - values.min()) if values.size else 0.0
    if np.all(np.isfinite(rmse)) and bound <= EIGENVALUES_RESOLVED_SHARE * spread:
        return np.minimum(np.asarray(rmse, dtype=np.float64), bound / dp_error.Z95)
    return np.full(values.shape, bound / dp_error.Z95)


def eigenvalue_noise_bound(released: np.ndarray, noise_scale: np.ndarray, d: int) -> float:
    """A 95 % bound on how far DP noise moves any eigenvalue of the correlation matrix from a packed Gram
    release: by Weyl's inequality no eigenvalue moves more than the spectral norm of the change in the matrix
    (Weyl 1912; Horn & Johnson, "Matrix Analysis", thm 4.3.1), whatever the bias the noise gives the spectrum
    (a noised symmetric matrix's eigenvalues spread outward, the bottom ones pile up at the 0 clamp). The
    norm's mean + 1.645 sd over a parametric bootstrap of the noise (``shared.dp_error``) at the release.
    Why not the bootstrap's root-mean-square distance of each eigenvalue, as before: measured on fixed data
    it covered the noise-free eigenvalues 0.31-0.41 of the time (3 sites × ~1,300, ε = 0.5-1; reported sd
    0.20-0.28 of the real root-mean-square error; ``benchmarks/analytics_noise_only.py``). Conservative:
    the bound holds for all eigenvalues at once."""
    centre, _ = correlation_of(unpack_triu(released, d))

    def moved(noisy: np.ndarray) -> np.ndarray:
        """Spectral norm of the change the re-noised release makes to the correlation matrix."""
        return np.array([np.linalg.norm(correlation_of(unpack_triu(noisy, d))[0] - centre, 2)])

    sd, mean = dp_error.bootstrap(released, noise_scale, moved, dp_error.BOOTSTRAP_DRAWS, dp_error.BOOTSTRAP_SEED)
    return float(mean[0] + 1.645 * sd[0])


def correlation_pca(gram: np.ndarray, x: dict[str, np.ndarray], features: Sequence[str]) -> dict[str, Any]:
    """PCA of the correlation matrix from the summed Gram of ``[1, z]`` (z standardised by ``x``); also the
    complete-case mean and sd on the original scale (what k-means standardises with)."""
    n = max(float(gram[0, 0]), 2.0)
    mean_z = gram[0, 1:] / n
    correlation, sd_z = correlation_of(gram)
    values, vectors = np.linalg.eigh(correlation)
    order = np.argsort(values)[::-1]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    mean = x["centre"] + x["scale"] * mean_z
    sd = x["scale"] * sd_z
    return {"features": list(features), "n": n, "mean": dict(zip(features, mean.tolist(), strict=True)),
            "sd": dict(zip(features, sd.tolist(), strict=True)), "eigenvalues": values.tolist(),
            "explained_variance_ratio": (values / values.sum()).tolist() if values.sum() > 0 else None,
            "components": vectors.T.tolist(),
            "basis": "correlation matrix of complete-case rows (features standardised by their complete-case "
                     "federated mean and sd); components are rows, sign: largest loading positive"}


def initial_centroids(eigenvalues: Sequence[float], components: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` standardised initial centroids from the PCA of the federated correlation matrix alone.

    k = 1: the mean (0). One feature: ``k`` points evenly spread over mean ± 1 sd. k = 2: mean ± 1 sd along
    PC1. k ≥ 3: ``k`` points equally spaced in angle, from a phase drawn with ``seed``, on the one-sd ellipse
    of PC1 and PC2 (``cos θ · sd₁ · v₁ + sin θ · sd₂ · v₂``). No row leaves a site.
    """
    components = np.asarray(components, dtype=np.float64)
    sd = np.sqrt(np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0))
    if k == 1:
        return np.zeros((1, components.shape[1]))
    if components.shape[0] < 2:
        return np.outer(np.linspace(-1.0, 1.0, k), sd[0] * components[0])
    if k == 2:
        return np.outer([1.0, -1.0], sd[0] * components[0])
    phase = np.random.default_rng(seed).uniform(0.0, 2 * np.pi / k)
    angles = phase + 2 * np.pi * np.arange(k) / k
    return np.outer(np.cos(angles), sd[0] * components[0]) + np.outer(np.sin(angles), sd[1] * components[1])


def standardised_box(x: dict[str, np.ndarray]) -> np.ndarray:
    """The (p, 2) range of clipped standardised values ``(bounds − centre) / scale`` (±inf without a range)."""
    bounds = x["bounds"]
    low = np.where(np.isnan(bounds[:, 0]), -np.inf, (bounds[:, 0] - x["centre"]) / x["scale"])
    high = np.where(np.isnan(bounds[:, 1]), np.inf, (bounds[:, 1] - x["centre"]) / x["scale"])
    return np.column_stack([low, high])


def inertia_bound(box: np.ndarray, centroids: np.ndarray) -> float:
    """Largest squared distance from a point of the box to its nearest centroid is at most this: the
    farthest corner from the best single centroid (a site's per-row bound of its inertia sums; with the DP
    noise sd, the sd of their noise)."""
    corner = np.maximum(np.square(box[None, :, 0] - centroids), np.square(box[None, :, 1] - centroids))
    return float(corner.sum(axis=1).min())


def lloyd_update(centroids: np.ndarray, counts: np.ndarray, sums: np.ndarray, box: np.ndarray) -> np.ndarray:
    """New centroids: per-cluster mean of the summed sums, kept in the (p, 2) ``box`` of clipped standardised
    values (a no-op without noise); a cluster with (noisy) count below 1 keeps its centroid."""
    new = centroids.copy()
    alive = counts >= 1
    new[alive] = sums[alive] / counts[alive, None]
    return np.clip(new, box[:, 0], box[:, 1])
