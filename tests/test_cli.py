"""The fednano command: exit codes and what it prints."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fednano.cli import app
from tests.sitefactory import set_cell, write_site

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_validate_exits_zero_with_a_summary_for_a_good_site(tmp_path):
    site = write_site(tmp_path / "alpha")
    result = runner.invoke(app, ["validate", str(site)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "n_episodes" in result.output


def test_validate_exits_one_naming_file_column_and_row_for_a_bad_site(tmp_path):
    site = write_site(tmp_path / "alpha")
    set_cell(site / "episodes.csv", 3, "zeta_mv", "250")
    result = runner.invoke(app, ["validate", str(site)])
    assert result.exit_code == 1
    assert "episodes.csv, column 'zeta_mv', row 3" in result.output


def test_validate_with_a_broken_task_spec_exits_two(tmp_path):
    spec = tmp_path / "task.toml"
    spec.write_text("[task]\nkind = 'ordinal'\ntarget = 'y'\n")
    result = runner.invoke(app, ["validate", str(tmp_path), "--task", str(spec)])
    assert result.exit_code == 2
    assert "task.toml" in result.output and "kind" in result.output


def test_simulate_data_writes_sites_that_validate(tmp_path):
    result = runner.invoke(app, ["simulate-data", "--clinics", "2", "--seed", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "clinic_00" / "episodes.csv").exists() and (tmp_path / "world.json").exists()
    assert runner.invoke(app, ["validate", str(tmp_path / "clinic_01")]).exit_code == 0


def test_simulate_refuses_a_missing_site_path(tmp_path):
    result = runner.invoke(app, ["simulate", "--sites", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert result.exit_code == 2
    assert "no such file or folder" in result.output


def test_simulate_refuses_the_closed_loop_without_a_policy_and_more_clinics_than_it_measured():
    result = runner.invoke(app, ["simulate", "--no-policy", "--deploy-cycles", "2"])
    words = " ".join(result.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert result.exit_code == 2 and "the closed loop deploys the dosing policy" in words
    result = runner.invoke(app, ["simulate", "--clinics", "1001"])
    assert result.exit_code == 2 and "1001" in result.output


def test_simulate_refuses_a_ray_address_where_no_head_answers(tmp_path):
    """Ray retries an absent head for ever inside Flower's simulation thread: the command checks it first."""
    import socket

    with socket.socket() as unused:  # a port of this machine that nothing listens on once closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for address, said in ((f"127.0.0.1:{port}", "cannot connect to 127.0.0.1"), ("nonsense", "expected HOST:PORT"),
                          ("no-such-host.invalid:6379", "no host named"), ("127.0.0.1:99999", "expected HOST:PORT")):
        result = runner.invoke(app, ["simulate", "--ray-address", address, "--out", str(tmp_path / "out")])
        words = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and said in words, (address, words)
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.slow
def test_simulate_on_real_liposome_data_split_into_three_csv_sites(tmp_path, monkeypatch, shared_ray):
    """The generic-task path end to end: 77 real formulations, 3 release classes, three CSV sites."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    table = pd.read_csv(ROOT / "simulation" / "data" / "liposome_ivr" / "ML_7_features_df.csv")
    order = np.random.default_rng(0).permutation(len(table))
    paths = []
    for i, part in enumerate(np.array_split(order, 3)):
        paths.append(tmp_path / f"site{i}.csv")
        table.iloc[part].to_csv(paths[-1], index=False)
    out = tmp_path / "out"
    # --xgb-rounds 2: the generic task still goes through federated boosting end to end, without the default
    # 20 rounds of histogram message rounds (the ANN's results are what is checked in detail below)
    result = runner.invoke(app, ["simulate", "--sites", *map(str, paths), "--task",
                                 str(ROOT / "examples" / "liposome_task.toml"), "--rounds", "3", "--xgb-rounds", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["outcomes"] == [["cluster", "multiclass"]]
    assert sorted(results["models"]["ann"]) == ["federated", "local", "pooled"]
    assert "federated" in results["models"]["xgboost"]  # the boosting path ran too, on 2 rounds
    for model in results["models"]["ann"].values():
        assert set(model["overall"]["cluster"]) >= {"auc", "accuracy", "balanced_accuracy"}
    assert results["privacy"] == {}  # CSV sites have no site.toml: no DP unless a site asks for it
    assert (out / "report.md").exists() and (out / "learning_curves.png").exists()
    assert results["policy"] is None and not (out / "kit").exists()  # a dosing policy needs the built-in task


def test_provision_prints_the_next_commands_and_refuses_to_overwrite(tmp_path):
    kit = tmp_path / "kit"
    first = runner.invoke(app, ["provision", "--federation", "hospitals", "--sites", "a,b", "--out", str(kit)])
    assert first.exit_code == 0, first.output
    assert "flower-superlink" in first.output and "flwr supernode register" in first.output
    again = runner.invoke(app, ["provision", "--federation", "hospitals", "--sites", "a,b", "--out", str(kit)])
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.output
