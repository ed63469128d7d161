"""The site's warm worker answers what the per-message ClientApp process would have, and fails safe.

``client.site_worker`` serves in a thread of the test process here; ``client.deployed:app`` (the FAB's ClientApp)
forwards to it as a fresh ``flwr-clientapp`` process would. The end-to-end check with real SuperNodes is in
``tests/test_deployed_worker.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client import site_worker
from client.app import app as full_app
from client.deployed import app as deployed_app
from shared.protocol import messages, site_check
from shared.protocol.privacy import RunPlan
from shared.protocol.training import statistics_request

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def sites(plain_and_dp_site) -> dict[str, Path]:
    return plain_and_dp_site


class Worker:
    """``site_worker.serve`` in a thread for ``requests`` connections, on a socket in a private folder."""

    def __init__(self, folder: Path, app=full_app, requests: int = 1) -> None:
        self.path = folder / "worker" / "site.sock"
        started = threading.Event()
        self.served: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.served.append(site_worker.serve(self.path, app, started.set, requests)), daemon=True)
        self.thread.start()
        assert started.wait(30), "the worker did not start"

    def join(self) -> int:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the worker did not stop"
        return self.served[0]


def _context(site: Path, worker: Path | None) -> Context:
    config = {"data-path": str(site)}
    if worker is not None:
        config[site_worker.NODE_CONFIG_KEY] = str(worker)
    return Context(run_id=1, node_id=0, node_config=config, state=RecordDict(), run_config={})


def _requests() -> list[Message]:
    plan = RunPlan(("statistics", "training", "evaluation"))
    return [Message(site_check.request(plan), dst_node_id=0, message_type=messages.SITE_CHECK.type),
            Message(statistics_request(0, plan), dst_node_id=0, message_type=messages.STATISTICS.type)]


def _content(message: Message) -> dict:
    """A reply's content as plain values: records by name, arrays as numpy."""
    assert not message.has_error(), message.error.reason
    out = {}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {k: a.numpy() for k, a in record.items()}
        else:
            out[name] = dict(record)
    return out


def _equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        for key in a[name].keys() | b[name].keys():
            x, y = a[name].get(key), b[name].get(key)
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
                    return False
            elif x != y:
                return False
    return True


def test_the_worker_answers_as_the_clientapp_in_its_own_process(sites, tmp_path):
    worker = Worker(tmp_path, requests=2)
    forwarded_context = _context(sites["plain"], worker.path)
    forwarded = [deployed_app(m, forwarded_context) for m in _requests()]
    assert worker.join() == 2  # both went to the worker
    local_context = _context(sites["plain"], None)
    local = [full_app(m, local_context) for m in _requests()]
    for a, b in zip(forwarded, local, strict=True):
        assert a.metadata.reply_to_message_id == b.metadata.reply_to_message_id == ""  # replies to unsent messages
        assert _equal(_content(a), _content(b))


def test_the_node_state_the_worker_writes_comes_back_to_flower(sites, tmp_path):
    """A DP site keeps its run's privacy plan in the node state at its site check: Flower must get it back."""
    worker = Worker(tmp_path, requests=1)
    context = _context(sites["dp"], worker.path)
    deployed_app(_requests()[0], context)
    worker.join()
    local = _context(sites["dp"], None)
    full_app(_requests()[0], local)
    assert set(local.state) and set(context.state) == set(local.state)
    for name in local.state:
        assert dict(context.state[name]) == dict(local.state[name])


def test_without_a_worker_the_process_answers_itself(sites, tmp_path):
    missing = tmp_path / "none" / "site.sock"
    reply = deployed_app(_requests()[0], _context(sites["plain"], missing))
    assert _equal(_content(reply), _content(full_app(_requests()[0], _context(sites["plain"], None))))


def test_a_handler_failure_names_its_type_never_its_text(sites, tmp_path):
    def failing(message, context):
        raise ValueError("bilirubin 41.2 at row 7")

    worker = Worker(tmp_path, app=failing)
    with pytest.raises(site_worker.SiteWorkerError) as raised:
        deployed_app(_requests()[0], _context(sites["plain"], worker.path))
    worker.join()
    assert "ValueError" in str(raised.value) and "41.2" not in str(raised.value)


