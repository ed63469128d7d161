"""Benchmark of masked ANN rounds (pairwise, recovering, recovering with a site lost) against plain ones: bytes
and time per round at 3 and 10 clinics. Prints a table, writes JSON.

    python benchmarks/secure_ann.py [--clinics 3 10] [--repeats 5] [--flower-rounds 0]
                                    [--out benchmarks/results/secure_ann.json]

Aggregation (always): the real code of both sides in this one process — the coordinator's
``strategies.pairwise_masked_mean.PairwiseMaskedMean`` around Flower's FedAvg over sessions of the one secure sum
(``server.secure_aggregation.SecureSession``), and the sites' ``client.secure_aggregation`` rounds (as
``query.ann_*``), ``client.training_handlers.masked_weights`` and ``ann_unmask`` — on the run's default ANN (the
built-in task's encoder, ``hidden`` 64,32), each site's trained weights the global ones plus noise. Against
Flower's FedAvg on plain float32 replies.
Modes: ``pairwise`` (one key exchange per phase: in the first round, timed apart), ``recovering`` (Bonawitz et
al. 2017's dropout recovery: keys and shares before every training message, unmasking after), and ``recovering,
1 lost`` (the last site lost after its shares, before its masked weights: the unmask round rebuilds its mask key
and removes its pairwise masks). Reported per round (median over ``--repeats``): ``site_s`` one site's time to
turn its weights into its reply (fixed point and masks; plain: the ArrayRecord), ``configure_s`` the coordinator's
configure_train (recovering: the keys and shares rounds, the sites' handlers included, in-process), ``server_s``
its aggregate_train (recovering: the unmask round, sites' handlers included; FedAvg on the mean), payload bytes
up (sites → coordinator) and down (coordinator → sites: global weights, config, the roster and, recovering, the
relayed shares) over every message of the round, without framing (``server.secure_aggregation.record_bytes``);
pairwise's key exchange, once per phase, apart (``keys_s``, its bytes both ways).

``--flower-rounds R`` (> 0) also runs the whole federation (``simulation.experiment.run_federation``, ANN only,
no DP, R rounds) plain, pairwise and recovering at each size, one simulation at a time, and reports the ANN phase's
seconds per round: local training and Flower's own messaging included, so the load of the machine shows in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script
from record import machine, write_record  # noqa: E402

from client import secure_aggregation as sa  # noqa: E402
from client.training_handlers import ann_unmask, masked_weights  # noqa: E402
from server.secure_aggregation import record_bytes  # noqa: E402
from server.settings import DEFAULTS  # noqa: E402
from server.training_phase import ann_sessions  # noqa: E402
from shared.protocol import messages  # noqa: E402
from strategies.pairwise_masked_mean import PairwiseMaskedMean  # noqa: E402

OUT = Path("benchmarks/results/secure_ann.json")
UPDATE_SD = 0.01
"""Noise of a site's trained weights around the global ones (round-1 updates of the default ANN are of this
order per weight)."""


def default_model_arrays(workdir: Path) -> dict[str, np.ndarray]:
    """The default ANN's initial weights for the built-in task, its encoder fitted on one simulated clinic."""
    from shared.ann import build_model, to_arrays
    from shared.encoding import fit_local
    from shared.task import NANOPARTICLE_TASK
    from shared.validation import load_site
    from simulation.clinics import SitePrivacy, generate_sites

    clinic = generate_sites(1, 0, workdir, patients_per_clinic=60, privacy=SitePrivacy(dp=False)).clinics[0]
    encoder = fit_local(load_site(workdir / clinic.name).episodes, NANOPARTICLE_TASK)
    model = build_model(encoder, NANOPARTICLE_TASK, DEFAULTS.hidden_sizes, seed=0)
    return {k: a.numpy() for k, a in to_arrays(model).items()}


