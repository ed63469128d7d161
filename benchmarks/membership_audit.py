"""Benchmark: what do the released models leak? Membership inference on small simulated federations, with and
without the sites' DP-SGD (issue 16, item 5; ``simulation.membership_audit``).

    python benchmarks/membership_audit.py [--clinics 5] [--patients 120] [--rounds 10] [--epsilon 3] [--seed 0]
                                          [--references 4] [--xgb-rounds 10]

Two runs of ``fednano simulate`` on the same world (``--clinics`` clinics of ``--patients`` patients, seed
``--seed``, ANN and histogram XGBoost, no policy, no comparison models): one without DP, one where every site
trains with DP-SGD at ε = ``--epsilon`` (δ = 1e-5; the default site shares, so the ANN's training gets 90 %; a DP
site takes no part in boosting by default, so the DP run releases no XGBoost). Each is then audited with
``--references`` reference models per family (``fednano audit membership``). Prints, per run, model, head and
attack, the AUC with its standard error and the TPR at 1 % FPR, per episode and per patient, overall and per
site; writes ``benchmarks/results/membership_audit.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from record import write_record  # noqa: E402

from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment  # noqa: E402
from simulation.membership_audit import ALL_HEADS, run_membership_audit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, dp: bool, out: Path) -> dict:
    """One simulated federation and its audit; the audit's JSON and the seconds each took."""
    cfg = ExperimentConfig(out=out, clinics=args.clinics, patients_per_clinic=args.patients, rounds=args.rounds,
                           dp=dp, epsilon=args.epsilon, seed=args.seed, models="ann,xgboost",
                           xgb_rounds=args.xgb_rounds, compare=False, policy=False)
    start = time.perf_counter()
    run_experiment(cfg)
    simulate_s = time.perf_counter() - start
    start = time.perf_counter()
    audit = run_membership_audit(out, references=args.references, seed=args.seed)
    return {"dp": dp, "simulate_s": simulate_s, "audit_s": time.perf_counter() - start, "audit": audit}


def se(m: dict) -> float:
    return m.get("auc_se_clustered", m["auc_se"])


def print_table(results: dict[str, dict]) -> None:
    print(f"{'run':<6} {'model':<8} {'head':<16} {'attack':<11} {'AUC ep ± se':>15} {'TPR@1%':>7} "
          f"{'AUC pt ± se':>15} {'TPR@1%':>7} {'pairs ep/pt':>12}")
    for name, result in results.items():
        for model, heads in result["audit"]["attacks"].items():
            for head, attacks in heads.items():
                for attack, metrics in attacks.items():
                    ep, pt = metrics["overall"], metrics["patients"]["overall"]
                    print(f"{name:<6} {model:<8} {head:<16} {attack:<11} {ep['auc']:>7.3f} ± {se(ep):.3f} "
                          f"{ep['tpr_at_1pct_fpr']:>7.3f} {pt['auc']:>7.3f} ± {se(pt):.3f} "
                          f"{pt['tpr_at_1pct_fpr']:>7.3f} "
                          f"{ep['members']:>6}/{pt['members']:<5}")
    print("\nper site, headline (calibrated attack, ANN, sum of the outcomes' losses; episodes | patients):")
    for name, result in results.items():
        audit = result["audit"]
        for site, m in audit["per_site"].items():
            p = audit["patients"]["per_site"][site]
            print(f"{name:<6} {site:<10} AUC {m['auc']:.3f} ± {se(m):.3f} TPR@1% {m['tpr_at_1pct_fpr']:.3f} "
                  f"({m['members']} pairs, {m['false_positives_at_1pct']} FP allowed) | AUC {p['auc']:.3f} ± "
                  f"{se(p):.3f} TPR@1% {p['tpr_at_1pct_fpr']:.3f} ({p['members']} pairs)")
        print(f"{name:<6} {'overall':<10} AUC {audit['overall']['auc']:.3f} ± {se(audit['overall']):.3f} "
              f"TPR@1% {audit['overall']['tpr_at_1pct_fpr']:.3f} | AUC {audit['patients']['overall']['auc']:.3f} ± "
              f"{se(audit['patients']['overall']):.3f}; simulate {result['simulate_s']:.0f} s, "
              f"audit {result['audit_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--xgb-rounds", type=int, default=10)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "benchmark_membership_audit")
    args = parser.parse_args(argv)
    flower_environment(ROOT)
    quiet_flower()
    started = time.perf_counter()
    results = {name: run(args, dp, args.work / name) for name, dp in (("no_dp", False), ("dp", True))}
    print_table(results)
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    summary = {name: {"dp": r["dp"], "simulate_s": r["simulate_s"], "audit_s": r["audit_s"],
                      "headline": r["audit"]["headline"], "overall": r["audit"]["overall"],
                      "per_site": r["audit"]["per_site"], "patients": r["audit"]["patients"],
                      "dp_budget": r["audit"]["dp"], "rows": r["audit"]["rows"],
                      "attacks": {model: {head: {attack: {"overall": m["overall"],
                                                          "patients": m["patients"]["overall"]}
                                                 for attack, m in attacks.items()}
                                          for head, attacks in heads.items()}
                                  for model, heads in r["audit"]["attacks"].items()}}
               for name, r in results.items()}
    write_record(ROOT / "benchmarks" / "results" / "membership_audit.json",
                 "python benchmarks/membership_audit.py " + " ".join(argv or sys.argv[1:]),
                 {"runs": summary, "total_s": total, "all_heads": ALL_HEADS}, settings=vars(args) | {"work": None})


if __name__ == "__main__":
    main()
