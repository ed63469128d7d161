"""Feasible ranges of the federated analytics' summed releases: a poisoned site's influence bounded by what is public.

Every array a site releases for an analytics query (``client.analytics``) is a sum over its complete-case rows of
per-row terms whose range is public: the request's declared or DP-clipped ranges (``bounds``), its
standardisation (``centre``, ``scale``) and centroids. So each released entry lies in ``n · [lo, hi]``, with
``[lo, hi]`` the per-row term's range (interval arithmetic on the clipped values) and ``n`` the rows behind it
(a released count, or the Gram matrix's leading ``Σ 1``), and every count lies in ``[0, N]``, ``N`` the declared
row count of the sites in the sum (site check; none for a DP site). Per query, with ``c`` and ``h`` a column's
range midpoint and half-width and ``[1, z]`` the standardised design:

- describe: ``0 ≤ count ≤ N``; ``|Σ(x − c)| ≤ count · h``; ``0 ≤ Σ(x − c)² ≤ count · h²``; histogram bins ≥ 0
  adding to the count; without DP also ``count · lo ≤ Σx ≤ count · hi``, ``0 ≤ M2 ≤ count · h²`` and
  ``Σ(x − c)² ≥ (Σ(x − c))² / count`` (Cauchy–Schwarz, as for the statistics);
- linear: ``0 ≤ n ≤ N`` (``n = Σ 1``); every Gram, ``Σ z y`` and ``Σ y²`` entry within ``n`` times its term's range;
- logistic: ``0 ≤ count ≤ N``; ``|Σ z_j (y − p)| ≤ count · max|z_j|``; Hessian entries within ``count · [0, 1/4] ·
  range(z_j z_l)`` (``p(1 − p) ≤ 1/4``); without DP the log-likelihood ≤ 0;
- anova: per group as describe (count, sum, sum of squares; raw sum and M2 without DP), the counts adding to ≤ N;
- pca: as linear's Gram matrix;
- lloyd and profiles: cluster counts ≥ 0 adding to ≤ N; each cluster's sums within ``count_c`` times the
  standardised box; profiles also outcome counts in ``[0, count_c]``, outcome sums within ``outcome count · h``,
  inertia in ``count_c · [0, inertia_bound]``, silhouette sums in ``count_c · [−1, 1]``, the projection's cells
  ≥ 0 adding to ≤ the rows.

The check itself, the DP allowance and the refusal (:class:`shared.sum_bounds.InfeasibleSum`, naming the query,
the entry and the bound, never a value) are ``shared.sum_bounds.check_bounds``; ``server.analytics_phase``
applies it to each site's answer with ``secure-sum = off`` (the site is dropped and named) and to the one summed
answer under masks (the analysis is refused). What this cannot bound: a site's answer anywhere inside its box
(e.g. every value at the top of its range), and, under masks, one site spending the others' headroom.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.analytics import inertia_bound
from shared.protocol import messages
from shared.sum_bounds import RELATIVE_TOLERANCE, Bound, Contributors, check_bounds

LOGISTIC_WEIGHT_MAX = 0.25
"""Largest ``p(1 − p)``: the per-row weight of a logistic Hessian entry (``client.analytics.logistic_sums``)."""


def _names(config: Mapping[str, Any], key: str) -> list[str]:
    value = config.get(key, [])
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _finite(values: np.ndarray, fill: float) -> np.ndarray:
    return np.where(np.isfinite(values), values, fill)


def _scale(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A per-row term's largest magnitude: the sd of its DP noise per unit of the site's noise sd."""
    return np.maximum(np.abs(_finite(lo, 0.0)), np.abs(_finite(hi, 0.0)))


def within_rows(entry: str, value: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, text: str,
                rows_noised: bool = True) -> Bound:
    """``rows · lo ≤ value ≤ rows · hi`` (a sum of ``rows`` terms each in ``[lo, hi]``; unbounded where a limit is
    not finite), the noise of the value and of ``rows`` (scale 1 per row, when ``rows`` is released noised)."""
    value = np.asarray(value, dtype=np.float64)
    rows = np.broadcast_to(np.maximum(np.asarray(rows, dtype=np.float64), 0.0), value.shape)
    lo, hi = np.broadcast_to(lo, value.shape), np.broadcast_to(hi, value.shape)
    low = np.where(np.isfinite(lo), rows * _finite(lo, 0.0), -np.inf)
    high = np.where(np.isfinite(hi), rows * _finite(hi, 0.0), np.inf)
    scale = _scale(lo, hi)
    return Bound(entry, value, low, high, scale * (np.sqrt(2.0) if rows_noised else 1.0), text)


