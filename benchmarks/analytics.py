"""Benchmark of federated analytics on 10 sites × ~10⁴ episodes: time per phase, vs pooling. Prints a table,
writes JSON.

    python benchmarks/analytics.py [--sites 10] [--rows 10000] [--no-flower] [--out benchmarks/results/analytics.json]

Cases, all on the same simulated clinics (``simulation.clinics.make_world`` / ``simulate_clinic``):

- ``in_process``: every analysis (describe, linear + logistic regression, ANOVA, PCA, k-means with profiles)
  with the site code (``client.analytics``) and server code (``server.analytics_phase``) in one process, no DP;
  the per-query times are the sites' compute plus the server's combining.
- ``in_process_dp``: the same with every site's DP on (ε = 1 for the run, δ = 1e-5, a fresh ledger each).
- ``pooled``: the same statistics with numpy/scipy on the concatenated rows (what pooling would cost), and the
  largest relative difference between the federated and pooled numbers (should be ~1e-12).
- ``flower``: the full ``simulation.analytics_run.run_analytics`` on site folders (episodes.csv and site.toml;
  no vitals, which analytics do not read) in Flower's simulation runtime: wall time including Ray start-up,
  the site check (each site validates its 10⁴ rows) and the message rounds.

Wall times depend on the machine's load; the JSON records the load average at the start.

    python benchmarks/analytics.py --dp-accuracy [--sites 3 --rows 1300 --repeats 40] [--out ...analytics_dp.json]

measures instead how honest the DP output is (issue 19): on ``--sites`` clinics of ~``--rows`` episodes, at
ε = 0.5, 1, 3 per site, for ``--analyses describe`` and for all analyses, ``--repeats`` runs with fresh
ledgers and noise seeds. Each run is the whole site + server code in process (``run_in_process``: the same
``client.analytics.answer`` and ``server.analytics_phase`` a Flower run uses, without Flower's messaging —
a Flower start-up per repetition would take the run past 20 minutes here); one Flower run at ε = 1 checks
planned = spent through the real runtime. Reported: error of the describe means and medians against the
pooled rows as a share of the declared range, the share of describe numbers reported not estimable, the
coverage of the 95 % intervals of means, sds, medians and linear-regression coefficients (against the pooled
mean, sd (n − 1), median and plain least squares on the pooled rows — so the bias of DP clipping counts
against coverage), and ε spent against planned. With all analyses, also: linear and logistic coefficient
errors in the non-DP standard errors and their intervals' coverage, ANOVA's F, the PCA eigenvalues and the
k-means inertia (relative or absolute error, coverage by ± 1.96 noise sd), against the non-DP federated run
(equal to pooled); the inertia's interval against the exact inertia at the run's own released centroids.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CYCLES_PER_PATIENT = 3.75  # measured mean over make_world(10, seed=0, ...) clinics; used only to size cohorts


def make_sites(n_sites: int, rows: int) -> dict[str, pd.DataFrame]:
    """``n_sites`` simulated clinics of about ``rows`` episodes each."""
    from simulation.clinics import make_world, simulate_clinic

    world = make_world(n_sites, seed=0, patients_per_clinic=int(rows / CYCLES_PER_PATIENT))
    return {clinic.name: simulate_clinic(world, clinic)[0] for clinic in world.clinics}


def case_in_process(frames: dict[str, pd.DataFrame]) -> tuple[dict, dict]:
    """All analyses in process without DP; returns the timing figures and the result."""
    from server.analytics_plan import AnalyticsSettings
    from simulation.analytics_run import run_in_process

    start = time.perf_counter()
    result = run_in_process(frames, AnalyticsSettings())
    return {"seconds": time.perf_counter() - start, "queries": result["queries"]["asked"],
            "timing": result["timing"], "lloyd_iterations": result["kmeans"]["iterations"],
            "newton_iterations": {o: f["iterations"] for o, f in result["regression"]["logistic"].items()}}, result


def case_in_process_dp(frames: dict[str, pd.DataFrame], epsilon: float = 1.0) -> dict:
    """All analyses in process with every site's DP on, each with a fresh ledger."""
    from client.dp import SiteDP
    from client.ledger import PrivacyLedger
    from server.analytics_plan import AnalyticsSettings
    from simulation.analytics_run import run_in_process

    budget = 10.0
    with tempfile.TemporaryDirectory() as folder:
        sites = {name: SiteDP(PrivacyLedger.open(Path(folder) / f"{name}.json", budget, 1e-5,
                                                 state_dir=Path(folder) / "heads"),
                              {"analytics": epsilon / budget}) for name in frames}
        start = time.perf_counter()
        result = run_in_process(frames, AnalyticsSettings(dp=True), sites)
        seconds = time.perf_counter() - start
        spent = {name: site.ledger.spent() for name, site in sites.items()}
    return {"seconds": seconds, "queries": result["queries"]["asked"], "epsilon": epsilon,
            "epsilon_spent_max": max(spent.values()), "timing": result["timing"],
            "sigma": next(iter(result["privacy"].values()))["sigma"]}


