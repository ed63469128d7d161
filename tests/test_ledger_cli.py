"""``fednano ledger status`` and ``fednano ledger new-budget``: what a site sees, and a reset only on purpose."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from client.ledger import SITE_LEDGER_FILE, PrivacyLedger
from fednano.cli import app

runner = CliRunner()
DELTA, BUDGET = 1e-5, 3.0


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDNANO_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def site(tmp_path, state_dir):
    folder = tmp_path / "hospital"
    folder.mkdir()
    (folder / "site.toml").write_text('[site]\nname = "hospital"\n\n[privacy]\ndp = true\nepsilon = 3.0\n'
                                      "delta = 1e-5\n")
    return folder


def trained(site) -> PrivacyLedger:
    ledger = PrivacyLedger.open(site / SITE_LEDGER_FILE, BUDGET, DELTA)
    ledger.record(1.0, 1 / 13, 13, run_id=7, server_round=1, phase="training")
    return ledger


def test_the_app_and_the_cli_agree_on_where_a_sites_ledger_lives(tmp_path):
    from client.dp import SiteDP

    terms = SiteDP.of(tmp_path, {"privacy": {"dp": True, "epsilon": BUDGET, "delta": DELTA}}, state_dir=tmp_path / "s")
    assert terms.ledger.path == (tmp_path / SITE_LEDGER_FILE).resolve()


def test_status_of_a_site_that_has_not_trained_says_so_and_writes_nothing(site, state_dir):
    result = runner.invoke(app, ["ledger", "status", str(site)])
    assert result.exit_code == 0, result.output
    assert "no ledger yet" in result.output and "ε=0.0000 of 3 at δ=1e-05, 3.0000 left" in result.output
    assert not (site / ".fednano").exists() and not state_dir.exists()


def test_status_shows_spent_and_left_entries_phases_and_a_good_chain(site):
    trained(site)
    result = runner.invoke(app, ["ledger", "status", str(site)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "budget   1, the site's first" in lines
    assert "spent    ε=3.0508 of 3 at δ=1e-05, 0.0000 left" in lines
    assert "entries  1, 13 steps; phases: training" in lines
    assert any(line.startswith("chain    OK: hash chain intact, head matches (1 entry") for line in lines)


def test_status_of_a_tampered_ledger_exits_1_naming_what_is_wrong_and_what_to_do(site):
    trained(site)
    path = site / SITE_LEDGER_FILE
    path.write_text(path.read_text().replace('"steps": 13', '"steps": 1'))
    result = runner.invoke(app, ["ledger", "status", str(site)])
    assert result.exit_code == 1
    assert f"chain    REFUSED: privacy ledger {path} is corrupt: entry 0 was edited" in result.output
    assert f"fednano ledger new-budget {site} --reason" in result.output


def test_new_budget_needs_a_reason(site):
    trained(site)
    assert runner.invoke(app, ["ledger", "new-budget", str(site)]).exit_code == 2
    blank = runner.invoke(app, ["ledger", "new-budget", str(site), "--reason", "  "])
    assert blank.exit_code == 2 and "--reason" in blank.output
    assert round(PrivacyLedger.open(site / SITE_LEDGER_FILE, BUDGET, DELTA).spent(), 2) == 3.05


def test_new_budget_archives_logs_and_restarts_from_zero_and_status_shows_the_reset(site, state_dir):
    trained(site)
    (site / SITE_LEDGER_FILE).unlink()
    assert runner.invoke(app, ["ledger", "status", str(site)]).exit_code == 1

    result = runner.invoke(app, ["ledger", "new-budget", str(site), "--reason", "disk sdb lost; DPO ticket 4411",
                                 "--by", "j.doe"])

    assert result.exit_code == 0, result.output
    assert "budget 2 started" in result.output and "by j.doe: disk sdb lost; DPO ticket 4411" in result.output
    assert "old ledger missing; its head said ε=3.0508 after 1 entry; no file to archive" in result.output
    status = runner.invoke(app, ["ledger", "status", str(site)])
    assert status.exit_code == 0, status.output
    assert "spent    ε=0.0000 of 3 at δ=1e-05, 3.0000 left" in status.output
    assert "budget   2, started" in status.output
    assert "reset    " in status.output and "disk sdb lost; DPO ticket 4411; old ledger missing" in status.output
    ledger = json.loads((site / SITE_LEDGER_FILE).read_text())
    assert ledger["budget_number"] == 2 and ledger["reset"]["by"] == "j.doe" and ledger["entries"] == []


def test_new_budget_moves_an_existing_ledger_into_the_archive(site):
    trained(site)
    old = (site / SITE_LEDGER_FILE).read_bytes()
    result = runner.invoke(app, ["ledger", "new-budget", str(site / SITE_LEDGER_FILE), "--reason", "new cohort"])
    assert result.exit_code == 0, result.output
    archived = list((site / ".fednano" / "ledger-archive").iterdir())
    assert [p.read_bytes() for p in archived] == [old]
    assert f"archived to {archived[0]}" in result.output


def test_the_state_dir_option_and_budget_options_are_used(site, tmp_path):
    (site / "site.toml").write_text('[site]\nname = "hospital"\n')
    missing = runner.invoke(app, ["ledger", "status", str(site)])
    assert missing.exit_code == 2 and "--epsilon" in missing.output
    result = runner.invoke(app, ["ledger", "new-budget", str(site), "--reason", "first budget", "--epsilon", "2",
                                 "--delta", "1e-6", "--state-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "elsewhere" / "ledger-heads").iterdir())) == 1
    status = runner.invoke(app, ["ledger", "status", str(site), "--epsilon", "2", "--delta", "1e-6",
                                 "--state-dir", str(tmp_path / "elsewhere")])
    assert status.exit_code == 0 and "ε=0.0000 of 2 at δ=1e-06" in status.output
