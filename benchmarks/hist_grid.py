"""Flower's Grid as ``server.hist_phase`` uses it, answered in this process by the sites' real handlers.

Each message goes to that node's real ``query.hist_*`` handler (``client.hist_handlers``) with one Flower Context
per node, so the records, and the bytes counted, are the ones a Flower run carries; used by benchmarks that run
the hist phase many times (``federated_hist_scale.py``, ``sum_bounds.py``) without Ray's node start.
"""

from __future__ import annotations


class InProcessHistGrid:
    """The hist phase's grid over ``sites`` (node id → loaded site); ``dps`` gives a node's DP terms
    (``client.dp.SiteDP``; a node not in it has no DP)."""

    def __init__(self, sites: dict[int, object], dps: dict[int, object] | None = None) -> None:
        from flwr.app import Context, RecordDict

        from client import hist_handlers as hh
        from client import secure_aggregation
        from shared.protocol import messages as m

        self.sites, self.dps = sites, dict(dps or {})
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in sites}
        answers = {m.HIST_RANGES: hh.answer_ranges, m.HIST_BINS: hh.answer_counts(hh.bin_counts),
                   m.HIST_CELLS: hh.answer_counts(hh.partition_counts), m.HIST_LEVEL: hh.answer_level}
        self.answers = {k.type: hh.session_answer(a) for k, a in answers.items()}
        self.keys, self.keys_type = secure_aggregation.keys, m.HIST_KEYS.type

    def send_and_receive(self, sent):
        from flwr.app import Error, Message

        from client.site import SiteRequest
        from shared.protocol import records as r
        from shared.protocol.errors import ShareableError

        dps = self.dps

        class Request(SiteRequest):
            @property
            def dp(self):
                return dps.get(self.context.node_id)

        for msg in sent:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            try:
                if kind == self.keys_type:
                    reply = self.keys(msg, self.contexts[node])
                else:
                    request = Request(None, self.sites[node], msg.content[r.CONFIG], self.contexts[node])
                    reply = Message(self.answers[kind](msg, request), reply_to=msg)
            except ShareableError as err:
                reply = Message(Error(code=1, reason=str(err)), reply_to=msg)
            yield reply
