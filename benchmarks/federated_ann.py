"""Benchmark of the federated ANN: quality against pooling, Flower's overhead, DP-SGD step cost, peak memory.

    python benchmarks/federated_ann.py [--clinics 10] [--rounds 20] [--out benchmarks/results/federated_ann.json]

Only the neural network is trained (``ExperimentConfig.models = "ann"``).

1. **Quality** — ``fednano simulate``'s experiment (``simulation.experiment.run_experiment``) without DP and
   with DP (ε = 3, δ = 1e-5 per site): overall AUC of the federated model and of pooled training (same code,
   same per-site test splits) for each binary outcome, R² and MAE for the regression outcome, max ε spent.
2. **Flower overhead** — the no-DP run's federation wall time against :func:`plain_federated_loop`: the same
   local training steps, FedAvg and per-site evaluation in one process without Flower. Round end times
   come from the ``on_round`` callback of ``run_federation``. The federation runs a third time with one
   Ray actor (sites one after the other, as in the plain loop), so Flower's cost is seen apart from its
   parallelism. This process trains with ``--torch-threads`` (default 1, as each Ray actor): on a shared
   2-core machine torch's default of 2 intra-op threads makes these small steps several times slower.
3. **DP step cost** — ``client.training.train`` on one larger site's training split, without DP and with
   DP-SGD (σ = 1) for each Opacus ``grad_sample_mode``; median of repeats.
4. **Peak memory** — RSS of this process and of all its descendants (Ray's processes and workers), sampled
   every 0.2 s during the no-DP federation.

The machine is shared and noisy: compare the ratios measured within one run, not absolute seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from client.site import SiteSource
from client.split import EncodedSplit, encode, split_site
from client.training import DPConfig, TrainConfig, evaluate, train
from shared.ann import build_model
from shared.encoding import FeatureEncoder, SiteStatistics, combine, fit_local
from shared.task import NANOPARTICLE_TASK, TaskSpec
from shared.validation import SiteData, load_site
from simulation.baselines import model_metrics
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment, run_federation

ROOT = Path(__file__).resolve().parents[1]
BINARY = ("response", "toxicity_grade3")
REGRESSION = "efficacy_pct"
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch")
TARGETS = {"auc_ratio_no_dp": 0.99, "auc_ratio_dp": 0.97, "flower_over_plain": 1.5, "dp_over_plain_step": 2.0}


# ---------------------------------------------------------------------------------------------------------
# Measuring helpers


class Timeline:
    """``time.perf_counter()`` of named events (phases) and of each round's end."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.rounds: list[float] = []

    def phase(self, name: str) -> None:
        self.phases[name] = time.perf_counter()

    def round_end(self, _round: int) -> None:
        self.rounds.append(time.perf_counter())

    def round_profile(self, start: float, end: float | None = None) -> dict:
        """Time to the first round's end (from ``start``), mean and median of later rounds, and the tail
        from the last round's end to ``end``."""
        later = [b - a for a, b in zip(self.rounds, self.rounds[1:], strict=False)]
        profile = {"rounds": len(self.rounds),
                   "first_round_end_s": self.rounds[0] - start if self.rounds else None,
                   "later_round_mean_s": statistics.fmean(later) if later else None,
                   "later_round_median_s": statistics.median(later) if later else None,
                   "round_durations_s": [self.rounds[0] - start] + later if self.rounds else []}
        if end is not None and self.rounds:
            profile["after_last_round_s"] = end - self.rounds[-1]
        return profile


