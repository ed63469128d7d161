"""Real Flower processes for end-to-end tests: a SuperLink, SuperNodes, `flwr run`, and stopping them all.

Every process is started in its own session (``start_new_session``). :func:`stop` ends the process tree
below that PID and nothing else: its descendants are listed first from ``/proc`` (the SuperExec starts the
ServerApp and ClientApp processes in sessions of their own, and they outlive it if not stopped), then the
process and each descendant are signalled by PID. Each SuperNode gets its own ``FLWR_HOME``, as if it ran on
its own hospital host.

Example
-------
>>> link = start_superlink(kit / "coordinator", workdir, port=free_port())      # doctest: +SKIP
>>> register_site(kit / "coordinator", "hospitals", "alpha", home)             # doctest: +SKIP
>>> node = start_supernode(kit / "sites" / "alpha", data, link.port, workdir)  # doctest: +SKIP
>>> run_id = start_run(app, "hospitals", home, {"num-server-rounds": 1})       # doctest: +SKIP
>>> wait_for_run(home, "hospitals", run_id, timeout=300)["status"]             # doctest: +SKIP
'finished:completed'
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from simulation.termination import descendants

FLOWER_BIN = Path(sys.executable).parent
"""flower-superlink, flower-supernode, flwr and flower-superexec of this environment."""

PROJECT = Path(__file__).resolve().parents[1]
"""This checkout: the code a site worker runs (the FAB that ``flwr run`` builds holds the same)."""
FINISHED = "finished"
"""Prefix of a run's status once it has ended (``finished:completed``, ``finished:failed``, ...)."""


