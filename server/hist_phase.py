"""The server's histogram-boosting phase: federated trees grown from summed gradient/hessian histograms.

Histogram-based federated gradient boosting (the split search of XGBoost's ``hist`` method, Chen & Guestrin,
KDD 2016, run on summed per-site histograms as in SecureBoost, Cheng et al. 2021, and NVIDIA FLARE's
histogram-based federated XGBoost), over Flower's Grid with query messages (records in, records out):

1. ``query.hist_ranges`` — every site's per-feature min / max; the server keeps the overall ones.
2. secure summation (``HistSettings.secure_sum``, default ``pairwise``; the session is
   ``server.secure_aggregation.SecureSession``, the one the statistics and analytics phases use, with its
   rounds named ``query.hist_*`` here): ``pairwise`` — ``query.hist_keys``
   once: every site's X25519 public key, relayed to all with every later request, whose summed releases come
   back masked (``shared.secure_sum``: one exchange per release); ``recovering`` — every summed release below
   (counts and level histograms) runs the four rounds of Bonawitz et al.'s secure aggregation with dropout
   recovery (``shared.secagg_plus``): ``query.hist_keys`` (fresh public keys), ``query.hist_shares``
   (encrypted Shamir shares, relayed), the request itself answered masked, ``query.hist_unmask`` (shares for
   unmasking); four exchanges per release, so only where lost sites are expected; ``off`` — plain sums.
3. ``query.hist_bins`` — grid counts per feature, summed; then up to ``REFINE_PASSES`` times
   ``query.hist_cells`` — counts on the grid with its crowded cells split, summed; the server cuts global
   bins (``shared.hist_boosting.global_thresholds``) and sends them with the first level request only.
4. per boosting round, per depth level above the deepest: one ``query.hist_level`` for every head together
   (``HistSettings.batch_heads``, the default: the round's trees of all heads grow level by level side by side,
   one exchange per level instead of one per head and level; ``shared.protocol.hist.HEADS``), with the routing
   of each head's growing trees (and, with a round's first level, its previous round's finished trees: a site
   keeps every head's model, so no tree crosses twice); every site answers the fixed-point histograms of the
   requested frontier nodes of every head (at the root, every root; below, one child of each split, the
   sibling being parent − child: LightGBM's histogram subtraction), each feature's own bins only, all heads'
   in one vector that is one secure sum; the server sums them and decides each head's splits and leaf weights
   (``shared.hist_boosting.LevelGrower``). The deepest level's leaves take their sums from their parents. A
   head's trees are those it would grow alone (its histograms are the same sums); a head whose trees stopped
   growing drops out of the next levels' requests. ``batch_heads=False`` grows the heads one after the other
   (the exchanges of the code before, kept to measure against).

Only the first request of the phase carries the feature encoder (9 kB of JSON); a site keeps it under the
session id (``secure-session``, drawn per phase even without masking) and answers later requests with it.

The heads are those of ``shared.boosting.heads`` (one binary booster per class of a multiclass outcome, as
bagging, cyclic and the pooled baseline use), so the outcome (XGBoost JSON per head) feeds the same
evaluation, importance and report. ``HistSettings.softmax`` grows one ``multi:softprob`` model per
multiclass outcome instead (key: the outcome name), for callers that predict it themselves.

With DP and masking off the trees equal those of ``shared.hist_learner.HistGradientBoosting`` on the pooled
training rows with the same bins, bit for bit (fixed-point sums do not depend on the order of addition). A site
that fails ``query.hist_ranges`` (or the pairwise key exchange) is left out of the phase. With pairwise masks,
any failure later stops the heads of the request it happened in (all heads when they are batched; their finished
rounds are kept): its masks would stay in the sum. Recovering or off, a site lost later (an error or no reply, in
any round of a sum) is left out for the rest of the phase: the sum it was lost in is recovered over the sites
whose answers arrived (with masking, by the unmasking round, up to n − t lost: ``secure_threshold``), and a
boosting round that lost a site while growing is grown again from its root on the remaining sites' rows (its
levels must all sum the same rows: a child's sibling is its parent minus it); finished rounds stay. Once more
than n − t sites are lost, or none is left, the heads stop (their finished rounds are kept). Regrown levels are
releases beyond the announced ``dp-releases``: a DP site refuses them, and is lost.

Under DP, every head's histograms of a level are a release of their own (``dp-release-index + i`` for the
request's i-th head), noised and charged as when the heads grow one at a time: a batched request holds as many
releases as the separate requests did, each with the same σ and sensitivity, so the phase announces and spends
the same ε; only their numbering interleaves the heads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from server.boosting_phase import BoostingOutcome, boosting_round, evaluate_boosters
from server.run_record import RunRecord, add_privacy
from server.secure_aggregation import SecureProtocolError, SecureSession
from server.settings import RunSettings
from server.site_check import SiteCheck
from shared import hist_boosting as hb
from shared import hist_wire, wire_ints
from shared.boosting import BASE_SCORES, Head, heads
from shared.bounds import declared_range
from shared.encoding import ENCODER_CONFIG_KEY, FeatureEncoder
from shared.hist_bounds import check_counts, check_level
from shared.hist_records import merge, thresholds_record, trees_record
from shared.protocol import hist as h
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import head_to_config
from shared.protocol.privacy import RELEASE_INDEX, RELEASES
from shared.sum_bounds import Contributors, InfeasibleSum
from shared.xgboost_json import export_model

TRAFFIC_FILE = "xgb_hist_traffic.json"
OBJECTIVES = {"binary": "binary:logistic", "regression": "reg:squarederror", "multiclass": "multi:softprob"}


SumCheck = Callable[[np.ndarray, list[int], bool], None]
"""A summed release's feasibility check (``shared.hist_bounds``): the decoded int64 sum (or one site's own
release), the sites in it, and whether it is one site's alone; raises InfeasibleSum."""


