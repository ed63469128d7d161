"""The server's feature-importance phase: sites shuffle features among their own test rows and return loss
sums (``client.importance``); the server adds them into the federated permutation importance."""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared import metrics
from shared.encoding import FeatureEncoder
from shared.importance import importance_from_sums

IMPORTANCE = "query.importance"


def federated_importance(grid: Grid, nodes: list[int], encoder: FeatureEncoder, config: ConfigRecord,
                         model: ArrayRecord | ConfigRecord) -> dict[str, dict[str, float]]:
    """Permutation importance per outcome and feature of a final model (``family`` in ``config``)."""
    payload = {"config": config, "arrays" if isinstance(model, ArrayRecord) else "boosters": model}
    messages = [Message(RecordDict(payload), dst_node_id=n, message_type=IMPORTANCE) for n in nodes]
    sums = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            log(INFO, "importance: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        sums.append(dict(reply.content["metrics"]))
    return importance_from_sums(encoder, metrics.combine(sums)) if sums else {}
