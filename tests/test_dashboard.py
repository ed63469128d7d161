"""The coordinator's dashboard (`fednano dashboard`): which runs it finds, what a run's page shows, and that a
bad record is a message on its card, never an HTTP 500. No browser here (``test_browser_dashboard.py`` has one).

The records are ``tests/test_status.py``'s (the shape ``server.run_record.RunRecord`` writes): ``gamma`` crashed
in round 1, ``delta`` was left out at the site check.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fednano.cli import app as cli
from server import dashboard
from server.dashboard import find_runs, load_run, make_dashboard
from tests.test_status import make_record

POLICY = {"candidate": "x/candidate", "policy_model": "ensemble", "shipped": True, "version": 3, "bundle": None,
          "gate": {"estimate": 0.12, "lower": 0.02, "upper": 0.22, "n": 400.0, "passed": True,
                   "reason": "candidate beats standard of care on the sites' logs",
                   "per_site": {"alpha": {"estimate": 0.2, "lower": -0.1, "upper": 0.5, "worse": False},
                                "beta": {"estimate": -0.4, "lower": -0.7, "upper": -0.1, "worse": True}}},
          "sites": {"alpha": {"installed": True, "version": 3},
                    "beta": {"installed": False, "reason": "version 3 is not newer than the installed 3"}}}


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def deployed(root: Path, name: str = "deployed", record: dict | None = None) -> Path:
    return write(root / name / "federation.json", record if record is not None else make_record()).parent


def simulation(root: Path, name: str = "sim", finished: bool = True) -> Path:
    """A ``fednano simulate`` output folder: sites/, kit/, federated/federation.json and results.json."""
    out = root / name
    (out / "sites" / "clinic_00").mkdir(parents=True)
    (out / "kit").mkdir()
    record = make_record()
    record["policy"] = POLICY
    write(out / "federated" / "federation.json", record)
    if finished:
        write(out / "results.json", {"sites": record["sites"]})
    return out


@pytest.fixture
def client_of():
    return lambda root: TestClient(make_dashboard(root))


def rows(html: str, attribute: str) -> dict[str, str]:
    """``data-<attribute>`` value → the row's text (tags stripped)."""
    found = re.findall(rf'<tr data-{attribute}="([^"]+)">(.*?)</tr>', html, flags=re.S)
    return {key: re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)).strip() for key, body in found}


# ---------------------------------------------------------------------------------------------------------
# Finding runs


def test_runs_are_found_as_simulation_folders_and_deployed_out_dirs_but_not_inside_them(tmp_path):
    simulation(tmp_path, "experiments/seed0")
    deployed(tmp_path, "federation")
    write(tmp_path / "experiments" / "seed0" / "deployment" / "federation-1.json", make_record())
    (tmp_path / "empty").mkdir()
    assert [(r.key, r.kind) for r in find_runs(tmp_path)] == [("experiments/seed0", "simulation"),
                                                              ("federation", "deployed")]


def test_runs_dir_that_is_itself_a_run_is_the_one_run(tmp_path):
    out = simulation(tmp_path, "only")
    assert [(r.key, r.kind) for r in find_runs(out)] == [("only", "simulation")]


# ---------------------------------------------------------------------------------------------------------
# A run's page


def test_run_page_shows_every_site_every_round_and_each_sites_epsilon_as_the_record_says(tmp_path, client_of):
    deployed(tmp_path)
    html = client_of(tmp_path).get("/runs/deployed").text
    record = make_record()
    sites = rows(html, "site")
    assert list(sites) == ["alpha", "beta", "gamma"]
    for site, privacy in record["privacy"].items():
        shown = f"{privacy['epsilon_spent']:.2f}" if privacy["dp"] else "no DP"
        assert shown in sites[site], site
    assert "2/2" in sites["alpha"] and "3 97 %" in sites["alpha"] and "statistics 0.15; training 2.90" in sites["alpha"]
    assert "refuses importance" in sites["alpha"]
    assert "0/2" in sites["gamma"] and "1: Node 9 is unavailable" in sites["gamma"]
    rounds = rows(html, "round")
    assert list(rounds) == ["1", "2"]
    assert "failed: Node 9 is unavailable" in rounds["1"] and "more detail" not in html
    assert "1.2500" in rounds["1"] and "response auc 0.610" in rounds["1"]
    assert "2 of 2 rounds" in html
    assert "delta left out at the site check: episodes.csv, column &#39;dose_mg&#39;" in html