class RoundRegrow(RuntimeError):
    """Sites were lost while a boosting round grew: its levels no longer sum the same rows, so it starts over."""


HistProtocolError = SecureProtocolError
"""A site did not answer a histogram request, or the secure sum cannot be recovered (``server.secure_aggregation``)."""


@dataclass
class HistOutcome(BoostingOutcome):
    """The boosting outcome, plus the trees by head key (per round), the bins, the traffic by direction and the
    message exchanges (one request to every site and their replies) by message type."""

    trees: dict[str, list[list[hb.Tree]]] = field(default_factory=dict)
    thresholds: list[np.ndarray] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    exchanges: dict[str, int] = field(default_factory=dict)
    infeasible: dict = field(default_factory=dict)  # site (or "sum") → the bound its release broke


@dataclass(frozen=True)
class HistSettings:
    """Settings of the histogram-boosting phase.

    Parameters
    ----------
    rounds : int, default 20          boosting rounds per head
    tree : TreeParams                 learning rate, depth, λ, γ, min_child_weight
    max_bin : int, default 256
    secure_sum : str, default "pairwise"   how every site's grid counts and histograms are summed
                                      (``shared.protocol.hist.SECURE_SUM_MODES``): off | pairwise (masks,
                                      needs >= 2 sites) | recovering (masks with dropout recovery,
                                      ``shared.secagg_plus``); True / False are taken as pairwise / off
    secure_threshold : int, default 0 recovering: Shamir threshold t of the secure sums (0: ⌊n/2⌋ + 1 of the
                                      sites that start the phase); up to n − t sites may be lost, one sum at a time
    dp_gradient_clip : float, default 3.0   clip of squared-error gradients at DP sites (standardised target)
    softmax : bool, default False     one softmax model per multiclass outcome instead of one-vs-rest heads
    batch_heads : bool, default True  grow a round's trees of every head in the same level requests (one exchange
                                      per level); False: head after head, one exchange per head and level
    """

    rounds: int = 20
    tree: hb.TreeParams = hb.TreeParams()
    max_bin: int = hb.MAX_BIN
    secure_sum: str = "pairwise"
    secure_threshold: int = 0
    dp_gradient_clip: float = 3.0
    softmax: bool = False
    batch_heads: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "secure_sum", h.secure_sum_mode(self.secure_sum))

    @classmethod
    def from_run_settings(cls, settings: RunSettings) -> HistSettings:
        """The run's boosting settings (rounds, eta, depth, secure sum) with XGBoost's defaults for the rest."""
        return cls(rounds=settings.xgb_rounds, tree=hb.TreeParams(learning_rate=settings.xgb_eta,
                                                                  max_depth=settings.xgb_max_depth,
                                                                  scale_bits=settings.xgb_scale_bits),
                   secure_sum=settings.secure_sum, batch_heads=settings.xgb_hist_batch_heads)

    def releases(self, n_heads: int) -> int:
        """Most noised releases of the phase at a DP site (announced, so it sets its noise for all of them): the
        grid counts and their refinements, then every level of every head's trees but the deepest (whose leaves
        are summed from their parents' histograms), one release per head and level whether or not the heads
        share a request."""
        return 1 + hb.REFINE_PASSES + n_heads * self.rounds * max(1, self.tree.max_depth)


