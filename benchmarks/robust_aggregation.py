"""Benchmark of robust aggregation against one poisoned clinic: FedAvg against each robust strategy, per attack.

    python benchmarks/robust_aggregation.py [--clinics 10] [--rounds 3] [--strategies fedavg,krum,...]
        [--attacks none,sign-flip,scale,label-flip,lie] [--cells fedavg:none,fedavg:scale=100,...]
        [--attacker largest] [--clip-norm C | --clip-median-factor F] [--out FILE]

One world of ``--clinics`` simulated clinics (no DP, so what is measured is the aggregation), the federated ANN
only (``models = "ann"``, no XGBoost, no policy), ``--rounds`` rounds. For every strategy and attack the real
ServerApp and ClientApp run in Flower's simulation (``simulation.experiment.run_federation``), the attacking
site answering through ``simulation.attacks``; the federated model is then judged by the simulation on every
site's true test split (never the poisoned copy): the overall response AUC, its drop against the same strategy
without attack, against FedAvg without attack, and the AUC the sites *released* (their summed evaluation
summaries, which ``lie`` falsifies).

The attacker is the largest clinic by default: FedAvg weights sites by their rows, so it is the one attacker
that moves FedAvg most. ``lie`` leaves the model as it is (it falsifies the released summaries only), so it is
run with FedAvg alone unless asked for elsewhere (``--lie-everywhere``). ``--cells`` replaces the grid by a list
of ``STRATEGY[+clip=C|+clipmed=F]:KIND[=FACTOR]`` (``none`` for no attack) when time allows only some cells:
``+clip=C`` clips updates to C, ``+clipmed=F`` to F × the round's median update norm (without, the grid adds
FedAvg with ``--clip-norm`` or ``--clip-median-factor``). The norms and bounds per round are kept in each cell
(``update_norms``).

``--policy`` also values, per cell, the dosing policy built on the federated ANN: the coordinator's own ensemble
candidate (``server.policy_phase.write_candidate``, as ``fednano simulate --policy-model ensemble`` builds it,
without its dose adjuster and with the ANN as its only member), judged by the simulator on fresh patients of
every clinic (``simulation.policy_evaluation.evaluate_policies``, the figures of ``policy.evaluation``): its
true value, that value as a share of the oracle's (``value_oracle``) and the standard of care's value. The
default structured policy is fitted from dose-response sums, not from the ANN, so a poisoned ANN update does
not reach it; this is the policy a poisoned ANN moves.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from record import machine, write_record  # noqa: E402

from shared.ann import predict  # noqa: E402
from shared.artifacts import RunArtifacts  # noqa: E402
from shared.task import NANOPARTICLE_TASK  # noqa: E402
from shared.validation import load_site  # noqa: E402
from simulation.baselines import BaselineSettings, evaluate_per_site, model_metrics  # noqa: E402
from simulation.clinics import SitePrivacy, generate_sites  # noqa: E402
from simulation.experiment import (  # noqa: E402
    ExperimentConfig,
    flower_environment,
    prepare_sites,
    quiet_flower,
    run_federation,
)

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("fedavg", "krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg")
ATTACKS = ("none", "sign-flip", "scale", "label-flip", "lie")
OUTCOME = "response"
TARGET_DROP = 0.01
"""Issue 16: the best robust strategy loses at most 1 AUC point to an attacker."""


def run_cell(cfg: ExperimentConfig, sources, sites: dict, settings: BaselineSettings, world=None) -> dict:
    """One federation; the federated ANN's true overall response AUC and the AUC the sites released, and with a
    ``world`` the true value of the dosing policy built on that ANN (:func:`ann_policy_value`)."""
    start = time.perf_counter()
    record = run_federation(cfg, sources)
    seconds = time.perf_counter() - start
    artifacts = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id)
    summaries = evaluate_per_site(partial(predict, artifacts.ann()), artifacts.encoder(), sites, settings)
    metrics = model_metrics(NANOPARTICLE_TASK, summaries)
    released = record.models["ann"].final["overall"].get(OUTCOME, {})
    return {"auc": metrics["overall"][OUTCOME]["auc"], "released_auc": released.get("auc"),
            "toxicity_auc": metrics["overall"]["toxicity_grade3"]["auc"], "seconds": seconds,
            "failures": {str(k): v for k, v in record.models["ann"].failures.items()},
            "update_norms": record.models["ann"].update_norms,
            "policy": None if world is None else ann_policy_value(cfg, record, artifacts, world, sites)}


def formulations_of(sites: dict) -> dict[str, dict[str, float]]:
    """Formulation id → properties as the coordinator's catalogue phase merges them (``collect_catalogue``:
    each site's mean per id, then the mean over the sites stocking it)."""
    import numpy as np

    from shared.dosing_policy import FORMULATION_FEATURES

    seen: dict[str, list[list[float]]] = {}
    for site in sites.values():
        table = site.episodes.groupby("formulation_id")[list(FORMULATION_FEATURES)].mean()
        for fid, row in table.iterrows():
            seen.setdefault(str(fid), []).append([float(row[name]) for name in FORMULATION_FEATURES])
    return {fid: dict(zip(FORMULATION_FEATURES, np.mean(rows, axis=0).round(6).tolist(), strict=True))
            for fid, rows in sorted(seen.items())}