def case_pooled(frames: dict[str, pd.DataFrame], federated: dict) -> dict:
    """Pooled numpy/scipy versions of the same statistics, and how far the federated ones are from them."""
    from scipy import stats

    from server.analytics_plan import KMEANS_FEATURES, REGRESSION_COVARIATES

    def numbers(frame, names):
        """Columns as a float matrix with NaN for missing."""
        return np.column_stack([pd.to_numeric(frame[n]).to_numpy(dtype=float, na_value=np.nan) for n in names])

    start = time.perf_counter()
    pooled = pd.concat(list(frames.values()), ignore_index=True)
    values = numbers(pooled, list(federated["describe"]))
    means = np.nanmean(values, axis=0)
    rows = numbers(pooled, (*REGRESSION_COVARIATES, "efficacy_pct"))
    rows = rows[~np.isnan(rows).any(axis=1)]
    design = np.column_stack([np.ones(len(rows)), rows[:, :-1]])
    beta = np.linalg.lstsq(design, rows[:, -1], rcond=None)[0]
    groups = [g["efficacy_pct"].dropna().to_numpy(float) for _, g in pooled.groupby("formulation_id")]
    anova_f = stats.f_oneway(*groups).statistic
    features = numbers(pooled, KMEANS_FEATURES)
    features = features[~np.isnan(features).any(axis=1)]
    z = (features - features.mean(axis=0)) / features.std(axis=0, ddof=1)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(z.T)))[::-1]
    centroids = np.array(federated["kmeans"]["initial_centroids_standardised"])
    for _ in range(federated["kmeans"]["iterations"]):
        nearest = np.argmin(np.square(z[:, None, :] - centroids[None]).sum(axis=2), axis=1)
        centroids = np.array([z[nearest == c].mean(axis=0) for c in range(len(centroids))])
    seconds = time.perf_counter() - start

    def rel(a, b):
        """Largest relative difference between two arrays."""
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))

    fed_beta = [row["estimate"] for row in federated["regression"]["linear"]["efficacy_pct"]["coefficients"].values()]
    differences = {"describe_mean": rel([s["mean"] for s in federated["describe"].values()], means),
                   "linear_coefficients": rel(fed_beta, beta), "anova_f": rel(federated["anova"]["f"], anova_f),
                   "pca_eigenvalues": rel(federated["pca"]["eigenvalues"], eigenvalues),
                   "kmeans_centroids": float(np.max(np.abs(np.array(federated["kmeans"]["centroids_standardised"])
                                                           - centroids)))}
    return {"seconds": seconds, "rows": len(pooled), "max_relative_difference": differences}