class TreeMemory:
    """Peak RSS of this process and of the sum over it and all its descendants, sampled in a thread.

    RSS counts a shared page once in every process that maps it, so the sum over a tree is an upper
    bound on the memory it occupies (Ray's workers share their object store and the Python libraries)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        try:
            import psutil
        except ImportError:  # Ray ships psutil in its thirdparty_files, which importing ray puts on sys.path
            importlib.import_module("ray")
            psutil = importlib.import_module("psutil")
        self._psutil = psutil
        self.interval_s = interval_s
        self.me = psutil.Process(os.getpid())
        self.peak_tree = self.peak_self = 0
        self.max_processes = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        psutil = self._psutil
        procs = [self.me]
        with contextlib.suppress(psutil.Error):
            procs += self.me.children(recursive=True)
        total = mine = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:  # a process that ended between listing and reading
                continue
            total += rss
            if p.pid == self.me.pid:
                mine = rss
        self.peak_tree = max(self.peak_tree, total)
        self.peak_self = max(self.peak_self, mine)
        self.max_processes = max(self.max_processes, len(procs))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        mib = 1024 * 1024
        return {"peak_tree_rss_mib": self.peak_tree / mib, "peak_self_rss_mib": self.peak_self / mib,
                "max_processes": self.max_processes, "samples": self.samples, "interval_s": self.interval_s}

    def descendants(self) -> int:
        try:
            return len(self.me.children(recursive=True))
        except self._psutil.Error:
            return -1


# ---------------------------------------------------------------------------------------------------------
# 1. Quality


def quality(results: dict, dp: bool) -> dict:
    """Overall metrics of federated and pooled models from a run's results.json, and their ratios."""
    models = results["models"]["ann"]
    out: dict = {"binary": {}, "regression": {}}
    for outcome in BINARY:
        row = {name: models[name]["overall"][outcome]["auc"] for name in ("federated", "pooled", "pooled_no_dp")
               if name in models}
        row["federated_over_pooled"] = row["federated"] / row["pooled"]
        if "pooled_no_dp" in row:
            row["federated_over_pooled_no_dp"] = row["federated"] / row["pooled_no_dp"]
        out["binary"][outcome] = row
    for name in ("federated", "pooled", "pooled_no_dp"):
        if name in models:
            m = models[name]["overall"][REGRESSION]
            out["regression"][name] = {"r2": m["r2"], "mae": m["mae"]}
    eps = [p["epsilon"] for p in results["privacy"].values() if p.get("epsilon") is not None]
    out["max_epsilon_spent"] = max(eps) if eps else None
    out["epsilon_budget"] = results["pooled_dp_budget"]["epsilon"] if dp and results["pooled_dp_budget"] else None
    out["sites"] = len(results["sites"])
    out["rejected"] = len(results["rejected"])
    out["failures"] = sum(len(r["failures"]) for r in results["rounds"])
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. The same federation without Flower


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What a federated run fixes for its sites' training (the ServerApp's run config)."""

    task: TaskSpec
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    hidden: tuple[int, ...]
    seed: int
    split_seed: int

    @classmethod
    def of(cls, cfg: ExperimentConfig, task: TaskSpec = NANOPARTICLE_TASK) -> LoopSettings:
        return cls(task=task, rounds=cfg.rounds, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                   lr=cfg.lr, hidden=tuple(int(h) for h in cfg.hidden.split(",")), seed=cfg.seed,
                   split_seed=cfg.seed)


def federated_encoder(sites: dict[str, SiteData], settings: LoopSettings) -> FeatureEncoder:
    """The encoder of the summed training-split statistics, as ``server.app.federated_encoder`` builds it."""
    stats = [SiteStatistics.from_frame(split_site(site.episodes, settings.task, settings.split_seed)["train"],
                                       settings.task) for site in sites.values()]
    return FeatureEncoder(settings.task).fit_statistics(combine(stats))


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts (weights = training rows), accumulated like Flower's FedAvg."""
    total = float(sum(weights))
    return {key: sum((state[key] * (w / total) for state, w in zip(states, weights, strict=True)),
                     start=torch.zeros_like(states[0][key])) for key in states[0]}


