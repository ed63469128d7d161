"""The privacy ledger is tamper-evident: a missing, emptied, truncated or edited ledger is refused, never reset.

Issue 14 item 4: deleting the ledger, or replacing it with an empty valid one, took ``spent()`` from 2.999
(refuses to train) to 0.0 (trains), and editing step counts under-counted.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from client.ledger import (
    STATE_DIR_ENV,
    BudgetExhausted,
    LedgerError,
    LedgerHeadStore,
    PrivacyLedger,
    default_state_dir,
)

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
    with pytest.raises(LedgerError, match="missing") as refused:
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    assert refused.value.__context__ is None  # not reported "during handling of FileNotFoundError(.fednano)"


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


def head_file(state_dir, path):
    return LedgerHeadStore(state_dir).file_for(path.absolute())


def edit(path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state, indent=2))


def two_rounds(path) -> PrivacyLedger:
    ledger = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=1)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=2)
    return ledger


# --- refused on open, on spent, on record -------------------------------------------------------------------


def test_an_edit_after_opening_is_refused_by_spent_epsilon_after_check_affordable_and_record(path):
    ledger = two_rounds(path)
    edit(path, lambda s: s["entries"][0].update(steps=1))
    for read in (ledger.spent, ledger.remaining, lambda: ledger.epsilon_after(SIGMA, RATE, 1),
                 lambda: ledger.check_affordable(SIGMA, RATE, 1)):
        with pytest.raises(LedgerError, match="entry 0 was edited"):
            read()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=r"entry 0 was edited.*Unrecorded training .* in run 2 round 1"):
        ledger.record(SIGMA, RATE, STEPS, run_id=2, server_round=1)
    assert path.read_bytes() == before


def test_a_ledger_deleted_after_opening_is_refused_by_spent_and_by_record_which_does_not_recreate_it(path):
    ledger = two_rounds(path)
    path.unlink()
    with pytest.raises(LedgerError, match="missing"):
        ledger.spent()
    with pytest.raises(LedgerError, match="missing"):
        ledger.record(SIGMA, RATE, STEPS, run_id=2, server_round=1)
    assert not path.exists()


def test_the_last_entry_removed_with_a_valid_chain_is_behind_its_head(path):
    two_rounds(path)
    edit(path, lambda s: s.update(entries=s["entries"][:1], history=[[SIGMA, RATE, STEPS]],
                                  head=s["entries"][1]["prev"]))
    with pytest.raises(LedgerError, match=r"is behind: it holds 1 entry but its head kept in .* says 2 entries, "
                                          r"26 steps"):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)


def test_an_old_backup_put_back_is_behind_its_head(path, tmp_path):
    ledger = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=1)
    backup = tmp_path / "backup.json"
    shutil.copy(path, backup)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=2)
    shutil.copy(backup, path)
    with pytest.raises(LedgerError, match="is behind"):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)


def test_a_backup_at_least_as_new_as_the_head_restores_the_site(path, tmp_path):
    two_rounds(path)
    backup = tmp_path / "backup.json"
    shutil.copy(path, backup)
    path.unlink()
    shutil.copy(backup, path)
    assert round(PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA).spent(), 2) == 3.71


def test_a_ledger_ahead_of_its_head_after_a_crash_between_the_two_writes_is_accepted_and_the_head_moves_on(
        path, state_dir):
    ledger = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=1)
    old_head = head_file(state_dir, path).read_bytes()
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=2)
    head_file(state_dir, path).write_bytes(old_head)  # as if the process died after writing the ledger

    reopened = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    assert len(reopened.entries) == 2
    assert json.loads(head_file(state_dir, path).read_text())["entries"] == 2


def test_a_rewritten_chain_is_refused_by_the_head(path):
    """An edit whose hashes were all recomputed passes the file's own chain, not its head."""
    import client.ledger_file as module

    two_rounds(path)
    state = json.loads(path.read_text())
    chain = module.Chain({k: state[k] for k in module.HEADER_KEYS}, [], [])
    for entry in state["entries"]:
        chain.append({**entry, "steps": 1})
    path.write_text(json.dumps(chain.to_file()))
    with pytest.raises(LedgerError, match=r"was rewritten: its first 2 entries no longer hash to the head"):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)


