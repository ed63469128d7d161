"""Probes behind issue 19's third to fifth passes: DP PCA eigenvalue, logistic, median, linear and ANOVA intervals.

    python benchmarks/analytics_interval_probes.py pca --sites 3 --rows 1300 --epsilons 0.5,1,3 --draws 10
    python benchmarks/analytics_interval_probes.py logistic --sites 3 --rows 1300 --epsilons 1 --draws 12
                                                   --variant current|no-carry|no-hessian-noise|psd|psd-resampled
    python benchmarks/analytics_interval_probes.py logistic-steps --sites 3 --rows 1300 --epsilons 0.5,1,3 --draws 12
                                                   --variant current|moment-psd|... [--out J]
    python benchmarks/analytics_interval_probes.py median --sites 10 --rows 10000 --epsilons 0.5,1,3 --draws 10
                                                   --variant current|sheppard|no-shift|no-resolution [--out J]
    python benchmarks/analytics_interval_probes.py linear-terms --sites 10 --rows 10000 --epsilons 1 --draws 150
        --noise both|gram|xty --variant current|bootstrap-both [--out J]
    python benchmarks/analytics_interval_probes.py anova-terms --sites 3 --rows 1300 --epsilons 0.5,1,3 --draws 300
        [--out J]
    python benchmarks/analytics_interval_probes.py linear-anova --sites 3 --rows 1300 --epsilons 0.5,1,3 --draws 50
        [--analyses A] --variant current|all-sites-noise|bootstrap-both|main [--out J]

Both hold the simulated clinics fixed (``benchmarks.analytics.make_sites``), run the site + server code in process
once with the sites' noise set to zero (the target) and then ``--draws`` times with fresh noise, as
``benchmarks/analytics_noise_only.py`` does, and print coverage of the 95 % noise intervals and the median ratio of
the reported sd to the draws' root-mean-square error.

- ``pca``: for each draw, Weyl's bound (``shared.analytics.eigenvalue_noise_bound``) and each eigenvalue's own
  bootstrap root-mean-square distance, whichever ``shared.analytics.eigenvalue_sd`` then picks; prints both
  intervals' coverage and the bound over the released spectrum's spread (what the rule reads).
- ``logistic``: the carried-noise bootstrap of the Newton steps (``shared.analytics.logistic_step_noise``) as it is
  (``current``) or changed: without the carried term, without re-noising the Hessian, or moving each draw's
  gradient with the released Hessian projected to positive semi-definite (once, or re-noised per draw), or
  with its whitened eigenvalues soft-thresholded by the noise's spectral reach ``2 √d`` noise sds (``soft``: weak
  directions, where the Hessian is indistinguishable from its noise, keep the carried error as the real steps do;
  ``soft-floor``: by the step's own floor, ``LOGISTIC_FLOOR_NOISE_SDS`` noise sds, instead; ``regime``: ``soft``,
  and no carried term at a step whose whitened Hessian has every eigenvalue beyond that reach).
  Variants after issue 19's fourth pass, all from the first-order error of one floored step ``e_k = (I − H̃_f⁻¹H)
  e_{k−1} + H̃_f⁻¹ n + (H̃_f⁻¹ − H_f⁻¹) g*`` (``H̃`` the released Hessian, whose floored inverse the step used and
  the server knows; ``H`` the noise-free one, drawn per bootstrap draw as ``H̃ − N'``; ``n`` the gradient's noise;
  ``g*`` the noise-free gradient): ``conditional`` (``g*`` drawn as ``g̃ − n' + H'e``, which makes the draw
  self-consistent and the contraction exact outside the floor), ``conditional-g`` (``g*`` held at the released
  ``g̃``), ``moment`` (``g*`` drawn with second moment ``g̃g̃ᵀ − H̃CH̃ − Cov(n)``, made PSD: ``g̃g̃ᵀ``'s bias
  removed), and each with ``-psd`` (``H̃ − N'`` projected to PSD in the whitened coordinates: the noise-free
  Hessian is PSD); ``moment-psd-once``: ``psd(H̃) − N'``, not projected after the draw; ``plugin``: the
  bootstrap's world with ``Ĥ = psd(H̃)`` as the noise-free Hessian (``Ĥ + N'`` inverted, the gradient moved with
  ``Ĥ``), ``plugin-bc``: ``Ĥ``'s whitened eigenvalues bias-corrected first (``2λ̃ − mean λ̃*`` over re-noised
  releases; Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 10).
- ``logistic-steps``: per Newton step, the coefficients' real noise error (each draw's β after the step against the
  zero-noise run's, original scale) against the sd the carried bootstrap reports after that step (``--variant`` as
  for ``logistic``) and against the step's own noise alone (the same bootstrap with nothing carried);
  ``--hold-describe``: every draw standardises and clips as the zero-noise run did.
- ``median``: coverage of the describe medians' ``ci95`` against the pooled rows' median (what a reader wants; the
  noise-only benchmark's target, the noise-free estimator, shares the histogram's resolution) and against the
  zero-noise run, with the terms as they are (``current``: the bootstrap's spread, ``shared.analytics.threshold_shift``
  as the bias, ``bin_resolution_sd``), as before the fourth pass (``sheppard``: the bootstrap's root-mean-square
  distance and a fixed ``width / √12``), without the threshold shift (``no-shift``: the bootstrap's own shift as
  the bias), or without a resolution term as well (``no-resolution``).
- ``linear-anova``: one run of ``--analyses`` (default all: the ε shares of the DP accuracy benchmark) gives the
  linear coefficients and ANOVA; coverage of the coefficients against the zero-noise fit (± 1.96 ``se_dp_noise``),
  the non-DP federated fit and least squares on the pooled unclipped rows (their ``ci95``); of F (± 1.96
  ``f_noise_sd``) against the zero-noise and non-DP F; of the group means' ``ci95`` against the non-DP group means;
  and the median reported noise sd over the draws' root-mean-square error. ``all-sites-noise``: every ANOVA group
  given the summed noise of every site, as before issue 19's fifth pass (``server.analytics_phase.group_noise_sds``);
  ``bootstrap-both``: the coefficients' noise sd from one bootstrap re-noising the Gram and ``Xᵀy`` together, as
  before that pass (``shared.analytics.linear_noise_rmse``); ``main``: both, the code before that pass.
- ``linear-terms``: the linear phase alone on the zero-noise run's fixed sums, re-noised on the Gram, on ``Xᵀy``
  or both (``--noise``): which released sum makes how much of the coefficients' error, against the reported sd.
- ``anova-terms``: F alone on the zero-noise run's fixed group sums: ± 1.96 ``f_noise_sd`` against the bootstrap's
  percentile and basic intervals, and the shape of F's noise error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from analytics import dp_run, make_sites  # noqa: E402
from analytics_noise_only import zero_noise  # noqa: E402

import server.analytics_phase as phase  # noqa: E402
import shared.analytics as sa  # noqa: E402
from shared import dp_error  # noqa: E402

VARIANTS = ("current", "no-carry", "no-hessian-noise", "psd", "psd-resampled", "soft", "soft-floor", "regime",
            "conditional", "conditional-psd", "conditional-g", "conditional-psd-g", "moment", "moment-psd",
            "moment-psd-once", "plugin", "plugin-bc")
MEDIAN_VARIANTS = ("current", "sheppard", "no-shift", "no-resolution")
LINEAR_ANOVA_VARIANTS = ("current", "all-sites-noise", "bootstrap-both", "main")


def bootstrap_both(gram, xty, x, y_scale, noise, y_bound):
    """``shared.analytics.linear_noise_rmse`` before issue 19's fifth pass: one parametric bootstrap re-noising the
    released Gram and ``Xᵀy`` together, its root-mean-square distance from the release."""
    d = gram.shape[0]
    upper = np.triu_indices(d)
    b = np.concatenate([[1.0], sa.row_bound(x)])
    size = len(upper[0])

    def coefficients(values):
        return sa.dp_linear_coefficients(sa.unpack_triu(values[:size], d), values[size:], x, y_scale, noise)

    return dp_error.bootstrap_rmse(np.concatenate([gram[upper], xty]),
                                   noise * np.concatenate([np.outer(b, b)[upper], b * y_bound]), coefficients)


def pca(frames, epsilon: float, draws: int) -> None:
    """Coverage of Weyl's bound and of the per-eigenvalue bootstrap distance, over ``draws`` noise draws."""
    seen: dict = {}
    rmse, bound = dp_error.bootstrap_rmse, phase.eigenvalue_noise_bound

    def keep_rmse(*args, **kwargs):
        seen["rmse"] = rmse(*args, **kwargs)
        return seen["rmse"].copy()

    def keep_bound(*args):
        seen["bound"] = bound(*args)
        return seen["bound"]

    phase.dp_error.bootstrap_rmse, phase.eigenvalue_noise_bound = keep_rmse, keep_bound
    try:
        with zero_noise():
            truth = np.array(dp_run(frames, epsilon, "describe,pca", 0)["pca"]["eigenvalues"])
        estimates, distances, bounds = [], [], []
        for seed in range(1, draws + 1):
            seen.clear()
            values = dp_run(frames, epsilon, "describe,pca", seed)["pca"]["eigenvalues"]
            estimates.append(values)
            distances.append(seen["rmse"][:len(values)])
            bounds.append(seen["bound"])
    finally:
        phase.dp_error.bootstrap_rmse, phase.eigenvalue_noise_bound = rmse, bound
    est, dist, reach = np.array(estimates), np.array(distances), np.array(bounds)
    error = np.abs(est - truth)
    print(f"eps {epsilon}: Weyl coverage {np.mean(error <= reach[:, None]):.3f} (bound {reach.mean():.3f}), "
          f"per-eigenvalue coverage {np.mean(error <= dp_error.Z95 * dist):.3f}, "
          f"bound / spread {np.median(reach / (est.max(1) - est.min(1))):.3f}, "
          f"real rmse {np.sqrt((error ** 2).mean(0)).round(4).tolist()}")


