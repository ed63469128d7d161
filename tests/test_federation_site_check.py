"""Flower simulation: every site validates its own data and the server learns only counts, or the errors."""

import os
from pathlib import Path

import pytest

from client.app import make_client_app
from server.app import SiteCheck, check_sites
from simulation.clinics import generate_sites

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _flower_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


def test_server_hears_usable_sites_and_names_the_broken_one(tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    generate_sites(3, seed=1, out=tmp_path)
    broken = tmp_path / "clinic_02" / "episodes.csv"
    text = broken.read_text().splitlines()
    broken.write_text("\n".join(text[:-1] + [text[-1].split(",", 3)[0]]) + "\n")  # truncated last row

    seen: list[SiteCheck] = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        seen.append(check_sites(grid, min_nodes=3))

    sites = [str(tmp_path / f"clinic_{i:02d}") for i in range(3)]
    run_simulation(server_app=server, client_app=make_client_app(sites), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    (result,) = seen
    assert sorted(result.usable.values()) == ["clinic_00", "clinic_01"]
    (name, errors), = result.rejected.values()
    assert name == "clinic_02"
    assert "episodes.csv" in errors[0] and "row" in errors[0]
    # Only aggregates arrive: counts and rates, no identifiers.
    for summary in result.summaries.values():
        assert summary["n_episodes"] > 0
        assert all(isinstance(v, float) for v in summary.values())
    assert os.environ["FLWR_HOME"].startswith(str(tmp_path))
    assert Path(sites[0]).exists()