def test_a_corrupt_head_is_refused_naming_the_head_file(path, state_dir):
    two_rounds(path)
    head_file(state_dir, path).write_text('{"schema_version": 1, "entries": 2}')
    with pytest.raises(LedgerError) as refused:
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    assert f"ledger head {head_file(state_dir, path)}" in str(refused.value) and "corrupt" in str(refused.value)


# --- an explicit new budget ---------------------------------------------------------------------------------


def test_a_new_budget_archives_the_old_ledger_logs_who_when_why_and_starts_from_zero(path, state_dir):
    exhaust(path)
    old = path.read_bytes()
    site_id = PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA).site_id

    fresh = PrivacyLedger.start_new_budget(path, BUDGET, DELTA, reason="ethics approval 2025-17 for a new cohort",
                                           by="dr.who")

    assert fresh.spent() == 0.0 and fresh.entries == [] and fresh.budget_number == 2 and fresh.site_id == site_id
    reset = fresh.reset
    assert reset["by"] == "dr.who" and reset["reason"] == "ethics approval 2025-17 for a new cohort"
    assert reset["previous"]["ledger"] == "consistent with its head"
    assert reset["previous"]["entries"] == 1 and reset["previous"]["epsilon"] == pytest.approx(3.0508, abs=1e-4)
    archived = path.parent / "ledger-archive"
    assert [p.read_bytes() for p in archived.iterdir()] == [old]  # moved, byte for byte, never deleted
    assert reset["archived"] == str(next(archived.iterdir()))
    head = json.loads(head_file(state_dir, path).read_text())
    assert head["budget_number"] == 2 and head["entries"] == 0 and head["resets"] == [reset]
    reopened = PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    assert reopened.spent() == 0.0 and reopened.reset == reset
    reopened.check_affordable(SIGMA, RATE, 1)  # trains again, knowingly


def test_a_new_budget_is_the_way_on_from_a_missing_a_folder_or_an_edited_ledger(path):
    exhaust(path)
    path.unlink()
    first = PrivacyLedger.start_new_budget(path, BUDGET, DELTA, reason="ledger lost in a disk failure")
    assert first.reset["previous"]["ledger"] == "missing" and first.reset["archived"] is None
    assert first.reset["previous"]["head"]["epsilon"] == pytest.approx(3.0508, abs=1e-4)
    first.record(SIGMA, RATE, 1, run_id=2, server_round=1)

    path.unlink()
    path.mkdir()
    second = PrivacyLedger.start_new_budget(path, BUDGET, DELTA, reason="a folder was in the ledger's place")
    assert second.reset["previous"]["ledger"].startswith("refused: privacy ledger") and second.budget_number == 3
    assert (path.parent / "ledger-archive").is_dir() and not path.is_dir()

    second.record(SIGMA, RATE, 1, run_id=3, server_round=1)
    edit(path, lambda s: s["entries"][0].update(steps=100))
    third = PrivacyLedger.start_new_budget(path, BUDGET, DELTA, reason="edited by hand")
    assert "entry 0 was edited" in third.reset["previous"]["ledger"]
    assert [r["reason"] for r in third.head().resets] == [
        "ledger lost in a disk failure", "a folder was in the ledger's place", "edited by hand"]
    assert len(list((path.parent / "ledger-archive").iterdir())) == 2


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_a_new_budget_needs_a_reason_and_changes_nothing_without_one(path, reason):
    exhaust(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="needs a reason"):
        PrivacyLedger.start_new_budget(path, BUDGET, DELTA, reason=reason)
    assert path.read_bytes() == before


def test_a_new_delta_needs_a_new_budget(path):
    exhaust(path)
    with pytest.raises(LedgerError, match=r"delta=1e-05 but the site's delta is 1e-06.*fednano ledger new-budget"):
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=1e-6)
    fresh = PrivacyLedger.start_new_budget(path, BUDGET, 1e-6, reason="δ lowered to 1e-6 by the DPO")
    assert PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=1e-6).spent() == 0.0 == fresh.spent()