@dataclass(frozen=True)
class HeadSpec:
    """One model to grow: which labels, which objective, its key in the outcome."""

    key: str
    outcome: str
    kind: str  # binary | regression | multiclass
    positive_class: int = -1
    n_classes: int = 0
    label_bound: float | None = None  # regression: largest |standardised label| the declared range allows

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.kind]

    @property
    def n_outputs(self) -> int:
        return hb.n_outputs(self.objective, self.n_classes)

    @property
    def base_score(self) -> float:
        return BASE_SCORES.get(self.kind, 0.5)


def head_specs(encoder: FeatureEncoder, softmax: bool) -> list[HeadSpec]:
    """The models of the phase: the boosting heads, or softmax models for multiclass outcomes."""
    specs = []
    for outcome in encoder.task.outcomes:
        if softmax and outcome.kind == "multiclass":
            n_classes = len(encoder.classes_[outcome.name])
            specs.append(HeadSpec(outcome.name, outcome.name, "multiclass", n_classes=n_classes))
    done = {s.outcome for s in specs}
    for head in heads(encoder):
        if head.outcome not in done:
            positive = -1 if head.positive_class is None else head.positive_class
            bound = label_bound(encoder, head.outcome) if head.kind == "regression" else None
            specs.append(HeadSpec(head.key, head.outcome, head.kind, positive, label_bound=bound))
    return specs


def label_bound(encoder: FeatureEncoder, outcome: str) -> float | None:
    """The largest |label| of a regression outcome once standardised, from its declared range (None without
    one); a millionth more, for the float32 labels the sites hold."""
    bounds = declared_range(encoder.task, outcome)
    if bounds is None:
        return None
    mean, scale = encoder.target_means_[outcome], encoder.target_scales_[outcome]
    return max(abs(bounds[0] - mean), abs(bounds[1] - mean)) / scale * (1.0 + 1e-6)


DP_HESSIAN_NOISE_SDS = 3.0
"""With DP sites, a child needs a summed hessian this many noise sds above zero (its cumulative noise over a
feature's bins) before a split may create it: splits and leaf weights −G/(H + λ) on hessians the noise could
have made up are noise, and a near-zero noisy H gives an unbounded leaf (measured without this floor: 5 DP
clinics at ε 0.6 for 243 releases grew trees of response AUC 0.48 and efficacy R² −4.9e5)."""


