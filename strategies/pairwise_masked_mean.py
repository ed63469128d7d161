"""FedAvg, FedProx, FedAdam or FedYogi whose mean is taken from a masked sum: the coordinator never sees one site's
model, only the sum over the round's sites.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(https://eprint.iacr.org/2017/281). The masking is the one secure-sum protocol every summing phase uses, injected
as a session (``server.secure_aggregation.SecureSession``: strategies/ do not import the server): its key
exchange, mask labels, two-lane fixed point at 2^-40 and refusals. Each site sends ``n_i · w_i`` and ``n_i``
(``shared.protocol.training.weighted_vector``) in fixed point, masked (``client.secure_aggregation``); the
session unmasks ``Σ n_i w_i`` and ``Σ n_i``, this wrapper divides and hands the wrapped Flower strategy that mean
as if it were a single reply of weight ``Σ n_i``, so FedAvg / FedProx return it and FedAdam / FedYogi run their
server optimiser on it (Reddi et al. 2021) exactly as on the plain mean. Each round is one release of the
session; its masked request is Flower's training message.

What is specific to ANN rounds, and kept here:

- the roster rule: a session lasts while its sites do; the round after a site is lost starts a new session among
  the sites left. ``pairwise`` (§4's masks without recovery): one key exchange per session; a site of the roster
  that does not answer a round leaves its masks in the sum, so that round fails — no aggregate, the global model
  stays the previous one, the reason (naming the site) in :attr:`failed_rounds` and the run record.
  ``recovering`` (the full protocol, Shamir-shared mask keys and self-mask seeds, ``shared.secagg_plus``): every
  round runs its keys and shares rounds before the training message and its unmask round after the replies, so a
  site lost before or after sending its masked weights is recovered, and the round aggregates over the sites whose
  masked weights arrived (up to n − t lost, t the Shamir threshold ⌊n/2⌋ + 1); it fails only past that. Its new
  session costs no message (the keys are drawn per round anyway) and sets t afresh from the sites left, so the
  next round again tolerates ⌊(n − 1)/2⌋ losses rather than what the first threshold leaves.
- the resumed-round check: every training message names the roster's sites, and a site refuses a round it masked
  before among another set of sites (a resumed run asks its interrupted round again, under a new session, with
  the same seeded weights: two sums over different sets would give away the sites in one and not the other;
  ``client.training_handlers.masked_weights``); recovering, it also refuses to unmask a repeated round whose
  senders differ from those it unmasked before (``client.training_handlers.ann_unmask``: the protocol's rounds go
  as ``query.ann_keys`` / ``ann_shares`` / ``ann_unmask`` so the site knows the release is a training round).
- :func:`masking_problem`: anything that needs each site's update refuses masking — the robust aggregators (Krum,
  medians, trimmed means), update-norm clipping, and central DP's server-side clipping.
- the hand-off of the unmasked mean to the wrapped Flower strategy.

Threat model: an honest-but-curious coordinator that relays keys faithfully (no man-in-the-middle; the SuperNodes'
TLS and authentication are the deployment's), and sites that follow the protocol. The coordinator learns the
round's weighted mean and ``Σ n_i`` — what plain FedAvg publishes anyway — and each site's metrics (loss, ε,
``num-examples``, already known from the site check or the statistics phase); a site's words alone are uniform on
[0, 2^64) while one other site of the roster is honest (pairwise), or against the coordinator colluding with fewer
than t sites (recovering). In recovering mode a lost site is recovered by unmasking: the coordinator learns which
sites' weights are in the sum. Sites see only the global models, as without masking. Per-site DP: a DP site
charges its ledger when it trains (the masked training message); the key, share and unmask rounds release fresh
random keys and shares only and charge nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from shared.protocol import records as r
from shared.protocol import training as t
from shared.secure_sum import MIN_SITES, SecureProtocolError

MASKABLE_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
"""The strategies whose aggregate is a function of the weighted mean only."""


class SecureAnnError(RuntimeError):
    """A masked round that cannot run: too few sites to hide each among the others."""


class MaskedSumSession(Protocol):
    """What the strategy uses of the one secure-sum protocol's session (``server.secure_aggregation``)."""

    mode: str
    nodes: list[int]
    lost: dict[int, str]
    summed_nodes: list[int]

    def exchange_keys(self) -> None: ...

    def open_floats(self, extra: dict) -> Any: ...

    def release_config(self, release: Any, node: int) -> ConfigRecord: ...

    def close_floats(self, release: Any, replies: dict[int, RecordDict], failures: dict[int, str],
                     name: str) -> np.ndarray: ...


SessionFactory = Callable[[Grid, list[int]], MaskedSumSession]
"""A new session of the secure sum among the given nodes (its mode the run's: pairwise or recovering)."""