def test_final_metrics_of_a_run_with_dp_sites_are_labelled_as_released_with_noise(tmp_path, client_of):
    record = make_record()  # alpha and beta answer under DP, gamma does not
    record["models"]["ann"]["final"]["overall"] = {"response": {"auc": 0.437}}
    deployed(tmp_path, record=record)
    html = client_of(tmp_path).get("/runs/deployed").text
    assert "final ann" in html and "response auc 0.437" in html
    note = html.split('id="released-note">', 1)[1].split("</dd>", 1)[0]
    assert note.startswith("as the sites released them: 2 of 3 sites answer under DP")
    for privacy in record["privacy"].values():
        privacy["dp"] = False
    deployed(tmp_path, "exact", record)
    assert 'id="released-note"' not in client_of(tmp_path).get("/runs/exact").text


def test_a_phase_the_coordinator_refused_is_shown_with_its_reason(tmp_path, client_of):
    record = make_record()
    record["refused"] = {"training": "bulyan needs at least 7 sites for f = 1; 3 are usable"}
    deployed(tmp_path, record=record)
    html = client_of(tmp_path).get("/runs/deployed").text
    assert ("the coordinator refused the training phase and ended the run there: bulyan needs at least 7 sites "
            "for f = 1; 3 are usable") in html
    deployed(tmp_path, "plain")
    assert "the coordinator refused" not in client_of(tmp_path).get("/runs/plain").text


def test_run_page_draws_the_epsilon_and_metric_curves_as_inline_svg(tmp_path, client_of):
    deployed(tmp_path)
    html = client_of(tmp_path).get("/runs/deployed").text
    titles = re.findall(r"<svg[^>]*><title>([^<]*)</title>", html)
    assert titles[0].startswith("ε spent by DP-SGD") and "response: auc per round" in titles
    assert "efficacy_pct: r2 per round" in titles


def test_policy_versions_show_the_gate_and_each_sites_verdict_and_install(tmp_path, client_of):
    simulation(tmp_path)
    write(tmp_path / "sim" / "deployment" / "federation-1.json", make_record() | {"policy": POLICY | {
        "version": 4, "shipped": False, "gate": POLICY["gate"] | {"passed": False, "reason": "not shown better"}}})
    html = client_of(tmp_path).get("/runs/sim").text
    assert "version 3 shipped" in html and "gate passed" in html and "+0.120 utility per patient" in html
    assert "installed v3" in html and "not installed: version 3 is not newer than the installed 3" in html
    assert "-0.400 [-0.700, -0.100]" in html and "worse: serves standard of care" in html
    assert "candidate not shipped" in html and "not shown better" in html and "kept its version (not shipped)" in html
    assert rows(html, "site")["alpha"].endswith("kept its version (not shipped)")  # the latest version's status


def test_index_has_a_card_per_run_with_rounds_sites_and_epsilon(tmp_path, client_of):
    deployed(tmp_path)
    simulation(tmp_path)
    html = client_of(tmp_path).get("/").text
    assert html.count('class="card run-card"') == 2
    assert "2 of 2 rounds" in html and "2.80–2.90 per site" in html and "v3 shipped" in html


def test_the_json_view_carries_the_same_numbers(tmp_path, client_of):
    deployed(tmp_path)
    view = client_of(tmp_path).get("/api/runs/deployed").json()
    assert [s["site"] for s in view["sites"]] == ["alpha", "beta", "gamma"]
    assert view["sites"][0]["epsilon_spent"] == 2.9 and view["rounds_done"] == view["rounds_planned"] == 2