# --- where heads are kept -----------------------------------------------------------------------------------


def test_the_suites_own_state_folder_is_temporary_never_the_home_folder():
    import os
    import tempfile

    assert os.environ[STATE_DIR_ENV].startswith(tempfile.gettempdir())
    assert not str(default_state_dir()).startswith(str(Path.home()))


def test_the_head_store_is_the_explicit_folder_then_the_environment_then_xdg_state_home(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "env"))
    assert LedgerHeadStore().folder == tmp_path / "env" / "ledger-heads"
    assert LedgerHeadStore(tmp_path / "given").folder == tmp_path / "given" / "ledger-heads"
    monkeypatch.delenv(STATE_DIR_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "fednano"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # the XDG spec says: ignore a relative path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "fednano"


def test_heads_are_one_private_file_per_ledger_path_and_a_site_without_ledger_writes_nothing(path, state_dir):
    assert PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA).spent() == 0.0
    assert not state_dir.exists() and not path.parent.exists()
    for server_round in (1, 2, 3):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA).record(SIGMA, RATE, 1, run_id=1,
                                                                          server_round=server_round)
    heads = list((state_dir / "ledger-heads").iterdir())
    assert heads == [head_file(state_dir, path)]
    assert stat.S_IMODE(heads[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((state_dir / "ledger-heads").stat().st_mode) == 0o700


def test_sites_made_anew_with_their_own_head_store_start_fresh_as_simulate_needs(tmp_path):
    """``fednano simulate`` deletes and regenerates OUT/sites every run: with their head store inside OUT/sites
    the new clinics are new sites; with a head store that outlives them, the same path is refused."""
    sites = tmp_path / "OUT" / "sites"
    ledger_path = sites / "clinic_00" / ".fednano" / "privacy_ledger.json"
    for run in (1, 2):
        shutil.rmtree(sites, ignore_errors=True)
        ledger = PrivacyLedger.open(ledger_path, BUDGET, DELTA, state_dir=sites / ".ledger-heads")
        assert ledger.spent() == 0.0, f"run {run}"
        ledger.record(SIGMA, RATE, STEPS, run_id=run, server_round=1)

    lasting = tmp_path / "lasting-state"
    PrivacyLedger.open(ledger_path, BUDGET, DELTA, state_dir=lasting).spent()  # registers the existing ledger
    shutil.rmtree(sites)
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger.open(ledger_path, BUDGET, DELTA, state_dir=lasting)


def test_the_explicit_state_dir_wins_over_the_environment(path, state_dir, tmp_path):
    ledger = PrivacyLedger.open(path, BUDGET, DELTA, state_dir=tmp_path / "node-config-state")
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=1)
    assert (tmp_path / "node-config-state" / "ledger-heads").is_dir() and not state_dir.exists()


# --- the version-1 format -----------------------------------------------------------------------------------


def write_version_1(path, steps=(13, 13)) -> None:
    """A ledger as fednano wrote it before the chain (schema_version 1)."""
    entries, history = [], []
    for i, n in enumerate(steps):
        history = [[SIGMA, RATE, sum(steps[: i + 1])]]
        entries.append({"run_id": 1, "round": i + 1, "steps": n, "noise_multiplier": SIGMA, "sample_rate": RATE,
                        "epsilon_after": 0.0, "epsilon_budget": 10.0, "utc": "2025-01-01T12:00:00+00:00"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "delta": DELTA, "entries": entries, "history": history}))


def test_a_version_1_ledger_is_chained_when_opened_keeping_its_spent_epsilon_and_the_old_file(path, state_dir):
    write_version_1(path)
    old = path.read_bytes()
    ledger = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    assert ledger.history == [(SIGMA, RATE, 26)] and round(ledger.spent(), 2) == 3.71
    state = json.loads(path.read_text())
    assert state["schema_version"] == 2 and state["migrated_from"] == 1 and state["budget_number"] == 1
    assert [e["phase"] for e in state["entries"]] == ["", ""]
    assert [p.read_bytes() for p in (path.parent / "ledger-archive").iterdir()] == [old]
    assert head_file(state_dir, path).exists()
    path.unlink()
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)


