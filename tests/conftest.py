"""Test-wide settings: the suite never writes fednano state into the user's home."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def shared_ray():
    """One Ray, and one pool of ClientApp actors, for every Flower simulation of the module that asks for it
    (:func:`simulation.flower_runtime.ray_session`): Flower's own backend starts and stops Ray for each
    simulation, ~15 s on this machine each time. For modules whose simulations all use this machine's local Ray
    (not a cluster's address); Ray is shut down when the module ends."""
    from simulation.flower_runtime import ray_session

    with ray_session() as applied:
        yield applied
