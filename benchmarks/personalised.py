"""Benchmark of the personalised ANNs (issue 18): does each site's choice beat max(local-only, global)?

    python benchmarks/personalised.py [--clinics 10] [--rounds 10] [--seeds 0 1] [--no-dp] [--skip-plain]
                                      [--methods finetune,ditto,fedper] [--choice pooled-non-dp|site|pooled|...]
                                      [--no-dp-sites clinic_00,clinic_02,...]
                                      [--out benchmarks/results/personalised.json]

For each seed: the built-in simulator's clinics (DP ε = 3, δ = 1e-5 per site unless ``--no-dp``), the
federated ANN with FedAvg and ``--personalise finetune,ditto,fedper`` (``--methods``: fewer; under DP the phase's
ε then goes to fewer DP-SGD fits and a release of fewer candidates) (``simulation.experiment.run_federation``:
the real ServerApp and ClientApp in Flower's simulation runtime; no dosing policy, no baselines), then the same
federation without personalisation ("plain FedAvg"). ``--choice``: the ANN choice's rule, by default the
federation's (``pooled-non-dp``: the sites without DP take the default their pooled validation evidence sets, each
DP site its own rule's choice; ``shared.selection``); ``site``: every site its own rule; ``pooled`` (or
``pooled-equal``, ``pooled-site``): every site's evidence pooled. A site told the federation's default also records
the choice its own rule made on the same models (``site_chosen``), reported beside it. ``--no-dp-sites``: a mixed
federation, these simulated clinics without DP (their site.toml rewritten before the run), the others under DP.
Figures:

1. **Per site** (sites with ≥ 30 recorded test responses): the response AUC on the test split of the site's
   local-only model, the global model, each method and the chosen model — each site's own exact record
   (``client.personalisation_handlers``) —, the chosen model minus max(local-only, global), and that
   difference in units of the split's noise: the Hanley & McNeil (1982) standard error of the chosen model's AUC.
2. **Mean per-site AUC** of each candidate and of the choice over those sites.
3. **Cost** against plain FedAvg: seconds of the ANN's rounds and of the personalisation phase, bytes on the
   wire (the training's counted as rounds × sites × 2 × the model's ArrayRecord, configs left out; the phase's
   measured: request and replies), ε per DP site after training and after the phase, and the global model's
   mean per-site AUC in both runs (the personalisation phase's share of ε is taken from training).
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

from client.personalisation_handlers import PHASE
from client.personalised.choice import choose, validation_score
from server.run_record import RunRecord
from shared import metrics
from shared.ann import to_arrays
from shared.artifacts import RunArtifacts
from shared.protocol.personalisation import CHOICE_RULES, DEFAULT_CHOICE, GLOBAL, LOCAL, METHODS, ann_methods
from shared.schema import SITE_FILE
from shared.task import NANOPARTICLE_TASK
from simulation.baselines import BaselineSettings, evaluate_per_site
from simulation.clinics import SitePrivacy, site_toml
from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation
from simulation.personalisation import site_records

MIN_TEST_ROWS = 30
OUTCOME = "response"


def hanley_mcneil_se(auc: float, n_pos: float, n_neg: float) -> float:
    """Standard error of an AUC (Hanley & McNeil, Radiology 1982;143:29, eq. 2)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc))
                     / (n_pos * n_neg))


def _auc(summary: dict) -> dict:
    m = metrics.binary_metrics(summary)
    n_pos = sum(summary["hist_pos"])
    return {"auc": m["auc"], "n": m["n"], "n_pos": n_pos, "n_neg": m["n"] - n_pos}


def one_run(out: Path, clinics: int, rounds: int, seed: int, dp: bool, personalise: str,
            no_dp_sites: tuple[str, ...] = ()) -> tuple:
    cfg = ExperimentConfig(out=out, clinics=clinics, rounds=rounds, dp=dp, seed=seed, models="ann", compare=False,
                           personalise=personalise)
    sources, world = prepare_sites(cfg)
    if no_dp_sites:  # a mixed federation: these clinics decide against DP (their own site.toml)
        profiles = {c.name: c for c in world.clinics}
        unknown = sorted(set(no_dp_sites) - set(profiles))
        if unknown:
            raise SystemExit(f"--no-dp-sites: no simulated clinic {', '.join(unknown)} (have {', '.join(profiles)})")
        for name in no_dp_sites:
            (cfg.out / "sites" / name / SITE_FILE).write_text(
                site_toml(profiles[name], SitePrivacy(dp=False, epsilon=cfg.epsilon, delta=cfg.delta)))
    start = time.perf_counter()
    record = run_federation(cfg, sources)
    return cfg, sources, record, time.perf_counter() - start