# ---------------------------------------------------------------------------------------------------------
# Runs in progress and the refresh


def test_a_finished_run_page_has_no_refresh_script(tmp_path, client_of):
    simulation(tmp_path)
    html = client_of(tmp_path).get("/runs/sim").text
    assert "<script" not in html and "finished" in html


@pytest.mark.parametrize("kind", ["simulation", "deployed"])
def test_a_run_still_training_shows_its_rounds_so_far_from_the_progress_record(tmp_path, client_of, kind):
    record = make_record()
    record["models"]["ann"]["rounds"] = record["models"]["ann"]["rounds"][:1]  # round 1 of 2 done
    if kind == "simulation":
        out = simulation(tmp_path, finished=False)
        (out / "federated" / "federation.json").unlink()
        write(out / "federated" / "federation.progress.json", record)
        key = "sim"
    else:
        write(tmp_path / "live" / "federation.progress.json", record)
        key = "live"
    client = client_of(tmp_path)
    html = client.get(f"/runs/{key}").text
    assert "1 of 2 rounds" in html and "training: the coordinator&#39;s progress record" in html
    assert list(rows(html, "site")) == ["alpha", "beta", "gamma"] and list(rows(html, "round")) == ["1"]
    assert "<script" in html  # a running run's page polls
    state = client.get("/api/state", params={"run": key}).json()["runs"][0]
    assert state["state"] == "running"


def test_a_simulation_without_a_record_yet_is_running_and_its_page_polls_the_state(tmp_path, client_of):
    out = simulation(tmp_path, finished=False)
    (out / "federated" / "federation.json").unlink()
    client = client_of(tmp_path)
    html = client.get("/runs/sim").text
    assert "in progress: no run record yet" in html and "<script" in html and "/api/state?run=sim" in html
    before = client.get("/api/state", params={"run": "sim"}).json()
    assert before["runs"][0]["state"] == "running" and before["runs"][0]["live"]
    write(out / "federated" / "federation.json", make_record())
    after = client.get("/api/state", params={"run": "sim"}).json()
    assert after["fingerprint"] != before["fingerprint"] and after["runs"][0]["state"] == "running"
    assert "still evaluating its models" in after["runs"][0]["detail"]
    write(out / "results.json", {})
    assert client.get("/api/state", params={"run": "sim"}).json()["runs"][0]["state"] == "finished"


def test_a_simulation_folder_silent_for_long_without_a_record_is_stopped_and_not_polled(tmp_path, client_of):
    out = simulation(tmp_path, finished=False)
    (out / "federated" / "federation.json").unlink()
    old = time.time() - 2 * dashboard.STALE_AFTER_S
    for path in [out, *out.rglob("*")]:
        os.utime(path, (old, old))
    html = client_of(tmp_path).get("/runs/sim").text
    assert "stopped" in html and "nothing written for 2.0 h" in html and "<script" not in html


# ---------------------------------------------------------------------------------------------------------
# Bad records: a message on the card, never a 500


def corrupted() -> dict[str, str | dict]:
    good = make_record()

    def changed(edit) -> dict:
        record = copy.deepcopy(good)
        edit(record)
        return record

    return {
        "half written": json.dumps(good)[:300],
        "empty file": "",
        "not an object": "[1, 2, 3]",
        "other version": changed(lambda r: r.update(version=99)),
        "per_site entry a list": changed(lambda r: r["models"]["ann"]["rounds"][0]["per_site"].update(alpha=[1])),
        "train a string": changed(lambda r: r["models"]["ann"]["rounds"][0]["per_site"]["alpha"].update(train="x")),
        "epsilon a string": changed(lambda r: r["privacy"]["alpha"].update(epsilon_spent="3")),
        "unknown privacy field": changed(lambda r: r["privacy"]["alpha"].update(surprise=1)),
        "policy a list": changed(lambda r: r.update(policy=[1])),
        "gate figures strings": changed(lambda r: r.update(policy=POLICY | {"gate": {"estimate": "big"}})),
        "overall not an object": changed(lambda r: r["models"]["ann"]["rounds"][0].update(overall=[0.5])),
        "metric NaN": '{"x": NaN}'.replace('{"x": NaN}', json.dumps(good).replace("0.61", "NaN")),
        "settings a list": changed(lambda r: r.update(settings=[1])),
        "failure reason a number": changed(lambda r: r["models"]["ann"]["rounds"][0]["failures"].update(gamma=7)),
    }


