"""End-to-end: a real SuperLink and real SuperNodes on loopback, with TLS and SuperNode authentication.

One federation serves the tests of this module, because a deployed round takes ~25 s: the SuperLink, four
registered hospitals (keys from ``fednano provision``; three with a warm worker, ``client.site_worker``), and one
``flwr run`` of 2 rounds. The fourth hospital
(``DROPPED``) is killed (SIGKILL, as a crash) as soon as it receives its first training message; the run must
complete with the other three, every one of which ends up holding the verified policy bundle, and the run
record names the dropped site. A fifth key (``INTRUDER``) is provisioned but never registered: its SuperNode
is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.policy_store import PolicyStore
from server.provision import provision
from server.run_record import RunRecord
from simulation.clinics import generate_sites
from tests import deployment as dep

APP = Path(__file__).resolve().parents[1]
FEDERATION = "hospitals"
SITES = ["clinic_00", "clinic_01", "clinic_02"]
DROPPED = "clinic_03"
INTRUDER = "intruder"
ROUNDS = 2
PATIENTS_PER_SITE = 30
RUN_TIMEOUT_S = 600
UNREGISTERED_EXIT_CODE = 305  # Flower's code for "Failed to activate SuperNode" (FLOWER_1.42_NOTES.md)


@dataclass
class Deployed:
    """The federation the tests look at, after its run has finished."""

    work: Path
    kit: Path
    sites: Path
    home: Path
    link: dep.Service
    run_id: int
    status: dict
    record: RunRecord | None
    dropped: dep.Service


def declared_run_config() -> set[str]:
    """Keys the app declares in ``[tool.flwr.app.config]`` (Flower refuses overrides of any other)."""
    return set(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def run_config(out: Path, kit: Path) -> dict[str, object]:
    config = {"num-server-rounds": ROUNDS, "min-nodes": len(SITES) + 1, "models": "ann", "out-dir": str(out),
              "signing-key": str(kit / "coordinator" / "policy_signing.key"), "fqi-iterations": 0,
              "release-gate": False}  # the distribution itself is under test here, not the gate
    return {key: value for key, value in config.items() if key in declared_run_config()}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Deployed:
    work = tmp_path_factory.mktemp("deployment")
    kit, sites, home = work / "kit", work / "sites", work / "coordinator_home"
    provision(FEDERATION, [*SITES, DROPPED, INTRUDER], kit)
    generate_sites(len(SITES) + 1, seed=3, out=sites, patients_per_clinic=PATIENTS_PER_SITE)
    services: list[dep.Service] = []
    try:
        link, nodes = dep.start_federation(kit, sites, [*SITES, DROPPED], FEDERATION, home, work, services,
                                           workers=SITES)
        run_id = dep.start_run(APP, FEDERATION, home, run_config(work / "out", kit))
        dep.wait_for_log(nodes[DROPPED], "Receiving: train", timeout=RUN_TIMEOUT_S)
        dep.kill(nodes[DROPPED])
        status = dep.wait_for_run(home, FEDERATION, run_id, timeout=RUN_TIMEOUT_S, link=link)
        record_file = work / "out" / "federation.json"
        record = RunRecord.read(record_file) if record_file.exists() else None
        yield Deployed(work, kit, sites, home, link, run_id, status, record, nodes[DROPPED])
    finally:
        for service in reversed(services):
            dep.stop(service)


@pytest.mark.slow
def test_the_run_completes_with_tls_and_authenticated_supernodes(federation):
    assert federation.status["status"] == "finished:completed", federation.link.log_text()[-3000:]
    assert federation.record.sites == sorted([*SITES, DROPPED])
    assert federation.record.settings["num-server-rounds"] == ROUNDS
    assert [r["round"] for r in federation.record.models["ann"].rounds] == list(range(1, ROUNDS + 1))


@pytest.mark.slow
def test_the_sites_with_a_warm_worker_answered_every_message_through_it(federation):
    """Three sites run ``fednano site-worker`` beside their SuperNode; the dropped site answers in Flower's
    per-message processes (as a site without a worker does)."""
    for name in SITES:
        answered = (federation.work / f"worker_{name}.log").read_text().splitlines()
        assert sum("site worker: train answered in" in line for line in answered) == ROUNDS
        assert any("site worker: query.site_check answered in" in line for line in answered)
    assert not (federation.work / f"worker_{DROPPED}.log").exists()


@pytest.mark.slow
def test_every_remaining_site_trained_every_round_within_its_privacy_budget(federation):
    rounds = federation.record.models["ann"].rounds
    for entry in rounds:
        for site in SITES:
            train = entry["per_site"][site]["train"]
            assert train["num-examples"] > 0 and train["steps"] > 0
            assert 0 < train["epsilon"] <= train["epsilon-budget"] == 3.0
    for site in SITES:
        ledger = json.loads((federation.sites / site / ".fednano" / "privacy_ledger.json").read_text())
        assert ledger  # the site's own record of what it spent, on its own disk
        privacy = federation.record.privacy[site]
        assert privacy.epsilon_after["training"] == pytest.approx(rounds[-1]["per_site"][site]["train"]["epsilon"])
        assert privacy.epsilon_spent == pytest.approx(max(e["epsilon_after"] for e in ledger["entries"]))


@pytest.mark.slow
def test_every_remaining_site_holds_the_verified_policy_bundle_of_the_run(federation):
    policy = federation.record.policy
    assert policy, "the run record has no policy: was the run config's signing-key passed and the phase run?"
    for site in SITES:
        store = PolicyStore(federation.sites / site / ".fednano" / "policy",
                            federation.kit / "sites" / site / "policy_signing.pub")
        manifest = store.current()  # verifies the installed bundle again against the site's trust key
        assert manifest is not None, site
        assert manifest.version == policy["version"]
        assert manifest.run_id == str(federation.run_id)


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_named_in_the_run_record_and_the_others_finish(federation):
    assert federation.dropped.process.returncode == -9  # killed by the test, not exited on its own
    rounds = federation.record.models["ann"].rounds
    first = rounds[0]
    assert DROPPED in first["failures"], first["failures"]
    assert "train" not in first["per_site"].get(DROPPED, {})
    for entry in rounds:
        assert sorted(s for s, v in entry["per_site"].items() if "train" in v) == SITES
    assert "training" not in federation.record.privacy[DROPPED].releases  # it planned, then trained nothing
    assert sorted(federation.record.models["ann"].final["per_site"]) == SITES


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    intruder = dep.start_supernode(federation.kit / "sites" / INTRUDER, federation.sites / SITES[0],
                                   federation.link.port, federation.work, INTRUDER)
    try:
        code = intruder.process.wait(timeout=120)
    finally:
        dep.stop(intruder)
    # Flower reports its exit code 305 in the log; the process itself exits 1 (an exit status is < 256).
    assert code != 0 and f"Exit Code: {UNREGISTERED_EXIT_CODE}" in intruder.log_text(), intruder.log_text()
    assert "Failed to activate SuperNode" in intruder.log_text()
    listed = dep.flwr(federation.home, "supernode", "list", FEDERATION)
    assert len(listed["nodes"]) == len(SITES) + 1  # the intruder's key never became a node


@pytest.mark.slow
def test_fednano_status_shows_the_run_its_rounds_sites_and_epsilon(federation):
    done = subprocess.run(
        [sys.executable, "-m", "fednano.cli", "status", FEDERATION, "--record", str(federation.work / "out"),
         "--width", "200"],
        env=dep.flower_env(federation.home), cwd=APP, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(federation.run_id) in done.stdout and "finished:completed" in done.stdout
    for site in SITES:
        epsilon = federation.record.privacy[site].epsilon_spent
        assert f"{epsilon:.2f}" in done.stdout
    assert f"{DROPPED}" in done.stdout and "failed" in done.stdout


def test_stop_ends_the_process_and_descendants_that_left_its_session(tmp_path):
    """The SuperExec starts app processes in sessions of their own: stopping by PID must still reach them."""
    script = "setsid sleep 300 & echo $! > grandchild; sleep 300 & wait"
    service = dep.start("tree", ["sh", "-c", script], dict(os.environ), tmp_path, 0)
    deadline = time.monotonic() + 10
    while not (tmp_path / "grandchild").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    tree = dep.descendants(service.process.pid)
    grandchild = int((tmp_path / "grandchild").read_text())
    assert grandchild in tree and len(tree) == 2
    assert dep.stop(service) == -15  # SIGTERM ended the shell
    time.sleep(0.2)
    for pid in tree:
        assert not alive(pid), pid


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie awaiting its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
