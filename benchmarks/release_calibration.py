"""Calibration of the simulator's Weibull release model against the real liposome release curves.

Runs ``simulation.release.calibration_report`` (held out by formulation), repeats it over fold seeds, and
reproduces the data facts quoted in ``simulation/release.py``: agreement with the paper's own Weibull fits,
the plateaus below 100 %, and the lognormal fitted to the real betas. Prints plain-text tables and writes
``benchmarks/results/release_calibration.json``.

Data: Yanes et al., Digital Discovery 2025, doi:10.1039/D5DD00112A, and Yanes et al. nanomed_IVR_data
(CC BY 4.0; ``simulation/data/liposome_ivr/README.md``).

Usage: ``python benchmarks/release_calibration.py [--seed 0] [--n-splits 5] [--stability-seeds 10]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import least_squares

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from simulation import release  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "release_calibration.json"
DATA_CITATION = (
    "Yanes et al., Digital Discovery 2025, doi:10.1039/D5DD00112A; Yanes et al. nanomed_IVR_data (CC BY 4.0)"
)
MODEL_ORDER = (
    "per_curve_fit_in_sample",
    "feature_model_heldout",
    "null_population_median_heldout",
    "feature_model_ridge_heldout",
    "feature_model_plus_assay_heldout",
)


def model_table(report: dict) -> str:
    """The report's models as a plain-text table (errors in released fraction, 0..1)."""
    header = f"{'model':36s} {'held out':>8s} {'median':>7s} {'mean':>7s} {'p90':>7s} {'curve-med':>9s}"
    lines = [header, "-" * len(header)]
    for name in MODEL_ORDER:
        m = report["models"][name]
        lines.append(
            f"{name:36s} {'yes' if m['held_out'] else 'NO':>8s} {m['median_abs_error']:7.3f} "
            f"{m['mean_abs_error']:7.3f} {m['p90_abs_error']:7.3f} {m['median_curve_mean_abs_error']:9.3f}"
        )
    return "\n".join(lines)


def seed_stability(n_seeds: int, n_splits: int) -> dict:
    """Median absolute error of the feature model and of the null over fold seeds 0..n_seeds-1."""
    rows = []
    for seed in range(n_seeds):
        models = release.calibration_report(seed=seed, n_splits=n_splits)["models"]
        rows.append(
            {
                "seed": seed,
                "feature_median": models["feature_model_heldout"]["median_abs_error"],
                "null_median": models["null_population_median_heldout"]["median_abs_error"],
                "feature_curve_median": models["feature_model_heldout"]["median_curve_mean_abs_error"],
                "null_curve_median": models["null_population_median_heldout"]["median_curve_mean_abs_error"],
            }
        )
    table = pd.DataFrame(rows)
    diff = table["feature_median"] - table["null_median"]
    curve_diff = table["feature_curve_median"] - table["null_curve_median"]
    return {
        "per_seed": rows,
        "feature_minus_null_median_abs_error": {"min": float(diff.min()), "max": float(diff.max())},
        "feature_minus_null_curve_median": {"min": float(curve_diff.min()), "max": float(curve_diff.max())},
        "n_seeds_feature_better_median": int((diff < 0).sum()),
        "n_seeds_feature_better_curve_median": int((curve_diff < 0).sum()),
    }