def ann_policy_value(cfg: ExperimentConfig, record, artifacts: RunArtifacts, world, sites: dict) -> dict:
    """True value of the dosing policy built on this run's federated ANN (module docstring)."""
    from server.policy_phase import write_candidate
    from shared.policy_loader import policy_from_folder
    from simulation.experiment import site_decider, site_usual
    from simulation.policy_evaluation import evaluate_policies

    folder = cfg.out / "ann-policy"
    write_candidate(artifacts, record, formulations_of(sites), folder)
    policy = policy_from_folder(folder)
    usual = {name: site_usual(site) for name, site in sites.items()}
    evaluation = evaluate_policies(world, {"federated": lambda site: site_decider(policy, usual[site])}, policy,
                                   seed=cfg.seed + 1, sites=list(sites))
    return {"value": evaluation["federated"]["value"], "value_oracle": evaluation["federated"]["value_oracle"],
            "standard_of_care_value": evaluation["standard_of_care"]["value"],
            "patients_per_site": evaluation["patients_per_site"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--scale-factor", type=float, default=10.0)
    parser.add_argument("--sign-flip-factor", type=float, default=1.0)
    parser.add_argument("--clip-norm", type=float, default=0.0, help="also run FedAvg with this update norm bound")
    parser.add_argument("--clip-median-factor", type=float, default=0.0,
                        help="also run FedAvg with updates clipped to this × the round's median update norm")
    parser.add_argument("--attacker", default="largest", help="a site name, or 'largest'")
    parser.add_argument("--lie-everywhere", action="store_true")
    parser.add_argument("--cells", default="", help="STRATEGY:KIND[=FACTOR],... instead of the grid")
    parser.add_argument("--policy", action="store_true", help="also value the policy built on each cell's ANN")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robust_aggregation.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="robust_aggregation_"))
    flower_environment(ROOT)
    quiet_flower()
    base = ExperimentConfig(out=work / "run", clinics=args.clinics, rounds=args.rounds, dp=False, seed=args.seed,
                            models="ann", compare=False, fqi_iterations=0)
    world = generate_sites(args.clinics, args.seed, work / "sites", privacy=SitePrivacy(dp=False))
    folders = [work / "sites" / c.name for c in world.clinics]
    sources, _ = prepare_sites(dataclasses.replace(base, sites=folders))
    sites = {c.name: load_site(folder) for c, folder in zip(world.clinics, folders, strict=True)}
    attacker = (max(world.clinics, key=lambda c: c.n_patients).name if args.attacker == "largest"
                else args.attacker)
    settings = BaselineSettings(task=NANOPARTICLE_TASK, epochs=args.rounds, batch_size=base.batch_size, lr=base.lr,
                                hidden=(64, 32), seed=args.seed, split_seed=args.seed)
    factors = {"scale": f"={args.scale_factor:g}", "sign-flip": f"={args.sign_flip_factor:g}"}
    cells = []
    for strategy, clip, median_factor, attack in grid(args):
        label = clipped_label(strategy, clip, median_factor)
        kind = attack.split("=")[0]
        spec = attack if "=" in attack or kind not in factors else f"{attack}{factors[kind]}"
        attacks = [] if attack == "none" else [f"{attacker}:{spec}"]
        cfg = dataclasses.replace(base, strategy=strategy, clip_norm=clip, clip_median_factor=median_factor,
                                  attacks=attacks)
        shutil.rmtree(cfg.out, ignore_errors=True)
        cell = {"strategy": label, "attack": spec, "attacks": attacks,
                **run_cell(cfg, sources, sites, settings, world if args.policy else None)}
        cells.append(cell)
        value = "" if cell["policy"] is None else f" policy value {cell['policy']['value']:.4f}"
        print(f"{label:>16} {spec:>14}: AUC {cell['auc']:.3f} released {cell['released_auc'] or float('nan'):.3f}"
              f"{value} ({cell['seconds']:.0f} s)", flush=True)
        save(args, argv, cells, world, attacker)  # after every cell: a run stopped early keeps what it measured
    print_table(summarise(cells), attacker, args)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def save(args, argv, cells: list[dict], world, attacker: str) -> None:
    write_record(args.out, "python benchmarks/robust_aggregation.py " + " ".join(argv or sys.argv[1:]),
                 {"cells": cells, "table": summarise(cells)},
                 machine=machine(note="2 cores shared with other jobs, 24 GiB"),
                 setup={"clinics": args.clinics, "rounds": args.rounds, "seed": args.seed, "dp": False,
                        "models": "ann", "attacker": attacker,
                        "attacker_patients": next(c.n_patients for c in world.clinics if c.name == attacker),
                        "patients": {c.name: c.n_patients for c in world.clinics},
                        "scale_factor": args.scale_factor, "sign_flip_factor": args.sign_flip_factor,
                        "clip_norm": args.clip_norm, "clip_median_factor": args.clip_median_factor,
                        "target_drop": TARGET_DROP})


