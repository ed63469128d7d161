"""A site's memory of a run across a coordinator's restart: which run a resumed Flower run continues, and that
run's privacy plan, kept on the site's disk.

A coordinator that crashed and resumes (``server.checkpoint``) starts a new Flower run, with a new run id and
an empty node state. Its site check says which run it continues (``shared.protocol.site_check.RESUMES_RUN``);
from then on every message of the new Flower run is answered as the original run's
(:func:`run_context`): the ledger charges carry the original run id, so a round asked again is charged once
(``client.ledger``), and the run's DP plan — ε per phase fixed at the first site check, each phase's noise, the
noised row count — comes back from the site's disk (:func:`keep` writes it after every message), so the
resumed run spends what the uninterrupted one would have.

Only the per-run records of ``client.dp`` and ``client.training_handlers`` are kept (ConfigRecords carrying
the run's ``run-id``): numbers the site computed from its budget, never a row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context

from client.ledger_file import SITE_LEDGER_FILE
from shared.durable import write_json_atomically

CONTINUES = "fednano-continues-run"
"""Node-state record of a resumed Flower run: the run id it continues."""
RUNS_FOLDER = SITE_LEDGER_FILE.parent / "runs"
"""Inside a site's folder: one JSON file of per-run records per run."""
RUN_ID_KEY = "run-id"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def run_context(context: Context) -> Context:
    """``context`` as the run it continues: the same node, node config and state, the original run's id
    (``context`` itself when its Flower run continues none)."""
    continued = context.state.get(CONTINUES)
    if continued is None:
        return context
    return Context(run_id=_run_id(str(continued[RUN_ID_KEY])), node_id=context.node_id,
                   node_config=context.node_config, state=context.state, run_config=context.run_config)


def adopt(context: Context, original: str, site_folder: Path) -> Context:
    """Make this Flower run continue run ``original`` at this node: note it in the node state and bring back
    the run's records kept on the site's disk; returns :func:`run_context`."""
    context.state[CONTINUES] = ConfigRecord({RUN_ID_KEY: str(original)})
    path = _file(site_folder, original)
    if path.is_file():
        for name, values in json.loads(path.read_text()).items():
            if name not in context.state:
                context.state[name] = ConfigRecord(values)
    return run_context(context)


def keep(context: Context, site_folder: Path) -> None:
    """Write this run's per-run records (ConfigRecords whose ``run-id`` is the run's) to the site's disk,
    atomically; nothing when the node holds none (a site without DP)."""
    run = str(context.run_id)
    records = {name: dict(record) for name, record in context.state.config_records.items()
               if name != CONTINUES and str(record.get(RUN_ID_KEY, "")) == run}
    if not records:
        return
    path = _file(site_folder, run)
    if path.is_file() and json.loads(path.read_text()) == records:
        return
    write_json_atomically(path, records, mode=0o600)


def _file(site_folder: Path, run: str) -> Path:
    return Path(site_folder) / RUNS_FOLDER / f"run-{_SAFE_NAME.sub('_', str(run))}.json"


def _run_id(text: str) -> int | str:
    """A run id as Flower's (an integer) when it is one."""
    return int(text) if text.isdigit() else text