def masking_problem(strategy: str, clip_norm: float = 0.0, clip_median_factor: float = 0.0,
                    central_dp: str = "") -> str | None:
    """Why the ANN rounds of a run with these settings cannot be masked, or None."""
    if strategy not in MASKABLE_STRATEGIES:
        return (f"masked ANN rounds give the coordinator only the sum of the sites' updates, and {strategy} "
                "ranks, scores or trims each site's update (it needs them one by one): masking runs with "
                f"{', '.join(MASKABLE_STRATEGIES)}; choose one of those or --ann-secure-sum off")
    if clip_norm > 0 or clip_median_factor > 0:
        return ("masked ANN rounds give the coordinator only the sum of the sites' updates, and update-norm "
                "clipping (--clip-norm / --clip-median-factor) measures and scales each site's update: drop it or "
                "use --ann-secure-sum off")
    if central_dp:
        return ("masked ANN rounds give the coordinator only the sum of the sites' updates, and central DP "
                f"({central_dp}) clips each site's update on the coordinator before noising the mean: use "
                "--ann-secure-sum off with central DP (site-side clipping under masks is not built)")
    return None


class PairwiseMaskedMean(Strategy):
    """Take a mean-based Flower strategy's aggregate from the masked sum of the sites' weighted weights.

    The secure aggregation of Bonawitz et al. 2017 (https://eprint.iacr.org/2017/281) around Flower's FedAvg,
    FedProx, FedAdam or FedYogi: pairwise masks (§4) or the full protocol with dropout recovery, as the injected
    sessions run it.

    Parameters
    ----------
    strategy : FedAvg
        FedAvg or a subclass whose aggregate depends on the weighted mean only (FedProx, FedAdam, FedYogi):
        it samples the nodes, configures the rounds and turns the mean into the next global model.
    session_factory : callable (Grid, list of int) -> session
        A new secure-sum session among the nodes (``server.secure_aggregation.SecureSession`` in the run's mode,
        pairwise or recovering; :class:`MaskedSumSession`).
    nodes : collection of int, optional (default: None, every node the strategy samples)
        The nodes that train (the key exchange and the masks are among these only).
    names : mapping of int to str, optional (default: None, the node ids)
        The sites' names by node id, sent with the roster: a site compares the roster of a round it is asked again
        by name, since node ids change when a run resumes.

    Attributes
    ----------
    session : MaskedSumSession or None
        The current session (None before the first round, and after a round that failed).
    key_exchanges : int
        Sessions started so far (each a key exchange; recovering: each round also draws fresh keys).
    excluded : dict of int to str
        Nodes left out of the masked rounds (failed a key exchange or lost in a round), and why.
    recovered : dict of int to dict of int to str
        Recovering: per round, the sites lost in it whose masks were removed, and why (the round aggregated over
        the others).
    failed_rounds : dict of int to str
        Rounds that produced no aggregate because the masked sum could not be unmasked, and why.
    """

    def __init__(self, strategy: FedAvg, session_factory: SessionFactory, nodes: Collection[int] | None = None,
                 names: Mapping[int, str] | None = None) -> None:
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"masked sums take the weighted mean of FedAvg and its subclasses; got "
                            f"{type(strategy).__name__}")
        self.strategy = strategy
        self.session_factory = session_factory
        self.nodes = None if nodes is None else set(nodes)
        self.names = dict(names or {})
        self.session: MaskedSumSession | None = None
        self.key_exchanges = 0
        self.excluded: dict[int, str] = {}
        self.recovered: dict[int, dict[int, str]] = {}
        self.failed_rounds: dict[int, str] = {}
        self._release: Any = None
        self._started_with: set[int] = set()  # the sites the session started with
        self._layout: t.Layout = []

    @property
    def roster(self) -> list[int]:
        """The current session's sites (empty without one)."""
        return list(self.session.nodes) if self.session is not None else []

    def summary(self) -> None:
        log(INFO, "\t├──> Masked sum of n·w (Bonawitz et al. 2017; the run's secure sum)")
        self.strategy.summary()

    def start_session(self, grid: Grid, candidates: list[int]) -> None:
        """A new session among ``candidates`` (pairwise: with its key exchange); the sites that fail it are left
        out (named in ``excluded``); :class:`SecureAnnError` if fewer than two are left."""
        session = self.session_factory(grid, candidates)
        self.key_exchanges += 1
        try:
            if session.mode == "pairwise":
                session.exchange_keys()
        except SecureProtocolError:
            pass  # every site failed it: session.lost says why
        self.excluded.update({n: f"key exchange: {why}" for n, why in session.lost.items()})
        if len(session.nodes) < MIN_SITES:
            raise SecureAnnError(f"masked ANN rounds need at least {MIN_SITES} sites to hide each site's model among "
                                 f"the others; {len(session.nodes)} answered the key exchange ({len(candidates)} "
                                 "asked): run with --ann-secure-sum off")
        self.session, self._started_with = session, set(session.nodes)
        log(INFO, "masked ANN rounds (%s): session %d, %d sites", session.mode, self.key_exchanges, len(session.nodes))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        sent = [m for m in self.strategy.configure_train(server_round, arrays, config, grid)
                if self.nodes is None or m.metadata.dst_node_id in self.nodes]
        candidates = sorted(m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in self.excluded)
        if self.session is None or set(candidates) != self._started_with:  # the roster rule (module docstring)
            self.start_session(grid, candidates)
        self._layout = t.layout_of({k: a.numpy() for k, a in arrays.items()})
        self._release = None
        try:
            release = self.session.open_floats({})  # recovering: this round's keys and shares rounds
        except SecureProtocolError as err:
            self.exclude_lost(server_round)
            self.fail(server_round, f"round {server_round}: the masked sum could not start ({err}); the global "
                                    "model is not updated this round")
            return []
        self.exclude_lost(server_round)
        sites = [self.names.get(n, str(n)) for n in self.session.nodes]
        sent = [m for m in sent if m.metadata.dst_node_id in self.session.nodes]
        for message in sent:  # Flower's strategies give every message one content: one new config per node
            secured = ConfigRecord(dict(message.content[self.strategy.configrecord_key]))
            secured.update(dict(self.session.release_config(release, message.metadata.dst_node_id)))
            secured[t.ROSTER_NAMES] = sites
            content = RecordDict(dict(message.content))
            content[self.strategy.configrecord_key] = secured
            message.content = content
        self._release = release
        return sent

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        session, release, self._release = self.session, self._release, None
        if session is None or release is None:
            return None, None
        answered = {m.metadata.src_node_id: m for m in replies
                    if not m.has_error() and m.metadata.src_node_id in session.nodes}
        reasons = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
        failures = {n: reasons.get(n, "no reply") for n in session.nodes if n not in answered}
        masked = {n: RecordDict({r.ARRAYS: m.content[self.strategy.arrayrecord_key]}) for n, m in answered.items()}
        try:
            sums = session.close_floats(release, masked, failures, t.MASKED)
        except SecureProtocolError as err:
            why = "; ".join(f"node {n}: {reason}" for n, reason in failures.items()) or str(err)
            self.excluded.update({n: f"round {server_round}: {reason}" for n, reason in failures.items()})
            hint = ("their masks stay in the sum, so it cannot be unmasked (pairwise masks; --ann-secure-sum "
                    "recovering recovers lost sites)" if session.mode == "pairwise" else
                    f"the masked sum cannot be recovered: {err.reason}")
            self.fail(server_round, f"round {server_round}: {len(failures)} of the {len(failures) + len(answered)} "
                                    f"sites of the masked sum did not answer ({why}); {hint}; the global model is "
                                    "not updated this round, and the next round starts a new session among the "
                                    "sites left")
            return None, None
        self.exclude_lost(server_round)
        if failures:
            self.recovered[server_round] = dict(failures)
            log(WARNING, "round %d: %d site(s) lost and recovered by unmasking (%s); the mean is over the %d whose "
                "masked weights arrived", server_round, len(failures),
                "; ".join(f"node {n}: {why}" for n, why in failures.items()), len(session.summed_nodes))
        mean, weight = t.weighted_mean(sums, self._layout)
        synthetic = Message(RecordDict({self.strategy.arrayrecord_key: ArrayRecord({k: Array(np.asarray(v))
                                                                                   for k, v in mean.items()}),
                                        "metrics": MetricRecord({self.strategy.weighted_by_key: weight})}),
                            dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = self.strategy.aggregate_train(server_round, [synthetic])
        metrics = self.strategy.train_metrics_aggr_fn([answered[n].content for n in session.summed_nodes],
                                                      self.strategy.weighted_by_key)
        return arrays, metrics

    def exclude_lost(self, server_round: int) -> None:
        """The sites the session lost (a round of the protocol they did not answer) are left out of later rounds."""
        if self.session is not None:
            self.excluded.update({n: f"round {server_round}: {why}" for n, why in self.session.lost.items()
                                  if n not in self.excluded})

    def fail(self, server_round: int, reason: str) -> None:
        """A round without an aggregate: the reason kept and logged; the next round starts a new session."""
        self.failed_rounds[server_round] = reason
        log(WARNING, "%s", reason)
        self.session = None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