def clipped_label(strategy: str, clip: float, median_factor: float) -> str:
    """The strategy's name in the table, with its update norm bound if any."""
    if median_factor > 0:
        return f"{strategy}+clip{median_factor:g}xmed"
    return strategy if clip == 0 else f"{strategy}+clip{clip:g}"


def cell_strategy(text: str) -> tuple[str, float, float]:
    """``STRATEGY[+clip=C|+clipmed=F]`` → (strategy, clip norm, median factor)."""
    name, _, bound = text.partition("+")
    kind, _, value = bound.partition("=")
    if not bound:
        return name, 0.0, 0.0
    if kind not in ("clip", "clipmed"):
        raise ValueError(f"--cells: {text!r}: expected STRATEGY, STRATEGY+clip=C or STRATEGY+clipmed=F")
    return (name, float(value), 0.0) if kind == "clip" else (name, 0.0, float(value))


def grid(args) -> list[tuple[str, float, float, str]]:
    """(strategy, clip norm, median factor, attack) of every cell: ``--cells`` (:func:`cell_strategy`), else
    every strategy × attack (``lie`` with FedAvg only unless ``--lie-everywhere``), plus FedAvg with clipping if
    ``--clip-norm`` or ``--clip-median-factor``."""
    if args.cells:
        return [(*cell_strategy(c.split(":")[0]), c.split(":", 1)[1]) for c in args.cells.split(",") if c]
    strategies = [(s, 0.0, 0.0) for s in args.strategies.split(",") if s]
    if args.clip_norm > 0 or args.clip_median_factor > 0:
        strategies.append(("fedavg", args.clip_norm, args.clip_median_factor))
    return [(s, clip, med, a) for s, clip, med in strategies for a in args.attacks.split(",")
            if a and (a != "lie" or (s == "fedavg" and clip == med == 0) or args.lie_everywhere)]


def summarise(cells: list[dict]) -> list[dict]:
    """Per strategy and attack: the AUC, its drop against the same strategy without attack and against FedAvg
    without attack (the robust strategy's cost is that drop at attack ``none``)."""
    clean = {c["strategy"]: c["auc"] for c in cells if c["attack"] == "none"}
    fedavg = clean.get("fedavg")
    rows = []
    for c in cells:
        own = clean.get(c["strategy"])
        rows.append({"strategy": c["strategy"], "attack": c["attack"], "auc": c["auc"],
                     "released_auc": c["released_auc"],
                     "drop_vs_no_attack": None if own is None else own - c["auc"],
                     "drop_vs_fedavg_no_attack": None if fedavg is None else fedavg - c["auc"]})
    return rows


def print_table(rows: list[dict], attacker: str, args) -> None:
    def num(v):
        return "–" if v is None else f"{v:.3f}"

    print(f"\nresponse AUC of the federated ANN on every site's true test split; {args.clinics} clinics, "
          f"{args.rounds} rounds, no DP, attacker {attacker}")
    print(f"{'strategy':>16} {'attack':>14} {'AUC':>7} {'drop':>7} {'vs FedAvg':>9} {'released':>9}")
    for r in rows:
        print(f"{r['strategy']:>16} {r['attack']:>14} {num(r['auc']):>7} {num(r['drop_vs_no_attack']):>7} "
              f"{num(r['drop_vs_fedavg_no_attack']):>9} {num(r['released_auc']):>9}")
    print("drop: AUC without attack minus with, same strategy; vs FedAvg: FedAvg without attack minus this cell "
          "(at attack none: the strategy's cost); released: the AUC the sites' summed summaries give")


if __name__ == "__main__":
    raise SystemExit(main())
