"""Histogram boosting on the wire: compact masked integers, what each request carries, and the bytes per tree.

The federation here runs in-process: a stand-in for Flower's Grid hands each request to the sites' real
handlers (``client.hist_handlers``) with one Flower Context per node, and only the site's rows (synthetic,
no site folder) are patched in. The server side is the real ``server.hist_phase``.
"""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from scipy import stats

from client import hist_handlers as hh
from client import secure_aggregation as sa
from client.site import SiteRequest
from server import hist_phase as hp
from shared import hist_boosting as hb
from shared import hist_wire, wire_ints
from shared import secure_sum as ss
from shared.encoding import ENCODER_CONFIG_KEY
from shared.hist_learner import HistGradientBoosting
from shared.protocol import hist as h
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RELEASE_INDEX

# -- compact integers and masks modulo 2^w ---------------------------------------------------------------


def test_residues_of_mixed_widths_pack_into_their_bits_and_back():
    rng = np.random.default_rng(0)
    values = rng.integers(-2**40, 2**40, size=500)
    bits = rng.integers(0, 65, size=500)
    words = wire_ints.residues(values, bits)
    packed = wire_ints.pack(words, bits)
    assert len(packed) == (bits.sum() + 7) // 8
    assert np.array_equal(wire_ints.unpack(packed, bits), words)
    fits = bits == 64
    assert np.array_equal(wire_ints.decode(words, bits, True)[fits], values[fits])
    assert np.all(wire_ints.decode(words, bits, True)[bits == 0] == 0)


def test_a_32_bit_masked_sum_is_exact_though_every_masked_word_and_partial_sum_wraps():
    keys = {node: ss.new_private_key() for node in (3, 5, 9)}
    public = {node: ss.public_key(k) for node, k in keys.items()}
    # each site's values use the whole signed 32-bit range, so partial sums leave it; the total does not
    values = {3: np.array([2**31 - 1, -2**31, 7, -1]), 5: np.array([2**31 - 1, -2**31 + 5, -7, 0]),
              9: np.array([-2**31, 2**31 - 1, 0, 2])}
    total = sum(values.values())
    assert np.all(np.abs(total) < 2**31)
    masked = [ss.mask(v, keys[n], n, public, "s/1", bits=32) for n, v in values.items()]
    assert all(np.all(m < 2**32) for m in masked)
    parts = [wire_ints.unpack(wire_ints.pack(m, 32), np.full(4, 32)) for m in masked]
    assert np.array_equal(wire_ints.decode(wire_ints.summed(parts, 32), 32, True), total)
    # one site short, the masks do not cancel
    assert not np.array_equal(wire_ints.decode(wire_ints.summed(parts[:2], 32), 32, True),
                              values[3] + values[5])


def test_a_sum_outside_the_width_would_come_back_wrong_which_is_why_widths_come_from_bounds():
    assert wire_ints.signed_bits(2**31 - 1) == 32 and wire_ints.unsigned_bits(2**32 - 1) == 32
    parts = [wire_ints.residues(np.array([2**31 - 1]), 32), wire_ints.residues(np.array([1]), 32)]
    assert wire_ints.decode(wire_ints.summed(parts, 32), 32, True)[0] == -2**31  # 2^31 wrapped


def test_a_masked_residue_is_uniform_in_its_width():
    keys = {node: ss.new_private_key() for node in (1, 2)}
    public = {node: ss.public_key(k) for node, k in keys.items()}
    masked = ss.mask(np.zeros(4000, dtype=np.int64), keys[1], 1, public, "u", bits=20)
    assert masked.max() < 2**20
    assert stats.kstest(masked / 2.0**20, "uniform").pvalue > 0.01


# -- widths from bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [32, 16, 12, 8])
def test_hessian_floor_holds_for_every_margin_within_the_bound(scale):
    margins = np.linspace(-6.0, 6.0, 2001)
    for objective, n_out in (("binary:logistic", 1), ("multi:softprob", 3), ("reg:squarederror", 1)):
        floor = hist_wire.hessian_floor(objective, 6.0, n_out, scale)
        m = np.column_stack([margins, -margins, margins / 2])[:, :n_out]
        y = np.zeros(len(margins))
        _, hess = hb.gradients(objective, y, m)
        assert floor >= (1 if scale == 32 else 0) and hb.to_fixed(hess, scale).min() >= floor
    assert not hist_wire.rows_have_hessian("binary:logistic", 40.0, 1, 32)  # h < 2^-33 possible: rows invisible


