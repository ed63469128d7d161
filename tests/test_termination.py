"""``simulation.termination.stop_on_sigterm`` on a small process tree: SIGTERM ends the process with 143 and one
line, after every descendant (children and grandchildren) was stopped, by PID; Ray's ``ray.init`` cannot put its own
handler in its place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from simulation.termination import EXIT_SIGTERM, _alive, descendants

ROOT = Path(__file__).resolve().parents[1]
TREE = textwrap.dedent("""
    import signal, subprocess, sys, time
    from ray._private import utils
    from simulation.termination import stop_on_sigterm

    with stop_on_sigterm("stopped by SIGTERM: resume with --resume OUT"):
        utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))  # what ray.init does
        # a child, and a grandchild under a shell that ignores SIGTERM (so it must be killed)
        subprocess.Popen(["sleep", "300"])
        subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"])
        print("ready", flush=True)
        time.sleep(300)
""")


def test_sigterm_stops_every_descendant_by_pid_and_exits_143_with_one_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tree = subprocess.Popen([sys.executable, "-c", TREE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        assert tree.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        started = descendants(tree.pid)
        assert len(started) >= 3, started  # sleep, sh and its sleep
        tree.send_signal(signal.SIGTERM)
        _, stderr = tree.communicate(timeout=60)
    finally:
        if tree.poll() is None:
            tree.kill()
    assert tree.returncode == EXIT_SIGTERM == 143
    assert [line for line in stderr.splitlines() if line.strip()] == ["stopped by SIGTERM: resume with --resume OUT"]
    assert [pid for pid in started if _alive(pid)] == []
