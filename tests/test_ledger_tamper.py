"""The privacy ledger is tamper-evident: a missing, emptied, truncated or edited ledger is refused, never reset.

Issue 14 item 4: deleting the ledger, or replacing it with an empty valid one, took ``spent()`` from 2.999
(refuses to train) to 0.0 (trains), and editing step counts under-counted.
"""

from __future__ import annotations

import json
import shutil

import pytest

from client.ledger import BudgetExhausted, LedgerError, PrivacyLedger

DELTA = 1e-5
SIGMA, RATE, STEPS = 1.0, 1 / 13, 13
BUDGET = 3.0


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """The head store of this test, apart from the site folder."""
    state = tmp_path / "state"
    monkeypatch.setenv("FEDNANO_STATE_DIR", str(state))
    return state


@pytest.fixture
def site(tmp_path, state_dir):
    folder = tmp_path / "hospital"
    folder.mkdir()
    return folder


@pytest.fixture
def path(site):
    return site / ".fednano" / "privacy_ledger.json"


def exhaust(path) -> PrivacyLedger:
    """The issue's site: ε = 3.05 spent of 3.0 after one round (refuses to train)."""
    ledger = PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=1)
    assert round(ledger.spent(), 2) == 3.05
    with pytest.raises(BudgetExhausted):
        ledger.check_affordable(SIGMA, RATE, STEPS)
    return ledger


def test_a_deleted_ledger_is_refused_naming_the_file_and_what_to_do(path):
    exhaust(path)
    path.unlink()
    with pytest.raises(LedgerError) as refused:
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    message = str(refused.value)
    assert str(path) in message and "missing" in message
    assert "1 entry, 13 steps, ε=3.0508 spent at δ=1e-05 in budget 1" in message
    assert f"Restore {path} from a backup" in message
    assert f"fednano ledger new-budget {path.parent.parent} --reason" in message


def test_a_deleted_ledger_folder_is_refused_too(path):
    exhaust(path)
    shutil.rmtree(path.parent)  # rm -r .fednano
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)


def test_a_ledger_replaced_by_an_empty_valid_one_is_refused(path, tmp_path):
    exhaust(path)
    empty = PrivacyLedger.open(tmp_path / "elsewhere" / "privacy_ledger.json", epsilon_budget=BUDGET, delta=DELTA)
    empty.record(SIGMA, RATE, 1, run_id=9, server_round=1)
    shutil.copy(empty.path, path)
    with pytest.raises(LedgerError, match="another ledger"):
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)


def test_a_ledger_whose_step_counts_were_edited_down_is_refused(path):
    exhaust(path)
    state = json.loads(path.read_text())
    state["entries"][0]["steps"] = 1
    state["history"][0][2] = 1
    path.write_text(json.dumps(state))
    with pytest.raises(LedgerError, match="entry 0 was edited"):
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
