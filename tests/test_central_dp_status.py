"""Central DP in ``fednano status`` and the dashboard (issue 16, item 4): the mode, the clip norm now (adaptive: the
last round's bound), the noise multiplier and ε (δ) of the rounds released so far, as the run record says."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fednano.cli import app as cli
from server.central_accounting import central_epsilon
from server.dashboard import make_dashboard
from server.run_record import CentralDPRecord
from tests.test_status import make_record

Z, DELTA = 0.8, 1e-5


def with_central_dp(rounds: int = 2) -> dict:
    """``tests.test_status``'s record with an adaptive central-DP run of ``rounds`` rounds, ε from the accountant."""
    clips = [0.5, 0.47, 0.44][:rounds]
    record = make_record()
    record["central_dp"] = asdict(CentralDPRecord(
        mechanism="adaptive", noise_multiplier=Z, clip=0.5, denominator=3, sample_rate=1.0, delta=DELTA,
        accountant="rdp", rounds=rounds, epsilon=central_epsilon([Z] * rounds, 1.0, DELTA),
        per_round={str(r + 1): {"updates": 3, "clip_norm": c, "noise_sd": 0.9 * c / 3, "noise_multiplier": Z,
                                "unclipped_fraction": 0.4, "epsilon": central_epsilon([Z] * (r + 1), 1.0, DELTA)}
                   for r, c in enumerate(clips)},
        update_noise_multiplier=0.9, count_noise_sd=1.26))
    return record


def test_status_shows_the_central_dp_mode_clip_norm_noise_and_epsilon_so_far(tmp_path):
    (tmp_path / "federation.json").write_text(json.dumps(with_central_dp()))
    result = CliRunner().invoke(cli, ["status", "--record", str(tmp_path), "--width", "200"])
    assert result.exit_code == 0, result.output
    epsilon = central_epsilon([Z, Z], 1.0, DELTA)
    assert 1 < epsilon < 100
    line = next(line for line in result.output.splitlines() if "adaptive" in line)
    assert re.search(rf"adaptive\s*│\s*0\.47\s*│\s*0\.8\s*│\s*{epsilon:.3f} \(δ=1e-05, rdp\)\s*│\s*2", line), line
    assert f"central DP of {tmp_path}" in result.output


def test_status_of_a_run_without_central_dp_shows_no_central_dp_table(tmp_path):
    (tmp_path / "federation.json").write_text(json.dumps(make_record()))
    result = CliRunner().invoke(cli, ["status", "--record", str(tmp_path), "--width", "200"])
    assert result.exit_code == 0 and "central DP" not in result.output


def test_the_dashboard_shows_central_dp_and_its_json_carries_the_same_numbers(tmp_path):
    (tmp_path / "deployed").mkdir()
    (tmp_path / "deployed" / "federation.json").write_text(json.dumps(with_central_dp(rounds=3)))
    client = TestClient(make_dashboard(tmp_path))
    html = client.get("/runs/deployed").text

    def field(name: str) -> str:
        found = re.search(rf'<dd id="central-dp-{name}">(.*?)</dd>', html, flags=re.S)
        assert found, name
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(1))).strip()

    epsilon = central_epsilon([Z] * 3, 1.0, DELTA)
    assert field("mode") == "adaptive clipping"
    assert field("clip").startswith("0.44 ")
    assert field("noise") == "0.8"
    assert field("epsilon").startswith(f"{epsilon:.3f} at δ = 1e-05 after 3 rounds")
    shown = client.get("/api/runs/deployed").json()["central_dp"]
    assert shown["epsilon"] == epsilon and shown["clip_norm"] == 0.44 and shown["mechanism"] == "adaptive"
    # a run without central DP has no such section
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "federation.json").write_text(json.dumps(make_record()))
    assert 'id="central-dp"' not in client.get("/runs/plain").text
    assert client.get("/api/runs/plain").json()["central_dp"] is None