def site_folders(frames: dict[str, pd.DataFrame], folder: Path, privacy: str) -> list[Path]:
    """One site folder per frame under ``folder/sites`` (episodes and a site.toml with ``privacy`` appended)."""
    from shared.schema import EPISODES_FILE, SITE_FILE

    sites = []
    for name, frame in frames.items():
        site = folder / "sites" / name
        site.mkdir(parents=True)
        frame.to_csv(site / EPISODES_FILE, index=False, lineterminator="\n")
        (site / SITE_FILE).write_text(f'[site]\nname = "{name}"\nschema_version = "1.0"\n{privacy}')
        sites.append(site)
    return sites


def case_flower(frames: dict[str, pd.DataFrame]) -> dict:
    """The whole run in Flower's simulation runtime on site folders written to a temp dir."""
    from simulation.analytics_run import run_analytics

    with tempfile.TemporaryDirectory() as folder:
        sites = site_folders(frames, Path(folder), "")
        start = time.perf_counter()
        result = run_analytics(Path(folder) / "out", sites=sites)
        seconds = time.perf_counter() - start
    queries = sum(t["seconds"] for t in result["timing"].values())
    return {"seconds": seconds, "query_seconds": queries, "startup_and_site_check_s": seconds - queries,
            "queries": result["queries"]["asked"], "timing": result["timing"], "sites": len(result["sites"])}


DP_EPSILONS = (0.5, 1.0, 3.0)
DP_ANALYSES = ("describe", "describe,regression,anova,pca,kmeans")


def pooled_truth(frames: dict[str, pd.DataFrame], columns: list[str]) -> dict[str, dict[str, float]]:
    """Mean, sd (n − 1) and median of each column over the pooled rows."""
    pooled = pd.concat(list(frames.values()), ignore_index=True)
    out = {}
    for c in columns:
        values = pd.to_numeric(pooled[c]).dropna().to_numpy(dtype=float)
        out[c] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)), "p50": float(np.median(values))}
    return out


def pooled_ols(frames: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Least squares of efficacy on the regression covariates over the pooled complete rows."""
    from server.analytics_plan import REGRESSION_COVARIATES

    pooled = pd.concat(list(frames.values()), ignore_index=True)
    names = [*REGRESSION_COVARIATES, "efficacy_pct"]
    rows = np.column_stack([pd.to_numeric(pooled[n]).to_numpy(dtype=float) for n in names])
    rows = rows[~np.isnan(rows).any(axis=1)]
    beta = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), rows[:, :-1]]), rows[:, -1], rcond=None)[0]
    return dict(zip(["intercept", *REGRESSION_COVARIATES], beta.tolist(), strict=True))


def dp_run(frames: dict[str, pd.DataFrame], epsilon: float, analyses: str, seed: int) -> dict:
    """One in-process DP run at ``epsilon`` per site (fresh ledgers, noise from ``seed``)."""
    from client.dp import SiteDP
    from client.ledger import PrivacyLedger
    from server.analytics_plan import AnalyticsSettings
    from simulation.analytics_run import run_in_process

    budget = 10.0
    with tempfile.TemporaryDirectory() as folder:
        sites = {name: SiteDP(PrivacyLedger.open(Path(folder) / f"{name}.json", budget, 1e-5,
                                                 state_dir=Path(folder) / "heads"),
                              {"analytics": epsilon / budget}) for name in frames}
        return run_in_process(frames, AnalyticsSettings(dp=True, analyses=analyses), sites,
                              np.random.default_rng(seed))


def exact_inertia(frames: dict[str, pd.DataFrame], kmeans: dict, bounds: np.ndarray) -> float:
    """The inertia of the pooled rows at a run's released centroids and standardisation (what the DP inertia's
    interval is about), from the sites' own exact sums."""
    from client.analytics import Standardiser, lloyd_sums

    features = kmeans["features"]
    x = Standardiser(np.array([kmeans["standardisation"]["mean"][f] for f in features]),
                     np.array([kmeans["standardisation"]["sd"][f] or 1.0 for f in features]), bounds)
    centroids = np.array(kmeans["centroids_standardised"])
    return float(sum(lloyd_sums(f, features, x, centroids).exact["inertia"][0] for f in frames.values()))


