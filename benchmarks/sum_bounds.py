"""Benchmark of the feasibility checks of summed releases (``shared.sum_bounds``, ``shared.analytics_bounds``):
honest refusals, attacks caught, residue.

    python benchmarks/sum_bounds.py [--worlds 5] [--clinics 5] [--draws 200] [--analytics-worlds 3]
                                    [--analytics-draws 4] [--hist-worlds 3] [--hist-rounds 3] [--hist-draws 2]
                                    [--fit-worlds 3] [--fit-draws 2] [--sections statistics,analytics,hist,fits]
                                    [--out FILE.json]

``--sections`` runs only those parts; the JSON then keeps the other parts of an existing ``--out`` as they were.

For ``--worlds`` simulated worlds of ``--clinics`` clinics each (``simulation.clinics``, 60 patients per
clinic), every clinic's federated statistics are computed by the site's own code (``SiteStatistics.from_frame``,
and under DP ``client.statistics.private_statistics`` with the real Gaussian release of ``client.dp`` at noise
sd σ per count) and laid out as the secure sum lays them out (``shared.statistics_vector``). Then:

1. honest refusals: ``--draws`` noise draws per world and σ in {1, 5, 20}, half the clinics under DP, checked
   summed (what a masked run checks) and per site (what ``secure-sum = off`` checks); target 0;
2. attacks caught: the largest clinic reports every numeric column's sum × FACTOR (``--attack SITE:inflate``,
   exact statistics) for several factors; the share of worlds where the masked sum is refused and where the
   site, checked alone, is dropped;
3. the largest shift of an encoder mean (in units of the column's declared range) an attacker within its
   allowance achieves: per site (off), every value of the column at the top of the range, against the stated
   bound C_a / C (its share of the column's values); under masks, the pooled sum set to C × the top of the
   range (what a sum check cannot tell from honest), against its bound (hi − pooled mean) / (hi − lo).

Then the federated analytics (``shared.analytics_bounds``, every query of describe, regression, ANOVA, PCA,
k-means) for ``--analytics-worlds`` worlds of ``--clinics`` clinics, every analysis run in process by the sites'
own code (``simulation.analytics_run``): each site's answer checked alone (``secure-sum = off``) and the sites'
answers summed as the secure sum gives them (blocks and exact sums only, ANOVA laid out by the union of the
groups) and checked as one, without DP and with half the clinics under DP (``--analytics-draws`` noise draws
per world, ε = 3 each):

4. honest refusals: sites dropped (alone) and analyses refused (summed), target 0;
5. attacks caught: the largest clinic multiplies every released sum that is not a row count by FACTOR
   (``simulation.attacks.inflated_analytics``); the share of worlds where it is dropped (alone) and where an
   analysis is refused (summed), and which query caught it first.

Then histogram boosting (``shared.hist_bounds``) for ``--hist-worlds`` worlds of ``--clinics`` clinics: the real
server phase (``server.hist_phase``: ranges, bins, ``--hist-rounds`` rounds of every head of the built-in task,
depth 3) over the clinics' real ``query.hist_*`` handlers in process (an in-process Grid, as
``benchmarks/federated_hist_scale.py``), secure sum off (each site's release checked alone), pairwise masks (the
sum checked), and pairwise with half the clinics under DP (ε = 3 each, ``--hist-draws`` draws):

6. honest refusals: sites dropped (off) and heads stopped (masked), target 0, over every checked release;
7. attacks caught: the largest clinic multiplies its gradient and hessian histograms by FACTOR
   (``simulation.attacks.inflated_hist``): the share of worlds where it is dropped (off) and where the heads are
   stopped (masked, and masked with DP), and the first release that caught it.

Then the dosing models' fits (``shared.fit_bounds``) for ``--fit-worlds`` worlds of ``--clinics`` clinics: the
real server phases (``server.dose_response_phase``: the structured models' Newton steps; ``server.adjustment_phase``:
fitted-Q iteration, 4 iterations) over the clinics' real handlers in process (``tests.handler_grid``), each site's
declared row count its episode table's:

8. honest refusals: sites dropped (off) and fits refused (masked: pairwise for the dose–response models, recovering
   for fitted-Q), without DP and, for fitted-Q, with half the clinics under DP (ε = 3, ``--fit-draws`` draws);
9. attacks caught: the largest clinic multiplies every fit sum but its row counts by FACTOR
   (``simulation.attacks.inflated_fit``): the share of worlds where it is dropped (off) and where the fit is refused
   (masked; for fitted-Q also with the attacker and half the clinics under DP), and which entry caught it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import MetricRecord as MetricRecordType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hist_grid import InProcessHistGrid  # noqa: E402

from client.analytics import describe  # noqa: E402
from client.dp import Block, SiteDP, gaussian_release, sensitivity  # noqa: E402
from client.ledger import PrivacyLedger  # noqa: E402
from client.secure_statistics import declared_layout  # noqa: E402
from client.statistics import private_statistics  # noqa: E402
from server.analytics_phase import AnalyticsSession, SiteAnswer, run_analyses  # noqa: E402
from server.analytics_plan import AnalyticsSettings, plan_for  # noqa: E402
from shared.bounds import declared_range  # noqa: E402
from shared.encoding import SiteStatistics  # noqa: E402
from shared.protocol import messages  # noqa: E402
from shared.protocol import records as r  # noqa: E402
from shared.protocol.privacy import ReleaseFacts  # noqa: E402
from shared.sum_bounds import Contributors, InfeasibleSum, check_statistics  # noqa: E402
from shared.task import NANOPARTICLE_TASK as TASK  # noqa: E402
from simulation.analytics_run import LocalSites, run_in_process  # noqa: E402
from simulation.attacks import FIRST_MOMENTS, inflated_analytics, inflated_fit, inflated_hist  # noqa: E402
from simulation.clinics import make_world, simulate_clinic  # noqa: E402

SIGMAS = (1.0, 5.0, 20.0)
FACTORS = (1.02, 1.1, 1.5, 2.0, 5.0, 10.0)


class Release:
    """The DP release of ``client.dp.PhaseRelease`` without its ledger: the same Gaussian noise, at noise sd σ."""

    def __init__(self, noise_sd: float, rng: np.random.Generator) -> None:
        self.noise_sd, self.rng = noise_sd, rng

    def release(self, blocks, index):
        sigma = self.noise_sd / sensitivity(blocks)
        return gaussian_release(blocks, sigma, self.rng), ReleaseFacts("statistics", index, sigma, self.noise_sd,
                                                                       0.0, 1.0, 1e-5)


def feasible(layout, vector, who) -> bool:
    try:
        check_statistics(layout, vector, TASK, who)
    except InfeasibleSum:
        return False
    return True


ANALYTICS_SETTINGS = AnalyticsSettings(k=2, seed=0, lloyd_iterations=10)
DESCRIBE = messages.ANALYTICS_DESCRIBE.action
NOT_SUMMED = ("min", "max", "raw-sum", "m2")
"""What a site answering through the secure sum does not send (``client.analytics.secure_arrays``)."""


class SummedSites(LocalSites):
    """The sites' answers summed as the secure sum gives them (``server.analytics_phase.SecureGridAsker``): one
    answer in :attr:`total`, per-group blocks laid out by the union of the sites' groups; no masking (the masks
    cancel exactly: ``tests/test_secure_analytics.py``)."""

    secure = True

    def __call__(self, query, config, arrays, sites):
        out = super().__call__(query, config, arrays, sites)
        answers = [a for a in out.values() if isinstance(a, SiteAnswer)]
        self.total, self.error = None, "no site answered"
        if not answers:
            return out
        groups = sorted({g for a in answers for g in a.labels.get("groups", [])})
        summed = {}
        for key in answers[0].arrays:
            if key in NOT_SUMMED:
                continue
            if groups:
                laid = np.zeros(len(groups))
                for a in answers:
                    for g, label in enumerate(a.labels["groups"]):
                        laid[groups.index(label)] += float(np.asarray(a.arrays[key]).ravel()[g])
                summed[key] = laid
            else:
                summed[key] = np.sum([np.asarray(a.arrays[key], dtype=np.float64) for a in answers], axis=0)
        dp = any(a.dp for a in answers)
        meta = {"dp": dp, "members": [a.site for a in answers]}
        if dp:
            meta["noise-sd"] = float(np.sqrt(sum(a.noise_sd ** 2 for a in answers)))
            meta["epsilon-planned"] = max(float(a.meta["epsilon-planned"]) for a in answers if a.dp)
        self.total = SiteAnswer(f"secure sum of {len(answers)} sites", summed,
                                {"groups": groups} if groups else {}, meta)
        return out


def analytics_run(frames, dps, rng, summed: bool) -> dict:
    """Every analysis in process: each site checked alone (``run_in_process``) or the summed answer checked."""
    if not summed:
        return run_in_process(frames, ANALYTICS_SETTINGS, dps=dps, rng=rng)
    settings = ANALYTICS_SETTINGS if not dps else AnalyticsSettings(**{**ANALYTICS_SETTINGS.__dict__, "dp": True})
    plan = plan_for(settings.task(), settings.dp)
    declared = {n: None if dps.get(n) is not None else float(len(f)) for n, f in frames.items()}
    session = AnalyticsSession(SummedSites(frames, dps, rng), list(frames), plan.queries(settings),
                               schedule=plan.schedule(settings), declared=declared)
    return run_analyses(session, plan, settings)


ATTACKS = {"every-sum": None, "first-moments": FIRST_MOMENTS}
"""The inflating site's variants: every released sum but the counts, or only the sums of values (means move,
squares stay as computed)."""


def mean_shift(attacked: dict, honest: dict) -> float:
    """Largest move of a describe mean between two runs, in units of the column's declared range (0 if the
    attacked run has no describe)."""
    shifts = [0.0]
    for column, stats in attacked.get("describe", {}).items():
        lo, hi = honest["plan"]["bounds"][column]
        if stats.get("mean") is not None and honest["describe"][column].get("mean") is not None and hi > lo:
            shifts.append(abs(stats["mean"] - honest["describe"][column]["mean"]) / (hi - lo))
    return float(max(shifts))


def smallest_factors(frame) -> dict[str, float]:
    """Per describe column, the smallest factor on the site's centred sum Σ(x − midpoint) that the check of its
    answer alone refuses: count · half range / |Σ(x − midpoint)| (the first-moment bound of
    ``shared.analytics_bounds``; squares and other bounds may catch smaller ones)."""
    plan = plan_for(ANALYTICS_SETTINGS.task(), False)
    columns = list(plan.columns)
    bounds = plan.bounds_array(columns)
    released = describe(frame, columns, bounds, ANALYTICS_SETTINGS.bins).exact_arrays()
    out = {}
    for j, column in enumerate(columns):
        half = (bounds[j, 1] - bounds[j, 0]) / 2
        if np.isfinite(half) and released["count"][j] > 0 and released["sum"][j] != 0:
            out[column] = float(released["count"][j] * half / abs(released["sum"][j]))
    return out


def analytics_benchmark(worlds: int, clinics: int, draws: int, folder: Path) -> dict:
    """Sections 4 and 5 of the module docstring."""
    honest = {mode: {"runs": 0, "checks": 0, "refused": 0} for mode in ("alone", "summed", "alone_dp", "summed_dp")}
    caught = {a: {f: {"alone": 0, "summed": 0, "first_query_alone": {}, "first_query_summed": {},
                      "uncaught_mean_shift_alone": 0.0, "uncaught_mean_shift_summed": 0.0} for f in FACTORS}
              for a in ATTACKS}
    rng = np.random.default_rng(1)
    thresholds: dict[str, list[float]] = {}
    for world_seed in range(worlds):
        world = make_world(clinics, seed=200 + world_seed, patients_per_clinic=60)
        frames = {c.name: simulate_clinic(world, c)[0] for c in world.clinics}
        clean: dict[str, dict] = {}  # the honest runs without DP, by mode
        for summed in (False, True):
            mode = "summed" if summed else "alone"
            for draw in range(1 + draws):
                dp = draw > 0
                dps = {name: SiteDP(PrivacyLedger.open(folder / f"{world_seed}-{mode}-{draw}-{name}.json", 3.0,
                                                       1e-5), {"analytics": 1.0})
                       for name in list(frames)[::2]} if dp else {}
                result = analytics_run(frames, dps, rng, summed)
                if not dp:
                    clean[mode] = result
                key = mode + ("_dp" if dp else "")
                honest[key]["runs"] += 1
                honest[key]["checks"] += result["queries"]["asked"] * (1 if summed else clinics)
                honest[key]["refused"] += sum(len(v) for v in result["infeasible"].values())
        attacker = max(frames, key=lambda name: len(frames[name]))
        for column, factor in smallest_factors(frames[attacker]).items():
            thresholds.setdefault(column, []).append(factor)
        for attack, arrays in ATTACKS.items():
            for factor in FACTORS:
                for summed in (False, True):
                    with inflated_analytics(frames[attacker], factor, arrays):
                        result = analytics_run(frames, {}, rng, summed)
                    mode = "summed" if summed else "alone"
                    hit = [q for q, who in result["infeasible"].items()
                           if (("sum" in who) if summed else attacker in who)]
                    entry = caught[attack][factor]
                    entry[mode] += bool(hit)
                    if hit:
                        entry[f"first_query_{mode}"][hit[0]] = entry[f"first_query_{mode}"].get(hit[0], 0) + 1
                    if DESCRIBE not in result["infeasible"]:
                        entry[f"uncaught_mean_shift_{mode}"] = max(entry[f"uncaught_mean_shift_{mode}"],
                                                                   mean_shift(result, clean[mode]))
    return {"worlds": worlds, "clinics": clinics, "draws": draws, "epsilon": 3.0, "honest": honest,
            "smallest_factor_caught_alone": {c: {"min": min(v), "max": max(v)} for c, v in thresholds.items()},
            "caught": {a: {str(f): c for f, c in by.items()} for a, by in caught.items()}}


HIST_FACTORS = (1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 10.0)


def hist_run(sites: dict, encoder, settings, mode: str, dps: dict, checked: list) -> tuple[dict, dict, int]:
    """One hist phase (ranges, bins, every head's rounds) over ``sites``: the session's infeasible releases,
    the failures, and the rounds grown."""
    from server import hist_phase as hp
    from server.boosting_phase import boosting_round

    hist = hp.HistSettings.from_run_settings(settings)
    hist = hp.HistSettings(rounds=hist.rounds, tree=hist.tree, secure_sum=mode)
    specs = hp.head_specs(encoder, False)
    declared = {node: float(len(site.episodes)) for node, site in sites.items()}
    session = hp.HistSession(InProcessHistGrid(sites, dps), list(sites), boosting_round(settings).to_config(encoder),
                             hist, len(specs), {n: (None if n in dps else d) for n, d in declared.items()})
    failures: dict[int, str] = {}
    lo, hi = hp.global_ranges(session, failures)
    if mode == "pairwise":
        session.exchange_keys()
    try:
        thresholds = hp.global_thresholds(session, lo, hi)
    except hp.HistProtocolError as err:
        return dict(session.infeasible), {err.node: err.reason}, 0
    grown = hp.grow_all_heads(session, specs, thresholds, hist, failures)
    checked.append(session)
    return dict(session.infeasible), failures, min(len(r) for r in grown.values())


def hist_benchmark(worlds: int, clinics: int, rounds: int, draws: int, folder: Path) -> dict:
    """Sections 6 and 7 of the module docstring."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.split import split_site
    from server import hist_phase as hp
    from server.settings import RunSettings
    from shared.encoding import FeatureEncoder, combine
    from shared.validation import SiteData

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Message() needs, as a ServerApp
        setattr(TaskIdentity, name, value)
    counted = {"levels": 0, "counts": 0}
    level, counts = hp.check_level, hp.check_counts

    def count(kind, check):
        def spy(*args):
            counted[kind] += 1
            return check(*args)
        return spy

    hp.check_level, hp.check_counts = count("levels", level), count("counts", counts)
    settings = RunSettings(seed=0, split_seed=0, boosting="hist", xgb_rounds=rounds)
    honest = {m: {"runs": 0, "checks": 0, "refused": 0} for m in ("off", "pairwise", "pairwise_dp")}
    caught = {m: {str(f): {"caught": 0, "first": {}} for f in HIST_FACTORS} for m in ("off", "pairwise", "pairwise_dp")}
    try:
        for world_seed in range(worlds):
            world = make_world(clinics, seed=300 + world_seed, patients_per_clinic=60)
            frames = [simulate_clinic(world, c)[0] for c in world.clinics]
            sites = {100 + i: SiteData(name=c.name, path=folder / c.name, episodes=f, vitals=None, config={},
                                       task=TASK) for i, (c, f) in enumerate(zip(world.clinics, frames, strict=True))}
            train = [split_site(f, TASK, 0)["train"] for f in frames]
            encoder = FeatureEncoder(TASK).fit_statistics(combine([SiteStatistics.from_frame(t, TASK) for t in train]))
            attacker = max(sites, key=lambda n: len(sites[n].episodes))
            for mode in honest:
                for draw in range(draws if mode.endswith("dp") else 1):
                    dps = {n: SiteDP(PrivacyLedger.open(folder / f"{world_seed}-{mode}-{draw}-{n}" / "l.json", 3.0,
                                                        1e-5), {"boosting": 1.0})
                           for n in list(sites)[::2]} if mode.endswith("dp") else {}
                    before = sum(counted.values())
                    infeasible, failures, grown = hist_run(sites, encoder, settings, mode.removesuffix("_dp"), dps, [])
                    honest[mode]["runs"] += 1
                    honest[mode]["checks"] += sum(counted.values()) - before
                    honest[mode]["refused"] += len(infeasible)
                    if failures or grown < rounds:
                        raise RuntimeError(f"an honest hist run failed ({mode}): {failures}")
                for factor in HIST_FACTORS:
                    dps = {n: SiteDP(PrivacyLedger.open(folder / f"{world_seed}-{mode}-a{factor}-{n}" / "l.json", 3.0,
                                                        1e-5), {"boosting": 1.0})
                           for n in list(sites)[::2]} if mode.endswith("dp") else {}
                    with inflated_hist({attacker}, factor):
                        infeasible, _, _ = hist_run(sites, encoder, settings, mode.removesuffix("_dp"), dps, [])
                    hit = infeasible.get("sum" if mode != "off" else attacker)
                    entry = caught[mode][str(factor)]
                    entry["caught"] += hit is not None
                    if hit is not None:
                        where = hit.removeprefix("dropped: ").split(" is infeasible")[0]
                        entry["first"][where] = entry["first"].get(where, 0) + 1
    finally:
        hp.check_level, hp.check_counts = level, counts
    return {"worlds": worlds, "clinics": clinics, "rounds": rounds, "draws": draws, "epsilon": 3.0,
            "honest": honest, "caught": caught}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, default=5)
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--analytics-worlds", type=int, default=3)
    parser.add_argument("--analytics-draws", type=int, default=4)
    parser.add_argument("--hist-worlds", type=int, default=3)
    parser.add_argument("--hist-rounds", type=int, default=3)
    parser.add_argument("--hist-draws", type=int, default=2)
    parser.add_argument("--fit-worlds", type=int, default=3)
    parser.add_argument("--fit-draws", type=int, default=2)
    parser.add_argument("--sections", default="statistics,analytics,hist,fits")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sum_bounds.json"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if sections != {"statistics", "analytics", "hist", "fits"}:
        return partial_main(args, sections)
    started = time.time()
    rng = np.random.default_rng(0)
    honest = {"releases": 0, "refused_summed": 0, "refused_alone": 0}
    caught = {f: {"masked": 0, "alone": 0} for f in FACTORS}
    shift_off, shift_masked = [], []
    for world_seed in range(args.worlds):
        world = make_world(args.clinics, seed=100 + world_seed, patients_per_clinic=60)
        frames = [simulate_clinic(world, clinic)[0] for clinic in world.clinics]
        stats = [SiteStatistics.from_frame(f, TASK) for f in frames]
        declared = [float(len(f)) for f in frames]
        layout = declared_layout(stats[0], TASK)  # every value declared: the layout DP sites use
        exact = [layout.vector(s) for s in stats]
        dp_sites = range(0, args.clinics, 2)
        for noise_sd in SIGMAS:
            for _ in range(args.draws):
                vectors, sds = list(exact), []
                for i in dp_sites:
                    noised, facts = private_statistics(stats[i], TASK, Release(noise_sd, rng))
                    vectors[i] = layout.vector(noised)
                    sds.append(facts.noise_sd)
                    honest["refused_alone"] += not feasible(layout, vectors[i], Contributors(1, None, (noise_sd,)))
                for i in set(range(args.clinics)) - set(dp_sites):
                    honest["refused_alone"] += not feasible(layout, vectors[i], Contributors(1, declared[i]))
                honest["refused_summed"] += not feasible(layout, sum(vectors),
                                                         Contributors(args.clinics, None, tuple(sds)))
                honest["releases"] += 1
        attacker = int(np.argmax(declared))
        everyone = Contributors(args.clinics, float(sum(declared)))
        alone = Contributors(1, declared[attacker])
        columns = [(layout.numeric.index(c), c, declared_range(TASK, c)) for c in layout.numeric]
        for factor in FACTORS:
            v = exact[attacker].copy()
            for i, _, _ in columns:
                v[2 + 3 * i + 1] *= factor
                count, s = exact[attacker][2 + 3 * i], exact[attacker][2 + 3 * i + 1]
                if count > 0:  # the centred sum of squares kept, as the inflated plain reply keeps it
                    v[2 + 3 * i + 2] += (v[2 + 3 * i + 1] ** 2 - s ** 2) / count
            caught[factor]["alone"] += not feasible(layout, v, alone)
            caught[factor]["masked"] += not feasible(layout, sum(exact) - exact[attacker] + v, everyone)
        clean = sum(exact)
        for i, name, (lo, hi) in columns:
            at = 2 + 3 * i
            count = exact[attacker][at]
            if count <= 0:
                continue
            v = exact[attacker].copy()
            v[at + 1], v[at + 2] = count * hi, count * hi * hi
            assert feasible(layout, v, alone), name
            total = clean - exact[attacker] + v
            shift = (total[at + 1] / total[at] - clean[at + 1] / clean[at]) / (hi - lo)
            shift_off.append({"column": name, "shift": float(shift), "bound": float(count / clean[at])})
            pooled = clean.copy()
            pooled[at + 1], pooled[at + 2] = clean[at] * hi, clean[at] * hi * hi
            assert feasible(layout, pooled, everyone), name
            mean = clean[at + 1] / clean[at]
            shift_masked.append({"column": name, "shift": float((hi - mean) / (hi - lo)),
                                 "bound": float((hi - mean) / (hi - lo))})
    statistics_seconds = round(time.time() - started, 1)
    with tempfile.TemporaryDirectory() as ledgers:
        analytics = analytics_benchmark(args.analytics_worlds, args.clinics, args.analytics_draws, Path(ledgers))
        hist_started = time.time()
        hist = hist_benchmark(args.hist_worlds, args.clinics, args.hist_rounds, args.hist_draws, Path(ledgers))
        hist["seconds"] = round(time.time() - hist_started, 1)
        fits = fits_benchmark(args.fit_worlds, args.clinics, args.fit_draws, Path(ledgers))
    worst_off = max(shift_off, key=lambda r: r["shift"])
    worst_masked = max(shift_masked, key=lambda r: r["shift"])
    result = {
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}", "load_average": os.getloadavg(),
        "worlds": args.worlds, "clinics": args.clinics, "draws": args.draws, "sigmas": SIGMAS,
        "honest": honest, "caught": {str(f): c for f, c in caught.items()},
        "shift_off": {"worst": worst_off, "all_within_bound": all(r["shift"] <= r["bound"] + 1e-9 for r in shift_off)},
        "shift_masked": {"worst": worst_masked}, "statistics_seconds": statistics_seconds, "analytics": analytics,
        "hist": hist, "fits": fits,
        "seconds": round(time.time() - started, 1)}
    print(f"honest releases {honest['releases']} (σ in {SIGMAS}, {len(range(0, args.clinics, 2))} of "
          f"{args.clinics} DP): refused summed {honest['refused_summed']}, per site {honest['refused_alone']}")
    print("| inflate factor | masked sum refused | site alone dropped |")
    print("|---|---|---|")
    for factor, c in caught.items():
        print(f"| {factor:g} | {c['masked']}/{args.worlds} | {c['alone']}/{args.worlds} |")
    print(f"largest mean shift within allowance, per site (off): {worst_off['shift']:.3f} of the range "
          f"({worst_off['column']}; stated bound C_a/C = {worst_off['bound']:.3f}); all within bound: "
          f"{result['shift_off']['all_within_bound']}")
    print(f"largest mean shift a masked sum cannot tell from honest: {worst_masked['shift']:.3f} of the range "
          f"({worst_masked['column']}: the pooled mean moved to the top of its range)")
    print(f"analytics, {analytics['worlds']} worlds x {args.clinics} clinics (every query of every analysis):")
    print("| honest run | runs | checks | refused |")
    print("|---|---|---|---|")
    for mode, h in analytics["honest"].items():
        print(f"| {mode} | {h['runs']} | {h['checks']} | {h['refused']} |")
    print("| attack | factor | site alone dropped | summed analysis refused | first query caught (alone / summed) | "
          "largest describe mean shift uncaught (alone / summed) |")
    print("|---|---|---|---|---|---|")
    for attack, by in analytics["caught"].items():
        for factor, c in by.items():
            print(f"| {attack} | {factor} | {c['alone']}/{analytics['worlds']} | {c['summed']}/{analytics['worlds']} | "
                  f"{c['first_query_alone']} / {c['first_query_summed']} | {c['uncaught_mean_shift_alone']:.3f} / "
                  f"{c['uncaught_mean_shift_summed']:.3f} |")
    factors = analytics["smallest_factor_caught_alone"]
    print("smallest factor on a column's centred sum caught alone (min-max over worlds): " + ", ".join(
        f"{c} {v['min']:.3g}-{v['max']:.3g}" for c, v in sorted(factors.items(), key=lambda kv: kv[1]["min"])))
    print(f"histogram boosting, {hist['worlds']} worlds x {args.clinics} clinics, {hist['rounds']} rounds of every "
          f"head ({hist['seconds']} s):")
    print("| honest run | runs | checked releases | refused |")
    print("|---|---|---|---|")
    for mode, h in hist["honest"].items():
        print(f"| {mode} | {h['runs']} | {h['checks']} | {h['refused']} |")
    print("| inflate factor | " + " | ".join(f"{m} caught" for m in hist["caught"]) + " | first caught by |")
    print("|---|" + "---|" * (len(hist["caught"]) + 1))
    for factor in HIST_FACTORS:
        row = [hist["caught"][m][str(factor)] for m in hist["caught"]]
        firsts = sorted({k.split(": the summed ")[-1] for c in row for k in c["first"]})
        print(f"| {factor:g} | " + " | ".join(f"{c['caught']}/{hist['worlds']}" for c in row) + f" | "
              f"{', '.join(firsts) or '-'} |")
    print_fits(fits, args.clinics)
    print(f"{result['seconds']} s, load average {result['load_average']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def partial_main(args, sections: set[str]) -> None:
    """Only the model fits' and/or the release gate's part (``--sections fits,gate``), merged into ``--out``."""
    if not sections or not sections <= {"fits", "gate", "evaluation"}:
        raise SystemExit("--sections: run all parts, or any of fits, gate, evaluation alone")
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    for section in sorted(sections):
        started = time.time()
        with tempfile.TemporaryDirectory() as ledgers:
            part = (fits_benchmark(args.fit_worlds, args.clinics, args.fit_draws, Path(ledgers)) if section == "fits"
                    else gate_benchmark(args.fit_worlds, args.draws) if section == "gate"
                    else evaluation_benchmark(args.fit_worlds, args.clinics))
        part.update({"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime()),
                     "load_average": os.getloadavg(), "seconds": round(time.time() - started, 1)})
        result[section] = part
        if section == "fits":
            print_fits(part, args.clinics)
        else:
            (print_gate if section == "gate" else print_evaluation)(part)
        print(f"{section}: {part['seconds']} s, load average {part['load_average']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def gate_benchmark(worlds: int, draws: int) -> dict:
    """The release gate's value sums (``shared.value_bounds``): every clinic's real sums
    (``client.ope.site_value_sums``) of a real candidate policy (``tests.test_recommender.real_policy_files``)
    on the world it was trained for (3 clinics, seed 3; another world logs formulations it does not know) over
    ``worlds`` held-out splits (split seeds 0, 1, ...), checked alone (they travel in the clear) exact and under DP
    noise (``draws`` draws at σ in SIGMAS, the Gaussian release of ``client.ope.private_value_sums``); then each clinic
    inflating them by FACTOR (``simulation.attacks.inflate_value_sums``), and the largest pull on the gate's
    estimate a site has within the bounds (its share of the cycles times 2G minus its honest mean)."""
    from client.ope import site_value_sums
    from shared.dosing_policy import DosingPolicy
    from shared.off_policy import G_MAX, ValueSums, gate
    from shared.value_bounds import check_value_sums
    from simulation.attacks import inflate_value_sums
    from tests.test_recommender import real_policy_files

    files, _, _ = real_policy_files(seed=3)
    policy = DosingPolicy.from_folder(files["policy.json"].parent)
    rng = np.random.default_rng(5)
    honest = {"exact": {"checks": 0, "refused": 0}, "dp": {"checks": 0, "refused": 0}}
    caught = {str(f): {"caught": 0, "sites": 0} for f in FACTORS}
    pulls = []

    def feasible(sums, who) -> bool:
        try:
            check_value_sums("release gate", sums, who)
        except InfeasibleSum:
            return False
        return True

    world = make_world(3, seed=3)
    frames = {c.name: simulate_clinic(world, c)[0] for c in world.clinics}
    for world_seed in range(worlds):
        sums = {name: site_value_sums(policy, frame, TASK, split_seed=world_seed) for name, frame in frames.items()}
        for name, s in sums.items():
            who = Contributors(1, float(len(frames[name])))
            honest["exact"]["checks"] += 1
            honest["exact"]["refused"] += not feasible(s, who)
            for noise_sd in SIGMAS:
                for _ in range(draws):
                    blocks = {k: Block(v, ValueSums.BOUNDS[k], 1) for k, v in s.arrays().items()}
                    values = gaussian_release(blocks, noise_sd / sensitivity(blocks), rng)
                    noised = ValueSums(**{k: float(v[0]) for k, v in values.items()}, noise_sd=noise_sd)
                    honest["dp"]["checks"] += 1
                    honest["dp"]["refused"] += not feasible(noised, Contributors(1, None, (noise_sd,)))
            for factor in FACTORS:
                caught[str(factor)]["sites"] += 1
                caught[str(factor)]["caught"] += not feasible(inflate_value_sums(s, factor), who)
        total = gate(sums)
        for name, s in sums.items():
            if s.n > 0 and total.n > 0:
                pulls.append({"site": f"split {world_seed} {name}", "share": s.n / total.n,
                              "largest_pull": (2 * G_MAX * s.n - s.difference) / total.n})
    return {"worlds": 1, "splits": worlds, "clinics": 3, "draws": draws, "sigmas": SIGMAS, "honest": honest,
            "caught": caught, "largest_pull": max(pulls, key=lambda p: p["largest_pull"]) if pulls else None}


def evaluation_benchmark(worlds: int, clinics: int) -> dict:
    """Evaluation summaries (``shared.metrics_bounds``): boosters trained on the pooled training rows of
    ``worlds`` worlds of ``clinics`` clinics (``client.boosting.train_pooled_heads``, depth 3, 20 rounds), every
    clinic's summaries of their predictions on its test split by the sites' own code
    (``client.evaluation.summaries``, fine and coarse bins), checked with its declared row count; then the
    largest clinic lying (``simulation.attacks.swap_binary_labels``: ``--attack SITE:lie``) or inflating its error
    sums by FACTOR."""
    from client.boosting import train_pooled_heads
    from client.evaluation import summaries
    from client.split import encode, split_site
    from shared import metrics
    from shared.boosting import BoostingConfig, predict_heads
    from shared.encoding import fit_local
    from shared.metrics_bounds import check_evaluation
    from simulation.attacks import swap_binary_labels

    honest = {"checks": 0, "refused": 0}
    caught = {"lie": {"caught": 0, "worlds": 0}, **{str(f): {"caught": 0, "worlds": 0} for f in FACTORS}}
    first: dict[str, int] = {}

    def feasible(record, declared) -> str | None:
        try:
            check_evaluation("evaluation", TASK, record, declared)
        except InfeasibleSum as err:
            return f"{err.entry}: {err.bound}"
        return None

    for world_seed in range(worlds):
        world = make_world(clinics, seed=500 + world_seed, patients_per_clinic=60)
        frames = {c.name: simulate_clinic(world, c)[0] for c in world.clinics}
        splits = {name: split_site(f, TASK, 0) for name, f in frames.items()}
        pooled = pd.concat([s["train"] for s in splits.values()], ignore_index=True)
        encoder = fit_local(pooled, TASK)
        train = encode(encoder, pooled)
        models = train_pooled_heads(encoder, train.x, train.targets, BoostingConfig(max_depth=3), 20)
        records = {}
        for name, split in splits.items():
            test = encode(encoder, split["test"])
            for n_bins in (metrics.DEFAULT_N_BINS, metrics.COARSE_N_BINS):
                record = MetricRecordType()
                for outcome, summary in summaries(encoder, test, predict_heads(models, encoder, test.x),
                                                  n_bins).items():
                    record.update(metrics.to_metric_record(summary, prefix=outcome))
                honest["checks"] += 1
                honest["refused"] += feasible(dict(record), float(len(frames[name]))) is not None
                if n_bins == metrics.DEFAULT_N_BINS:
                    records[name] = record
        attacker = max(frames, key=lambda n: len(frames[n]))
        declared = float(len(frames[attacker]))
        lied = MetricRecordType(dict(records[attacker]))
        swap_binary_labels(lied)
        attacks = {"lie": dict(lied)}
        for factor in FACTORS:
            attacks[str(factor)] = {k: (v * factor if k.endswith(("sum_abs_err", "sum_sq_err")) else v)
                                    for k, v in dict(records[attacker]).items()}
        for key, record in attacks.items():
            caught[key]["worlds"] += 1
            why = feasible(record, declared)
            if why is not None:
                caught[key]["caught"] += 1
                first[why] = first.get(why, 0) + 1
    return {"worlds": worlds, "clinics": clinics, "honest": honest, "caught": caught, "first": first}


def print_evaluation(part: dict) -> None:
    print(f"evaluation summaries, {part['worlds']} worlds x {part['clinics']} clinics: honest {part['honest']}")
    print("| attack | site dropped from the overall metrics |")
    print("|---|---|")
    for key, c in part["caught"].items():
        print(f"| {'lie' if key == 'lie' else 'error sums x ' + key} | {c['caught']}/{c['worlds']} |")
    print(f"caught by: {part['first']}")


def print_gate(part: dict) -> None:
    print(f"release gate, 1 world x 3 clinics x {part['splits']} held-out splits: honest exact "
          f"{part['honest']['exact']}, under DP {part['honest']['dp']}")
    print("| inflate factor | site alone dropped |")
    print("|---|---|")
    for factor, c in part["caught"].items():
        print(f"| {factor} | {c['caught']}/{c['sites']} |")
    print(f"largest pull on the gate's estimate within the bounds: {part['largest_pull']}")


FIT_FACTORS = (1.02, 1.1, 1.5, 2.0, 5.0, 10.0)
FIT_MESSAGE_TYPES = (messages.DOSE_RESPONSE_SUMS.type, messages.FQI_SCALING.type, messages.FQI_RIDGE.type)
FQI_CONFIG = {"split-seed": 0, "fqi-gamma": 0.9, "fqi-iterations": 4}


def fit_grid(sites: dict, dps: dict, attacker: int | None, factor: float):
    """The fits' in-process grid over the sites' real handlers, ``attacker`` answering through ``inflated_fit``."""
    from client import adjustment_handlers as ah
    from client import dose_response_handlers as dh
    from tests.handler_grid import HandlerGrid

    class Request:
        def __init__(self, site, config, context, dp):
            self.site, self.config, self.context, self.dp, self.name = site, config, context, dp, "clinic"

    class FitGrid(HandlerGrid):
        answers = {messages.FQI_SCALING.type: ah.answer_sums(messages.FQI_SCALING.action),
                   messages.FQI_RIDGE.type: ah.answer_sums(messages.FQI_RIDGE.action),
                   messages.DOSE_RESPONSE_SUMS.type: dh.model_sums,
                   messages.DOSE_RESPONSE_SUPPORT.type: dh.support_counts}

        def request(self, node, msg, context):
            return Request(sites[node], msg.content[r.CONFIG], context, dps.get(node))

        def answer(self, msg, node, kind):
            if node == attacker and kind not in self.rounds:
                with inflated_fit(factor):
                    return super().answer(msg, node, kind)
            return super().answer(msg, node, kind)

    return FitGrid(sites)


def fit_run(fit: str, sites: dict, mode: str, dps: dict, attacker: int | None = None, factor: float = 1.0) -> dict:
    """One fit (``dose-response`` or ``fitted-Q``) over ``sites``: the sites dropped as infeasible, whether a masked
    fit was refused (and by which entry), stopped otherwise, and the releases checked."""
    from server import adjustment_phase as ap
    from server import dose_response_phase as drp
    from shared.structured_policy import catalogue_of

    grid = fit_grid(sites, dps, attacker, factor)
    declared = {n: (None if n in dps else float(len(site.episodes))) for n, site in sites.items()}
    out = {"dropped": {}, "refused": None, "stopped": None}
    try:
        if fit == "dose-response":
            catalogue = catalogue_of(pd.concat([s.episodes for s in sites.values()], ignore_index=True))
            _, info = drp.fit_structured_policy_federated(grid, list(sites), catalogue, 0, secure_sum=mode,
                                                          declared=declared)
            out["dropped"] = {str(n): why for n, why in info["infeasible"].items()}
        else:
            fitted = ap.fit_adjuster(grid, list(sites), FQI_CONFIG, secure_sum=mode, declared=declared)
            out["dropped"] = dict(fitted.infeasible_)
    except (drp.DoseResponseFailed, ap.AdjustmentFailed) as err:
        out["refused" if "refused" in str(err) else "stopped"] = str(err)
    releases = sum(grid.calls.count(t) for t in FIT_MESSAGE_TYPES)
    out["checked"] = releases * (len(sites) if mode == "off" else 1)
    return out


def caught_entry(run: dict, attacker: int) -> str | None:
    """The release and entry that caught the attacker (``phase: the summed ENTRY``), or None."""
    text = run["refused"] or run["dropped"].get(str(attacker))
    if not text:
        return None
    found = re.search(r"((?:dose-response|fitted-Q): .*?) is infeasible", text)
    return found.group(1) if found else text


def fits_benchmark(worlds: int, clinics: int, draws: int, folder: Path) -> dict:
    """Sections 8 and 9 of the module docstring."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)  # what Flower's runtime sets in a ServerApp process
    runs = {"dose-response off": ("dose-response", "off", False), "dose-response pairwise": ("dose-response",
                                                                                             "pairwise", False),
            "fitted-Q off": ("fitted-Q", "off", False), "fitted-Q recovering": ("fitted-Q", "recovering", False),
            "fitted-Q off, half DP": ("fitted-Q", "off", True),
            "fitted-Q recovering, half DP": ("fitted-Q", "recovering", True)}
    honest = {k: {"runs": 0, "checked": 0, "refused": 0} for k in runs}
    caught = {k: {str(f): {"caught": 0, "stopped_otherwise": 0, "first": {}} for f in FIT_FACTORS} for k in runs}
    started = time.time()
    for world_seed in range(worlds):
        world = make_world(clinics, seed=400 + world_seed, patients_per_clinic=60)
        sites = {node: FitSite(*simulate_clinic(world, clinic)) for node, clinic in enumerate(world.clinics, 1)}
        attacker = max(sites, key=lambda n: len(sites[n].episodes))

        def dps(tag: str, with_dp: bool, sites=sites, attacker=attacker, world_seed=world_seed) -> dict:
            """Odd clinics and the attacker under DP (fresh ledgers, so fresh noise, per ``tag``)."""
            chosen = [n for n in sites if n % 2 == 1 or n == attacker] if with_dp else []
            return {n: SiteDP(PrivacyLedger.open(folder / f"fit-{world_seed}-{tag}-{n}.json", 3.0, 1e-5),
                              {"adjuster": 0.2}) for n in chosen}

        for key, (fit, mode, with_dp) in runs.items():
            for draw in range(draws if with_dp else 1):
                run = fit_run(fit, sites, mode, dps(f"{key}-{draw}", with_dp))
                honest[key]["runs"] += 1
                honest[key]["checked"] += run["checked"]
                honest[key]["refused"] += len(run["dropped"]) + (run["refused"] is not None)
            for factor in FIT_FACTORS:
                run = fit_run(fit, sites, mode, dps(f"{key}-attack-{factor}", with_dp), attacker, factor)
                entry = caught_entry(run, attacker)
                cell = caught[key][str(factor)]
                if entry is not None:
                    cell["caught"] += 1
                    cell["first"][entry] = cell["first"].get(entry, 0) + 1
                elif run["stopped"] is not None:
                    cell["stopped_otherwise"] += 1
    return {"worlds": worlds, "clinics": clinics, "draws": draws, "epsilon": 3.0, "fqi_iterations": 4,
            "honest": honest, "caught": caught, "fit_seconds": round(time.time() - started, 1)}


def print_fits(fits: dict, clinics: int) -> None:
    print(f"model fits, {fits['worlds']} worlds x {clinics} clinics ({fits['fit_seconds']} s):")
    print("| honest run | runs | checked releases | refused |")
    print("|---|---|---|---|")
    for key, h in fits["honest"].items():
        print(f"| {key} | {h['runs']} | {h['checked']} | {h['refused']} |")
    print("| inflate factor | " + " | ".join(fits["caught"]) + " |")
    print("|---|" + "---|" * len(fits["caught"]))
    for factor in FIT_FACTORS:
        cells = [fits["caught"][k][str(factor)] for k in fits["caught"]]
        print(f"| {factor:g} | " + " | ".join(f"{c['caught']}/{fits['worlds']}" + (
            f" (+{c['stopped_otherwise']} stopped)" if c["stopped_otherwise"] else "") for c in cells) + " |")
    firsts = {}
    for by in fits["caught"].values():
        for c in by.values():
            for entry, count in c["first"].items():
                firsts[entry] = firsts.get(entry, 0) + count
    print("caught by: " + "; ".join(f"{e} ({c})" for e, c in sorted(firsts.items(), key=lambda kv: -kv[1])))


class FitSite:
    """``shared.validation.SiteData`` as the fit handlers read it: episodes, vitals, task."""

    def __init__(self, episodes, vitals) -> None:
        self.episodes, self.vitals, self.task = episodes, vitals, TASK


if __name__ == "__main__":
    main()
