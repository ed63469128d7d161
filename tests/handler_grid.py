"""A stand-in for Flower's Grid that hands each message to the real site handlers in-process, and can lose a node.

The secure-sum tests drive a server phase (statistics, analytics) over the sites' own handlers without Flower's
runtime: :class:`HandlerGrid` answers the secure-sum rounds (``client.secure_aggregation.SECURE_ROUNDS``) with
the node's context, and every other message type with ``answers[type](msg, request(node, msg, context))``.
``lost_at[node] = (message type, n-th such message, whether its answer still arrives)`` loses the node there
(before or after it answers) and for every later message.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict

from client import secure_aggregation as sa
from shared.protocol.errors import ShareableError


class HandlerGrid:
    """Flower's Grid as far as a server phase uses it; subclasses give ``answers`` and :meth:`request`."""

    answers: dict = {}

    def __init__(self, nodes) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in nodes}
        self.rounds = {m.type: handler for m, handler in sa.SECURE_ROUNDS.items()}
        self.calls: list[str] = []
        self.replies: list[tuple[str, int, RecordDict | None]] = []  # message type, node, reply (None: error)
        self.lost_at: dict[int, tuple[str, int, bool]] = {}
        self.seen: dict[tuple[int, str], int] = {}
        self.gone: set[int] = set()

    def request(self, node: int, msg: Message, context: Context):
        """The ``client.site.SiteRequest`` stand-in the node's handler gets."""
        raise NotImplementedError

    def send_and_receive(self, sent, timeout=None):
        if sent:
            self.calls.append(sent[0].metadata.message_type)
        for msg in sent:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.seen[node, kind] = self.seen.get((node, kind), 0) + 1
            if node in self.lost_at and self.lost_at[node][:2] == (kind, self.seen[node, kind]):
                self.gone.add(node)
                if self.lost_at[node][2]:
                    yield self.answer(msg, node, kind)  # its answer arrives, then the node is gone
            if node in self.gone:
                continue
            yield self.answer(msg, node, kind)

    def answer(self, msg: Message, node: int, kind: str) -> Message:
        context = self.contexts[node]
        try:
            if kind in self.rounds:
                reply = self.rounds[kind](msg, context)
            else:
                reply = Message(self.answers[kind](msg, self.request(node, msg, context)), reply_to=msg)
        except ShareableError as err:
            reply = Message(Error(code=1, reason=str(err)), reply_to=msg)
        self.replies.append((kind, node, None if reply.has_error() else reply.content))
        return reply
