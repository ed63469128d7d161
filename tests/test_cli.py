"""The fednano command: exit codes and what it prints."""

from typer.testing import CliRunner

from fednano.cli import app
from tests.sitefactory import set_cell, write_site

runner = CliRunner()


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
