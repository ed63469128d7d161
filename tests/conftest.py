"""Test-wide settings: the suite never writes fednano state into the user's home."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

from tests.browser import chrome  # noqa: F401  (the headless-Chromium fixture of the screens' tests)

_STATE_DIR_ENV = "FEDNANO_STATE_DIR"  # client.ledger.STATE_DIR_ENV, not imported: conftest loads before any test


def pytest_configure(config) -> None:
    """Every ledger opened by any test (in this process, its Ray workers and its subprocesses) keeps its head
    in a temporary state folder, not in ``~/.local/state/fednano``; tests that check the head store set their
    own folder on top. Set before any test starts, so processes started later inherit it."""
    state = tempfile.mkdtemp(prefix="fednano-test-state-")
    config._fednano_state = (state, os.environ.get(_STATE_DIR_ENV))
    os.environ[_STATE_DIR_ENV] = state


def pytest_unconfigure(config) -> None:
    state, before = getattr(config, "_fednano_state", (None, None))
    if state is None:
        return
    shutil.rmtree(state, ignore_errors=True)
    if before is None:
        os.environ.pop(_STATE_DIR_ENV, None)
    else:
        os.environ[_STATE_DIR_ENV] = before


class _SharedRay:
    """The one :func:`simulation.flower_runtime.ray_session` the tests asking for ``shared_ray`` run in."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None
        self.applied = False

    def open(self) -> bool:
        if self._stack is None:
            from simulation.flower_runtime import ray_session

            stack = contextlib.ExitStack()
            self.applied = stack.enter_context(ray_session())
            self._stack = stack
        return self.applied

    def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()  # the pool's actors end, and Ray if the session started it


_SHARED_RAY = _SharedRay()
SHARED_RAY = "shared_ray"


@pytest.fixture(scope="module")
def shared_ray():
    """One Ray, and one pool of ClientApp actors, for every Flower simulation of the tests that ask for it, in
    every module (:func:`simulation.flower_runtime.ray_session`): Flower's own backend starts and stops Ray for
    each simulation, ~15 s on this machine each time, and fresh actors import the client code again. For
    simulations on this machine's local Ray (not a cluster's address). :func:`pytest_collection_modifyitems`
    runs the modules with such tests one after another, and :func:`pytest_runtest_teardown` stops Ray after the
    last of them, so no other test meets it (tests that start a Ray of their own, or check that none is left
    running) and the other tests (deployed federations in subprocesses) do not share the 2 cores with it."""
    return _SHARED_RAY.open()


def _on_shared_ray(item, modules: set) -> bool:
    return item.nodeid.split("::")[0] in modules


@pytest.hookimpl(trylast=True)  # after pytest's own ordering (its parametrised module fixtures' grouping)
def pytest_collection_modifyitems(config, items) -> None:
    """The modules with a test on the shared Ray run last, whole and in their usual order (a stable sort keeps
    every other test where it was)."""
    modules = {item.nodeid.split("::")[0] for item in items if SHARED_RAY in item.fixturenames}
    config._fednano_shared_ray_modules = modules
    items[:] = sorted(items, key=lambda item: _on_shared_ray(item, modules))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last of those modules' tests (their fixtures torn down), Ray stops."""
    try:
        return (yield)
    finally:
        modules = getattr(item.config, "_fednano_shared_ray_modules", set())
        if nextitem is None or not _on_shared_ray(nextitem, modules):
            _SHARED_RAY.close()


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp process (``Message()`` needs it), for server code run in a test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def personalising_clinic(tmp_path_factory) -> tuple:
    """A world of 2 clinics × 80 patients under DP (ε = 3), fresh for each module: ``(root, first clinic's name)``
    for ``tests.personalising_site.personalise_request``."""
    from simulation.clinics import SitePrivacy, generate_sites

    root = tmp_path_factory.mktemp("personal")
    world = generate_sites(2, 5, root / "sites", patients_per_clinic=80,
                           privacy=SitePrivacy(dp=True, epsilon=3.0, delta=1e-5))
    return root, world.clinics[0].name


@pytest.fixture(scope="module")
def plain_and_dp_site(tmp_path_factory) -> dict:
    """One simulated clinic without DP and one under DP (ε = 3), 40 patients each, fresh for each module:
    ``{"plain": folder, "dp": folder}``."""
    from simulation.clinics import SitePrivacy, generate_sites

    out = tmp_path_factory.mktemp("sites")
    plain = generate_sites(1, 3, out / "plain", patients_per_clinic=40, privacy=SitePrivacy(dp=False))
    private = generate_sites(1, 3, out / "dp", patients_per_clinic=40, privacy=SitePrivacy(dp=True, epsilon=3.0))
    return {"plain": out / "plain" / plain.clinics[0].name, "dp": out / "dp" / private.clinics[0].name}
