"""The coordinator's Flower ServerApp.

Phases run in order (DESIGN.md, data flow); this release has the first one:

1. **site check** — every connected site validates its own data against the shared contract and reports
   counts and rates (never rows). Sites whose data fail are named with their first errors and left out of
   later phases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

SITE_CHECK = "query.site_check"


@dataclass
class SiteCheck:
    """What each site said about its data, by node id."""

    usable: dict[int, str] = field(default_factory=dict)  # node id -> site name
    rejected: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # node id -> (site, errors)
    summaries: dict[int, dict[str, float]] = field(default_factory=dict)


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float = 120.0, poll_s: float = 0.5) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (or whatever is connected at the timeout)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_nodes and time.monotonic() < deadline:
        time.sleep(poll_s)
        nodes = list(grid.get_node_ids())
    return nodes


def check_sites(grid: Grid, min_nodes: int = 1, timeout: float | None = None) -> SiteCheck:
    """Ask every node to validate its site; sort them into usable and rejected."""
    nodes = wait_for_nodes(grid, min_nodes)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=SITE_CHECK) for n in nodes]
    result = SiteCheck()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            result.rejected[node] = (f"node {node}", [reply.error.reason])
            continue
        status = reply.content["status"]
        name = str(status["site-name"])
        if status["ok"]:
            result.usable[node] = name
            result.summaries[node] = dict(reply.content["summary"])
        else:
            result.rejected[node] = (name, [e for e in status["errors"] if e])
    return result


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    sites = check_sites(grid, min_nodes=int(context.run_config.get("min-nodes", 1)))
    for node, name in sorted(sites.usable.items(), key=lambda kv: kv[1]):
        s = sites.summaries[node]
        log(INFO, f"site {name}: {int(s.get('n_episodes', s.get('n_rows', 0)))} rows usable")
    for name, errors in sites.rejected.values():
        log(INFO, f"site {name} rejected: " + "; ".join(errors))
