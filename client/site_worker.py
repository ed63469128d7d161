"""A site's warm worker: one long-lived process that answers the messages a deployed SuperNode hands to its
short-lived ``flwr-clientapp`` processes.

Why. Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process for every message (its SuperExec in the
default ``subprocess`` isolation), and each process imports the ClientApp before it can answer: 4 s for
``client.app`` and 6-14 s with torch and Opacus on a 2-core machine (BENCHMARKS.md, "ClientApp imports per
message"), most of a deployed round. The worker pays the imports once. The hospital starts it beside its
SuperNode::

    fednano site-worker --socket /run/fednano/worker/site.sock &
    flower-supernode ... --node-config 'data-path="/data/site" site-worker="/run/fednano/worker/site.sock"'

and the FAB's ClientApp (:mod:`client.deployed`, which imports flwr only) hands each message with its Context to
the worker and gives Flower back the worker's reply and Context; Flower keeps the node state and sends the reply
as without a worker. The worker runs the same ClientApp (:data:`client.app.app`) on the same node config, so a
reply is the same as the one the fresh process would have made; the site's caches (validated tables, encoded
splits) stay warm between messages while the files are unchanged (``client.site``).

Security. The socket lives in a folder only the worker's user may enter: the worker creates it with mode 0700 and
refuses to start in one that others can read, write or enter, or that another user owns, so only processes of the
site's own user (its SuperNode's ClientApps) can connect. Frames carry Flower's own protobuf encoding of the
Message and Context (``flwr.common.serde``) and a small JSON header, never a pickle: whoever connects can ask for
an answer, not run code. The worker talks to no one else; nothing it holds leaves the host except through the
ClientApp's reply, the same reply as without it.

Failures. When the socket does not answer (no worker, or it stopped), the ClientApp answers the message in its
own process and logs why: slower, never different. A handler that raises in the worker makes the ClientApp raise
:class:`SiteWorkerError` naming the exception's type only, not its text, which could hold a value; the worker logs
the traceback at the site. One message is served at a time, as the SuperNode sends them.

Versions. The worker answers only a ClientApp of the same code (:func:`code_fingerprint` over ``client/`` and
``shared/``): after an update, or when the run's FAB differs from the site's install, the ClientApp answers in its
own process with the FAB's code, and the worker's log says why.

Wire format, both ways: frames of an 8-byte big-endian length and the bytes. The ClientApp sends a JSON header
(``version``, ``code``, and the task identity Flower's runtime set in its process: ``task-id``, ``run-id``,
``node-id``); the worker admits it or says why not (JSON ``ok`` / ``error``); then the Message and the Context go
one way, and a JSON header (``ok``, or ``error``: the exception's type) and, when ``ok``, the reply Message and the
Context come back.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

LOG = logging.getLogger("fednano.site_worker")

WIRE_VERSION = 1
"""The frame layout's version: a worker refuses a request of another version."""
NODE_CONFIG_KEY = "site-worker"
"""The SuperNode's node-config key naming the worker's socket (absent: no worker, each message in its process)."""
MAX_FRAME_BYTES = 2**31
"""The largest frame either side reads (a Message of the largest model the platform sends is far below)."""
CONNECT_TIMEOUT_S = 5.0
"""How long a ClientApp waits to connect before answering in its own process."""
ADMISSION_TIMEOUT_S = 60.0
"""How long a ClientApp waits for the worker to admit its request (the worker may be finishing another message)
before answering in its own process."""
REQUEST_TIMEOUT_S = 30.0
"""How long the worker waits for each frame of a request before dropping the connection (a silent peer must
not hold the only worker)."""
PRELOAD = ("client.app", "torch", "opacus", "xgboost")
"""What the worker imports before it listens: the ClientApp and what its handlers load on their first use."""


class SiteWorkerError(RuntimeError):
    """The worker took the message but could not answer it (a handler raised, or the connection broke)."""


class _Stopping(BaseException):
    """SIGTERM or SIGINT reached the worker: leave whatever blocking call it is in."""


class WorkerUnavailable(RuntimeError):
    """The worker cannot take the message (another wire version, or other code than the ClientApp's): the
    ClientApp answers it in its own process."""


PROJECT = Path(__file__).resolve().parents[1]
"""The folder holding ``client/`` and ``shared/`` as this process imports them (a FAB's, or an install's)."""


def code_fingerprint(root: Path = PROJECT) -> str:
    """SHA-256 over the sources every reply comes from (``client/`` and ``shared/``, by path and content): the
    worker answers only a ClientApp of the same code, so a site whose worker runs an older install than the run's
    FAB answers with the FAB's code, in the per-message process."""
    digest = hashlib.sha256()
    for package in ("client", "shared"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class UnsafeSocketFolder(ValueError):
    """The socket's folder is not private to the worker's user."""


def _send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack(">Q", len(data)) + data)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">Q", _receive_exactly(sock, 8))
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame of {size} bytes is above the limit of {MAX_FRAME_BYTES}")
    return _receive_exactly(sock, size)


def encode_message(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def decode_message(data: bytes) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def encode_context(context: Context) -> bytes:
    return context_to_proto(context).SerializeToString()


def decode_context(data: bytes) -> Context:
    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)


