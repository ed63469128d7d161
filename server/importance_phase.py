"""Phase 5: federated permutation importance of a final model.

Sites shuffle each feature among their own test rows and return loss sums (``client.importance``); the server
adds them into the mean loss increase per feature over the union of the test sets
(``shared.importance.importance_from_sums``). Permutation importance has no DP form here, so sites under DP
are not asked (``client.dp.NO_DP_FORM``); the importance is then that of the other sites' test rows.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.site_check import SiteCheck
from shared import metrics
from shared.encoding import FeatureEncoder
from shared.importance import importance_from_sums
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import importance_request


def federated_importance(grid: Grid, sites: SiteCheck, encoder: FeatureEncoder, config: ConfigRecord,
                         family: str, model: ArrayRecord | dict[str, bytes]) -> dict:
    """Permutation importance per outcome and feature of a final model, with the sites that did not answer."""
    nodes = [n for n in sites.nodes if n not in sites.dp_nodes()]
    sent = [Message(importance_request(config, family, model), dst_node_id=n, message_type=messages.IMPORTANCE.type)
            for n in nodes]
    sums, failures = [], {}
    for reply in grid.send_and_receive(sent):
        if reply.has_error():
            name = sites.usable.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
            failures[name] = reply.error.reason
            log(INFO, "importance: %s failed: %s", name, reply.error.reason)
            continue
        sums.append(dict(reply.content[r.METRICS]))
    return {"features": importance_from_sums(encoder, metrics.combine(sums)) if sums else {},
            "failures": failures, "refused": sites.refusing("importance")}
