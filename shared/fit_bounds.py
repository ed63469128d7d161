"""Feasible ranges of the model fits' summed releases: a poisoned site's influence on the dosing models bounded.

The structured dose–response Newton steps (``server.dose_response_phase``) and the dose adjuster's fitted-Q
iteration (``server.adjustment_phase``) add the sites' sums and solve on them, so one site that sends sums no rows
could give moves the dosing policy where it likes. Every released entry is a sum over the site's rows of a per-row
term whose range is public (the coefficients or the feature scaling the server sent, the site-data contract's
ranges), and every count is capped by the site check's declared row count N (``shared.sum_bounds.declared_rows``:
a site's first cycles and its transitions of cycle ≥ 2 are rows of its episode table, so both counts are ≤ N; a
DP site declares none). Derivations, with n the release's row count:

Dose–response (one evaluation at the coefficients θ the server sent; no site is under DP here,
``client.dose_response_handlers`` refuses): the model states the most one row adds to each entry,
:meth:`shared.dose_response.DoseResponseModel.sum_bounds` at θ (score ``|(y − p) x_j| ≤ B_j``; information
``p(1 − p) x_j x_k ≤ B_j B_k / 4`` for the logistic toxicity models, the ordinal model's bounds in
``shared.tumour_response``; log-likelihood ``|max(ℓ, LOGLIK_FLOOR)| ≤ |LOGLIK_FLOOR|``), so

- ``0 ≤ n ≤ N``;  ``n · LOGLIK_FLOOR ≤ loglik ≤ 0`` (each row's ℓ ≤ 0: a log-probability);
- ``|gradient_j| ≤ n · B_j``;  ``0 ≤ H_jj ≤ n · S_jj`` and ``|H_jk| ≤ n · S_jk`` (S the information's per-row
  bound); ``|H_jk| ≤ √(H_jj H_kk)``: each row's information is positive semi-definite (``x xᵀ`` times
  ``p(1 − p) ≥ 0``, or the ordinal model's Gauss–Newton ``Jᵀ W J`` with ``W`` the cumulative logit's information
  in its two arguments, PSD by log-concavity: Pratt, JASA 1981;76:103), so their sum is.

Why a ×1.02 inflation is caught: the toxicity models start at θ = 0, where every row's p(1 − p) is exactly
1/4, so the intercept's ``H_00`` is exactly ``n / 4 = n · S_00`` at the first evaluation, and any scaling of the
information breaks it.

Dose–response support (``shared.structured_policy.site_support_counts``: training first cycles by formulation ×
tumour type × dose bin, one cell each): every count ≥ 0, and they add to at most N. This caps, it does not detect:
a site may still put its declared rows in any cell it likes (support only gates which doses the policy offers).

Fitted-Q scaling (per state column and the dose, count ``C``, ``Σ(x − c)`` and ``Σ(x − c)²`` about the public
midpoint c of the range ``[c − h, c + h]`` of ``shared.dose_adjustment.PUBLIC_RANGES``; a DP site clips to the
range, rounds its noised count and clips its mean into the range, ``scaling_from_bounded``):
``0 ≤ C ≤ N``; ``|Σ(x − c)| ≤ C · h`` (exact for DP sites too: their mean is clipped);
``Σ(x − c)² ≥ (Σ(x − c))² / C`` (Cauchy–Schwarz; a DP site's M2 ≥ 0 keeps it); ``Σ(x − c)² ≤ C · h²``.

Fitted-Q ridge (``A = Σ φφᵀ``, ``b = Σ φ y``, n; ``φ = [1, z, missing indicators, d, d², d·z]`` with
z = (x − mean) / scale and d the same for the dose, the scaling the server sent): with ``Φ_j`` the largest
``|φ_j|`` over the public ranges (interval arithmetic; a missing value's z is 0) and ``Y`` the largest target
``|y| ≤ max|r| + γ · Σ_j |w_j| Φ_j`` (``max|r| = REWARD_BOUND``; ``y = r`` before any coefficients; a DP site
clips to ``target_bound(γ)``, so Y is at least that when one is in the sum):

- ``0 ≤ n ≤ N``;  ``A_00 = n`` (the intercept feature is 1 in every row) when no site is under DP, ``0 ≤ A_00 ≤
  n`` otherwise (a DP site scales φ down to norm ``FEATURE_NORM_CLIP``);
- ``0 ≤ A_jj ≤ n · Φ_j²``;  ``|A_jk| ≤ √(A_jj A_kk)`` (``A`` a sum of PSD matrices: ``φφᵀ``, a DP site's
  noised ``A`` projected onto the PSD cone);  ``|b_j| ≤ n · Φ_j · Y``, and ``|b_j| ≤ √(A_jj · n) · Y``
  (Cauchy–Schwarz, ``Σ y² ≤ n Y²``) when no site is under DP.

Why a ×1.02 inflation is caught: ``A_00 = n`` is an equality; a site scaling its sums but its count breaks it. In
the benchmark (``benchmarks/sum_bounds.py --sections fits``) the scaling release catches it first, where a column's
values sit near one end of a wide range (Σ(x − c) beyond count · h, or Σ(x − c)² below its Cauchy–Schwarz floor).

DP allowance: ``shared.sum_bounds.check_bounds`` widens each bound by k stated noise sds times the per-row
scale of the noised entries in it (``client.adjustment_handlers``: the scaling blocks' ``h^i · √w``, ``A``'s
``C_φ²``, ``b``'s ``C_φ · C_y``, n's 1). A DP site's noised ``A`` is projected onto the PSD cone, which moves
an entry by at most the spectral norm of its noise; that is allowed for as ``C_φ² σ_i (2√p + √(2 ln(1/q)) +
1) · √2`` per DP site (a Wigner matrix's norm: ``2√p σ`` plus a Gaussian tail at the check's refusal
probability q; √2 for the diagonal's own noise). A DP site's rounded count moves ``Σ(x − c)²`` by up to half a
row's ``h²``.

What this cannot bound: sums anywhere inside these limits (a site may report any rows it could have, or fewer);
a count up to the site's whole declared table; under masks a site spends the other sites' headroom; under DP
(no declared count, wide allowances) an inflation smaller than the noise.
"""

