"""Issue 18's target against the truth: every candidate and each site's choice scored on fresh patients of its clinic.

    python benchmarks/personalised_fresh.py --seeds 0 1 2 3 4 [--work runs/bench_personalised] [--fresh 2000]
                                            [--dp] [--out benchmarks/results/personalised_fresh.json]

The target ("per site, the chosen model's test metric vs max(local-only, global): not worse by more than the
split's noise, better on average") is measured on each site's small test split (30-300 rows, AUC SE 0.03-0.08).
There max(local, global) is an oracle biased upward by that noise: it takes whichever of two noisy estimates
came out higher, so a single choice made without the test split can match it only by luck. The simulator knows
each clinic's profile and can draw as many new patients of it as we like, so this script measures the target
without that noise.

Reads the runs ``benchmarks/personalised.py --no-dp`` left in ``--work`` (``personalised-<seed>``: the simulated
clinics' folders, the run's record and final global ANN) and, per site, re-trains every candidate of the run
exactly as the site did (``client.personalised.candidates.trainers`` and ``mixes`` with the run's plan, the same
encoder, split, seed and settings: without DP the fits are deterministic; the script checks every candidate's
test AUC against the site's own record of the run and reports the largest difference). Each candidate and the
one the site chose in the run (``personalisation.per_site.<site>.chosen`` of the run record) are then scored

(a) on the site's own test split, as the run did, and
(b) on ``--fresh`` new patients of the same clinic (``simulation.membership_audit.fresh_patients``: the simulator's
    seed stream that neither the run nor the audit's reference models use; every cycle of those patients, encoded
    with the run's encoder),

by the response AUC (exact summaries, as the sites' records) and the score the sites choose by
(``client.personalised.choice.validation_score``). Figures, per seed and over the seeds, on the sites with
≥ 30 test rows (the target's sites; every site on the fresh cohort too):

- chosen − max(local, global) on the test split and on the fresh cohort;
- the oracle's bias: ``max(l, g) − max(L, G)`` per site (lower case: the test split's AUCs, upper case: the
  fresh cohort's), whose mean over sites and seeds estimates ``E[max(l, g)] − max(L, G)``, and its selection
  part ``max(l, g) − x``, ``x`` the test-split AUC of whichever of the two is better on the fresh cohort (≥ 0 at
  every site: what picking the higher of two noisy figures adds; the rest is one model's test noise, mean ≈ 0);
- sites where the chosen model is below max(L, G) by more than its fresh-cohort AUC's SE (Hanley & McNeil; the
  cycles of one patient are not independent, so this SE is somewhat small);
- each candidate's mean fresh AUC and its fresh − max(L, G) as if every site had kept it;
- over :data:`TEST_SIZED_DRAWS` sets of fresh patients as many as the site's test split holds: the oracle's bias
  ``E[max(l, g)] − max(L, G)`` as an expectation, and ``E[c − max(l, g)]`` for the chosen model and for the
  candidate best on the fresh cohort (the handicap the test-split target puts on any fixed choice).

The model each site kept on disk (``personalisation/<site>/<run>-<chosen>.pt``) is checked against the re-trained
choice. ``--dp``: runs with DP sites, whose candidates cannot be re-trained (DP-SGD's noise is not seeded) and whose
local-only model is not kept: only the global model and each site's kept choice are scored on the fresh cohort
(``C − G``, an upper bound of ``C − max(L, G)``), the test split's figures from the sites' own records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
from personalised import MIN_TEST_ROWS, OUTCOME, _auc, hanley_mcneil_se

from client.evaluation import summaries
from client.personalised.choice import validation_score
from client.split import EncodedSplit, encode, split_site
from server.run_record import RunRecord
from shared import metrics
from shared.artifacts import RunArtifacts
from shared.encoding import FeatureEncoder
from shared.protocol.personalisation import GLOBAL, LOCAL, Personalisation
from shared.task import NANOPARTICLE_TASK, TaskSpec
from simulation.clinics import World, make_world
from simulation.experiment import ExperimentConfig
from simulation.membership_audit import fresh_patients

FRESH_PATIENTS = 2000
TEST_SIZED_DRAWS = 200
"""Draws of a test-split-sized set of fresh patients per site (:func:`test_sized_aucs`): the expectations over them
are then within ≈ SD/14 of their limit."""


def run_world(out: Path, clinics: int, seed: int) -> World:
    """The simulator's world of a ``benchmarks/personalised.py`` run, rebuilt from its seed and checked against the
    clinics' seeds the run wrote (``sites/world.json``)."""
    world = make_world(clinics, seed)
    described = out / "sites" / "world.json"
    written = [c["seed"] for c in json.loads(described.read_text())["clinics"]]
    if written != [c.seed for c in world.clinics]:
        raise SystemExit(f"{described}: its clinics are not those of {clinics} clinics at seed {seed} "
                         "(--clinics or --seeds differ from the run's)")
    return world