def test_a_version_1_file_where_the_head_store_knows_a_version_2_ledger_is_refused(path):
    two_rounds(path)
    write_version_1(path, steps=(1,))
    with pytest.raises(LedgerError, match="is a version-1 file, but its head .* an old copy or a replacement"):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)


def test_a_version_1_ledger_whose_entries_and_history_disagree_is_refused_not_migrated(path):
    write_version_1(path)
    edit(path, lambda s: s["entries"][0].update(steps=1))
    with pytest.raises(LedgerError, match="history .* is not the entries' steps merged"):
        PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)


# --- the phase label ----------------------------------------------------------------------------------------


def test_each_entry_keeps_the_phase_that_spent_it(path):
    ledger = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    ledger.record(2.0, 1.0, 1, run_id=1, server_round=0, phase="statistics")
    accountant = ledger.accountant()
    accountant.history = [*accountant.history, (SIGMA, RATE, STEPS)]
    ledger.record_from_accountant(accountant, run_id=1, server_round=1, phase="training")
    ledger.record(SIGMA, RATE, 1, run_id=1, server_round=2)
    reopened = PrivacyLedger.open(path, epsilon_budget=10.0, delta=DELTA)
    assert [e["phase"] for e in reopened.entries] == ["statistics", "training", ""]
    with pytest.raises(ValueError, match="phase must be a string"):
        ledger.record(SIGMA, RATE, 1, run_id=1, server_round=3, phase=None)


# --- siblings: what else could under-count ------------------------------------------------------------------


@pytest.mark.parametrize("step", [(True, RATE, 1), (SIGMA, True, 1), (SIGMA, RATE, True), (float("nan"), RATE, 1),
                                  (SIGMA, float("nan"), 1), (SIGMA, RATE, -1), (SIGMA, RATE, 0)],
                         ids=["bool-noise", "bool-rate", "bool-steps", "nan-noise", "nan-rate", "negative", "zero"])
def test_a_step_that_is_no_real_dp_sgd_step_is_refused_before_anything_is_written(path, step):
    ledger = PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    with pytest.raises(ValueError):
        ledger.record(*step, run_id=1, server_round=1)
    assert not path.exists()


def test_a_budget_raised_in_site_toml_keeps_the_spent_epsilon_and_the_budget_in_force_in_each_entry(path):
    exhaust(path)
    raised = PrivacyLedger.open(path, epsilon_budget=6.0, delta=DELTA)
    assert round(raised.spent(), 2) == 3.05  # raising the budget spends nothing and forgets nothing
    raised.record(SIGMA, RATE, STEPS, run_id=2, server_round=1)
    assert [e["epsilon_budget"] for e in PrivacyLedger.open(path, 6.0, DELTA).entries] == [BUDGET, 6.0]
    edit(path, lambda s: s["entries"][0].update(epsilon_budget=6.0))  # pretending it was always 6
    with pytest.raises(LedgerError, match="entry 0 was edited"):
        PrivacyLedger.open(path, epsilon_budget=6.0, delta=DELTA)


def test_a_relative_ledger_path_names_one_file_whatever_the_working_folder_later(site, monkeypatch, tmp_path):
    monkeypatch.chdir(site)
    ledger = PrivacyLedger.open(".fednano/privacy_ledger.json", epsilon_budget=10.0, delta=DELTA)
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=1)
    monkeypatch.chdir(tmp_path)
    assert ledger.path == site / ".fednano" / "privacy_ledger.json" and len(ledger.entries) == 1
    ledger.record(SIGMA, RATE, STEPS, run_id=1, server_round=2)
    assert len(PrivacyLedger.open(site / ".fednano" / "privacy_ledger.json", 10.0, DELTA).entries) == 2