def other_analyses_accuracy(frames: dict[str, pd.DataFrame], result: dict, exact: dict, plan, tally: dict) -> None:
    """Add one DP run's errors and interval hits for regression, logistic, ANOVA, PCA and k-means to ``tally``,
    against the non-DP federated run ``exact`` (equal to pooled: ``case_pooled``)."""
    def hit(name: str, inside: bool) -> None:
        tally.setdefault(f"cover_{name}", [0, 0])
        tally[f"cover_{name}"][0] += bool(inside)
        tally[f"cover_{name}"][1] += 1

    def coefficients(kind: str) -> None:
        for outcome, fit in (result["regression"].get(kind) or {}).items():
            truth = exact["regression"][kind][outcome]["coefficients"]
            for term, row in fit["coefficients"].items():
                true = truth[term]
                if row["estimate"] is None or true["estimate"] is None or not true["se"]:
                    continue
                tally.setdefault(f"{kind}_error_in_se", []).append(abs(row["estimate"] - true["estimate"]) / true["se"])
                if row.get("ci95"):
                    hit(kind, row["ci95"][0] <= true["estimate"] <= row["ci95"][1])

    coefficients("linear")
    coefficients("logistic")
    anova, true_anova = result.get("anova"), exact.get("anova")
    if anova and true_anova and anova.get("f") is not None:
        tally.setdefault("anova_f_relative_error", []).append(abs(anova["f"] - true_anova["f"]) / true_anova["f"])
        if anova.get("f_noise_sd"):
            hit("anova_f", abs(anova["f"] - true_anova["f"]) <= 1.96 * anova["f_noise_sd"])
    pca, true_pca = result.get("pca"), exact.get("pca")
    if pca and true_pca:
        for j, (value, true) in enumerate(zip(pca["eigenvalues"], true_pca["eigenvalues"], strict=True)):
            tally.setdefault("pca_eigenvalue_error", []).append(abs(value - true))
            sd = (pca.get("noise") or {}).get("eigenvalues_noise_sd", [None] * (j + 1))[j]
            if sd:
                hit("pca_eigenvalue", abs(value - true) <= 1.96 * sd)
    km, true_km = result.get("kmeans"), exact.get("kmeans")
    if km and true_km:
        tally.setdefault("kmeans_inertia_relative_error", []).append(
            abs(km["inertia"] - true_km["inertia"]) / true_km["inertia"])
        noise = (km.get("noise") or {}).get("inertia")
        if noise and noise.get("ci95"):
            bounds = np.array([result.get("analysis_bounds", {}).get(f, plan.range_of(f)) for f in km["features"]],
                              dtype=np.float64)
            at_centroids = exact_inertia(frames, km, bounds)
            hit("kmeans_inertia", noise["ci95"][0] <= at_centroids <= noise["ci95"][1])


