"""``fednano simulate`` ends on SIGTERM (issue 16, item 1, operations): exit status 143 with one line saying so,
Ray and every other process it started stopped (checked by PID), the last checkpoint kept, and ``--resume`` finishes
the run from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.checkpoint import CHECKPOINT_FOLDER, STATE_FILE, Checkpoint
from simulation.termination import EXIT_SIGTERM, _alive, descendants, stop_processes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--clinics", "2", "--patients-per-clinic", "40", "--rounds", "40", "--no-dp", "--models", "ann",
         "--no-compare", "--no-policy", "--seed", "1"]
"""A small run with enough rounds to be caught training: on a quiet machine a round of it takes ~0.1 s (4 rounds
were over before a 0.5 s poll saw them, and the run finished before the signal); resume finishes the rest."""


def fednano(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_HOME=str(cwd / ".flwr"), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    return subprocess.Popen([sys.executable, "-m", "fednano.cli", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_simulate_and_every_process_it_started_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    state = out / "federated" / CHECKPOINT_FOLDER / STATE_FILE
    run = fednano(["simulate", *SMALL, "--out", str(out)], tmp_path)
    try:
        deadline = time.monotonic() + 600
        while not (state.is_file() and Checkpoint.read(out / "federated").stage == "training"):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no training round was checkpointed within 600 s"
            time.sleep(0.05)
        started = descendants(run.pid)  # Ray's GCS server, raylet, workers, agents: all under the command
        assert len(started) >= 3, started
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:  # the test failed: stop the command and what it started, by PID
            stop_processes([run.pid, *descendants(run.pid)], grace_s=1.0)
            run.communicate()
    assert run.returncode == EXIT_SIGTERM == 143, stderr[-2000:]
    said = [line for line in stderr.splitlines() if line.startswith("fednano simulate: stopped by SIGTERM")]
    assert len(said) == 1 and f"--resume {out}" in said[0], stderr[-2000:]
    assert stderr.splitlines()[-1] == said[0], stderr[-2000:]  # the last word is ours, nothing after it
    time.sleep(1.0)
    survivors = [pid for pid in started if _alive(pid)]
    assert survivors == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in survivors]
    kept = Checkpoint.read(out / "federated")
    assert kept is not None and kept.stage == "training" and kept.server_round >= 1

    resumed = fednano(["simulate", "--resume", str(out)], tmp_path)
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, (stdout + stderr)[-3000:]
    assert (out / "results.json").is_file()
    assert not (out / "federated" / CHECKPOINT_FOLDER).exists()  # the run finished: its checkpoint removed
