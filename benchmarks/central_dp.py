"""Benchmark of central DP (server-side fixed and adaptive clipping) against per-site DP-SGD and no DP.

    python benchmarks/central_dp.py [--clinics 10] [--rounds 3] [--noise 0.3,1] [--epsilon 3] [--out FILE]

One world of ``--clinics`` simulated clinics, the federated ANN only (no XGBoost, no policy), ``--rounds`` rounds of
FedAvg, in Flower's simulation (``simulation.experiment.run_federation``, one Ray kept for every run:
``simulation.flower_runtime.ray_session``, after a one-round warm-up that is not counted). Runs:

- ``none``: no DP;
- ``local``: every site under its own DP-SGD with budget ``--epsilon`` per site (site.toml; ε per row of a site,
  against the coordinator too; it also covers the statistics and evaluation releases);
- ``fixed`` / ``adaptive`` at each ``--noise`` multiplier z, and at the z whose central ε over the rounds equals
  ``--epsilon`` (RDP, δ = 1e-5): central DP of the global models, ε per *site* (a stronger unit than a row: a
  site-level guarantee implies the row-level one with the same ε), trusting the coordinator; sites without DP.

For each run: the federated model's true overall response and toxicity AUC on every site's test split (the
simulation's exact figure), ε (central: the record's ``central_dp.epsilon``; local: the largest ε any site spent
over the run, every phase), and the wall time of the federation with its ratio to the ``none`` run's.
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

from server.central_accounting import central_epsilon  # noqa: E402
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
from simulation.flower_runtime import ray_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def noise_for_epsilon(epsilon: float, rounds: int, delta: float = DELTA) -> float:
    """The noise multiplier z whose central ε after ``rounds`` rounds (sample rate 1, RDP) is ``epsilon``
    (bisection on z; ε falls as z grows)."""
    low, high = 0.05, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if central_epsilon([mid] * rounds, 1.0, delta) > epsilon else (low, mid)
    return high


def run(cfg: ExperimentConfig, sources, sites: dict, settings: BaselineSettings) -> dict:
    """One federation; its true AUCs, its ε and its wall time."""
    start = time.perf_counter()
    record = run_federation(cfg, sources)
    seconds = time.perf_counter() - start
    artifacts = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id)
    summaries = evaluate_per_site(partial(predict, artifacts.ann()), artifacts.encoder(), sites, settings)
    overall = model_metrics(NANOPARTICLE_TASK, summaries)["overall"]
    central = record.central_dp
    local = [p.epsilon_spent for p in record.privacy.values() if p.dp]
    return {"response_auc": overall["response"]["auc"], "toxicity_auc": overall["toxicity_grade3"]["auc"],
            "seconds": seconds,
            "central_epsilon": None if central is None else central.epsilon,
            "central_clip_norms": None if central is None else [r["clip_norm"] for r in central.per_round.values()],
            "central_noise_sd": None if central is None else [r["noise_sd"] for r in central.per_round.values()],
            "local_epsilon_max": max(local) if local else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="0.3,1", help="central noise multipliers, comma-separated")
    parser.add_argument("--epsilon", type=float, default=3.0, help="per-site DP-SGD budget, and a central ε to match")
    parser.add_argument("--clip", type=float, default=1.0, help="central clipping norm (adaptive: initial)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "central_dp.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="central_dp_"))
    flower_environment(ROOT)
    quiet_flower()
    base = ExperimentConfig(out=work / "run", clinics=args.clinics, rounds=args.rounds, dp=False, seed=args.seed,
                            models="ann", compare=False, fqi_iterations=0, policy=False, central_clip=args.clip,
                            central_delta=DELTA)
    worlds = {}
    for label, dp in (("plain", False), ("dp", True)):  # the same clinics; only their site.toml's DP differs
        world = generate_sites(args.clinics, args.seed, work / label, privacy=SitePrivacy(dp=dp, epsilon=args.epsilon))
        folders = [work / label / c.name for c in world.clinics]
        sources, _ = prepare_sites(dataclasses.replace(base, sites=folders))
        worlds[label] = (sources, {c.name: load_site(f) for c, f in zip(world.clinics, folders, strict=True)})
    settings = BaselineSettings(task=NANOPARTICLE_TASK, epochs=args.rounds, batch_size=base.batch_size, lr=base.lr,
                                hidden=(64, 32), seed=args.seed, split_seed=args.seed)
    matched = noise_for_epsilon(args.epsilon, args.rounds)
    noises = [float(z) for z in args.noise.split(",") if z.strip()] + [matched]
    plan = [("none", "plain", "", 0.0), ("local", "dp", "", 0.0)]
    plan += [(mechanism, "plain", mechanism, z) for mechanism in ("fixed", "adaptive") for z in noises]
    rows = []
    with ray_session():
        sources, sites = worlds["plain"]
        run(dataclasses.replace(base, rounds=1, out=work / "warmup"), sources, sites, settings)  # Ray, actors
        for name, world, mechanism, z in plan:
            sources, sites = worlds[world]
            cfg = dataclasses.replace(base, central_dp=mechanism, central_noise_multiplier=z or 1.0,
                                      out=work / f"{name}-{z:g}")
            row = {"mode": name, "noise_multiplier": z if mechanism else None,
                   "matched_epsilon": bool(mechanism) and z == matched, **run(cfg, sources, sites, settings)}
            rows.append(row)
            shutil.rmtree(cfg.out, ignore_errors=True)
            print(f"{name:>9} z={z:<6.3g} AUC {row['response_auc']:.3f} ε {_eps(row)} ({row['seconds']:.0f} s)",
                  flush=True)
            save(args, argv, rows, matched)
    baseline = next(r["seconds"] for r in rows if r["mode"] == "none")
    for row in rows:
        row["time_ratio"] = row["seconds"] / baseline
    save(args, argv, rows, matched)
    print_table(rows, args)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _eps(row: dict) -> str:
    if row["central_epsilon"] is not None:
        return f"{row['central_epsilon']:.2f} (site)"
    if row["local_epsilon_max"] is not None:
        return f"{row['local_epsilon_max']:.2f} (row, max over sites)"
    return "–"


def save(args, argv, rows: list[dict], matched: float) -> None:
    write_record(args.out, "python benchmarks/central_dp.py " + " ".join(argv or sys.argv[1:]), {"runs": rows},
                 machine=machine(note="2 cores shared with other jobs, 24 GiB"),
                 setup={"clinics": args.clinics, "rounds": args.rounds, "seed": args.seed, "delta": DELTA,
                        "local_epsilon_budget": args.epsilon, "central_clip": args.clip,
                        "noise_for_matched_epsilon": matched, "strategy": "fedavg", "models": "ann"})


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.clinics} clinics, {args.rounds} rounds, FedAvg, ANN; response AUC on every site's test split")
    print(f"{'mode':>9} {'z':>6} {'AUC resp':>9} {'AUC tox':>8} {'ε':>28} {'time ×':>7}")
    for r in rows:
        z = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        print(f"{r['mode']:>9} {z:>6} {r['response_auc']:>9.3f} {r['toxicity_auc']:>8.3f} {_eps(r):>28} "
              f"{r['time_ratio']:>7.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