def test_at_a_coarse_scale_the_floor_proof_is_not_made_where_a_rows_hessian_can_round_to_zero():
    # logistic |margin| <= 6: h >= 0.00247, 2^-9 = 0.00195 — so at 2^8 a row's fixed-point hessian can be 0
    _, hess = hb.gradients("binary:logistic", np.zeros(1), np.array([[6.0]]))
    assert hb.to_fixed(hess, 8)[0, 0] == 1 and hb.to_fixed(hess, 7)[0, 0] == 0
    assert hist_wire.rows_have_hessian("binary:logistic", 6.0, 1, 12)
    assert not hist_wire.rows_have_hessian("binary:logistic", 6.0, 1, 7)
    assert not hist_wire.rows_have_hessian("binary:logistic", 6.0, 1, 8)  # the floor keeps a factor 2 of margin
    assert hist_wire.hessian_floor("reg:squarederror", np.inf, 1, 12) == 2 ** 12


def test_widths_shrink_with_the_scale_by_the_bits_of_fraction_left_out():
    for scale in (32, 20, 12):
        level = hist_wire.level_widths("binary:logistic", 1000, [None], 1, 1.0, 0, scale)
        assert level[0, 0].tolist() == [wire_ints.signed_bits(1000 * 2 ** scale),
                                         wire_ints.unsigned_bits(1000 * 2 ** (scale - 2))]
    assert (hist_wire.level_widths("binary:logistic", 1000, [None], 1, 1.0, 0, 32)
            - hist_wire.level_widths("binary:logistic", 1000, [None], 1, 1.0, 0, 12)).tolist() == [[[20, 20]]]


