"""Noise-only coverage of the DP analytics' intervals: the data held fixed, only the sites' DP noise redrawn.

    python benchmarks/analytics_noise_only.py [--sites 3 --rows 1300 --draws 40 --epsilons 0.5,1]
        [--hold-bounds] [--out benchmarks/results/analytics_noise_only.json]

On ``--sites`` simulated clinics of ~``--rows`` episodes (``benchmarks.analytics.make_sites``), the whole site +
server code in process (``simulation.analytics_run.run_in_process``, all analyses) is run once with the sites'
Gaussian noise set to zero (``client.analytics.gaussian_release`` returns the exact blocks; σ, the noise sds the
server is told, every bound and threshold unchanged) and then ``--draws`` times with fresh noise. The zero-noise
run is the estimator without its noise, so the share of draws whose 95 % noise interval (estimate ± 1.96 noise
sd, the DP part of the reported uncertainty only) holds the zero-noise value is the coverage of the noise part
alone, apart from sampling and from the clipping to declared ranges (which both runs share). What the DP
accuracy benchmark (``benchmarks/analytics.py --dp-accuracy``) measures against pooled truth is this plus those.

Families: describe means, sds and medians (their ``ci95``), linear and logistic coefficients (± 1.96
``se_dp_noise``), PCA eigenvalues (± 1.96 ``eigenvalues_noise_sd``), ANOVA's F (± 1.96 ``f_noise_sd``) and the
k-means inertia (its ``ci95`` against the zero-noise run's inertia; the centroids differ per draw, so this is
the noise on the whole k-means path). ``--hold-bounds``: every draw clips the analyses after describe to the
zero-noise run's ranges, not to those its own noisy describe gives (``dp_analysis_bounds``), so the phases'
own noise is measured apart from the noise reaching them through the clipping ranges. Also per family: the
median over numbers of |bias| / sd (bias and sd of the draws about the zero-noise value), and the median
ratio of the reported noise sd to the draws' root-mean-square error; above 1 the interval is too wide, below
1 too narrow.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ALL_ANALYSES = "describe,regression,anova,pca,kmeans"
FAMILIES = ("mean", "sd", "p50", "linear", "logistic", "pca_eigenvalue", "anova_f", "kmeans_inertia")
Z95 = 1.959963984540054


@contextmanager
def zero_noise() -> Iterator[None]:
    """The sites release their exact blocks (as if each noise draw were 0), everything else as under DP."""
    import client.analytics as site

    released = site.gaussian_release

    def exact(blocks, sigma, rng):
        return {name: np.asarray(block.values, dtype=np.float64).copy() for name, block in blocks.items()}

    site.gaussian_release = exact
    try:
        yield
    finally:
        site.gaussian_release = released


@contextmanager
def held_bounds(bounds: dict[str, list[float]]) -> Iterator[None]:
    """The analyses after describe clip to ``bounds`` (the zero-noise run's) instead of the ranges the draw's
    own DP describe gives (``server.analytics_phase.dp_analysis_bounds``): the phases' own noise alone."""
    import server.analytics_phase as server

    chosen = server.dp_analysis_bounds
    server.dp_analysis_bounds = lambda plan, describe: {c: tuple(v) for c, v in bounds.items()}
    try:
        yield
    finally:
        server.dp_analysis_bounds = chosen


def numbers(result: dict) -> dict[str, dict[str, tuple[float, float | None, tuple[float, float] | None]]]:
    """Every number with its noise interval, per family: ``{family: {key: (estimate, noise_sd, interval)}}``."""
    out: dict[str, dict] = {f: {} for f in FAMILIES}
    for column, stats in result["describe"].items():
        for name, noise in (stats.get("noise") or {}).items():
            if name in ("mean", "sd", "p50") and noise.get("ci95") is not None:
                value = stats["quantiles"]["p50"] if name == "p50" else stats[name]
                out[name][column] = (value, noise["noise_sd"], tuple(noise["ci95"]))
    for kind in ("linear", "logistic"):
        for outcome, fit in (result["regression"].get(kind) or {}).items():
            for term, row in fit["coefficients"].items():
                if row.get("estimate") is not None and row.get("se_dp_noise") is not None:
                    out[kind][f"{outcome}/{term}"] = (row["estimate"], row["se_dp_noise"], None)
    pca = result.get("pca") or {}
    for j, value in enumerate(pca.get("eigenvalues") or []):
        sd = ((pca.get("noise") or {}).get("eigenvalues_noise_sd") or [None] * (j + 1))[j]
        out["pca_eigenvalue"][str(j + 1)] = (value, sd, None)
    anova = result.get("anova") or {}
    if anova.get("f") is not None:
        out["anova_f"]["f"] = (anova["f"], anova.get("f_noise_sd"), None)
    km = result.get("kmeans") or {}
    inertia = (km.get("noise") or {}).get("inertia")
    if km.get("inertia") is not None and inertia:
        out["kmeans_inertia"]["inertia"] = (km["inertia"], inertia.get("noise_sd"),
                                            tuple(inertia["ci95"]) if inertia.get("ci95") else None)
    return out


def interval(estimate: float, sd: float | None, given: tuple[float, float] | None) -> tuple[float, float] | None:
    if given is not None:
        return given
    if sd is None or not np.isfinite(sd):
        return None
    return estimate - Z95 * sd, estimate + Z95 * sd


def noise_only(frames, epsilon: float, draws: int, hold_bounds: bool) -> dict:
    """Coverage per family at ``epsilon`` over ``draws`` noise draws on ``frames`` (``hold_bounds``: every draw
    clips the later analyses to the zero-noise run's ranges, :func:`held_bounds`)."""
    from analytics import dp_run

    with zero_noise():
        zero = dp_run(frames, epsilon, ALL_ANALYSES, 0)
    reference = numbers(zero)
    if hold_bounds:
        with held_bounds(zero["analysis_bounds"]):
            runs = [numbers(dp_run(frames, epsilon, ALL_ANALYSES, seed)) for seed in range(1, draws + 1)]
    else:
        runs = [numbers(dp_run(frames, epsilon, ALL_ANALYSES, seed)) for seed in range(1, draws + 1)]
    table = {}
    for family in FAMILIES:
        hits, n, bias_ratio, sd_ratio = 0, 0, [], []
        for key, (truth, _, _) in reference[family].items():
            estimates, sds = [], []
            for run in runs:
                if key not in run[family]:
                    continue
                estimate, sd, given = run[family][key]
                bounds = interval(estimate, sd, given)
                if bounds is None:
                    continue
                hits += bounds[0] <= truth <= bounds[1]
                n += 1
                estimates.append(estimate)
                sds.append(sd)
            if len(estimates) >= 3:
                e = np.asarray(estimates, dtype=np.float64)
                spread = float(e.std(ddof=1))
                rmse = float(np.sqrt(np.mean((e - truth) ** 2)))
                if spread > 0:
                    bias_ratio.append(abs(float(e.mean()) - truth) / spread)
                if rmse > 0 and all(s is not None for s in sds):
                    sd_ratio.append(float(np.median(sds)) / rmse)
        table[family] = {"coverage": hits / n if n else None, "n": n,
                         "median_bias_over_sd": float(np.median(bias_ratio)) if bias_ratio else None,
                         "median_reported_sd_over_rmse": float(np.median(sd_ratio)) if sd_ratio else None}
    return table


def show(value, width: int, digits: int = 3) -> str:
    return f"{'—':>{width}s}" if value is None else f"{value:>{width}.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1300)
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--epsilons", default="0.5,1")
    parser.add_argument("--hold-bounds", action="store_true",
                        help="clip the analyses after describe to the zero-noise run's ranges in every draw")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analytics_noise_only.json")
    args = parser.parse_args()
    from analytics import make_sites

    start = time.perf_counter()
    load = os.getloadavg()[0]
    frames = make_sites(args.sites, args.rows)
    rows = {}
    print(f"{'eps':>4s} {'family':15s} {'coverage':>8s} {'n':>5s} {'|bias|/sd':>9s} {'sd/rmse':>8s}")
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        rows[str(epsilon)] = noise_only(frames, epsilon, args.draws, args.hold_bounds)
        for family, r in rows[str(epsilon)].items():
            print(f"{epsilon:4.1f} {family:15s} {show(r['coverage'], 8)} {r['n']:5d} "
                  f"{show(r['median_bias_over_sd'], 9, 2)} {show(r['median_reported_sd_over_rmse'], 8, 2)}",
                  flush=True)
    seconds = time.perf_counter() - start
    print(f"wall time {seconds:.0f} s, {sum(len(f) for f in frames.values())} episodes at {args.sites} sites")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/analytics_noise_only.py", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_at_start": load},
        "sites": args.sites, "rows": args.rows, "draws": args.draws, "hold_bounds": args.hold_bounds,
        "seconds": seconds,
        "episodes": {name: len(f) for name, f in frames.items()}, "coverage": rows}, indent=2))


if __name__ == "__main__":
    main()
