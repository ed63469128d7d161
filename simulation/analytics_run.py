"""The one-command federated analytics run (``fednano analytics``): the seed's statistics without moving rows.

1. Sites: simulated clinics (``simulation.clinics.generate_sites`` into ``OUT/sites``; ``--dp`` writes a DP
   budget into their ``site.toml``) or the user's site folders / CSV files (``--sites``, ``--task``), whose
   ``site.toml`` decides their DP, as at a hospital.
2. Federation: the ServerApp of ``server.analytics_phase`` and a ClientApp with the ``client.analytics`` handlers
   run in Flower's simulation runtime, one SuperNode per site; the server writes ``OUT/analytics.json``.
3. Report: ``OUT/analytics.md`` (tables), CSV tables (``describe.csv``, ``regression_<kind>_<outcome>.csv``,
   ``anova.csv``, ``pca.csv``, ``kmeans_profiles.csv``) and ``OUT/pca_clusters.png``: the cluster centroids on
   the first two principal components over a 2-D histogram of the projected rows, computed at each site and
   summed — no row is plotted.

:func:`run_in_process` runs the same server phases against in-memory site tables without Flower (the same
``client.analytics.answer`` each site runs), for tests and benchmarks.

Sources: Chan, Golub & LeVeque 1979 (merging moments); Karr et al. 2005 (regression from sufficient
statistics); Lloyd 1982 (k-means); Rousseeuw 1987 (silhouette); Dwork & Roth 2014 and Mironov 2017
(Gaussian mechanism, Rényi DP) — see ``client.analytics`` and ``server.analytics_phase``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Context, RecordDict

from client.analytics import answer, release_weights
from client.dp import PhaseRelease, PrivacyRefused, SiteDP
from client.ledger import BudgetExhausted, LedgerError
from client.site import SiteSource
from server.analytics_phase import AnalyticsSession, SiteAnswer, run_analyses
from server.analytics_plan import ANALYSES, AnalyticsSettings, chosen_analyses, plan_for
from shared import dp_error
from shared.protocol.messages import MessageName
from shared.protocol.privacy import RELEASES
from shared.protocol.records import SITE_NAME
from simulation.clinics import SIMULATED_STATE_DIR, SitePrivacy, generate_sites


class LocalSites:
    """An in-process asker: each "site" is a table (and, under DP, its privacy terms) in this process.

    ``LocalSites({"a": frame_a, "b": frame_b}, dps={"a": SiteDP(ledger, shares)})(query, config, arrays,
    ["a", "b"])`` answers with exactly the code a Flower site runs (``client.analytics.answer`` through the
    site's ``analytics`` release), each site keeping its own node state for the run as a Flower node does.
    """

    def __init__(self, frames: Mapping[str, pd.DataFrame], dps: Mapping[str, SiteDP | None] | None = None,
                 rng: np.random.Generator | None = None, run_id: int = 0):
        """Keep the site tables, their DP terms, the noise generator and the run id."""
        self.frames = dict(frames)
        self.dps = dict(dps or {})
        self.rng = rng
        self.contexts = {site: Context(run_id=run_id, node_id=i, node_config={}, state=RecordDict(), run_config={})
                         for i, site in enumerate(self.frames)}

    def release(self, site: str, config: dict[str, Any]) -> PhaseRelease | None:
        dp = self.dps.get(site)
        if dp is None:
            return None
        release = PhaseRelease.for_phase(self.contexts[site], dp, "analytics", releases=int(config[RELEASES]),
                                         weights=release_weights(config))
        if self.rng is not None:
            release.rng = self.rng
        return release

    def __call__(self, query: MessageName, config: dict[str, Any], arrays: dict[str, np.ndarray],
                 sites: Sequence[Hashable]) -> dict[Hashable, SiteAnswer | str]:
        """Answer ``query`` at every site in ``sites``; failures as their reason."""
        out: dict[Hashable, SiteAnswer | str] = {}
        for site in sites:
            try:
                result = answer(query.action, self.frames[site], config, arrays, self.release(site, config))
            except (PrivacyRefused, BudgetExhausted, LedgerError, KeyError, ValueError) as err:
                out[site] = f"{site}: {err}"
                continue
            out[site] = SiteAnswer(str(site), result.arrays, result.labels, {SITE_NAME: str(site), **result.meta})
        return out


def run_in_process(frames: Mapping[str, pd.DataFrame], settings: AnalyticsSettings | None = None,
                   dps: Mapping[str, SiteDP | None] | None = None,
                   rng: np.random.Generator | None = None) -> dict[str, Any]:
    """All analyses on in-memory site tables, without Flower: same site code, same server code.

    As in the Flower run (``server.analytics_phase.run_analytics_federation``) the sites decide DP: if any site
    in ``frames`` has DP terms in ``dps``, the run is planned for DP (the ``dp_*`` iteration caps, columns with
    declared ranges, every announced query asked), whatever ``settings.dp`` says.
    """
    settings = settings or AnalyticsSettings()
    if not settings.dp and any((dps or {}).get(site) is not None for site in frames):
        settings = replace(settings, dp=True)
    plan = plan_for(settings.task(), settings.dp)
    declared = {site: None if (dps or {}).get(site) is not None else float(len(frame))  # as the site check's
                for site, frame in frames.items()}                                     # n_episodes (none at DP sites)
    session = AnalyticsSession(LocalSites(frames, dps, rng), list(frames), plan.queries(settings),
                               schedule=plan.schedule(settings), declared=declared)
    result = run_analyses(session, plan, settings)
    result["sites"] = sorted(frames)
    result["rejected"] = {}
    return result


def prepare_sites(out: Path, clinics: int | None, sites: Sequence[Path] | None, task: Path | None, dp: bool,
                  seed: int, epsilon: float, site_budget: float | None, delta: float,
                  patients_per_clinic: int | None) -> list[SiteSource]:
    """The run's sites: the user's, or freshly simulated clinics under ``out/sites``."""
    if sites:
        from simulation.experiment import distinct_sites

        return distinct_sites([SiteSource(Path(p), Path(task) if task else None) for p in sites])
    if not clinics:
        raise ValueError("give --clinics N or --sites PATH ...")
    budget = site_budget if site_budget is not None else epsilon
    world = generate_sites(clinics, seed, out / "sites", patients_per_clinic,
                           SitePrivacy(dp=dp, epsilon=budget, delta=delta,
                                       shares=(("analytics", min(1.0, epsilon / budget)),)))
    heads = out / "sites" / SIMULATED_STATE_DIR
    return [SiteSource(out / "sites" / c.name, state_dir=heads) for c in world.clinics]


def run_federated_analytics(sources: list[SiteSource], settings: AnalyticsSettings, out: Path) -> dict[str, Any]:
    """The ServerApp and ClientApp in Flower's simulation runtime; returns ``out/analytics.json``."""
    from client.app import make_client_app
    from server.analytics_phase import make_analytics_server_app
    from simulation.flower_runtime import simulate

    client = make_client_app(sources)
    path = out / "analytics.json"
    path.unlink(missing_ok=True)
    simulate(make_analytics_server_app(settings, out), client, num_supernodes=len(sources))
    if not path.exists():
        raise RuntimeError(f"the analytics run wrote no {path}; see the log above")
    return json.loads(path.read_text())


def run_analytics(out: Path | str, clinics: int | None = None, sites: Sequence[Path | str] | None = None,
                  task: Path | str | None = None, dp: bool = False, k: int = 3, seed: int = 0, epsilon: float = 1.0,
                  *, site_budget: float | None = None, delta: float = 1e-5, patients_per_clinic: int | None = None,
                  on_phase: Callable[[str], None] | None = None, quiet: bool = True,
                  analyses: str = ",".join(ANALYSES), secure_sum: str = "pairwise") -> dict[str, Any]:
    """``fednano analytics``: sites → Flower federation → ``analytics.json``, ``analytics.md``, CSVs, plot.

    Parameters
    ----------
    out : path
        Output folder (generated sites go to ``out/sites``).
    clinics : int, optional
        Simulate this many clinics (ignored with ``sites``).
    sites : paths, optional
        Site folders or CSV files.
    task : path, optional
        task.toml of a generic tabular task (with ``sites``).
    dp : bool
        Generated sites enable DP in their site.toml; the run uses the short, fixed DP iteration caps.
    k, seed : int
        k-means clusters; seed of the simulated world and of the initial centroids' phase.
    epsilon : float
        ε generated DP sites grant this run (their ``[privacy.shares] analytics`` is ``epsilon / site_budget``);
        a site of your own decides its share itself.
    site_budget, delta : float
        Budget and δ written into generated sites (default budget: ``epsilon``).
    patients_per_clinic : int, optional
        Size of every generated clinic (default: tens to hundreds of patients, as ``simulate-data``).
    on_phase : callable, optional
        Told ``"sites"``, ``"federation"``, ``"report"`` as the run moves on (progress displays).
    quiet : bool
        Keep Flower's log to errors (``simulation.experiment.quiet_flower``).
    analyses : str
        Comma-separated analyses to run (``server.analytics_plan.ANALYSES``, default all); the run's ε is split
        over them (``BUDGET_RULE``), the others spend nothing.

    Returns the content of ``out/analytics.json``.
    """
    from simulation.experiment import flower_environment, quiet_flower

    chosen_analyses(analyses)  # a bad name fails before any site is made
    say = on_phase or (lambda _: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flower_environment(out)
    if quiet:
        quiet_flower()
    say("sites")
    sources = prepare_sites(out, clinics, [Path(s) for s in sites] if sites else None,
                            Path(task) if task else None, dp, seed, epsilon, site_budget, delta, patients_per_clinic)
    settings = AnalyticsSettings(k=k, seed=seed, dp=dp, task_path=str(task) if task else "",
                                 min_nodes=len(sources), analyses=analyses, secure_sum=secure_sum)
    say("federation")
    result = run_federated_analytics(sources, settings, out)
    say("report")
    write_report(out, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Tables and plot


DESCRIBE_STATISTICS = ("count", "mean", "sd", "p01", "p25", "p50", "p75", "p99")


def describe_table(result: dict) -> pd.DataFrame:
    """One row per column: count, mean, sd, min, max and the histogram quantiles. Under DP each statistic also
    has its noise sd, 95 % interval and ``<stat>_estimable``; a number not estimable is left empty (its
    ``<stat>_note`` says at which ε it would be)."""
    rows = []
    for column, s in result.get("describe", {}).items():
        quantiles = s.get("quantiles") or {}
        row = {"column": column, "count": s["count"], "mean": s["mean"], "sd": s["sd"], "min": s["min"],
               "max": s["max"], **{k: quantiles.get(k) for k in ("p01", "p25", "p50", "p75", "p99")}}
        for stat, noise in (s.get("noise") or {}).items():
            ci = noise["ci95"] or [None, None]
            row |= {f"{stat}_noise_sd": noise["noise_sd"], f"{stat}_ci95_low": ci[0], f"{stat}_ci95_high": ci[1],
                    f"{stat}_estimable": noise["estimable"], f"{stat}_note": not_estimable_text(noise)}
            if not noise["estimable"]:
                row[stat] = None
        rows.append(row)
    return pd.DataFrame(rows)


def not_estimable_text(noise: dict) -> str | None:
    """'not estimable at ε = 1 (estimable at ε ≈ 3.2)' for a DP number that is not estimable, else None."""
    if noise["estimable"]:
        return None
    needed = noise.get("epsilon_needed")
    return (f"not estimable at ε = {_fmt(noise['epsilon'])}"
            + (f" (estimable at ε ≈ {_fmt(needed)})" if needed is not None else ""))


def shown(value: Any, noise: dict | None) -> str:
    """A released number as the report shows it: plain without DP; under DP with its 95 % interval, or the
    'not estimable at ε = …' text."""
    if noise is None:
        return _fmt(_plain(value))
    if not noise["estimable"]:
        return not_estimable_text(noise)
    low, high = noise["ci95"]
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def describe_display(result: dict) -> pd.DataFrame:
    """The descriptive table as the report shows it (under DP: intervals or 'not estimable', see :func:`shown`)."""
    rows = []
    for column, s in result.get("describe", {}).items():
        noise = s.get("noise") or {}
        values = {"count": s["count"], "mean": s["mean"], "sd": s["sd"], **(s.get("quantiles") or {})}
        row = {"column": column, **{stat: shown(values.get(stat), noise.get(stat)) for stat in ("count", "mean", "sd")}}
        if not noise:
            row |= {"min": _fmt(_plain(s["min"])), "max": _fmt(_plain(s["max"]))}
        row |= {stat: shown(values.get(stat), noise.get(stat)) for stat in ("p01", "p25", "p50", "p75", "p99")}
        rows.append(row)
    return pd.DataFrame(rows)


def coefficient_frame(fit: dict) -> pd.DataFrame:
    """One row per term of a fitted regression (under DP: ``se`` includes the DP noise, split into
    ``se_sampling`` and ``se_dp_noise``, with the 95 % interval)."""
    rows = []
    for term, row in fit["coefficients"].items():
        values = {k: v for k, v in row.items() if k not in ("aliased", "ci95")}
        if row.get("ci95"):
            values |= {"ci95_low": row["ci95"][0], "ci95_high": row["ci95"][1]}
        rows.append({"term": term, **values, "aliased": row.get("aliased")})
    return pd.DataFrame(rows)


def anova_frame(anova: dict) -> pd.DataFrame:
    """One row per group, then the F test as the last row (under DP the group means and sds with their noise
    sd and 95 % interval; F with its noise sd)."""
    rows = []
    for g, s in anova["groups"].items():
        row = {"group": g, "n": s["n"], "mean": s["mean"], "sd": s["sd"]}
        for stat, noise in (s.get("noise") or {}).items():
            ci = noise["ci95"] or [None, None]
            row |= {f"{stat}_noise_sd": noise["noise_sd"], f"{stat}_ci95_low": ci[0], f"{stat}_ci95_high": ci[1],
                    f"{stat}_estimable": noise["estimable"]}
        rows.append(row)
    rows.append({"group": "(F test)", "n": anova["n"], "f": anova["f"], "p": anova["p"],
                 "df_between": anova["df_between"], "df_within": anova["df_within"],
                 "eta_squared": anova["eta_squared"], "f_noise_sd": anova.get("f_noise_sd")})
    return pd.DataFrame(rows)


def anova_display(anova: dict) -> pd.DataFrame:
    """The ANOVA's groups as the report shows them (under DP: intervals or 'not estimable')."""
    return pd.DataFrame([{"group": g, **{stat: shown(s[stat], (s.get("noise") or {}).get(stat if stat != "n" else
                                                                                         "count"))
                                         for stat in ("n", "mean", "sd")}}
                         for g, s in anova["groups"].items()])


def pca_frame(pca: dict) -> pd.DataFrame:
    """One row per component: eigenvalue, explained-variance ratio, loadings."""
    ratios = pca.get("explained_variance_ratio") or [None] * len(pca["eigenvalues"])
    return pd.DataFrame([{"component": f"PC{i + 1}", "eigenvalue": value, "explained_variance_ratio": ratio,
                          **dict(zip(pca["features"], loadings, strict=True))}
                         for i, (value, ratio, loadings) in enumerate(zip(pca["eigenvalues"], ratios,
                                                                          pca["components"], strict=True))])


def profiles_frame(kmeans: dict) -> pd.DataFrame:
    """One row per cluster: size, share, silhouette, feature means (original scale), outcome means."""
    rows = []
    for profile in kmeans["profiles"]:
        row = {"cluster": profile["cluster"], "n": profile["n"], "share": profile["share"],
               "silhouette": profile["silhouette"], **profile["means"]}
        row |= {f"{name}_mean": o["mean"] for name, o in profile["outcomes"].items()}
        for name, o in profile["outcomes"].items():
            if o.get("noise"):
                row |= {f"{name}_mean_noise_sd": o["noise"]["noise_sd"],
                        f"{name}_mean_estimable": o["noise"]["estimable"]}
        for name, noise in (profile.get("noise") or {}).items():
            row |= {f"{name}_noise_sd": noise["noise_sd"], f"{name}_estimable": noise["estimable"]}
        rows.append(row)
    return pd.DataFrame(rows)


def profiles_display(kmeans: dict) -> pd.DataFrame:
    """The cluster profiles as the report shows them (under DP: intervals or 'not estimable')."""
    rows = []
    for profile in kmeans["profiles"]:
        noise = profile.get("noise") or {}
        row = {"cluster": profile["cluster"], "n": _fmt(_plain(profile["n"])), "share": _fmt(_plain(profile["share"])),
               "silhouette": _fmt(_plain(profile["silhouette"]))}
        row |= {name: shown(value, noise.get(name)) for name, value in profile["means"].items()}
        row |= {f"{name}_mean": shown(o["mean"], o.get("noise")) for name, o in profile["outcomes"].items()}
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(out: Path, result: dict) -> None:
    """``analytics.md``, the CSV tables and ``pca_clusters.png`` from an ``analytics.json`` result."""
    out = Path(out)
    tables: list[tuple[str, pd.DataFrame]] = []
    describe = describe_table(result)
    if not describe.empty:
        describe.to_csv(out / "describe.csv", index=False)
        tables.append(("Descriptive statistics (all rows of every site; sd with n − 1; quantiles interpolated in "
                       "the summed histogram on the declared range" + ("; under DP each number with its 95 % "
                                                                       "interval for the noise" if _dp(result)
                                                                       else "") + ")", describe_display(result)))
    regression = result.get("regression") or {}
    for kind in ("linear", "logistic"):
        for outcome, fit in (regression.get(kind) or {}).items():
            frame = coefficient_frame(fit)
            frame.to_csv(out / f"regression_{kind}_{outcome}.csv", index=False)
            extra = (f"n = {fit['n']}, R² = {_fmt(fit.get('r2'))}, F = {_fmt(fit.get('f'))} "
                     f"(p = {_fmt(fit.get('f_p'))})" if kind == "linear" else
                     f"n = {fit['n']}, Newton iterations = {fit['iterations']}, converged = {fit['converged']}")
            tables.append((f"{kind.capitalize()} regression of {outcome} ({fit['scale']}; {extra})", frame))
    if result.get("anova"):
        anova = anova_frame(result["anova"])
        anova.to_csv(out / "anova.csv", index=False)
        a = result["anova"]
        f_noise = f" (noise sd {_fmt(a['f_noise_sd'])})" if a.get("f_noise_sd") is not None else ""
        tables.append((f"One-way ANOVA of {a['response']} across {a['factor']}: F({_fmt(a['df_between'])}, "
                       f"{_fmt(a['df_within'])}) = {_fmt(a['f'])}{f_noise}, p = {_fmt(a['p'])}, "
                       f"η² = {_fmt(a['eta_squared'])}", anova_display(a)))
    if result.get("pca"):
        pca = pca_frame(result["pca"])
        pca.to_csv(out / "pca.csv", index=False)
        noise = result["pca"].get("noise")
        if noise:
            pca["eigenvalue_noise_sd"] = noise["eigenvalues_noise_sd"]
            pca["explained_variance_ratio_noise_sd"] = noise["explained_variance_ratio_noise_sd"]
        tables.append((f"PCA ({result['pca']['basis']}" + ("; noise sds by a parametric bootstrap of the DP noise"
                                                           if noise else "") + ")", pca))
    if result.get("kmeans"):
        km = result["kmeans"]
        profiles = profiles_frame(km)
        profiles.to_csv(out / "kmeans_profiles.csv", index=False)
        noise = km.get("noise", {})
        inertia_sd = f" (noise sd {_fmt(noise['inertia']['noise_sd'])})" if noise.get("inertia") else ""
        silhouette_sd = (f" (noise sd {_fmt(noise['silhouette_simplified']['noise_sd'])})"
                         if noise.get("silhouette_simplified") else "")
        tables.append((f"k-means profiles (k = {km['k']}, {km['iterations']} Lloyd iterations, converged = "
                       f"{km['converged']}, inertia = {_fmt(km['inertia'])}{inertia_sd}, simplified silhouette = "
                       f"{_fmt(km['silhouette_simplified'])}{silhouette_sd}; feature means on the original scale)",
                       profiles_display(km)))
        plot_clusters(out / "pca_clusters.png", result)
    text = markdown(result, tables)
    if _dp(result) and plot_error_vs_epsilon(out / "dp_error_vs_epsilon.png", result):
        text += ("\n## Error against ε\n\n![noise sd of each describe statistic against ε](dp_error_vs_epsilon.png)"
                 "\n\nNoise sd of each describe mean, sd and median as a share of its declared range, at other ε "
                 f"per site for the same analyses (sd ∝ 1/ε); below the dashed line a number is estimable "
                 f"(95 % interval within {dp_error.ESTIMABLE_WIDTH_SHARE:g} of the range). Affordable per site: "
                 f"ε ≈ {_fmt(affordable_epsilon(result))}.\n")
    (out / "analytics.md").write_text(text)


def markdown(result: dict, tables: list[tuple[str, pd.DataFrame]]) -> str:
    """The report: sites, privacy, every table, and what was skipped or failed."""
    lines = ["# Federated analytics", "",
             f"Sites: {', '.join(result.get('sites', []))}. Rows: {result.get('rows', '')}. Queries asked: "
             f"{result['queries']['asked']} (planned {result['queries']['planned']}). Analyses: "
             f"{', '.join(result.get('analyses', []))}"
             + (f" (not chosen, nothing spent: {', '.join(result['not_chosen'])})" if result.get("not_chosen") else "")
             + ".", ""]
    lines += privacy_summary(result)
    for title, frame in tables:
        lines += [f"## {title}", "", _markdown_table(frame), ""]
    if result.get("kmeans"):
        lines += ["![clusters on the first two principal components](pca_clusters.png)", ""]
    privacy = result.get("privacy") or {}
    if any(p.get("dp") for p in privacy.values()):
        lines += ["## Privacy", "", "| site | σ | ε spent (ledger, all time) | budget | δ |", "|---|---|---|---|---|"]
        lines += [f"| {site} | {_fmt(p.get('sigma'))} | {_fmt(p.get('epsilon-spent'))} | "
                  f"{_fmt(p.get('epsilon-budget'))} | {_fmt(p.get('delta'))} |"
                  for site, p in privacy.items() if p.get("dp")]
        lines += ["", "Under DP, min and max are not released; regression standard errors and p-values include the "
                  "DP noise (`se_dp_noise`, delta method), next to the sampling part (`se_sampling`).", ""]
    if result.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {name}: {why}" for name, why in result["skipped"].items()] + [""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    if result.get("failures"):
        lines += ["## Sites left out", ""]
        lines += [f"- {query}: {site} — {reason}" for query, failed in result["failures"].items()
                  for site, reason in failed.items()]
    return "\n".join(lines) + "\n"


def _dp(result: dict) -> bool:
    """Whether any site answered with DP."""
    return any(p.get("dp") for p in (result.get("privacy") or {}).values())


def privacy_summary(result: dict) -> list[str]:
    """The report's opening on privacy: which sites answered with DP, ε planned against spent per site and per
    analysis, and what the intervals and "not estimable" mean."""
    privacy = result.get("privacy") or {}
    dp_sites = [site for site, p in privacy.items() if p.get("dp")]
    if not dp_sites:
        return ["No site answered with DP: every number is exact on the sites' pooled rows.", ""]
    budget = result.get("budget") or {}
    analyses = list(budget.get("analyses") or {})
    lines = [f"**Sites that answered with DP: {', '.join(dp_sites)}.** Their numbers carry Gaussian noise: each is "
             "shown with its 95 % interval for the noise (noise sd from the mechanisms' known σ, "
             "`shared.dp_error`), and a number whose interval is wider than "
             f"{dp_error.ESTIMABLE_WIDTH_SHARE:g} of its column's declared range, or that hit a bound, is shown as "
             "\"not estimable at ε = …\" with the ε that would make it estimable (noise sd ∝ 1/ε).", "",
             f"Budget rule: {budget.get('rule', '')}.", "",
             "| site | ε planned | ε spent | ε left in ledger | " + " | ".join(f"spent on {a}" for a in analyses)
             + " |", "|" + "---|" * (4 + len(analyses))]
    for site, b in (budget.get("sites") or {}).items():
        by = b.get("epsilon_spent_by_analysis", {})
        lines.append(f"| {site} | {_fmt(b['epsilon_planned'])} | {_fmt(b['epsilon_spent'])} | "
                     f"{_fmt(b['epsilon_left_in_ledger'])} | " + " | ".join(_fmt(by.get(a, 0.0)) for a in analyses)
                     + " |")
    return lines + [""]


ERROR_PLOT_STATISTICS = ("mean", "sd", "p50")


def affordable_epsilon(result: dict) -> float | None:
    """The largest ε per site a rerun of this run could spend: what every DP site had for it (spent in this run +
    left in its ledger), the smallest over sites; None without DP."""
    sites = (result.get("budget") or {}).get("sites") or {}
    values = [b["epsilon_spent"] + b["epsilon_left_in_ledger"] for b in sites.values()]
    return min(values) if values else None


def error_curves(result: dict, epsilons: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per describe statistic and column: the noise sd as a share of the declared range at each ε, scaled from
    this run's (noise sd ∝ 1/ε, ``shared.dp_error``); only columns with a finite noise sd."""
    bounds = (result.get("plan") or {}).get("bounds") or {}
    curves: dict[str, dict[str, np.ndarray]] = {stat: {} for stat in ERROR_PLOT_STATISTICS}
    for column, stats in (result.get("describe") or {}).items():
        width = dp_error.range_width(bounds.get(column, (math.nan, math.nan)))
        for stat in ERROR_PLOT_STATISTICS:
            noise = (stats.get("noise") or {}).get(stat)
            if noise and noise["noise_sd"] is not None and math.isfinite(noise["noise_sd"]) and math.isfinite(width):
                curves[stat][column] = noise["noise_sd"] * noise["epsilon"] / epsilons / width
    return curves


def plot_error_vs_epsilon(path: Path, result: dict) -> bool:
    """Noise sd of each describe mean, sd and median (share of the declared range) against the run's ε per site,
    from a quarter of this run's ε to what the sites can afford (:func:`affordable_epsilon`), with the
    estimability limit and this run's ε marked. Computed from the released noise sds alone. False if there is
    nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    now = next((n["epsilon"] for s in (result.get("describe") or {}).values()
                for n in (s.get("noise") or {}).values() if math.isfinite(n.get("epsilon", math.nan))), None)
    if now is None:
        return False
    top = max(affordable_epsilon(result) or now, now)
    epsilons = np.geomspace(now / 4, max(top, 2 * now), 60)
    curves = error_curves(result, epsilons)
    limit = dp_error.ESTIMABLE_WIDTH_SHARE / (2 * dp_error.Z95)
    fig, axes = plt.subplots(1, len(ERROR_PLOT_STATISTICS), figsize=(13, 4.2), sharey=True)
    titles = {"mean": "mean", "sd": "standard deviation", "p50": "median"}
    for ax, stat in zip(axes, ERROR_PLOT_STATISTICS, strict=True):
        for column, curve in curves[stat].items():
            ax.plot(epsilons, 100 * curve, lw=0.9, alpha=0.7, label=column)
        ax.axhline(100 * limit, color="black", ls="--", lw=1)
        ax.axvline(now, color="tab:red", lw=1)
        if top > now:
            ax.axvline(top, color="tab:green", lw=1, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 50) if epsilons[0] <= t <= epsilons[-1]]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(titles[stat])
        ax.set_xlabel("ε per site for this run")
    axes[0].set_ylabel("noise sd, % of the declared range")
    fig.suptitle("Error of each describe statistic against ε (noise sd ∝ 1/ε). Dashed: estimable below; red: this "
                 "run's ε; green: what the sites can afford", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_clusters(path: Path, result: dict) -> None:
    """Centroids on PC1/PC2 over the summed 2-D histogram of projected rows (no row is plotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter

    projection = result["kmeans"]["projection"]
    counts = np.asarray(projection["counts"], dtype=np.float64)
    ratio = result["pca"].get("explained_variance_ratio") or [float("nan")] * 2
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    masked = np.ma.masked_less_equal(counts.T, 0.0)
    if masked.count():
        mesh = ax.pcolormesh(projection["x_edges"], projection["y_edges"], masked, cmap="Greys",
                             norm=LogNorm(vmin=max(masked.min(), 1e-3), vmax=masked.max()))
        bar = fig.colorbar(mesh, ax=ax, label="rows per cell (summed over sites)")
        plain = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "125" else "")
        bar.ax.yaxis.set_major_formatter(plain)
        bar.ax.yaxis.set_minor_formatter(plain)
    centroids = np.asarray(projection["centroids"], dtype=np.float64)
    colours = plt.cm.tab10(np.arange(len(centroids)) % 10)
    ax.scatter(centroids[:, 0], centroids[:, 1], s=160, c=colours, edgecolors="black", marker="X", zorder=3)
    for c, (px, py) in enumerate(centroids):
        share = result["kmeans"]["profiles"][c]["share"]
        ax.annotate(f"cluster {c} ({share:.0%})", (px, py), textcoords="offset points",
                    xytext=(8, 8 if c % 2 == 0 else -16))
    ax.set_xlabel(f"PC1 ({_fmt(ratio[0] * 100 if ratio[0] is not None else None)} % of variance)")
    ax.set_ylabel(f"PC2 ({_fmt(ratio[1] * 100 if len(ratio) > 1 and ratio[1] is not None else None)} % of variance)")
    ax.set_title("k-means centroids on the federated PCA\n(grey: projected rows counted at each site, summed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: Any) -> str:
    """A number as short text for tables (4 significant digits; '—' for missing)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    """A data frame as a GitHub markdown table."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(_fmt(_plain(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _plain(value: Any) -> Any:
    """A numpy scalar as a Python value, NaN as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