def case_dp_accuracy(frames: dict[str, pd.DataFrame], repeats: int) -> list[dict]:
    """Error, "not estimable" share, interval coverage and ε spent vs planned per (analyses, ε)."""
    from server.analytics_plan import AnalyticsSettings, plan_for
    from shared.task import NANOPARTICLE_TASK
    from simulation.analytics_run import run_in_process

    plan = plan_for(NANOPARTICLE_TASK, dp=True)
    truth = pooled_truth(frames, list(plan.columns))
    ols = pooled_ols(frames)
    exact = run_in_process(frames, AnalyticsSettings())
    rows = []
    for analyses in DP_ANALYSES:
        for epsilon in DP_EPSILONS:
            start = time.perf_counter()
            mean_err, median_err, hidden, numbers, spent_gap = [], [], 0, 0, []
            cover = {"mean": [0, 0], "sd": [0, 0], "p50": [0, 0], "coefficient": [0, 0]}
            cover_shown = {"mean": [0, 0], "sd": [0, 0], "p50": [0, 0]}
            others: dict = {}
            for seed in range(repeats):
                result = dp_run(frames, epsilon, analyses, seed)
                if analyses != "describe":
                    other_analyses_accuracy(frames, result, exact, plan, others)
                for column, stats in result["describe"].items():
                    low, high = plan.range_of(column)
                    width = high - low
                    mean_err.append(abs(stats["mean"] - truth[column]["mean"]) / width)
                    if stats.get("quantiles"):
                        median_err.append(abs(stats["quantiles"]["p50"] - truth[column]["p50"]) / width)
                    for name, noise in stats["noise"].items():
                        numbers += 1
                        hidden += not noise["estimable"]
                        if name in ("mean", "sd", "p50") and noise["ci95"] is not None:
                            inside = noise["ci95"][0] <= truth[column][name] <= noise["ci95"][1]
                            cover[name][0] += inside
                            cover[name][1] += 1
                            if noise["estimable"]:
                                cover_shown[name][0] += inside
                                cover_shown[name][1] += 1
                fit = (result["regression"].get("linear") or {}).get("efficacy_pct")
                for term, row in (fit or {}).get("coefficients", {}).items():
                    if row.get("ci95"):
                        cover["coefficient"][0] += row["ci95"][0] <= ols[term] <= row["ci95"][1]
                        cover["coefficient"][1] += 1
                for booked in result["budget"]["sites"].values():
                    spent_gap.append((booked["epsilon_spent"] - booked["epsilon_planned"]) / booked["epsilon_planned"])
            mean_err, median_err = np.array(mean_err), np.array(median_err)
            rows.append({
                "analyses": analyses, "epsilon": epsilon, "repeats": repeats,
                "seconds": time.perf_counter() - start,
                "mean_error_share_of_range": {"mean": float(mean_err.mean()), "p95": float(np.quantile(mean_err, 0.95)),
                                              "within_2pct": float((mean_err <= 0.02).mean())},
                "median_error_share_of_range": {"mean": float(median_err.mean()),
                                                "p95": float(np.quantile(median_err, 0.95)),
                                                "within_5pct": float((median_err <= 0.05).mean())},
                "not_estimable_share": hidden / max(numbers, 1),
                "coverage": {k: (v[0] / v[1] if v[1] else None) for k, v in cover.items()},
                "coverage_n": {k: v[1] for k, v in cover.items()},
                "coverage_estimable_only": {k: (v[0] / v[1] if v[1] else None) for k, v in cover_shown.items()},
                "coverage_estimable_only_n": {k: v[1] for k, v in cover_shown.items()},
                "epsilon_spent_minus_planned_relative": {"min": float(min(spent_gap)), "max": float(max(spent_gap))},
                "other_analyses": {
                    **{name: {"mean": float(np.mean(v)), "median": float(np.median(v)), "n": len(v)}
                       for name, v in others.items() if not name.startswith("cover_")},
                    **{name: {"coverage": v[0] / v[1], "n": v[1]} for name, v in others.items()
                       if name.startswith("cover_")}},
            })
    return rows


def case_flower_dp(frames: dict[str, pd.DataFrame], epsilon: float = 1.0) -> dict:
    """One Flower run with DP sites (ε for analytics = ``epsilon``): planned against spent through the runtime."""
    from simulation.analytics_run import run_analytics

    with tempfile.TemporaryDirectory() as folder:
        privacy = (f"\n[privacy]\ndp = true\nepsilon = 10.0\ndelta = 1e-5\n\n"
                   f"[privacy.shares]\nanalytics = {epsilon / 10.0}\n")
        sites = site_folders(frames, Path(folder), privacy)
        start = time.perf_counter()
        result = run_analytics(Path(folder) / "out", sites=sites)
        seconds = time.perf_counter() - start
        report = (Path(folder) / "out" / "analytics.md").read_text()
    return {"seconds": seconds, "queries": result["queries"], "budget": result["budget"]["sites"],
            "not_estimable_in_report": report.count("not estimable at")}


