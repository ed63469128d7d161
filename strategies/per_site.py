"""A wrapper that keeps each site's reply metrics per round, around any Flower strategy.

Flower's strategies aggregate replies and keep only the aggregate; a coordinator also needs to see each
site: its ε spent per round, its training loss, its evaluation summary, and which sites failed and why.
Like Flower's own DP wrappers (``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``), this wraps
an existing strategy and delegates every decision to it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared.protocol.records import PRIVACY
from shared.protocol.training import EVALUATE_RECEIVED, RECEIVED_EVALUATION


@dataclass
class SiteRounds:
    """Per-round, per-node records: metrics of the replies, and the reasons of failed replies."""

    train: dict[int, dict[int, dict]] = field(default_factory=dict)  # round -> node -> metrics
    evaluate: dict[int, dict[int, dict]] = field(default_factory=dict)
    failures: dict[int, dict[int, str]] = field(default_factory=dict)  # round -> node -> reason
    privacy: dict[int, dict[int, dict]] = field(default_factory=dict)  # round -> node -> a DP release's facts


def shared_metric_keys(replies: list[Message]) -> list[Message]:
    """``replies`` with each MetricRecord cut to the keys every reply's has. Flower's strategies refuse to
    aggregate replies whose metrics differ in keys, and a federation's sites may: a DP site reports its ε and
    no training loss, a site without DP the loss. What each site sent is recorded before this
    (:meth:`PerSiteRecord._record`); the weighting key (``num-examples``) is in every reply."""
    answered = [reply for reply in replies if not reply.has_error()]
    if not answered:
        return replies
    shared = set.intersection(*(set(k for record in reply.content.metric_records.values() for k in record)
                                for reply in answered))
    for reply in answered:
        for name, record in reply.content.metric_records.items():
            if set(record) != shared:
                reply.content[name] = MetricRecord({k: v for k, v in record.items() if k in shared})
    return replies


class PerSiteRecord(Strategy):
    """Record every site's reply metrics, then let ``strategy`` aggregate as usual.

    Parameters
    ----------
    strategy : Strategy
        The strategy that samples nodes and aggregates (FedAvg, FedProx, FedAdam, ...).
    on_round : callable, optional (default: None)
        Called with the round number once a round's evaluation replies are in (progress displays).
    action : str, optional (default: None)
        Route the strategy's messages to the ClientApp's ``@app.train(action)`` / ``@app.evaluate(action)``
        functions (message types ``train.<action>`` / ``evaluate.<action>``), so one ClientApp can serve
        several models.
    train_nodes : collection of int, optional (default: None, every node)
        Send training only to these nodes (the others have refused the phase, e.g. sites under DP for a
        model with no DP form): the strategy's own sampling still decides among them.
    evaluate_nodes : collection of int, optional (default: None, every node)
        Send evaluation only to these nodes.
    final_round_only : collection of int, optional (default: ())
        Nodes evaluated at the final round only (``final_round``): sites under DP, whose every evaluation is a
        release charged to their budget.
    final_round : int, optional (default: 0)
    on_progress : callable, optional (default: None)
        Called with the round number after each aggregation, training and evaluation alike (a round under DP
        may have no evaluation): the coordinator writes its progress record there.
    one_message_nodes : collection of int, optional (default: ())
        Nodes whose rounds are one exchange: from round 2 the training message asks them to evaluate the model
        it carries (round r − 1's aggregate) before training (``shared.protocol.training.EVALUATE_RECEIVED``),
        and their replies' summaries are recorded as round r − 1's evaluation; they are sent evaluation
        messages at the final round only. ``on_round(r)`` then comes when round r's evaluations are in, with
        round r + 1's training replies. The rounds' figures are those of the two-exchange round; R rounds take
        R + 1 exchanges instead of 2R.
    """

    def __init__(self, strategy: Strategy, on_round: Callable[[int], None] | None = None,
                 action: str | None = None, train_nodes: Collection[int] | None = None,
                 evaluate_nodes: Collection[int] | None = None, final_round_only: Collection[int] = (),
                 final_round: int = 0, on_progress: Callable[[int], None] | None = None,
                 one_message_nodes: Collection[int] = ()) -> None:
        self.strategy = strategy
        self.on_round = on_round
        self.on_progress = on_progress
        self.action = action
        self.train_nodes = None if train_nodes is None else set(train_nodes)
        self.evaluate_nodes = None if evaluate_nodes is None else set(evaluate_nodes)
        self.final_round_only = set(final_round_only)
        self.final_round = final_round
        self.one_message_nodes = set(one_message_nodes)
        self.rounds = SiteRounds()
        self._sent: list[int] = []  # destination nodes of the last configured messages

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self._evaluates_received(server_round):
            config = ConfigRecord({**dict(config), EVALUATE_RECEIVED: server_round - 1})
        return self._routed(self.strategy.configure_train(server_round, arrays, config, grid), self.train_nodes)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(self.rounds.train, server_round, replies)
        if self._evaluates_received(server_round):
            evaluated = self.rounds.evaluate.setdefault(server_round - 1, {})
            for reply in replies:
                if not reply.has_error() and RECEIVED_EVALUATION in reply.content:
                    evaluated[reply.metadata.src_node_id] = dict(reply.content[RECEIVED_EVALUATION])
        aggregated = self.strategy.aggregate_train(server_round, shared_metric_keys(replies))
        if self.on_progress is not None:
            self.on_progress(server_round)
        if self._evaluates_received(server_round) and self.on_round is not None:
            self.on_round(server_round - 1)
        return aggregated

    def _evaluates_received(self, server_round: int) -> bool:
        """Whether this round's training messages carry (and replies bring back) the evaluation of round
        ``server_round - 1``'s model at the one-message nodes."""
        return bool(self.one_message_nodes) and server_round > 1

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        allowed = self.evaluate_nodes
        later = self.final_round_only | self.one_message_nodes  # asked apart at the final round only
        if server_round != self.final_round and later:
            base = allowed if allowed is not None else set(grid.get_node_ids())
            allowed = base - later
        return self._routed(self.strategy.configure_evaluate(server_round, arrays, config, grid), allowed)

    def _routed(self, messages: Iterable[Message], allowed: set[int] | None = None) -> list[Message]:
        messages = [m for m in messages if allowed is None or m.metadata.dst_node_id in allowed]
        self._sent = [m.metadata.dst_node_id for m in messages]
        if self.action is not None:
            for message in messages:
                message.metadata.message_type = f"{message.metadata.message_type}.{self.action}"
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._record(self.rounds.evaluate, server_round, replies)
        aggregated = self.strategy.aggregate_evaluate(server_round, shared_metric_keys(replies))
        if self.on_progress is not None:
            self.on_progress(server_round)
        if self.on_round is not None and (server_round == self.final_round or not self.one_message_nodes):
            self.on_round(server_round)  # else with the next round's training replies (aggregate_train)
        return aggregated

    def _record(self, table: dict[int, dict[int, dict]], server_round: int, replies: list[Message]) -> None:
        per_node = table.setdefault(server_round, {})
        answered = {r.metadata.src_node_id for r in replies}
        # When a node is lost, the SuperLink answers in its place with an error reply from the SuperLink's
        # own node id: give that failure to the node that did not answer, so the record names the site.
        silent = [n for n in self._sent if n not in answered]
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._sent and silent:
                node = silent.pop(0)
            if reply.has_error():
                self.rounds.failures.setdefault(server_round, {})[node] = reply.error.reason
                continue
            merged: dict = {}
            for record in reply.content.metric_records.values():
                merged.update(dict(record))
            per_node[node] = merged
            if PRIVACY in reply.content:
                self.rounds.privacy.setdefault(server_round, {})[node] = dict(reply.content[PRIVACY])