def step_noise(variant: str):
    """``logistic_step_noise`` with the probe's ``variant`` (same arguments, same bootstrap otherwise)."""

    def noise(hessian, gradient, beta_before, beta_after, carried, bound, noise_sd,
              draws=dp_error.BOOTSTRAP_DRAWS, seed=dp_error.BOOTSTRAP_SEED):
        d = hessian.shape[0]
        upper = np.triu_indices(d)
        b = np.concatenate([[1.0], np.asarray(bound, dtype=np.float64)])
        packed, h_scale = hessian[upper], noise_sd * 0.25 * np.outer(b, b)[upper]
        whiten = np.outer(np.maximum(0.5 * b, 1e-12), np.maximum(0.5 * b, 1e-12))
        rng = np.random.default_rng(seed)
        if variant == "no-carry":
            carried = np.zeros_like(carried)
        if variant == "regime" and np.linalg.eigvalsh(hessian / whiten).min() > 2.0 * np.sqrt(d) * noise_sd:
            carried = np.zeros_like(carried)
        values, vectors = np.linalg.eigh((carried + carried.T) / 2)
        root = vectors * np.sqrt(np.maximum(values, 0.0))

        def psd(matrix):
            vals, vecs = np.linalg.eigh(matrix / whiten)
            return (vecs * np.maximum(vals, 0.0)) @ vecs.T * whiten

        def soft(matrix):
            vals, vecs = np.linalg.eigh(matrix / whiten)
            reach = (sa.LOGISTIC_FLOOR_NOISE_SDS if variant == "soft-floor" else 2.0 * np.sqrt(d)) * noise_sd
            return (vecs * np.maximum(vals - reach, 0.0)) @ vecs.T * whiten

        if variant.startswith("plugin"):
            # the bootstrap's world with a PSD stand-in Ĥ for the noise-free Hessian: H̃* = Ĥ + N', the step
            # inverts H̃*, the gradient moves with Ĥ; plugin-bc: Ĥ's whitened eigenvalues bias-corrected first
            # (2λ̃ − mean over re-noised releases: the noise's spread of the spectrum removed once)
            vals, vecs = np.linalg.eigh(hessian / whiten)
            if variant == "plugin-bc":
                spread = np.mean([np.linalg.eigvalsh(sa.unpack_triu(packed + rng.standard_normal(len(packed))
                                                                    * h_scale, d) / whiten) for _ in range(50)], 0)
                vals = 2 * vals - spread
            truth = (vecs * np.maximum(vals, 0.0)) @ vecs.T * whiten
            moment = np.outer(gradient, gradient) - hessian @ carried @ hessian - np.diag(np.square(noise_sd * b))
            m_vals, m_vecs = np.linalg.eigh((moment + moment.T) / 2)
            g_root = m_vecs * np.sqrt(np.maximum(m_vals, 0.0))
            free = sa.noisy_gram_inverse(truth, b[1:], 0.25, noise_sd, sa.LOGISTIC_FLOOR_NOISE_SDS)
            packed_truth = truth[upper]
            runs = np.empty((draws, d))
            for i in range(draws):
                e = root @ rng.standard_normal(d)
                h = sa.unpack_triu(packed_truth + rng.standard_normal(len(packed)) * h_scale, d)
                inv = sa.noisy_gram_inverse(h, b[1:], 0.25, noise_sd, sa.LOGISTIC_FLOOR_NOISE_SDS)
                runs[i] = (e - inv @ truth @ e + inv @ (rng.standard_normal(d) * noise_sd * b)
                           + (inv - free) @ (g_root @ rng.standard_normal(d)))
            return runs.T @ runs / draws

        if variant.startswith("moment"):
            # first order, the step's own inverse known: e_k = (I - H̃_f⁻¹H)e + H̃_f⁻¹n + (H̃_f⁻¹ - H_f⁻¹)g*,
            # g* g*ᵀ estimated without bias by g̃g̃ᵀ - H̃CH̃ - Cov(n), made PSD
            step = sa.noisy_gram_inverse(hessian, b[1:], 0.25, noise_sd, sa.LOGISTIC_FLOOR_NOISE_SDS)
            moment = np.outer(gradient, gradient) - hessian @ carried @ hessian - np.diag(np.square(noise_sd * b))
            vals, vecs = np.linalg.eigh((moment + moment.T) / 2)
            g_root = vecs * np.sqrt(np.maximum(vals, 0.0))
            released_psd = psd(hessian)
            runs = np.empty((draws, d))
            for i in range(draws):
                e = root @ rng.standard_normal(d)
                n_g = rng.standard_normal(d) * noise_sd * b
                truth = sa.unpack_triu(packed - rng.standard_normal(len(packed)) * h_scale, d)
                if variant == "moment-psd-once":  # the release made PSD once, then re-noised
                    truth = truth - hessian + released_psd
                if variant == "moment-psd":
                    truth = psd(truth)
                free = sa.noisy_gram_inverse(truth, b[1:], 0.25, noise_sd, sa.LOGISTIC_FLOOR_NOISE_SDS)
                runs[i] = e - step @ truth @ e + step @ n_g + (step - free) @ (g_root @ rng.standard_normal(d))
            return runs.T @ runs / draws

        if variant.startswith("conditional"):
            step = sa.noisy_gram_inverse(hessian, b[1:], 0.25, noise_sd, sa.LOGISTIC_FLOOR_NOISE_SDS)
            runs = np.empty((draws, d))
            for i in range(draws):
                e = root @ rng.standard_normal(d)
                n_g = rng.standard_normal(d) * noise_sd * b
                truth = sa.unpack_triu(packed - rng.standard_normal(len(packed)) * h_scale, d)
                if variant.startswith("conditional-psd"):
                    truth = psd(truth)
                free = sa.noisy_gram_inverse(truth, b[1:], 0.25, noise_sd, sa.LOGISTIC_FLOOR_NOISE_SDS)
                g_free = gradient if variant.endswith("-g") else gradient - n_g + truth @ e
                runs[i] = e - step @ truth @ e + step @ n_g + (step - free) @ g_free
            return runs.T @ runs / draws

        softened = variant.startswith("soft") or variant == "regime"
        move = psd(hessian) if variant == "psd" else soft(hessian) if softened else hessian
        runs = np.empty((draws, d))
        for i in range(draws):
            e = root @ rng.standard_normal(d)
            h = hessian if variant == "no-hessian-noise" else \
                sa.unpack_triu(packed + rng.standard_normal(len(packed)) * h_scale, d)
            if variant == "psd-resampled":
                move = psd(sa.unpack_triu(packed + rng.standard_normal(len(packed)) * h_scale, d))
            g = gradient - move @ e + rng.standard_normal(d) * noise_sd * b
            runs[i] = beta_before + e + sa.noisy_gram_inverse(h, b[1:], 0.25, noise_sd,
                                                              sa.LOGISTIC_FLOOR_NOISE_SDS) @ g
        shift = runs - beta_after
        return shift.T @ shift / draws

    return noise