def paper_agreement(points: pd.DataFrame, fits: pd.DataFrame) -> dict:
    """How this module's fits compare with the paper's ``weibull_params.csv`` fits of the same curves."""
    paper = pd.read_csv(release.DATA_DIR / release.PAPER_FITS_FILE).set_index("ID")
    paper["tau_h"] = release.tau_from_alpha(paper["alpha"], paper["beta"])
    ours = fits.set_index("curve_id").loc[paper.index]
    same = (np.abs(ours["beta"] - paper["beta"]) < 0.01) & (
        np.abs(np.log(ours["tau_h"] / paper["tau_h"])) < 0.05
    )
    curves = dict(tuple(points.groupby("curve_id")))
    lower_sse, at_bound = [], []
    for cid in paper.index[~same.to_numpy()]:
        g = curves[cid]
        t, f = g["time_h"].to_numpy(), g["released_fraction"].to_numpy()
        sse_ours = np.sum(
            (release.weibull_released_fraction(t, ours.at[cid, "tau_h"], ours.at[cid, "beta"]) - f) ** 2
        )
        sse_paper = np.sum(
            (release.weibull_released_fraction(t, paper.at[cid, "tau_h"], paper.at[cid, "beta"]) - f) ** 2
        )
        (lower_sse if sse_ours <= sse_paper else at_bound).append(int(cid))
    return {
        "n_paper_fits": len(paper),
        "n_same_beta_0.01_tau_5pct": int(same.sum()),
        "differ_lower_sse_here": lower_sse,
        "differ_higher_sse_here_tau_at_bound": at_bound,
        "tau_at_bound_final_fraction_max": float(ours.loc[at_bound, "final_fraction"].max())
        if at_bound
        else None,
        "paper_tau_h_of_those": [float(paper.at[c, "tau_h"]) for c in at_bound],
        "paper_beta_median": float(paper["beta"].median()),
        "paper_beta_iqr": [float(q) for q in paper["beta"].quantile([0.25, 0.75])],
        "paper_tau_h_median": float(paper["tau_h"].median()),
        "paper_tau_h_iqr": [float(q) for q in paper["tau_h"].quantile([0.25, 0.75])],
    }


def _fit_with_plateau(
    t: np.ndarray, f: np.ndarray, tau0: float, beta0: float
) -> tuple[float, float, float, float]:
    """(tau, beta, F_max, rmse) of F = F_max (1 - exp(-(t/tau)^beta)); analysis only, not the simulator's."""
    lo = np.log([release.TAU_BOUNDS_H[0], release.BETA_BOUNDS[0], 0.05])
    hi = np.log([release.TAU_BOUNDS_H[1], release.BETA_BOUNDS[1], 1.0])

    def residuals(p):
        return math.exp(p[2]) * release.weibull_released_fraction(t, math.exp(p[0]), math.exp(p[1])) - f

    best = None
    for start in (
        (tau0, beta0, 1.0),
        (tau0, 1.0, max(f.max(), 0.06)),
        (t.max() / 3, 1.0, max(f.max(), 0.06)),
    ):
        x0 = np.clip(np.log(start), lo + 1e-9, hi - 1e-9)
        sol = least_squares(residuals, x0, bounds=(lo, hi))
        if best is None or sol.cost < best.cost:
            best = sol
    tau, beta, f_max = np.exp(best.x)
    return float(tau), float(beta), float(f_max), float(math.sqrt(2 * best.cost / t.size))


def plateau_study(points: pd.DataFrame, fits: pd.DataFrame) -> dict:
    """How many curves plateau below 100 % and what a plateau factor F_max would change."""
    rows = []
    for fit in fits.itertuples():
        g = points[points["curve_id"] == fit.curve_id]
        t, f = g["time_h"].to_numpy(), g["released_fraction"].to_numpy()
        rmse_plain = float(
            np.sqrt(np.mean((release.weibull_released_fraction(t, fit.tau_h, fit.beta) - f) ** 2))
        )
        _, beta_p, f_max, rmse_p = _fit_with_plateau(t, f, fit.tau_h, fit.beta)
        late_rise = f[-1] - np.interp(t.max() / 2, t, f)
        rows.append((fit.final_fraction, late_rise, fit.beta, rmse_plain, beta_p, f_max, rmse_p))
    a = pd.DataFrame(rows, columns=["final", "late_rise", "beta", "rmse", "beta_p", "f_max", "rmse_p"])
    rho = stats.spearmanr(a["final"], a["beta"]).statistic
    return {
        "n_curves": len(a),
        "n_final_below_0.9": int((a["final"] < 0.9).sum()),
        "n_final_below_0.5": int((a["final"] < 0.5).sum()),
        "n_final_below_0.5_and_flat_second_half": int(((a["final"] < 0.5) & (a["late_rise"] < 0.05)).sum()),
        "spearman_final_fraction_vs_beta": float(rho),
        "plain_weibull": {"beta_median": float(a["beta"].median()), "rmse_median": float(a["rmse"].median())},
        "with_f_max": {
            "beta_median": float(a["beta_p"].median()),
            "rmse_median": float(a["rmse_p"].median()),
            "n_f_max_below_0.9": int((a["f_max"] < 0.9).sum()),
        },
    }


