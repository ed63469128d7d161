"""The Ray a simulation starts binds to 127.0.0.1 only (the project's rule for servers we start): its GCS server,
raylet (node and object manager), workers and agents, found by PID under this test's process, listen on loopback
and nowhere else; no Ray dashboard listens."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY_DASHBOARD_PORT = 8265
"""Ray's dashboard's default port (``ray._private.ray_constants.DEFAULT_DASHBOARD_PORT``)."""

SIMULATION = textwrap.dedent("""
    # a small simulation whose ClientApp, in round 1, reports the listening sockets of every process under the
    # driver (Ray's GCS server, raylet, workers, agents) while all of them run
    import json, os, sys
    from pathlib import Path
    from client.site import SiteSource
    from simulation.clinics import SitePrivacy, generate_sites
    from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation
    from simulation.termination import descendants
    from tests.listening import listening_sockets

    out, driver = Path(sys.argv[1]), os.getpid()
    flower_environment(out / "flwr")
    quiet_flower()
    generate_sites(2, 1, out / "sites", patients_per_clinic=40, privacy=SitePrivacy(dp=False))
    cfg = ExperimentConfig(out=out / "run", clinics=2, rounds=1, seed=1, models="ann", compare=False, policy=False)
    seen = {}

    def on_round(server_round):
        pids = descendants(driver)
        seen["processes"] = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids
                             if Path(f"/proc/{pid}/comm").exists()}
        seen["listening"] = listening_sockets([driver, *pids])

    run_federation(cfg, [SiteSource(out / "sites" / f"clinic_0{i}") for i in range(2)], on_round)
    print(json.dumps(seen))
""")


def test_every_socket_the_simulations_ray_listens_on_is_on_127_0_0_1(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the simulation must set what it needs itself
    done = subprocess.run([sys.executable, "-c", SIMULATION, str(tmp_path)], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    names = set(seen["processes"].values())
    assert {"gcs_server", "raylet"} <= names, names  # Ray was running under the driver when the sockets were read
    ports = seen["listening"]
    print("listening:", sorted({(seen["processes"].get(str(pid), "driver"), a) for pid, a in ports}))
    assert len(ports) >= 3, ports  # the GCS server's and the raylet's at least
    for pid, address in ports:
        host = address.rsplit(":", 1)[0].strip("[]")
        assert ipaddress.ip_address(host).is_loopback, (seen["processes"].get(str(pid), "driver"), address)
    assert not any(address.endswith(f":{RAY_DASHBOARD_PORT}") for _, address in ports), ports  # no dashboard