class InProcessSites:
    """K sites' contexts, and a grid answering the secure sum's rounds and ``train`` with the sites' handlers;
    ``lost`` sites answer the keys and shares of the round but never their training message (nor later ones)."""

    def __init__(self, trained: dict[int, dict[str, np.ndarray]], lost: tuple[int, ...] = ()) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in trained}
        self.trained, self.lost = trained, set(lost)
        self.rounds = {messages.ANN_KEYS.type: sa.keys, messages.ANN_SHARES.type: sa.shares,
                       messages.ANN_UNMASK.type: self.unmask}
        self.bytes_down = self.bytes_up = 0
        self.site_seconds: list[float] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, sent, timeout=None):
        replies = []
        for msg in sent:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.bytes_down += record_bytes(msg.content)
            if node in self.lost and kind not in (messages.ANN_KEYS.type, messages.ANN_SHARES.type):
                continue
            reply = self.rounds[kind](msg, self.contexts[node]) if kind in self.rounds else self.train(msg, node)
            self.bytes_up += record_bytes(reply.content)
            replies.append(reply)
        return replies

    @staticmethod
    def unmask(msg: Message, context: Context) -> Message:
        return Message(ann_unmask(msg, SimpleNamespace(config=msg.content["config"], context=context)), reply_to=msg)

    def train(self, msg: Message, node: int) -> Message:
        """The site's masked training reply (its trained weights, 100 + node examples), timed."""
        config, n = msg.content["config"], 100.0 + node
        start = time.perf_counter()
        words = masked_weights(SimpleNamespace(config=config, context=self.contexts[node]), msg.content["arrays"],
                               ArrayRecord({k: Array(v) for k, v in self.trained[node].items()}), n,
                               int(config["server-round"]))
        self.site_seconds.append(time.perf_counter() - start)
        return Message(RecordDict({"arrays": words, "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)


def trained_weights(global_: dict[str, np.ndarray], n_sites: int, seed: int) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {node: {k: (v + rng.normal(0, UPDATE_SD, v.shape)).astype(v.dtype) for k, v in global_.items()}
            for node in range(1, n_sites + 1)}


def masked_round(global_: dict[str, np.ndarray], trained: dict[int, dict[str, np.ndarray]], mode: str,
                 lost: tuple[int, ...] = ()) -> dict:
    """One masked round in ``mode`` (round 2 of the phase: pairwise's key exchange, in round 1, is timed apart)."""
    sites = InProcessSites(trained, lost)
    strategy = PairwiseMaskedMean(FedAvg(), ann_sessions(mode), list(trained))
    arrays = ArrayRecord({k: Array(v) for k, v in global_.items()})
    keys = {}
    if mode == "pairwise":
        start = time.perf_counter()
        strategy.start_session(sites, sorted(trained))
        keys = {"keys_s": time.perf_counter() - start, "keys_bytes_up": sites.bytes_up,
                "keys_bytes_down": sites.bytes_down}
        sites.bytes_up = sites.bytes_down = 0
    start = time.perf_counter()
    sent = list(strategy.configure_train(2, arrays, ConfigRecord(), sites))
    configure_s = time.perf_counter() - start
    replies = sites.send_and_receive(sent)
    start = time.perf_counter()
    mean, _ = strategy.aggregate_train(2, replies)
    server_s = time.perf_counter() - start
    if mean is None:
        raise RuntimeError(f"{mode}: the masked round failed: {strategy.failed_rounds}")
    return {"site_s": statistics.mean(sites.site_seconds), "configure_s": configure_s, "server_s": server_s,
            "bytes_up": sites.bytes_up, "bytes_down": sites.bytes_down, **keys,
            "mean": {k: a.numpy() for k, a in mean.items()}}


def plain_round(global_: dict[str, np.ndarray], trained: dict[int, dict[str, np.ndarray]], server_round: int) -> dict:
    sites = InProcessSites(trained)
    strategy = FedAvg()
    sent = list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in global_.items()}),
                                         ConfigRecord(), sites))
    replies, site_seconds = [], []
    for msg in sent:
        node = msg.metadata.dst_node_id
        start = time.perf_counter()
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in trained[node].items()}),
                              "metrics": MetricRecord({"num-examples": 100.0 + node})})
        site_seconds.append(time.perf_counter() - start)
        replies.append(Message(content, reply_to=msg))
    start = time.perf_counter()
    mean, _ = strategy.aggregate_train(server_round, replies)
    server_s = time.perf_counter() - start
    return {"site_s": statistics.mean(site_seconds), "server_s": server_s,
            "bytes_up": sum(record_bytes(r.content) for r in replies),
            "bytes_down": sum(record_bytes(m.content) for m in sent), "mean": {k: a.numpy() for k, a in mean.items()}}


MODES = ("plain", "pairwise", "recovering", "recovering, 1 lost")


