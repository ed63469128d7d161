"""Flower 1.42's simulation runtime at hundreds of clinics: every node's next message handed out in one pass.

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) asks its
in-memory link state every 0.1 s for each node's next message, and each ask
(``InMemoryLinkState.get_message_ins``) first checks every stored message (expiry, federation membership). One
pass is therefore nodes × messages checks: at 100 clinics it kept a core of the 2 busy (57 % of the coordinator
process's samples in a py-spy profile), and at 1,000 clinics one pass took longer than a round should
(BENCHMARKS.md, "Scale").

:func:`next_messages` checks every stored message once and hands each node its first valid undelivered message:
what Flower's loop hands out in one pass, in the same order (``tests/test_flower_runtime.py`` compares them).
:func:`one_pass_delivery` puts it in place of Flower's loop for the simulations run inside it, only for the
Flower version it was written against (the one ``pyproject.toml`` pins) and only for the in-memory state;
anything else keeps Flower's own loop. Deployed federations (SuperLink with its database) are not affected.

:func:`simulate` is how this project runs a ServerApp and its ClientApp in Flower's simulation runtime.

:func:`ray_session` keeps one Ray, and one pool of ClientApp actors, for every simulation inside it: Flower's
Ray backend starts Ray and its actors for each simulation and shuts Ray down after it (``RayBackend.build``
and ``terminate``), ~15 s each time on this machine kind before the first message is answered, and the
actors' imports and site caches are lost with them. A command that runs many simulations (``fednano paper
liposome``: 30; a closed loop: one per cycle) pays it once. Like :func:`one_pass_delivery`, it applies to the
Flower release it was written against only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Queue
from typing import Any

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

WRITTEN_FOR = "1.42.0"
"""The Flower release whose in-memory state :func:`next_messages` reads (its private store and lock)."""
FLOWER_POLL_S = 0.1
"""Seconds Flower 1.42 waits between passes of its delivery loop and between the ServerApp's pulls of replies
(``InMemoryGrid.pull_interval``): a message waits for the next pass twice per exchange, ~0.1 s on average, and a
round of train and evaluate at 10 clinics took 0.77 s against 0.26 s for the same steps in a plain loop
(BENCHMARKS.md, "Federated ANN")."""
POLL_S_PER_NODE = 1e-4
MIN_POLL_S = 0.01


def poll_interval(n_nodes: int) -> float:
    """Seconds between passes of the delivery loop and the ServerApp's pulls of replies: a pass costs time in
    proportion to the nodes and stored messages, so small federations poll every :data:`MIN_POLL_S` and
    1,000 nodes as Flower does (:data:`FLOWER_POLL_S`)."""
    return min(FLOWER_POLL_S, max(MIN_POLL_S, POLL_S_PER_NODE * n_nodes))

_FLOWER_LOOP = vce_api.add_messages_to_queue
_FLOWER_GRID_DEFAULTS = InMemoryGrid.__init__.__defaults__
_FLOWER_BUILD = RayBackend.build
_FLOWER_TERMINATE = RayBackend.terminate


def next_messages(state: InMemoryLinkState, node_ids: Sequence[int]) -> list[Message]:
    """Each node's next message (nodes in ``node_ids`` order), marked delivered: Flower's
    ``get_message_ins(node_id, limit=1)`` for every node, with every stored message checked once, not once
    per node."""
    wanted = set(node_ids)
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))  # drops expired or out-of-federation ones
        first: dict[int, Message] = {}
        for message in state.message_ins_store.values():
            meta = message.metadata
            if meta.delivered_at == "" and meta.dst_node_id in wanted and meta.dst_node_id not in first:
                first[meta.dst_node_id] = message
        handed = [first[node] for node in node_ids if node in first]
        delivered_at = now().isoformat()
        for message in handed:
            message.metadata.delivered_at = delivered_at
    return handed


def _one_pass_loop(state, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` with :func:`next_messages` for the in-memory state."""
    if not isinstance(state, InMemoryLinkState):
        _FLOWER_LOOP(state, queue, nodes_mapping, f_stop)
        return
    node_ids = list(nodes_mapping)
    wait_s = poll_interval(len(node_ids))
    while not f_stop.is_set():
        for message in next_messages(state, node_ids):
            queue.put(message)
        f_stop.wait(wait_s)


RAY_HEAD_TIMEOUT_S = 5.0
"""Seconds :func:`ray_head_problem` waits for a Ray head's port to accept a connection."""


def ray_head_problem(address: str, timeout_s: float = RAY_HEAD_TIMEOUT_S) -> str | None:
    """Why ``address`` (HOST:PORT of a Ray cluster's head) cannot be a simulation's Ray, or None if its port
    accepts a TCP connection within ``timeout_s``.

    Checked before the simulation starts because Ray, given a head that is not there, retries for ever inside
    Flower's simulation thread and the command would neither finish nor fail. A port that answers but is not a
    Ray head passes this check (Ray then retries as above)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal as [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT of a Ray cluster's head (e.g. 127.0.0.1:6379), got {address!r}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"no host named {host!r} (name resolution failed)"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:g} s: is the Ray head running (ray start --head)?"
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return f"cannot connect to {host}:{port} ({reason}): is the Ray head running (ray start --head)?"


LOCAL_RAY = {"num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR", "_node_ip_address": "127.0.0.1"}
"""The Ray a simulation starts for itself on this machine kind (2 cores): with one CPU per ClientApp actor, two
actors work at once; no dashboard (nothing reads it); on 127.0.0.1 (:func:`loopback_ray`)."""
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between a local-only Ray and a cluster node (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``,
on by default on Linux). On, Ray replaces a node address of 127.0.0.1 by the machine's routable address
(``services.resolve_ip_for_localhost``) and its GCS server, raylet (node manager and object manager), workers and
agents listen on every interface (measured: ``[::]`` and 192.0.2.2); off, as Ray runs on macOS and Windows,
the node is 127.0.0.1 and every one of them listens there only (``tests/test_ray_loopback.py``)."""