def test_a_root_is_sent_whole_and_a_child_leaves_out_its_parents_split_feature_and_empty_bins():
    widths = np.array([3, 2])
    parent = np.zeros((2, 3, 2), dtype=np.int64)
    parent[0, :, 1] = [5, 0, 7]
    parent[1, :, 1] = [12, 0, 0]
    parents = [None, hist_wire.Parent(parent, feature=1, split_bin=0, left=True)]
    sent = hist_wire.sent_bins(parents, widths, rows_visible=True)
    assert sent.tolist() == [[True] * 5, [True, False, True, False, False]]
    assert hist_wire.sent_bins(parents, widths, rows_visible=False)[1].tolist() == [True, True, True, False, False]
    level = hist_wire.level_widths("reg:squarederror", 100, parents, 2, gradient_bound=2.0, floor=2**32,
                                   scale_bits=32)
    assert level[0].tolist() == [[wire_ints.signed_bits(100 * 2 * 2**32), wire_ints.unsigned_bits(100 * 2**32)]] * 2
    assert level[1, 0].tolist() == [wire_ints.signed_bits(7 // 2**32 * 2 * 2**32), wire_ints.unsigned_bits(7)]
    full = np.zeros((2, 2, 3, 2), dtype=np.int64)
    parent[1, :2, 0] = [4, -3]
    hist_wire.fill_known(full, parents)
    assert full[1, 1, :, 0].tolist() == [4, 0, 0] and full[1, 1, :, 1].tolist() == [12, 0, 0]


# -- an in-process federation through the real handlers --------------------------------------------------


class Request(SiteRequest):
    dp = None  # a site without DP (no site folder behind it)


class Grid:
    """Flower's Grid as far as the phase uses it: each message goes to that node's handler, in-process."""

    def __init__(self, rows: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in rows}
        self.exchanges: list[tuple[str, int, RecordDict, RecordDict | None]] = []  # kind, node, request, reply
        self.legacy = False  # sites say no row count, as a DP site does: 64-bit fixed point throughout
        self.lost_at: dict[int, tuple[str, int, bool]] = {}  # node → (message type, n-th such message, answers it)
        self.seen: dict[tuple[int, str], int] = {}
        self.gone: set[int] = set()
        self.calls: list[str] = []  # the message type of each exchange (one send_and_receive call)
        self.request = Request  # what a handler sees of the site (a DP site: its terms)
        answers = {messages.HIST_RANGES: hh.answer_ranges, messages.HIST_BINS: hh.answer_counts(hh.bin_counts),
                   messages.HIST_CELLS: hh.answer_counts(hh.partition_counts), messages.HIST_LEVEL: hh.answer_level}
        self.answers = {m.type: hh.session_answer(a) for m, a in answers.items()}
        self.secure = {m.type: handler for m, handler in hh.SECURE_AGGREGATION.items()}

    def send_and_receive(self, sent):
        if sent:
            self.calls.append(sent[0].metadata.message_type)  # one message exchange with every site
        for msg in sent:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            context = self.contexts[node]
            self.seen[node, kind] = self.seen.get((node, kind), 0) + 1
            if node in self.lost_at and self.lost_at[node][:2] == (kind, self.seen[node, kind]):
                self.gone.add(node)
                if self.lost_at[node][2]:
                    yield self.answer(msg, node, kind, context)  # its answer arrives, then the node is gone
            if node in self.gone:
                continue  # a lost SuperNode: no reply, ever again
            yield self.answer(msg, node, kind, context)

    def answer(self, msg, node, kind, context):
        try:
            if kind in self.secure:
                reply = self.secure[kind](msg, context)
            else:
                request = self.request(None, None, msg.content[r.CONFIG], context)
                reply = Message(self.answers[kind](msg, request), reply_to=msg)
                if self.legacy and kind == messages.HIST_RANGES.type:
                    del reply.content[r.ARRAYS][h.ROWS]
        except ShareableError as err:
            reply = Message(Error(code=1, reason=str(err)), reply_to=msg)
        self.exchanges.append((kind, node, msg.content, None if reply.has_error() else reply.content))
        return reply


def site_rows(objective, n=900, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[:, 3] = rng.integers(0, 2, n)
    x[:, 4] = np.round(x[:, 4], 1)  # few distinct values: empty bins below the root
    signal = x[:, 0] + 0.5 * x[:, 1] ** 2 + rng.normal(0, 0.5, n)
    y = {"binary:logistic": (signal > 0.5).astype(float), "reg:squarederror": 3 * signal,
         "multi:softprob": np.digitize(signal, [0.0, 1.0]).astype(float)}[objective]
    return x, y


def federate(monkeypatch, objective, legacy=False, label_bound=None, rounds=3, depth=3, lost_at=None,
             secure_sum="pairwise", scale_bits=hb.SCALE_BITS, learning_rate=0.1):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Message() needs, as a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    x, y = site_rows(objective)
    if objective == "reg:squarederror" and label_bound is None:
        label_bound = float(np.abs(y).max())
    parts = {11: slice(0, 200), 12: slice(200, 550), 13: slice(550, 900)}
    rows = {node: (x[p], y[p]) for node, p in parts.items()}
    grid = Grid(rows)
    grid.legacy = legacy
    grid.lost_at = lost_at or {}
    monkeypatch.setattr(hh, "training_matrix", lambda request: (None, rows[request.context.node_id][0], {}))
    monkeypatch.setattr(hh, "labelled_rows", lambda config, xs, targets: next(
        v for v in rows.values() if v[0] is xs))
    tree = hb.TreeParams(max_depth=depth, scale_bits=scale_bits, learning_rate=learning_rate)
    settings = hp.HistSettings(rounds=rounds, tree=tree, secure_sum=secure_sum)
    session = hp.HistSession(grid, list(rows), ConfigRecord({ENCODER_CONFIG_KEY: "{}", r.SPLIT_SEED: 0}),
                             settings, 1)
    lo, hi = hp.global_ranges(session, {})
    if settings.secure_sum == "pairwise":  # as run_hist_boosting: the session's one key exchange
        session.exchange_keys()
    thresholds = hp.global_thresholds(session, lo, hi)
    kind = {"binary:logistic": "binary", "reg:squarederror": "regression", "multi:softprob": "multiclass"}[objective]
    spec = hp.HeadSpec("y", "y", kind, n_classes=3 if kind == "multiclass" else 0, label_bound=label_bound)
    finished: dict[str, list[list[hb.Tree]]] = {"y": []}
    for _ in range(rounds):
        finished["y"].append(hp.grow_round_surviving(session, [spec], thresholds, finished)["y"])
    trees = finished["y"]
    survivors = np.concatenate([np.arange(900)[parts[node]] for node in session.nodes])
    pooled = HistGradientBoosting(objective, n_estimators=rounds, max_depth=depth, base_score=spec.base_score,
                                  n_classes=3 if kind == "multiclass" else None, scale_bits=scale_bits,
                                  learning_rate=learning_rate).fit(x[survivors], y[survivors], thresholds)
    return grid, session, trees, pooled


def same_trees(federated, pooled):
    for fed_round, pooled_round in zip(federated, pooled.rounds_, strict=True):
        for a, b in zip(fed_round, pooled_round, strict=True):
            assert (a.feature, a.split_bin, a.left, a.leaf_value) == (b.feature, b.split_bin, b.left, b.leaf_value)


MASKED = ["pairwise", "recovering"]


@pytest.mark.parametrize("secure_sum", MASKED)
@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
def test_compact_federated_trees_equal_the_pooled_learners_bit_for_bit(monkeypatch, objective, secure_sum):
    grid, session, trees, pooled = federate(monkeypatch, objective, secure_sum=secure_sum)
    assert session.n_rows == 900
    same_trees(trees, pooled)
    assert sum(t.n_nodes for rnd in trees for t in rnd) > 3 * len(trees[0])  # the trees did split
    levels = [request[r.CONFIG] for kind, _, request, _ in grid.exchanges if kind == messages.HIST_LEVEL.type]
    assert all(bool(c[h.SECURE_SUM]) and list(c[h.SECURE_NODES]) == [11, 12, 13] for c in levels)
    assert all(sa.recovering(c) == (secure_sum == "recovering") for c in levels)  # the sites' masks follow it


@pytest.mark.parametrize("secure_sum", MASKED)
def test_the_64_bit_encoding_without_row_counts_grows_the_same_trees(monkeypatch, secure_sum):
    grid, session, trees, pooled = federate(monkeypatch, "binary:logistic", legacy=True, secure_sum=secure_sum)
    assert session.n_rows is None
    same_trees(trees, pooled)
    levels = [reply for kind, _, _, reply in grid.exchanges if kind == messages.HIST_LEVEL.type]
    assert all(reply[r.ARRAYS][h.HISTOGRAMS].dtype == "uint64" for reply in levels)


def test_encoder_thresholds_and_trees_cross_once_and_levels_carry_only_what_they_need(monkeypatch):
    grid, session, trees, _ = federate(monkeypatch, "binary:logistic")
    by_node: dict[int, list[tuple[str, RecordDict]]] = {}
    for kind, node, content, _ in grid.exchanges:
        by_node.setdefault(node, []).append((kind, content))
    for sent in by_node.values():
        assert [ENCODER_CONFIG_KEY in c[r.CONFIG] for _, c in sent] == [True] + [False] * (len(sent) - 1)
        levels = [c for kind, c in sent if kind == messages.HIST_LEVEL.type]
        assert ["thresholds" in c[r.ARRAYS] for c in levels] == [True] + [False] * (len(levels) - 1)
        with_model = [c for c in levels if h.head_key(0, h.MODEL) in c[r.ARRAYS]]
        assert [int(c[r.CONFIG][h.head_key(0, h.ROUND)]) for c in with_model] == [0, 1, 2]  # once a round, at its root
        assert [len(hh.trees_from_record(hh.head_requests(c[r.CONFIG], c[r.ARRAYS])[0][1], h.MODEL))
                for c in with_model] == [0, 1, 1]
        assert all(h.head_key(0, "growing.leaf-value") not in c[r.ARRAYS] for c in levels)  # sites only route


def test_level_replies_are_exactly_the_bits_the_widths_announce_far_below_64_bit(monkeypatch):
    grid, session, trees, _ = federate(monkeypatch, "binary:logistic")
    widths = hb.feature_widths(hh.thresholds_from_record(grid.contexts[11].state[hh.THRESHOLDS_KEY]))
    sent_bytes = legacy_bytes = left_out = 0
    for kind, _, request, content in grid.exchanges:
        if kind != messages.HIST_LEVEL.type:
            continue
        level = request[r.ARRAYS][h.head_key(0, h.WIDTHS)].numpy()
        sent = np.unpackbits(request[r.ARRAYS][h.head_key(0, h.SENT)].numpy(), count=level.shape[0] * int(widths.sum()),
                             bitorder="little").reshape(level.shape[0], -1).astype(bool)
        bits = hist_wire.entry_bits(level, widths) * sent[..., None]
        left_out += int((~sent).sum())
        packed = content[r.ARRAYS][h.HISTOGRAMS].numpy()
        assert packed.dtype == np.uint8 and len(packed) == (int(bits.sum()) + 7) // 8
        assert bits.max() <= 50  # 900 rows, |g| <= 1: 10 + 32 + sign bits at most for a gradient
        sent_bytes += len(packed)
        legacy_bytes += level.shape[0] * int(widths.sum()) * 2 * 8
    assert left_out > 0  # split features and bins empty in the parent
    assert sent_bytes < 0.6 * legacy_bytes


def test_a_site_refuses_a_gradient_bound_its_rows_exceed_instead_of_overflowing(monkeypatch):
    with pytest.raises(hp.HistProtocolError, match="exceeds the request's bound"):
        federate(monkeypatch, "reg:squarederror", label_bound=0.5, rounds=1)


def test_a_site_without_the_sessions_thresholds_refuses_a_level_request():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ShareableError, match="no bin thresholds"):
        hh.session_thresholds(ArrayRecord(), context)


# -- sites lost mid-tree: recovering, the secure sum is recovered and the round regrown on the survivors' rows -


@pytest.mark.parametrize("answers_first", [False, True], ids=["lost-before-sending", "lost-after-sending"])
def test_a_site_lost_mid_tree_is_recovered_and_the_trees_equal_the_survivors_pooled_trees(monkeypatch,
                                                                                           answers_first):
    # node 12 is lost at its second level request of round 0 (depth 1): before answering it, or after its masked
    # histograms arrived (then it misses the unmasking round)
    grid, session, trees, pooled = federate(monkeypatch, "binary:logistic", secure_sum="recovering",
                                            lost_at={12: (messages.HIST_LEVEL.type, 2, answers_first)})
    assert session.nodes == [11, 13] and list(session.lost) == [12] and session.lost[12] == "no reply"
    assert len(trees) == 3
    same_trees(trees, pooled)  # every round, regrown round 0 included, is the pooled learner's on 11 + 13's rows
    assert sum(t.n_nodes for rnd in trees for t in rnd) > 3 * len(trees[0])
    unmasks = [content for kind, node, content, _ in grid.exchanges if kind == messages.HIST_UNMASK.type]
    dropped = [list(c[r.CONFIG][h.SECURE_DROPPED]) for c in unmasks]
    sent = [list(c[r.CONFIG][h.SECURE_SENT]) for c in unmasks]
    if answers_first:  # its input was in the sum: its self-mask seed was rebuilt from the others' shares
        assert all(d == [] for d in dropped) and any(12 in s_ for s_ in sent)
    else:  # no input: its mask key was rebuilt and its pairwise masks removed from the others' inputs
        assert [12] in dropped


def test_a_site_lost_in_a_later_round_keeps_the_rounds_before_and_the_head_finishes(monkeypatch):
    grid, session, trees, _ = federate(monkeypatch, "reg:squarederror", secure_sum="recovering",
                                       lost_at={11: (messages.HIST_SHARES.type, 9, False)})
    assert session.nodes == [12, 13] and len(trees) == 3
    x, y = site_rows("reg:squarederror")
    everyone = HistGradientBoosting("reg:squarederror", n_estimators=1, max_depth=3, base_score=0.0).fit(
        x, y, hh.thresholds_from_record(grid.contexts[12].state[hh.THRESHOLDS_KEY]))
    first = trees[0][0], everyone.rounds_[0][0]
    assert (first[0].feature, first[0].leaf_value) == (first[1].feature, first[1].leaf_value)  # before the loss


def test_more_sites_lost_than_the_threshold_allows_stops_the_head_with_a_clear_error(monkeypatch):
    lost = {12: (messages.HIST_LEVEL.type, 2, False), 13: (messages.HIST_LEVEL.type, 2, True)}
    with pytest.raises(hp.HistProtocolError, match="the secure sum cannot be recovered|no site is left"):
        federate(monkeypatch, "binary:logistic", lost_at=lost, secure_sum="recovering")


def test_with_pairwise_masks_a_site_lost_after_the_key_exchange_stops_the_head(monkeypatch):
    # main's behaviour: the lost site's masks would stay in the sum, and no share exists to remove them
    with pytest.raises(hp.HistProtocolError, match="no reply") as err:
        federate(monkeypatch, "binary:logistic", lost_at={12: (messages.HIST_LEVEL.type, 2, False)})
    assert err.value.node == 12


def test_a_site_failing_the_pairwise_key_exchange_is_left_out_before_any_sum(monkeypatch):
    grid, session, trees, pooled = federate(monkeypatch, "binary:logistic", rounds=2,
                                            lost_at={13: (messages.HIST_KEYS.type, 1, False)})
    assert session.nodes == [11, 12] and session.base[h.SECURE_NODES] == [11, 12]
    same_trees(trees, pooled)  # the pooled learner on 11 + 12's rows


# -- the cost of each mode in message exchanges -----------------------------------------------------------


def test_pairwise_masks_cost_one_exchange_per_release_and_the_recovering_protocol_four(monkeypatch):
    summed = {messages.HIST_BINS.type, messages.HIST_CELLS.type, messages.HIST_LEVEL.type}
    calls, trees = {}, {}
    for mode in ("off", "pairwise", "recovering"):
        grid, session, trees[mode], pooled = federate(monkeypatch, "binary:logistic", rounds=2, secure_sum=mode)
        same_trees(trees[mode], pooled)
        calls[mode] = grid.calls
    releases = sum(kind in summed for kind in calls["off"])
    assert releases == sum(kind in summed for kind in calls["pairwise"]) == \
        sum(kind in summed for kind in calls["recovering"])
    assert releases >= 2 * 3  # the grid counts and at least one level per depth of each round
    assert len(calls["off"]) == 1 + releases  # the ranges, then one exchange per release
    assert len(calls["pairwise"]) == 1 + 1 + releases  # + one key exchange for the whole phase
    assert calls["pairwise"].count(messages.HIST_KEYS.type) == 1
    assert len(calls["recovering"]) == 1 + 4 * releases  # keys, shares, masked answer, unmask: every release
    for kind in (messages.HIST_KEYS.type, messages.HIST_SHARES.type, messages.HIST_UNMASK.type):
        assert calls["recovering"].count(kind) == releases


# -- the fixed-point scale -------------------------------------------------------------------------------


def level_reply_bytes(grid) -> int:
    return sum(len(content[r.ARRAYS][h.HISTOGRAMS].numpy()) for kind, _, _, content in grid.exchanges
               if kind == messages.HIST_LEVEL.type)


@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
@pytest.mark.parametrize("scale", [16, 8])
def test_at_a_coarse_scale_federated_trees_equal_the_pooled_learners_at_that_scale(monkeypatch, objective, scale):
    grid, session, trees, pooled = federate(monkeypatch, objective, scale_bits=scale)
    same_trees(trees, pooled)
    assert sum(t.n_nodes for rnd in trees for t in rnd) > 3 * len(trees[0])
    levels = [c for kind, _, c, _ in grid.exchanges if kind == messages.HIST_LEVEL.type]
    assert {int(c[r.CONFIG][h.head_key(0, h.SCALE_BITS)]) for c in levels} == {scale}
    fine = HistGradientBoosting(objective, n_estimators=3, max_depth=3, base_score=pooled.base_score,
                                n_classes=pooled.n_classes).fit(*site_rows(objective), pooled.thresholds_)
    assert any(not np.array_equal(a.leaf_value, b.leaf_value)  # the scale is part of the algorithm
               for ra, rb in zip(fine.rounds_, pooled.rounds_, strict=True) for a, b in zip(ra, rb, strict=True))


def test_a_coarser_scale_sends_fewer_histogram_bytes(monkeypatch):
    grid32, _, trees32, _ = federate(monkeypatch, "binary:logistic", scale_bits=32)
    grid16, _, trees16, _ = federate(monkeypatch, "binary:logistic", scale_bits=16)
    assert [len(t) for t in trees32] == [len(t) for t in trees16]
    assert level_reply_bytes(grid16) < 0.7 * level_reply_bytes(grid32)


def test_rows_whose_hessian_rounds_to_zero_keep_their_bins_asked_for_and_trees_exact(monkeypatch):
    # learning rate 1 drives margins far from 0: at 2^2 many rows' hessians round to 0 (h < 1/8)
    grid, session, trees, pooled = federate(monkeypatch, "binary:logistic", scale_bits=2, learning_rate=1.0,
                                            rounds=4)
    same_trees(trees, pooled)
    margin = hist_wire.margin_bound(trees[:3], 1, 0.0)
    assert hist_wire.hessian_floor("binary:logistic", margin, 1, 2) == 0  # no proof: every bin is asked for


def test_a_floor_proof_that_does_not_hold_makes_the_site_refuse_rather_than_change_a_sum(monkeypatch):
    monkeypatch.setattr(hist_wire, "hessian_floor", lambda *args: 1)  # a wrong proof: rows may have h = 0
    # the server's feasibility check (shared.hist_bounds) refuses a root's |G| > H · B / floor first (the wrong
    # floor makes it too tight: tests/test_sum_bounds_hist.py); here the site's own refusal is under test
    monkeypatch.setattr(hp, "check_level", lambda *args: None)
    with pytest.raises(hp.HistProtocolError, match="has rows in bins the request leaves out"):
        federate(monkeypatch, "binary:logistic", scale_bits=2, learning_rate=1.0, rounds=4)


def test_a_site_refuses_a_scale_outside_the_fixed_point_range():
    with pytest.raises(ShareableError, match="fixed-point scale 40 bits"):
        hh.scale_bits(ConfigRecord({h.SCALE_BITS: 40}))
    with pytest.raises(ValueError, match="scale_bits"):
        hb.TreeParams(scale_bits=0)


# -- a round's heads grown together: one level request for all of them ------------------------------------


def head_labels(seed=0, effect_bound=None):
    """Four heads on the tests' rows: one-vs-rest of a 3-class label, and a regression whose label some rows lack
    (its declared bound ``effect_bound``, default its largest |label|)."""
    x, classes = site_rows("multi:softprob", seed=seed)
    _, effect = site_rows("reg:squarederror", seed=seed)
    effect = np.where(x[:, 2] > 1.0, np.nan, effect)  # unrecorded at ~16 % of the rows
    bound = float(np.nanmax(np.abs(effect))) if effect_bound is None else effect_bound
    specs = [hp.HeadSpec(f"y={c}", "y", "binary", c) for c in range(3)] + [
        hp.HeadSpec("effect", "effect", "regression", label_bound=bound)]
    labels = {f"y={c}": (classes == c).astype(float) for c in range(3)} | {"effect": effect}
    return x, specs, labels


def federate_heads(monkeypatch, batch, secure_sum="pairwise", legacy=False, rounds=3, depth=3, dp=None,
                   effect_bound=None, failures=None):
    """``rounds`` rounds of the four heads of :func:`head_labels` over three sites, batched or head after head;
    ``dp``: every site's DP terms by node; ``failures``: where the phase's failures go (default: none allowed)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    x, specs, labels = head_labels(effect_bound=effect_bound)
    parts = {11: slice(0, 200), 12: slice(200, 550), 13: slice(550, 900)}
    grid = Grid({node: None for node in parts})
    grid.legacy = legacy
    if dp is not None:
        class DPRequest(SiteRequest):
            @property
            def dp(self):
                return dp[self.context.node_id]

        grid.request = DPRequest

    def labelled(config, xs, node):
        y = labels[str(config[h.HEAD])][parts[node]]
        keep = ~np.isnan(y)
        return xs[keep], y[keep]

    monkeypatch.setattr(hh, "training_matrix", lambda request: (None, x[parts[request.context.node_id]],
                                                                request.context.node_id))
    monkeypatch.setattr(hh, "labelled_rows", labelled)
    settings = hp.HistSettings(rounds=rounds, tree=hb.TreeParams(max_depth=depth), secure_sum=secure_sum,
                               batch_heads=batch)
    session = hp.HistSession(grid, list(parts), ConfigRecord({ENCODER_CONFIG_KEY: "{}", r.SPLIT_SEED: 0}),
                             settings, len(specs))
    if dp is not None:  # a DP site says the declared ranges: here, the rows' own
        monkeypatch.setattr(hh, "public_ranges", lambda encoder: (x.min(axis=0).astype(float),
                                                                  x.max(axis=0).astype(float)))
    lo, hi = hp.global_ranges(session, {})
    if settings.secure_sum == "pairwise":
        session.exchange_keys()
    thresholds = hp.global_thresholds(session, lo, hi)
    failed: dict[int, str] = {} if failures is None else failures
    trees = hp.grow_all_heads(session, specs, thresholds, settings, failed)
    assert failures is not None or failed == {}
    return grid, session, trees, (x, specs, labels, thresholds)


def levels_grown(rounds, depth):
    """Level requests a head's rounds needed: a tree whose deepest leaf is at depth d asked for levels 0 .. d
    (at most ``depth`` of them: the deepest level's leaves come from their parents)."""
    def leaf_depth(tree, node=0):
        if tree.feature[node] == hb.LEAF:
            return 0
        return 1 + max(leaf_depth(tree, tree.left[node]), leaf_depth(tree, tree.right[node]))
    return [min(max(leaf_depth(t) for t in trees) + 1, depth) for trees in rounds]


@pytest.mark.parametrize("secure_sum,legacy", [("pairwise", False), ("off", False), ("recovering", False),
                                               ("pairwise", True)])
def test_heads_grown_together_equal_each_head_grown_alone_and_the_pooled_learner(monkeypatch, secure_sum, legacy):
    together = federate_heads(monkeypatch, True, secure_sum, legacy)
    alone = federate_heads(monkeypatch, False, secure_sum, legacy)
    x, specs, labels, thresholds = together[3]
    assert alone[3][3] == [] or all(np.array_equal(a, b) for a, b in zip(thresholds, alone[3][3], strict=True))
    for spec in specs:
        y = labels[spec.key]
        keep = ~np.isnan(y)
        pooled = HistGradientBoosting(spec.objective, n_estimators=3, max_depth=3, base_score=spec.base_score,
                                      scale_bits=hb.SCALE_BITS).fit(x[keep], y[keep], thresholds)
        same_trees(together[2][spec.key], pooled)
        same_trees(alone[2][spec.key], pooled)
        for a, b in zip(together[2][spec.key], alone[2][spec.key], strict=True):
            assert [(t.threshold, t.hessian, t.weight) for t in a] == [(t.threshold, t.hessian, t.weight) for t in b]
    assert sum(t.n_nodes for rounds in together[2].values() for trees in rounds for t in trees) > 4 * 3 * 2
    # one level exchange per level of the deepest head instead of one per head and level
    per_head = [levels_grown(together[2][spec.key], 3) for spec in specs]
    summed = {messages.HIST_BINS.type, messages.HIST_CELLS.type, messages.HIST_LEVEL.type}
    batched = sum(max(levels) for levels in zip(*per_head, strict=True))
    for (grid, session, _, _), expected in ((together, batched), (alone, sum(map(sum, per_head)))):
        assert grid.calls.count(messages.HIST_LEVEL.type) == session.exchanges[messages.HIST_LEVEL.type] == expected
        assert sum(session.exchanges.values()) == len(grid.calls)
        releases = sum(kind in summed for kind in grid.calls)
        assert session.sequence == releases  # one secure sum (one mask label) per level request
    assert together[0].calls.count(messages.HIST_LEVEL.type) < 0.5 * alone[0].calls.count(messages.HIST_LEVEL.type)
    # fewer bytes each way: the session's keys once per level, one reply array instead of one per head
    assert together[1].bytes_up <= alone[1].bytes_up and together[1].bytes_down < alone[1].bytes_down


def test_a_batched_level_request_carries_each_growing_heads_arrays_and_its_first_release_index(monkeypatch):
    grid, session, trees, _ = federate_heads(monkeypatch, True, rounds=2)
    levels = [(node, c, reply) for kind, node, c, reply in grid.exchanges if kind == messages.HIST_LEVEL.type]
    first = [c for node, c, _ in levels if node == 11]
    assert int(first[0][r.CONFIG][h.HEADS]) == 4
    views = hh.head_requests(first[0][r.CONFIG], first[0][r.ARRAYS])
    assert [str(c[h.HEAD]) for c, _ in views] == ["y=0", "y=1", "y=2", "effect"]
    assert [int(c[RELEASE_INDEX]) for c, _ in views] == [int(first[0][r.CONFIG][RELEASE_INDEX]) + i for i in range(4)]
    assert all("thresholds" in a and h.FRONTIER in a for _, a in views)  # shared arrays in every head's view
    assert h.GRADIENT_BOUND in views[3][0] and float(views[3][0][h.GRADIENT_BOUND]) > 1.0  # the regression's own
    heads_per_level = [int(c[r.CONFIG][h.HEADS]) for c in first]
    per_round = [[levels_grown([trees[k][i]], 3)[0] for k in trees] for i in range(2)]
    assert heads_per_level == [sum(levels > level for levels in rnd) for rnd in per_round
                               for level in range(max(rnd))]  # a head whose trees stopped drops out
    indices = [int(c[r.CONFIG][RELEASE_INDEX]) for c in first]
    assert indices == np.cumsum([indices[0]] + heads_per_level[:-1]).tolist()  # a release per head and level
    assert session.release_index == indices[-1] + heads_per_level[-1]


def test_a_site_missing_a_heads_config_refuses_the_level_request():
    config = ConfigRecord({h.HEADS: 2, h.head_key(0, h.HEAD): "a"})
    with pytest.raises(ShareableError, match="no config for head 1"):
        hh.head_requests(config, ArrayRecord())
    with pytest.raises(ShareableError, match="expected at least one"):
        hh.head_requests(ConfigRecord({}), ArrayRecord())


@pytest.mark.parametrize("depth", [1, 3])
def test_dp_sites_charge_the_same_releases_and_noise_whether_heads_share_a_request(monkeypatch, tmp_path, depth):
    from client.dp import SiteDP
    from client.ledger import PrivacyLedger

    spent, facts, entries = {}, {}, {}
    for batch in (True, False):
        # a folder per site: a site's release key lives beside its ledger, and sites sharing one key would draw
        # the same noise for the same (empty-node) values, which the server's feasibility check would refuse
        dp = {node: SiteDP(PrivacyLedger.open(tmp_path / f"{batch}-{node}" / "ledger.json", 50.0, 1e-5),
                           {"boosting": 1.0}) for node in (11, 12, 13)}
        grid, session, trees, _ = federate_heads(monkeypatch, batch, rounds=2, depth=depth, dp=dp)
        assert session.n_rows is None  # a DP site says no row count: 64-bit words, noised
        spent[batch] = [dp[n].ledger.spent() for n in (11, 12, 13)]
        entries[batch] = [len(dp[n].ledger.entries) for n in (11, 12, 13)]
        facts[batch] = session.privacy
        assert len(session.privacy) == sum(entries[batch])  # every release's facts reach the record
        announced = hp.HistSettings(rounds=2, tree=hb.TreeParams(max_depth=depth)).releases(4)
        assert all(len(dp[n].ledger.entries) <= announced for n in dp)
        sigmas = {round(float(f["sigma"]), 12) for _, f in session.privacy}
        assert len(sigmas) == 1  # one σ for every release of the phase, as announced
    levels = {batch: [f for _, f in facts[batch] if int(f["release-index"]) > hb.REFINE_PASSES] for batch in facts}
    noise = {batch: {round(float(f["noise-sd"]), 9) for f in levels[batch]} for batch in levels}
    assert noise[True] == noise[False] and len(noise[True]) == 1  # every head's entries noised alike
    assert {round(float(f["sigma"]), 12) for _, f in facts[True]} == {round(float(f["sigma"]), 12)
                                                                       for _, f in facts[False]}
    if depth == 1:  # one level per head and round whatever the noise: exactly the same releases, the same ε
        assert entries[True] == entries[False] == [1 + hb.REFINE_PASSES + 4 * 2] * 3
        assert spent[True] == pytest.approx(spent[False], rel=1e-12)


def test_a_refusal_in_a_batched_level_stops_every_head_of_the_batch_head_after_head_only_its_own(monkeypatch):
    # the regression head's declared bound is below its labels: every site refuses its level requests
    failures: dict[int, str] = {}
    _, _, together, _ = federate_heads(monkeypatch, True, effect_bound=0.5, failures=failures)
    assert {len(rounds) for rounds in together.values()} == {0}  # one secure sum for all: no head's sum arrived
    assert len(failures) == 1 and "y=0, y=1, y=2, effect: stopped after 0 rounds" in next(iter(failures.values()))
    assert "head 'effect': a gradient exceeds the request's bound" in next(iter(failures.values()))
    failures.clear()
    _, _, alone, _ = federate_heads(monkeypatch, False, effect_bound=0.5, failures=failures)
    assert [len(alone[k]) for k in ("y=0", "y=1", "y=2", "effect")] == [3, 3, 3, 0]