from __future__ import annotations

import math

import numpy as np

from shared.dose_adjustment import (
    FEATURE_NORM_CLIP,
    MISSABLE,
    PUBLIC_RANGES,
    REWARD_BOUND,
    STATE_COLUMNS,
    DoseAdjuster,
    target_bound,
)
from shared.dose_response import LOGLIK_FLOOR, DoseResponseModel
from shared.sum_bounds import REFUSAL_PROBABILITY, RELATIVE_TOLERANCE, Bound, Contributors, check_bounds

PSD_RATIO = 1e-9
"""Relative slack of ``|M_jk| ≤ √(M_jj M_kk)``: float rounding of a sum of PSD matrices (and of ``eigh``)."""


def _count_bounds(n: float, who: Contributors, noise: float, what: str) -> list[Bound]:
    return [Bound(what, np.array([n]), 0.0, who.row_cap, noise,
                  f"0 ≤ {what} ≤ the sum of the sites' declared row counts (site check)")]


def _psd_bounds(matrix: np.ndarray, entry: str) -> list[Bound]:
    """|M_jk| ≤ √(M_jj M_kk) for every pair, and M_jj ≥ 0: true of every PSD contribution (a DP site's projected
    noised matrix included) and so of their sum, with no DP allowance."""
    diag = np.diag(matrix)
    root = np.sqrt(np.outer(np.maximum(diag, 0.0), np.maximum(diag, 0.0)))
    upper = np.triu_indices(len(diag), 1)
    return [Bound(entry, diag, 0.0, np.inf, 0.0, f"every diagonal entry of {entry} ≥ 0 (a sum of PSD matrices)"),
            Bound(entry, (np.abs(matrix) - root)[upper], -np.inf, PSD_RATIO * root[upper], 0.0,
                  f"|{entry}_jk| ≤ √({entry}_jj · {entry}_kk) (a sum of PSD matrices)")]


# -- the structured dose–response models -------------------------------------------------------------------------