class HistSession(SecureSession):
    """One run of the protocol with a fixed set of sites: the secure-sum session of ``server.secure_aggregation``
    (its key, share and unmask rounds as ``query.hist_keys``, ``query.hist_shares``, ``query.hist_unmask``), the
    phase's base config (the encoder with the first request only), DP releases numbered one per summed count
    release and one per head of a level request (a level request of k heads is one secure sum and k releases).

    Every summed release is checked against what is public (``shared.hist_bounds``): ``declared`` (site id → its
    site-check row count, None for a site that declared none) caps the training rows each site reports. With
    ``secure-sum = off`` a site whose own release is infeasible is dropped (lost for the rest of the phase,
    named in ``infeasible``; a round it was dropped in is regrown without it); an infeasible masked sum is
    refused (``HistProtocolError`` naming the release, the entry and the bound: the heads stop as when a site
    is lost)."""

    def __init__(self, grid: Grid, nodes: list[int], base_config: ConfigRecord, settings: HistSettings,
                 n_heads: int, declared: dict[int, float | None] | None = None) -> None:
        base_config.update({RELEASES: settings.releases(n_heads), h.GRADIENT_CLIP: settings.dp_gradient_clip})
        super().__init__(grid, nodes, settings.secure_sum, base_config, settings.secure_threshold,
                         (messages.HIST_KEYS, messages.HIST_SHARES, messages.HIST_UNMASK))
        self.settings = settings
        self.n_rows: int | None = None  # the sites' training rows, when every site said: compact encodings
        self.encoder_sent = False  # after the first request, sites answer with the encoder they kept
        self.thresholds_sent = False  # after the first level request, sites route with the bins they kept
        self.models_sent: set[tuple[str, int]] = set()  # (head, round) whose finished trees every site kept
        self.release_index = 0  # the next DP release's index: one per summed count, one per head of a level
        self.exchanges: dict[str, int] = {}  # message exchanges by message type (every round of a secure sum)
        self.declared = dict(declared or {})  # site → its site-check row count (None: declared none, DP)
        self.site_rows: dict[int, int] = {}  # site → the training rows it reported (hist ranges; none under DP)
        self.infeasible: dict[int | str, str] = {}  # site (or "sum") → the bound its release broke
        self.pending_check: SumCheck | None = None  # the check of the release being summed

    def tree_params(self, objective: str) -> hb.TreeParams:
        """The trees' parameters, with ``min_child_weight`` raised above the noise of DP sites' hessians."""
        latest: dict[int, float] = {}
        for node, facts in self.privacy:
            latest[node] = float(facts["noise-sd"])
        if not latest:
            return self.settings.tree
        per_bin = np.sqrt(sum(sd ** 2 for sd in latest.values())) * hb.HESSIAN_BOUNDS[objective]
        floor = DP_HESSIAN_NOISE_SDS * per_bin * np.sqrt(self.settings.max_bin)
        return dataclasses.replace(self.settings.tree,
                                   min_child_weight=max(self.settings.tree.min_child_weight, float(floor)))

    def request_config(self, with_base: bool) -> ConfigRecord:
        """The base config without the encoder after the session's first request (sites keep it)."""
        if not with_base:
            return super().request_config(False)
        config = ConfigRecord({k: v for k, v in self.base.items()
                               if not (self.encoder_sent and k == ENCODER_CONFIG_KEY)})
        self.encoder_sent = True
        return config

    def summed(self, message_type: messages.MessageName, extra: dict, arrays: ArrayRecord, name: str,
               bits: np.ndarray | None = None, signed: np.ndarray | bool = False, releases: int = 1,
               check: SumCheck | None = None) -> np.ndarray:
        """:meth:`SecureSession.summed` of a request holding ``releases`` DP releases (one per head of a level
        request), numbered from ``dp-release-index``; an index is never used twice, a failed sum's included.
        ``check``: the release's feasibility check (:meth:`close_release`)."""
        first = self.release_index
        self.release_index += releases
        self.pending_check = check
        try:
            return super().summed(message_type, {**extra, RELEASE_INDEX: first}, arrays, name, bits, signed)
        finally:
            self.pending_check = None

    def close_release(self, release, replies: dict[int, RecordDict], failures: dict[int, str], name: str,
                      bits: np.ndarray | None = None, signed: np.ndarray | bool = False) -> np.ndarray:
        """:meth:`SecureSession.close_release`, then the release's feasibility check (``pending_check``): with
        ``secure-sum = off`` on each site's own release (an infeasible site is lost, and the sum taken over the
        others), else on the sum (HistProtocolError when it is infeasible)."""
        total = super().close_release(release, replies, failures, name, bits, signed)
        check = self.pending_check
        if check is None:
            return total
        if self.mode != "off":
            try:
                check(total, list(self.summed_nodes), False)
            except InfeasibleSum as err:
                self.infeasible["sum"] = str(err)
                raise HistProtocolError(-1, str(err)) from None
            return total
        dropped = {}
        for node in self.summed_nodes:
            own = replies[node][r.ARRAYS][name].numpy()
            if bits is not None:
                own = wire_ints.decode(wire_ints.unpack(own, bits), bits, signed)
            try:
                check(np.asarray(own, dtype=np.int64), [node], True)
            except InfeasibleSum as err:
                dropped[node] = f"dropped: {err}"
        if not dropped:
            return total
        self.infeasible.update(dropped)
        self.lose(dropped)
        return super().close_release(release, {n: replies[n] for n in self.nodes}, {}, name, bits, signed)

    def contributors(self, nodes: list[int]) -> Contributors:
        """What is public about the sites of one release (``shared.sum_bounds``): the training rows they
        reported (else their site-check row counts; None if one of them said neither, a DP site) and the noise
        sd each DP site stated with its last reply."""
        rows = [self.site_rows.get(n, self.declared.get(n)) for n in nodes]
        noise = []
        for node in nodes:
            reply = self.replies.get(node)
            stated = [float(reply[k]["noise-sd"]) for k in (reply or {}) if str(k).startswith(r.PRIVACY)
                      and "noise-sd" in reply[k]]
            if stated:
                noise.append(max(stated))
        return Contributors.of(rows, noise)

    def rows_exact(self, nodes: list[int]) -> bool:
        """Whether every site of ``nodes`` reported its training rows (a count release then adds to them)."""
        return all(n in self.site_rows for n in nodes)

    def ask_all(self, message_type: messages.MessageName, extra: dict, arrays: ArrayRecord,
                per_node: dict[int, dict] | None = None, with_base: bool = True) -> tuple[dict, dict[int, str]]:
        """:meth:`SecureSession.ask_all`, keeping the DP facts of every head of a level reply too
        (``shared.protocol.hist.privacy_key``), in the request's order."""
        replies, failures = super().ask_all(message_type, extra, arrays, per_node, with_base)
        self.exchanges[message_type.type] = self.exchanges.get(message_type.type, 0) + 1
        for node, reply in replies.items():
            i = 0
            while h.privacy_key(i) in reply:
                self.privacy.append((node, dict(reply[h.privacy_key(i)])))
                i += 1
        return replies, failures

    def summed_counts(self, message_type: messages.MessageName, arrays: ArrayRecord, n_counts: int,
                      cells: list[int]) -> np.ndarray:
        """Summed row counts (float64, flat): whole numbers in ``count_bits(n_rows)`` bits each when the sites'
        rows are known, else (DP) the 64-bit fixed-point sum of noised counts. ``cells``: each feature's cells,
        in order (the release is checked by ``shared.hist_bounds.check_counts``)."""

        def decoded(total: np.ndarray) -> np.ndarray:
            if self.n_rows is None:
                return hb.from_fixed(total).reshape(-1)
            return np.asarray(total, dtype=np.float64).reshape(-1)

        def check(total: np.ndarray, nodes: list[int], alone: bool) -> None:
            counts = np.split(decoded(total), np.cumsum(cells)[:-1])
            check_counts(f"hist boosting: {message_type.action}", counts, self.contributors(nodes),
                         self.rows_exact(nodes))

        if self.n_rows is None:
            return decoded(self.summed(message_type, {}, arrays, h.COUNTS, check=check))
        width = hist_wire.count_bits(self.n_rows)
        bits = np.full(n_counts, width, dtype=np.int64)
        return decoded(self.summed(message_type, {h.COUNT_BITS: width}, arrays, h.COUNTS, bits, check=check))