@pytest.mark.parametrize("case", list(corrupted()))
def test_a_bad_record_is_shown_as_a_message_on_its_card_never_an_http_500(tmp_path, client_of, case):
    deployed(tmp_path, "good")
    write(tmp_path / "bad" / "federation.json", corrupted()[case])
    client = client_of(tmp_path)
    for path in ("/", "/runs/bad", "/api/runs/bad", "/api/state"):
        answer = client.get(path)
        assert answer.status_code == 200, (case, path, answer.text[-500:])
        assert "Traceback" not in answer.text
    index = client.get("/").text
    assert index.count('class="card run-card"') == 2 and "2 of 2 rounds" in index  # the good run is unaffected
    page = client.get("/runs/bad").text
    view = load_run(next(r for r in find_runs(tmp_path) if r.key == "bad"))
    if view.messages:
        assert 'class="notice bad record-message"' in page and "could not be" in page
    else:  # a record the reader accepts as it is: its odd value is left out, not guessed
        assert case in ("metric NaN", "failure reason a number", "gate figures strings"), case


def test_an_unreadable_results_file_and_closed_loop_record_are_messages_too(tmp_path, client_of):
    out = simulation(tmp_path)
    write(out / "results.json", '{"sites": [')
    write(out / "deployment" / "federation-1.json", "{")
    html = client_of(tmp_path).get("/runs/sim").text
    assert "results.json could not be read" in html and "deployment/federation-1.json could not be read" in html
    assert list(rows(html, "site")) == ["alpha", "beta", "gamma"]  # the run record itself is still shown


def test_an_unknown_run_or_a_path_outside_the_folder_is_a_404_page(tmp_path, client_of):
    deployed(tmp_path / "runs")
    deployed(tmp_path, "outside")
    client = client_of(tmp_path / "runs")
    assert client.get("/runs/nope").status_code == 404 and "No run" in client.get("/runs/nope").text
    for path in ("/runs/../outside", "/runs/%2e%2e/outside", "/runs/..%2foutside"):
        answer = client.get(path)
        assert answer.status_code == 404 and "alpha" not in answer.text, path
    assert client.get("/api/runs/nope").status_code == 404


def test_the_dashboard_writes_nothing_and_links_nothing_off_the_app(tmp_path, client_of):
    deployed(tmp_path)
    simulation(tmp_path)

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")}

    before = snapshot()
    client = client_of(tmp_path)
    pages = [client.get(path).text for path in ("/", "/runs/deployed", "/runs/sim", "/api/state")]
    assert snapshot() == before
    for page in pages:
        for url in re.findall(r'(?:src|href)="([^"]+)"', page):
            assert url.startswith(("http://testserver/", "/", "#")), url
    assert client.get("/static/fednano.css").status_code == 200


# ---------------------------------------------------------------------------------------------------------
# The command


def test_dashboard_command_refuses_to_listen_off_this_machine_without_token_and_tls(tmp_path):
    result = CliRunner().invoke(cli, ["dashboard", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "needs an access token" in result.output and "TLS" in result.output


def test_dashboard_command_wants_both_tls_files(tmp_path):
    result = CliRunner().invoke(cli, ["dashboard", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")])
    assert result.exit_code == 2 and "both --tls-cert and --tls-key" in result.output