def private_folder(folder: Path) -> Path:
    """``folder``, created with mode 0700 if missing; :class:`UnsafeSocketFolder` if it exists and another user
    owns it or others may read, write or enter it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise UnsafeSocketFolder(f"{folder}: owned by uid {info.st_uid}, not this user ({os.getuid()}); the worker's "
                                 "socket needs a folder of its own user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UnsafeSocketFolder(f"{folder}: mode {stat.S_IMODE(info.st_mode):o}; the worker's socket needs a folder "
                                 "only its user may enter (chmod 700)")
    return folder


def forward(socket_path: Path, message: Message, context: Context,
            timeout: float = CONNECT_TIMEOUT_S) -> tuple[Message, Context]:
    """Have the worker at ``socket_path`` answer ``message``: its reply and the Context after it.

    ``OSError`` when the worker cannot be reached and :class:`WorkerUnavailable` when it refuses the request
    (the caller answers in its own process); :class:`SiteWorkerError` when it took the message and failed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        header = {"version": WIRE_VERSION, "code": code_fingerprint(), "task-id": TaskIdentity.task_id,
                  "run-id": TaskIdentity.run_id, "node-id": TaskIdentity.node_id}
        _send_frame(sock, json.dumps(header).encode())
        sock.settimeout(ADMISSION_TIMEOUT_S)
        try:
            admitted = json.loads(_receive_frame(sock))
        except (TimeoutError, ConnectionError, ValueError) as err:
            raise WorkerUnavailable(f"no admission from the worker ({type(err).__name__})") from None
        if not admitted.get("ok"):
            raise WorkerUnavailable(str(admitted.get("error", "no reason given")))
        sock.settimeout(None)
        for frame in (encode_message(message), encode_context(context)):
            _send_frame(sock, frame)
        try:  # a training message takes as long as it takes
            answer = json.loads(_receive_frame(sock))
            if not answer.get("ok"):
                raise SiteWorkerError(f"the site worker could not answer {message.metadata.message_type}: "
                                      f"{answer.get('error', 'no reason given')}")
            return decode_message(_receive_frame(sock)), decode_context(_receive_frame(sock))
        except (ConnectionError, ValueError) as err:  # the message reached the worker: do not answer it twice
            raise SiteWorkerError(f"the site worker's reply to {message.metadata.message_type} broke off: "
                                  f"{type(err).__name__}") from None
    finally:
        sock.close()


def answer(app: Callable[[Message, Context], Message], connection: socket.socket, code: str) -> str:
    """Serve one request on ``connection`` with ``app`` if it comes from a ClientApp of the same ``code``
    (:func:`code_fingerprint`); returns what happened, for the log."""
    connection.settimeout(REQUEST_TIMEOUT_S)
    first = connection.recv(1, socket.MSG_PEEK)
    if not first:
        return ""  # connected and closed without a word: a liveness probe
    header = json.loads(_receive_frame(connection))
    refusal = None
    if header.get("version") != WIRE_VERSION:
        refusal = f"wire version {header.get('version')!r}, this worker speaks {WIRE_VERSION}"
    elif header.get("code") != code:
        refusal = "the worker runs other code than the run's ClientApp (restart it after an update)"
    _send_frame(connection, json.dumps({"ok": refusal is None, "error": refusal}).encode())
    if refusal is not None:
        return f"refused: {refusal}"
    message, context = decode_message(_receive_frame(connection)), decode_context(_receive_frame(connection))
    connection.settimeout(None)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        int(header["task-id"]), int(header["run-id"]), int(header["node-id"]))
    kind, start = message.metadata.message_type, time.perf_counter()
    try:
        reply = app(message, context)
    except Exception as err:  # noqa: BLE001 - any handler failure becomes a reply naming its type only
        LOG.exception("site worker: %s raised", kind)
        _send_frame(connection, json.dumps({"ok": False, "error": type(err).__name__}).encode())
        return f"{kind}: {type(err).__name__}"
    seconds = time.perf_counter() - start
    frames = (json.dumps({"ok": True}).encode(), encode_message(reply), encode_context(context))
    for frame in frames:
        _send_frame(connection, frame)
    return f"{kind} answered in {seconds:.2f} s"


def preload(modules: Iterable[str] = PRELOAD) -> dict[str, float]:
    """Import ``modules`` now (seconds each); a module that is not installed is skipped."""
    seconds = {}
    for name in modules:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        seconds[name] = time.perf_counter() - start
    return seconds


def serve(socket_path: Path, app: Callable[[Message, Context], Message] | None = None,
          ready: Callable[[], None] | None = None, max_requests: int | None = None) -> int:
    """Listen on ``socket_path`` (its folder private, :func:`private_folder`) and answer one message at a time
    with ``app`` (default: :data:`client.app.app`, after :func:`preload`) until SIGTERM or SIGINT, or
    ``max_requests``; removes the socket when it stops. Returns the number of messages answered."""
    socket_path = Path(socket_path)
    private_folder(socket_path.parent)
    if app is None:
        LOG.info("site worker: preloaded %s", {k: round(v, 2) for k, v in preload().items()})
        app = importlib.import_module("client.app").app
    if socket_path.exists() or socket_path.is_symlink():
        socket_path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def stop(signum, _frame) -> None:
        raise _Stopping(signum)

    previous = ({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    served, code = 0, code_fingerprint()
    try:
        server.bind(str(socket_path))
        os.chmod(socket_path, 0o600)
        server.listen(4)
        if ready is not None:
            ready()
        while max_requests is None or served < max_requests:
            connection, _ = server.accept()
            with connection:
                try:
                    done = answer(app, connection, code)
                except _Stopping:
                    raise
                except Exception as err:  # noqa: BLE001 - a ClientApp process gone, or a garbled request
                    LOG.warning("site worker: a request broke off (%s)", type(err).__name__)
                    continue
                if done:
                    LOG.info("site worker: %s", done)
                    served += 1
    except _Stopping as stopped:
        LOG.info("site worker: stopping on signal %s", stopped.args[0])
    finally:
        server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if socket_path.exists():
            socket_path.unlink()
    return served
