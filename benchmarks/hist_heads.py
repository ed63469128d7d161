"""Histogram boosting's heads grown together vs one after the other, on the liposome folds, in one run.

    python benchmarks/hist_heads.py [--folds 1,2,3,4,5] [--splits iid,noniid] [--out benchmarks/results/hist_heads.json]

Issue 17: ``fednano paper liposome`` runs 10 histogram-boosting simulations (5 folds × IID / non-IID, 3 sites, 30
rounds of 3 one-vs-rest heads), and their phase was ~280 Flower exchanges each, one per head and tree level.
``xgb-hist-batch-heads`` (``server.hist_phase``, default on) grows a round's three heads level by level in the
same requests. For each fold and split this runs the same simulation (``simulation.paper_liposome.federate``,
Flower's simulation engine, secure sum pairwise as the paper command) twice in one Ray session, head after head
(``per-head``, the exchanges of the code before) and batched, alternating which goes first, after one uncounted
warm-up simulation (Ray's start and the actors' imports). Per run, from the phase's ``xgb_hist_traffic.json``:
message exchanges (level requests per boosting round, and all of the phase's), the phase's seconds (training and
the final evaluation at the sites), bytes per tree; from the saved models on the held-out fold: balanced accuracy,
macro one-vs-rest AUC and the largest difference of a predicted probability between the two runs (the trees are
the same, so it must be 0 within float noise).

Prints a table (per run and the batched/per-head ratios) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from record import write_record
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = {"per-head": False, "batched": True}
LEVEL = "query.hist_level"


def one_run(folder: Path, parts, test, batch: bool) -> dict:
    """One federated hist simulation of a fold's sites; its traffic, timing and held-out predictions."""
    from shared.artifacts import RunArtifacts
    from simulation import paper_liposome as pl

    settings = pl.FederatedSettings(seed=0, hist_batch_heads=batch)
    start = time.perf_counter()
    scores = pl.federate(folder, parts, test, settings, "hist")[pl.XGB_HIST]
    wall = time.perf_counter() - start
    federated = folder / "run" / "federated"
    traffic = json.loads((federated / "xgb_hist_traffic.json").read_text())
    proba = np.asarray(RunArtifacts.open(federated).predict_xgboost(test)[pl.TARGET], dtype=float)
    classes = [int(float(c)) for c in RunArtifacts.open(federated).encoder().classes_[pl.TARGET]]
    y = test[pl.TARGET].to_numpy().astype(int)
    present = [i for i, c in enumerate(classes) if (y == c).any() and (y != c).any()]
    auc = float(np.mean([roc_auc_score(y == classes[i], proba[:, i]) for i in present])) if present else None
    exchanges = traffic["exchanges"]
    return {"wall_s": wall, "phase_s": traffic["seconds"], "trees": traffic["trees"], "rounds": traffic["rounds"],
            "exchanges": sum(exchanges.values()), "level_exchanges": exchanges.get(LEVEL, 0),
            "level_exchanges_per_round": exchanges.get(LEVEL, 0) / traffic["rounds"],
            "bytes_per_tree": (traffic["bytes_down"] + traffic["bytes_up"]) / max(traffic["trees"], 1),
            "bytes_up_per_tree": traffic["bytes_up"] / max(traffic["trees"], 1),
            "balanced_accuracy": scores["balanced_accuracy"], "auc_ovr_macro": auc, "proba": proba.tolist()}


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="1,2,3,4,5", help="paper folds, 1-based")
    parser.add_argument("--splits", default="iid,noniid")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hist_heads.json")
    args = parser.parse_args()
    from simulation import paper_liposome as pl
    from simulation.experiment import flower_environment, quiet_flower
    from simulation.flower_runtime import ray_session

    flower_environment(ROOT)
    quiet_flower()
    np.seterr(all="ignore")
    table = pl.load_table()
    methods = pl.release_method(table)
    all_folds = pl.folds(table)
    fold_ids = [int(f) - 1 for f in args.folds.split(",")]
    splits = args.splits.split(",")
    runs: list[dict] = []
    print(f"load average at the start (1/5/15 min): {load()}")
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        train_idx, test_idx = all_folds[fold_ids[0]]
        parts, _ = pl.split_training_fold(table, train_idx, splits[0], 0, methods)
        one_run(Path(tmp) / "warm-up", parts, table.iloc[test_idx], True)  # Ray, actors, imports: not counted
        for n, (k, split) in enumerate((k, s) for k in fold_ids for s in splits):
            train_idx, test_idx = all_folds[k]
            test = table.iloc[test_idx]
            parts, _ = pl.split_training_fold(table, train_idx, split, 0, methods)
            order = list(MODES) if n % 2 == 0 else list(reversed(MODES))
            pair = {}
            for mode in order:
                pair[mode] = one_run(Path(tmp) / f"fold{k + 1}-{split}-{mode}", parts, test, MODES[mode])
                pair[mode]["load"] = load()
            diff = float(np.max(np.abs(np.subtract(pair["batched"]["proba"], pair["per-head"]["proba"]))))
            for mode in MODES:
                runs.append({"fold": k + 1, "split": split, "mode": mode, "first": mode == order[0],
                             "max_proba_diff": diff, **{key: v for key, v in pair[mode].items() if key != "proba"}})
                r = runs[-1]
                print(f"fold {k + 1} {split:6s} {mode:8s} level exchanges/round {r['level_exchanges_per_round']:5.2f} "
                      f"(phase {r['exchanges']:3d}), phase {r['phase_s']:5.1f} s, wall {r['wall_s']:5.1f} s, "
                      f"{r['bytes_per_tree'] / 1e3:6.1f} kB/tree, BA {r['balanced_accuracy']:.3f}, AUC "
                      f"{r['auc_ovr_macro'] if r['auc_ovr_macro'] is None else round(r['auc_ovr_macro'], 4)}, "
                      f"max |Δp| {diff:.1e}, load {r['load']}")
    summary = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {key: float(np.mean([r[key] for r in mine])) for key in
                         ("level_exchanges_per_round", "exchanges", "phase_s", "wall_s", "bytes_per_tree",
                          "bytes_up_per_tree", "balanced_accuracy")}
        aucs = [r["auc_ovr_macro"] for r in mine if r["auc_ovr_macro"] is not None]
        summary[mode]["auc_ovr_macro"] = float(np.mean(aucs)) if aucs else None
    ratio = {key: summary["batched"][key] / summary["per-head"][key] for key in
             ("level_exchanges_per_round", "exchanges", "phase_s", "wall_s", "bytes_per_tree", "bytes_up_per_tree")}
    largest = max(r["max_proba_diff"] for r in runs)
    print(f"\n{'mean over ' + str(len(runs) // 2) + ' simulations':28s} {'per-head':>10s} {'batched':>10s} "
          f"{'batched/per-head':>17s}")
    for key in ratio:
        print(f"{key:28s} {summary['per-head'][key]:10.2f} {summary['batched'][key]:10.2f} {ratio[key]:17.3f}")
    for key in ("balanced_accuracy", "auc_ovr_macro"):
        print(f"{key:28s} {summary['per-head'][key] or float('nan'):10.4f} "
              f"{summary['batched'][key] or float('nan'):10.4f}")
    print(f"largest |Δ predicted probability| between the modes: {largest:.2e}; load average at the end: {load()}")
    write_record(args.out, "python benchmarks/hist_heads.py " + " ".join(
        f"--{k} {v}" for k, v in (("folds", args.folds), ("splits", args.splits))),
        {"runs": runs, "mean": summary, "ratio": ratio, "max_proba_diff": largest}, load_end=load())


if __name__ == "__main__":
    main()