def beta_lognormal_check(n_draws: int = 200_000) -> dict:
    """The quantile-matched lognormal of ``release`` against the paper's 169 betas and the MLE alternative."""
    beta = pd.read_csv(release.DATA_DIR / release.PAPER_FITS_FILE)["beta"].to_numpy()
    mu_mle, sigma_mle = float(np.log(beta).mean()), float(np.log(beta).std())
    mu, sigma = release.BETA_LOGNORMAL_MU, release.BETA_LOGNORMAL_SIGMA
    draws = release.sample_beta(np.random.default_rng(0), n_draws)

    def ks(m, s):
        return float(stats.kstest(beta, stats.lognorm(s=s, scale=math.exp(m)).cdf).statistic)

    return {
        "data": {
            "n": int(beta.size),
            "median": float(np.median(beta)),
            "iqr": np.quantile(beta, [0.25, 0.75]).tolist(),
        },
        "quantile_matched": {
            "mu": mu,
            "sigma": sigma,
            "median": math.exp(mu),
            "iqr": [math.exp(mu - release._Z75 * sigma), math.exp(mu + release._Z75 * sigma)],
            "ks_distance": ks(mu, sigma),
            "sampled_median": float(np.median(draws)),
            "p_beta_above_5": float(stats.norm.sf((math.log(5.0) - mu) / sigma)),
        },
        "maximum_likelihood": {
            "mu": mu_mle,
            "sigma": sigma_mle,
            "median": math.exp(mu_mle),
            "ks_distance": ks(mu_mle, sigma_mle),
        },
    }


def feature_coefficients(fits: pd.DataFrame) -> dict:
    """Coefficients of the default ReleaseModel trained on all curves with features (per standard unit)."""
    train = fits[fits["formulation_ID"].notna()]
    model = release.ReleaseModel().fit(train, train["tau_h"], train["beta"])
    names = [str(n) for n in model.feature_names_out_]
    return {
        "n_curves": len(train),
        "intercept": {"ln_tau": float(model.intercept_[0]), "ln_beta": float(model.intercept_[1])},
        "ln_tau": dict(zip(names, map(float, model.coef_[0]), strict=True)),
        "ln_beta": dict(zip(names, map(float, model.coef_[1]), strict=True)),
    }


