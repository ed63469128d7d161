"""Several processes recording into one site's ledger at once lose no training: writers take turns."""

from __future__ import annotations

import multiprocessing

import pytest

from client.ledger import PrivacyLedger

DELTA = 1e-5
WRITERS, RECORDS = 4, 5


def record_many(path: str, writer: int, start) -> None:
    start.wait()
    for server_round in range(RECORDS):
        ledger = PrivacyLedger.open(path, epsilon_budget=1e3, delta=DELTA)
        ledger.record(1.0, 0.01, writer + 1, run_id=f"writer-{writer}", server_round=server_round)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDNANO_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_concurrent_writers_keep_every_entry_and_every_step(tmp_path, state_dir):
    path = tmp_path / "site" / ".fednano" / "privacy_ledger.json"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(WRITERS)
    writers = [context.Process(target=record_many, args=(str(path), w, start)) for w in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [p.exitcode for p in writers] == [0] * WRITERS
    ledger = PrivacyLedger.open(path, epsilon_budget=1e3, delta=DELTA)
    assert len(ledger.entries) == WRITERS * RECORDS
    assert ledger.history == [(1.0, 0.01, RECORDS * sum(range(1, WRITERS + 1)))]  # 5 × (1+2+3+4) = 50 steps
    assert sorted(e["run_id"] for e in ledger.entries) == sorted(f"writer-{w}" for w in range(WRITERS)
                                                                 for _ in range(RECORDS))
