"""Benchmark of a deployed federation (real SuperLink and SuperNodes, TLS, SuperNode auth) against a simulated one.

    python benchmarks/deployment.py [--sites 3] [--rounds 3] [--patients 30]

The same simulated sites (fresh copies, so each run starts with an empty privacy ledger) run the same
ServerApp settings (ANN, DP, the signed policy at the end) twice:

- **deployed**: ``flower-superlink`` and one ``flower-supernode`` per site as processes on 127.0.0.1, the run
  submitted with ``flwr run`` (helpers of ``tests/deployment.py``). A watcher timestamps every
  ``Receiving:`` / ``Sending:`` line of each SuperNode's log as it appears (polled every 0.1 s), which gives
  when each message reached each site and when its reply left: per round, per phase, per message;
- **simulated**: Flower's simulation runtime in this process (``run_simulation``), rounds timed by the
  ServerApp's ``on_round`` callback.

Where the time goes, deployed: a message waits for the SuperNode's next poll (every 3 s in 1.42), then the
SuperNode starts a fresh ``flwr-clientapp`` process which imports flwr, torch and the project before it
computes (the import cost is measured here by starting such imports in fresh processes), and the ServerApp
sees the reply at its next pull (every 3 s). Flower's own accounting (``flwr ls``: ServerApp and ClientApp
compute seconds, traffic) is recorded beside. Prints tables and writes ``benchmarks/results/deployment.json``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from record import write_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/deployment.py holds the process helpers (tests/ is not installed)

from client.app import make_client_app  # noqa: E402
from client.site import SiteSource  # noqa: E402
from server.app import make_server_app  # noqa: E402
from server.provision import provision  # noqa: E402
from simulation.clinics import SitePrivacy, generate_sites  # noqa: E402
from simulation.experiment import flower_environment, quiet_flower  # noqa: E402
from tests import deployment as dep  # noqa: E402

FEDERATION = "bench"
EVENT = re.compile(r"(Receiving|Sending): (\S+) message")
WORKER_ANSWER = re.compile(r"site worker: (\S+) answered in ([\d.]+) s")
"""A warm worker's log line for each message it answered, with the seconds its handler took."""
IMPORT_PROBES = {"client.app (every message)": "import flwr.clientapp, client.app",
                 "+ torch (a training or evaluation message)": "import flwr.clientapp, client.app, torch",
                 "+ torch, opacus (a DP site's training)": "import flwr.clientapp, client.app, torch, opacus"}
"""What a fresh ``flwr-clientapp`` process imports for a message: the ClientApp loads torch and Opacus only in
the handlers that need them (``tests/test_client_imports.py``)."""