def test_garbage_on_the_socket_does_not_stop_the_worker(sites, tmp_path):
    worker = Worker(tmp_path, requests=1)
    for junk in (b"\x00" * 3, (8).to_bytes(8, "big") + b"not json", (2**40).to_bytes(8, "big")):
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(str(worker.path))
            peer.sendall(junk)
    reply = deployed_app(_requests()[0], _context(sites["plain"], worker.path))  # a real request still answered
    assert not reply.has_error()
    assert worker.join() == 1


@pytest.mark.parametrize(("header", "why"), [({"version": 99}, "wire version 99"),
                                             ({"code": "0" * 64}, "other code than the run's ClientApp")])
def test_a_clientapp_of_another_version_is_refused_and_answers_itself(sites, tmp_path, monkeypatch, header, why):
    worker = Worker(tmp_path, requests=2)
    with socket.socket(socket.AF_UNIX) as peer:  # the refusal says why, before any message is sent
        peer.connect(str(worker.path))
        proper = {"version": site_worker.WIRE_VERSION, "code": site_worker.code_fingerprint(), "task-id": 1,
                  "run-id": 1, "node-id": 0}
        site_worker._send_frame(peer, json.dumps({**proper, **header}).encode())
        answer = json.loads(site_worker._receive_frame(peer))
    assert answer["ok"] is False and why in answer["error"]
    if "code" in header:  # a FAB of other code than the worker's: its ClientApp answers in its own process
        monkeypatch.setattr(site_worker, "code_fingerprint", lambda: header["code"])
        reply = deployed_app(_requests()[0], _context(sites["plain"], worker.path))
        assert _equal(_content(reply), _content(full_app(_requests()[0], _context(sites["plain"], None))))
    else:
        deployed_app(_requests()[0], _context(sites["plain"], worker.path))
    assert worker.join() == 2


def test_the_fingerprint_follows_the_code(tmp_path):
    for package in ("client", "shared"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = site_worker.code_fingerprint(tmp_path)
    (tmp_path / "shared" / "a.py").write_text("x = 2\n")
    assert site_worker.code_fingerprint(tmp_path) != before
    assert len(before) == 64 and site_worker.code_fingerprint() == site_worker.code_fingerprint()


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_the_socket_folder_must_be_private(tmp_path, mode):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    with pytest.raises(site_worker.UnsafeSocketFolder, match="chmod 700"):
        site_worker.serve(folder / "site.sock", app=full_app, max_requests=0)
    assert not (folder / "site.sock").exists()


def test_the_socket_is_the_users_only(tmp_path):
    worker = Worker(tmp_path, requests=0)
    worker.join()
    folder = worker.path.parent
    assert oct(folder.stat().st_mode & 0o777) == "0o700"


def test_the_fabs_clientapp_imports_flwr_only():
    """What a fresh flwr-clientapp process loads before it forwards a message."""
    probe = ("import sys, client.deployed; "
             "print(sorted(m for m in ('client.app', 'pandas', 'torch', 'opacus', 'xgboost', 'sklearn') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_silent_peer_does_not_hold_the_worker(sites, tmp_path, monkeypatch):
    monkeypatch.setattr(site_worker, "REQUEST_TIMEOUT_S", 0.5)
    worker = Worker(tmp_path, requests=1)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(worker.path))
        silent.sendall(b"\x00")  # starts a frame, never finishes it
        reply = deployed_app(_requests()[0], _context(sites["plain"], worker.path))
    assert not reply.has_error() and worker.join() == 1


@pytest.mark.slow
def test_sigterm_stops_the_worker_even_mid_request_and_removes_its_socket(tmp_path):
    """``fednano site-worker`` as a hospital runs it: a peer that connects and says nothing holds a request open;
    SIGTERM still ends the process at once (tests and hosts stop it by PID)."""
    path = tmp_path / "worker" / "site.sock"
    process = subprocess.Popen([sys.executable, "-m", "fednano.cli", "site-worker", "--socket", str(path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(str(path))
            silent.sendall(b"\x00")
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        output = process.stdout.read()
        assert "listening on" in output and "stopped after 0 messages" in output
        assert not path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