def global_auc_per_site(cfg: ExperimentConfig, sources, record: RunRecord) -> tuple[dict[str, float], int]:
    """Exact response AUC of the run's global model on each site's test split (as ``fednano simulate``), and the
    bytes of the model's ArrayRecord."""
    from shared.ann import predict
    from shared.validation import load_site

    artifacts = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id)
    sites = {site.name: site for site in (load_site(s.path) for s in sources) if site.name in record.sites}
    settings = BaselineSettings(task=NANOPARTICLE_TASK, epochs=cfg.rounds, batch_size=cfg.batch_size, lr=cfg.lr,
                                hidden=(64, 32), seed=cfg.seed, split_seed=cfg.seed)
    model = artifacts.ann()
    per_site = evaluate_per_site(lambda x: predict(model, x), artifacts.encoder(), sites, settings)
    return {site: _auc(s[OUTCOME])["auc"] for site, s in per_site.items()}, to_arrays(model).count_bytes()


def seed_figures(root: Path, clinics: int, rounds: int, seed: int, dp: bool, plain_fedavg: bool = True,
                 methods: tuple[str, ...] = METHODS, choice: str = DEFAULT_CHOICE,
                 no_dp_sites: tuple[str, ...] = ()) -> dict:
    methods = ",".join(methods)
    cfg, sources, record, seconds = one_run(root / f"personalised-{seed}", clinics, rounds, seed, dp,
                                            f"{methods},{choice}", no_dp_sites)
    names = {s.path.name: s for s in sources}
    exact = site_records({name: names[name] for name in record.sites if name in names}, record.run_id)
    phase = record.personalisation or {}
    candidates = phase.get("candidates", [GLOBAL, *methods.split(","), LOCAL])
    sites = {}
    for site, entry in sorted(exact.items()):
        test = {c: _auc(entry["summaries"]["test"][c][OUTCOME]) for c in candidates}
        n = test[GLOBAL]["n"]
        chosen = entry["chosen"]
        best_baseline = max(test[LOCAL]["auc"], test[GLOBAL]["auc"])
        chosen_auc = test[chosen]["auc"]
        se = hanley_mcneil_se(chosen_auc, test[chosen]["n_pos"], test[chosen]["n_neg"]) \
            if test[chosen]["n_pos"] and test[chosen]["n_neg"] else math.nan
        # the same rule on the site's exact validation figures: what the DP noise on them costs the choice
        exact_scores = {c: validation_score(NANOPARTICLE_TASK, entry["summaries"]["validation"][c])
                        for c in candidates}
        # each candidate as if every site had kept it (a default that beats max(local, global) on average is what
        # the target asks; the choice rarely leaves its default): its AUC minus the baseline, and its AUC's SE
        as_default = {c: {"difference": test[c]["auc"] - best_baseline,
                          "se": hanley_mcneil_se(test[c]["auc"], test[c]["n_pos"], test[c]["n_neg"])
                          if test[c]["n_pos"] and test[c]["n_neg"] else math.nan} for c in candidates}
        sites[site] = {"n_test": n, **{c: test[c]["auc"] for c in candidates}, "chosen": chosen,
                       "as_default": as_default,
                       "chosen_auc": chosen_auc, "max_local_global": best_baseline,
                       "difference": chosen_auc - best_baseline, "se": se,
                       "reason": phase.get("per_site", {}).get(site, {}).get("reason"),
                       **{k: phase.get("per_site", {}).get(site, {}).get(k)
                          for k in ("rule", "decided_by", "evidence_dp")},
                       "chosen_on_exact_validation_auc": choose(exact_scores, candidates)[0]}
        if phase.get("pooled"):  # the site's own rule on the same models (a DP site's own choice stands)
            own = entry.get("site_chosen", chosen)
            sites[site] |= {"site_chosen": own, "site_chosen_auc": test[own]["auc"],
                            "site_difference": test[own]["auc"] - best_baseline,
                            "se_site": hanley_mcneil_se(test[own]["auc"], test[own]["n_pos"], test[own]["n_neg"])
                            if test[own]["n_pos"] and test[own]["n_neg"] else math.nan}
    with_global, model_bytes = global_auc_per_site(cfg, sources, record)
    if plain_fedavg:
        plain_cfg, plain_sources, plain, plain_seconds = one_run(root / f"plain-{seed}", clinics, rounds, seed, dp, "")
        plain_global, _ = global_auc_per_site(plain_cfg, plain_sources, plain)
    else:  # --skip-plain: the personalisation phase's figures only (the plain run does not depend on them)
        plain, plain_seconds, plain_global = None, None, {}
    big = [s for s, f in sites.items() if f["n_test"] >= MIN_TEST_ROWS]
    privacy = {site: {"training": p.epsilon_after.get("training"), PHASE: p.epsilon_after.get(PHASE),
                      "plain_training": plain.privacy[site].epsilon_after.get("training")
                      if plain is not None and site in plain.privacy else None}
               for site, p in record.privacy.items() if p.dp}
    n_trainers = len(record.sites)
    return {
        "seed": seed, "candidates": list(candidates), "sites": sites, "sites_30": big,
        "mean_auc": {c: statistics.fmean(sites[s][c] for s in big if math.isfinite(sites[s][c]))
                     for c in [*candidates, "chosen_auc"]},
        "worse_than_best_by_more_than_1se": [s for s in big if sites[s]["difference"] < -sites[s]["se"]],
        "better_on_average_by": statistics.fmean(sites[s]["difference"] for s in big),
        "as_default": {c: {"better_on_average_by": statistics.fmean(sites[s]["as_default"][c]["difference"]
                                                                    for s in big),
                           "worse_than_best_by_more_than_1se": [
                               s for s in big
                               if sites[s]["as_default"][c]["difference"] < -sites[s]["as_default"][c]["se"]]}
                       for c in candidates} if big else {},
        "by_privacy": {label: {"sites": part, "better_on_average_by": statistics.fmean(
                           sites[s]["difference"] for s in part) if part else None,
                           "site_rule_better_on_average_by": statistics.fmean(
                           sites[s]["site_difference"] for s in part) if part and all(
                           "site_difference" in sites[s] for s in part) else None}
                       for label, part in (("dp", [s for s in big if sites[s].get("evidence_dp")]),
                                           ("no_dp", [s for s in big if sites[s].get("evidence_dp") is False]))},
        "pooled": phase.get("pooled"),
        "site_rule": {"worse_than_best_by_more_than_1se": [s for s in big
                                                           if sites[s]["site_difference"] < -sites[s]["se_site"]],
                      "better_on_average_by": statistics.fmean(sites[s]["site_difference"] for s in big)}
        if big and all("site_chosen" in sites[s] for s in big) else None,
        "cost": {"ann_training_s": record.models["ann"].seconds, "personalisation_s": phase.get("seconds"),
                 "plain_ann_training_s": plain.models["ann"].seconds if plain else None, "federation_s": seconds,
                 "plain_federation_s": plain_seconds,
                 "training_bytes_est": rounds * n_trainers * 2 * model_bytes,
                 "personalisation_bytes": phase.get("bytes"),
                 "epsilon": privacy,
                 "global_mean_auc_with_personalisation": statistics.fmean(with_global[s] for s in big),
                 "global_mean_auc_plain_fedavg": statistics.fmean(plain_global[s] for s in big if s in plain_global)
                 if plain_global else None},
    }


