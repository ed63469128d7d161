"""Each cost that issue 17's 1,000-clinic work cut, measured before and after in one process.

    python benchmarks/scale_parts.py [--sites 40] [--peers 999] [--clinics 1000] [--rounds 10] [--repeats 3]
                                     [--out benchmarks/results/scale_parts.json] [--bytes-only]

Four pairs, each timed alternately in the same run (the machine is shared: read the ratios):

- **local-only baselines, torch threads**: ``simulation.baselines.local_only`` on ``--sites`` simulated clinics of
  30 patients, with torch on two intra-op threads (its default here) and on one (what ``fednano simulate`` now
  sets for the driver, ``simulation.experiment.one_torch_thread``);
- **a training call without DP**: ``client.training.train`` on one clinic's training split, one epoch, through
  torch's ``DataLoader`` (before) and ``client.training.ShuffledBatches`` (after; the same batches);
- **masking one release**: ``shared.secure_sum.mask`` of a 2,000-word vector against ``--peers`` peers (the
  complete graph, before) and against ``shared.secure_sum.PAIRWISE_DEGREE`` (the ring of a session above 27 sites);
- **the coordinator's checkpoints over a run**: ``server.checkpoint.Checkpoint.write`` after each of ``--rounds``
  rounds of ``--clinics`` sites whose evaluations carry 2,000-bin score histograms, with every round's tables in
  the state file (before: ``SETTLED_LAG`` set past the run) and with settled rounds written once (after).

And one count, not a time: **the bytes of a masked release's requests** to ``--clinics`` sites in a pairwise
session, when every request carried the whole key table (before) and now that each carries its site's mask peers'
keys only (``server.secure_aggregation.SecureSession.peer_keys``; both with the roster of node ids).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flwr.app import ConfigRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from record import write_record  # noqa: E402

from client import training  # noqa: E402
from client.split import encode, split_site  # noqa: E402
from server import checkpoint  # noqa: E402
from server.secure_aggregation import SecureSession, record_bytes  # noqa: E402
from server.settings import DEFAULTS, parse_hidden  # noqa: E402
from shared import secure_sum  # noqa: E402
from shared.ann import build_model  # noqa: E402
from shared.encoding import fit_local  # noqa: E402
from shared.protocol import hist as h  # noqa: E402
from shared.protocol import records as r  # noqa: E402
from shared.task import NANOPARTICLE_TASK  # noqa: E402
from shared.validation import load_site  # noqa: E402
from simulation.baselines import BaselineSettings, local_only  # noqa: E402
from simulation.clinics import generate_sites  # noqa: E402


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def pair(before, after, repeats: int) -> tuple[float, float]:
    """Median seconds of ``before`` and ``after``, run alternately ``repeats`` times each."""
    b, a = [], []
    for _ in range(repeats):
        b.append(timed(before))
        a.append(timed(after))
    return float(np.median(b)), float(np.median(a))


def baselines_case(folder: Path, n_sites: int, repeats: int) -> tuple[float, float]:
    generate_sites(n_sites, seed=3, out=folder, patients_per_clinic=30)
    sites = {site.name: site for site in (load_site(p) for p in sorted(folder.glob("clinic_*")))}
    settings = BaselineSettings(task=NANOPARTICLE_TASK, epochs=10 * DEFAULTS.local_epochs,
                                batch_size=DEFAULTS.batch_size, lr=DEFAULTS.lr, hidden=parse_hidden(DEFAULTS.hidden),
                                seed=0, split_seed=0)
    privacy = dict.fromkeys(sites)

    def with_threads(n: int):
        def run():
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                local_only(sites, privacy, settings)
            finally:
                torch.set_num_threads(before)
        return run

    return pair(with_threads(2), with_threads(1), repeats), sites


def training_case(site, repeats: int) -> tuple[float, float]:
    parts = split_site(site.episodes, NANOPARTICLE_TASK, 0)
    encoder = fit_local(parts["train"], NANOPARTICLE_TASK)
    data = encode(encoder, parts["train"])
    config = training.TrainConfig(epochs=1, batch_size=DEFAULTS.batch_size, seed=1)
    model = build_model(encoder, NANOPARTICLE_TASK, parse_hidden(DEFAULTS.hidden), seed=0)
    loader = training.ShuffledBatches

    def calls(batches):
        def run():
            training.ShuffledBatches = batches
            try:
                for _ in range(50):
                    training.train(model, data, config)
            finally:
                training.ShuffledBatches = loader
        return run

    def data_loader(tensors, size, seed):
        return training._loader(data, model.spec, size, seed)

    before, after = pair(calls(data_loader), calls(loader), repeats)
    return before / 50, after / 50


def masking_case(n_peers: int, repeats: int) -> tuple[float, float]:
    keys = [secure_sum.new_private_key() for _ in range(n_peers + 1)]
    public = {i: secure_sum.public_key(k) for i, k in enumerate(keys)}
    values = np.arange(2000, dtype=np.int64)
    ring = {n: public[n] for n in secure_sum.mask_peers(list(public), 0, "session")} | {0: public[0]}
    return pair(lambda: secure_sum.mask(values, keys[0], 0, public, "session/1"),
                lambda: secure_sum.mask(values, keys[0], 0, ring, "session/1"), repeats)


def key_table_bytes(n_sites: int) -> tuple[int, int]:
    """Bytes of one release's request configs to ``n_sites`` sites: the whole key table in each, and the ring's."""
    public = {n: secure_sum.public_key(secure_sum.new_private_key()) for n in range(1, n_sites + 1)}

    class KeyReplies:  # Flower's Grid as far as the key exchange uses it: each site replies its public key
        def send_and_receive(self, sent):
            return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                                    has_error=lambda: False,
                                    content=RecordDict({r.KEYS: ConfigRecord({h.PUBLIC_KEY: public[
                                        m.metadata.dst_node_id]})})) for m in sent]

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Message() needs, as a ServerApp
        setattr(TaskIdentity, name, value)
    session = SecureSession(KeyReplies(), list(public), "pairwise")
    session.exchange_keys()
    whole = {h.SECURE_KEYS: list(public.values())}
    before = sum(record_bytes(RecordDict({r.CONFIG: ConfigRecord({**session.base, **whole})})) for _ in public)
    after = sum(record_bytes(RecordDict({r.CONFIG: session.release_config(session.open_release({}), node)}))
                for node in public)
    return before, after


def checkpoint_case(n_clinics: int, rounds: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)

    def evaluation():
        histogram = [0] * 2000
        for at in rng.integers(0, 2000, size=12):
            histogram[int(at)] += 1
        return {"num-examples": 12, "response/hist_pos": histogram, "response/hist_neg": list(reversed(histogram)),
                "response/n": 12, "efficacy_pct/sum_sq_err": float(rng.random())}

    tables = {"train": {}, "evaluate": {}, "failures": {}, "privacy": {}}
    states = []
    for rnd in range(1, rounds + 1):
        tables["train"][str(rnd)] = {f"clinic_{i:04d}": {"train-loss": float(rng.random()), "num-examples": 80}
                                     for i in range(n_clinics)}
        if rnd > 1:
            tables["evaluate"][str(rnd - 1)] = {f"clinic_{i:04d}": evaluation() for i in range(n_clinics)}
        states.append({"per_site": {t: dict(v) for t, v in tables.items()}})

    def run_all(lag: int):
        def run():
            kept = checkpoint.SETTLED_LAG
            checkpoint.SETTLED_LAG = lag
            try:
                with tempfile.TemporaryDirectory() as out:
                    for rnd, state in enumerate(states, start=1):
                        checkpoint.Checkpoint(run_id="1", settings={}, stage="training", record={},
                                              server_round=rnd, strategy=state).write(Path(out))
            finally:
                checkpoint.SETTLED_LAG = kept
        return run

    return pair(run_all(rounds + 1), run_all(checkpoint.SETTLED_LAG), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=40)
    parser.add_argument("--peers", type=int, default=999)
    parser.add_argument("--clinics", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_parts.json"))
    parser.add_argument("--bytes-only", action="store_true", help="only the key table's bytes (no timings)")
    args = parser.parse_args()
    rows = {}
    if not args.bytes_only:
        with tempfile.TemporaryDirectory() as folder:
            rows["local-only baselines, 2 torch threads -> 1"], sites = baselines_case(Path(folder), args.sites,
                                                                                         args.repeats)
            rows["one training call without DP, DataLoader -> ShuffledBatches"] = training_case(
                next(iter(sites.values())), args.repeats)
        rows[f"masking a release, {args.peers} peers -> {secure_sum.PAIRWISE_DEGREE}"] = masking_case(
            args.peers, args.repeats)
        rows[f"checkpoints of {args.rounds} rounds x {args.clinics} sites, all inline -> settled once"] = \
            checkpoint_case(args.clinics, args.rounds, args.repeats)
    key_bytes = key_table_bytes(args.clinics)
    table = Table(title="Costs cut for 1,000 clinics: before and after, same run (median seconds)")
    for column in ("cost", "before s", "after s", "after / before"):
        table.add_column(column)
    for name, (before, after) in rows.items():
        table.add_row(name, f"{before:.4g}", f"{after:.4g}", f"{after / before:.3f}")
    Console().print(table)
    bytes_name = f"a masked release's requests to {args.clinics} sites, whole key table -> the ring's keys"
    Console().print(f"{bytes_name}: {key_bytes[0]:,} -> {key_bytes[1]:,} bytes ({key_bytes[1] / key_bytes[0]:.3f})")
    write_record(args.out, "python benchmarks/scale_parts.py " + " ".join(sys.argv[1:]),
                 {name: {"before_s": b, "after_s": a, "ratio": a / b} for name, (b, a) in rows.items()}
                 | {bytes_name: {"before_bytes": key_bytes[0], "after_bytes": key_bytes[1],
                                 "ratio": key_bytes[1] / key_bytes[0]}},
                 settings=vars(args) | {"out": str(args.out)})


if __name__ == "__main__":
    main()
