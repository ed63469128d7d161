"""Which mix (issue 18, ``client.personalised.mix``): α, probability or logit space, global or fine-tuned partner.

    python benchmarks/personalised_mix_variants.py --seeds 0 1 2 3 4 [--work runs/bench_personalised]
                                                   [--out benchmarks/results/personalised_mix_variants.json]

Reads the runs ``benchmarks/personalised.py --no-dp`` left in ``--work`` (``personalised-<seed>``: the simulated
clinics' folders and the run's final global ANN) and, per site, re-trains its local-only and fine-tuned candidates
exactly as the site did in the run (same encoder, split, seed and settings: without DP the fits are
deterministic; the script checks the local-only model's test AUC against the site's own record of the run), then
scores every variant of the mix on the site's validation and test splits:

- ``p α=a``: probabilities mixed, ``α·global + (1 − α)·local``, for α in 0.25, 0.5, 0.75;
- ``logit α=0.5``: logits mixed (a normalised geometric mean of the probabilities);
- ``ft p α=0.5``: the fine-tuned model in place of the global one;
- ``p α=val``: α chosen per site on its exact validation split (score: ``client.personalised.choice.
  validation_score``) from 0, 0.25, 0.5, 0.75, 1 — what a site without DP could do; a DP site would need a
  release for it.

For each: response AUC on the test split minus max(local-only, global) (sites with ≥ 30 test rows; SE Hanley &
McNeil of the variant's AUC), mean over the sites and the sites worse by more than one SE. Without DP only.
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
from pathlib import Path

from personalised import MIN_TEST_ROWS, OUTCOME, _auc, hanley_mcneil_se

from client.evaluation import summaries
from client.personalised.choice import validation_score
from client.personalised.finetune import FineTune
from client.personalised.local import LocalOnly
from client.personalised.mix import Mix
from client.split import encode, split_site
from shared import metrics
from shared.artifacts import RunArtifacts
from shared.protocol.personalisation import GLOBAL, LOCAL, Personalisation
from shared.task import NANOPARTICLE_TASK
from shared.validation import load_site
from simulation.experiment import ExperimentConfig

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def variants(global_model, local, tuned) -> dict:
    """Variant name → a predictor (x → predictions)."""
    from shared.ann import predict

    made = {GLOBAL: lambda x: predict(global_model, x), LOCAL: lambda x: predict(local, x),
            "finetune": lambda x: predict(tuned, x)}
    for alpha in GRID:
        made[f"p α={alpha:g}"] = Mix(alpha=alpha).fit(global_model, local).predict
    made["logit α=0.5"] = Mix(alpha=0.5, space="logit").fit(global_model, local).predict
    made["ft p α=0.5"] = Mix(alpha=0.5).fit(tuned, local).predict
    return made


def seed_figures(work: Path, clinics: int, rounds: int, seed: int) -> dict:
    out = work / f"personalised-{seed}"
    cfg = ExperimentConfig(out=out, clinics=clinics, rounds=rounds, dp=False, seed=seed, models="ann",
                           compare=False)
    folders = sorted(p for p in (out / "sites").iterdir() if p.is_dir() and not p.name.startswith("."))
    records = {f.name: next((f / "personalisation" / f.name).glob("*.json")) for f in folders
               if (f / "personalisation" / f.name).is_dir()}
    run_id = next(iter(records.values())).stem
    artifacts = RunArtifacts.open(out / "federated", run_id=run_id)
    global_model, encoder = artifacts.ann(), artifacts.encoder()
    plan = Personalisation(methods=("finetune",))
    sites = {}
    for folder in folders:
        if folder.name not in records:
            continue
        site = load_site(folder)
        parts = split_site(site.episodes, site.task, seed)
        data = {split: encode(encoder, parts[split]) for split in ("train", "val", "test")}
        local = LocalOnly(epochs=rounds * cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                          seed=seed).fit(global_model, data["train"]).model_
        tuned = FineTune(epochs=plan.epochs, lr=plan.lr, batch_size=cfg.batch_size,
                         seed=seed).fit(global_model, data["train"]).model_
        made = variants(global_model, local, tuned)
        figures = {name: {split: summaries(encoder, data[split], predict(data[split].x))
                          for split in ("val", "test")} for name, predict in made.items()}
        val_score = {name: validation_score(NANOPARTICLE_TASK, f["val"]) for name, f in figures.items()}
        best_alpha = max(GRID, key=lambda a: (val_score[f"p α={a:g}"], -abs(a - 0.5)))  # ties: nearest 0.5
        figures["p α=val"] = figures[f"p α={best_alpha:g}"]
        test = {name: _auc(f["test"][OUTCOME]) for name, f in figures.items()}
        recorded = json.loads(records[folder.name].read_text())["summaries"]["test"]
        best = max(test[LOCAL]["auc"], test[GLOBAL]["auc"])
        sites[folder.name] = {
            "n_test": test[GLOBAL]["n"], "alpha_on_validation": best_alpha,
            "replay_check": {c: abs(test[c]["auc"] - _auc(recorded[c][OUTCOME])["auc"]) for c in (LOCAL, GLOBAL)},
            "auc": {name: t["auc"] for name, t in test.items()},
            "difference": {name: t["auc"] - best for name, t in test.items()},
            "se": {name: hanley_mcneil_se(t["auc"], t["n_pos"], t["n_neg"]) if t["n_pos"] and t["n_neg"]
                   else math.nan for name, t in test.items()},
            "validation_score": val_score}
    big = [s for s, f in sites.items() if f["n_test"] >= MIN_TEST_ROWS]
    names = list(next(iter(sites.values()))["auc"])
    return {"seed": seed, "run_id": run_id, "sites": sites, "sites_30": big,
            "mean_auc": {n: statistics.fmean(sites[s]["auc"][n] for s in big) for n in names},
            "better_on_average_by": {n: statistics.fmean(sites[s]["difference"][n] for s in big) for n in names},
            "worse_by_more_than_1se": {n: [s for s in big if sites[s]["difference"][n] < -sites[s]["se"][n]]
                                       for n in names},
            "replay_check_max": max((v for f in sites.values() for v in f["replay_check"].values()
                                     if v is not None and math.isfinite(v)), default=math.nan)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_personalised"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/personalised_mix_variants.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    runs = [seed_figures(args.work, args.clinics, args.rounds, seed) for seed in args.seeds]
    names = list(runs[0]["mean_auc"])
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": sys.version.split()[0],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "load": os.getloadavg(),
              "clinics": args.clinics, "rounds": args.rounds, "dp": False, "total_s": time.perf_counter() - start,
              "runs": runs,
              "over_seeds": {n: {"better_on_average_by": statistics.fmean(r["better_on_average_by"][n] for r in runs),
                                 "sites_worse": sum(len(r["worse_by_more_than_1se"][n]) for r in runs),
                                 "mean_auc": statistics.fmean(r["mean_auc"][n] for r in runs)} for n in names}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics.json_safe(result)) + "\n")  # one line: < 100 kB for 5 seeds
    print("response AUC on the test split, sites with ≥ 30 test rows: variant − max(local, global), mean over the "
          "sites [sites worse by > 1 SE]; replay check = largest |AUC − the run's record| of local and global")
    print("| variant | " + " | ".join(f"seed {r['seed']} ({len(r['sites_30'])})" for r in runs)
          + " | mean of seeds | sites worse | mean AUC |")
    print("|---|" + "---|" * (len(runs) + 3))
    for n in names:
        cells = [f"{r['better_on_average_by'][n]:+.4f}" + (f" [{len(r['worse_by_more_than_1se'][n])}]"
                                                            if r["worse_by_more_than_1se"][n] else "") for r in runs]
        o = result["over_seeds"][n]
        print(f"| {n} | " + " | ".join(cells) + f" | {o['better_on_average_by']:+.4f} | {o['sites_worse']} | "
              f"{o['mean_auc']:.4f} |")
    print("α chosen on validation: " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{r['sites'][s]['alpha_on_validation']:g}" for s in r["sites_30"])
        for r in runs))
    print("replay check (max |ΔAUC| of local/global vs the run's record): "
          + ", ".join(f"seed {r['seed']} {r['replay_check_max']:.2g}" for r in runs))
    print(f"\nwrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