class LogWatcher:
    """Timestamps the ``Receiving:`` / ``Sending:`` lines of SuperNode logs as they are written."""

    def __init__(self, logs: dict[str, Path], poll: float = 0.1) -> None:
        self.logs, self.poll = logs, poll
        self.events: list[tuple[float, str, str, str]] = []  # (time, site, Receiving|Sending, message type)
        self._offsets = dict.fromkeys(logs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._read()

    def _read(self) -> None:
        now = time.monotonic()
        for site, log in self.logs.items():
            if not log.exists():
                continue
            with log.open("rb") as handle:
                handle.seek(self._offsets[site])
                text = handle.read().decode(errors="replace")
            complete = text[: text.rfind("\n") + 1]
            self._offsets[site] += len(complete.encode())
            for match in EVENT.finditer(complete):
                self.events.append((now, site, match.group(1), match.group(2)))


def phases(events: list[tuple[float, str, str, str]], start: float) -> list[dict]:
    """Per message type in order of first arrival: first arrival, last reply (s after ``start``), and each
    site's time from receiving the message to sending its reply."""
    result: dict[str, dict] = {}
    pending: dict[tuple[str, str], float] = {}
    for t, site, kind, message in events:
        phase = result.setdefault(message, {"message": message, "first_in": t - start, "last_out": None,
                                            "at_site": []})
        if kind == "Receiving":
            pending[(site, message)] = t
        elif (site, message) in pending:
            phase["at_site"].append(t - pending.pop((site, message)))
            phase["last_out"] = t - start
    return list(result.values())


def deployed_rounds(events: list[tuple[float, str, str, str]], start: float) -> list[float]:
    """Round r lasts from the first site receiving its r-th train message to the first site receiving its
    (r + 1)-th (the next round's start: every wait between them included); the last round ends with the last
    site's reply to the final evaluate message. This holds for one-message rounds (evaluation in the training
    reply) and for Flower's train-then-evaluate rounds alike."""
    trains: dict[int, list[float]] = {}
    counts: dict[str, int] = {}
    last_evaluate_out = None
    for t, site, kind, message in events:
        if kind == "Receiving" and message == "train":
            counts[site] = counts.get(site, 0) + 1
            trains.setdefault(counts[site], []).append(t - start)
        if kind == "Sending" and message == "evaluate":
            last_evaluate_out = t - start
    starts = [min(trains[r]) for r in sorted(trains)]
    rounds = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    if starts and last_evaluate_out is not None:
        rounds.append(last_evaluate_out - starts[-1])
    return rounds


def policy_config(kit: Path, policy: bool) -> dict:
    """Run config of the policy phase: signed with the kit's key, or none (``--no-policy``: no dose-response fit,
    no adjuster, whose dozens of message rounds dominate a deployed run's time)."""
    return {"signing-key": str(kit / "coordinator" / "policy_signing.key")} if policy else {"fqi-iterations": 0}


def run_deployed(work: Path, kit: Path, sites: Path, names: list[str], rounds: int, one_message: bool = True,
                 policy: bool = True, workers: bool = False) -> dict:
    """One deployed run (every site with a warm worker if ``workers``, ``client.site_worker``); its wall time,
    per-round and per-phase timings and Flower's own accounting."""
    services = []
    home = work / "coordinator_home"
    try:
        _, nodes = dep.start_federation(kit, sites, names, FEDERATION, home, work, services,
                                        workers=names if workers else ())
        watcher = LogWatcher({n.name: n.log for n in nodes.values()})
        watcher.start()
        start = time.monotonic()
        run_id = dep.start_run(ROOT, FEDERATION, home, {
            "num-server-rounds": rounds, "min-nodes": len(names), "models": "ann", "out-dir": str(work / "out"),
            "one-message-rounds": one_message, **policy_config(kit, policy)})
        submitted = time.monotonic() - start
        row = dep.wait_for_run(home, FEDERATION, run_id, timeout=3600, poll=1.0)
        wall = time.monotonic() - start
        watcher.stop()
    finally:
        for service in reversed(services):
            dep.stop(service)
    answered: dict[str, list[float]] = {}
    for log in sorted(work.glob("worker_*.log")) if workers else []:
        for kind, seconds in WORKER_ANSWER.findall(log.read_text(errors="replace")):
            answered.setdefault(kind, []).append(float(seconds))
    return {"status": row["status"], "wall_s": wall, "submit_s": submitted, "flower_elapsed_s": row["elapsed"],
            "worker_seconds": answered,
            "rounds_s": deployed_rounds(watcher.events, start), "phases": phases(watcher.events, start),
            "compute_time": row["compute-time"], "network_traffic": row["network-traffic"]}


def run_simulated(work: Path, kit: Path, sites: Path, names: list[str], rounds: int, policy: bool = True) -> dict:
    """The same federation in Flower's simulation runtime (one process, Ray actors)."""
    from flwr.simulation import run_simulation

    finished: list[float] = []
    sources = [SiteSource(sites / n, trust_key=kit / "sites" / n / "policy_signing.pub") for n in names]
    overrides = {"num-server-rounds": rounds, "min-nodes": len(names), "models": "ann", "out-dir": str(work / "out"),
                 **policy_config(kit, policy)}
    start = time.monotonic()
    run_simulation(server_app=make_server_app(overrides, on_round=lambda r: finished.append(time.monotonic())),
                   client_app=make_client_app(sources), num_supernodes=len(names),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "logging_level": "ERROR"}})
    wall = time.monotonic() - start
    ends = [start, *finished]
    return {"wall_s": wall, "round_end_s": [t - start for t in finished],
            "rounds_s": [b - a for a, b in zip(ends, ends[1:], strict=False)]}


def fresh_process_import_s(repeats: int = 3) -> dict[str, list[float]]:
    """Seconds a fresh Python process takes to import what a ``flwr-clientapp`` process imports, per probe."""
    times: dict[str, list[float]] = {}
    for name, probe in IMPORT_PROBES.items():
        for _ in range(repeats):
            start = time.monotonic()
            subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)
            times.setdefault(name, []).append(time.monotonic() - start)
    return times