def dose_response_bounds(model: DoseResponseModel, coef: np.ndarray, sums: dict, who: Contributors) -> list[Bound]:
    """The constraints of one Newton evaluation's release ``sums`` (gradient, hessian, loglik, n) at ``coef``
    (module docstring). No DP form exists for these sums, so no allowance."""
    per_row = model.sum_bounds(np.asarray(coef, dtype=float))
    gradient = np.asarray(sums["gradient"], dtype=np.float64).ravel()
    hessian = np.asarray(sums["hessian"], dtype=np.float64)
    n = float(np.asarray(sums["n"]).ravel()[0])
    loglik = float(np.asarray(sums["loglik"]).ravel()[0])
    g_row = np.broadcast_to(np.asarray(per_row["gradient"].scale, dtype=np.float64), gradient.shape)
    h_row = np.broadcast_to(np.asarray(per_row["hessian"].scale, dtype=np.float64), hessian.shape)
    upper = np.triu_indices(len(gradient))
    out = _count_bounds(n, who, 0.0, "row count n")
    out += [Bound("log-likelihood", np.array([loglik]), n * LOGLIK_FLOOR, 0.0, 0.0,
                  f"n · {LOGLIK_FLOOR:g} ≤ log-likelihood ≤ 0 (each row's floored log-probability)"),
            Bound("gradient", np.abs(gradient), 0.0, n * g_row, 0.0,
                  "|gradient_j| ≤ n · B_j (the model's per-row score bound at the sent coefficients)"),
            Bound("information", np.abs(hessian[upper]), 0.0, n * h_row[upper], 0.0,
                  "|information_jk| ≤ n · S_jk (the model's per-row information bound at the sent coefficients)")]
    return out + _psd_bounds(hessian, "information")


def check_dose_response(phase: str, model: DoseResponseModel, coef: np.ndarray, sums: dict,
                        who: Contributors) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if ``sums`` breaks :func:`dose_response_bounds`."""
    check_bounds(phase, dose_response_bounds(model, coef, sums, who), who)


def support_bounds(counts: np.ndarray, who: Contributors) -> list[Bound]:
    """The constraints of the summed (or one site's) support counts (module docstring)."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    return [Bound("support counts", counts, 0.0, np.inf, 0.0, "every support count ≥ 0"),
            Bound("support counts", np.array([counts.sum()]), 0.0, who.row_cap, 0.0,
                  "the support counts adding to ≤ the sum of the sites' declared row counts (site check)")]


def check_support(phase: str, counts: np.ndarray, who: Contributors) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if ``counts`` breaks :func:`support_bounds`."""
    check_bounds(phase, support_bounds(counts, who), who)


# -- fitted-Q iteration ---------------------------------------------------------------------------------------


def _product(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return min(corners), max(corners)


def feature_bounds(adjuster: DoseAdjuster) -> np.ndarray:
    """``Φ_j``: the largest ``|φ_j|`` of any row the public ranges allow, at the adjuster's scaling (interval
    arithmetic over ``φ = [1, z, indicators, d, d², d·z]``; a missing value's z is 0)."""
    low = (PUBLIC_RANGES[:, 0] - adjuster.mean_) / adjuster.scale_
    high = (PUBLIC_RANGES[:, 1] - adjuster.mean_) / adjuster.scale_
    z = [(min(lo, 0.0), max(hi, 0.0)) for lo, hi in zip(low[:-1], high[:-1], strict=True)]
    d = (float(low[-1]), float(high[-1]))
    d2 = (0.0 if d[0] <= 0 <= d[1] else min(d[0] ** 2, d[1] ** 2), max(d[0] ** 2, d[1] ** 2))
    intervals = [(1.0, 1.0), *z, *[(0.0, 1.0)] * len(MISSABLE), d, d2, *(_product(d, zi) for zi in z)]
    bound = np.array([max(abs(lo), abs(hi)) for lo, hi in intervals])
    assert len(bound) == 1 + len(STATE_COLUMNS) + len(MISSABLE) + 2 + len(STATE_COLUMNS)
    return bound


def target_limit(adjuster: DoseAdjuster, dp: bool, phi: np.ndarray) -> float:
    """``Y``: the largest ``|y|`` of a target at the adjuster's coefficients (``r`` alone before any), at least
    the DP clip ``target_bound(γ)`` when a DP site is in the sum; ``phi``: :func:`feature_bounds` of the adjuster."""
    coef = getattr(adjuster, "coef_", None)
    y = REWARD_BOUND
    if coef is not None and adjuster.gamma > 0:
        y += adjuster.gamma * float(np.abs(coef) @ phi)
    if dp:
        y = max(y, target_bound(adjuster.gamma)) if adjuster.gamma < 1 else math.inf
    return y