def row_cap(entry: str, counts: np.ndarray, who: Contributors) -> list[Bound]:
    """Each count ≥ 0 and their total ≤ the declared row count (when every site declared one)."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    out = [Bound(entry, counts, 0.0, np.inf, 1.0, "every count ≥ 0")]
    if who.declared is not None:
        out.append(Bound(entry, np.array([counts.sum()]), -np.inf, who.declared, np.sqrt(counts.size),
                         "counts adding to ≤ the sum of the sites' declared row counts (site check)"))
    return out


def standardised_box(arrays: Mapping[str, np.ndarray], prefix: str = "") -> np.ndarray:
    """The (p, 2) range of the sites' clipped standardised values (``client.analytics.Standardiser.box``)."""
    centre = np.asarray(arrays[prefix + "centre"], dtype=np.float64).ravel()
    scale = np.asarray(arrays[prefix + "scale"], dtype=np.float64).ravel()
    bounds = np.asarray(arrays[prefix + "bounds"], dtype=np.float64).reshape(-1, 2)
    low = np.where(np.isnan(bounds[:, 0]), -np.inf, (bounds[:, 0] - centre) / scale)
    high = np.where(np.isnan(bounds[:, 1]), np.inf, (bounds[:, 1] - centre) / scale)
    return np.column_stack([low, high])


def _product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Range of ``x · y`` for ``x`` in interval ``a`` and ``y`` in ``b`` (element-wise (…, 2) intervals)."""
    with np.errstate(invalid="ignore"):
        corners = np.stack([a[..., 0] * b[..., 0], a[..., 0] * b[..., 1], a[..., 1] * b[..., 0],
                            a[..., 1] * b[..., 1]])
    corners = np.where(np.isnan(corners), 0.0, corners)  # 0 · ∞: a zero limit times an unbounded one
    return corners.min(axis=0), corners.max(axis=0)


def gram_terms(box: np.ndarray, weight: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Per-row range of each packed upper-triangle entry of ``w [1, z][1, z]ᵀ`` (``client.analytics.gram``)."""
    design = np.vstack([[1.0, 1.0], box])
    i, j = np.triu_indices(design.shape[0])
    lo, hi = _product(design[i], design[j])
    square = i == j  # z_j² ≥ 0 whatever the box
    lo = np.where(square, np.maximum(lo, 0.0), lo)
    wlo, whi = _product(np.column_stack([lo, hi]), np.broadcast_to(np.array(weight, dtype=np.float64), (lo.size, 2)))
    return wlo, whi


def _moments(entry: str, count: np.ndarray, released: Mapping[str, np.ndarray], bounds: np.ndarray,
             who: Contributors, raw: np.ndarray) -> list[Bound]:
    """count, Σ(x − c), Σ(x − c)² (and without DP Σx, M2) of columns or groups with ranges ``bounds`` (the
    request's, which the sites clip to) and ``raw`` (the declared ones, which bound the unclipped Σx and M2:
    after a DP describe the request's ranges are narrower, ``server.analytics_phase.dp_analysis_bounds``);
    without DP noise in the sum also Cauchy–Schwarz, Σ(x − c)² ≥ (Σ(x − c))² / count (Titu's lemma: true of
    each feasible contribution and so of their sum)."""

    def pick(key: str) -> np.ndarray:
        return np.asarray(released[key], dtype=np.float64).ravel()

    lo, hi = bounds[:, 0], bounds[:, 1]
    half = np.where(np.isfinite(lo) & np.isfinite(hi), (hi - lo) / 2, np.inf)
    out = [within_rows(f"{entry} sum", pick("sum"), count, -half, half,
                       "|Σ(x − midpoint)| ≤ count · half the declared range"),
           within_rows(f"{entry} sum of squares", pick("sumsq"), count, np.zeros_like(half), half ** 2,
                       "0 ≤ Σ(x − midpoint)² ≤ count · (half the declared range)²")]
    if not who.noise_sd:
        total, squares = pick("sum"), pick("sumsq")
        pooled = np.divide(total ** 2, count, out=np.zeros_like(total), where=count > 0)
        out.append(Bound(f"{entry} sum of squares", squares - pooled, -RELATIVE_TOLERANCE * (np.abs(squares) + pooled)
                         - who.tolerance(0.0), np.inf, 0.0, "Σ(x − midpoint)² ≥ (Σ(x − midpoint))² / count "
                                                            "(Cauchy–Schwarz)"))
    raw_half = np.where(np.isfinite(raw).all(axis=1), (raw[:, 1] - raw[:, 0]) / 2, np.inf)
    if "raw-sum" in released:  # exact extras: only a site without DP sends them
        out.append(within_rows(f"{entry} raw sum", pick("raw-sum"), count, raw[:, 0], raw[:, 1],
                               "count · low ≤ Σx ≤ count · high (declared range)", rows_noised=False))
    if "m2" in released:
        out.append(within_rows(f"{entry} centred sum of squares", pick("m2"), count, np.zeros_like(raw_half),
                               raw_half ** 2, "0 ≤ Σ(x − mean)² ≤ count · (half the declared range)²",
                               rows_noised=False))
    return out