def print_tables(deployed: dict, simulated: dict, imports: dict[str, list[float]]) -> None:
    print(f"{'':22s} {'deployed':>10s} {'simulated':>10s}")
    print(f"{'wall time (s)':22s} {deployed['wall_s']:10.1f} {simulated['wall_s']:10.1f}")
    for r, (d, s) in enumerate(zip(deployed["rounds_s"], simulated["rounds_s"], strict=False), start=1):
        print(f"{f'round {r} (s)':22s} {d:10.1f} {s:10.1f}")
    print(f"{'mean of rounds 2+ (s)':22s} {statistics.mean(deployed['rounds_s'][1:]):10.1f} "
          f"{statistics.mean(simulated['rounds_s'][1:]):10.1f}")
    print("(deployed round r: first train message r in to first train message r + 1 in, the last to the final\n"
          " evaluate reply out; simulated round 1 runs from the\n"
          " start: Ray, site check and statistics included)")
    print("\ndeployed, per message type (s after flwr run was called):")
    print(f"{'message':22s} {'first in':>9s} {'last out':>9s} {'span':>7s} {'at a site: median':>18s} {'max':>6s}")
    for p in deployed["phases"]:
        if not p["at_site"] or p["last_out"] is None:
            continue
        print(f"{p['message']:22s} {p['first_in']:9.1f} {p['last_out']:9.1f} {p['last_out'] - p['first_in']:7.1f} "
              f"{statistics.median(p['at_site']):18.1f} {max(p['at_site']):6.1f}")
    compute = deployed["compute_time"]
    print(f"\nflwr ls: ServerApp {compute['serverapp-seconds']:.1f} s, ClientApps {compute['clientapp-seconds']:.1f} s "
          f"(all sites), traffic {deployed['network_traffic']['total-bytes'] / 1e3:.0f} kB")
    for name, seconds in imports.items():
        print(f"a fresh process importing {name}: {', '.join(f'{t:.1f}' for t in seconds)} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=30, help="patients per site")
    parser.add_argument("--no-dp", action="store_true", help="sites without DP (evaluated every round)")
    parser.add_argument("--no-policy", action="store_true", help="the outcome models only: no signed policy")
    parser.add_argument("--two-message-too", action="store_true",
                        help="deploy a second time with Flower's train-then-evaluate rounds (one-message-rounds off)")
    parser.add_argument("--workers-too", action="store_true",
                        help="deploy a second time with a warm worker per site (fednano site-worker)")
    parser.add_argument("--workers-only", action="store_true",
                        help="deploy only with a warm worker per site (no run without, no simulated run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deployment.json",
                        help="results JSON (BENCHMARKS.md one-message rounds: deployment_one_message.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flower_environment(work)
        generated = generate_sites(args.sites, seed=0, out=work / "generated", patients_per_clinic=args.patients,
                                   privacy=SitePrivacy(dp=not args.no_dp))
        names = [c.name for c in generated.clinics]
        provision(FEDERATION, names, work / "kit")
        plain = not args.workers_only
        modes = ((["deployed", "simulated"] if plain else [])
                 + (["deployed_two_message"] if args.two_message_too else [])
                 + (["deployed_workers"] if args.workers_too or args.workers_only else []))
        for mode in modes:
            shutil.copytree(work / "generated", work / mode / "sites")
        policy = not args.no_policy
        deployed = (run_deployed(work / "deployed", work / "kit", work / "deployed" / "sites", names, args.rounds,
                                 policy=policy) if plain else None)
        two = (run_deployed(work / "deployed_two_message", work / "kit", work / "deployed_two_message" / "sites",
                            names, args.rounds, one_message=False, policy=policy) if args.two_message_too else None)
        warm = (run_deployed(work / "deployed_workers", work / "kit", work / "deployed_workers" / "sites", names,
                             args.rounds, policy=policy, workers=True) if "deployed_workers" in modes else None)
        simulated = None
        if plain:
            quiet_flower()
            simulated = run_simulated(work / "simulated", work / "kit", work / "simulated" / "sites", names,
                                      args.rounds, policy=policy)
    imports = fresh_process_import_s()
    if plain:
        print_tables(deployed, simulated, imports)
    if two is not None:
        print(f"\ndeployed with train-then-evaluate rounds: wall {two['wall_s']:.1f} s, rounds "
              f"{', '.join(f'{r:.1f}' for r in two['rounds_s'])} s (mean of rounds 2+: "
              f"{statistics.mean(two['rounds_s'][1:]):.1f} s)")
    if warm is not None:
        print("\nwarm worker, seconds its handler took per message (median, max over the sites' messages):")
        for kind, seconds in warm["worker_seconds"].items():
            print(f"  {kind:24s} {statistics.median(seconds):6.2f} {max(seconds):6.2f}")
        print(f"\ndeployed with a warm worker per site: wall {warm['wall_s']:.1f} s, rounds "
              f"{', '.join(f'{r:.1f}' for r in warm['rounds_s'])} s (mean of rounds 2+: "
              f"{statistics.mean(warm['rounds_s'][1:]):.1f} s)")
        for phase in warm["phases"]:
            print(f"  {phase['message']:24s} at a site: median {statistics.median(phase['at_site']):5.1f} s")
        if deployed is not None:
            ratio = warm["wall_s"] / deployed["wall_s"]
            print(f"without a worker: wall {deployed['wall_s']:.1f} s (with: x {ratio:.2f}), mean of rounds 2+ "
                  f"{statistics.mean(deployed['rounds_s'][1:]):.1f} s")
    command = (f"python benchmarks/deployment.py --sites {args.sites} --rounds {args.rounds} --patients {args.patients}"
               + (" --no-dp" if args.no_dp else "") + (" --no-policy" if args.no_policy else "")
               + (" --two-message-too" if args.two_message_too else "")
               + (" --workers-too" if args.workers_too else "") + (" --workers-only" if args.workers_only else ""))
    write_record(args.out, command,
                 {"deployed": deployed, "simulated": simulated, "deployed_two_message": two, "deployed_workers": warm,
                  "fresh_process_import_s": imports},
                 sites=args.sites, rounds=args.rounds, patients_per_site=args.patients, dp=not args.no_dp,
                 policy=not args.no_policy)

if __name__ == "__main__":
    main()
