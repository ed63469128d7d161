"""Phase 2: the federated statistics, summed into one feature encoder every site shares.

Each usable site sends aggregates of its training split (``query.statistics``; noised at a site under DP,
``client.statistics``); the server adds them (``shared.encoding.combine``) and fits one
:class:`shared.encoding.FeatureEncoder`, so every site standardises and one-hot-encodes identically without a
row leaving it. A DP site that refused the phase is not asked (and, with no noised row count to weigh it by,
will not train).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.run_record import RunRecord, add_privacy
from server.site_check import SiteCheck
from shared.encoding import FeatureEncoder, SiteStatistics, combine
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.privacy import RunPlan
from shared.protocol.training import statistics_request
from shared.task import TaskSpec


class NoStatistics(RuntimeError):
    """No site could report statistics: nothing to train on."""


def federated_encoder(grid: Grid, sites: SiteCheck, task: TaskSpec, split_seed: int, plan: RunPlan,
                      record: RunRecord) -> FeatureEncoder:
    """Sum the sites' training-split aggregates into one encoder; who answered and who did not go to ``record``."""
    nodes = sites.granting("statistics")
    sent = [Message(statistics_request(split_seed, plan), dst_node_id=n, message_type=messages.STATISTICS.type)
            for n in nodes]
    stats, answered, failures = [], [], {}
    for reply in grid.send_and_receive(sent):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures[sites.usable.get(node, f"node {node}")] = reply.error.reason
            log(INFO, "statistics: %s failed: %s", sites.usable.get(node, node), reply.error.reason)
            continue
        stats.append(SiteStatistics.from_records(reply.content[r.STATISTICS], reply.content[r.NAMES]))
        answered.append(sites.usable[node])
        if r.PRIVACY in reply.content:
            add_privacy(record, sites.usable, node, dict(reply.content[r.PRIVACY]))
    record.statistics = {"sites": sorted(answered), "failures": failures, "refused": sites.refusing("statistics")}
    if not stats:
        raise NoStatistics("no site could report statistics: nothing to train on")
    return FeatureEncoder(task).fit_statistics(combine(stats))
