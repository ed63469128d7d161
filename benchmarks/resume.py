"""Resume after a coordinator crash: rounds lost, ε charged twice, final model against an uninterrupted run.

    python benchmarks/resume.py [--clinics 3] [--rounds 4] [--stop-after 2] [--patients 60] [--strategy fedadam]
                                [--out benchmarks/results/resume.json]

For a world without DP and one whose sites are all under DP (ε = 3), in Flower's simulation: one uninterrupted
federation, and the same federation on a copy of the sites stopped (its ServerApp raising, as a crash) once round
``--stop-after``'s evaluations are in — with one-message rounds, inside the next round, after its replies were
aggregated and before its checkpoint — then resumed (``resume``, ``server.checkpoint``). A client mod counts every
training message per round. Figures:

- rounds lost: rounds the checkpoint held that the resumed run trained again (target 0);
- rounds redone: the round stopped inside (aggregated, not checkpointed), trained again by design;
- ε charged twice: ledger entries charging the same (run, phase, round) twice, summed over sites (target 0),
  and the largest |ε spent − the uninterrupted run's| over sites;
- max |Δ| of the final ANN's weights against the uninterrupted run (without DP; under DP the two runs' noise
  differs by construction: their run ids differ).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import machine, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Stop(RuntimeError):
    """The coordinator 'crashes'."""


def training_counter(path: Path):
    from flwr.app import Context, Message

    def count(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type.startswith("train"):
            with open(path, "a") as out:
                out.write(json.dumps({"round": int(msg.content["config"]["server-round"])}) + "\n")
        return call_next(msg, context)

    return count


def federation(out: Path, args, dp: bool, stop_after: int | None = None, resume: bool = False,
               log: Path | None = None):
    import client.app
    from client.site import SiteSource
    from simulation.clinics import SitePrivacy, generate_sites, make_world
    from simulation.experiment import ExperimentConfig, run_federation

    cfg = ExperimentConfig(out=out, clinics=args.clinics, rounds=args.rounds, seed=args.seed, models="ann",
                           compare=False, policy=False, strategy=args.strategy, resume=resume)
    if not (out / "sites").exists():
        generate_sites(args.clinics, args.seed, out / "sites", args.patients,
                       SitePrivacy(dp=dp, epsilon=3.0, delta=1e-5))
    sources = [SiteSource(out / "sites" / c.name) for c in make_world(args.clinics, args.seed, args.patients).clinics]

    def on_round(server_round: int) -> None:
        if stop_after is not None and server_round == stop_after:
            raise Stop(f"stopped after round {server_round}")

    real = client.app.make_client_app
    if log is not None:
        client.app.make_client_app = lambda sites, mods=None: real(sites, mods=[*(mods or []), training_counter(log)])
    try:
        return run_federation(cfg, sources, on_round), sources
    finally:
        client.app.make_client_app = real


def final_ann(out: Path) -> dict[str, np.ndarray]:
    import torch

    from shared.artifacts import RunArtifacts

    return {k: v.numpy() for k, v in torch.load(RunArtifacts.open(out / "federated").path("ann")).items()}


def ledgers(sources) -> list:
    from client.ledger import SITE_LEDGER_FILE, PrivacyLedger

    return [PrivacyLedger.open(s.path / SITE_LEDGER_FILE, 3.0, 1e-5) for s in sources]


def measure(work: Path, args, dp: bool) -> dict:
    from server.checkpoint import Checkpoint

    started = time.perf_counter()
    whole, whole_sources = federation(work / "whole", args, dp)
    whole_s = time.perf_counter() - started
    log = work / f"trainings-{dp}.jsonl"
    started = time.perf_counter()
    try:
        federation(work / "stopped", args, dp, stop_after=args.stop_after, log=log)
        raise RuntimeError("the run was not stopped")
    except Stop:
        pass
    checkpoint = Checkpoint.read(work / "stopped" / "federated")
    resumed, sources = federation(work / "stopped", args, dp, resume=True, log=log)
    stopped_s = time.perf_counter() - started
    trainings = Counter(json.loads(line)["round"] for line in log.read_text().splitlines())
    n = len(resumed.sites)
    done = checkpoint.server_round
    row = {"dp": dp, "checkpointed_rounds_at_stop": done, "stage_at_stop": checkpoint.stage,
           "rounds_lost": sum(1 for r in range(1, done + 1) if trainings[r] > n),
           "rounds_redone": sum(1 for r in range(done + 1, args.rounds + 1) if trainings[r] > n),
           "trainings_per_round": {str(r): trainings[r] for r in sorted(trainings)},
           "same_run_id": resumed.run_id == checkpoint.run_id,
           "uninterrupted_s": whole_s, "stopped_and_resumed_s": stopped_s}
    if dp:
        twice, gaps = 0, []
        for w, s in zip(ledgers(whole_sources), ledgers(sources), strict=True):
            keys = Counter((str(e["run_id"]), e["phase"], e["round"]) for e in s.entries)
            twice += sum(count - 1 for count in keys.values())
            gaps.append(abs(s.spent() - w.spent()))
        row |= {"epsilon_charged_twice": twice, "max_abs_epsilon_diff": max(gaps),
                "epsilon_spent": [s.spent() for s in ledgers(sources)]}
    else:
        a, b = final_ann(work / "whole"), final_ann(work / "stopped")
        row["max_abs_diff_ann"] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clinics", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=2)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--strategy", default="fedadam")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "resume.json")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3]
    from simulation.experiment import flower_environment, quiet_flower

    with TemporaryDirectory(prefix="fednano-resume-") as tmp:
        flower_environment(Path(tmp))
        quiet_flower()
        rows = [measure(Path(tmp) / ("dp" if dp else "no-dp"), args, dp) for dp in (False, True)]
    table = Table(title=f"Resume: {args.clinics} clinics, {args.rounds} rounds, {args.strategy}, stopped after "
                        f"round {args.stop_after}")
    for column in ("sites", "checkpointed at stop", "rounds lost", "rounds redone", "ε charged twice",
                   "max |Δε|", "max |Δ| ANN", "same run id", "uninterrupted s", "stopped+resumed s"):
        table.add_column(column)
    for row in rows:
        table.add_row("DP" if row["dp"] else "no DP", str(row["checkpointed_rounds_at_stop"]),
                      str(row["rounds_lost"]), str(row["rounds_redone"]), str(row.get("epsilon_charged_twice", "—")),
                      f"{row['max_abs_epsilon_diff']:.2e}" if "max_abs_epsilon_diff" in row else "—",
                      f"{row['max_abs_diff_ann']:.2e}" if "max_abs_diff_ann" in row else "—",
                      str(row["same_run_id"]), f"{row['uninterrupted_s']:.0f}", f"{row['stopped_and_resumed_s']:.0f}")
    Console(width=170).print(table)
    write_record(args.out, "python benchmarks/resume.py " + " ".join(sys.argv[1:]), {"runs": rows},
                 machine=machine(load_average_at_start=load), settings=vars(args) | {"out": str(args.out)})


if __name__ == "__main__":
    main()
