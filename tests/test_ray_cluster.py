"""``fednano simulate --ray-address``: the simulated SuperNodes run on a Ray cluster of a head and a worker node,
each started as a separate process (``ray start --block``).

Ray's servers listen on every interface, so the cluster, and the command driving it, run in a network namespace
of this test's own whose only interface is loopback; every process is stopped by PID (the namespace's PIDs are
swept last).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PORT = 6391


@pytest.fixture()
def namespace():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root and iproute2 (CI has both)")
    name = f"fednano-ray-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # anything of the cluster still running
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


def environment(home: Path) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_HOME": str(home / "flwr"),
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # ray start --block stops its node's processes on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def cluster_nodes(ns: str, env: dict) -> list[tuple[str, float]]:
    probe = (f"import json, ray; ray.init(address='127.0.0.1:{PORT}', logging_level='ERROR'); "
             "print(json.dumps([[n['NodeManagerAddress'], n['Resources'].get('CPU', 0)] "
             "for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120)
    return [tuple(n) for n in json.loads(done.stdout.strip().splitlines()[-1])] if done.returncode == 0 else []


def test_simulate_runs_its_supernodes_on_a_ray_cluster_of_a_head_and_a_worker(namespace, tmp_path):
    env = environment(tmp_path)
    ray_dir = Path(tempfile.mkdtemp(prefix="fnray", dir="/tmp"))  # Ray's socket paths must stay short
    in_ns = ["ip", "netns", "exec", namespace]
    logs = tmp_path / "head.log", tmp_path / "worker.log"
    head = subprocess.Popen([*in_ns, str(BIN / "ray"), "start", "--head", "--port", str(PORT), "--num-cpus", "1",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(ray_dir),
                             "--block"], env=env, stdout=logs[0].open("w"), stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not cluster_nodes(namespace, env):
            assert head.poll() is None and time.monotonic() < deadline, logs[0].read_text()[-2000:]
            time.sleep(2)
        worker = subprocess.Popen([*in_ns, str(BIN / "ray"), "start", "--address", f"127.0.0.1:{PORT}",
                                   "--num-cpus", "1", "--disable-usage-stats", "--block"],
                                  env=env, stdout=logs[1].open("w"), stderr=subprocess.STDOUT)
        while len(nodes := cluster_nodes(namespace, env)) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-2000:]
            time.sleep(2)
        # two nodes of one CPU each, on loopback: Flower's two actors (one CPU each) take one node each
        assert nodes == [("127.0.0.1", 1.0), ("127.0.0.1", 1.0)]

        out = tmp_path / "run"
        done = subprocess.run([*in_ns, str(BIN / "fednano"), "simulate", "--clinics", "3", "--rounds", "2",
                               "--models", "ann", "--no-compare", "--no-dp", "--seed", "4", "--out", str(out),
                               "--ray-address", f"127.0.0.1:{PORT}", "--supernode-cpus", "1"],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["ray_address"] == f"127.0.0.1:{PORT}"
        assert sorted(results["sites"]) == ["clinic_00", "clinic_01", "clinic_02"]
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        assert all(set(r["per_site"]) == set(results["sites"]) for r in results["rounds"])
        assert results["models"]["ann"]["federated"]["overall"]["response"]["auc"] > 0.6
        assert len(cluster_nodes(namespace, env)) == 2  # the run disconnected; the cluster is still up
        # the ClientApp actors were the cluster's (a Ray of the command's own would log under /tmp/ray instead)
        actor_logs = [f for f in (ray_dir / "session_latest" / "logs").glob("worker-*.out")
                      if ":actor_name:ClientAppActor" in f.read_text(errors="replace")]
        assert len(actor_logs) == 2, sorted(p.name for p in (ray_dir / "session_latest" / "logs").iterdir())
    finally:
        for process in (worker, head):
            if process is not None:
                stop(process)
        shutil.rmtree(ray_dir, ignore_errors=True)
