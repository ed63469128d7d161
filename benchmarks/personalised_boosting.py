"""Benchmark of personalised boosting (issue 18 item 2): does each site's choice among the federation's boosters,
its local-only boosters and the federation's trees with its own added beat max(local-only, global)?

    python benchmarks/personalised_boosting.py [--clinics 10] [--seeds 0 1 2] [--xgb-rounds 20]
                                               [--methods site-trees,mix-trees]
                                               [--out benchmarks/results/personalised_boosting.json]

For each seed: the built-in simulator's clinics without DP (a DP site is not asked: XGBoost's site trees have no
DP form), federated histogram boosting and ``--personalise site-trees`` (``simulation.experiment.run_federation``:
the real ServerApp and ClientApp in Flower's simulation runtime; no dosing policy, no baselines). Figures, from
each site's own exact record of the phase (``client.personalisation_handlers``):

1. **Per site** (sites with ≥ 30 recorded test responses): on the test split, the score the sites choose by (mean
   of response AUC, toxicity AUC and efficacy R² floored at 0: ``client.personalised.choice.validation_score``) and
   the response AUC of each candidate and of the chosen one; the chosen minus max(local-only, global), on both,
   and the response AUC's Hanley & McNeil (1982) standard error (the split's noise).
2. **Mean per-site** score and response AUC of each candidate and of the choice.
3. **Cost**: seconds and bytes of the federated boosting phase and of the personalisation phase.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from personalised import _auc, hanley_mcneil_se
from record import machine, write_record

from client.personalised.choice import validation_score
from shared import metrics
from shared.protocol.personalisation import BOOSTING_METHODS, GLOBAL, LOCAL, boosting_methods
from shared.task import NANOPARTICLE_TASK
from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation
from simulation.personalisation import site_records

MIN_TEST_ROWS = 30
CANDIDATES = (GLOBAL, "site-trees", LOCAL)


def seed_figures(root: Path, clinics: int, seed: int, xgb_rounds: int,
                 methods: tuple[str, ...] = ("site-trees",)) -> dict:
    cfg = ExperimentConfig(out=root / f"boosting-{seed}", clinics=clinics, dp=False, seed=seed, models="xgboost",
                           boosting="hist", xgb_rounds=xgb_rounds, compare=False, policy=False,
                           personalise=",".join(methods))
    candidates = (GLOBAL, *methods, LOCAL)
    sources, _ = prepare_sites(cfg)
    start = time.perf_counter()
    record = run_federation(cfg, sources)
    seconds = time.perf_counter() - start
    names = {s.path.name: s for s in sources}
    exact = site_records({n: names[n] for n in record.sites if n in names}, record.run_id, "xgboost")
    phase = record.personalisation_xgboost or {}
    sites = {}
    for site, entry in sorted(exact.items()):
        test = entry["summaries"]["test"]
        auc = {c: _auc(test[c]["response"]) for c in candidates}
        score = {c: validation_score(NANOPARTICLE_TASK, test[c]) for c in candidates}
        chosen = entry["chosen"]
        se = hanley_mcneil_se(auc[chosen]["auc"], auc[chosen]["n_pos"], auc[chosen]["n_neg"]) \
            if auc[chosen]["n_pos"] and auc[chosen]["n_neg"] else math.nan
        sites[site] = {"n_test": auc[GLOBAL]["n"], "chosen": chosen, "reason": entry["reason"],
                       "score": score, "auc": {c: a["auc"] for c, a in auc.items()},
                       "score_difference": score[chosen] - max(score[LOCAL], score[GLOBAL]),
                       "auc_difference": auc[chosen]["auc"] - max(auc[LOCAL]["auc"], auc[GLOBAL]["auc"]),
                       "auc_se": se,
                       # each candidate as if every site kept it: its AUC − max(local, global), and its AUC's SE
                       "as_default": {c: {"auc_difference": auc[c]["auc"] - max(auc[LOCAL]["auc"], auc[GLOBAL]["auc"]),
                                          "score_difference": score[c] - max(score[LOCAL], score[GLOBAL]),
                                          "auc_se": hanley_mcneil_se(auc[c]["auc"], auc[c]["n_pos"], auc[c]["n_neg"])
                                          if auc[c]["n_pos"] and auc[c]["n_neg"] else math.nan}
                                      for c in candidates}}
    big = [s for s, f in sites.items() if f["n_test"] >= MIN_TEST_ROWS]
    small = [s for s, f in sites.items() if f["n_test"] < MIN_TEST_ROWS and math.isfinite(f["score"][GLOBAL])
             and math.isfinite(f["score"][f["chosen"]])]

    def mean(values):
        finite = [v for v in values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    boosting = record.models["xgboost"]
    return {
        "seed": seed, "candidates": list(candidates), "sites": sites, "sites_30": big,
        "as_default": {c: {"auc_better_on_average_by": mean(sites[s]["as_default"][c]["auc_difference"] for s in big),
                           "score_better_on_average_by": mean(sites[s]["as_default"][c]["score_difference"]
                                                              for s in big),
                           "auc_worse_by_more_than_1se": [s for s in big if sites[s]["as_default"][c]["auc_difference"]
                                                          < -sites[s]["as_default"][c]["auc_se"]]}
                       for c in candidates},
        "mean_score": {c: mean(sites[s]["score"][c] for s in big) for c in candidates}
        | {"chosen": mean(sites[s]["score"][sites[s]["chosen"]] for s in big)},
        "mean_auc": {c: mean(sites[s]["auc"][c] for s in big) for c in candidates}
        | {"chosen": mean(sites[s]["auc"][sites[s]["chosen"]] for s in big)},
        "score_better_on_average_by": mean(sites[s]["score_difference"] for s in big),
        "auc_better_on_average_by": mean(sites[s]["auc_difference"] for s in big),
        "auc_worse_by_more_than_1se": [s for s in big if sites[s]["auc_difference"] < -sites[s]["auc_se"]],
        "chosen": {c: sum(sites[s]["chosen"] == c for s in big) for c in candidates},
        # sites under the target's 30 test rows: what the choice did to them against the global boosters
        "small_sites": {"n": len(small), "chosen_minus_global_score": {s: sites[s]["score"][sites[s]["chosen"]]
                                                                       - sites[s]["score"][GLOBAL] for s in small}},
        "cost": {"federation_s": seconds, "boosting_s": boosting.seconds, "personalisation_s": phase.get("seconds"),
                 "personalisation_bytes": phase.get("bytes"),
                 "boosting_bytes": _hist_bytes(cfg.out / "federated" / "xgb_hist_traffic.json")},
    }


def _hist_bytes(path: Path) -> int | None:
    """Bytes the histogram boosting put on the wire (its traffic record), if written."""
    if not path.is_file():
        return None
    traffic = json.loads(path.read_text())
    return int(traffic["bytes_down"]) + int(traffic["bytes_up"])


def _f(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def print_tables(result: dict) -> None:
    for run in result["runs"]:
        candidates = run.get("candidates", CANDIDATES)
        print(f"\nseed {run['seed']}: test split, sites with ≥ {MIN_TEST_ROWS} rows; score = mean(response AUC, "
              "toxicity AUC, efficacy R²⁺)")
        print("| site | n | score " + " | ".join(candidates) + " | response AUC " + " | ".join(candidates)
              + " | chosen | score − max(l, g) | AUC − max(l, g) | AUC SE |")
        print("|---|---|" + "---|" * (2 * len(candidates) + 4))
        for site in run["sites_30"]:
            f = run["sites"][site]
            print(f"| {site} | {int(f['n_test'])} | " + " | ".join(_f(f["score"][c]) for c in candidates) + " | "
                  + " | ".join(_f(f["auc"][c]) for c in candidates)
                  + f" | {f['chosen']} | {f['score_difference']:+.3f} | {f['auc_difference']:+.3f} | "
                    f"{_f(f['auc_se'])} |")
        print("mean per-site score: " + ", ".join(f"{c} {_f(v)}" for c, v in run["mean_score"].items()))
        print("mean per-site response AUC: " + ", ".join(f"{c} {_f(v)}" for c, v in run["mean_auc"].items()))
        print(f"chosen − max(local, global): score {run['score_better_on_average_by']:+.4f}, response AUC "
              f"{run['auc_better_on_average_by']:+.4f}; sites worse by > 1 SE (AUC): "
              f"{run['auc_worse_by_more_than_1se'] or 'none'}; chosen: {run['chosen']}")
        for c, f in run.get("as_default", {}).items():
            if c not in (GLOBAL, LOCAL):
                print(f"  {c} at every site: − max(local, global) score {f['score_better_on_average_by']:+.4f}, "
                      f"response AUC {f['auc_better_on_average_by']:+.4f}; sites worse by > 1 SE (AUC): "
                      f"{f['auc_worse_by_more_than_1se'] or 'none'}")
        small = run.get("small_sites", {}).get("chosen_minus_global_score")  # not in runs before c5401e6
        if small:
            print(f"sites under {MIN_TEST_ROWS} test rows ({len(small)}): chosen − global score mean "
                  f"{statistics.fmean(small.values()):+.4f}, lowest {min(small.values()):+.3f}")
        c = run["cost"]
        print(f"cost: boosting phase {c['boosting_s']:.1f} s ({c['boosting_bytes']} bytes), personalisation "
              f"{c['personalisation_s']:.1f} s (sent {c['personalisation_bytes']['sent']}, received "
              f"{c['personalisation_bytes']['received']} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--xgb-rounds", type=int, default=20)
    parser.add_argument("--methods", default="site-trees",
                        help="personalised boosting methods, comma-separated (site-trees, mix-trees)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_personalised_boosting"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/personalised_boosting.json"))
    args = parser.parse_args()
    flower_environment(Path.cwd())
    quiet_flower()
    start, load = time.perf_counter(), os.getloadavg()[0]
    methods = boosting_methods(args.methods)
    if not methods:
        parser.error(f"--methods: expected some of {', '.join(BOOSTING_METHODS)}, got {args.methods!r}")
    runs = [seed_figures(args.work, args.clinics, seed, args.xgb_rounds, methods) for seed in args.seeds]
    result = {"clinics": args.clinics, "xgb_rounds": args.xgb_rounds, "dp": False, "methods": list(methods),
              "total_s": time.perf_counter() - start, "runs": metrics.json_safe(runs)}
    print_tables(result)
    write_record(args.out, "python benchmarks/personalised_boosting.py " + " ".join(sys.argv[1:]), result,
                 machine=machine(load_at_start=load))

if __name__ == "__main__":
    main()