def _f(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def print_tables(result: dict) -> None:
    for run in result["runs"]:
        candidates = run.get("candidates", [GLOBAL, *METHODS, LOCAL])
        print(f"\nseed {run['seed']}: response AUC on each site's test split (sites with ≥ {MIN_TEST_ROWS} rows)")
        print("| site | n | " + " | ".join(candidates) + " | chosen | chosen AUC | − max(local, global) | SE |"
              " chosen on exact val | DP | rule |")
        print("|---|---|" + "---|" * (len(candidates) + 7))
        for site in run["sites_30"]:
            f = run["sites"][site]
            print(f"| {site} | {int(f['n_test'])} | " + " | ".join(_f(f[c]) for c in candidates)
                  + f" | {f['chosen']} | {_f(f['chosen_auc'])} | {f['difference']:+.3f} | {_f(f['se'])} |"
                    f" {f['chosen_on_exact_validation_auc']} | {'yes' if f.get('evidence_dp') else 'no'} |"
                    f" {f.get('rule') or '–'} |")
        for site in run["sites_30"]:
            if run["sites"][site].get("decided_by"):
                print(f"  {site} decided by {run['sites'][site]['decided_by']}")
        means = run["mean_auc"]
        print("mean per-site AUC: " + ", ".join(f"{c} {_f(means[c])}" for c in [*candidates, "chosen_auc"]))
        print(f"chosen − max(local, global): mean {run['better_on_average_by']:+.4f}; sites worse by > 1 SE: "
              f"{run['worse_than_best_by_more_than_1se'] or 'none'}")
        for c, f in run.get("as_default", {}).items():
            if c not in (GLOBAL, LOCAL):
                print(f"  {c} at every site: − max(local, global) mean {f['better_on_average_by']:+.4f}; sites worse "
                      f"by > 1 SE: {f['worse_than_best_by_more_than_1se'] or 'none'}")
        for label, part in (run.get("by_privacy") or {}).items():
            if part["sites"]:
                own = part["site_rule_better_on_average_by"]
                print(f"  {label} sites ({len(part['sites'])}): mean {part['better_on_average_by']:+.4f}"
                      + (f" (their own rule {own:+.4f})" if own is not None else ""))
        if run.get("pooled"):
            pooled, own = run["pooled"], run["site_rule"]
            print(f"federation default: {pooled['default']} ({pooled['reason']})")
            if own:
                print("each site's own rule on the same models: "
                      + ", ".join(f"{s} {run['sites'][s]['site_chosen']} {run['sites'][s]['site_difference']:+.3f}"
                                  for s in run["sites_30"])
                      + f"; mean {own['better_on_average_by']:+.4f}; sites worse by > 1 SE: "
                        f"{own['worse_than_best_by_more_than_1se'] or 'none'}")
        c = run["cost"]
        eps = c["epsilon"]
        print(f"cost: ANN rounds {c['ann_training_s']:.1f} s (plain FedAvg {_f(c['plain_ann_training_s'])} s), "
              f"personalisation phase {c['personalisation_s']:.1f} s; bytes: training ≈ {c['training_bytes_est']}, "
              f"personalisation sent {c['personalisation_bytes']['sent']} received "
              f"{c['personalisation_bytes']['received']}")
        if eps:
            plain_eps = [e["plain_training"] for e in eps.values() if e["plain_training"] is not None]
            print("ε per DP site (mean): after training {:.3f} (plain FedAvg {}), after personalisation {:.3f}"
                  .format(statistics.fmean(e["training"] for e in eps.values()),
                          _f(statistics.fmean(plain_eps)) if plain_eps else "–",
                          statistics.fmean(e[PHASE] for e in eps.values())))
        print(f"global model's mean per-site AUC: {_f(c['global_mean_auc_with_personalisation'])} in this run, "
              f"{_f(c['global_mean_auc_plain_fedavg'])} in plain FedAvg (more ε for training)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--skip-plain", action="store_true",
                        help="leave out the plain-FedAvg run of each seed (cost comparison only; halves the time)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="personalised ANN methods, comma-separated (default: all of them)")
    parser.add_argument("--choice", choices=CHOICE_RULES, default=DEFAULT_CHOICE,
                        help="who sets the choice's default: the pooled evidence of the sites without DP for them, "
                             "each DP site its own (pooled-non-dp, the default), each site (site) or every site's "
                             "pooled evidence, weighted by precision (pooled) or equally (pooled-equal)")
    parser.add_argument("--no-dp-sites", default="",
                        help="a mixed federation: these simulated clinics (comma-separated names) without DP, the "
                             "others under DP")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_personalised"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/personalised.json"))
    args = parser.parse_args()
    flower_environment(Path.cwd())
    quiet_flower()
    start = time.perf_counter()
    methods = ann_methods(args.methods)
    if not methods:
        parser.error(f"--methods: expected some of {', '.join(METHODS)}, got {args.methods!r}")
    no_dp_sites = tuple(s.strip() for s in args.no_dp_sites.split(",") if s.strip())
    if no_dp_sites and args.no_dp:
        parser.error("--no-dp-sites makes a mixed federation: leave out --no-dp")
    runs = []
    for seed in args.seeds:
        runs.append(seed_figures(args.work, args.clinics, args.rounds, seed, not args.no_dp, not args.skip_plain,
                                 methods, args.choice, no_dp_sites))
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": sys.version.split()[0],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "clinics": args.clinics, "rounds": args.rounds, "dp": not args.no_dp, "methods": list(methods),
              "choice": args.choice, "no_dp_sites": list(no_dp_sites),
              "total_s": time.perf_counter() - start, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics.json_safe(result), indent=1) + "\n")
    print_tables(result)
    print(f"\nwrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