def summary_lines(report, stability, agreement, plateaus, lognormal, n_seeds: int) -> list[str]:
    """The data facts quoted in ``simulation/release.py``, one sentence each."""
    s, fp, a, p = stability, report["fitted_parameters"], agreement, plateaus
    q, m = lognormal["quantile_matched"], lognormal["maximum_likelihood"]
    d, dc = s["feature_minus_null_median_abs_error"], s["feature_minus_null_curve_median"]
    return [
        f"\nFold seeds 0..{n_seeds - 1}: feature - null median error in [{d['min']:+.3f}, {d['max']:+.3f}] "
        f"(feature better on {s['n_seeds_feature_better_median']} seeds); curve-med difference in "
        f"[{dc['min']:+.3f}, {dc['max']:+.3f}] "
        f"(feature better on {s['n_seeds_feature_better_curve_median']}).",
        f"Per-curve fits ({report['n_curves_evaluated']} curves): tau median {fp['tau_h_median']:.1f} h "
        f"(IQR {fp['tau_h_iqr'][0]:.1f}-{fp['tau_h_iqr'][1]:.1f}), beta median {fp['beta_median']:.3f} "
        f"(IQR {fp['beta_iqr'][0]:.3f}-{fp['beta_iqr'][1]:.3f}); "
        f"{fp['n_tau_at_upper_bound']} tau at the 1e5 h bound.",
        f"Paper's fits ({a['n_paper_fits']} curves): beta median {a['paper_beta_median']:.3f} "
        f"(IQR {a['paper_beta_iqr'][0]:.3f}-{a['paper_beta_iqr'][1]:.3f}), "
        f"tau median {a['paper_tau_h_median']:.2f} h (IQR {a['paper_tau_h_iqr'][0]:.1f}-"
        f"{a['paper_tau_h_iqr'][1]:.0f}); reproduced on {a['n_same_beta_0.01_tau_5pct']}; "
        f"lower SSE here on {a['differ_lower_sse_here']}; tau at bound here on "
        f"{a['differ_higher_sse_here_tau_at_bound']} "
        f"(final fraction <= {a['tau_at_bound_final_fraction_max']:.3f}).",
        f"Plateaus: {p['n_final_below_0.9']}/{p['n_curves']} curves end below 90 %, "
        f"{p['n_final_below_0.5']} below 50 % ({p['n_final_below_0.5_and_flat_second_half']} of them rising "
        f"< 5 points over the second half); Spearman(final fraction, beta) = "
        f"{p['spearman_final_fraction_vs_beta']:.2f}.",
        f"With a plateau factor F_max: beta median {p['plain_weibull']['beta_median']:.2f} -> "
        f"{p['with_f_max']['beta_median']:.2f}, RMSE median {p['plain_weibull']['rmse_median']:.3f} -> "
        f"{p['with_f_max']['rmse_median']:.3f}, "
        f"F_max < 0.9 on {p['with_f_max']['n_f_max_below_0.9']} curves.",
        f"Beta lognormal (quantile-matched): mu {q['mu']:.4f}, sigma {q['sigma']:.4f}, "
        f"median {q['median']:.3f}, "
        f"IQR {q['iqr'][0]:.3f}-{q['iqr'][1]:.3f}, KS {q['ks_distance']:.3f}; "
        f"MLE: mu {m['mu']:.4f}, sigma {m['sigma']:.4f}, median {m['median']:.3f}, "
        f"KS {m['ks_distance']:.3f}.",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-splits", type=int, default=5)
    parser.add_argument("--stability-seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report = release.calibration_report(seed=args.seed, n_splits=args.n_splits)
    points, fits = release.fitted_curves()
    stability = seed_stability(args.stability_seeds, args.n_splits)
    agreement = paper_agreement(points, fits)
    plateaus = plateau_study(points, fits)
    lognormal = beta_lognormal_check()
    coefficients = feature_coefficients(fits)
    elapsed = time.perf_counter() - started

    print(
        f"Release calibration on {report['n_curves_evaluated']} real liposome curves "
        f"({report['n_points_evaluated']} points, {report['n_formulations']} formulations), "
        f"{report['n_splits']}-fold held out by formulation, seed {report['seed']}."
    )
    print(
        "Absolute error of released fraction (0..1); curve-med = median over curves of each curve's mean.\n"
    )
    print(model_table(report))
    for line in summary_lines(report, stability, agreement, plateaus, lognormal, args.stability_seeds):
        print(line)
    print(f"\n({elapsed:.1f} s)")

    result = {
        "benchmark": "release_calibration",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "elapsed_s": elapsed,
        "data": DATA_CITATION,
        "calibration_report": report,
        "seed_stability": stability,
        "paper_agreement": agreement,
        "plateau_study": plateaus,
        "beta_lognormal": lognormal,
        "feature_model_coefficients": coefficients,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