def aggregation(global_: dict[str, np.ndarray], n_sites: int, repeats: int) -> dict:
    runs = []
    for repeat in range(repeats):
        trained = trained_weights(global_, n_sites, seed=repeat)
        survivors = {n: w for n, w in trained.items() if n != n_sites}
        run = {"plain": plain_round(global_, trained, server_round=2),
               "pairwise": masked_round(global_, trained, "pairwise"),
               "recovering": masked_round(global_, trained, "recovering"),
               "recovering, 1 lost": masked_round(global_, trained, "recovering", lost=(n_sites,))}
        want = {"all": run["plain"]["mean"], "survivors": plain_round(global_, survivors, server_round=2)["mean"]}
        diffs = {mode: max(float(np.max(np.abs(run[mode]["mean"][k].astype(np.float64)
                                               - want["survivors" if "lost" in mode else "all"][k])))
                           for k in global_) for mode in MODES[1:]}
        runs.append({mode: {k: v for k, v in run[mode].items() if k != "mean"} for mode in MODES}
                    | {"max_abs_diff": diffs})
    median = {mode: {key: statistics.median(r[mode][key] for r in runs) for key in runs[0][mode]} for mode in MODES}
    return {**median, "max_abs_diff": {mode: max(r["max_abs_diff"][mode] for r in runs) for mode in MODES[1:]},
            "parameters": int(sum(v.size for v in global_.values()))}


def flower_seconds(clinics: int, rounds: int, workdir: Path) -> dict[str, float]:
    """The ANN phase's seconds per round of a whole federation, masked and plain."""
    from simulation.clinics import SitePrivacy, generate_sites
    from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation

    flower_environment(workdir)
    quiet_flower()
    folder = workdir / f"sites{clinics}"
    generated = generate_sites(clinics, 0, folder, patients_per_clinic=80, privacy=SitePrivacy(dp=False)).clinics
    base = ExperimentConfig(clinics=clinics, rounds=rounds, dp=False, seed=0, models="ann", compare=False,
                            fqi_iterations=0, policy=False, sites=[folder / c.name for c in generated])
    sources, _ = prepare_sites(dataclasses.replace(base, out=workdir / f"prep{clinics}"))
    seconds = {}
    for mode in ("pairwise", "recovering", "off"):
        record = run_federation(dataclasses.replace(base, ann_secure_sum=mode, out=workdir / f"{mode}{clinics}"),
                                sources)
        seconds[mode] = record.models["ann"].seconds / rounds
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flower-rounds", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp process
    load = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        global_ = default_model_arrays(Path(tmp) / "model")
        for clinics in args.clinics:
            results[str(clinics)] = aggregation(global_, clinics, args.repeats)
            if args.flower_rounds > 0:
                results[str(clinics)]["flower_s_per_round"] = flower_seconds(clinics, args.flower_rounds,
                                                                              Path(tmp) / "flower")
    print(f"default ANN: {results[str(args.clinics[0])]['parameters']} parameters; load average at start "
          f"{load[0]:.2f}; median of {args.repeats}")
    header = (f"{'clinics':>7} {'mode':>19} {'site ms':>8} {'configure ms':>12} {'server ms':>9} {'up kB':>8} "
              f"{'down kB':>8} {'keys ms':>8} {'keys kB':>8} {'max diff':>8} {'flower s/round':>14}")
    print(header)
    flower_mode = {"plain": "off", "pairwise": "pairwise", "recovering": "recovering"}
    for clinics, r in results.items():
        for mode in MODES:
            m = r[mode]
            keys = (f"{m['keys_s'] * 1e3:8.1f} {(m['keys_bytes_up'] + m['keys_bytes_down']) / 1e3:8.2f}"
                    if "keys_s" in m else f"{'':>8} {'':>8}")
            diff = f"{r['max_abs_diff'][mode]:8.1e}" if mode in r["max_abs_diff"] else f"{'':>8}"
            flower = r.get("flower_s_per_round", {}).get(flower_mode.get(mode, ""))
            print(f"{clinics:>7} {mode:>19} {m['site_s'] * 1e3:8.2f} {m.get('configure_s', 0.0) * 1e3:12.2f} "
                  f"{m['server_s'] * 1e3:9.2f} {m['bytes_up'] / 1e3:8.1f} {m['bytes_down'] / 1e3:8.1f} {keys} {diff} "
                  f"{'' if flower is None else f'{flower:14.2f}'}")
    command = "python benchmarks/secure_ann.py " + " ".join(
        [f"--clinics {' '.join(map(str, args.clinics))}", f"--repeats {args.repeats}",
         f"--flower-rounds {args.flower_rounds}"])
    write_record(args.out, command, results, machine=machine(load_average=load))


if __name__ == "__main__":
    main()
