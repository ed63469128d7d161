"""Spread of the federated ANN's metrics over DP federations (issue 17): N runs, each with fresh DP noise.

    python benchmarks/dp_ann_spread.py [--runs 6] [--clinics 5] [--rounds 10] [--epsilon 3]
                                       [--input-bound 5 (0: none)] [--no-dp] [--entropy E ...]
                                       [--out benchmarks/results/dp_ann_spread.json]

What ``fednano simulate --models ann`` computes under DP, in one process without Flower (the Flower path of the
same computation takes ~7 min a run on this shared machine; ``benchmarks/federated_ann.py`` measures that the
plain loop and the federation agree). Per run, at every site, as the ClientApp does:

1. **statistics** — its training split's statistics through the DP release of ``client.statistics`` (Gaussian
   noise at the statistics phase's share of ε, ``client.dp.DEFAULT_SHARES``); the noised statistics are summed
   and fit the federated encoder (``shared.encoding``, the noised path), and each site's noised row count is
   its FedAvg weight;
2. **training** — DP-SGD (``client.training.train``, Opacus, clip 1.0) each round from the global model, σ
   calibrated once for all rounds at the training share after the statistics release (``client.dp``'s rule),
   FedAvg of the sites' weights by their noised row counts;
3. **metrics** — the final model on every site's test split, exact (as ``results.json``'s
   ``models.ann.federated.overall``): AUC of each binary head, R² of the regression head; and the regression
   head's R² after every round (does it drift or jump?).

Every run draws fresh OS entropy for its noise and batches (recorded in the JSON, so a bad run can be replayed
with ``--entropy``); ``--no-dp`` runs the same federation without DP (exact statistics, row counts, no noise;
deterministic). The product's noise stays keyed at each site (``client.dp.training_seed``).
``--input-bound 0`` builds the model as before the fix (no clamp of the standardised inputs; the default is
``shared.ann.INPUT_BOUND``). Prints a table; writes a small JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.dp import DEFAULT_SHARES, GAUSSIAN_SAMPLE_RATE, gaussian_release, sensitivity
from client.ledger import calibrate_noise
from client.split import encode, split_site
from client.statistics import noised_rows, private_statistics
from client.training import DPConfig, TrainConfig, evaluate, sample_rate, steps_per_epoch, train
from shared.ann import INPUT_BOUND, AnnSpec, MultiTaskMLP
from shared.encoding import FeatureEncoder, SiteStatistics, combine
from shared.protocol.privacy import ReleaseFacts
from shared.task import NANOPARTICLE_TASK
from shared.validation import load_site
from simulation.baselines import model_metrics
from simulation.clinics import generate_sites

ROOT = Path(__file__).resolve().parents[1]
TASK = NANOPARTICLE_TASK
DELTA = 1e-5


class StatisticsRelease:
    """The statistics phase's Gaussian release (``client.dp.PhaseRelease.release``) without a ledger: noise σ
    (multiplier of the blocks' sensitivity) from ``rng``."""

    def __init__(self, sigma: float, rng: np.random.Generator) -> None:
        self.sigma, self.rng = sigma, rng

    def release(self, blocks, index):
        noise_sd = self.sigma * sensitivity(blocks)
        return gaussian_release(blocks, self.sigma, self.rng), ReleaseFacts("statistics", index, self.sigma,
                                                                            noise_sd, 0.0, 1.0, DELTA)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts, as Flower's FedAvg."""
    total = float(sum(weights))
    return {k: sum((s[k] * (w / total) for s, w in zip(states, weights, strict=True)),
                   start=torch.zeros_like(states[0][k])) for k in states[0]}


def one_run(splits: dict, args: argparse.Namespace, entropy: int) -> dict:
    """One DP federation (module docstring) with noise and batches from ``entropy``."""
    rng = np.random.default_rng(entropy)
    torch_seeds = rng.integers(0, 2**62, size=(args.rounds, len(splits)))
    # the ANN run's plan: statistics, training, evaluation; training gets what the other two leave (client.dp)
    eps_stats = args.epsilon * DEFAULT_SHARES["statistics"]
    eps_train = args.epsilon * (1.0 - DEFAULT_SHARES["statistics"] - DEFAULT_SHARES["evaluation"])
    sigma_stats = calibrate_noise(eps_stats, DELTA, GAUSSIAN_SAMPLE_RATE, 1)
    exact = {name: SiteStatistics.from_frame(parts["train"], TASK) for name, parts in splits.items()}
    noised = exact if args.no_dp else {name: private_statistics(stats, TASK, StatisticsRelease(sigma_stats, rng))[0]
                                        for name, stats in exact.items()}
    encoder = FeatureEncoder(TASK).fit_statistics(combine(list(noised.values())))
    train_data = {name: encode(encoder, parts["train"]) for name, parts in splits.items()}
    test_data = {name: encode(encoder, parts["test"]) for name, parts in splits.items()}
    sigmas = {}
    for name, data in train_data.items():
        q = sample_rate(len(data), args.batch_size)
        steps = args.rounds * steps_per_epoch(len(data), args.batch_size)
        sigmas[name] = calibrate_noise(eps_stats + eps_train, DELTA, q, steps,
                                       history=[(sigma_stats, GAUSSIAN_SAMPLE_RATE, 1)])
    weights = [float(len(data)) if args.no_dp else noised_rows(noised[name]) for name, data in train_data.items()]
    n_classes = {name: len(classes) for name, classes in encoder.classes_.items()}
    spec = dataclasses.replace(AnnSpec.for_task(TASK, encoder.n_features_out_, n_classes, (64, 32)),
                               input_bound=args.input_bound or None)

    def fresh() -> MultiTaskMLP:
        torch.manual_seed(args.seed)  # the run's initial weights, as shared.ann.build_model
        return MultiTaskMLP(spec)

    state = fresh().state_dict()
    curve = []
    for r in range(args.rounds):
        states = []
        for i, (name, data) in enumerate(train_data.items()):
            local = fresh()
            local.load_state_dict(state)
            # without DP the coordinator's seed (run seed + round, as client.app), so the run is deterministic
            seed = args.seed + r + 1 if args.no_dp else int(torch_seeds[r, i])
            config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, seed=seed)
            train(local, data, config, None if args.no_dp else DPConfig(noise_multiplier=sigmas[name]))
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
        state = fedavg(states, weights)
        model = fresh()
        model.load_state_dict(state)
        overall = model_metrics(TASK, {n: evaluate(model, encoder, d) for n, d in test_data.items()})["overall"]
        curve.append(overall)
    final = curve[-1]
    return {"entropy": str(entropy), "sigmas": {n: round(s, 4) for n, s in sigmas.items()},
            "weights": dict(zip(train_data, weights, strict=True)),
            "response_auc": final["response"]["auc"], "toxicity_auc": final["toxicity_grade3"]["auc"],
            "efficacy_r2": final["efficacy_pct"]["r2"],
            "efficacy_r2_by_round": [round(c["efficacy_pct"]["r2"], 4) for c in curve],
            "max_abs_input": round(float(max(np.abs(d.x).max() for d in train_data.values())), 1)}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0, help="world, splits and initial weights (not the noise)")
    parser.add_argument("--input-bound", type=float, default=INPUT_BOUND,
                        help="clamp of the standardised inputs; 0: none, the model before the fix")
    parser.add_argument("--no-dp", action="store_true", help="exact statistics and rows, no DP-SGD (deterministic)")
    parser.add_argument("--entropy", type=int, nargs="*", help="replay these runs' noise instead of fresh")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dp_ann_spread.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each Ray actor; the machine is shared
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        generate_sites(args.clinics, args.seed, Path(tmp))
        sites = {p.name: load_site(p) for p in sorted(Path(tmp).iterdir()) if p.is_dir()}
    splits = {name: split_site(site.episodes, TASK, args.seed) for name, site in sites.items()}
    entropies = args.entropy or [int.from_bytes(os.urandom(8), "big") for _ in range(args.runs)]
    runs = []
    print(f"{'run':>3} {'response AUC':>12} {'toxicity AUC':>12} {'efficacy R²':>11} {'max|x|':>7}  "
          "efficacy R² by round")
    for k, entropy in enumerate(entropies):
        result = one_run(splits, args, entropy)
        runs.append(result)
        print(f"{k:>3} {result['response_auc']:>12.3f} {result['toxicity_auc']:>12.3f} "
              f"{result['efficacy_r2']:>11.3f} {result['max_abs_input']:>7.1f}  "
              f"{' '.join(f'{v:.2f}' for v in result['efficacy_r2_by_round'])}", flush=True)
    summary = {key: spread([r[key] for r in runs]) for key in ("response_auc", "toxicity_auc", "efficacy_r2")}
    bound = f"inputs clamped to ±{args.input_bound:g}" if args.input_bound else "no input bound"
    bound = f"no DP, {bound}" if args.no_dp else bound
    print(f"\n{'metric':<14} {'mean':>6} {'sd':>6} {'min':>6} {'max':>6}   ({len(runs)} runs, {bound})")
    for key, s in summary.items():
        print(f"{key:<14} {s['mean']:>6.3f} {s['sd']:>6.3f} {s['min']:>6.3f} {s['max']:>6.3f}")
    record = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "seconds": round(time.time() - started, 1),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