def fresh_cohort(world: World, site: str, count: int, encoder: FeatureEncoder,
                 task: TaskSpec = NANOPARTICLE_TASK) -> EncodedSplit:
    """Every cycle of ``count`` new patients of ``site``'s clinic (``simulation.membership_audit.fresh_patients``),
    encoded with the run's ``encoder``."""
    rows = fresh_patients(types.SimpleNamespace(world=world, task=task), site, count)
    return encode(encoder, rows.reset_index(drop=True))


def scored(encoder: FeatureEncoder, data: EncodedSplit, predictions: dict[str, np.ndarray],
           task: TaskSpec = NANOPARTICLE_TASK) -> dict:
    """One model's figures on one set of rows: response AUC, its counts and Hanley-McNeil SE, and the score the
    sites choose by (``validation_score``), from the exact summaries a site records."""
    made = summaries(encoder, data, predictions)
    auc = _auc(made[OUTCOME])
    se = hanley_mcneil_se(auc["auc"], auc["n_pos"], auc["n_neg"]) if auc["n_pos"] and auc["n_neg"] else math.nan
    return auc | {"se": se, "score": validation_score(task, made)}


def test_sized_aucs(patients: np.ndarray, y: np.ndarray, predictions: dict[str, np.ndarray], size: int,
                    draws: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Response AUC of each model on ``draws`` sets of ``size`` patients drawn without replacement from the fresh
    cohort (every cycle of each; ``patients`` and ``y`` per row, NaN = not recorded): what the site's test split,
    as many patients, would have measured in other draws of it. NaN where a draw has one class only."""
    names = pd.unique(patients)
    if size > len(names):
        raise ValueError(f"test_sized_aucs: {size} patients asked of a fresh cohort of {len(names)}")
    codes = pd.Index(names).get_indexer(patients)
    result = {c: np.full(draws, np.nan) for c in predictions}
    for k in range(draws):
        chosen = np.zeros(len(names), dtype=bool)
        chosen[rng.choice(len(names), size, replace=False)] = True
        rows = chosen[codes] & ~np.isnan(y)
        if 0 < y[rows].sum() < rows.sum():
            for c, p in predictions.items():
                result[c][k] = metrics.binary_metrics(metrics.summarise("binary", y[rows], p[rows]))["auc"]
    return result


def expected_on_test_splits(aucs: dict[str, np.ndarray], fresh: dict[str, float], chosen: str) -> dict:
    """From :func:`test_sized_aucs`: ``E[max(l, g)] − max(L, G)`` (the oracle's bias, expectation over test splits of
    the site's size), and the expected ``c − max(l, g)`` that such a split measures for the chosen model and for the
    candidate best on the fresh cohort (the best any fixed choice could do), with how often it is ≥ 0."""
    ok = np.isfinite(aucs[LOCAL]) & np.isfinite(aucs[GLOBAL])
    noisy_max = np.maximum(aucs[LOCAL][ok], aucs[GLOBAL][ok])
    best = max(fresh, key=fresh.get)
    if not ok.any():  # no draw with both classes (a site without test patients)
        return {"draws": 0, "best_on_fresh": best} | dict.fromkeys(
            ("expected_max", "expected_bias", "expected_chosen_minus_max", "chosen_at_or_above_max",
             "expected_local_minus_global", "expected_best_minus_max", "best_at_or_above_max"), math.nan)
    return {"draws": int(ok.sum()), "expected_max": float(noisy_max.mean()),
            "expected_bias": float(noisy_max.mean() - max(fresh[LOCAL], fresh[GLOBAL])),
            "expected_chosen_minus_max": float((aucs[chosen][ok] - noisy_max).mean()),
            "chosen_at_or_above_max": float((aucs[chosen][ok] >= noisy_max).mean()),
            "expected_local_minus_global": float((aucs[LOCAL][ok] - aucs[GLOBAL][ok]).mean()),
            "best_on_fresh": best, "expected_best_minus_max": float((aucs[best][ok] - noisy_max).mean()),
            "best_at_or_above_max": float((aucs[best][ok] >= noisy_max).mean())}


def oracle_terms(small: dict[str, float], fresh: dict[str, float]) -> dict[str, float]:
    """Per site, from the test split's (``small``) and the fresh cohort's AUCs of local-only and global: the
    oracle's bias ``max(l, g) − max(L, G)`` and its selection part ``max(l, g) − x`` (``x``: the test-split AUC
    of the model better on the fresh cohort; ≥ 0), whose difference is that one model's test-split noise."""
    noisy, true = max(small[LOCAL], small[GLOBAL]), max(fresh[LOCAL], fresh[GLOBAL])
    better = LOCAL if fresh[LOCAL] > fresh[GLOBAL] else GLOBAL
    return {"bias": noisy - true, "selection": noisy - small[better], "noise_of_better": small[better] - true,
            "better_on_fresh": better}


def kept_model(folder: Path, site: str, run_id: str, chosen: str, global_model, plan: Personalisation):
    """The model the site kept in the run (``personalisation/<site>/<run>-<chosen>.pt``,
    ``client.personalisation_handlers``): a multi-task MLP of the global model's architecture, or for ``mix`` the
    two members with α (``client.personalised.mix.MixedMLP``)."""
    import copy

    import torch

    from client.personalised.mix import MixedMLP
    from shared.protocol.personalisation import MIX

    path = folder / "personalisation" / site / f"{run_id}-{chosen}.pt"
    if not path.is_file():
        raise SystemExit(f"{path}: the site kept no model of its choice {chosen!r} for run {run_id}")
    model = copy.deepcopy(global_model)
    if chosen == MIX:
        model = MixedMLP(model, copy.deepcopy(global_model), plan.mix_alpha, plan.mix_space)
    model.load_state_dict(torch.load(path))
    return model


def prediction_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest |difference| between two models' predictions of every outcome on the same rows (0 on none)."""
    return max((float(np.max(np.abs(a[o] - b[o]))) for o in a if np.size(a[o])), default=0.0)


def replay_difference(again: dict[str, float], recorded: dict[str, float]) -> float:
    """Largest |AUC re-trained − AUC the site recorded| over the candidates; both NaN (a split with one class)
    agree, one NaN is an infinite difference."""
    def gap(a: float, b: float) -> float:
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return math.inf if math.isnan(a) or math.isnan(b) else abs(a - b)

    return max(gap(again[c], recorded[c]) for c in recorded)


def seed_figures(work: Path, clinics: int, rounds: int, seed: int, count: int,
                 draws: int = TEST_SIZED_DRAWS) -> dict:
    from client.personalised.candidates import mixes, trainers
    from shared.ann import predict
    from shared.validation import load_site

    out = work / f"personalised-{seed}"
    cfg = ExperimentConfig(out=out, clinics=clinics, rounds=rounds, dp=False, seed=seed, models="ann",
                           compare=False)
    record = RunRecord.read(out / "federated")
    phase = record.personalisation or {}
    if not phase.get("per_site"):
        raise SystemExit(f"{out / 'federated'}: the run has no personalisation phase")
    if any(p.dp for p in record.privacy.values()):
        raise SystemExit(f"{out}: a run with DP sites; their candidates cannot be re-trained (no seeded noise)")
    candidates = list(phase["candidates"])
    plan = Personalisation(methods=tuple(c for c in candidates if c not in (GLOBAL, LOCAL)))
    artifacts = RunArtifacts.open(out / "federated", run_id=record.run_id)
    global_model, encoder = artifacts.ann(), artifacts.encoder()
    split_seed = int(record.settings.get("split_seed", seed))
    world = run_world(out, clinics, seed)
    sites = {}
    for name in sorted(phase["per_site"]):
        folder = out / "sites" / name
        own = json.loads((folder / "personalisation" / name / f"{record.run_id}.json").read_text())
        site = load_site(folder)
        parts = split_site(site.episodes, site.task, split_seed)
        data = {split: encode(encoder, parts[split]) for split in ("train", "test")}
        models = trainers(plan, cfg.batch_size, seed, local_epochs=rounds * cfg.local_epochs, local_lr=cfg.lr)
        for model in models.values():
            model.fit(global_model, data["train"])
        made = {GLOBAL: lambda x: predict(global_model, x)} | {
            c: m.predict for c, m in (models | mixes(plan, models, global_model)).items()}
        chosen = phase["per_site"][name]["chosen"]
        kept = kept_model(folder, name, record.run_id, chosen, global_model, plan)
        kept_check = prediction_difference(predict(kept, data["test"].x), made[chosen](data["test"].x))
        data["fresh"] = fresh_cohort(world, name, count, encoder)
        figures = {split: {c: scored(encoder, data[split], made[c](data[split].x)) for c in candidates}
                   for split in ("test", "fresh")}
        small = {c: f["auc"] for c, f in figures["test"].items()}
        fresh = {c: f["auc"] for c, f in figures["fresh"].items()}
        group = NANOPARTICLE_TASK.group
        test_patients = parts["test"][group].nunique()
        resampled = test_sized_aucs(data["fresh"].frame[group].astype(str).to_numpy(),
                                    data["fresh"].targets[OUTCOME],
                                    {c: made[c](data["fresh"].x)[OUTCOME] for c in candidates}, test_patients, draws,
                                    np.random.default_rng([seed, sorted(phase["per_site"]).index(name)]))
        sized = expected_on_test_splits(resampled, fresh, chosen)
        best_small, best_fresh = max(small[LOCAL], small[GLOBAL]), max(fresh[LOCAL], fresh[GLOBAL])
        best_score_fresh = max(figures["fresh"][LOCAL]["score"], figures["fresh"][GLOBAL]["score"])
        sites[name] = {
            "n_test": figures["test"][GLOBAL]["n"], "n_fresh": figures["fresh"][GLOBAL]["n"], "chosen": chosen,
            "chosen_in_site_record": own["chosen"], "kept_check": kept_check,
            "replay_check": replay_difference(small, {c: _auc(own["summaries"]["test"][c][OUTCOME])["auc"]
                                                      for c in candidates}),
            "test_auc": small, "fresh_auc": fresh, "fresh_se": {c: figures["fresh"][c]["se"] for c in candidates},
            "test_se": {c: figures["test"][c]["se"] for c in candidates},
            "fresh_score": {c: figures["fresh"][c]["score"] for c in candidates},
            "difference_test": small[chosen] - best_small, "difference_fresh": fresh[chosen] - best_fresh,
            "difference_fresh_score": figures["fresh"][chosen]["score"] - best_score_fresh,
            "as_default_fresh": {c: fresh[c] - best_fresh for c in candidates},
            "as_default_test": {c: small[c] - best_small for c in candidates},
            "test_patients": int(test_patients),
            # the run's split against other draws of its size: ≈ 0 on average if its patients are exchangeable with
            # the fresh ones (what a leak from the site's training rows into its test split would raise)
            "split_favours_local": small[LOCAL] - small[GLOBAL] - sized["expected_local_minus_global"],
            "test_sized": sized,
            **oracle_terms(small, fresh)}
    return summarise_seed(seed, record.run_id, candidates, sites)


def dp_seed_figures(work: Path, clinics: int, seed: int, count: int) -> dict:
    """A run with DP sites: their candidates cannot be re-trained (DP-SGD's noise is not seeded), so only the
    global model and the model each site kept (``kept_model``) are scored on the fresh cohort; the test split's
    figures of every candidate are the site's own exact record. max(L, G) needs the local-only model, which a DP
    site does not keep: ``chosen − G`` on the fresh cohort is an upper bound of ``chosen − max(L, G)``, and
    ``max(l, g) − G`` of the oracle's bias."""
    from shared.ann import predict

    out = work / f"personalised-{seed}"
    record = RunRecord.read(out / "federated")
    phase = record.personalisation or {}
    if not phase.get("per_site"):
        raise SystemExit(f"{out / 'federated'}: the run has no personalisation phase")
    candidates = list(phase["candidates"])
    plan = Personalisation(methods=tuple(c for c in candidates if c not in (GLOBAL, LOCAL)))
    artifacts = RunArtifacts.open(out / "federated", run_id=record.run_id)
    global_model, encoder = artifacts.ann(), artifacts.encoder()
    world = run_world(out, clinics, seed)
    sites = {}
    for name in sorted(phase["per_site"]):
        folder = out / "sites" / name
        own = json.loads((folder / "personalisation" / name / f"{record.run_id}.json").read_text())
        chosen = phase["per_site"][name]["chosen"]
        kept = kept_model(folder, name, record.run_id, chosen, global_model, plan)
        data = fresh_cohort(world, name, count, encoder)
        fresh = {GLOBAL: scored(encoder, data, predict(global_model, data.x)),
                 "chosen": scored(encoder, data, predict(kept, data.x))}
        small = {c: _auc(own["summaries"]["test"][c][OUTCOME]) for c in candidates}
        best_small = max(small[LOCAL]["auc"], small[GLOBAL]["auc"])
        sites[name] = {
            "n_test": small[GLOBAL]["n"], "n_fresh": fresh[GLOBAL]["n"], "chosen": chosen,
            "dp": bool(record.privacy.get(name) and record.privacy[name].dp),
            "test_auc": {c: f["auc"] for c, f in small.items()},
            "test_se": hanley_mcneil_se(small[chosen]["auc"], small[chosen]["n_pos"], small[chosen]["n_neg"])
            if small[chosen]["n_pos"] and small[chosen]["n_neg"] else math.nan,
            "fresh_auc": {k: f["auc"] for k, f in fresh.items()}, "fresh_se": {k: f["se"] for k, f in fresh.items()},
            "difference_test": small[chosen]["auc"] - best_small,
            "chosen_minus_global_fresh": fresh["chosen"]["auc"] - fresh[GLOBAL]["auc"],
            "chosen_minus_global_fresh_score": fresh["chosen"]["score"] - fresh[GLOBAL]["score"],
            "bias_upper": best_small - fresh[GLOBAL]["auc"]}

    def over(part: list[str]) -> dict:
        return {"sites": part, **{k: _mean(sites[s][k] for s in part) for k in (
                    "difference_test", "chosen_minus_global_fresh", "chosen_minus_global_fresh_score", "bias_upper")},
                "worse_test": [s for s in part if sites[s]["difference_test"] < -sites[s]["test_se"]],
                "worse_than_global_fresh": [s for s in part if sites[s]["chosen_minus_global_fresh"]
                                            < -sites[s]["fresh_se"]["chosen"]],
                "mean_fresh_auc": {k: _mean(sites[s]["fresh_auc"][k] for s in part) for k in (GLOBAL, "chosen")},
                "chosen": {c: sum(sites[s]["chosen"] == c for s in part) for c in candidates}}

    big = [s for s, f in sites.items() if f["n_test"] >= MIN_TEST_ROWS]
    return {"seed": seed, "run_id": record.run_id, "candidates": candidates, "sites": sites, "sites_30": over(big),
            "all_sites": over(sorted(sites))}


def print_dp(runs: list[dict]) -> None:
    print("DP runs: the global model and each site's kept choice on the fresh cohort (re-training impossible)")
    for key in ("sites_30", "all_sites"):
        print(f"\n{key}: | seed | sites | chosen − max(l, g), test | chosen − G, fresh (≥ chosen − max(L, G)) | "
              "by score | max(l, g) − G (≥ bias) | worse (test) | worse than G (fresh) | chosen |")
        for run in runs:
            p = run[key]
            print(f"| {run['seed']} | {len(p['sites'])} | {p['difference_test']:+.4f} | "
                  f"{p['chosen_minus_global_fresh']:+.4f} | {p['chosen_minus_global_fresh_score']:+.4f} | "
                  f"{p['bias_upper']:+.4f} | {p['worse_test'] or 'none'} | {p['worse_than_global_fresh'] or 'none'} | "
                  + ", ".join(f"{c} {n}" for c, n in p["chosen"].items() if n) + " |")
        values = {k: _mean_and_se([run["sites"][s][k] for run in runs for s in run[key]["sites"]])
                  for k in ("difference_test", "chosen_minus_global_fresh", "bias_upper")}
        print("over site-seeds (mean ± SE): " + "; ".join(f"{k} {v['mean']:+.4f} ± {v['se']:.4f} (n = {v['n']})"
                                                        for k, v in values.items()))


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _mean_and_se(values: list[float]) -> dict[str, float]:
    """Mean over site-seeds and its standard error (SD / √n, site-seeds taken as independent)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": _mean(values), "se": se, "n": len(values)}


TEST_SIZED_KEYS = ("expected_bias", "expected_chosen_minus_max", "chosen_at_or_above_max", "expected_best_minus_max",
                   "best_at_or_above_max")


def summarise_seed(seed: int, run_id: str, candidates: list[str], sites: dict) -> dict:
    big = [s for s, f in sites.items() if f["n_test"] >= MIN_TEST_ROWS]

    def over(part: list[str]) -> dict:
        return {
            "sites": part,
            "difference_test": _mean(sites[s]["difference_test"] for s in part),
            "difference_fresh": _mean(sites[s]["difference_fresh"] for s in part),
            "difference_fresh_score": _mean(sites[s]["difference_fresh_score"] for s in part),
            "oracle_bias": _mean(sites[s]["bias"] for s in part),
            "oracle_selection": _mean(sites[s]["selection"] for s in part),
            **{k: _mean(sites[s]["test_sized"][k] for s in part) for k in TEST_SIZED_KEYS},
            "worse_test": [s for s in part
                           if sites[s]["difference_test"] < -sites[s]["test_se"][sites[s]["chosen"]]],
            "worse_fresh": [s for s in part
                            if sites[s]["difference_fresh"] < -sites[s]["fresh_se"][sites[s]["chosen"]]],
            "worse_fresh_by_test_se": [s for s in part
                                       if sites[s]["difference_fresh"] < -sites[s]["test_se"][sites[s]["chosen"]]],
            "mean_fresh_auc": {c: _mean(sites[s]["fresh_auc"][c] for s in part) for c in candidates}
            | {"chosen": _mean(sites[s]["fresh_auc"][sites[s]["chosen"]] for s in part),
               "max_local_global": _mean(max(sites[s]["fresh_auc"][LOCAL], sites[s]["fresh_auc"][GLOBAL])
                                         for s in part)},
            "as_default_fresh": {c: _mean(sites[s]["as_default_fresh"][c] for s in part) for c in candidates},
            "as_default_test": {c: _mean(sites[s]["as_default_test"][c] for s in part) for c in candidates},
            "as_default_worse_fresh": {c: [s for s in part if sites[s]["as_default_fresh"][c]
                                           < -sites[s]["fresh_se"][c]] for c in candidates},
        }

    return {"seed": seed, "run_id": run_id, "candidates": candidates, "sites": sites, "sites_30": over(big),
            "all_sites": over(sorted(sites)),
            "replay_check_max": max(f["replay_check"] for f in sites.values()),
            "kept_check_max": max(f["kept_check"] for f in sites.values()),
            "chosen_disagree": [s for s, f in sites.items() if f["chosen"] != f["chosen_in_site_record"]]}


def over_seeds(runs: list[dict], key: str) -> dict:
    """Means over the seeds' site means (each seed weighted equally) and the sites counted over all seeds."""
    parts = [r[key] for r in runs]
    candidates = runs[0]["candidates"]
    return {
        **{k: _mean(p[k] for p in parts) for k in ("difference_test", "difference_fresh", "difference_fresh_score",
                                                  "oracle_bias", "oracle_selection", *TEST_SIZED_KEYS)},
        "site_seeds": sum(len(p["sites"]) for p in parts),
        **{f"site_seed_{k}": _mean_and_se([r["sites"][s][k] for r in runs for s in r[key]["sites"]])
           for k in ("difference_test", "difference_fresh", "bias", "selection", "noise_of_better",
                     "split_favours_local")},
        "worse_test": sum(len(p["worse_test"]) for p in parts),
        "worse_fresh": sum(len(p["worse_fresh"]) for p in parts),
        "worse_fresh_by_test_se": sum(len(p["worse_fresh_by_test_se"]) for p in parts),
        "site_seed_as_default_fresh": {c: _mean_and_se([r["sites"][s]["as_default_fresh"][c] for r in runs
                                                        for s in r[key]["sites"]]) for c in candidates},
        "mean_fresh_auc": {c: _mean(p["mean_fresh_auc"][c] for p in parts)
                           for c in [*candidates, "chosen", "max_local_global"]},
        "as_default_fresh": {c: _mean(p["as_default_fresh"][c] for p in parts) for c in candidates},
        "as_default_test": {c: _mean(p["as_default_test"][c] for p in parts) for c in candidates},
        "as_default_worse_fresh": {c: sum(len(p["as_default_worse_fresh"][c]) for p in parts) for c in candidates},
    }


def compact(value):
    """``value`` with every float at 5 significant digits (the JSON stays < 100 kB: it is packed into the app)."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [compact(v) for v in value]
    return value


def print_tables(result: dict) -> None:
    runs = result["runs"]
    candidates = runs[0]["candidates"]
    for run in runs:
        print(f"\nseed {run['seed']}: response AUC, test split (t) and {result['fresh_patients']} fresh patients (f); "
              f"sites with ≥ {MIN_TEST_ROWS} test rows")
        print("| site | n test | n fresh | chosen | chosen t / f | max(l,g) t / f | − max t | − max f | f SE | "
              "oracle bias | selection |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in run["sites_30"]["sites"]:
            f = run["sites"][s]
            c = f["chosen"]
            print(f"| {s} | {int(f['n_test'])} | {int(f['n_fresh'])} | {c} | {f['test_auc'][c]:.3f} / "
                  f"{f['fresh_auc'][c]:.3f} | {max(f['test_auc'][LOCAL], f['test_auc'][GLOBAL]):.3f} / "
                  f"{max(f['fresh_auc'][LOCAL], f['fresh_auc'][GLOBAL]):.3f} | {f['difference_test']:+.4f} | "
                  f"{f['difference_fresh']:+.4f} | {f['fresh_se'][c]:.4f} | {f['bias']:+.4f} | "
                  f"{f['selection']:+.4f} |")
        part = run["sites_30"]
        print(f"means: chosen − max test {part['difference_test']:+.4f}, fresh {part['difference_fresh']:+.4f} "
              f"(score {part['difference_fresh_score']:+.4f}); oracle bias {part['oracle_bias']:+.4f} (selection "
              f"{part['oracle_selection']:+.4f}); worse by > SE: test {part['worse_test'] or 'none'}, fresh "
              f"{part['worse_fresh'] or 'none'}; replay check {run['replay_check_max']:.2g}, kept model check "
              f"{run['kept_check_max']:.2g}, run record vs site record choice differ at "
              f"{run['chosen_disagree'] or 'none'}")
    for key, label in (("sites_30", f"sites with ≥ {MIN_TEST_ROWS} test rows"), ("all_sites", "every site")):
        print(f"\nover the seeds, {label} (mean of the seeds' site means; sites counted over all seeds)")
        print("| seed | sites | chosen − max, test | chosen − max, fresh | fresh, by score | oracle bias | "
              "selection part | worse (test) | worse (fresh) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for run in runs:
            p = run[key]
            print(f"| {run['seed']} | {len(p['sites'])} | {p['difference_test']:+.4f} | {p['difference_fresh']:+.4f} "
                  f"| {p['difference_fresh_score']:+.4f} | {p['oracle_bias']:+.4f} | {p['oracle_selection']:+.4f} | "
                  f"{len(p['worse_test'])} | {len(p['worse_fresh'])} |")
        o = result[key]
        print(f"| mean | {o['site_seeds']} | {o['difference_test']:+.4f} | {o['difference_fresh']:+.4f} | "
              f"{o['difference_fresh_score']:+.4f} | {o['oracle_bias']:+.4f} | {o['oracle_selection']:+.4f} | "
              f"{o['worse_test']} | {o['worse_fresh']} |")
        print(f"over {TEST_SIZED_DRAWS} test-split-sized draws of fresh patients per site: E[max(l, g)] − max(L, G) "
              f"{o['expected_bias']:+.4f}; E[chosen − max(l, g)] {o['expected_chosen_minus_max']:+.4f} (P(≥ 0) "
              f"{o['chosen_at_or_above_max']:.2f}); the candidate best on the fresh cohort: E[best − max(l, g)] "
              f"{o['expected_best_minus_max']:+.4f} (P(≥ 0) {o['best_at_or_above_max']:.2f})")
        print(f"chosen worse than max(L, G) on the fresh cohort by more than the test split's SE: "
              f"{o['worse_fresh_by_test_se']}")
        print("| candidate at every site | mean fresh AUC | − max(L, G) fresh | ± SE (site-seeds) | "
              "sites worse (fresh) | − max test |")
        print("|---|---|---|---|---|---|")
        for c in candidates:
            print(f"| {c} | {o['mean_fresh_auc'][c]:.4f} | {o['as_default_fresh'][c]:+.4f} | "
                  f"{o['site_seed_as_default_fresh'][c]['se']:.4f} | {o['as_default_worse_fresh'][c]} | "
                  f"{o['as_default_test'][c]:+.4f} |")
        print(f"| chosen | {o['mean_fresh_auc']['chosen']:.4f} | {o['difference_fresh']:+.4f} | {o['worse_fresh']} | "
              f"{o['difference_test']:+.4f} |")
        print(f"| max(local, global) per site | {o['mean_fresh_auc']['max_local_global']:.4f} | | | |")
        print("over site-seeds (mean ± SE of the mean): " + "; ".join(
            f"{k} {o['site_seed_' + k]['mean']:+.4f} ± {o['site_seed_' + k]['se']:.4f}"
            for k in ("difference_test", "difference_fresh", "bias", "selection", "noise_of_better",
                      "split_favours_local"))
            + f" (n = {o['site_seed_bias']['n']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fresh", type=int, default=FRESH_PATIENTS, help="fresh patients per clinic")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_personalised"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/personalised_fresh.json"))
    parser.add_argument("--dp", action="store_true",
                        help="runs with DP sites: only the global model and each site's kept choice on fresh patients")
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()
    if args.dp:
        runs = [dp_seed_figures(args.work, args.clinics, seed, args.fresh) for seed in args.seeds]
        result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "load_at_start": load,
                  "load_at_end": os.getloadavg(), "clinics": args.clinics, "dp": True, "fresh_patients": args.fresh,
                  "total_s": time.perf_counter() - start, "runs": runs,
                  **{key: {k: _mean_and_se([r["sites"][s][k] for r in runs for s in r[key]["sites"]])
                           for k in ("difference_test", "chosen_minus_global_fresh", "bias_upper")}
                     for key in ("sites_30", "all_sites")}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics.json_safe(compact(result))) + "\n")
        print_dp(runs)
        print(f"\nwrote {args.out} ({result['total_s']:.0f} s, {args.out.stat().st_size / 1000:.0f} kB)")
        return
    runs = [seed_figures(args.work, args.clinics, args.rounds, seed, args.fresh) for seed in args.seeds]
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": sys.version.split()[0],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "load_at_start": load,
              "load_at_end": os.getloadavg(), "clinics": args.clinics, "rounds": args.rounds, "dp": False,
              "fresh_patients": args.fresh, "total_s": time.perf_counter() - start, "runs": runs,
              "sites_30": over_seeds(runs, "sites_30"), "all_sites": over_seeds(runs, "all_sites")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics.json_safe(compact(result))) + "\n")  # one line: small
    print_tables(result)
    print(f"\nwrote {args.out} ({result['total_s']:.0f} s, {args.out.stat().st_size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