def coefficients(result: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for outcome, fit in (result["regression"].get("logistic") or {}).items():
        for term, row in fit["coefficients"].items():
            if row.get("estimate") is not None and row.get("se_dp_noise") is not None:
                out[f"{outcome}/{term}"] = (row["estimate"], row["se_dp_noise"])
    return out


def logistic(frames, epsilon: float, draws: int, variant: str) -> None:
    """Coverage of ± 1.96 ``se_dp_noise`` of the logistic coefficients with the bootstrap ``variant``."""
    current = phase.logistic_step_noise
    if variant != "current":
        phase.logistic_step_noise = step_noise(variant)
    try:
        with zero_noise():
            truth = coefficients(dp_run(frames, epsilon, "describe,regression", 0))
        runs = [coefficients(dp_run(frames, epsilon, "describe,regression", s)) for s in range(1, draws + 1)]
    finally:
        phase.logistic_step_noise = current
    hits, ratios = [], []
    for key, (target, _) in truth.items():
        est = np.array([run[key][0] for run in runs if key in run])
        sd = np.array([run[key][1] for run in runs if key in run])
        hits += list(np.abs(est - target) <= dp_error.Z95 * sd)
        rmse = np.sqrt(np.mean((est - target) ** 2))
        if rmse > 0:
            ratios.append(np.median(sd) / rmse)
    print(f"{variant} eps {epsilon}: coverage {np.mean(hits):.3f} (n {len(hits)}), "
          f"median sd / rmse {np.median(ratios):.2f}")


def logistic_steps(frames, epsilon: float, draws: int, variant: str, hold: bool = False) -> dict:
    """Per Newton step, the logistic coefficients' real noise error (each draw's β after the step against the
    zero-noise run's, original scale, each draw with its own standardisation) against the noise sd the carried
    bootstrap reports after that step, and the part of it that is the step's own noise (the same bootstrap with
    nothing carried): where along the steps the reported sd and the real error part. ``hold``: every draw's
    logistic phase standardises and clips as the zero-noise run did (its describe's means, sds and analysis
    ranges), so only the logistic releases' own noise differs between draws."""
    current, standardisation = phase.logistic_step_noise, phase.standardisation
    inner = step_noise(variant) if variant != "current" else current
    seen: dict = {}

    def recorded(hessian, gradient, beta_before, beta_after, carried, bound, noise_sd, *args, **kwargs):
        out = inner(hessian, gradient, beta_before, beta_after, carried, bound, noise_sd, *args, **kwargs)
        own = inner(hessian, gradient, beta_before, beta_after, np.zeros_like(carried), bound, noise_sd)
        seen.setdefault("steps", []).append((beta_after.copy(), out, own))
        return out

    def keep_x(describe, columns, plan):
        key = tuple(columns)
        if hold and key in held:
            x = held[key]
        else:
            x = standardisation(describe, columns, plan)
            if hold:
                held[key] = x
        if list(columns) == list(plan.covariates):
            seen["m"] = sa.design_map(x["centre"], x["scale"])
        return x

    held: dict = {}
    bounds = phase.dp_analysis_bounds

    def keep_bounds(plan, describe):
        if hold and "bounds" in held:
            return held["bounds"]
        held["bounds"] = bounds(plan, describe)
        return held["bounds"]

    def run(seed: int) -> list:
        seen.clear()
        dp_run(frames, epsilon, "describe,regression", seed)
        m, steps = seen["m"], seen["steps"]
        outcomes = len(steps) // phase.AnalyticsSettings().dp_newton_iterations
        return [(m.T @ b, np.sqrt(np.diag(m.T @ c @ m)), np.sqrt(np.diag(m.T @ o @ m)))
                for b, c, o in steps], outcomes

    phase.logistic_step_noise, phase.standardisation, phase.dp_analysis_bounds = recorded, keep_x, keep_bounds
    try:
        with zero_noise():
            zero, outcomes = run(0)
        runs = [run(s)[0] for s in range(1, draws + 1)]
    finally:
        phase.logistic_step_noise, phase.standardisation, phase.dp_analysis_bounds = current, standardisation, bounds
    rows = []
    for k in range(len(zero) // outcomes):
        idx = [k * outcomes + o for o in range(outcomes)]  # outcomes take their steps in turn
        error = np.array([np.concatenate([r[i][0] - zero[i][0] for i in idx]) for r in runs])
        sd = np.array([np.concatenate([r[i][1] for i in idx]) for r in runs])
        own = np.array([np.concatenate([r[i][2] for i in idx]) for r in runs])
        rmse = np.sqrt(np.mean(error ** 2, axis=0))
        row = {"step": k + 1, "coverage": float(np.mean(np.abs(error) <= dp_error.Z95 * sd)),
               "median_sd_over_rmse": float(np.median(np.median(sd, axis=0) / rmse)),
               "median_own_sd_over_rmse": float(np.median(np.median(own, axis=0) / rmse)),
               "own_coverage": float(np.mean(np.abs(error) <= dp_error.Z95 * own))}
        rows.append(row)
        print(f"{variant} eps {epsilon} step {k + 1}: coverage {row['coverage']:.3f} (n {error.size}), "
              f"sd / rmse {row['median_sd_over_rmse']:.2f}; own step's noise only: coverage "
              f"{row['own_coverage']:.3f}, sd / rmse {row['median_own_sd_over_rmse']:.2f}", flush=True)
    return {"steps": rows, "draws": draws}


def median(frames, epsilon: float, draws: int, variant: str) -> dict:
    """Coverage of the describe medians' ``ci95`` against the pooled median and the zero-noise run's median."""
    from analytics import pooled_truth

    current = phase.bin_resolution_sd, phase.threshold_shift
    if variant in ("sheppard", "no-resolution", "no-shift"):
        if variant != "no-shift":
            phase.bin_resolution_sd = (lambda cells, value, low, high: (high - low) / len(cells) / np.sqrt(12)) \
                if variant == "sheppard" else (lambda cells, value, low, high: 0.0)
        phase.threshold_shift = lambda counts, noise_sd, low, high: None
    try:
        with zero_noise():
            zero = dp_run(frames, epsilon, "describe", 0)["describe"]
        runs = [dp_run(frames, epsilon, "describe", s)["describe"] for s in range(1, draws + 1)]
    finally:
        phase.bin_resolution_sd, phase.threshold_shift = current
    truth = pooled_truth(frames, list(zero))
    pooled, noise_free, ratios = [], [], []
    for column in zero:
        rows = [run[column] for run in runs if (run[column].get("noise") or {}).get("p50", {}).get("ci95")]
        if not rows:
            continue
        est = np.array([r["quantiles"]["p50"] for r in rows])
        ci = np.array([r["noise"]["p50"]["ci95"] for r in rows])
        target = truth[column]["p50"]
        pooled += list((ci[:, 0] <= target) & (target <= ci[:, 1]))
        reference = zero[column]["quantiles"]["p50"]
        noise_free += list((ci[:, 0] <= reference) & (reference <= ci[:, 1]))
        rmse = np.sqrt(np.mean((est - target) ** 2))
        if rmse > 0:
            ratios.append(np.median([r["noise"]["p50"]["noise_sd"] for r in rows]) / rmse)
    out = {"coverage_pooled": float(np.mean(pooled)), "n": len(pooled),
           "coverage_zero_noise": float(np.mean(noise_free)),
           "median_sd_over_rmse_pooled": float(np.median(ratios))}
    print(f"{variant} eps {epsilon}: coverage of the pooled median {out['coverage_pooled']:.3f} (n {len(pooled)}), "
          f"of the zero-noise median {out['coverage_zero_noise']:.3f}, "
          f"median sd / rmse against pooled {out['median_sd_over_rmse_pooled']:.2f}")
    return out


def linear_anova(frames, epsilon: float, draws: int, analyses: str, variant: str = "current") -> dict:
    """Coverage of the linear coefficients' and ANOVA's intervals over ``draws`` noise draws (one run of
    ``analyses`` gives both), against the zero-noise run (noise only: ``estimate ± 1.96`` noise sd), the non-DP
    federated run (the reported ``ci95`` / ``± 1.96 f_noise_sd``: what a reader's interval is for) and, for the
    coefficients, least squares on the pooled unclipped rows (``benchmarks.analytics.pooled_ols``: what the DP
    accuracy benchmark's ``cov coef`` measures)."""
    from analytics import pooled_ols

    from server.analytics_plan import AnalyticsSettings
    from simulation.analytics_run import run_in_process

    group_noise, linear_noise = phase.group_noise_sds, sa.linear_noise_rmse
    if variant in ("all-sites-noise", "main"):
        phase.group_noise_sds = lambda answers, labels: dict.fromkeys(labels, phase.summed_noise_sd(answers))
    if variant in ("bootstrap-both", "main"):
        sa.linear_noise_rmse = bootstrap_both
    try:
        with zero_noise():
            zero = dp_run(frames, epsilon, analyses, 0)
        exact = run_in_process(frames, AnalyticsSettings(analyses=analyses))
        ols = pooled_ols(frames)
        runs = [dp_run(frames, epsilon, analyses, s) for s in range(1, draws + 1)]
    finally:
        phase.group_noise_sds, sa.linear_noise_rmse = group_noise, linear_noise
    out: dict = {}
    if "regression" in analyses:
        fits = [run["regression"]["linear"]["efficacy_pct"]["coefficients"] for run in runs]
        zero_fit = zero["regression"]["linear"]["efficacy_pct"]["coefficients"]
        exact_fit = exact["regression"]["linear"]["efficacy_pct"]["coefficients"]
        noise_hits, exact_hits, pooled_hits, ratios, shares = [], [], [], [], []
        for term, row in zero_fit.items():
            est = np.array([f[term]["estimate"] for f in fits])
            noise_sd = np.array([f[term]["se_dp_noise"] for f in fits])
            ci = np.array([f[term]["ci95"] for f in fits])
            noise_hits += list(np.abs(est - row["estimate"]) <= dp_error.Z95 * noise_sd)
            exact_hits += list((ci[:, 0] <= exact_fit[term]["estimate"]) & (exact_fit[term]["estimate"] <= ci[:, 1]))
            pooled_hits += list((ci[:, 0] <= ols[term]) & (ols[term] <= ci[:, 1]))
            rmse = np.sqrt(np.mean((est - row["estimate"]) ** 2))
            if rmse > 0:
                ratios.append(float(np.median(noise_sd) / rmse))
            shares.append(float(np.median([f[term]["se_sampling"] / f[term]["se"] for f in fits])))
        out["linear"] = {"coverage_zero_noise": float(np.mean(noise_hits)),
                         "coverage_non_dp": float(np.mean(exact_hits)),
                         "coverage_pooled_ols": float(np.mean(pooled_hits)), "n": len(noise_hits),
                         "median_noise_sd_over_rmse": float(np.median(ratios)),
                         "median_sampling_share_of_se": float(np.median(shares))}
        lin = out["linear"]
        print(f"{variant} linear eps {epsilon}: coverage of the zero-noise fit (± 1.96 se_dp_noise) "
              f"{lin['coverage_zero_noise']:.3f}, of the non-DP fit (ci95) {lin['coverage_non_dp']:.3f}, "
              f"of pooled OLS (ci95) {lin['coverage_pooled_ols']:.3f} (n {len(noise_hits)}); "
              f"median se_dp_noise / rmse {lin['median_noise_sd_over_rmse']:.2f}, "
              f"se_sampling / se {lin['median_sampling_share_of_se']:.2f}", flush=True)
    if "anova" in analyses:
        f_est = np.array([run["anova"]["f"] for run in runs])
        f_sd = np.array([run["anova"]["f_noise_sd"] for run in runs])
        f_zero, f_exact = zero["anova"]["f"], exact["anova"]["f"]
        mean_hits, mean_ratios = [], []
        for group, entry in exact["anova"]["groups"].items():
            rows = [run["anova"]["groups"][group] for run in runs if group in run["anova"]["groups"]]
            est = np.array([r["noise"]["mean"]["estimate"] for r in rows])
            ci = np.array([r["noise"]["mean"]["ci95"] for r in rows])
            mean_hits += list((ci[:, 0] <= entry["mean"]) & (entry["mean"] <= ci[:, 1]))
            rmse = np.sqrt(np.mean((est - entry["mean"]) ** 2))
            if rmse > 0:
                mean_ratios.append(float(np.median([r["noise"]["mean"]["noise_sd"] for r in rows]) / rmse))
        out["anova"] = {"f_coverage_zero_noise": float(np.mean(np.abs(f_est - f_zero) <= dp_error.Z95 * f_sd)),
                        "f_coverage_non_dp": float(np.mean(np.abs(f_est - f_exact) <= dp_error.Z95 * f_sd)),
                        "f_n": draws,
                        "f_noise_sd_over_rmse": float(np.median(f_sd) / np.sqrt(np.mean((f_est - f_zero) ** 2))),
                        "group_mean_coverage_non_dp": float(np.mean(mean_hits)), "group_mean_n": len(mean_hits),
                        "group_mean_median_noise_sd_over_rmse": float(np.median(mean_ratios))}
        a = out["anova"]
        print(f"{variant} anova eps {epsilon}: F coverage of the zero-noise F {a['f_coverage_zero_noise']:.3f}, "
              f"of the non-DP F {a['f_coverage_non_dp']:.3f} (n {draws}), "
              f"f_noise_sd / rmse {a['f_noise_sd_over_rmse']:.2f}; group means (ci95) of the non-DP means "
              f"{a['group_mean_coverage_non_dp']:.3f} (n {len(mean_hits)}), "
              f"median noise sd / rmse {a['group_mean_median_noise_sd_over_rmse']:.2f}", flush=True)
    return out


def linear_terms(frames, epsilon: float, draws: int, variant: str, noise: str) -> dict:
    """The linear phase alone on fixed sums: the zero-noise run's summed Gram, ``Xᵀy`` and ``yᵀy`` (all analyses'
    ε shares, its standardisation and clipping), re-noised ``draws`` times with the known sds, on the Gram and
    ``Xᵀy`` (``noise`` = ``both``) or on one of them only (``gram``, ``xty``: how much of the error each makes),
    through ``shared.analytics.linear_fit``. Per coefficient: coverage of the noise-free fit by ± 1.96
    ``se_dp_noise`` (the full reported noise sd, both parts, whatever is re-noised) and reported sd / rmse."""
    seen: dict = {}
    fit, reported = phase.linear_fit, sa.linear_noise_rmse
    phase.linear_fit = lambda *a, **k: seen.setdefault("args", (a, k)) and fit(*a, **k)
    try:
        with zero_noise():
            dp_run(frames, epsilon, "describe,regression,anova,pca,kmeans", 0)
    finally:
        phase.linear_fit = fit
    (gram, xty, yty, names, x, y_centre, y_scale, tau, y_bound), _ = seen["args"]
    if variant == "bootstrap-both":
        sa.linear_noise_rmse = bootstrap_both
    try:
        d = gram.shape[0]
        upper = np.triu_indices(d)
        b = np.concatenate([[1.0], sa.row_bound(x)])
        target = np.array([r["estimate"] for r in sa.linear_fit(gram, xty, yty, names, x, y_centre, y_scale, tau,
                                                                 y_bound)["coefficients"].values()])
        rng = np.random.default_rng(1)
        estimates, sds = [], []
        for _ in range(draws):
            g = gram[upper] + (0.0 if noise == "xty" else
                               rng.standard_normal(len(upper[0])) * tau * np.outer(b, b)[upper])
            v = xty + (0.0 if noise == "gram" else rng.standard_normal(d) * tau * b * y_bound)
            rows = sa.linear_fit(sa.unpack_triu(g, d), v, yty, names, x, y_centre, y_scale, tau,
                                 y_bound)["coefficients"].values()
            estimates.append([r["estimate"] for r in rows])
            sds.append([r["se_dp_noise"] for r in rows])
    finally:
        sa.linear_noise_rmse = reported
    error, sds = np.array(estimates) - target, np.array(sds)
    hits = np.abs(error) <= dp_error.Z95 * sds
    ratio = np.median(sds, axis=0) / np.sqrt(np.mean(error ** 2, axis=0))
    whitened = np.linalg.eigvalsh(gram / np.outer(b, b)) / tau
    print(f"{variant} noise on {noise}, eps {epsilon}: coverage {hits.mean():.3f} (n {hits.size}); whitened Gram "
          f"eigenvalues / noise sd {np.round(whitened, 1).tolist()}")
    terms = ["intercept", *names]
    for j, term in enumerate(terms):
        print(f"  {term:28s} coverage {hits[:, j].mean():.3f}  reported sd / rmse {ratio[j]:.2f}")
    return {"coverage": float(hits.mean()), "n": int(hits.size), "noise_on": noise,
            "reported_sd_over_rmse": dict(zip(terms, ratio.round(3).tolist(), strict=True)),
            "coverage_per_term": dict(zip(terms, hits.mean(axis=0).round(3).tolist(), strict=True))}


def anova_terms(frames, epsilon: float, draws: int) -> dict:
    """ANOVA's F alone on fixed sums: the zero-noise run's (all analyses' ε shares) summed group count, sum and
    sum of squares, re-noised ``draws`` times with each group's own noise sd; coverage of the noise-free F by
    ± 1.96 ``f_noise_sd`` (as released) and by two bootstrap intervals from the same parametric bootstrap
    (``shared.dp_error`` seed and draw count): the percentile ``[q2.5, q97.5]`` and the basic (reverse
    percentile) ``[2F − q97.5, 2F − q2.5]`` (Davison & Hinkley 1997, "Bootstrap Methods and their Application",
    §5.2); and the shape of F's noise error (skewness, kurtosis, its 2.5 / 50 / 97.5 % points in reported sds)."""
    from shared.analytics import anova_table, combine_moments, shifted_sums

    seen: dict = {}
    noise_sd = phase.anova_f_noise_sd
    phase.anova_f_noise_sd = lambda *a: seen.setdefault("args", a) and noise_sd(*a)
    try:
        with zero_noise():
            dp_run(frames, epsilon, "describe,regression,anova,pca,kmeans", 0)
    finally:
        phase.anova_f_noise_sd = noise_sd
    parts, centre, bounds, tau = seen["args"]
    labels = sorted(parts)
    half = (bounds[1] - bounds[0]) / 2
    sums = np.array([shifted_sums(parts[g], centre) for g in labels])
    scale = np.outer([tau[g] for g in labels], [1.0, half, half ** 2])

    def f_of(values):
        return anova_table({g: combine_moments([{"count": n, "sum": a, "sumsq": q}], centre, bounds)
                            for g, (n, a, q) in zip(labels, values, strict=True)})["f"]

    target, rng = f_of(sums), np.random.default_rng(3)
    error, sds, basic, percentile = [], [], [], []
    for _ in range(draws):
        noisy = sums + rng.standard_normal(sums.shape) * scale
        released = f_of(noisy)
        boot = np.random.default_rng(dp_error.BOOTSTRAP_SEED)
        runs = np.array([f_of(noisy + boot.standard_normal(sums.shape) * scale)
                         for _ in range(dp_error.BOOTSTRAP_DRAWS)])
        low, high = np.nanquantile(runs, [0.025, 0.975])
        error.append(released - target)
        rows = {g: [{"count": n, "sum": a, "sumsq": q}] for g, (n, a, q) in zip(labels, noisy, strict=True)}
        sds.append(noise_sd(rows, centre, bounds, tau)[0])
        basic.append(2 * released - high <= target <= 2 * released - low)
        percentile.append(low <= target <= high)
    error, sds = np.array(error), np.array(sds)
    z = error / sds
    out = {"f_noise_free": float(target), "n": draws, "coverage_sd": float(np.mean(np.abs(z) <= dp_error.Z95)),
           "coverage_basic": float(np.mean(basic)), "coverage_percentile": float(np.mean(percentile)),
           "sd_over_rmse": float(np.median(sds) / np.sqrt(np.mean(error ** 2))),
           "skewness": float(np.mean((error - error.mean()) ** 3) / error.std() ** 3),
           "kurtosis": float(np.mean((error - error.mean()) ** 4) / error.var() ** 2),
           "error_in_sds_2.5_50_97.5": np.quantile(z, [0.025, 0.5, 0.975]).round(2).tolist()}
    print(f"anova F eps {epsilon} (noise-free {target:.4g}): coverage ± 1.96 sd {out['coverage_sd']:.3f}, basic "
          f"{out['coverage_basic']:.3f}, percentile {out['coverage_percentile']:.3f} (n {draws}); sd / rmse "
          f"{out['sd_over_rmse']:.2f}; error skewness {out['skewness']:.2f}, kurtosis {out['kurtosis']:.1f}, "
          f"2.5 / 50 / 97.5 % in sds {out['error_in_sds_2.5_50_97.5']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=("pca", "logistic", "logistic-steps", "median", "linear-anova",
                                                "linear-terms", "anova-terms"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1300)
    parser.add_argument("--epsilons", default="1")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--variant", choices=sorted(set(VARIANTS + MEDIAN_VARIANTS + LINEAR_ANOVA_VARIANTS)),
                        default="current")
    parser.add_argument("--analyses", default="describe,regression,anova,pca,kmeans",
                        help="linear-anova only: the analyses of each run (their share of ε sets the noise)")
    parser.add_argument("--hold-describe", action="store_true",
                        help="logistic-steps only: every draw standardises and clips as the zero-noise run")
    parser.add_argument("--noise", choices=("both", "gram", "xty"), default="both",
                        help="linear-terms only: which of the released sums the draws re-noise")
    parser.add_argument("--out", type=Path,
                        help="median, linear-*, anova-terms, logistic-steps: write the coverage per ε as JSON here")
    args = parser.parse_args()
    load, start = os.getloadavg()[0], time.perf_counter()
    frames = make_sites(args.sites, args.rows)
    rows = {}
    for epsilon in (float(e) for e in args.epsilons.split(",")):
        if args.family == "pca":
            pca(frames, epsilon, args.draws)
        elif args.family == "median":
            rows[str(epsilon)] = median(frames, epsilon, args.draws, args.variant)
        elif args.family == "logistic-steps":
            rows[str(epsilon)] = logistic_steps(frames, epsilon, args.draws, args.variant, args.hold_describe)
        elif args.family == "anova-terms":
            rows[str(epsilon)] = anova_terms(frames, epsilon, args.draws)
        elif args.family == "linear-terms":
            rows[str(epsilon)] = linear_terms(frames, epsilon, args.draws, args.variant, args.noise)
        elif args.family == "linear-anova":
            rows[str(epsilon)] = linear_anova(frames, epsilon, args.draws, args.analyses, args.variant)
        else:
            logistic(frames, epsilon, args.draws, args.variant)
    if args.out and rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/analytics_interval_probes.py", *sys.argv[1:]]),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() or None,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_at_start": load},
            "sites": args.sites, "rows": args.rows, "draws": args.draws, "variant": args.variant,
            "analyses": args.analyses if args.family == "linear-anova" else None,
            "seconds": time.perf_counter() - start, "coverage": rows}, indent=2))


if __name__ == "__main__":
    main()