def declared_bounds(columns: list[str], bounds: np.ndarray, ranges: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """The (p, 2) declared ranges of ``columns`` from ``ranges`` (the request's ``bounds`` for a column not in it)."""
    return np.array([ranges.get(c, tuple(b)) for c, b in zip(columns, bounds, strict=True)],
                    dtype=np.float64).reshape(-1, 2)


def describe_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    columns, bins = _names(config, "columns"), int(config["bins"])
    bounds = np.asarray(arrays["bounds"], dtype=np.float64).reshape(-1, 2)
    count = np.asarray(released["count"], dtype=np.float64).ravel()
    out = [Bound("count", count, 0.0, np.inf, 1.0, "count ≥ 0")]
    if who.declared is not None:
        out.append(Bound("count", count, -np.inf, who.declared, 1.0,
                         "count ≤ the sum of the sites' declared row counts (site check)"))
    out += _moments("column", count, released, bounds, who, declared_bounds(columns, bounds, ranges))
    histogram = np.asarray(released["histogram"], dtype=np.float64).reshape(len(columns), bins)
    out.append(Bound("histogram", histogram, 0.0, np.inf, 1.0, "every bin ≥ 0"))
    gridded = np.isfinite(bounds).all(axis=1) & (bounds[:, 1] > bounds[:, 0])
    if gridded.any():
        out.append(Bound("histogram", histogram[gridded].sum(axis=1) - count[gridded], 0.0, 0.0,
                         np.sqrt(bins + 1.0), "a column's bins adding to its count"))
    return out


def linear_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    covariates, outcomes = _names(config, "covariates"), _names(config, "outcomes")
    box = standardised_box(arrays)
    x, y = box[:len(covariates)], box[len(covariates):]
    glo, ghi = gram_terms(x)
    design = np.vstack([[1.0, 1.0], x])
    out = []
    for j, outcome in enumerate(outcomes):
        gram = np.asarray(released[f"{outcome}/gram"], dtype=np.float64).ravel()
        n = gram[0]
        out += row_cap(f"{outcome} rows (Gram entry 0)", gram[:1], who)
        out.append(within_rows(f"{outcome} Gram matrix", gram[1:], n, glo[1:], ghi[1:],
                               "each entry within the rows times its term's range (declared ranges)"))
        xlo, xhi = _product(design, np.broadcast_to(y[j], design.shape))
        out.append(within_rows(f"{outcome} Σ z y", released[f"{outcome}/xty"], n, xlo, xhi,
                               "each entry within the rows times its term's range (declared ranges)"))
        ylo, yhi = _product(y[j:j + 1], y[j:j + 1])
        out.append(within_rows(f"{outcome} Σ y²", released[f"{outcome}/yty"], n, np.maximum(ylo, 0.0), yhi,
                               "0 ≤ Σ y² ≤ rows · max y² (declared range)"))
    return out


def logistic_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    outcomes = _names(config, "outcomes")
    box = standardised_box(arrays)
    design = np.vstack([[1.0, 1.0], box])
    glo, ghi = gram_terms(box, (0.0, LOGISTIC_WEIGHT_MAX))
    residual = np.broadcast_to(np.array([-1.0, 1.0]), design.shape)
    rlo, rhi = _product(design, residual)
    out = []
    for outcome in outcomes:
        count = np.asarray(released[f"{outcome}/count"], dtype=np.float64).ravel()
        out += row_cap(f"{outcome} rows", count, who)
        out.append(within_rows(f"{outcome} gradient", released[f"{outcome}/gradient"], count[0], rlo, rhi,
                               "|Σ z_j (y − p)| ≤ rows · max|z_j| (declared ranges)"))
        out.append(within_rows(f"{outcome} Hessian", released[f"{outcome}/hessian"], count[0], glo, ghi,
                               "each entry within rows · [0, 1/4] · the range of z_j z_l (declared ranges)"))
        if f"{outcome}/loglik" in released:
            out.append(Bound(f"{outcome} log-likelihood", np.asarray(released[f"{outcome}/loglik"]), -np.inf, 0.0,
                             0.0, "log-likelihood ≤ 0"))
    return out


def anova_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    bounds = np.asarray(arrays["bounds"], dtype=np.float64).reshape(1, 2)
    count = np.asarray(released["count"], dtype=np.float64).ravel()
    raw = declared_bounds([str(config["response"])], bounds, ranges)
    return row_cap("group counts", count, who) + _moments(
        "group", count, released, np.broadcast_to(bounds, (count.size, 2)), who, np.broadcast_to(raw, (count.size, 2)))


def pca_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    gram = np.asarray(released["gram"], dtype=np.float64).ravel()
    glo, ghi = gram_terms(standardised_box(arrays))
    return row_cap("rows (Gram entry 0)", gram[:1], who) + [
        within_rows("Gram matrix", gram[1:], gram[0], glo[1:], ghi[1:],
                    "each entry within the rows times its term's range (declared ranges)")]


def _clusters(arrays, released, who) -> tuple[list[Bound], np.ndarray, np.ndarray]:
    box = standardised_box(arrays)
    centroids = np.asarray(arrays["centroids"], dtype=np.float64)
    k, p = centroids.shape
    count = np.asarray(released["count"], dtype=np.float64).ravel()
    sums = np.asarray(released["sum"], dtype=np.float64).reshape(k, p)
    out = row_cap("cluster counts", count, who) + [
        within_rows("cluster sums", sums, count[:, None], box[None, :, 0], box[None, :, 1],
                    "each cluster's sums within its count times the standardised box (declared ranges)")]
    return out, count, box


def lloyd_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    out, count, box = _clusters(arrays, released, who)
    if "inertia" in released:
        ib = inertia_bound(box, np.asarray(arrays["centroids"], dtype=np.float64))
        out.append(within_rows("inertia", np.asarray(released["inertia"]).ravel(), np.sum(count), 0.0, ib,
                               "0 ≤ inertia ≤ rows · the box's farthest squared distance", rows_noised=False))
    return out


def profiles_bounds(config, arrays, released, who, ranges) -> list[Bound]:
    out, count, box = _clusters(arrays, released, who)
    k = count.size
    m = len(_names(config, "outcomes"))
    ob = np.asarray(arrays["outcome-bounds"], dtype=np.float64).reshape(-1, 2)
    half = np.where(np.isfinite(ob).all(axis=1), (ob[:, 1] - ob[:, 0]) / 2, np.inf)
    outcome_count = np.asarray(released["outcome-count"], dtype=np.float64).reshape(k, m)
    ib = inertia_bound(box, np.asarray(arrays["centroids"], dtype=np.float64))
    out += [
        within_rows("outcome counts", outcome_count, count[:, None], 0.0, 1.0, "0 ≤ outcome count ≤ cluster count"),
        within_rows("outcome sums", np.asarray(released["outcome-sum"], dtype=np.float64).reshape(k, m),
                    outcome_count, -half[None, :], half[None, :],
                    "|Σ(outcome − midpoint)| ≤ outcome count · half the declared range"),
        within_rows("inertia", np.asarray(released["inertia"], dtype=np.float64).ravel(), count, 0.0, ib,
                    "0 ≤ a cluster's inertia ≤ its count · the box's farthest squared distance"),
        within_rows("silhouette sums", np.asarray(released["silhouette"], dtype=np.float64).ravel(), count, -1.0,
                    1.0, "|a cluster's silhouette sum| ≤ its count"),
    ]
    projection = np.asarray(released["projection"], dtype=np.float64).ravel()
    out += [Bound("projection", projection, 0.0, np.inf, 1.0, "every cell ≥ 0"),
            Bound("projection", np.array([projection.sum() - count.sum()]), -np.inf, 0.0,
                  np.sqrt(projection.size + k), "cells adding to ≤ the rows")]
    return out


QUERY_BOUNDS = {messages.ANALYTICS_DESCRIBE.action: describe_bounds, messages.ANALYTICS_LINEAR.action: linear_bounds,
                messages.ANALYTICS_LOGISTIC.action: logistic_bounds, messages.ANALYTICS_ANOVA.action: anova_bounds,
                messages.ANALYTICS_PCA.action: pca_bounds, messages.ANALYTICS_LLOYD.action: lloyd_bounds,
                messages.ANALYTICS_PROFILES.action: profiles_bounds}
"""Query (``shared.protocol.messages`` action) → the constraints of its released arrays (module docstring)."""


def check_analytics(query: str, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                    released: Mapping[str, np.ndarray], who: Contributors,
                    ranges: Mapping[str, tuple[float, float]] | None = None) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if ``released`` (one site's answer, or the sum of ``who``'s)
    to the analytics ``query`` asked with ``config`` and ``arrays`` breaks a constraint of the module docstring.
    ``ranges``: the columns' declared ranges (column → (low, high)), which bound the unclipped exact sums where the
    request's ranges are narrower; without it, the request's."""
    check_bounds(query, QUERY_BOUNDS[query](config, arrays, released, who, dict(ranges or {})), who)