def scaling_bounds(sums: dict, who: Contributors) -> list[Bound]:
    """The constraints of the fitted-Q scaling release (count, ``shifted_sum``, ``shifted_square`` per column,
    ``shared.dose_adjustment.centred_scaling_sums`` form; module docstring)."""
    count = np.asarray(sums["count"], dtype=np.float64)
    first = np.asarray(sums["shifted_sum"], dtype=np.float64)
    square = np.asarray(sums["shifted_square"], dtype=np.float64)
    half = (PUBLIC_RANGES[:, 1] - PUBLIC_RANGES[:, 0]) / 2
    width = math.sqrt(len(half))
    rounding = 0.5 * len(who.noise_sd) * half ** 2
    seen = count > 0
    out = [Bound("column counts", count, 0.0, who.row_cap, width,
                 "0 ≤ every column's count ≤ the sum of the sites' declared row counts (site check)"),
           Bound("column sums", np.abs(first) - count * half, -np.inf, 0.0, 0.0,
                 "|Σ(x − c)| ≤ count · h (the column's public range [c − h, c + h])"),
           Bound("column sums of squares", square, -rounding, count * half ** 2 + rounding,
                 np.hypot(half ** 2 * width, half ** 2 * width),
                 "0 ≤ Σ(x − c)² ≤ count · h² (the column's public range [c − h, c + h])"),
           Bound("column sums of squares", (square - np.divide(first ** 2, count, out=np.zeros_like(count),
                                                                where=seen))[seen],
                 -RELATIVE_TOLERANCE * square[seen] - rounding[seen], np.inf, 0.0,
                 "Σ(x − c)² ≥ (Σ(x − c))² / count (Cauchy–Schwarz)")]
    return out


def check_scaling(phase: str, sums: dict, who: Contributors) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if the scaling release breaks :func:`scaling_bounds`."""
    check_bounds(phase, scaling_bounds(sums, who), who)


def projection_slack(who: Contributors, features: int) -> float:
    """Most the PSD projection of the DP sites' noised ``A`` moves an entry (module docstring), summed over them."""
    entries = features * (features + 1) // 2
    tail = math.sqrt(2.0 * math.log(entries / REFUSAL_PROBABILITY))
    per_sd = FEATURE_NORM_CLIP ** 2 * (2.0 * math.sqrt(features) + tail + 1.0) * math.sqrt(2.0)
    return float(sum(per_sd * s for s in who.noise_sd))


def ridge_bounds(adjuster: DoseAdjuster, sums: dict, who: Contributors) -> list[Bound]:
    """The constraints of one fitted-Q ridge release (gram, moment, n) at the adjuster the server sent (its
    scaling and coefficients; module docstring)."""
    gram = np.asarray(sums["gram"], dtype=np.float64)
    moment = np.asarray(sums["moment"], dtype=np.float64).ravel()
    n = float(np.asarray(sums["n"]).ravel()[0])
    dp = bool(who.noise_sd)
    phi = feature_bounds(adjuster)
    y = target_limit(adjuster, dp, phi)
    c2, cy = FEATURE_NORM_CLIP ** 2, FEATURE_NORM_CLIP * (target_bound(adjuster.gamma) if adjuster.gamma < 1 else 0)
    slack = projection_slack(who, len(moment)) if dp else 0.0
    diag = np.diag(gram)
    out = _count_bounds(n, who, 1.0, "transition count n")
    if dp:
        out.append(Bound("intercept entry A_00", np.array([diag[0] - n]), -np.inf, slack, math.hypot(c2, 1.0),
                         "A_00 ≤ n (the intercept feature is 1, scaled down at a DP site)"))
    else:
        out.append(Bound("intercept entry A_00", np.array([diag[0] - n]), 0.0, 0.0, 0.0,
                         "A_00 = n (the intercept feature is 1 in every row)"))
    out.append(Bound("Gram diagonal", diag - n * phi ** 2, -np.inf, slack, np.hypot(c2, phi ** 2),
                     "A_jj ≤ n · Φ_j² (Φ_j the largest |φ_j| the public ranges allow at the sent scaling)"))
    out.append(Bound("moment", np.abs(moment) - n * phi * y, -np.inf, 0.0, np.hypot(cy, phi * y),
                     "|b_j| ≤ n · Φ_j · Y (Y the largest target at the sent coefficients)"))
    if not dp:
        cauchy_schwarz = np.sqrt(np.maximum(diag, 0.0) * max(n, 0.0)) * y
        out.append(Bound("moment", np.abs(moment) - cauchy_schwarz, -np.inf, RELATIVE_TOLERANCE * cauchy_schwarz,
                         0.0, "|b_j| ≤ √(A_jj · n) · Y (Cauchy–Schwarz)"))
    return out + _psd_bounds(gram, "Gram matrix A")


def check_ridge(phase: str, adjuster: DoseAdjuster, sums: dict, who: Contributors) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if the ridge release breaks :func:`ridge_bounds`."""
    check_bounds(phase, ridge_bounds(adjuster, sums, who), who)
