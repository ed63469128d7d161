"""What a hospital computes for federated analytics: aggregates of its own rows, optionally DP-noised.

The seed paper's statistics — descriptive table, regression, ANOVA across formulations, PCA and k-means
cluster profiles — are usually computed on pooled rows. Here each site answers the server's questions with
*sums* over its own rows only, and the server (``server.analytics_phase``) adds them up. Every statistic below is
a function of such sums, so with DP off the federated result equals the pooled one:

- **describe** — per numeric column: count, sum, sum of squares (about a public centre), a histogram on a
  fixed grid of the column's declared range; without DP also the site's exact moments (count, sum, centred
  sum of squares, combined by Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for
  computing sample variances", STAN-CS-79-773) and its min and max.
- **linear** — the sufficient statistics of least squares, ``XᵀX``, ``Xᵀy``, ``yᵀy`` (``n`` is ``XᵀX[0, 0]``):
  regression on distributed databases from summed sufficient statistics, Karr, Lin, Sanil & Reiter (2005),
  "Secure regression on distributed databases", J. Comput. Graph. Stat. 14(2):263-279.
- **logistic** — one Newton–Raphson step: at the server's β, the gradient ``Xᵀ(y − p)`` and Hessian
  ``Xᵀ diag(p(1 − p)) X`` sums (and the log-likelihood without DP).
- **anova** — per group (formulation): count, sum and sum of squares of the response.
- **pca** — ``Σ z``, ``Σ z zᵀ`` of standardised complete-case feature rows (one Gram matrix with a leading 1).
- **lloyd** — one Lloyd (1982) iteration ("Least squares quantization in PCM", IEEE Trans. Inf. Theory
  28(2):129-137): per-cluster counts and sums of the rows nearest each of the server's centroids.
- **profiles** — at the final centroids: per-cluster counts, feature and outcome sums (the seed's Table 3),
  inertia, the simplified silhouette (Rousseeuw 1987, "Silhouettes", J. Comput. Appl. Math. 20:53-65, with
  distances to centroids instead of to all points: Hruschka, Campello & de Castro 2004; Vendramin, Campello
  & Hruschka 2010) and a 2-D histogram of the rows projected on the top two principal components, for the
  plot (never the rows themselves).

Rows used. All rows of the site's table (every split: these are descriptive analyses, not model
selection); each analysis uses the rows complete in the columns it needs (complete-case analysis).

Differential privacy. A site whose ``site.toml`` enables DP (``[privacy] dp = true``) — the site decides,
not the server — releases every aggregate through its one DP release (``client.dp``, phase ``analytics``),
under add/remove-one-row neighbouring:

1. every value is clipped to a public range (the schema's, or the task's ``[ranges]``, sent by the server),
   so one row changes each released entry by at most a known amount ``scale`` (e.g. a sum of ``x − c`` with
   ``c`` the range's midpoint: half the range; a count: 1; a histogram: one bin by 1);
2. one row then changes at most ``touched`` entries of each block (once divided by their scale) by at most
   1, so the L2 sensitivity of the whole release is ``Δ = sqrt(Σ touched)`` and each query is one Gaussian
   mechanism (``client.dp.gaussian_release``), charged to the site's privacy ledger.

The site's ε for analytics is its ``[privacy.shares] analytics`` of what is left of its budget; the run
announces how many queries it plans (``dp-releases``) so the site sets σ for all of them at its first
query and refuses a run it cannot finish. Values released without DP (exact moments, min, max, the
log-likelihood) are never sent by a DP site. Group labels (formulation ids) are sent as text: they are the
site's catalogue, treated as public site-level information, not patient data.

Secure sum. When the request says ``secure-sum`` (pairwise or recovering, ``server.secure_aggregation``), the
site sends only what adds up: its blocks (noised first under DP, so the noise is added before masking), the
suppressed 2-D histogram in place of its block without DP, the exact extras that are sums (log-likelihood,
inertia) in a run without DP sites, and never min, max or centred moments (not sums), all as one fixed-point
vector masked by ``client.secure_aggregation`` (:func:`secure_reply`); names and shapes travel in the clear. A
query with group labels (ANOVA) is asked twice: once for the labels only (nothing released, nothing charged),
then with the union of every site's groups (``groups``), which every site lays its blocks out by.

Small cells. Without DP a site's aggregates are exact and a small group (one patient's cycles) can be
read off them, as with any exact table. The plot's 2-D histogram, which has no other use, suppresses cells
under ``MIN_CELL_COUNT`` rows at the site.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from scipy.special import expit, log_expit

from client.dp import Block, PhaseRelease, gaussian_release, sensitivity
from client.secure_aggregation import masked_floats
from client.site import SiteHandlers, SiteRequest
from shared.analytics import inertia_bound
from shared.protocol import ErrorCode, messages
from shared.protocol import analytics as wire
from shared.protocol import hist as h
from shared.protocol import records as r
from shared.protocol.analytics import MIN_CELL_COUNT
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RELEASE_INDEX, RELEASE_WEIGHTS, RELEASES

# ---------------------------------------------------------------------------------------------------------
# What a site releases


@dataclass
class Release:
    """Everything a site computed for one query.

    ``blocks`` may be released with DP noise; ``exact`` holds values only a site without DP sends (they have
    no bounded sensitivity: min, max, centred moments, the log-likelihood); ``labels`` are public text
    (group names).
    """

    blocks: dict[str, Block] = field(default_factory=dict)
    exact: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)

    def exact_arrays(self) -> dict[str, np.ndarray]:
        """What a site without DP sends: every block as computed, and the exact extras (which win on a name)."""
        return {**{name: np.asarray(b.values, dtype=np.float64) for name, b in self.blocks.items()}, **self.exact}


# ---------------------------------------------------------------------------------------------------------
# Columns, clipping, standardising


def numbers(frame: pd.DataFrame, column: str) -> np.ndarray:
    """One column as float64 with NaN for missing; an absent or non-numeric column raises ``ValueError``."""
    if column not in frame.columns:
        raise ShareableError(f"the site's table has no column {column!r}")
    try:
        return pd.to_numeric(frame[column], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as err:
        raise ShareableError(f"column {column!r} is not numeric") from err


def matrix(frame: pd.DataFrame, columns: list[str] | tuple[str, ...]) -> np.ndarray:
    """Columns as an (n, p) float64 matrix with NaN for missing."""
    if not columns:
        return np.zeros((len(frame), 0))
    return np.column_stack([numbers(frame, c) for c in columns])


def binary(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A 0/1 outcome as float64 (NaN for missing); any other value raises ``ValueError``."""
    values = numbers(frame, column)
    present = values[~np.isnan(values)]
    if not np.isin(present, (0.0, 1.0)).all():
        raise ShareableError(f"outcome {column!r} must be coded 0/1 for logistic regression; it holds other "
                             "values")
    return values


