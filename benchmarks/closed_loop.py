"""Benchmark: the closed loop (``fednano simulate --deploy-cycles K [--explore]``), per version and per period.

    python benchmarks/closed_loop.py [--seeds 0,1] [--versions 5] [--modes explore,plain] [--dp]
                                     [--deploy-patients N] [--out-dir runs/bench-loop]

For each world seed and mode the whole experiment runs as ``fednano simulate`` runs it (5 simulated clinics,
structured policy, release gate on; the ANN trained for 3 rounds only, as the policy does not use it; no
classic baselines): version 1 from the clinics' logs, then K − 1 periods in which every clinic treats half its
own number of new patients with what it serves (``--explore``: first cycles randomised, ``shared.exploration``),
appends them to its site files with its decision log, and the federation refits, gates and ships or not.

Per version: shipped, true value / oracle (500 new first-cycle patients per clinic, true outcomes) next to
standard of care's, the gate's estimate of (candidate − site standard of care) with its interval next to the
truth, and the sites (≥ 30 patients) where the candidate is truly worse than standard of care — which must
never hold for a shipped version. Per period: first cycles explored (trial arm / dose spread), the true
utility per cycle against standard of care for the same patients (the cost of what was served and explored),
and the time to treat and to refit. Prints a table per run and writes ``benchmarks/results/closed_loop.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from record import write_record  # noqa: E402

from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "closed_loop.json"
MIN_SITE_PATIENTS = 30


def fit_iterations(results: dict, out: Path) -> list[dict | None]:
    """Newton–Raphson iterations of the structured models per version: version 1's from results.json, each
    refit's from its run record (``OUT/deployment/federation-<period>.json``); None where no structured fit."""
    records = [results["policy"]] + [json.loads((out / "deployment" / f"federation-{p['period']}.json").read_text())
                                     ["policy"] for p in results["policy"]["deployment"]]
    return [(r.get("structured") or {}).get("iterations") for r in records]


SITE_PERIOD_FIGURES = ("served_version", "patients", "cost_vs_soc", "cost_vs_soc_under_rules")


def summarise(results: dict, out: Path) -> dict:
    """The figures of one run: per version and per period (module docstring)."""
    versions = []
    for v, iterations in zip(results["policy"]["versions"], fit_iterations(results, out), strict=True):
        gate = v["gate"]
        worse = sorted(s for s, e in v["per_site"].items()
                       if e["patients"] >= MIN_SITE_PATIENTS and e["value"] < e["soc_value"])
        versions.append({"version": v["version"], "shipped": v["shipped"], "value_oracle": v["value_oracle"],
                         "soc_value_oracle": v["soc_value_oracle"], "toxicity_rate": v["toxicity_rate"],
                         "gate_estimate": gate.get("estimate"), "gate_lower": gate.get("lower"),
                         "gate_upper": gate.get("upper"), "gate_truth": gate.get("true_difference"),
                         "gate_covered": gate.get("covered"), "sites_truly_worse": worse,
                         "epsilon_spent_max": max(v["epsilon_spent"].values()) if v["epsilon_spent"] else None,
                         "fit_iterations": iterations})
    periods = [{**{k: p[k] for k in ("period", "patients", "cycles", "value_per_cycle", "soc_value_per_cycle",
                                     "cost_vs_soc", "soc_under_rules_value_per_cycle", "cost_vs_soc_under_rules",
                                     "treat_s", "refit_s", "exploration")},
                "sites": {site: {k: s[k] for k in SITE_PERIOD_FIGURES} for site, s in p["sites"].items()}}
               for p in results["policy"]["deployment"]]
    return {"versions": versions, "periods": periods}


def print_run(seed: int, mode: str, summary: dict, seconds: float) -> None:
    print(f"\nseed {seed}, {mode} ({seconds:.0f} s)")
    print(f"{'version':>8} {'shipped':>8} {'value/oracle':>13} {'SOC':>6} {'tox':>6} {'gate estimate [95 %]':>26} "
          f"{'truth':>7} {'Newton its':>10}  truly worse at")
    for v in summary["versions"]:
        gate = (f"{v['gate_estimate']:+.3f} [{v['gate_lower']:+.3f}, {v['gate_upper']:+.3f}]"
                if v["gate_estimate"] is not None else "-")
        truth = f"{v['gate_truth']:+.3f}" if v["gate_truth"] is not None else "-"
        print(f"{v['version'] or '-':>8} {'yes' if v['shipped'] else 'no':>8} {v['value_oracle']:13.3f} "
              f"{v['soc_value_oracle']:6.3f} {v['toxicity_rate']:6.3f} {gate:>26} {truth:>7} "
              f"{max((v['fit_iterations'] or {}).values(), default=0):>10}  "
              f"{', '.join(v['sites_truly_worse']) or 'none'}")
    print(f"{'period':>8} {'explored (trial / equipoise / spread of first)':>48} {'value/cycle':>12} {'SOC':>7} "
          f"{'cost':>7} {'cost (rules)':>12} "
          f"{'treat s':>8} {'refit s':>8}  sites costing > 0.01 under the rules")
    for p in summary["periods"]:
        e = p["exploration"]
        explored = (f"{e['trial_arm']} / {e.get('equipoise', 0)} / {e['dose_spread']} of {e['first_cycles']}"
                    if e.get("explore") else "none")
        costly = sorted(s for s, e in p["sites"].items() if e["cost_vs_soc_under_rules"] > 0.01)
        print(f"{p['period']:>8} {explored:>48} {p['value_per_cycle']:12.4f} {p['soc_value_per_cycle']:7.4f} "
              f"{p['cost_vs_soc']:+7.4f} {p['cost_vs_soc_under_rules']:+12.4f} {p['treat_s']:8.0f} "
              f"{p['refit_s']:8.0f}  {', '.join(costly) or 'none'}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="world seeds, comma-separated")
    parser.add_argument("--versions", type=int, default=5, help="policy versions to reach (--deploy-cycles)")
    parser.add_argument("--modes", default="explore,plain", help="explore and/or plain, comma-separated")
    parser.add_argument("--dp", action="store_true", help="sites under DP (ε = 3 each, ε / K per run)")
    parser.add_argument("--deploy-patients", type=int, default=None, help="new patients per clinic per period")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench-loop"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--summarise-only", action="store_true",
                        help="read the runs already in --out-dir (their results.json) instead of running them")
    args = parser.parse_args(argv)
    flower_environment(Path.cwd())
    quiet_flower()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in args.modes.split(","):
            cfg = ExperimentConfig(out=args.out_dir / f"seed{seed}-{mode}", seed=seed, dp=args.dp, models="ann",
                                   rounds=3, compare=False, deploy_cycles=args.versions,
                                   deploy_patients=args.deploy_patients, explore=mode == "explore")
            start = time.perf_counter()
            if args.summarise_only:
                if not (cfg.out / "results.json").exists():
                    print(f"\nseed {seed}, {mode}: no run in {cfg.out}")
                    continue
                results = json.loads((cfg.out / "results.json").read_text())
                seconds = results["timing"]["federation_s"] + sum(  # version 1's run, then every period
                    d["treat_s"] + d["refit_s"] for d in results["policy"]["deployment"])
            else:
                results = run_experiment(cfg)
                seconds = time.perf_counter() - start
            summary = summarise(results, cfg.out)
            print_run(seed, mode, summary, seconds)
            runs.append({"seed": seed, "mode": mode, "seconds": seconds, **summary})
    write_record(args.out, "python benchmarks/closed_loop.py " + " ".join(argv or sys.argv[1:]), {"runs": runs})
    return {"runs": runs}


if __name__ == "__main__":
    main()
