"""Benchmark of federated histogram boosting (``--boosting hist``) against bagging, cyclic and pooled XGBoost.

    python benchmarks/federated_hist.py [--clinics 5] [--rounds 20] [--liposome-folds 5] [--skip-liposome]

1. Simulator: one ``fednano simulate``-equivalent run per mode (bagging, cyclic, hist; XGBoost only, no DP,
   secure summation on for hist): overall AUC / R² of the federated boosters against XGBoost trained pooled,
   boosting-phase wall time, and bytes per tree. Hist bytes are counted on its messages
   (``xgb_hist_traffic.json``); bagging and cyclic bytes are computed from the sizes of their real models
   (bagging round r: every site receives the model of r − 1 rounds and returns its new tree; cyclic round r:
   one site receives the model of r − 1 trees and returns the model of r trees).
2. Liposome (Yanes et al. 2025, the paper's 5 folds, training folds over 3 sites): balanced accuracy of
   federated hist (IID, non-IID) against pooled one-vs-rest XGBoost, plus the pooled hist learner.
Prints tables and writes ``benchmarks/results/federated_hist.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import xgboost as xgb
from record import write_record

from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("response", "toxicity_grade3", "efficacy_pct")


def model_bytes_per_tree(folder: Path, mode: str, n_sites: int) -> tuple[int, int]:
    """Bytes exchanged by bagging or cyclic, from the sizes of the saved models; and the number of trees."""
    total, trees = 0, 0
    for path in sorted(folder.glob("xgb_*.json")):
        if path.name.startswith("xgb_hist"):
            continue
        booster = xgb.Booster(model_file=str(path))
        n = booster.num_boosted_rounds()
        size = [len(booster[:k].save_raw("json")) if k else 0 for k in range(n + 1)]
        one_tree = len(booster[0:1].save_raw("json"))
        if mode == "bagging":
            per_round = n_sites
            for r in range(n // per_round):
                total += n_sites * (size[r * per_round] + one_tree)
        else:
            for r in range(n):
                total += size[r] + size[r + 1]
        trees += n
    return total, trees


def simulator(args, tmp: Path) -> dict:
    results = {}
    for mode in ("bagging", "cyclic", "hist"):
        cfg = ExperimentConfig(out=tmp / mode, clinics=args.clinics, dp=False, seed=0, models="xgboost",
                               boosting=mode, xgb_rounds=args.rounds, compare=False)
        run = run_experiment(cfg)
        models = run["models"]["xgboost"]
        folder = tmp / mode / "federated"
        if mode == "hist":
            traffic = json.loads((folder / "xgb_hist_traffic.json").read_text())
            sent, trees = traffic["bytes_down"] + traffic["bytes_up"], traffic["trees"]
        else:
            sent, trees = model_bytes_per_tree(folder, mode, args.clinics)
        results[mode] = {
            "boosting_phase_s": run["timing"]["xgboost_s"], "trees": trees, "bytes": sent,
            "bytes_per_tree": sent / max(trees, 1),
            "metrics": {o: {m: models[m]["overall"][o] for m in ("federated", "pooled")} for o in OUTCOMES},
        }
    print(f"{'mode':8s} {'outcome':16s} {'federated':>9s} {'pooled':>7s} {'diff':>7s}")
    for mode, r in results.items():
        for outcome, by_model in r["metrics"].items():
            key = "r2" if outcome == "efficacy_pct" else "auc"
            f, p = by_model["federated"][key], by_model["pooled"][key]
            print(f"{mode:8s} {outcome:16s} {f:9.4f} {p:7.4f} {f - p:+7.4f}")
        print(f"{mode:8s} boosting phase {r['boosting_phase_s']:.1f} s, {r['trees']} trees, "
              f"{r['bytes_per_tree'] / 1e3:.1f} kB per tree")
    return results


def liposome(args, tmp: Path) -> dict:
    from simulation import paper_liposome as pl

    settings = pl.FederatedSettings(seed=0)
    table = pl.load_table()
    start = time.perf_counter()
    pooled = {r["model"]: r for r in pl.pooled_fednano_rows(settings, table)}
    fed, _ = pl.federated_rows(settings, range(args.liposome_folds), boosting_modes=("hist",), table=table,
                               work_dir=tmp, on_progress=print)
    base = pooled[pl.XGB_POOLED]["balanced_accuracy_mean"]
    rows = {r["mode"]: r["balanced_accuracy_mean"] for r in fed}
    print(f"{'liposome':26s} {'balanced acc':>12s} {'vs pooled':>9s}")
    print(f"{pl.XGB_POOLED:26s} {base:12.4f}")
    for mode, value in rows.items():
        print(f"hist {mode:21s} {value:12.4f} {value - base:+9.4f}")
    return {"pooled_xgboost_ovr": base, "hist": rows, "folds": args.liposome_folds, "trees_per_class": settings.cyclic,
            "seconds": time.perf_counter() - start, "per_fold": {r["mode"]: r.get("per_fold") for r in fed}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--liposome-folds", type=int, default=5)
    parser.add_argument("--skip-liposome", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated_hist.json")
    args = parser.parse_args()
    flower_environment(ROOT)
    quiet_flower()
    np.seterr(all="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"simulator": simulator(args, Path(tmp))}
        if not args.skip_liposome:
            results["liposome"] = liposome(args, Path(tmp))
    write_record(args.out, "python benchmarks/federated_hist.py", results, clinics=args.clinics, rounds=args.rounds)


if __name__ == "__main__":
    main()
