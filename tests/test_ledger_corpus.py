"""Corrupted-ledger corpus (``tests/corpus/ledgers``): every case is refused with its own error, never reset.

Each case starts from a site whose valid 3-entry ledger (``baseline.json``, ε = 3.79 at δ = 1e-5) has been
opened once, so the head store knows it, unless the case says otherwise; then the case replaces the ledger
(a corrupted file, a link, a folder, nothing) and opening it must raise :class:`LedgerError` naming the
file and containing the case's words, leaving what is there untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from client.ledger import SITE_LEDGER_FILE, LedgerError, PrivacyLedger

CORPUS = Path(__file__).parent / "corpus" / "ledgers"
CASES = json.loads((CORPUS / "cases.json").read_text(encoding="utf-8"))
DELTA, BUDGET = 1e-5, 10.0


def test_the_corpus_holds_at_least_30_cases_each_with_a_file_or_a_way_to_make_it():
    assert len(CASES) >= 30 and len({c["case"] for c in CASES}) == len(CASES)
    for case in CASES:
        assert (case["file"] is None) == (case["how"] != "file"), case["case"]
        assert case["file"] is None or (CORPUS / case["file"]).is_file(), case["case"]


def test_the_baseline_is_a_valid_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDNANO_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / SITE_LEDGER_FILE
    path.parent.mkdir()
    shutil.copy(CORPUS / "baseline.json", path)
    ledger = PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    assert ledger.history == [(1.0, 1 / 13, 26), (1.5, 0.1, 5)]
    assert ledger.spent() == pytest.approx(ledger.entries[-1]["epsilon_after"]) and round(ledger.spent(), 2) == 3.79


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_every_corrupted_ledger_is_refused_naming_the_file_and_what_is_wrong(tmp_path, monkeypatch, case):
    monkeypatch.setenv("FEDNANO_STATE_DIR", str(tmp_path / "state"))
    site = tmp_path / "site"
    path = site / SITE_LEDGER_FILE
    path.parent.mkdir(parents=True)
    shutil.copy(CORPUS / "baseline.json", path)
    if case["head_known"]:
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)
    path.unlink()
    if case["how"] == "file":
        shutil.copy(CORPUS / case["file"], path)
    elif case["how"] == "symlink":
        shutil.copy(CORPUS / "baseline.json", tmp_path / "copy.json")
        path.symlink_to(tmp_path / "copy.json")
    elif case["how"] == "folder":
        path.mkdir()
    before = _snapshot(site)

    with pytest.raises(LedgerError) as refused:
        PrivacyLedger.open(path, epsilon_budget=BUDGET, delta=DELTA)

    message = str(refused.value)
    assert case["expected"] in message, message
    assert str(path) in message
    assert _snapshot(site) == before  # nothing reset, nothing repaired, nothing archived


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else "<folder>" if p.is_dir()
                                         else p.read_bytes()) for p in sorted(folder.rglob("*"))}
