"""FedAvg, FedProx, FedAdam or FedYogi whose mean is taken from a pairwise-masked sum: the coordinator never sees
one site's model, only the sum over the round's sites.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(https://eprint.iacr.org/2017/281), §4: the pairwise-mask core (``shared.secure_sum``), without its dropout
recovery. Each site sends the fixed-point words of ``n_i · w_i`` and ``n_i`` (``shared.ann_fixed_point``)
masked with its pairwise masks; the masks cancel in the sum; the wrapper unmasks ``Σ n_i w_i`` and ``Σ n_i``,
divides, and hands the wrapped Flower strategy that mean as if it were a single reply of weight ``Σ n_i``, so
FedAvg / FedProx return it and FedAdam / FedYogi run their server optimiser on it (Reddi et al. 2021) exactly as
on the plain mean.

Protocol. Once per phase (the first round; again only after a round lost a site) the wrapper sends
``query.ann_keys`` with a fresh session id to the sites it trains; each answers a fresh X25519 public key and
keeps the private key in its context state. Every training message then carries the session, the roster's node
ids and public keys; a site masks under the label ``<session>/<server-round>`` and refuses a round number not
above the last it masked in the session (one mask is never used twice: two releases under one mask give away
their difference), and a round it masked before among another set of sites (a resumed run asks its interrupted
round again, under a new session, with the same seeded weights: two sums over different sets would give away the
sites in one and not the other). Sites that fail the key exchange are left out of the phase and named.

What it protects, and from whom. Threat model: an honest-but-curious coordinator that relays keys faithfully (no
man-in-the-middle; the SuperNodes' TLS and authentication are the deployment's), and sites that follow the
protocol. The coordinator learns the round's weighted mean and ``Σ n_i`` — what plain FedAvg publishes anyway —
and each site's metrics (loss, ε, ``num-examples``, already known from the site check or the statistics phase);
a site's words alone are uniform on [0, 2^64) while one other site of the roster is honest. Up to K − 2 sites
colluding with the coordinator learn nothing about the remaining two beyond their sum. Sites see only the global
models, as without masking.

Limits. A site of the roster that does not answer a round (lost, or refusing) leaves its masks in the sum: that
round fails — no aggregate, the global model stays the previous one, the reason is kept in :attr:`failed_rounds`
and the run record — and the next round exchanges keys again among the sites left. Dropout *recovery* (Bonawitz
et al.'s self-masks and Shamir-shared keys, ``shared.secagg_plus``) is not built for ANN rounds. Anything that
needs each site's update refuses masking (:func:`masking_problem`): the robust aggregators (Krum, medians,
trimmed means), update-norm clipping, and central DP's server-side clipping.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from shared import ann_fixed_point
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol import training as t
from shared.secure_sum import MIN_SITES, unmask_sum

MASKABLE_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
"""The strategies whose aggregate is a function of the weighted mean only."""


class SecureAnnError(RuntimeError):
    """A masked round that cannot run: too few sites to hide each among the others."""


def masking_problem(strategy: str, clip_norm: float = 0.0, clip_median_factor: float = 0.0,
                    central_dp: str = "") -> str | None:
    """Why the ANN rounds of a run with these settings cannot be pairwise-masked, or None."""
    if strategy not in MASKABLE_STRATEGIES:
        return (f"pairwise-masked ANN rounds give the coordinator only the sum of the sites' updates, and {strategy} "
                "ranks, scores or trims each site's update (it needs them one by one): masking runs with "
                f"{', '.join(MASKABLE_STRATEGIES)}; choose one of those or --ann-secure-sum off")
    if clip_norm > 0 or clip_median_factor > 0:
        return ("pairwise-masked ANN rounds give the coordinator only the sum of the sites' updates, and update-norm "
                "clipping (--clip-norm / --clip-median-factor) measures and scales each site's update: drop it or "
                "use --ann-secure-sum off")
    if central_dp:
        return ("pairwise-masked ANN rounds give the coordinator only the sum of the sites' updates, and central DP "
                f"({central_dp}) clips each site's update on the coordinator before noising the mean: use "
                "--ann-secure-sum off with central DP (site-side clipping under masks is not built)")
    return None


class PairwiseMaskedMean(Strategy):
    """Take a mean-based Flower strategy's aggregate from the pairwise-masked sum of the sites' weighted weights.

    Implementation of the pairwise masking of Bonawitz et al. 2017 (https://eprint.iacr.org/2017/281, §4) around
    Flower's FedAvg, FedProx, FedAdam or FedYogi.

    Parameters
    ----------
    strategy : FedAvg
        FedAvg or a subclass whose aggregate depends on the weighted mean only (FedProx, FedAdam, FedYogi):
        it samples the nodes, configures the rounds and turns the mean into the next global model.
    nodes : collection of int, optional (default: None, every node the strategy samples)
        The nodes that train (the key exchange and the masks are among these only).
    names : mapping of int to str, optional (default: None, the node ids)
        The sites' names by node id, sent with the roster: a site compares the roster of a round it is asked again
        by name, since node ids change when a run resumes.

    Attributes
    ----------
    roster : dict of int to bytes
        The current session's sites and their public keys (empty until a key exchange, and after a lost site).
    key_exchanges : int
        Key exchanges so far.
    excluded : dict of int to str
        Nodes left out of the masked rounds (failed a key exchange or lost in a round), and why.
    failed_rounds : dict of int to str
        Rounds that produced no aggregate because a site of the roster did not answer, and why.
    """

    def __init__(self, strategy: FedAvg, nodes: Collection[int] | None = None,
                 names: Mapping[int, str] | None = None) -> None:
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"pairwise masking takes the weighted mean of FedAvg and its subclasses; got "
                            f"{type(strategy).__name__}")
        self.strategy = strategy
        self.nodes = None if nodes is None else set(nodes)
        self.names = dict(names or {})
        self.session = ""
        self.roster: dict[int, bytes] = {}
        self.key_exchanges = 0
        self.excluded: dict[int, str] = {}
        self.failed_rounds: dict[int, str] = {}
        self._layout: ann_fixed_point.Layout = []

    def summary(self) -> None:
        log(INFO, "\t├──> Pairwise-masked sum of n·w (Bonawitz et al. 2017 §4), fixed point 2^-%d",
            ann_fixed_point.SCALE_BITS)
        self.strategy.summary()

    def exchange_keys(self, grid: Grid, candidates: list[int]) -> None:
        """A fresh session: every candidate's public key, the ones that fail left out (named in ``excluded``);
        :class:`SecureAnnError` if fewer than two sites answer."""
        self.session = uuid.uuid4().hex
        self.key_exchanges += 1
        config = ConfigRecord({t.SECURE_SESSION: self.session})
        sent = [Message(RecordDict({r.CONFIG: config}), dst_node_id=node, message_type=messages.ANN_KEYS.type)
                for node in candidates]
        keys: dict[int, bytes] = {}
        for reply in grid.send_and_receive(sent):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.excluded[node] = f"key exchange: {reply.error.reason}"
            elif node in candidates:
                keys[node] = bytes(reply.content[r.KEYS][t.PUBLIC_KEY])
        for node in set(candidates) - set(keys):
            self.excluded.setdefault(node, "key exchange: no reply")
        if len(keys) < MIN_SITES:
            raise SecureAnnError(f"pairwise-masked ANN rounds need at least {MIN_SITES} sites to hide each site's "
                                 f"model among the others; {len(keys)} answered the key exchange "
                                 f"({len(candidates)} asked): run with --ann-secure-sum off")
        self.roster = dict(sorted(keys.items()))
        log(INFO, "pairwise-masked ANN rounds: key exchange %d, %d sites", self.key_exchanges, len(self.roster))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        sent = [m for m in self.strategy.configure_train(server_round, arrays, config, grid)
                if self.nodes is None or m.metadata.dst_node_id in self.nodes]
        candidates = sorted(m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in self.excluded)
        if set(candidates) != set(self.roster) or not self.roster:
            self.exchange_keys(grid, candidates)
        self._layout = ann_fixed_point.layout_of({k: a.numpy() for k, a in arrays.items()})
        sent = [m for m in sent if m.metadata.dst_node_id in self.roster]
        for message in sent:  # Flower's strategies give every message one content: one new config for all
            secured = ConfigRecord(dict(message.content[self.strategy.configrecord_key]))
            secured.update({t.SECURE_SESSION: self.session, t.SECURE_NODES: list(self.roster),
                            t.SECURE_KEYS: list(self.roster.values()),
                            t.SECURE_SITES: [self.names.get(n, str(n)) for n in self.roster]})
            content = RecordDict(dict(message.content))
            content[self.strategy.configrecord_key] = secured
            message.content = content
        return sent

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        if not self.roster:
            return None, None
        missing = [node for node in self.roster if node not in answered]
        if missing:
            reasons = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
            why = "; ".join(f"node {n}: {reasons.get(n, 'no reply')}" for n in missing)
            for node in missing:
                self.excluded[node] = f"round {server_round}: {reasons.get(node, 'no reply')}"
            self.failed_rounds[server_round] = (
                f"round {server_round}: {len(missing)} of the {len(self.roster)} sites of the pairwise-masked sum did "
                f"not answer ({why}); their masks stay in the sum, so it cannot be unmasked and the global model is "
                "not updated this round (dropout recovery is not built for ANN rounds); the next round exchanges "
                "keys again among the sites left")
            log(WARNING, "%s", self.failed_rounds[server_round])
            self.roster = {}
            return None, None
        words = [answered[node].content[self.strategy.arrayrecord_key][t.MASKED].numpy() for node in self.roster]
        mean, weight = ann_fixed_point.decode(unmask_sum(words), self._layout)
        synthetic = Message(RecordDict({self.strategy.arrayrecord_key: ArrayRecord({k: Array(np.asarray(v))
                                                                                   for k, v in mean.items()}),
                                        "metrics": MetricRecord({self.strategy.weighted_by_key: weight})}),
                            dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = self.strategy.aggregate_train(server_round, [synthetic])
        metrics = self.strategy.train_metrics_aggr_fn([answered[n].content for n in self.roster],
                                                      self.strategy.weighted_by_key)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