def global_ranges(session: HistSession, failures: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """The overall min and max of every encoded feature (0, 0 for a feature no site has values of).

    Sites that cannot answer are left out of the session (and named in ``failures``), and so is a site that
    reports more training rows than its site check declared (named in ``session.infeasible`` too).
    """
    replies, failed = session.ask_all(messages.HIST_RANGES, {}, ArrayRecord())
    failures.update(failed)
    for node, reply in list(replies.items()):
        if h.ROWS not in reply[r.ARRAYS]:
            continue
        rows, cap = int(reply[r.ARRAYS][h.ROWS].numpy()[0]), session.declared.get(node)
        if rows < 0 or (cap is not None and rows > cap):
            reason = ("dropped: hist boosting: its training rows must lie in [0, its declared row count (site "
                      "check)]")
            session.infeasible[node] = failures[node] = reason
            del replies[node]
            continue
        session.site_rows[node] = rows
    session.nodes = [n for n in session.nodes if n in replies]
    if not replies:
        raise HistProtocolError(-1, "no site could report its feature ranges: nothing to train on")
    if all(h.ROWS in reply[r.ARRAYS] for reply in replies.values()):  # no DP site: compact encodings
        session.n_rows = int(sum(session.site_rows[node] for node in replies))
    lo = np.min([reply[r.ARRAYS][h.RANGE_MIN].numpy() for reply in replies.values()], axis=0)
    hi = np.max([reply[r.ARRAYS][h.RANGE_MAX].numpy() for reply in replies.values()], axis=0)
    empty = ~np.isfinite(lo)
    lo[empty], hi[empty] = 0.0, 0.0
    return lo, hi


def global_thresholds(session: HistSession, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Bins every site shares: summed grid counts, refined where rows crowd, cut into ``max_bin`` bins per feature."""
    grid = session.summed_counts(messages.HIST_BINS, ArrayRecord({h.LO: Array(lo), h.HI: Array(hi)}),
                                 len(lo) * hb.N_CELLS, [hb.N_CELLS] * len(lo)).reshape(len(lo), hb.N_CELLS)

    def summed_cell_counts(bounds: list[np.ndarray]) -> list[np.ndarray]:
        values, offsets = hb.pack_thresholds(bounds)
        arrays = ArrayRecord({h.CELL_BOUNDS: Array(values), h.CELL_OFFSETS: Array(offsets)})
        counts = session.summed_counts(messages.HIST_CELLS, arrays, int(offsets[-1]) + len(bounds),
                                       [len(b) + 1 for b in bounds])
        return np.split(counts, np.cumsum([len(b) + 1 for b in bounds])[:-1])

    return hb.global_thresholds(grid, lo, hi, summed_cell_counts, session.settings.max_bin)


@dataclass
class GrowingHead:
    """One head's boosting round while it grows: its trees so far, and what the server proved of its rows."""

    spec: HeadSpec
    finished: list[list[hb.Tree]]
    params: hb.TreeParams
    grower: hb.LevelGrower
    config: dict
    floor: int
    bound: float | None

    @property
    def model_key(self) -> tuple[str, int]:
        return self.spec.key, len(self.finished)


def start_head(session: HistSession, spec: HeadSpec, thresholds: list[np.ndarray],
               finished: list[list[hb.Tree]]) -> GrowingHead:
    """A head's round at its roots: tree parameters (DP floor), request config, margin, gradient and hessian
    bounds from its finished rounds."""
    params = session.tree_params(spec.objective)
    head = Head(spec.outcome, spec.kind, spec.positive_class if spec.positive_class >= 0 else None)
    config = {**head_to_config(head), h.OBJECTIVE: spec.objective, h.N_OUTPUTS: spec.n_outputs,
              h.BASE_MARGIN: hb.base_margin(spec.objective, spec.base_score), h.HEAD: spec.key,
              h.ROUND: len(finished), h.SCALE_BITS: params.scale_bits}
    margin = hist_wire.margin_bound(finished, spec.n_outputs, config[h.BASE_MARGIN])
    floor = hist_wire.hessian_floor(spec.objective, margin, spec.n_outputs, params.scale_bits)
    bound = hist_wire.gradient_bound(spec.objective, margin, spec.label_bound)
    if session.n_rows is not None and bound is not None:
        config[h.GRADIENT_BOUND] = bound  # every site checks its rows against it
    return GrowingHead(spec, finished, params, hb.LevelGrower(spec.n_outputs, thresholds, params), config, floor,
                       bound)


def head_request(session: HistSession, head: GrowingHead, widths: np.ndarray
                 ) -> tuple[ArrayRecord, np.ndarray | None, list[hist_wire.Parent | None]]:
    """One head's arrays of a level request (routing, frontier; its finished round at a round's root; the
    compact widths and sent bins), every entry's width of its reply (None: 64-bit words) and the requested
    nodes' parents."""
    grower = head.grower
    requested = np.array(grower.requested, dtype=np.int64).reshape(-1, 2)
    arrays = merge(trees_record(grower.trees, h.GROWING, leaf_values=False),
                   ArrayRecord({h.FRONTIER: Array(requested)}))
    if grower.depth == 0 and head.model_key not in session.models_sent:  # the trees the sites have not seen yet
        arrays = merge(arrays, trees_record(head.finished[-1] if head.finished else [], h.MODEL))
    parents = hist_wire.parents_of(grower)
    if session.n_rows is None:
        return arrays, None, parents
    level_widths = hist_wire.level_widths(head.spec.objective, session.n_rows, parents, len(widths), head.bound,
                                          head.floor, head.params.scale_bits)
    sent = hist_wire.sent_bins(parents, widths, head.floor >= 1)
    arrays[h.WIDTHS] = Array(level_widths)
    arrays[h.SENT] = Array(np.packbits(sent, bitorder="little"))
    return arrays, hist_wire.entry_bits(level_widths, widths) * sent[..., None], parents


def grow_level(session: HistSession, heads: list[GrowingHead], thresholds: list[np.ndarray]) -> None:
    """One level of every head still growing, in one summed request (``h.HEADS``): each head's arrays and config
    under its ``h.head_key``, the replies one vector of all heads' histograms, one secure sum."""
    widths = hb.feature_widths(thresholds)
    growing = [head for head in heads if not head.grower.done]
    config: dict = {h.HEADS: len(growing)}
    arrays = ArrayRecord() if session.thresholds_sent else thresholds_record(thresholds)
    bits, parents, sizes = [], [], []
    for i, head in enumerate(growing):
        part, part_bits, part_parents = head_request(session, head, widths)
        config.update({h.head_key(i, key): value for key, value in head.config.items()})
        for key, array in part.items():
            arrays[h.head_key(i, key)] = array
        bits.append(part_bits)
        parents.append(part_parents)
        sizes.append(len(part_parents) * int(widths.sum()) * 2)
    flat_bits = signed = None
    if session.n_rows is not None:  # gradients (channel 0) may sum below 0, hessians may not
        flat_bits = np.concatenate([b.reshape(-1) for b in bits])
        signed = np.concatenate([np.broadcast_to(np.arange(2) == 0, b.shape).reshape(-1) for b in bits])
    sites = list(session.nodes)

    def check(total: np.ndarray, nodes: list[int], alone: bool) -> None:
        """Each head's histograms against ``shared.hist_bounds`` (one site's own: its parent-split bins are
        the server's, not sent). A sum that lost a site is not checked: its parents hold the lost site's rows,
        and the round is regrown without it (RoundRegrow)."""
        if not alone and sorted(nodes) != sorted(sites):
            return
        who = session.contributors(nodes)
        compact = session.n_rows is not None
        for head, part, head_parents in zip(growing, np.split(np.asarray(total).reshape(-1), np.cumsum(sizes)[:-1]),
                                            parents, strict=True):
            histograms = hb.unpack_histograms(part.reshape(len(head_parents), -1, 2), widths)
            if compact and not alone:
                hist_wire.fill_known(histograms, head_parents)
            check_level(f"hist boosting: head {head.spec.key!r}, round {len(head.finished)}, depth "
                        f"{head.grower.depth}", histograms, widths, head.spec.objective, head.params.scale_bits,
                        head.bound, head.floor, session.settings.dp_gradient_clip, head_parents,
                        compact and alone, who, who.declared, head.grower.depth)

    packed = session.summed(messages.HIST_LEVEL, config, arrays, h.HISTOGRAMS, flat_bits, signed,
                            releases=len(growing), check=check).reshape(-1)
    session.thresholds_sent = True
    session.models_sent.update(head.model_key for head in growing)  # every site still in the phase kept them
    if session.nodes != sites:
        raise RoundRegrow(f"{len(sites) - len(session.nodes)} sites lost at depth {growing[0].grower.depth}")
    for head, part, head_parents in zip(growing, np.split(packed, np.cumsum(sizes)[:-1]), parents, strict=True):
        histograms = hb.unpack_histograms(part.reshape(len(head_parents), -1, 2), widths)
        if session.n_rows is not None:
            hist_wire.fill_known(histograms, head_parents)
        head.grower.grow(histograms)


def grow_round(session: HistSession, specs: list[HeadSpec], thresholds: list[np.ndarray],
               finished: dict[str, list[list[hb.Tree]]]) -> dict[str, list[hb.Tree]]:
    """One boosting round of every head of ``specs`` (``spec.n_outputs`` trees each, by head key), grown level by
    level from summed site histograms, all heads in the same level requests (:func:`grow_level`)."""
    heads = [start_head(session, spec, thresholds, finished[spec.key]) for spec in specs]
    while not all(head.grower.done for head in heads):
        grow_level(session, heads, thresholds)
    return {head.spec.key: head.grower.trees for head in heads}


def grow_round_surviving(session: HistSession, specs: list[HeadSpec], thresholds: list[np.ndarray],
                         finished: dict[str, list[list[hb.Tree]]]) -> dict[str, list[hb.Tree]]:
    """:func:`grow_round`, grown again from its roots on the remaining sites' rows whenever sites are lost while
    it grows (each attempt loses a site, so this ends: in a round, or in HistProtocolError once too few remain)."""
    while True:
        try:
            return grow_round(session, specs, thresholds, finished)
        except RoundRegrow:
            continue


def grow_heads(session: HistSession, specs: list[HeadSpec], thresholds: list[np.ndarray], rounds: int,
               failures: dict[int, str]) -> dict[str, list[list[hb.Tree]]]:
    """``rounds`` boosting rounds of the heads ``specs``, grown together; when a sum fails, the rounds finished
    before it (the failure named in ``failures``)."""
    trees: dict[str, list[list[hb.Tree]]] = {spec.key: [] for spec in specs}
    try:
        for _ in range(rounds):
            for key, grown in grow_round_surviving(session, specs, thresholds, trees).items():
                trees[key].append(grown)
    except HistProtocolError as err:
        done = len(trees[specs[0].key])
        failures[err.node] = f"{', '.join(s.key for s in specs)}: stopped after {done} rounds: {err.reason}"
    return trees


def grow_all_heads(session: HistSession, specs: list[HeadSpec], thresholds: list[np.ndarray],
                   settings: HistSettings, failures: dict[int, str]) -> dict[str, list[list[hb.Tree]]]:
    """Every head's rounds (by head key): all heads together (``settings.batch_heads``) or one after the other."""
    trees: dict[str, list[list[hb.Tree]]] = {}
    for group in ([specs] if settings.batch_heads else [[spec] for spec in specs]):
        trees.update(grow_heads(session, group, thresholds, settings.rounds, failures))
    return trees


def run_hist_boosting(grid: Grid, sites: SiteCheck, encoder: FeatureEncoder, settings: RunSettings,
                      record: RunRecord, hist: HistSettings | None = None) -> HistOutcome:
    """Train every head by federated histogram boosting, then evaluate them at every site (unless softmax).

    Sites under DP that granted the ``boosting`` phase take part with noised releases; those that did not are
    left out and named in ``outcome.refused``."""
    hist = hist or HistSettings.from_run_settings(settings)
    outcome = HistOutcome(refused=sites.refusing("boosting"))
    start = time.perf_counter()
    specs = head_specs(encoder, hist.softmax)
    nodes = sites.granting("boosting")
    if not nodes:
        return outcome  # every site refused the phase: no trees (the record says why)
    declared = sites.declared_rows()
    session = HistSession(grid, nodes, boosting_round(settings).to_config(encoder), hist, len(specs),
                          {n: declared.get(n) for n in nodes})
    try:
        lo, hi = global_ranges(session, outcome.failures)
    except HistProtocolError:
        return outcome  # no site could say its ranges (each failure is in outcome.failures)
    if hist.secure_sum == "pairwise":
        try:
            session.exchange_keys()
        except HistProtocolError:
            outcome.failures.update({node: f"no key for the secure sum: {reason}" for node, reason in
                                     session.lost.items()})
            return outcome  # no site gave a key
    try:
        thresholds = global_thresholds(session, lo, hi)
    except HistProtocolError as err:
        if err.node not in session.infeasible and "sum" not in session.infeasible:
            raise  # a lost site, as before
        outcome.failures[err.node] = f"no bins: {err.reason}"
        outcome.infeasible = dict(session.infeasible)
        return outcome  # an infeasible count sum (or every site dropped): no trees
    outcome.trees = grow_all_heads(session, specs, thresholds, hist, outcome.failures)
    outcome.infeasible = dict(session.infeasible)
    for spec in specs:
        outcome.models[spec.key] = export_model(outcome.trees[spec.key], spec.objective, spec.base_score,
                                                encoder.n_features_out_)
    for node, reason in session.lost.items():
        outcome.failures.setdefault(node, f"lost during the phase, the trees continued without it: {reason}")
    outcome.thresholds = thresholds
    outcome.bytes_down, outcome.bytes_up = session.bytes_down, session.bytes_up
    outcome.exchanges = dict(session.exchanges)
    outcome.bytes_sent = session.bytes_down + session.bytes_up
    for node, facts in session.privacy:
        add_privacy(record, sites.usable, node, facts)
    if not hist.softmax:
        evaluate_boosters(grid, sites, encoder, settings, outcome, record)
    outcome.seconds = time.perf_counter() - start
    write_traffic(Path(settings.out_dir) / TRAFFIC_FILE, outcome, hist)
    return outcome


def write_traffic(path: Path, outcome: HistOutcome, hist: HistSettings) -> None:
    """What the phase sent, beside the models (``OUT/xgb_hist_traffic.json``): bytes each way, trees, time."""
    trees = sum(len(trees) for rounds in outcome.trees.values() for trees in rounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bytes_down": outcome.bytes_down, "bytes_up": outcome.bytes_up, "trees": trees,
                                "seconds": outcome.seconds, "rounds": hist.rounds, "secure_sum": hist.secure_sum,
                                "batch_heads": hist.batch_heads, "exchanges": outcome.exchanges,
                                "bins": [len(t) + 1 for t in outcome.thresholds]},
                               indent=1) + "\n")