def print_dp_accuracy(rows: list[dict], flower: dict | None) -> None:
    """The table of :func:`case_dp_accuracy` (and the Flower check)."""
    print(f"{'analyses':9s} {'eps':>4s} {'mean err':>9s} {'<=2%':>5s} {'med err':>8s} {'<=5%':>5s} {'not est':>7s} "
          f"{'cov mean':>8s} {'cov sd':>6s} {'cov p50':>7s} {'cov coef':>8s} {'spent-planned':>14s} {'s':>5s}")
    for r in rows:
        c = r["coverage"]
        name = "describe" if r["analyses"] == "describe" else "all"
        gap = r["epsilon_spent_minus_planned_relative"]

        def pct(value):
            return "—" if value is None else f"{value:.3f}"

        print(f"{name:9s} {r['epsilon']:4.1f} {r['mean_error_share_of_range']['mean']:9.4f} "
              f"{r['mean_error_share_of_range']['within_2pct']:5.2f} {r['median_error_share_of_range']['mean']:8.4f} "
              f"{r['median_error_share_of_range']['within_5pct']:5.2f} {r['not_estimable_share']:7.2f} "
              f"{pct(c['mean']):>8s} {pct(c['sd']):>6s} {pct(c['p50']):>7s} {pct(c['coefficient']):>8s} "
              f"{gap['min']:+.1e}/{gap['max']:+.1e} {r['seconds']:5.0f}")
    print("coverage of the numbers reported estimable only (mean / sd / p50, with how many):")
    for r in rows:
        c, n = r["coverage_estimable_only"], r["coverage_estimable_only_n"]
        name = "describe" if r["analyses"] == "describe" else "all"
        print(f"  {name:9s} eps {r['epsilon']:.1f}: " + ", ".join(
            f"{k} {'—' if c[k] is None else f'{c[k]:.3f}'} (n={n[k]})" for k in ("mean", "sd", "p50")))
    print("other analyses (all): errors against the non-DP federated run (= pooled), coverage of its values by the "
          "95 % intervals (k-means inertia: of the exact inertia at the released centroids)")
    print(f"  {'eps':>4s} {'lin err/se':>10s} {'cov lin':>7s} {'logit err/se':>12s} {'cov logit':>9s} "
          f"{'F rel err':>9s} {'cov F':>6s} {'eig err':>8s} {'cov eig':>7s} {'inertia rel':>11s} {'cov inert':>9s}")
    for r in rows:
        o = r["other_analyses"]
        if not o:
            continue

        def med(name, o=o):
            return f"{o[name]['median']:.3g}" if name in o else "—"

        def cov(name, o=o):
            return f"{o[name]['coverage']:.3f}" if name in o else "—"

        print(f"  {r['epsilon']:4.1f} {med('linear_error_in_se'):>10s} {cov('cover_linear'):>7s} "
              f"{med('logistic_error_in_se'):>12s} {cov('cover_logistic'):>9s} {med('anova_f_relative_error'):>9s} "
              f"{cov('cover_anova_f'):>6s} {med('pca_eigenvalue_error'):>8s} {cov('cover_pca_eigenvalue'):>7s} "
              f"{med('kmeans_inertia_relative_error'):>11s} {cov('cover_kmeans_inertia'):>9s}")
    print("  (err/se: median |DP − non-DP| in the non-DP standard errors; rel err: median relative error; eig err: "
          "median absolute error of the correlation-matrix eigenvalues)")
    if flower:
        gaps = [(b["epsilon_spent"] - b["epsilon_planned"]) / b["epsilon_planned"] for b in flower["budget"].values()]
        print(f"flower DP run (eps 1, all analyses): {flower['seconds']:.0f} s, queries {flower['queries']}, "
              f"spent - planned (relative) {min(gaps):+.1e} .. {max(gaps):+.1e}, "
              f"'not estimable' cells in analytics.md {flower['not_estimable_in_report']}")


