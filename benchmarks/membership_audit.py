"""Benchmark: what do the released models leak? Membership inference on small simulated federations, with and
without the sites' DP-SGD (issue 16, item 5; ``simulation.membership_audit``).

    python benchmarks/membership_audit.py [--clinics 5] [--patients 120] [--rounds 10] [--epsilon 3] [--seed 0]
                                          [--references 4] [--xgb-rounds 10] [--non-members test|fresh]
                                          [--also-epsilon 1] [--worlds 1] [--reuse]
                                          [--json benchmarks/results/NAME.json]

Two runs of ``fednano simulate`` on the same world (``--clinics`` clinics of ``--patients`` patients, seed
``--seed``, ANN and histogram XGBoost, no policy, no comparison models): one without DP, one where every site
trains with DP-SGD at ε = ``--epsilon`` (δ = 1e-5; the default site shares, so the ANN's training gets 90 %; a DP
site takes no part in boosting by default, so the DP run releases no XGBoost). Each is then audited with
``--references`` reference models per family (``fednano audit membership``). Prints, per run, model, head and
attack, the AUC with its standard error and the TPR at 1 % FPR, per episode and per patient, overall and per
site; writes ``benchmarks/results/membership_audit.json`` (or ``--json``).

``--non-members fresh`` audits every training patient against the test patients plus fresh simulated patients
of the same clinics (``simulation.membership_audit.fresh_patients``): about 8× the pairs of ``test`` at the
default 80:10:10 split, for the same reference models. ``--also-epsilon`` adds DP runs at further budgets (named
``dp_eps<ε>``); ``--worlds K`` repeats everything on the worlds of seeds ``--seed`` … ``--seed`` + K − 1 and
pools them: the mean of the K AUCs (and TPRs), with the standard error √(Σ se²) / K of independent worlds;
``--reuse`` audits an earlier run's folder again instead of simulating it anew (its
``results.json`` must hold the same world, rounds and budget).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from record import write_record  # noqa: E402

from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment  # noqa: E402
from simulation.membership_audit import ALL_HEADS, NON_MEMBERS, run_membership_audit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def same_run(out: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``out`` holds a finished run of ``cfg``'s world, rounds, models and budget (``--reuse``)."""
    try:
        done = json.loads((out / "results.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    keys = ("clinics", "patients_per_clinic", "rounds", "dp", "seed", "models", "xgb_rounds")
    return (all(done.get(k) == getattr(cfg, k) for k in keys)
            and (not cfg.dp or float(done.get("epsilon", -1)) == float(cfg.epsilon)))


def run(args: argparse.Namespace, epsilon: float | None, seed: int, out: Path) -> dict:
    """One simulated federation of world ``seed`` (``epsilon`` None: without DP) and its audit; the audit's JSON
    and the seconds each took (``simulate_s`` None: an earlier run reused)."""
    cfg = ExperimentConfig(out=out, clinics=args.clinics, patients_per_clinic=args.patients, rounds=args.rounds,
                           dp=epsilon is not None, epsilon=epsilon if epsilon is not None else args.epsilon,
                           seed=seed, models="ann,xgboost", xgb_rounds=args.xgb_rounds, compare=False,
                           policy=False)
    simulate_s = None
    if not (args.reuse and same_run(out, cfg)):
        start = time.perf_counter()
        run_experiment(cfg)
        simulate_s = time.perf_counter() - start
    start = time.perf_counter()
    audit = run_membership_audit(out, references=args.references, seed=cfg.seed, non_members=args.non_members)
    return {"dp": cfg.dp, "epsilon": epsilon, "simulate_s": simulate_s, "audit_s": time.perf_counter() - start,
            "audit": audit}


def se(m: dict) -> float:
    return m.get("auc_se_clustered", m["auc_se"])


def slim(m: dict, balanced: bool = True) -> dict:
    """The figures of one metric dict that the JSON keeps (the AUC, the standard error to read, TPR, counts;
    ``balanced``: as many non-members as members, so only ``members`` is kept)."""
    return {"auc": m["auc"], "se": se(m), "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"], "members": m["members"],
            **({} if balanced else {"non_members": m["non_members"]}),
            "false_positives_at_1pct": m["false_positives_at_1pct"]}


def rounded(value, digits: int = 4):
    """``value`` with every float rounded to ``digits`` significant digits (the JSON stays under the 100 kB every
    bundled *.json must; an AUC's standard error is ≥ 0.009 here, so four digits lose nothing, and δ = 1e-5
    keeps its value)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def pool(metrics: list[dict]) -> dict:
    """Independent worlds' estimates of one AUC pooled: their mean, with standard error √(Σ se²) / K; the mean
    TPR at 1 % FPR with the spread of the K TPRs (standard error of their mean, None for one world)."""
    k = len(metrics)
    tprs = np.array([m["tpr_at_1pct_fpr"] for m in metrics])
    return {"auc": float(np.mean([m["auc"] for m in metrics])),
            "se": float(np.sqrt(np.sum([se(m) ** 2 for m in metrics])) / k),
            "tpr_at_1pct_fpr": float(tprs.mean()), "tpr_se": float(tprs.std(ddof=1) / np.sqrt(k)) if k > 1 else None,
            "members": int(sum(m["members"] for m in metrics)),
            "non_members": int(sum(m["non_members"] for m in metrics)),
            "false_positives_at_1pct": int(sum(m["false_positives_at_1pct"] for m in metrics)), "worlds": k}


def brief(pooled_metrics: dict) -> dict:
    """A pooled balanced comparison as the every-attack table keeps it: AUC, se, TPR (and its se), pairs."""
    return {k: pooled_metrics[k] for k in ("auc", "se", "tpr_at_1pct_fpr", "tpr_se", "members")}


def pooled(worlds: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per run name: every model × head × attack (episodes and patients), the headline and its non-member check,
    pooled over the worlds."""
    result: dict[str, dict] = {}
    for name in next(iter(worlds.values())):
        audits = [w[name]["audit"] for w in worlds.values()]
        attacks = {model: {head: {attack: {"episodes": brief(pool([a["attacks"][model][head][attack]["overall"]
                                                                   for a in audits])),
                                           "patients": brief(pool([a["attacks"][model][head][attack]["patients"]
                                                                   ["overall"] for a in audits]))}
                                  for attack in attacks}
                           for head, attacks in heads.items()}
                   for model, heads in audits[0]["attacks"].items() if all(model in a["attacks"] for a in audits)}
        checks = [a["non_member_check"] for a in audits if a.get("non_member_check")]
        result[name] = {"headline": audits[0]["headline"], "overall": pool([a["overall"] for a in audits]),
                        "patients": pool([a["patients"]["overall"] for a in audits]), "attacks": attacks,
                        "non_member_check": ({"episodes": pool(checks),
                                              "patients": pool([c["patients"] for c in checks]),
                                              "members_vs_test": {
                                                  "episodes": pool([c["members_vs_test"] for c in checks]),
                                                  "patients": pool([c["members_vs_test"]["patients"]
                                                                    for c in checks])}}
                                             if checks else None)}
    return result


def print_table(worlds: dict[int, dict[str, dict]], summary: dict[str, dict]) -> None:
    k = len(worlds)
    print(f"every model × head × attack, overall{f', mean of {k} worlds' if k > 1 else ''}:")
    print(f"{'run':<8} {'model':<8} {'head':<16} {'attack':<11} {'AUC ep ± se':>15} {'TPR@1%':>7} "
          f"{'AUC pt ± se':>15} {'TPR@1%':>7} {'pairs ep/pt':>12}")
    for name, result in summary.items():
        for model, heads in result["attacks"].items():
            for head, attacks in heads.items():
                for attack, metrics in attacks.items():
                    ep, pt = metrics["episodes"], metrics["patients"]
                    print(f"{name:<8} {model:<8} {head:<16} {attack:<11} {ep['auc']:>7.3f} ± {ep['se']:.3f} "
                          f"{ep['tpr_at_1pct_fpr']:>7.3f} {pt['auc']:>7.3f} ± {pt['se']:.3f} "
                          f"{pt['tpr_at_1pct_fpr']:>7.3f} {ep['members']:>6}/{pt['members']:<5}")
    print("\nper world and site, headline (calibrated attack, ANN, sum of the outcomes' losses; episodes | patients):")
    for seed, runs in worlds.items():
        for name, result in runs.items():
            audit = result["audit"]
            for site, m in audit["per_site"].items():
                p = audit["patients"]["per_site"][site]
                print(f"w{seed} {name:<8} {site:<10} AUC {m['auc']:.3f} ± {se(m):.3f} "
                      f"TPR@1% {m['tpr_at_1pct_fpr']:.3f} "
                      f"({m['members']} pairs, {m['false_positives_at_1pct']} FP allowed) | AUC {p['auc']:.3f} ± "
                      f"{se(p):.3f} TPR@1% {p['tpr_at_1pct_fpr']:.3f} ({p['members']} pairs, "
                      f"{p['false_positives_at_1pct']} FP)")
            o, p = audit["overall"], audit["patients"]["overall"]
            print(f"w{seed} {name:<8} {'overall':<10} AUC {o['auc']:.3f} ± {se(o):.3f} TPR@1% "
                  f"{o['tpr_at_1pct_fpr']:.3f} | AUC {p['auc']:.3f} ± {se(p):.3f} TPR@1% {p['tpr_at_1pct_fpr']:.3f}; "
                  f"simulate {_seconds(result['simulate_s'])}, audit {result['audit_s']:.0f} s "
                  f"({', '.join(f'{key} {v:.0f} s' for key, v in audit['seconds'].items())})")
            check = audit.get("non_member_check")
            if check:
                print(f"w{seed} {name:<8} fresh vs test non-members (chance expected): AUC {check['auc']:.3f} ± "
                      f"{se(check):.3f} episodes, {check['patients']['auc']:.3f} ± {se(check['patients']):.3f} "
                      f"patients ({check['patients']['members']} test / {check['patients']['non_members']} fresh); "
                      f"members vs test only {check['members_vs_test']['auc']:.3f} ± "
                      f"{se(check['members_vs_test']):.3f} ep, {check['members_vs_test']['patients']['auc']:.3f} ± "
                      f"{se(check['members_vs_test']['patients']):.3f} pt")
    print(f"\nheadline{f', mean of {k} worlds' if k > 1 else ''}:")
    for name, result in summary.items():
        o, p, c = result["overall"], result["patients"], result["non_member_check"]
        print(f"{name:<8} AUC episodes {o['auc']:.3f} ± {o['se']:.3f} (95 % up to {o['auc'] + 1.96 * o['se']:.3f}) "
              f"TPR@1% {o['tpr_at_1pct_fpr']:.3f} ({o['members']} pairs, {o['false_positives_at_1pct']} FP) | "
              f"patients {p['auc']:.3f} ± {p['se']:.3f} (95 % up to {p['auc'] + 1.96 * p['se']:.3f}) "
              f"TPR@1% {p['tpr_at_1pct_fpr']:.3f} ({p['members']} pairs, {p['false_positives_at_1pct']} FP)"
              + (f"; fresh vs test {c['episodes']['auc']:.3f} ± {c['episodes']['se']:.3f} ep, "
                 f"{c['patients']['auc']:.3f} ± {c['patients']['se']:.3f} pt; members vs test only "
                 f"{c['members_vs_test']['episodes']['auc']:.3f} ± {c['members_vs_test']['episodes']['se']:.3f} ep, "
                 f"{c['members_vs_test']['patients']['auc']:.3f} ± {c['members_vs_test']['patients']['se']:.3f} pt"
                 if c else ""))


def world_summary(result: dict) -> dict:
    """What the JSON keeps of one world's run (the pooled figures hold the rest; every bundled *.json must stay
    under 100 kB): seconds, the tightest site's budget, the headline overall and per site (AUC, se, TPR, pairs;
    1 % of the pairs, rounded down, are the false positives allowed) and the non-member check's AUCs."""
    audit = result["audit"]
    budgets = [b for b in audit["dp"].values() if b is not None]

    def short(m: dict) -> dict:
        return {"auc": m["auc"], "se": se(m)}

    check = audit["non_member_check"]
    return {"dp": result["dp"], "epsilon": result["epsilon"], "simulate_s": result["simulate_s"],
            "audit_s": result["audit_s"], "audit_seconds": audit["seconds"],
            "dp_budget": min(budgets, key=lambda b: b["epsilon_budget"], default=None),
            "overall": slim(audit["overall"]), "patients": slim(audit["patients"]["overall"]),
            "per_site": {site: {unit: {k: v for k, v in slim(m).items() if k != "false_positives_at_1pct"}
                                for unit, m in (("episodes", m), ("patients", audit["patients"]["per_site"][site]))}
                         for site, m in audit["per_site"].items()},
            "non_member_check": ({"episodes": short(check), "patients": short(check["patients"]),
                                  "members_vs_test": {"episodes": short(check["members_vs_test"]),
                                                      "patients": short(check["members_vs_test"]["patients"])}}
                                 if check else None)}


def _seconds(value: float | None) -> str:
    return "reused" if value is None else f"{value:.0f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", type=int, default=1, help="worlds (seeds --seed, --seed + 1, …) pooled")
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--xgb-rounds", type=int, default=10)
    parser.add_argument("--non-members", choices=NON_MEMBERS, default="test")
    parser.add_argument("--also-epsilon", type=float, action="append", default=[],
                        help="a further DP run at this ε (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="audit earlier runs of the same settings again")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "membership_audit.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "benchmark_membership_audit")
    args = parser.parse_args(argv)
    flower_environment(ROOT)
    quiet_flower()
    started = time.perf_counter()
    budgets = {"no_dp": None, "dp": args.epsilon} | {f"dp_eps{e:g}": e for e in args.also_epsilon}
    worlds: dict[int, dict[str, dict]] = {}
    for seed in range(args.seed, args.seed + args.worlds):
        folder = args.work if args.worlds == 1 and seed == 0 else args.work / f"world{seed}"
        worlds[seed] = {name: run(args, epsilon, seed, folder / name) for name, epsilon in budgets.items()}
    summary = pooled(worlds)
    print_table(worlds, summary)
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    per_world = {seed: {name: world_summary(r) for name, r in runs.items()} for seed, runs in worlds.items()}
    write_record(args.json,
                 "python benchmarks/membership_audit.py " + " ".join(argv or sys.argv[1:]),
                 rounded({"pooled": summary, "worlds": per_world, "total_s": total, "all_heads": ALL_HEADS}),
                 settings=vars(args) | {"work": None, "json": None})


if __name__ == "__main__":
    main()