def plain_federated_loop(sites: dict[str, SiteData], encoder: FeatureEncoder, settings: LoopSettings,
                         on_round: Callable[[int], None] | None = None) -> dict:
    """FedAvg in one process without Flower: what the federated run computes, round for round.

    Per round, each site trains a copy of the global model for the local epochs on its training split
    (seed = run seed + round, as ``client.app`` does), the states are averaged weighted by training rows,
    and the averaged model is evaluated on every site's test split. Splits are encoded once (a ClientApp
    re-encodes them at every message). Returns the final summaries and overall metrics."""
    task = settings.task
    splits = {name: split_site(site.episodes, task, settings.split_seed) for name, site in sites.items()}
    train_data = {name: encode(encoder, parts["train"]) for name, parts in splits.items()}
    test_data = {name: encode(encoder, parts["test"]) for name, parts in splits.items()}
    model = build_model(encoder, task, settings.hidden, seed=settings.seed)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    summaries: dict[str, dict] = {}
    for server_round in range(1, settings.rounds + 1):
        config = TrainConfig(epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                             seed=settings.seed + server_round)
        states, weights = [], []
        for data in train_data.values():
            local = build_model(encoder, task, settings.hidden, seed=0)
            local.load_state_dict(global_state)
            train(local, data, config)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(len(data))
        global_state = fedavg(states, weights)
        model = build_model(encoder, task, settings.hidden, seed=0)
        model.load_state_dict(global_state)
        summaries = {name: evaluate(model, encoder, data) for name, data in test_data.items()}
        if on_round is not None:
            on_round(server_round)
    return {"summaries": summaries, "metrics": model_metrics(task, summaries)}


def plain_run(site_paths: list[Path], settings: LoopSettings) -> dict:
    """Load and validate the sites, build the federated encoder, run the plain loop; timed by part."""
    timeline = Timeline()
    start = time.perf_counter()
    sites = {site.name: site for site in (load_site(p) for p in site_paths)}
    loaded = time.perf_counter()
    encoder = federated_encoder(sites, settings)
    setup = time.perf_counter()
    result = plain_federated_loop(sites, encoder, settings, on_round=timeline.round_end)
    end = time.perf_counter()
    # What a ClientApp does at every train and evaluate message on top of the loop: split and encode again.
    t = time.perf_counter()
    for site in sites.values():
        parts = split_site(site.episodes, settings.task, settings.split_seed)
        encode(encoder, parts["train"]), encode(encoder, parts["test"])
    reencode = time.perf_counter() - t
    return {"seconds": end - start, "load_sites_s": loaded - start, "encoder_s": setup - loaded,
            "loop_s": end - setup, "reencode_all_sites_once_s": reencode, "torch_threads": torch.get_num_threads(),
            **timeline.round_profile(start), "metrics": result["metrics"]["overall"]}


# ---------------------------------------------------------------------------------------------------------
# 3. DP-SGD step cost


def larger_site(workdir: Path, patients: int, seed: int) -> tuple[FeatureEncoder, EncodedSplit]:
    """One simulated clinic of ``patients`` patients: its own encoder and its encoded training split."""
    generate_sites(1, seed, workdir / "dp_site", patients_per_clinic=patients, privacy=SitePrivacy(dp=False))
    site = load_site(workdir / "dp_site" / "clinic_00")
    rows = split_site(site.episodes, site.task, seed)["train"]
    encoder = fit_local(rows, site.task)
    return encoder, encode(encoder, rows)


def dp_step_cost(encoder: FeatureEncoder, data: EncodedSplit, epochs: int, repeats: int, seed: int = 0,
                 hidden: tuple[int, ...] = (64, 32), batch_size: int = 32, default_threads: int | None = None) -> dict:
    """Median seconds of ``train`` (and per optimizer step) without DP and with DP-SGD per grad-sample mode;
    the no-DP case also with torch's default thread count, if that differs from the one in use."""
    import opacus  # noqa: F401  (imported before timing: the first DP call must not pay for it)

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.005, seed=seed)

    def timed(dp: DPConfig | None) -> dict:
        seconds, steps = [], []
        for _ in range(repeats):
            model = build_model(encoder, NANOPARTICLE_TASK, hidden, seed=seed)
            t = time.perf_counter()
            result = train(model, data, config, dp)
            seconds.append(time.perf_counter() - t)
            steps.append(result.steps)
        per_step = [s / max(n, 1) for s, n in zip(seconds, steps, strict=True)]
        return {"seconds_median": statistics.median(seconds), "seconds": seconds, "steps": steps,
                "s_per_step_median": statistics.median(per_step)}

    out: dict = {"rows": len(data), "features": int(data.x.shape[1]), "epochs": epochs, "batch_size": batch_size,
                 "repeats": repeats, "noise_multiplier": 1.0, "torch_threads": torch.get_num_threads()}
    out["no_dp"] = timed(None)
    base = out["no_dp"]["s_per_step_median"]
    threads = torch.get_num_threads()
    if default_threads and default_threads != threads:
        torch.set_num_threads(default_threads)
        try:
            out["no_dp_default_threads"] = timed(None) | {"torch_threads": default_threads}
        finally:
            torch.set_num_threads(threads)
        out["no_dp_default_threads"]["ratio_to_no_dp"] = out["no_dp_default_threads"]["s_per_step_median"] / base
    out["dp"] = {}
    for mode in GRAD_SAMPLE_MODES:
        try:
            row = timed(DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode))
            row["ratio_to_no_dp"] = row["s_per_step_median"] / base
        except Exception as err:  # noqa: BLE001  (a mode this Opacus / torch pair cannot run is a result)
            first = (str(err).strip().splitlines() or [""])[0]
            row = {"error": f"{type(err).__name__}: {first}"}
        out["dp"][mode] = row
    return out


