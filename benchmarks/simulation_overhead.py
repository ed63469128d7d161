"""Flower simulation against the same steps in a plain loop, cold and inside one Ray session.

    python benchmarks/simulation_overhead.py [--clinics 10] [--rounds 20] [--repeats 2]

On the same simulated clinics (no DP, the ANN only, FedAvg), in one process:

1. **plain** — ``federated_ann.plain_run``: load the sites, build the encoder, FedAvg round by round in one process
   (the steps the federation runs, without Flower);
2. **cold** — ``simulation.experiment.run_federation`` as ``fednano simulate`` runs it: Flower starts Ray and its
   ClientApp actors for the simulation and shuts them down after it;
3. **warm** — ``--repeats`` federations inside one ``simulation.flower_runtime.ray_session``: the first starts Ray
   and the actors, the later ones reuse them and the actors' site caches (what ``fednano paper liposome`` and a
   closed loop do for their many simulations);
4. **warm, Flower's polls** — one more federation in the session with the delivery loop and the ServerApp's reply
   pulls every 0.1 s, as Flower 1.42 does, instead of ``simulation.flower_runtime.poll_interval``.

Each row: total seconds, seconds to the first round's end, mean of later rounds, and the ratio to the plain loop
measured in the same run (the machine is shared; compare ratios, not seconds). The final AUCs show the runs
trained the same model. Prints a table and writes ``benchmarks/results/simulation_overhead.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from federated_ann import BINARY, LoopSettings, Timeline, plain_run
from record import machine, write_record

from client.site import SiteSource
from simulation import flower_runtime
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation
from simulation.flower_runtime import poll_interval, ray_session

ROOT = Path(__file__).resolve().parents[1]


def flower_run(cfg: ExperimentConfig, sources: list[SiteSource]) -> dict:
    timeline = Timeline()
    start = time.perf_counter()
    record = run_federation(cfg, sources, on_round=timeline.round_end)
    end = time.perf_counter()
    return {"seconds": end - start, **timeline.round_profile(start, end),
            "auc": {k: record.models["ann"].final["overall"][k]["auc"] for k in BINARY}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="federations inside one Ray session (>= 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulation_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each Ray actor

    with tempfile.TemporaryDirectory(prefix="fednano_overhead_") as tmp:
        work = Path(tmp)
        flower_environment(work)
        quiet_flower()
        generate_sites(args.clinics, seed=args.seed, out=work / "sites", privacy=SitePrivacy(dp=False))
        paths = sorted(p for p in (work / "sites").iterdir() if p.is_dir())
        sources = [SiteSource(p) for p in paths]

        def cfg(name: str) -> ExperimentConfig:
            return ExperimentConfig(out=work / name, clinics=args.clinics, rounds=args.rounds, seed=args.seed,
                                    models="ann", dp=False, compare=False)

        print("[plain] the same steps in one process", flush=True)
        plain = plain_run(paths, LoopSettings.of(cfg("plain")))
        print("[cold] a federation that starts its own Ray", flush=True)
        cold = flower_run(cfg("cold"), sources)
        warm = []
        with ray_session():
            for i in range(args.repeats):
                print(f"[warm {i + 1}/{args.repeats}] inside one Ray session", flush=True)
                warm.append(flower_run(cfg(f"warm{i}"), sources))
            print("[warm, Flower's polls] once more, polling every 0.1 s as Flower 1.42 does", flush=True)
            ours = flower_runtime.poll_interval
            flower_runtime.poll_interval = lambda n_nodes: flower_runtime.FLOWER_POLL_S
            try:
                flower_polls = flower_run(cfg("flower_polls"), sources)
            finally:
                flower_runtime.poll_interval = ours

    rows = {"plain": {"seconds": plain["seconds"], "first_round_end_s": plain["first_round_end_s"],
                      "later_round_mean_s": plain["later_round_mean_s"], "auc": plain["metrics"]}}
    rows["cold"] = cold
    for i, run in enumerate(warm):
        rows[f"session run {i + 1}"] = run
    rows["session, Flower's 0.1 s polls"] = flower_polls
    base = rows["plain"]
    print(f"\n{'run':30s} {'total s':>8s} {'× plain':>8s} {'1st round s':>12s} {'later rnd s':>12s} {'× plain':>8s}"
          f"  response AUC")
    for name, row in rows.items():
        row["ratio_total"] = row["seconds"] / base["seconds"]
        row["ratio_later_rounds"] = row["later_round_mean_s"] / base["later_round_mean_s"]
        auc = row["auc"]["response"]["auc"] if name == "plain" else row["auc"]["response"]
        print(f"{name:30s} {row['seconds']:8.1f} {row['ratio_total']:8.2f} {row['first_round_end_s']:12.2f} "
              f"{row['later_round_mean_s']:12.3f} {row['ratio_later_rounds']:8.2f}  {auc:.4f}")
    command = "python benchmarks/simulation_overhead.py" + "".join(f" {a}" for a in sys.argv[1:])
    write_record(args.out, command, rows, machine=machine(load_average=os.getloadavg()),
                 config={"clinics": args.clinics, "rounds": args.rounds, "repeats": args.repeats,
                         "seed": args.seed, "poll_interval_s": poll_interval(args.clinics)},
                 target_flower_over_plain=1.5)

if __name__ == "__main__":
    main()
