"""Benchmark of personalisation on real data split non-IID by drug (issue 18's second measurement): the liposome
release-class table over the paper's 5 folds, 3 sites holding different drugs.

    python benchmarks/personalised_liposome.py [--folds 1 2 3 4 5] [--seed 0]
                                               [--out benchmarks/results/personalised_liposome.json]

Data: Yanes et al., Digital Discovery 2025 (doi:10.1039/D5DD00112A, CC BY 4.0), 77 formulations, 3 release
classes (``simulation.paper_liposome``). For each of the paper's folds (StratifiedKFold(5, shuffle,
random_state=15)), the training fold goes to 3 sites by whole drug (``API_type``) groups, as ``fednano paper
liposome``'s non-IID rows do (``noniid_sites``; the release method if that is degenerate); each held-out row goes
to the site holding its drug, so every site is tested on its own case mix. Of a site's training rows, a seeded 25 %
(at least 2) is its validation split, on which it chooses. One ``run_federation`` per fold (the real ServerApp and
ClientApp in Flower's simulation runtime, no DP): the ANN (FedAvg) with ``--personalise finetune,ditto,fedper``
and histogram boosting with ``--personalise site-trees``.

Figures, from each site's own exact record of both phases (``simulation.personalisation.site_records``):

1. **Per site**, the test summaries of each candidate summed over the 5 folds (each site's held-out rows over
   the folds are its whole table: 20 to 36 rows; ``shared.metrics.combine``), their macro one-vs-rest AUC (the
   metric the sites choose by), the chosen model's AUC minus max(local-only, global), and a bootstrap-free
   noise scale: the Hanley & McNeil (1982) standard error of that AUC at the site's class counts (pairwise
   one-vs-rest, averaged).
2. **Mean per-site AUC** of each candidate and of the choice, and how often each was chosen (sites × folds).
3. **Cost** against plain FedAvg: seconds and bytes of each personalisation phase next to the federation's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from personalised import hanley_mcneil_se
from record import machine, write_record

from client.app import SiteSource
from shared import metrics
from shared.protocol.personalisation import GLOBAL, LOCAL
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation
from simulation.paper_liposome import (
    N_FOLDS,
    TARGET,
    FederatedSettings,
    folds,
    load_table,
    noniid_sites,
    release_method,
    task_toml_text,
)
from simulation.personalisation import site_records

FAMILIES = {"ann": (GLOBAL, "finetune", "ditto", "fedper", LOCAL), "xgboost": (GLOBAL, "site-trees", LOCAL)}
VAL_SHARE = 0.25


def fold_sites(table: pd.DataFrame, methods: pd.Series, train_idx: np.ndarray, test_idx: np.ndarray,
               seed: int) -> tuple[list[pd.DataFrame], dict]:
    """Each site's rows with a ``split`` column: its part of the training fold (train / val) and the held-out rows
    of its drugs (test). Held-out rows of a drug no site trained on are left out and counted."""
    train = table.iloc[train_idx]
    parts, how = noniid_sites(train, methods.iloc[train_idx])
    key = table["API_type"] if how["by"] == "API_type" else methods
    site_of = {str(value): site for value, site in how["assignment"].items()}
    test = table.iloc[test_idx]
    test_site = key.iloc[test_idx].astype(str).map(site_of)
    rng = np.random.default_rng(seed)
    frames = []
    for site, rows in enumerate(parts):
        own = train.iloc[rows].assign(split="train")
        n_val = max(2, round(VAL_SHARE * len(own)))
        own.iloc[rng.choice(len(own), size=n_val, replace=False), own.columns.get_loc("split")] = "val"
        frames.append(pd.concat([own, test[test_site == site].assign(split="test")]))
    return frames, {**how, "test_rows_without_a_site": int(test_site.isna().sum())}


def run_fold(root: Path, frames: list[pd.DataFrame], settings: FederatedSettings) -> dict:
    """One federation over the fold's sites; each site's exact personalisation records, by family."""
    root.mkdir(parents=True, exist_ok=True)
    task_path = root / "task.toml"
    task_path.write_text(task_toml_text())
    sources = {}
    for k, frame in enumerate(frames):
        path = root / f"site_{k + 1}.csv"
        frame.to_csv(path, index=False)
        sources[path.stem] = SiteSource(path, task_path)
    cfg = ExperimentConfig(out=root / "run", rounds=settings.rounds, seed=settings.seed, dp=False, task=task_path,
                           local_epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                           hidden=settings.hidden, models="ann,xgboost", boosting="hist",
                           xgb_rounds=settings.trees, compare=False, policy=False,
                           personalise="finetune,ditto,fedper,site-trees")
    start = time.perf_counter()
    record = run_federation(cfg, list(sources.values()))
    seconds = time.perf_counter() - start
    named = {name: sources[name] for name in record.sites if name in sources}
    phases = {"ann": record.personalisation or {}, "xgboost": record.personalisation_xgboost or {}}
    return {"seconds": seconds,
            "training_s": {family: record.models[family].seconds for family in FAMILIES},
            "records": {family: site_records(named, record.run_id, family) for family in FAMILIES},
            "phases": {family: {"seconds": p.get("seconds"), "bytes": p.get("bytes")} for family, p in phases.items()}}


def macro_auc_se(summary: dict) -> float:
    """Mean over classes of the one-vs-rest AUC's Hanley & McNeil standard error, at this summary's counts."""
    hist_pos = np.asarray(summary["hist_pos"], dtype=float)
    k = int(round(math.sqrt(len(summary["confusion"]))))
    hist_pos = hist_pos.reshape(k, -1)
    n = float(summary["n"])
    auc = metrics.multiclass_metrics(summary)["auc"]
    ses = [hanley_mcneil_se(auc, int(pos.sum()), int(n - pos.sum())) for pos in hist_pos if 0 < pos.sum() < n]
    return statistics.fmean(ses) if ses else math.nan


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def figures(fold_runs: list[dict]) -> dict:
    out = {}
    for family, candidates in FAMILIES.items():
        pooled: dict[str, dict[str, list]] = {}
        chosen_count = dict.fromkeys(candidates, 0)
        fold_diffs = []
        for run in fold_runs:
            for site, entry in run["records"][family].items():
                test = entry["summaries"]["test"]
                for c in candidates:
                    pooled.setdefault(site, {}).setdefault(c, []).append(test[c][TARGET])
                pooled[site].setdefault("chosen", []).append(test[entry["chosen"]][TARGET])
                chosen_count[entry["chosen"]] += 1
                auc = {c: metrics.multiclass_metrics(test[c][TARGET])["auc"] for c in candidates}
                diff = auc[entry["chosen"]] - max(auc[LOCAL], auc[GLOBAL])
                if math.isfinite(diff):
                    fold_diffs.append(diff)
        sites = {}
        for site, by_candidate in sorted(pooled.items()):
            summaries = {c: metrics.combine(s) for c, s in by_candidate.items()}
            auc = {c: metrics.multiclass_metrics(s)["auc"] for c, s in summaries.items()}
            sites[site] = {"n_test": int(summaries[GLOBAL]["n"]), "auc": auc,
                           "chosen_minus_max_local_global": auc["chosen"] - max(auc[LOCAL], auc[GLOBAL]),
                           "se": macro_auc_se(summaries["chosen"])}
        out[family] = {
            "sites": sites,
            "mean_auc": {c: _mean(s["auc"][c] for s in sites.values()) for c in (*candidates, "chosen")},
            "better_on_average_by": _mean(s["chosen_minus_max_local_global"] for s in sites.values()),
            "worse_by_more_than_1se": [site for site, s in sites.items()
                                       if s["chosen_minus_max_local_global"] < -s["se"]],
            "per_fold_site_mean_difference": statistics.fmean(fold_diffs) if fold_diffs else math.nan,
            "chosen": chosen_count,
        }
    return out


def _f(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def print_tables(result: dict) -> None:
    for family, candidates in FAMILIES.items():
        f = result["figures"][family]
        print(f"\n{family}: test rows of each site over the {len(result['folds'])} folds; macro one-vs-rest AUC")
        print("| site | n | " + " | ".join(candidates) + " | chosen | chosen − max(l, g) | SE |")
        print("|---|---|" + "---|" * (len(candidates) + 3))
        for site, s in f["sites"].items():
            print(f"| {site} | {s['n_test']} | " + " | ".join(_f(s["auc"][c]) for c in candidates)
                  + f" | {_f(s['auc']['chosen'])} | {_f(s['chosen_minus_max_local_global'])} | {_f(s['se'])} |")
        print("mean per-site AUC: " + ", ".join(f"{c} {_f(v)}" for c, v in f["mean_auc"].items()))
        print(f"chosen − max(local, global): {_f(f['better_on_average_by'])} (pooled folds), "
              f"{_f(f['per_fold_site_mean_difference'])} (mean over folds × sites); worse by > 1 SE: "
              f"{f['worse_by_more_than_1se'] or 'none'}; chosen (sites × folds): {f['chosen']}")
    c = result["cost"]
    print(f"\ncost per fold (mean): federation {c['federation_s']:.1f} s (ANN training {c['ann_training_s']:.1f} s, "
          f"boosting {c['xgboost_training_s']:.1f} s); ANN personalisation {c['ann_personalisation_s']:.1f} s, "
          f"{c['ann_personalisation_bytes']:.0f} B; boosting personalisation {c['xgboost_personalisation_s']:.1f} s, "
          f"{c['xgboost_personalisation_bytes']:.0f} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(1, N_FOLDS + 1)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/personalised_liposome.json"))
    args = parser.parse_args()
    flower_environment(Path.cwd())
    quiet_flower()
    start, load = time.perf_counter(), os.getloadavg()[0]
    settings = FederatedSettings(seed=args.seed)
    table = load_table()
    methods = release_method(table)
    runs, splits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (train_idx, test_idx) in enumerate(folds(table), start=1):
            if k not in args.folds:
                continue
            frames, how = fold_sites(table, methods, train_idx, test_idx, args.seed + k)
            splits.append({"fold": k, **how, "rows": {split: [int((f["split"] == split).sum()) for f in frames]
                                                      for split in ("train", "val", "test")}})
            runs.append(run_fold(Path(tmp) / f"fold{k}", frames, settings))
            print(f"fold {k}: {runs[-1]['seconds']:.1f} s, rows {splits[-1]['rows']}", flush=True)

    def mean(values):
        values = [v for v in values if isinstance(v, int | float)]
        return statistics.fmean(values) if values else math.nan

    def phase_bytes(run, family):
        b = run["phases"][family]["bytes"] or {}
        return (b.get("sent") or 0) + (b.get("received") or 0)

    result = {"folds": splits, "settings": vars(settings), "figures": figures(runs),
              # each site's choice and reason per fold (its fine-binned summaries would be ~30 MB)
              "site_records": [{family: {site: {"chosen": e["chosen"], "reason": e["reason"]}
                                         for site, e in r["records"][family].items()}
                                for family in FAMILIES} for r in runs],
              "cost": {"federation_s": mean(r["seconds"] for r in runs),
                       "ann_training_s": mean(r["training_s"]["ann"] for r in runs),
                       "xgboost_training_s": mean(r["training_s"]["xgboost"] for r in runs),
                       "ann_personalisation_s": mean(r["phases"]["ann"]["seconds"] for r in runs),
                       "ann_personalisation_bytes": mean(phase_bytes(r, "ann") for r in runs),
                       "xgboost_personalisation_s": mean(r["phases"]["xgboost"]["seconds"] for r in runs),
                       "xgboost_personalisation_bytes": mean(phase_bytes(r, "xgboost") for r in runs)},
              "total_s": time.perf_counter() - start}
    result = metrics.json_safe(result)
    print_tables(result)
    write_record(args.out, "python benchmarks/personalised_liposome.py " + " ".join(sys.argv[1:]), result,
                 machine=machine(load_at_start=load))


if __name__ == "__main__":
    main()