def main_dp_accuracy(args: argparse.Namespace) -> None:
    """``--dp-accuracy``: generate the clinics, run the cases, print the table, write the JSON."""
    load = os.getloadavg()
    start = time.perf_counter()
    frames = make_sites(args.sites, args.rows)
    rows = case_dp_accuracy(frames, args.repeats)
    flower = case_flower_dp(frames) if args.flower else None
    print(f"{args.sites} sites, {sum(len(f) for f in frames.values())} episodes "
          f"({', '.join(str(len(f)) for f in frames.values())}); {args.repeats} noise seeds per row; in process "
          "(site + server code, no Flower messaging)")
    print_dp_accuracy(rows, flower)
    out = args.out if args.out != ROOT / "benchmarks" / "results" / "analytics.json" else \
        ROOT / "benchmarks" / "results" / "analytics_dp.json"
    report = {"date": dt.date.today().isoformat(), "seconds": time.perf_counter() - start,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "load_average_at_start": load},
              "command": f"python benchmarks/analytics.py --dp-accuracy --sites {args.sites} --rows {args.rows} "
                         f"--repeats {args.repeats}" + ("" if args.flower else " --no-flower"),
              "rows_per_site": {n: len(f) for n, f in frames.items()}, "results": rows, "flower": flower}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _notes(name: str, r: dict) -> str:
    """One line of notes for the printed table."""
    if name == "in_process":
        return f"Lloyd {r['lloyd_iterations']} iterations, Newton {r['newton_iterations']}"
    if name == "in_process_dp":
        return f"sigma {r['sigma']:.2f}, max eps spent {r['epsilon_spent_max']:.3f}"
    if name == "pooled":
        return f"max rel. diff. federated vs pooled {max(r['max_relative_difference'].values()):.1e}"
    return f"queries {r['query_seconds']:.1f} s, start-up + site check {r['startup_and_site_check_s']:.1f} s"


def main() -> None:
    """Run the cases, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rows", type=int, default=10_000, help="Episodes per site (approximately).")
    parser.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analytics.json")
    parser.add_argument("--dp-accuracy", action="store_true", help="Measure the DP output's honesty (issue 19).")
    parser.add_argument("--repeats", type=int, default=40, help="Noise seeds per (analyses, ε) with --dp-accuracy.")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr"))
    if args.dp_accuracy:
        main_dp_accuracy(args)
        return
    load = os.getloadavg()

    start = time.perf_counter()
    frames = make_sites(args.sites, args.rows)
    results = {"generate": {"seconds": time.perf_counter() - start,
                            "rows_per_site": {name: len(f) for name, f in frames.items()}}}
    results["in_process"], federated = case_in_process(frames)
    results["in_process_dp"] = case_in_process_dp(frames)
    results["pooled"] = case_pooled(frames, federated)
    if args.flower:
        results["flower"] = case_flower(frames)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    total_rows = sum(results["generate"]["rows_per_site"].values())
    print(f"{args.sites} sites, {total_rows} episodes ({total_rows / args.sites:.0f} per site)")
    print(f"{'case':16s} {'seconds':>8s} {'queries':>8s}  notes")
    for name in ("in_process", "in_process_dp", "pooled", "flower"):
        if name not in results:
            continue
        r = results[name]
        print(f"{name:16s} {r['seconds']:8.2f} {r.get('queries', ''):>8}  {_notes(name, r)}")
    print(f"{'per query (in process)':28s} {'queries':>8s} {'seconds':>8s}")
    for query, t in results["in_process"]["timing"].items():
        print(f"{query:28s} {t['queries']:8d} {t['seconds']:8.3f}")
    report = {
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_at_start": load},
        "command": "python benchmarks/analytics.py" + ("" if args.flower else " --no-flower")
                   + (f" --sites {args.sites}" if args.sites != 10 else "")
                   + (f" --rows {args.rows}" if args.rows != 10_000 else ""),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