def centre_and_half_range(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints and half-widths of (p, 2) ranges; 0 and +inf where a range is not declared (NaN)."""
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(bounds).all(axis=1)
    centre = np.where(finite, bounds.mean(axis=1), 0.0)
    half = np.where(finite, (bounds[:, 1] - bounds[:, 0]) / 2, np.inf)
    return centre, half


def clip(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Values clipped to their column's range (NaN bounds: not clipped; NaN values stay NaN)."""
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
    low = np.where(np.isnan(bounds[:, 0]), -np.inf, bounds[:, 0])
    high = np.where(np.isnan(bounds[:, 1]), np.inf, bounds[:, 1])
    return np.clip(values, low, high)


@dataclass(frozen=True)
class Standardiser:
    """``z = (clip(x) − centre) / scale`` with public ranges, and the bound ``|z| ≤ bound`` that gives.

    Parameters
    ----------
    centre, scale : ndarray, shape (p,)
        The federated mean and sd the server sends (any public values work; they only condition numbers).
    bounds : ndarray, shape (p, 2)
        Declared ranges (NaN: none, bound +inf).
    """

    centre: np.ndarray
    scale: np.ndarray
    bounds: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> Standardiser:
        """Read ``<prefix>centre``, ``<prefix>scale`` and ``<prefix>bounds`` from a request's arrays."""
        centre = np.asarray(arrays[prefix + "centre"], dtype=np.float64).ravel()
        scale = np.asarray(arrays[prefix + "scale"], dtype=np.float64).ravel()
        bounds = np.asarray(arrays[prefix + "bounds"], dtype=np.float64).reshape(-1, 2)
        if not (len(centre) == len(scale) == len(bounds)):
            raise ShareableError("centre, scale and bounds must have one entry per column")
        if not (np.all(np.isfinite(centre)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ShareableError("centre must be finite and scale finite and > 0")
        return cls(centre, scale, bounds)

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Standardised, clipped values (NaN stays NaN)."""
        return (clip(values, self.bounds) - self.centre) / self.scale

    def bound(self) -> np.ndarray:
        """Largest ``|z|`` a clipped value can have, per column (+inf without a range)."""
        low = np.abs(self.bounds[:, 0] - self.centre) / self.scale
        high = np.abs(self.bounds[:, 1] - self.centre) / self.scale
        return np.where(np.isfinite(self.bounds).all(axis=1), np.maximum(low, high), np.inf)

    def box(self) -> np.ndarray:
        """The (p, 2) range of ``z`` (±inf without a range)."""
        low = np.where(np.isnan(self.bounds[:, 0]), -np.inf, (self.bounds[:, 0] - self.centre) / self.scale)
        high = np.where(np.isnan(self.bounds[:, 1]), np.inf, (self.bounds[:, 1] - self.centre) / self.scale)
        return np.column_stack([low, high])


def triu(square: np.ndarray) -> np.ndarray:
    """The upper triangle (with the diagonal) of a square matrix, row by row: one entry per distinct value."""
    return square[np.triu_indices(square.shape[0])]


def gram(z: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Packed upper triangle of ``Z̃ᵀ W Z̃`` with ``Z̃ = [1, z]`` (entry 0 is ``Σ w``, i.e. ``n`` unweighted)."""
    design = np.column_stack([np.ones(len(z)), z])
    weighted = design if weights is None else design * weights[:, None]
    return triu(weighted.T @ design)


def gram_scale(bound: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """Per-row bound of each entry of :func:`gram`: ``factor · B_j B_l`` with ``B_0 = 1``."""
    b = np.concatenate([[1.0], bound])
    with np.errstate(invalid="ignore"):
        return triu(factor * np.outer(b, b))


# ---------------------------------------------------------------------------------------------------------
# The queries: pure functions of the site's table


def describe(frame: pd.DataFrame, columns: list[str], bounds: np.ndarray, bins: int) -> Release:
    """Count, sum and sum of squares about the range midpoint, and a histogram on the fixed range grid.

    One row touches each column once, so each block has ``touched = p``. Exact extras: raw sums, centred
    sums of squares (M2, for Chan et al. 1979 combination), min and max.
    """
    values = matrix(frame, columns)
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
    present = ~np.isnan(values)
    centre, half = centre_and_half_range(bounds)
    shifted = clip(values, bounds) - centre
    count = present.sum(axis=0).astype(np.float64)
    histogram = np.zeros((len(columns), bins))
    for j in range(len(columns)):
        if np.isfinite(bounds[j]).all() and bounds[j, 1] > bounds[j, 0]:
            histogram[j] = np.histogram(shifted[present[:, j], j] + centre[j], bins=bins, range=tuple(bounds[j]))[0]
    p = len(columns)
    raw_sum = np.nansum(values, axis=0)
    mean = np.divide(raw_sum, count, out=np.zeros(p), where=count > 0)
    m2 = np.nansum(np.square(values - mean), axis=0)
    return Release(
        blocks={"count": Block(count, 1.0, p), "sum": Block(np.nansum(shifted, axis=0), half, p),
                "sumsq": Block(np.nansum(np.square(shifted), axis=0), np.square(half), p),
                "histogram": Block(histogram, 1.0, p)},
        exact={"raw-sum": raw_sum, "m2": m2,
               "min": np.where(count > 0, np.nanmin(np.where(present, values, np.inf), axis=0), np.inf),
               "max": np.where(count > 0, np.nanmax(np.where(present, values, -np.inf), axis=0), -np.inf)},
    )


def linear_sums(frame: pd.DataFrame, covariates: list[str], outcomes: list[str], x: Standardiser,
                y: Standardiser) -> Release:
    """Per outcome, over rows complete in the covariates and that outcome: ``Z̃ᵀZ̃`` (packed), ``Z̃ᵀy``, ``yᵀy``,
    with ``Z̃ = [1, z]`` and ``y`` both standardised (Karr et al. 2005)."""
    z_all = x.transform(matrix(frame, covariates))
    y_all = y.transform(matrix(frame, outcomes))
    bound_x, bound_y = x.bound(), y.bound()
    release = Release()
    d = len(covariates) + 1
    for j, outcome in enumerate(outcomes):
        rows = ~np.isnan(z_all).any(axis=1) & ~np.isnan(y_all[:, j])
        z, target = z_all[rows], y_all[rows, j]
        design = np.column_stack([np.ones(len(z)), z])
        b = np.concatenate([[1.0], bound_x])
        release.blocks[f"{outcome}/gram"] = Block(gram(z), gram_scale(bound_x), d * (d + 1) // 2)
        release.blocks[f"{outcome}/xty"] = Block(design.T @ target, b * bound_y[j], d)
        release.blocks[f"{outcome}/yty"] = Block(np.array([target @ target]), bound_y[j] ** 2, 1)
    return release


def logistic_sums(frame: pd.DataFrame, covariates: list[str], outcomes: list[str], x: Standardiser,
                  betas: Mapping[str, np.ndarray]) -> Release:
    """One Newton–Raphson step's sums at the server's β (standardised scale), per 0/1 outcome, over rows
    complete in the covariates and that outcome: count, gradient ``Z̃ᵀ(y − p)``, Hessian ``Z̃ᵀ diag(p(1−p)) Z̃``
    (packed); exact extra: the log-likelihood. Bounds: ``|y − p| ≤ 1`` and ``p(1 − p) ≤ 1/4``."""
    z_all = x.transform(matrix(frame, covariates))
    bound = x.bound()
    b = np.concatenate([[1.0], bound])
    d = len(covariates) + 1
    release = Release()
    for outcome in outcomes:
        beta = np.asarray(betas[outcome], dtype=np.float64).ravel()
        if beta.shape != (d,):
            raise ShareableError(f"beta of {outcome!r} has {beta.size} entries; expected {d}")
        target_all = binary(frame, outcome)
        rows = ~np.isnan(z_all).any(axis=1) & ~np.isnan(target_all)
        z, target = z_all[rows], target_all[rows]
        design = np.column_stack([np.ones(len(z)), z])
        eta = design @ beta
        prob = expit(eta)
        release.blocks[f"{outcome}/count"] = Block(np.array([float(len(z))]), 1.0, 1)
        release.blocks[f"{outcome}/gradient"] = Block(design.T @ (target - prob), b, d)
        release.blocks[f"{outcome}/hessian"] = Block(gram(z, prob * (1 - prob)), gram_scale(bound, 0.25),
                                                     d * (d + 1) // 2)
        release.exact[f"{outcome}/loglik"] = np.array([float(target @ log_expit(eta)
                                                             + (1 - target) @ log_expit(-eta))])
    return release


def group_moments(frame: pd.DataFrame, response: str, factor: str, bounds: np.ndarray) -> Release:
    """Per group of ``factor`` (rows with a response): count, sum and sum of squares about the range
    midpoint; exact extras: raw sums and centred sums of squares. One row touches one group."""
    values = numbers(frame, response)
    if factor not in frame.columns:
        raise ShareableError(f"the site's table has no column {factor!r}")
    groups = frame[factor]
    rows = ~np.isnan(values) & groups.notna().to_numpy()
    labels = groups[rows].astype(str).to_numpy()
    values = values[rows]
    names = sorted(set(labels.tolist()))
    bounds = np.asarray(bounds, dtype=np.float64).reshape(1, 2)
    centre, half = centre_and_half_range(bounds)
    shifted = clip(values[:, None], bounds)[:, 0] - centre[0]
    count, total, sumsq, raw, m2 = (np.zeros(len(names)) for _ in range(5))
    for g, name in enumerate(names):
        mine = labels == name
        count[g] = mine.sum()
        total[g] = shifted[mine].sum()
        sumsq[g] = np.square(shifted[mine]).sum()
        raw[g] = values[mine].sum()
        m2[g] = np.square(values[mine] - raw[g] / count[g]).sum()
    return Release(blocks={"count": Block(count, 1.0, 1), "sum": Block(total, half[0], 1),
                           "sumsq": Block(sumsq, half[0] ** 2, 1)},
                   exact={"raw-sum": raw, "m2": m2}, labels={"groups": names})


def cross_products(frame: pd.DataFrame, features: list[str], x: Standardiser) -> Release:
    """``Σ z̃ z̃ᵀ`` (packed) with ``z̃ = [1, z]`` over rows complete in ``features``: n, Σz and Σzzᵀ at once."""
    z = x.transform(matrix(frame, features))
    z = z[~np.isnan(z).any(axis=1)]
    d = len(features) + 1
    return Release(blocks={"gram": Block(gram(z), gram_scale(x.bound()), d * (d + 1) // 2)})


def nearest_two(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row: index of the nearest centroid, its squared distance, and the squared distance to the
    second nearest (inf with one centroid). Ties go to the lower index."""
    distances = np.square(z[:, None, :] - centroids[None, :, :]).sum(axis=2)
    order = np.argsort(distances, axis=1, kind="stable")
    nearest = order[:, 0]
    first = np.take_along_axis(distances, order[:, :1], axis=1)[:, 0]
    second = (np.take_along_axis(distances, order[:, 1:2], axis=1)[:, 0] if centroids.shape[0] > 1
              else np.full(len(z), np.inf))
    return nearest, first, second


def _complete_standardised(frame: pd.DataFrame, features: list[str], x: Standardiser,
                           centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardised, clipped feature rows and which of them are complete; checks the centroids' shape."""
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.ndim != 2 or centroids.shape[1] != len(features):
        raise ShareableError(f"centroids must be (k, {len(features)}); got {centroids.shape}")
    z = x.transform(matrix(frame, features))
    return z, ~np.isnan(z).any(axis=1)


def lloyd_sums(frame: pd.DataFrame, features: list[str], x: Standardiser, centroids: np.ndarray) -> Release:
    """One Lloyd iteration's sums: per cluster the count and the sum of standardised rows nearest to it
    (one row touches one count and p sums); exact extra: the inertia at these centroids."""
    centroids = np.asarray(centroids, dtype=np.float64)
    z_all, rows = _complete_standardised(frame, features, x, centroids)
    z = z_all[rows]
    k = centroids.shape[0]
    nearest, first, _ = nearest_two(z, centroids)
    counts = np.bincount(nearest, minlength=k).astype(np.float64)
    sums = np.zeros_like(centroids)
    np.add.at(sums, nearest, z)
    return Release(blocks={"count": Block(counts, 1.0, 1),
                           "sum": Block(sums, np.broadcast_to(x.bound(), sums.shape), len(features))},
                   exact={"inertia": np.array([first.sum()])})


def cluster_profiles(frame: pd.DataFrame, features: list[str], x: Standardiser, centroids: np.ndarray,
                     outcomes: list[str], outcome_bounds: np.ndarray, components: np.ndarray,
                     limits: np.ndarray, grid_bins: int) -> Release:
    """At the final centroids, per cluster: count, sums of standardised features, count and sum of each
    outcome present (about its range midpoint), inertia, simplified-silhouette sum; and the 2-D histogram of
    the rows projected on ``components`` within ``limits`` (cells under ``MIN_CELL_COUNT`` sent as 0 when
    exact). The silhouette of a row is ``(b − a) / max(a, b)`` with ``a``, ``b`` its distances to the nearest
    and second-nearest centroid (0 with one centroid)."""
    centroids = np.asarray(centroids, dtype=np.float64)
    z_all, rows = _complete_standardised(frame, features, x, centroids)
    z = z_all[rows]
    k, p = centroids.shape
    nearest, first, second = nearest_two(z, centroids)
    a, b = np.sqrt(first), np.sqrt(second)
    with np.errstate(invalid="ignore", divide="ignore"):
        silhouette = np.where(np.isfinite(b) & (np.maximum(a, b) > 0), (b - a) / np.maximum(a, b), 0.0)
    counts = np.bincount(nearest, minlength=k).astype(np.float64)
    sums = np.zeros((k, p))
    np.add.at(sums, nearest, z)
    outcome_values = matrix(frame, outcomes)[rows]
    outcome_bounds = np.asarray(outcome_bounds, dtype=np.float64).reshape(-1, 2)
    centre, half = centre_and_half_range(outcome_bounds)
    shifted = clip(outcome_values, outcome_bounds) - centre
    m = len(outcomes)
    outcome_counts, outcome_sums = np.zeros((k, m)), np.zeros((k, m))
    np.add.at(outcome_counts, nearest, (~np.isnan(shifted)).astype(np.float64))
    np.add.at(outcome_sums, nearest, np.nan_to_num(shifted))
    projected = z @ np.asarray(components, dtype=np.float64).reshape(p, 2)
    limits = np.asarray(limits, dtype=np.float64).reshape(2, 2)
    inside = np.clip(projected, limits[:, 0], limits[:, 1])
    histogram = np.histogram2d(inside[:, 0], inside[:, 1], bins=grid_bins, range=limits)[0]
    inertia = np.bincount(nearest, weights=first, minlength=k)
    silhouette_sums = np.bincount(nearest, weights=silhouette, minlength=k)
    exact_histogram = np.where(histogram < MIN_CELL_COUNT, 0.0, histogram)
    release = Release(
        blocks={"count": Block(counts, 1.0, 1),
                "sum": Block(sums, np.broadcast_to(x.bound(), sums.shape), p),
                "outcome-count": Block(outcome_counts, 1.0, m),
                "outcome-sum": Block(outcome_sums, np.broadcast_to(half, outcome_sums.shape), m),
                "inertia": Block(inertia, inertia_bound(x.box(), centroids), 1),
                "silhouette": Block(silhouette_sums, 1.0, 1),
                "projection": Block(histogram, 1.0, 1)})
    release.exact["projection"] = exact_histogram  # overrides the block when sent without DP
    return release


# ---------------------------------------------------------------------------------------------------------
# Requests: config (names, sizes) + arrays (numbers) → Release


def _names(config: Mapping[str, Any], key: str) -> list[str]:
    """A list of column names from a request's config (one name given as text is a list of one)."""
    value = config.get(key, [])
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _describe_request(frame, config, arrays) -> Release:
    """``analytics_describe``: columns and bins in the config, their ranges in the arrays."""
    return describe(frame, _names(config, "columns"), arrays["bounds"], int(config["bins"]))


def _linear_request(frame, config, arrays) -> Release:
    """``analytics_linear``: covariates then outcomes share one centre / scale / bounds array."""
    covariates, outcomes = _names(config, "covariates"), _names(config, "outcomes")
    both = Standardiser.from_arrays(arrays)
    p = len(covariates)
    x = Standardiser(both.centre[:p], both.scale[:p], both.bounds[:p])
    y = Standardiser(both.centre[p:], both.scale[p:], both.bounds[p:])
    return linear_sums(frame, covariates, outcomes, x, y)


def _logistic_request(frame, config, arrays) -> Release:
    """``analytics_logistic``: covariates, outcomes, standardisation and ``beta/<outcome>``."""
    outcomes = _names(config, "outcomes")
    return logistic_sums(frame, _names(config, "covariates"), outcomes, Standardiser.from_arrays(arrays),
                         {o: arrays[f"beta/{o}"] for o in outcomes})


def _anova_request(frame, config, arrays) -> Release:
    """``analytics_anova``: response and factor names, the response's range; with ``groups`` (a secure sum), the
    blocks laid out by those groups (a group the site lacks counts 0; one it has outside them is refused)."""
    release = group_moments(frame, str(config["response"]), str(config["factor"]), arrays["bounds"])
    if SECURE_GROUPS in config:
        release = in_groups(release, [str(g) for g in config[SECURE_GROUPS]])
    return release


def in_groups(release: Release, groups: list[str]) -> Release:
    """A per-group release laid out by ``groups``; a ShareableError when the site has a group outside them."""
    own = release.labels["groups"]
    outside = set(own) - set(groups)
    if outside:
        raise ShareableError(f"{len(outside)} of the site's groups are not among the {len(groups)} requested")
    at = [groups.index(g) for g in own]

    def spread(values: np.ndarray) -> np.ndarray:
        out = np.zeros(len(groups))
        out[at] = values
        return out

    blocks = {name: Block(spread(np.asarray(b.values, dtype=np.float64)), b.scale, b.touched)
              for name, b in release.blocks.items()}
    return Release(blocks, {name: spread(v) for name, v in release.exact.items()}, {"groups": list(groups)})


def _pca_request(frame, config, arrays) -> Release:
    """``analytics_pca``: features and their standardisation."""
    return cross_products(frame, _names(config, "features"), Standardiser.from_arrays(arrays))


def _lloyd_request(frame, config, arrays) -> Release:
    """``analytics_lloyd``: features, their standardisation and the current centroids."""
    return lloyd_sums(frame, _names(config, "features"), Standardiser.from_arrays(arrays), arrays["centroids"])


def _profiles_request(frame, config, arrays) -> Release:
    """``analytics_profiles``: features, centroids, outcomes, PCA axes and the plot grid."""
    return cluster_profiles(frame, _names(config, "features"), Standardiser.from_arrays(arrays),
                            arrays["centroids"], _names(config, "outcomes"), arrays["outcome-bounds"],
                            arrays["components"], arrays["limits"], int(config["grid-bins"]))


REQUESTS: dict[str, Callable[[pd.DataFrame, Mapping[str, Any], Mapping[str, np.ndarray]], Release]] = {
    messages.ANALYTICS_DESCRIBE.action: _describe_request,
    messages.ANALYTICS_LINEAR.action: _linear_request,
    messages.ANALYTICS_LOGISTIC.action: _logistic_request,
    messages.ANALYTICS_ANOVA.action: _anova_request,
    messages.ANALYTICS_PCA.action: _pca_request,
    messages.ANALYTICS_LLOYD.action: _lloyd_request,
    messages.ANALYTICS_PROFILES.action: _profiles_request,
}
"""Every analytics query a site answers, by message name."""


@dataclass
class Answer:
    """A site's reply to one query: the arrays it releases, public labels and what it says about privacy."""

    arrays: dict[str, np.ndarray]
    labels: dict[str, list[str]]
    meta: dict[str, Any]


def answer(query: str, frame: pd.DataFrame, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
           release: PhaseRelease | None) -> Answer:
    """Compute one query on the site's table; with the site's ``analytics`` release (its DP is on), noise it and
    charge it (``config`` carries the run's planned query count and this query's index, ``client.dp``). The
    reply's ``noise-sd`` is the noise sd on an entry of scale 1 (``σ × sensitivity``), public like σ; with it
    the ε this run planned for analytics at the site (``epsilon-planned``) and the ledger's ε spent before the
    run's first analytics release (``epsilon-at-start``), so the server reports planned against spent."""
    if query not in REQUESTS:
        raise ShareableError(f"unknown analytics query {query!r}; known: {', '.join(REQUESTS)}")
    computed = REQUESTS[query](frame, config, arrays)
    if release is None:
        return Answer(computed.exact_arrays(), computed.labels, {"dp": False})
    index = int(config[RELEASE_INDEX])
    release.charge(index)
    noised = gaussian_release(computed.blocks, release.sigma_at(index), release.rng)
    facts = release.facts(index, release.sigma_at(index) * sensitivity(computed.blocks))
    return Answer(noised, computed.labels, {"dp": True, "sigma": facts.sigma, "noise-sd": facts.noise_sd,
                                           "epsilon-spent": facts.epsilon_spent,
                                           "epsilon-budget": facts.epsilon_budget, "delta": facts.delta,
                                           "epsilon-planned": release.epsilon,
                                           "epsilon-at-start": release.spent_at_start})


# ---------------------------------------------------------------------------------------------------------
# Flower: the handlers


def analytics_release(request: SiteRequest) -> PhaseRelease | None:
    """The site's ``analytics`` release for this run (None without DP), set for the run's planned queries and
    their shares of the run's privacy loss (``server.analytics_plan.BUDGET_RULE``)."""
    if request.dp is None:
        return None
    return PhaseRelease.for_phase(request.context, request.dp, "analytics", releases=int(request.config[RELEASES]),
                                  weights=release_weights(request.config))


def release_weights(config: Mapping[str, Any]) -> list[float] | None:
    """The planned releases' weights the server announced with the query (None: equal)."""
    weights = config.get(RELEASE_WEIGHTS)
    return [float(w) for w in weights] if weights is not None else None


def register_analytics(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add a ``query.analytics_*`` handler for every analytics query to ``client``."""
    for name in REQUESTS:
        client.query(name)(handlers(_answerer(name), ErrorCode.ANALYTICS_REQUEST))


def _answerer(name: str) -> Callable[[Message, SiteRequest], RecordDict]:
    def answer_query(msg: Message, request: SiteRequest) -> RecordDict:
        config, arrays = wire.request_parts(msg.content)
        if bool(config.get(h.SECURE_SUM, False)):
            return secure_reply(name, request, config, arrays)
        result = answer(name, request.site.episodes, config, arrays, analytics_release(request))
        return wire.reply(result.arrays, result.labels, result.meta, request.name)

    return answer_query


SECURE_GROUPS = "groups"
"""Request key of a secure ANOVA: the union of the sites' groups, which every site lays its blocks out by."""
EXACT_EXTRAS = "exact-extras"
"""Request key of a secure query in a run without DP sites: send the exact extras that are sums too."""
NOT_SUMS = frozenset({"min", "max", "raw-sum", "m2"})
"""Exact extras no secure sum carries: min and max are not sums, centred moments are merged by Chan et al."""
LABELS_ONLY = "labels-only"
"""Request key: answer the query's labels only (the first step of a secure query with labels)."""


def secure_arrays(query: str, frame: pd.DataFrame, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                  release: PhaseRelease | None) -> Answer:
    """What a site sends through the secure sum: its blocks (noised under DP), the exact extras that replace a
    block without DP (the suppressed 2-D histogram) and, when the run has no DP site (``exact-extras``: every
    site's answer has them), the exact extras that are sums (log-likelihood, inertia); never :data:`NOT_SUMS`."""
    if release is not None:
        return answer(query, frame, config, arrays, release)
    computed = REQUESTS[query](frame, config, arrays)
    sent = {name: np.asarray(b.values, dtype=np.float64) for name, b in computed.blocks.items()}
    extras = bool(config.get(EXACT_EXTRAS, False))
    sent.update({name: np.asarray(v, dtype=np.float64) for name, v in computed.exact.items()
                 if name in sent or (extras and name not in NOT_SUMS)})
    return Answer(sent, computed.labels, {"dp": False})


def secure_reply(query: str, request: SiteRequest, config: dict[str, Any], arrays: dict[str, np.ndarray]
                 ) -> RecordDict:
    """A query answered for the secure sum (module docstring): labels only when asked, else every array of the
    answer in one masked fixed-point vector (``wire.SECURE_VALUES``), its names and shapes in the clear."""
    if query not in REQUESTS:
        raise ShareableError(f"unknown analytics query {query!r}; known: {', '.join(REQUESTS)}")
    if bool(config.get(LABELS_ONLY, False)):
        return wire.reply({}, REQUESTS[query](request.site.episodes, config, arrays).labels, {"dp": False},
                          request.name)
    result = secure_arrays(query, request.site.episodes, config, arrays, analytics_release(request))
    names = sorted(result.arrays)
    vector = np.concatenate([np.asarray(result.arrays[n], dtype=np.float64).reshape(-1) for n in names] or
                            [np.zeros(0)])
    content = wire.reply({}, result.labels, {**result.meta, wire.SECURE_LAYOUT: wire.layout_text(
        {n: list(np.shape(result.arrays[n])) for n in names})}, request.name)
    content[r.ARRAYS] = ArrayRecord({wire.SECURE_VALUES: masked_floats(vector, ConfigRecord(config), request.context)})
    return content