SUPEREXEC_POLL_S = "0.1"
"""``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``: how often the SuperExec a SuperLink or SuperNode starts looks for a task
to launch (Flower 1.42: every 1 s unless set; 0.01 s to 60 s accepted), as README's deployment recommends."""


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a Flower process: its own ``FLWR_HOME``, offline, its SuperExec polling every
    :data:`SUPEREXEC_POLL_S`, and this venv's bin/ on PATH (the SuperLink and SuperNode start ``flower-superexec``
    by name)."""
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_S,
            "PATH": f"{FLOWER_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


LISTEN_PORTS = (20000, 32768)
"""Where :func:`free_port` looks: below Linux's default ephemeral range (32768-60999), from which the kernel hands
out the local ports of outgoing connections. A port the kernel chose for us (bind to 0) lies in that range, and an
outgoing connection of another process (Ray, a SuperNode's gRPC client) could take it before our server binds
it: a SuperNode's Runtime HTTP API once failed with "address already in use" so (CI, 2026-12-05)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range (:data:`LISTEN_PORTS`)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*LISTEN_PORTS)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free TCP port in {LISTEN_PORTS[0]}-{LISTEN_PORTS[1] - 1} on 127.0.0.1")


@dataclass
class Service:
    """A started Flower process: its name, the process, the port it serves and its log file."""

    name: str
    process: subprocess.Popen
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start(name: str, command: list[str], env: dict[str, str], workdir: Path, port: int) -> Service:
    """Start ``command`` in its own session, logging to ``workdir/<name>.log``."""
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(name, process, port, log)


def stop(service: Service, timeout: float = 15.0) -> int | None:
    """Stop ``service`` and every process below it (SIGTERM, then SIGKILL); its exit code (negative: the
    signal that ended it)."""
    children = descendants(service.process.pid)
    if service.process.poll() is None:
        _signal(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(service.process.pid, signal.SIGKILL)
            service.process.wait(timeout=timeout)
    for pid in children + descendants_of_all(children):
        _signal(pid, signal.SIGKILL)  # what its shutdown left behind
    return service.process.returncode


def kill(service: Service) -> None:
    """Kill ``service`` and its descendants at once, as a crash or a pulled cable would."""
    children = descendants(service.process.pid)
    for pid in [service.process.pid, *children]:
        _signal(pid, signal.SIGKILL)
    service.process.wait(timeout=15)


def descendants_of_all(pids: list[int]) -> list[int]:
    return [child for pid in pids for child in descendants(pid)]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_for_port(service: Service, timeout: float) -> None:
    """Return once ``service`` accepts TCP connections on its port; raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", service.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{service.name} did not listen on 127.0.0.1:{service.port} within {timeout} s")


def start_superlink(coordinator: Path, workdir: Path, port: int) -> Service:
    """``flower-superlink`` with the kit's TLS material and SuperNode authentication, on 127.0.0.1:``port``."""
    command = [str(FLOWER_BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
               "--ssl-ca-certfile", str(coordinator / "ca.pem"), "--ssl-certfile", str(coordinator / "server.pem"),
               "--ssl-keyfile", str(coordinator / "server.key"), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--database", str(workdir / "superlink.db")]
    link = start("superlink", command, flower_env(workdir / "superlink_home"), workdir, port)
    wait_for_port(link, timeout=60)
    return link


def write_connection(home: Path, federation: str, port: int, ca: Path) -> None:
    """``home/config.toml`` naming the SuperLink at 127.0.0.1:``port`` for ``flwr`` (TLS with ``ca``)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = {json.dumps(str(ca))}\n')


def flwr(home: Path, *args: str, timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` and return its JSON; raise with its output unless it succeeded."""
    done = subprocess.run([str(FLOWER_BIN / "flwr"), *args, "--format", "json"], env=flower_env(home), cwd=home,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError as err:
        raise RuntimeError(f"flwr {' '.join(args)} printed no JSON:\n{done.stdout}\n{done.stderr}") from err
    if not answer.get("success", False):  # --format json exits 0 even on failure
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return answer


def register_site(coordinator: Path, federation: str, site: str, home: Path) -> int:
    """Register ``site``'s SuperNode public key with the SuperLink; its node id."""
    answer = flwr(home, "supernode", "register", str(coordinator / "supernodes" / f"{site}.pub"), federation,
                  "--name", site)
    return int(answer["node-id"])


def node_config(data: Path, site: str, trust_key: Path | None = None, worker: Path | None = None) -> str:
    """The ``--node-config`` of a hospital's SuperNode: its data, its name, the coordinator's signing key and its
    warm worker's socket (``client.site_worker``)."""
    config = f"data-path={json.dumps(str(data))} site-name={json.dumps(site)}"
    if trust_key is not None:
        config += f" trust-key={json.dumps(str(trust_key))}"
    if worker is not None:
        config += f" site-worker={json.dumps(str(worker))}"
    return config


def start_supernode(site_kit: Path, data: Path, superlink_port: int, workdir: Path, name: str,
                    worker: Path | None = None) -> Service:
    """``flower-supernode`` for one hospital: its key, the CA, its data folder, the coordinator's public key, and
    the socket of its warm worker if it has one (:func:`start_site_worker`).

    Its FLWR_HOME is ``workdir/<name>_home``; its ClientAppIo port is a free port (one per node on a host).
    """
    port = free_port()
    command = [str(FLOWER_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{superlink_port}",
               "--root-certificates", str(site_kit / "ca.pem"),
               "--auth-supernode-private-key", str(site_kit / "supernode.key"), "--port", str(port),
               "--node-config", node_config(data, name, site_kit / "policy_signing.pub", worker)]
    return start(f"supernode_{name}", command, flower_env(workdir / f"{name}_home"), workdir, port)


def worker_socket(workdir: Path, name: str) -> Path:
    """Where the warm worker of site ``name`` listens: a private folder of its own under ``workdir``."""
    return workdir / f"{name}_worker" / "site.sock"


def start_site_worker(workdir: Path, name: str) -> Service:
    """``fednano site-worker`` for one hospital (``client.site_worker``); :func:`wait_for_worker` waits for it."""
    path = worker_socket(workdir, name)
    env = {**flower_env(workdir / f"{name}_home"), "PYTHONPATH": str(PROJECT)}  # this checkout's code, as the FAB's
    return start(f"worker_{name}", [sys.executable, "-m", "fednano.cli", "site-worker", "--socket", str(path)],
                 env, workdir, 0)


def wait_for_worker(service: Service, path: Path, timeout: float = 120.0) -> Service:
    """Return ``service`` once its socket at ``path`` accepts a connection; raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log_text()}")
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                return service
        time.sleep(0.2)
    raise TimeoutError(f"{service.name} did not listen on {path} within {timeout} s")


def start_federation(kit: Path, sites: Path, names: list[str], federation: str, home: Path, workdir: Path,
                     services: list[Service], workers: Collection[str] = ()) -> tuple[Service, dict[str, Service]]:
    """The coordinator's SuperLink (its connection written to ``home``), every site of ``names`` registered and
    its SuperNode started on its folder in ``sites`` (with a warm worker for the sites in ``workers``): the
    SuperLink and the SuperNodes by name. Each service is appended to ``services`` as soon as it runs, so the caller
    stops every one started, whatever fails next."""
    link = start_superlink(kit / "coordinator", workdir, free_port())
    services.append(link)
    write_connection(home, federation, link.port, kit / "coordinator" / "ca.pem")
    for name in names:
        register_site(kit / "coordinator", federation, name, home)
    started = {name: start_site_worker(workdir, name) for name in names if name in workers}
    services.extend(started.values())
    for name, worker in started.items():  # they load in parallel
        wait_for_worker(worker, worker_socket(workdir, name))
    nodes = {}
    for name in names:
        nodes[name] = start_supernode(kit / "sites" / name, sites / name, link.port, workdir, name,
                                      worker_socket(workdir, name) if name in workers else None)
        services.append(nodes[name])
    return link, nodes


def start_run(app: Path, federation: str, home: Path, run_config: dict[str, object]) -> int:
    """``flwr run APP FEDERATION --run-config ...``: submit a run and return its id (without waiting)."""
    overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
    answer = flwr(home, "run", str(app), federation, "--run-config", overrides, timeout=180)
    return int(answer["run-id"])


def run_status(home: Path, federation: str, run_id: int) -> dict:
    """The run's row of ``flwr ls --run-id``: ``status``, ``elapsed``, ... as Flower prints them."""
    answer = flwr(home, "ls", federation, "--run-id", str(run_id))
    return answer["runs"][0]


def serverapp_pids(link: Service) -> list[int]:
    """The ServerApp processes the SuperLink's SuperExec started (``flwr-serverapp``), read from ``/proc``."""
    found = []
    for pid in descendants(link.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flwr-serverapp" in command:
            found.append(pid)
    return found


def wait_for_run(home: Path, federation: str, run_id: int, timeout: float, poll: float = 3.0,
                 link: Service | None = None, idle_poll: float = 30.0) -> dict:
    """Poll ``flwr ls`` until the run has finished; its last status row. TimeoutError past ``timeout``.

    Each ``flwr ls`` is a new process that imports Flower (~1 s of CPU here): every ``poll`` seconds that took
    a quarter of a core from the run it waits for, on 2 cores. Given the SuperLink (``link``), ``/proc`` is read
    every 0.5 s instead, and Flower asked once the run's ServerApp process has ended (a run has finished when
    its ServerApp has; the status is then read every ``poll`` seconds until Flower reports it), or every
    ``idle_poll`` seconds whatever the processes show (a ServerApp started and ended between two looks)."""
    deadline = time.monotonic() + timeout
    seen = False
    while True:
        row = run_status(home, federation, run_id)
        if str(row["status"]).startswith(FINISHED):
            return row
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {row['status']} after {timeout} s")
        if link is None:
            time.sleep(poll)
            continue
        asked = time.monotonic()
        while time.monotonic() - asked < idle_poll and time.monotonic() <= deadline:
            running = bool(serverapp_pids(link))
            seen = seen or running
            if seen and not running and time.monotonic() - asked >= poll:
                break
            time.sleep(0.5)


def wait_for_log(service: Service, text: str, timeout: float, poll: float = 0.5) -> None:
    """Return once ``text`` appears in the service's log; TimeoutError (with the log) otherwise."""
    deadline = time.monotonic() + timeout
    while text not in service.log_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service.name} never logged {text!r} in {timeout} s:\n{service.log_text()[-3000:]}")
        time.sleep(poll)
