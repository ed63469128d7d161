"""The ClientApp loads torch, Opacus and XGBoost only for the messages that need them.

Flower 1.42's SuperNode starts a fresh ClientApp process for every message, so what ``client.app`` imports is
paid by every message of a deployed run (torch and Opacus were ~5 s of it). Each check runs in a fresh
interpreter, like that process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "opacus", "xgboost")

# Handles one message with the module-level app, as the SuperNode's process does; prints what it loaded.
ANSWER = textwrap.dedent("""
    import json, sys
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    import client.app
    from shared.protocol import messages, site_check
    from shared.protocol.privacy import RunPlan
    from shared.protocol.training import statistics_request

    heavy = lambda: sorted(m for m in {heavy} if m in sys.modules)
    out = {{"after_import": heavy()}}
    plan = RunPlan(("statistics", "training", "evaluation"))
    context = Context(run_id=1, node_id=0, node_config={{"data-path": sys.argv[1]}}, state=RecordDict(),
                      run_config={{}})
    for name, content in (("site_check", site_check.request(plan)), ("statistics", statistics_request(0, plan))):
        message_type = getattr(messages, name.upper()).type
        reply = client.app.app(Message(content, dst_node_id=0, message_type=message_type), context)
        out[name] = {{"error": reply.has_error(), "loaded": heavy()}}
    print(json.dumps(out))
""").format(heavy=HEAVY)


def answer(site: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", ANSWER, str(site)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sites(plain_and_dp_site) -> dict[str, Path]:
    return plain_and_dp_site


def test_importing_the_client_app_loads_neither_torch_opacus_nor_xgboost(sites):
    assert answer(sites["plain"])["after_import"] == []


def test_a_site_without_dp_answers_its_check_and_statistics_without_them(sites):
    replies = answer(sites["plain"])
    assert replies["site_check"] == {"error": False, "loaded": []}
    assert replies["statistics"] == {"error": False, "loaded": []}


def test_a_dp_site_loads_opacus_with_its_first_release_only(sites):
    replies = answer(sites["dp"])
    assert replies["site_check"] == {"error": False, "loaded": []}  # an empty ledger: nothing to account yet
    assert replies["statistics"]["error"] is False
    assert "opacus" in replies["statistics"]["loaded"] and "xgboost" not in replies["statistics"]["loaded"]
