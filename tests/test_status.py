"""`fednano status`: Flower's run list, and rounds, participation and ε from a run record.

The record below has the shape ``server.run_record.RunRecord`` writes (checked against a real deployed
run's federation.json): site ``gamma`` crashed in round 1 and ``delta`` was rejected at the site check.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fednano.cli import app
from server import status
from server.run_record import ModelRecord, RunRecord, SitePrivacyRecord
from server.status import StatusError

FLWR_LS = {
    "success": True,
    "runs": [
        {"run-id": "111", "federation-id": "@none/default", "fab-id": "fednano/fednano", "fab-name": "fednano",
         "fab-version": "0.1.0", "fab-hash": "ab", "status": "finished:completed", "status-details": "N/A",
         "elapsed": 82.9, "pending-at": "2026-11-27 23:52:07Z", "starting-at": "2026-11-27 23:52:08Z",
         "running-at": "2026-11-27 23:52:12Z", "finished-at": "2026-11-27 23:53:35Z",
         "network-traffic": {"inbound-bytes": 123445, "outbound-bytes": 253591, "total-bytes": 377036},
         "compute-time": {"serverapp-seconds": 82.9, "clientapp-seconds": 133.5, "total-seconds": 216.4}},
        {"run-id": "222", "federation-id": "@none/default", "fab-id": "fednano/fednano", "fab-name": "fednano",
         "fab-version": "0.1.0", "fab-hash": "ab", "status": "running", "status-details": "N/A",
         "elapsed": 12.0, "pending-at": "2026-11-28 08:00:00Z", "starting-at": "2026-11-28 08:00:01Z",
         "running-at": "2026-11-28 08:00:03Z", "finished-at": "N/A",
         "network-traffic": {"inbound-bytes": 0, "outbound-bytes": 0, "total-bytes": 0},
         "compute-time": {"serverapp-seconds": 0, "clientapp-seconds": 0, "total-seconds": 0}},
    ],
}


def site_round(loss: float | None, n: int, epsilon: float) -> dict:
    train = {"num-examples": n, "steps": 4, "epsilon": epsilon, "epsilon-budget": 3.0, "delta": 1e-5,
             "noise-multiplier": 1.3}
    if loss is not None:
        train["train-loss"] = loss
    return {"train": train, "evaluate": {"response": {"auc": 0.6, "accuracy": 0.5}}}


def make_record() -> dict:
    """A run record as ``server.run_record.RunRecord`` writes it."""
    ann = ModelRecord(family="ann", mode="fedavg", rounds=[
        {"round": 1, "per_site": {"alpha": site_round(2.0, 100, 1.5), "beta": site_round(1.0, 300, 1.4),
                                  "gamma": {}},
         "failures": {"gamma": "Node 9 is unavailable\nmore detail"},
         "overall": {"response": {"auc": 0.61, "accuracy": 0.5}, "efficacy_pct": {"mae": 20.0, "r2": -0.25}}},
        {"round": 2, "per_site": {"alpha": site_round(1.0, 100, 2.9), "beta": site_round(0.5, 300, 2.8)},
         "failures": {},
         "overall": {"response": {"auc": 0.7}, "efficacy_pct": {"r2": 0.1}}},
    ])
    privacy = {"alpha": SitePrivacyRecord(dp=True, epsilon_budget=3.0, delta=1e-5, epsilon_spent_before=0.0,
                                          epsilon_spent=2.9, granted={"statistics": 0.15, "training": 2.7},
                                          releases={"statistics": 1, "training": 2},
                                          epsilon_after={"statistics": 0.15, "training": 2.9},
                                          refused={"importance": "no DP form"}),
               "beta": SitePrivacyRecord(dp=True, epsilon_budget=3.0, delta=1e-5, epsilon_spent=2.8),
               "gamma": SitePrivacyRecord(dp=False)}
    record = RunRecord(run_id="111", settings={"num-server-rounds": 2}, sites=["alpha", "beta", "gamma"],
                       rejected={"delta": ["episodes.csv, column 'dose_mg': rows 3 (line 4): expected a number"]},
                       privacy=privacy, models={"ann": ann})
    return record.to_dict()


def loaded(data: dict | None = None) -> RunRecord:
    return RunRecord.from_dict(data or make_record())


def render(*tables) -> str:
    console = Console(width=200, record=True)
    console.print(*tables)
    return console.export_text()


@pytest.fixture
def record_dir(tmp_path) -> Path:
    (tmp_path / "federation.json").write_text(json.dumps(make_record()))
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# The run record


def test_participation_counts_trained_and_failed_rounds_and_epsilon_per_site():
    sites = {p.site: p for p in status.participation(loaded())}
    assert list(sites) == ["alpha", "beta", "gamma"]
    assert sites["alpha"].trained == (1, 2) and sites["alpha"].failed == {}
    alpha = sites["alpha"].privacy
    assert (alpha.epsilon_spent, alpha.epsilon_budget, alpha.delta) == (2.9, 3.0, 1e-5)
    assert sites["gamma"].trained == () and sites["gamma"].failed == {1: "Node 9 is unavailable\nmore detail"}
    assert not sites["gamma"].privacy.dp


def test_train_loss_of_a_round_is_weighted_by_each_sites_examples():
    rounds = make_record()["models"]["ann"]["rounds"]
    assert status.weighted_train_loss(rounds[0]) == pytest.approx((2.0 * 100 + 1.0 * 300) / 400)  # 1.25
    assert status.weighted_train_loss(rounds[1]) == pytest.approx((1.0 * 100 + 0.5 * 300) / 400)  # 0.625
    assert status.weighted_train_loss({"round": 3, "per_site": {"a": {}}}) is None


def test_headline_shows_auc_for_classes_and_r2_for_regression():
    overall = make_record()["models"]["ann"]["rounds"][0]["overall"]
    assert status.headline(overall) == "response auc 0.610, efficacy_pct r2 -0.250"
    assert status.headline({}) == "–"


def test_rounds_table_shows_who_trained_who_failed_and_why_the_loss_and_metrics():
    text = render(status.rounds_table(loaded(), "rounds"))
    lines = [line for line in text.splitlines() if line.startswith("│")]
    assert len(lines) == 2
    assert "2/3" in lines[0] and "gamma: Node 9 is unavailable" in lines[0] and "1.2500" in lines[0]
    assert "more detail" not in text  # a failure shows its first line only
    assert "response auc 0.610" in lines[0]
    assert "2/3" in lines[1] and "0.6250" in lines[1] and "response auc 0.700" in lines[1]


def test_sites_table_shows_participation_and_epsilon_spent_of_the_budget():
    text = render(status.sites_table(loaded(), "sites"))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert set(rows) == {"alpha", "beta", "gamma"}
    assert "2/2" in rows["alpha"] and "2.90" in rows["alpha"] and "1e-05" in rows["alpha"]
    assert "statistics 0.15; training 2.90; refuses importance" in rows["alpha"]
    assert "2.80" in rows["beta"]
    assert "0/2" in rows["gamma"] and "failed: 1 (Node 9 is unavailable)" in rows["gamma"] and "no DP" in rows["gamma"]


def test_rejected_sites_are_listed_with_their_errors():
    assert status.rejected_lines(loaded()) == [
        "delta left out: episodes.csv, column 'dose_mg': rows 3 (line 4): expected a number"]


def test_read_record_takes_the_out_dir_or_the_file(record_dir):
    assert status.read_record(record_dir).sites == ["alpha", "beta", "gamma"]
    assert status.read_record(record_dir / "federation.json").run_id == "111"


def test_read_record_finds_the_record_in_a_simulate_output_folder(tmp_path):
    (tmp_path / "federated").mkdir()
    (tmp_path / "federated" / "federation.json").write_text(json.dumps(make_record()))
    assert status.read_record(tmp_path).run_id == "111"


def test_a_ray_traceback_as_a_failure_reason_is_shown_as_its_error_line():
    reason = ("RayTaskError(ClientAppException): ray::ClientAppActor.run()\nTraceback (most recent call last):\n"
              '  File "x.py", line 3, in f\nValueError: site.toml privacy.shares: adjuster must be in [0, 1]')
    assert status.short_reason(reason) == "ValueError: site.toml privacy.shares: adjuster must be in [0, 1]"


def test_run_id_comes_from_the_record_else_from_the_signed_policys_manifest(tmp_path):
    assert status.record_run_id(loaded()) == "111"
    bundle = tmp_path / "v3"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"version": 3, "run_id": "4211"}))
    record = loaded({**make_record(), "run_id": "", "policy": {"bundle": str(bundle), "version": 3}})
    assert status.record_run_id(record) == "4211"
    record.policy = None
    assert status.record_run_id(record) is None


def test_a_missing_record_names_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(StatusError, match=r"federation\.json: no run record \(expected the federation\.json"):
        status.read_record(tmp_path)


def test_a_record_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "federation.json").write_text("{not json")
    with pytest.raises(StatusError, match=r"federation\.json: not JSON"):
        status.read_record(tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["models"]["ann"].pop("rounds"), r"field 'models\.ann\.rounds' expected a list, got None"),
    (lambda r: r.update(sites="alpha"), r"field 'sites' expected a list, got 'alpha'"),
    (lambda r: r["models"]["ann"]["rounds"][1].update(round="2"),
     r"field 'models\.ann\.rounds\[1\]\.round' expected a round number, got '2'"),
    (lambda r: r["models"]["ann"]["rounds"][0].update(per_site=[]),
     r"field 'models\.ann\.rounds\[0\]\.per_site' expected an object, got list"),
    (lambda r: r["models"]["ann"]["rounds"][0].update(failures="gamma"),
     r"field 'models\.ann\.rounds\[0\]\.failures' expected an object"),
    (lambda r: r["privacy"]["beta"].update(epsilon_spent="2.8"),
     r"field 'privacy\.beta\.epsilon_spent' expected a number, got '2\.8'"),
    (lambda r: r.update(version=1), r"not a fednano/run-record version 2 record"),
])
def test_a_record_missing_a_field_names_the_field_and_what_was_expected(tmp_path, edit, message):
    record = make_record()
    edit(record)
    (tmp_path / "federation.json").write_text(json.dumps(record))
    with pytest.raises(StatusError, match=message) as err:
        status.read_record(tmp_path)
    assert str(tmp_path / "federation.json") in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Flower's run list


def test_flower_runs_are_parsed_newest_first_and_tabled():
    runs = status.parse_flower_runs(json.dumps(FLWR_LS), "", "hospitals")
    assert [r["run-id"] for r in runs] == ["222", "111"]
    text = render(status.runs_table(runs, "hospitals"))
    row = next(line for line in text.splitlines() if "111" in line)
    assert "fednano==0.1.0" in row and "finished:completed" in row and "83 s" in row and "377 kB" in row


@pytest.mark.parametrize(("stdout", "message"), [
    ("", "printed no JSON"),
    (json.dumps({"success": False, "error-message": "connection refused"}), "failed: connection refused"),
    (json.dumps({"success": True, "runs": {}}), "expected a list under 'runs'"),
])
def test_a_failing_flwr_ls_is_an_error_naming_the_federation(stdout, message):
    with pytest.raises(StatusError, match=message) as err:
        status.parse_flower_runs(stdout, "", "hospitals")
    assert "hospitals" in str(err.value)


def fake_flwr(folder: Path, stdout: str) -> Path:
    """An executable `flwr` that records its arguments and prints ``stdout``."""
    script = folder / "flwr"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {folder / 'args'}\ncat <<'EOF'\n{stdout}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_flower_runs_calls_flwr_ls_with_the_federation_and_run_id(tmp_path, monkeypatch):
    monkeypatch.setattr(status, "flwr_executable", lambda: str(fake_flwr(tmp_path, json.dumps(FLWR_LS))))
    runs = status.flower_runs("hospitals", run_id=111, env=dict(os.environ))
    assert len(runs) == 2
    assert (tmp_path / "args").read_text().split() == ["ls", "hospitals", "--format", "json", "--run-id", "111"]


# ---------------------------------------------------------------------------------------------------------
# The command


def test_status_command_shows_runs_and_records_and_exits_0(tmp_path, record_dir, monkeypatch):
    monkeypatch.setattr(status, "flwr_executable", lambda: str(fake_flwr(tmp_path, json.dumps(FLWR_LS))))
    result = CliRunner().invoke(app, ["status", "hospitals", "--record", str(record_dir), "--width", "200"])
    assert result.exit_code == 0, result.output
    assert "runs of hospitals" in result.output and "finished:completed" in result.output
    assert f"rounds of {record_dir} (run 111)" in result.output
    assert "delta left out" in result.output


def test_status_command_with_a_bad_record_says_why_and_exits_1(tmp_path):
    result = CliRunner().invoke(app, ["status", "--record", str(tmp_path), "--width", "200"])
    assert result.exit_code == 1
    assert "no run record" in result.output


def test_status_command_needs_a_federation_or_a_record():
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2
    assert "name a federation" in result.output