# ---------------------------------------------------------------------------------------------------------
# Running and printing


@contextlib.contextmanager
def ray_cpus(n: int):
    """Flower's simulation with a Ray cluster of ``n`` CPUs: as every client asks for one CPU, ``n`` actors.

    ``simulation.experiment.run_federation`` is used as is; only ``init_args.num_cpus`` of the backend
    configuration it passes to ``flwr.simulation.run_simulation`` changes."""
    import flwr.simulation

    original = flwr.simulation.run_simulation

    def run_simulation(**kwargs):
        backend = kwargs["backend_config"]
        kwargs["backend_config"] = {**backend, "init_args": {**backend["init_args"], "num_cpus": n}}
        return original(**kwargs)

    flwr.simulation.run_simulation = run_simulation
    try:
        yield
    finally:
        flwr.simulation.run_simulation = original


def single_actor_run(cfg: ExperimentConfig, site_paths: list[Path]) -> dict:
    """The no-DP federation again, on the same sites, with one Ray actor: the sites train one after the other,
    as in the plain loop, so the difference is Flower's own cost and not its parallelism."""
    timeline = Timeline()
    with ray_cpus(1):
        start = time.perf_counter()
        record = run_federation(cfg, [SiteSource(p) for p in site_paths], on_round=timeline.round_end)
        end = time.perf_counter()
    return {"federation_s": end - start, **timeline.round_profile(start, end),
            "auc": {k: record.models["ann"].final["overall"][k]["auc"] for k in BINARY}}


def federated_run(cfg: ExperimentConfig, memory: bool) -> tuple[dict, dict, dict | None]:
    """``run_experiment`` with round end times, and tree memory sampled during its federation phase."""
    timeline = Timeline()
    sampler = TreeMemory() if memory else None
    mem: dict | None = None

    def on_phase(name: str) -> None:
        nonlocal mem
        timeline.phase(name)
        if sampler is not None and name == "federation":
            sampler.start()
        if sampler is not None and name == "baselines":
            mem = sampler.stop()

    results = run_experiment(cfg, on_round=timeline.round_end, on_phase=on_phase)
    start, end = timeline.phases["federation"], timeline.phases["baselines"]
    profile = {"federation_s": results["timing"]["federation_s"], "baselines_s": results["timing"]["baselines_s"],
               "strategy_rounds_s": results["timing"].get("ann_s"),
               "phase_federation_s": end - start, **timeline.round_profile(start, end)}
    return results, profile, mem


def fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    q = report["quality"]
    print("== 1. Quality: overall AUC on the union of the sites' test splits ==")
    print(f"{'run':6s} {'outcome':16s} {'federated':>9s} {'pooled':>8s} {'pooled no DP':>12s} "
          f"{'fed/pooled':>10s} {'target':>7s}")
    for run, target in (("no_dp", TARGETS["auc_ratio_no_dp"]), ("dp", TARGETS["auc_ratio_dp"])):
        for outcome, row in q[run]["binary"].items():
            print(f"{run:6s} {outcome:16s} {row['federated']:9.3f} {row['pooled']:8.3f} "
                  f"{fmt(row.get('pooled_no_dp')):>12s} {row['federated_over_pooled']:10.3f} {'≥ ' + str(target):>7s}")
    print(f"{'run':6s} {REGRESSION:16s} {'R² fed':>9s} {'R² pooled':>9s} {'MAE fed':>8s} {'MAE pooled':>10s} "
          f"{'R² pooled no DP':>15s}")
    for run in ("no_dp", "dp"):
        r = q[run]["regression"]
        print(f"{run:6s} {'':16s} {r['federated']['r2']:9.3f} {r['pooled']['r2']:9.3f} {r['federated']['mae']:8.2f} "
              f"{r['pooled']['mae']:10.2f} {fmt(r.get('pooled_no_dp', {}).get('r2')):>15s}")
    print(f"DP run: max ε spent per site {fmt(q['dp']['max_epsilon_spent'])} (budget {fmt(q['dp']['epsilon_budget'])}"
          f", δ = {report['config']['delta']}); sites {q['dp']['sites']}, rejected {q['dp']['rejected']}, "
          f"failed replies {q['no_dp']['failures']} / {q['dp']['failures']} (no DP / DP)")

    o = report["overhead"]
    f, p = o["flower"], o["plain"]
    print("\n== 2. Flower overhead: no-DP federation vs the same steps in a plain loop ==")
    print("(first round end: from the start of the federation, incl. Ray start, actors, site check and statistics"
          " for Flower; incl. loading the sites and the encoder for the plain loop)")
    print(f"{'':26s} {'total s':>8s} {'to 1st round end s':>18s} {'later round s':>13s} {'after last s':>12s}")
    print(f"{'Flower (run_simulation)':26s} {f['federation_s']:8.2f} {f['first_round_end_s']:18.2f} "
          f"{f['later_round_mean_s']:13.3f} {fmt(f.get('after_last_round_s'), '.2f'):>12s}")
    s = o["flower_one_actor"]
    print(f"{'Flower, one Ray actor':26s} {s['federation_s']:8.2f} {s['first_round_end_s']:18.2f} "
          f"{s['later_round_mean_s']:13.3f} {fmt(s.get('after_last_round_s'), '.2f'):>12s}")
    print(f"{'plain loop (one process)':26s} {p['seconds']:8.2f} {p['first_round_end_s']:18.2f} "
          f"{p['later_round_mean_s']:13.3f} {'–':>12s}")
    print(f"ratio Flower/plain: total {o['ratio_total']:.2f}× (target ≤ {TARGETS['flower_over_plain']}×), "
          f"later rounds {o['ratio_later_rounds']:.2f}×; with one actor: total {o['ratio_total_one_actor']:.2f}×, "
          f"later rounds {o['ratio_later_rounds_one_actor']:.2f}×")
    print(f"plain = load+validate {p['load_sites_s']:.2f} s + encoder "
          f"{p['encoder_s']:.2f} s + loop {p['loop_s']:.2f} s; re-splitting and encoding all sites once "
          f"{p['reencode_all_sites_once_s']:.3f} s")
    print("sanity, final AUC of plain loop / Flower / Flower one actor: " + ", ".join(
        f"{k} {p['metrics'][k]['auc']:.4f} / {q['no_dp']['binary'][k]['federated']:.4f} / {s['auc'][k]:.4f}"
        for k in BINARY))
    print(f"DP federation: {o['flower_dp']['federation_s']:.2f} s, first round end "
          f"{o['flower_dp']['first_round_end_s']:.2f} s, later rounds {o['flower_dp']['later_round_mean_s']:.3f} s")

    d = report["dp_step"]
    print(f"\n== 3. DP-SGD step cost: {d['rows']} training rows, {d['features']} features, {d['epochs']} epochs, "
          f"batch {d['batch_size']}, median of {d['repeats']} ==")
    print(f"{'mode':12s} {'steps':>6s} {'seconds':>8s} {'ms/step':>8s} {'× no DP':>8s}")
    n = d["no_dp"]
    print(f"{'no DP':12s} {n['steps'][0]:6d} {n['seconds_median']:8.2f} {1e3 * n['s_per_step_median']:8.2f} "
          f"{1.0:8.2f}   (torch threads {d['torch_threads']})")
    if "no_dp_default_threads" in d:
        n = d["no_dp_default_threads"]
        print(f"{'no DP':12s} {n['steps'][0]:6d} {n['seconds_median']:8.2f} {1e3 * n['s_per_step_median']:8.2f} "
              f"{n['ratio_to_no_dp']:8.2f}   (torch threads {n['torch_threads']}, torch's default)")
    for mode, row in d["dp"].items():
        if "error" in row:
            print(f"{'DP ' + mode:12s} failed: {row['error']}")
        else:
            print(f"{'DP ' + mode:12s} {row['steps'][0]:6d} {row['seconds_median']:8.2f} "
                  f"{1e3 * row['s_per_step_median']:8.2f} {row['ratio_to_no_dp']:8.2f}")
    print(f"target ≤ {TARGETS['dp_over_plain_step']}× per step")

    m = report["memory"]
    print("\n== 4. Peak memory during the no-DP federation (RSS sampled every "
          f"{m['interval_s']} s, {m['samples']} samples) ==")
    print(f"process tree (this + {m['max_processes'] - 1} descendants at most): {m['peak_tree_rss_mib']:.0f} MiB; "
          f"this process alone: {m['peak_self_rss_mib']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp-patients", type=int, default=2000, help="patients of the DP step-cost site")
    parser.add_argument("--dp-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of this process (Flower's Ray actors get 1 each); 0 keeps torch's default")
    parser.add_argument("--workdir", type=Path, help="keep the runs' folders here (default: a deleted temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated_ann.json")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="fednano_bench_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        flower_environment(work)
        quiet_flower()
        # The neural network only: ``fednano simulate`` also trains federated XGBoost and the seed paper's
        # comparison models by default.
        common = {"clinics": args.clinics, "rounds": args.rounds, "seed": args.seed, "models": "ann",
                  "compare": False}
        cfg = ExperimentConfig(out=work / "no_dp", dp=False, **common)
        cfg_dp = ExperimentConfig(out=work / "dp", dp=True, epsilon=3.0, delta=1e-5, **common)

        print(f"[1/5] federation without DP ({args.clinics} clinics × {args.rounds} rounds)", flush=True)
        results, flower, memory = federated_run(cfg, memory=True)
        print("[2/5] federation with DP", flush=True)
        results_dp, flower_dp, _ = federated_run(cfg_dp, memory=False)
        site_paths = [Path(p) for p in results["config"]["sites"] if Path(p).name in results["sites"]]
        print("[3/5] federation without DP, one Ray actor", flush=True)
        single = single_actor_run(dataclasses.replace(cfg, out=work / "no_dp_one_actor"), site_paths)
        print("[4/5] plain loop without Flower", flush=True)
        leftover = TreeMemory().descendants()
        plain = plain_run(site_paths, LoopSettings.of(cfg))
        print("[5/5] DP-SGD step cost", flush=True)
        dp_step = dp_step_cost(*larger_site(work, args.dp_patients, args.seed), args.dp_epochs, args.repeats,
                               seed=args.seed, default_threads=default_threads)

    later = (flower["later_round_mean_s"] / plain["later_round_mean_s"]
             if flower["later_round_mean_s"] and plain["later_round_mean_s"] else None)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads_default": default_threads,
                    "torch_threads_used": torch.get_num_threads()},
        "command": "python benchmarks/federated_ann.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "config": {**common, "epsilon": cfg_dp.epsilon, "delta": cfg_dp.delta, "local_epochs": cfg.local_epochs,
                   "batch_size": cfg.batch_size, "lr": cfg.lr, "hidden": cfg.hidden, "strategy": cfg.strategy},
        "targets": TARGETS,
        "quality": {"no_dp": quality(results, dp=False), "dp": quality(results_dp, dp=True)},
        "overhead": {"flower": flower, "flower_one_actor": single, "plain": plain, "flower_dp": flower_dp,
                     "ratio_total": flower["federation_s"] / plain["seconds"], "ratio_later_rounds": later,
                     "ratio_total_one_actor": single["federation_s"] / plain["seconds"],
                     "ratio_later_rounds_one_actor": single["later_round_mean_s"] / plain["later_round_mean_s"],
                     "descendants_alive_before_plain": leftover},
        "dp_step": dp_step,
        "memory": memory,
    }
    print()
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
