"""Benchmark of federated XGBoost (Flower's FedXgbBagging and FedXgbCyclic) on the simulator.

    python benchmarks/federated_xgboost.py [--clinics 10] [--rounds 20]

For each mode, one ``fednano simulate``-equivalent run with XGBoost only: the federated boosters' overall
AUC / R² against the same boosters trained pooled, and wall times (whole federation, of which the boosting
phase). Prints a table and writes ``benchmarks/results/federated_xgboost.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from record import write_record

from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated_xgboost.json")
    args = parser.parse_args()
    flower_environment(ROOT)
    quiet_flower()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("bagging", "cyclic"):
            cfg = ExperimentConfig(out=Path(tmp) / mode, clinics=args.clinics, dp=False, seed=0, models="xgboost",
                                   boosting=mode, xgb_rounds=args.rounds, compare=False)
            run = run_experiment(cfg)
            models = run["models"]["xgboost"]
            results[mode] = {
                "federation_s": run["timing"]["federation_s"],
                "boosting_phase_s": run["timing"]["xgboost_s"],
                "metrics": {outcome: {m: models[m]["overall"][outcome] for m in ("federated", "local", "pooled")}
                            for outcome in ("response", "toxicity_grade3", "efficacy_pct")},
            }
    print(f"{'mode':8s} {'outcome':16s} {'federated':>9s} {'local':>7s} {'pooled':>7s} {'fed/pooled':>10s}")
    for mode, r in results.items():
        for outcome, by_model in r["metrics"].items():
            key = "r2" if outcome == "efficacy_pct" else "auc"
            f, lo, p = (by_model[m][key] for m in ("federated", "local", "pooled"))
            print(f"{mode:8s} {outcome:16s} {f:9.3f} {lo:7.3f} {p:7.3f} {f / p:10.3f}")
        print(f"{mode:8s} wall time: federation {r['federation_s']:.1f} s, "
              f"boosting phase {r['boosting_phase_s']:.1f} s")
    write_record(args.out, "python benchmarks/federated_xgboost.py", results, clinics=args.clinics,
                 rounds=args.rounds)


if __name__ == "__main__":
    main()
