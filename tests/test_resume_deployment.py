"""End-to-end: the coordinator's ServerApp process is killed (SIGKILL) during round 2 of a deployed run with a
real SuperLink and real SuperNodes (TLS, authenticated nodes, sites under DP); a new run with ``resume=true``
continues it from its checkpoint under the original run id and finishes. Every site's ledger charges each
training round once, and the rounds the checkpoint held are not trained again.

Three rounds, killed in the second: round 1 is checkpointed (not trained again), round 2 was under way when the
process died (trained by the resumed run, charged once) and round 3 comes after it (the resumed run goes on past
the round it took over). Four rounds killed in the third repeated the first case and the last, at ~25 s a
deployed round."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from client.ledger import SITE_LEDGER_FILE, PrivacyLedger
from server.checkpoint import CHECKPOINT_FOLDER, Checkpoint, CheckpointError
from server.provision import provision
from server.run_record import RunRecord
from simulation.clinics import generate_sites
from tests import deployment as dep
from tests.test_deployment import APP, declared_run_config

pytestmark = pytest.mark.slow
FEDERATION = "hospitals"
SITES = ["clinic_00", "clinic_01", "clinic_02"]
ROUNDS = 3
KILL_IN_ROUND = 2
RUN_TIMEOUT_S = 900


def checkpointed_round(out: Path) -> int:
    try:
        checkpoint = Checkpoint.read(out)
    except CheckpointError:  # read between the arrays and the state file being replaced: try again
        return -1
    return checkpoint.server_round if checkpoint is not None and checkpoint.stage == "training" else 0


def test_a_coordinator_killed_mid_run_resumes_and_finishes_charging_every_round_once(tmp_path):
    kit, sites, home, out = tmp_path / "kit", tmp_path / "sites", tmp_path / "coordinator_home", tmp_path / "out"
    provision(FEDERATION, SITES, kit)
    generate_sites(len(SITES), seed=3, out=sites, patients_per_clinic=30)  # under DP (ε = 3), as simulated
    config = {"num-server-rounds": ROUNDS, "min-nodes": len(SITES), "models": "ann", "out-dir": str(out),
              "fqi-iterations": 0}
    assert set(config) | {"resume"} <= declared_run_config()
    services: list[dep.Service] = []
    try:
        link, _ = dep.start_federation(kit, sites, list(SITES), FEDERATION, home, tmp_path, services)
        first = dep.start_run(APP, FEDERATION, home, config)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while checkpointed_round(out) < KILL_IN_ROUND - 1:  # round 1 checkpointed: round 2 is under way
            assert time.monotonic() < deadline, link.log_text()[-3000:]
            time.sleep(0.5)
        pids = dep.serverapp_pids(link)
        assert len(pids) == 1, pids
        dep._signal(pids[0], dep.signal.SIGKILL)
        killed_at = checkpointed_round(out)
        assert killed_at == KILL_IN_ROUND - 1  # killed in round 2, before its checkpoint
        time.sleep(2)
        assert not dep.serverapp_pids(link)

        second = dep.start_run(APP, FEDERATION, home, {**config, "resume": True})
        status = dep.wait_for_run(home, FEDERATION, second, timeout=RUN_TIMEOUT_S, link=link)
        assert status["status"] == "finished:completed", link.log_text()[-3000:]
    finally:
        for service in reversed(services):
            dep.stop(service)

    record = RunRecord.read(out / "federation.json")
    assert record.run_id == str(first) and second != first  # the original run, continued by a new Flower run
    assert [r["round"] for r in record.models["ann"].rounds] == list(range(1, ROUNDS + 1))
    assert sorted(record.models["ann"].final["per_site"]) == SITES
    assert not (out / CHECKPOINT_FOLDER).exists()
    for site in SITES:
        ledger = PrivacyLedger.open(sites / site / SITE_LEDGER_FILE, 3.0, 1e-5)
        training = Counter(e["round"] for e in ledger.entries if e["phase"] == "training")
        assert training == {r: 1 for r in range(1, ROUNDS + 1)}, (site, training)  # no ε charged twice
        assert {str(e["run_id"]) for e in ledger.entries} == {str(first)}
        assert record.privacy[site].epsilon_spent == pytest.approx(ledger.spent())