@contextmanager
def loopback_ray() -> Iterator[None]:
    """Within the block, a Ray started by this process is local-only: every server it starts listens on
    127.0.0.1 (the project's rule for servers we start). Its processes take the setting from the environment
    when they start, so it holds for the whole life of a Ray started inside the block."""
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(RAY_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(RAY_LOCAL_ONLY_ENV, None)
        else:
            os.environ[RAY_LOCAL_ONLY_ENV] = saved_env


def backend_config(ray_address: str | None = None, supernode_cpus: float = 1.0) -> dict:
    """Flower's Ray backend settings: ``supernode_cpus`` per ClientApp actor (Flower starts as many actors as the
    cluster's CPUs allow), on a Ray of its own (:data:`LOCAL_RAY`) or on the running cluster at ``ray_address``
    (HOST:PORT of its head; its CPUs are the cluster's, so none are given)."""
    init_args = {"address": ray_address, "logging_level": "ERROR"} if ray_address else dict(LOCAL_RAY)
    return {"client_resources": {"num_cpus": supernode_cpus, "num_gpus": 0.0}, "init_args": init_args}


def simulate(server_app, client_app, num_supernodes: int, ray_address: str | None = None,
             supernode_cpus: float = 1.0) -> None:
    """Flower's ``run_simulation`` of the apps on ``num_supernodes`` simulated nodes, with
    :func:`backend_config` and :func:`one_pass_delivery`. On a Ray cluster every node runs ClientApp actors,
    which import this project from the driver's ``sys.path`` (Flower hands it to the actors): each node needs
    the project and its environment at the same path (docs: README, "A Ray cluster")."""
    from flwr.simulation import run_simulation

    local = contextlib.nullcontext() if ray_address else loopback_ray()
    with local, one_pass_delivery(num_supernodes):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config=backend_config(ray_address, supernode_cpus))


@contextmanager
def one_pass_delivery(n_nodes: int | None = None) -> Iterator[bool]:
    """Within the block, simulations hand out messages with :func:`next_messages` and, given ``n_nodes``, the
    ServerApp pulls replies every :func:`poll_interval` seconds; yields whether it applies (False, Flower's own
    loop, on another Flower version)."""
    if flwr.__version__ != WRITTEN_FOR or vce_api.add_messages_to_queue is not _FLOWER_LOOP:
        yield False
        return
    vce_api.add_messages_to_queue = _one_pass_loop
    if n_nodes is not None:
        InMemoryGrid.__init__.__defaults__ = (poll_interval(n_nodes),)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = _FLOWER_LOOP
        InMemoryGrid.__init__.__defaults__ = _FLOWER_GRID_DEFAULTS


@dataclass
class _KeptPool:
    """The actor pool a :func:`ray_session` keeps between simulations, and the resources its actors hold."""

    pool: Any = None
    resources: dict | None = None

    def drop(self) -> None:
        if self.pool is not None:
            self.pool.terminate_all_actors()
        self.pool = self.resources = None


_SESSION: _KeptPool | None = None


def _kept_build(backend: RayBackend, app_fn) -> None:
    """``RayBackend.build`` that hands a simulation the session's idle actors when they hold the resources
    it asks for (else a new pool, which the session keeps)."""
    session = _SESSION
    if session is None:
        _FLOWER_BUILD(backend, app_fn)
        return
    if session.pool is not None and session.resources == dict(backend.client_resources):
        backend.pool, backend.app_fn = session.pool, app_fn
        return
    session.drop()
    _FLOWER_BUILD(backend, app_fn)
    session.pool, session.resources = backend.pool, dict(backend.client_resources)


def _kept_terminate(backend: RayBackend) -> None:
    """``RayBackend.terminate`` that leaves Ray and the session's actors running for the next simulation; a
    pool with an actor still busy (a simulation that stopped mid-message) is not reused."""
    session = _SESSION
    if session is None or backend.pool is None or backend.pool is not session.pool:
        _FLOWER_TERMINATE(backend)
        return
    if backend.pool._future_to_actor:
        session.drop()


@contextmanager
def ray_session() -> Iterator[bool]:
    """Within the block, simulations share one Ray and one pool of actors (module docstring); the first
    simulation's Ray settings (:func:`backend_config`) hold for all. Yields whether it applies (False on
    another Flower version; nested blocks use the outer session)."""
    global _SESSION
    if _SESSION is not None:
        yield True
        return
    if flwr.__version__ != WRITTEN_FOR or RayBackend.build is not _FLOWER_BUILD:
        yield False
        return
    import ray

    started_here = not ray.is_initialized()
    _SESSION = _KeptPool()
    RayBackend.build, RayBackend.terminate = _kept_build, _kept_terminate
    try:
        yield True
    finally:
        RayBackend.build, RayBackend.terminate = _FLOWER_BUILD, _FLOWER_TERMINATE
        session, _SESSION = _SESSION, None
        session.drop()
        if started_here and ray.is_initialized():
            ray.shutdown()
