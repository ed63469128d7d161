"""Ending ``fednano simulate`` on SIGTERM: every process it started stopped, its last checkpoint kept, exit 143.

Without this, SIGTERM did not end the command; why, as read in Ray 2.55 and Flower 1.42: Ray's ``ray.init``
(called by Flower's Ray backend in the main thread) installs its own SIGTERM handler, ``sys.exit``: the SystemExit
unwinds Flower's simulation loop, but the ServerApp runs in a non-daemon thread that keeps waiting for replies no
node will send, so the interpreter never exits, and Ray's GCS server, raylet and workers stay up.

:func:`stop_on_sigterm` keeps a handler of its own in place for the block (Ray's is not installed over it): it
kills every process descended from this one, by PID, with SIGKILL at once, prints one line and leaves with status
128 + 15 = 143, the shell's convention for a process ended by SIGTERM. At once, because a grace period is a window
for this process's own Ray core worker to see its raylet go and abort (measured: SIGTERM to the children, 5 s of
grace, and the command died of SIGABRT, status -6, with the actors' tracebacks on stderr). Nothing is written on
the way out: the coordinator's checkpoint (``server.checkpoint``) and the sites' ledgers are replaced atomically,
so the last checkpoint is whole and ``fednano simulate --resume OUT`` continues from it.

Linux only (descendants are read from ``/proc``), as the simulation runtime here is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

EXIT_SIGTERM = 128 + signal.SIGTERM
"""Exit status of a command ended by SIGTERM (POSIX shells report a signalled process as 128 + n)."""
GRACE_S = 5.0
"""Seconds :func:`stop_processes` gives processes to exit on SIGTERM before it kills them."""


def descendants(root: int) -> list[int]:
    """The live processes descended from ``root`` (children first, then theirs), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def stop_processes(pids: list[int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM each of ``pids``, then SIGKILL those still alive after ``grace_s``; returns those killed."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    killed = [pid for pid in pids if _alive(pid)]
    for pid in killed:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


@contextmanager
def stop_on_sigterm(message: str) -> Iterator[None]:
    """Within the block, SIGTERM kills every descendant process, prints ``message`` as one line on stderr and
    exits with :data:`EXIT_SIGTERM` (module docstring). Entered outside the main thread, where no signal handler
    can be set, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return

    def on_sigterm(signum, frame) -> None:
        del signum, frame
        for pid in descendants(os.getpid()):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.write(sys.stderr.fileno(), (message.replace("\n", " ") + "\n").encode())
        os._exit(EXIT_SIGTERM)  # the ServerApp's thread would keep a normal exit waiting; nothing is left to write

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    ray_utils, ray_setter = _ray_sigterm_setter()
    if ray_utils is not None:  # ray.init would put its own handler (sys.exit) in place of this one
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if ray_utils is not None:
            ray_utils.set_sigterm_handler = ray_setter
        signal.signal(signal.SIGTERM, previous)


def _ray_sigterm_setter():
    """Ray's module and function that install ``ray.init``'s SIGTERM handler, or (None, None) without them."""
    try:
        from ray._private import utils
    except ImportError:
        return None, None
    setter = getattr(utils, "set_sigterm_handler", None)
    return (utils, setter) if setter is not None else (None, None)
