"""What a hospital answers in federated histogram boosting: bins, gradient/hessian histograms, masked and noised.

The site side of ``server.hist_phase`` (the protocol and its sources are described there and in
``shared.hist_boosting``). Every answer is computed from the site's training split, encoded with the run's
federated encoder; what leaves the site is per-feature minima and maxima, grid counts and per-node
histograms: sums over rows, never a row.

The secure sum (masking, and the key, share and unmask rounds below) is ``client.secure_aggregation``, the one
site side of the protocol the statistics and analytics phases use too; here it answers as ``query.hist_*``.

- ``query.hist_keys`` with pairwise masks (the default secure sum): a fresh X25519 key pair for this session
  (``shared.secure_sum``); the private key stays in the node's context state, the public key goes to the
  server, and every summed answer after it is masked under the session's next label.
- ``query.hist_keys``, ``query.hist_shares``, ``query.hist_unmask`` with recovering masks
  (``h.SECURE_RECOVERING``): rounds 0, 1 and 3 of each release's secure aggregation with dropout recovery
  (``shared.secagg_plus``; round 2 is the masked answer itself): fresh key pairs and a self-mask seed per
  release, kept in the node's context state with the shares peers sent; public keys, encrypted shares and
  unmasking shares go to the server.
- ``query.hist_ranges``: per encoded feature, the minimum and maximum of the site's rows (the statistics
  phase has already released the same minima and maxima of the raw columns).
- ``query.hist_bins``: per feature, row counts on the grid between the federated minimum and maximum.
- ``query.hist_cells``: per feature, row counts on a finer partition the server sends (the grid with its
  crowded cells split, ``shared.hist_boosting.global_thresholds``); asked at most ``REFINE_PASSES`` times.
- ``query.hist_level``: for every head the request grows (``shared.protocol.hist.HEADS``; its keys and arrays
  under ``head_key``), for the requested frontier nodes of the head's round of trees (one child per split
  parent, the server derives the sibling by subtraction), the fixed-point histograms of the objective's
  gradients and hessians at the margins of the head's trees so far, each feature's own bins only; all heads'
  histograms in one vector, masked as one release.

What the site keeps between messages of the phase (its Flower context state, which Flower keeps per run and
node across messages, in simulation and deployment alike), so that nothing crosses twice: the encoder, from
the first request of the session; the bin thresholds, from the first level request; the finished trees of
every head, each round's trees arriving once, with the next round's first level request. A request that finds
the site without them (another session, a round missing) is refused, never answered from stale state.

What the counts disclose. Summed over sites (and masked, so the server sees only the sum), the grid and
cell counts are the pooled histogram of each feature at the resolution of the final cells: where rows
crowd, cells are split until each holds one distinct value, so for a small table the server learns the
pooled multiset of each column's values to about float32 precision (not which site or row holds them) —
as much as XGBoost's own cut points, which the exported trees carry anyway. A cell holding a single row
is never split further. Under DP every count release is noised like the grid counts below.

Differential privacy. A site under DP answers the grid counts and histograms through the one DP release
(``client.dp``, phase ``boosting``; the server announces how many releases the phase has; each head of a level
request is a release of its own, ``dp-release-index + i``): one row changes
each of the ``touched`` entries of a block by at most its bound (gradient bound 1 for logistic and softmax,
``dp-gradient-clip`` for squared error, whose gradients are clipped; hessian bound 1/4, 1/2 or 1; a count 1).
Noise is added before masking, so the server sees only the sum of the noised histograms. Its ``hist_ranges``
answer is the declared range of every encoded feature (``shared.bounds`` through the encoder), not its rows'
minima and maxima, which are patient values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.dp import Block, PhaseRelease
from client.secure_aggregation import SECURE_AGGREGATION, masked, refusing
from client.site import SiteHandlers, SiteRequest
from client.split import encode, split_site
from shared import hist_boosting as hb
from shared import hist_wire
from shared.boosting import head_labels
from shared.bounds import declared_range
from shared.encoding import ENCODER_CONFIG_KEY, FeatureEncoder
from shared.hist_records import (
    has_thresholds,
    has_trees,
    thresholds_from_record,
    thresholds_record,
    trees_from_record,
    trees_record,
)
from shared.protocol import ErrorCode, messages
from shared.protocol import hist as h
from shared.protocol import records as r
from shared.protocol.boosting import head_from_config
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RELEASE_INDEX, RELEASES

SESSION_KEY = "hist-session"
"""Context state: the session id, the encoder (JSON), and per head (``rounds/<head>``) the rounds of its kept model."""
THRESHOLDS_KEY = "hist-thresholds"
MODEL_KEY = "hist-model"
"""Context state: ``hist-model/<head>``, every head's finished trees."""


# ---------------------------------------------------------------------------------------------------------
# The site's rows, as every message of the phase sees them


def training_matrix(request: SiteRequest) -> tuple[FeatureEncoder, np.ndarray, dict[str, np.ndarray]]:
    """The encoder, the encoded training features (float32) and targets of the site's training split."""
    encoder = request.encoder
    data = encode(encoder, split_site(request.site.episodes, request.site.task,
                                      int(request.config[r.SPLIT_SEED]))["train"])
    return encoder, np.asarray(data.x, dtype=np.float32), data.targets


def labelled_rows(config: ConfigRecord, x: np.ndarray, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The rows whose label for this head is recorded, and their labels (class index for softmax)."""
    head = head_from_config(config)
    y = head_labels(head, targets) if head.kind != "multiclass" else targets[head.outcome].astype(float)
    keep = ~np.isnan(y)
    return x[keep], y[keep]


def public_ranges(encoder: FeatureEncoder) -> tuple[np.ndarray, np.ndarray]:
    """Per encoded feature, the range its values can take by the contract: a numeric feature's declared range
    standardised (missing values encode as 0, so 0 is inside), indicators and one-hot columns 0–1."""
    lo, hi = np.zeros(encoder.n_features_out_), np.ones(encoder.n_features_out_)
    for j, name in enumerate(encoder.feature_names_out_):
        if name in encoder.means_:
            bounds = declared_range(encoder.task, name)
            if bounds is None:
                raise ShareableError(f"feature {name!r} has no declared range: a DP site cannot say its range")
            mean, scale = encoder.means_[name], encoder.scales_[name]
            lo[j], hi[j] = min((bounds[0] - mean) / scale, 0.0), max((bounds[1] - mean) / scale, 0.0)
    return lo, hi


# ---------------------------------------------------------------------------------------------------------
# What the site keeps between messages of the phase


def in_session(request: SiteRequest) -> SiteRequest:
    """The request with the session's encoder: kept from it when it carries one (the session's first request),
    else taken from what this site kept for the same session (a ShareableError if it kept none)."""
    config, state = request.config, request.context.state
    session = str(config[h.SECURE_SESSION])
    if ENCODER_CONFIG_KEY in config:
        if SESSION_KEY not in state or str(state[SESSION_KEY]["session"]) != session:
            for key in [k for k in state if k == THRESHOLDS_KEY or k.startswith(MODEL_KEY + "/")]:
                del state[key]
            state[SESSION_KEY] = ConfigRecord({"session": session})
        state[SESSION_KEY][ENCODER_CONFIG_KEY] = str(config[ENCODER_CONFIG_KEY])
        return request
    kept = state.get(SESSION_KEY)
    if kept is None or str(kept["session"]) != session or ENCODER_CONFIG_KEY not in kept:
        raise ShareableError("this site kept no encoder for this session (the session's first request is missing)")
    merged = ConfigRecord(dict(config))
    merged[ENCODER_CONFIG_KEY] = str(kept[ENCODER_CONFIG_KEY])
    return dataclasses.replace(request, config=merged)


def session_thresholds(arrays: ArrayRecord, context: Context) -> list[np.ndarray]:
    """The bin thresholds: kept from the request when it carries them, else those kept earlier in the session."""
    if has_thresholds(arrays):
        thresholds = thresholds_from_record(arrays)
        context.state[THRESHOLDS_KEY] = thresholds_record(thresholds)
        return thresholds
    if THRESHOLDS_KEY not in context.state:
        raise ShareableError("this site kept no bin thresholds for this session (the first level request is missing)")
    return thresholds_from_record(context.state[THRESHOLDS_KEY])


def session_model(config: ConfigRecord, arrays: ArrayRecord, context: Context) -> list[hb.Tree]:
    """The head's finished trees: the kept ones plus the round the request brings (a round's first level),
    checked to be exactly ``round`` rounds of this head."""
    kept = context.state[SESSION_KEY]
    head, round_ = str(config[h.HEAD]), int(config[h.ROUND])
    rounds_key, model_key = f"rounds/{head}", f"{MODEL_KEY}/{head}"
    have = int(kept[rounds_key]) if rounds_key in kept and model_key in context.state else -1
    n_out = int(config[h.N_OUTPUTS])
    if has_trees(arrays, h.MODEL):
        new = trees_from_record(arrays, h.MODEL)
        if round_ == 0:
            trees: list[hb.Tree] = []
        elif have == round_ - 1:
            trees = trees_from_record(context.state[model_key], h.MODEL)
        else:
            raise ShareableError(f"head {head!r} round {round_}: this site kept {kept_rounds(have)} of it, not the "
                                 "round before")
        if len(new) != (n_out if round_ > 0 else 0):
            raise ShareableError(f"head {head!r} round {round_}: {len(new)} new trees, expected one round's")
        trees += new
        context.state[model_key] = trees_record(trees, h.MODEL)
        kept[rounds_key] = round_
        return trees
    if have != round_:
        raise ShareableError(f"head {head!r} round {round_}: this site kept {kept_rounds(have)} of it")
    return trees_from_record(context.state[model_key], h.MODEL)


def kept_rounds(have: int) -> str:
    return "no round" if have < 0 else f"round {have}"


def head_requests(config: ConfigRecord, arrays: ArrayRecord) -> list[tuple[ConfigRecord, ArrayRecord]]:
    """Each head's view of a level request (``h.HEADS``): the session's keys and the shared arrays (the
    thresholds) with the head's own keys and arrays under their plain names, and its DP release index
    (``dp-release-index + i``)."""
    n_heads = int(config[h.HEADS]) if h.HEADS in config else 0
    if n_heads < 1:
        raise ShareableError(f"a level request names {n_heads} heads to grow; expected at least one")
    shared_config = {k: v for k, v in config.items() if not k.startswith(h.HEAD_PREFIX)}
    shared_arrays = {k: v for k, v in arrays.items() if not k.startswith(h.HEAD_PREFIX)}
    views = []
    for i in range(n_heads):
        prefix = h.head_key(i, "")
        own = ConfigRecord({**shared_config, **{k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}})
        if h.HEAD not in own:
            raise ShareableError(f"a level request names {n_heads} heads but has no config for head {i}")
        if RELEASE_INDEX in config:
            own[RELEASE_INDEX] = int(config[RELEASE_INDEX]) + i
        views.append((own, ArrayRecord({**shared_arrays, **{k[len(prefix):]: v for k, v in arrays.items()
                                                            if k.startswith(prefix)}})))
    return views


# ---------------------------------------------------------------------------------------------------------
# Answers


def ranges(x: np.ndarray) -> ArrayRecord:
    """Per feature min and max of the site's rows (+inf / −inf when it has none, so they drop out)."""
    if len(x) == 0:
        return ArrayRecord({h.RANGE_MIN: Array(np.full(x.shape[1], np.inf)),
                            h.RANGE_MAX: Array(np.full(x.shape[1], -np.inf))})
    return ArrayRecord({h.RANGE_MIN: Array(x.min(axis=0).astype(np.float64)),
                        h.RANGE_MAX: Array(x.max(axis=0).astype(np.float64))})


def bin_counts(x: np.ndarray, arrays: ArrayRecord) -> np.ndarray:
    """Grid counts (features, cells) as floats."""
    return hb.grid_counts(x, arrays[h.LO].numpy(), arrays[h.HI].numpy()).astype(np.float64)


def partition_counts(x: np.ndarray, arrays: ArrayRecord) -> np.ndarray:
    """Counts on the server's refined partition (every feature's cells, concatenated), as floats."""
    bounds = hb.unpack_thresholds(arrays[h.CELL_BOUNDS].numpy(), arrays[h.CELL_OFFSETS].numpy())
    return np.concatenate(hb.cell_counts(x, bounds)).astype(np.float64)


def level_histograms(config: ConfigRecord, arrays: ArrayRecord, x: np.ndarray, y: np.ndarray, clip: bool,
                     context: Context) -> tuple[np.ndarray, dict[str, Block]]:
    """Fixed-point histograms of the requested nodes, packed (nodes, Σ feature bins, 2), and the blocks of
    their DP release: a row adds to one requested node per tree and one bin per feature, its gradient bounded by
    1 (or the clip, for squared error, whose gradients are clipped when ``clip``) and its hessian by
    ``shared.hist_boosting.HESSIAN_BOUNDS``."""
    objective = str(config[h.OBJECTIVE])
    scale = scale_bits(config)
    thresholds = session_thresholds(arrays, context)
    bins = hb.bin_rows(x, thresholds)
    n_out = int(config[h.N_OUTPUTS])
    finished = session_model(config, arrays, context)
    rounds = [finished[i:i + n_out] for i in range(0, len(finished), n_out)]
    margin = hb.predict_margin(rounds, bins, n_out, float(config[h.BASE_MARGIN]))
    g, hess = hb.gradients(objective, y, margin)
    g_bound = float(config[h.GRADIENT_CLIP]) if objective == "reg:squarederror" else 1.0
    if clip and objective == "reg:squarederror":
        g = np.clip(g, -g_bound, g_bound)
    if h.GRADIENT_BOUND in config and len(g) and np.abs(g).max() > float(config[h.GRADIENT_BOUND]):
        raise ShareableError(f"a gradient exceeds the request's bound {float(config[h.GRADIENT_BOUND]):.6g}: the "
                             "summed histograms could overflow their widths")
    positions = hb.frontier_positions(trees_from_record(arrays, h.GROWING), bins)
    frontier = [(int(k), int(node)) for k, node in arrays[h.FRONTIER].numpy()]
    histograms = hb.pack_histograms(hb.level_histograms(bins, positions, frontier, g, hess, hb.n_bins(thresholds),
                                                        scale), hb.feature_widths(thresholds))
    touched = len({k for k, _ in frontier}) * len(thresholds)
    blocks = {"gradient": Block(hb.from_fixed(histograms[..., 0], scale), g_bound, touched),
              "hessian": Block(hb.from_fixed(histograms[..., 1], scale), hb.HESSIAN_BOUNDS[objective], touched)}
    return histograms, blocks


def scale_bits(config: ConfigRecord) -> int:
    """The request's fixed-point scale (``shared.hist_boosting.TreeParams.scale_bits``), checked."""
    scale = int(config[h.SCALE_BITS]) if h.SCALE_BITS in config else hb.FIXED_POINT_BITS
    if not 1 <= scale <= hb.FIXED_POINT_BITS:
        raise ShareableError(f"the request's fixed-point scale {scale} bits is outside 1 .. {hb.FIXED_POINT_BITS}")
    return scale


def check_unsent(histograms: np.ndarray, sent: np.ndarray, arrays: ArrayRecord, widths: np.ndarray) -> None:
    """Refuse when a bin the server does not ask for holds a row of the node here (outside the parent's split
    feature, which the server knows): its proof that those bins are empty failed, and leaving them out would
    change the sum silently."""
    trees = trees_from_record(arrays, h.GROWING)
    starts = np.concatenate([[0], np.cumsum(widths)])
    for i, (k, node) in enumerate(arrays[h.FRONTIER].numpy().tolist()):
        skipped = ~sent[i]
        if node != 0:
            feature = trees[k].feature[trees[k].parent[node]]
            skipped[starts[feature]:starts[feature + 1]] = False
        if np.any(histograms[i, skipped] != 0):
            raise ShareableError(f"node {node} of tree {k} has rows in bins the request leaves out")


def _released(request: SiteRequest, blocks: dict[str, Block], content: RecordDict,
              facts_key: str = r.PRIVACY) -> dict[str, np.ndarray]:
    """The blocks as released: exact for a site without DP, through the ``boosting`` phase's release
    ``dp-release-index`` else (its facts then go into ``content`` under ``facts_key``)."""
    if request.dp is None:
        return {name: np.asarray(block.values) for name, block in blocks.items()}
    release = PhaseRelease.for_phase(request.context, request.dp, "boosting",
                                     releases=int(request.config[RELEASES]))
    noised, facts = release.release(blocks, int(request.config[RELEASE_INDEX]))
    content[facts_key] = facts.to_record()
    return noised


# ---------------------------------------------------------------------------------------------------------
# Handlers


def answer_ranges(msg: Message, request: SiteRequest) -> RecordDict:
    encoder, x, _ = training_matrix(request)
    if request.dp is None:
        arrays = ranges(x)
        arrays[h.ROWS] = Array(np.array([len(x)], dtype=np.int64))  # a count its site check already shares
        return RecordDict({r.ARRAYS: arrays})
    lo, hi = public_ranges(encoder)
    return RecordDict({r.ARRAYS: ArrayRecord({h.RANGE_MIN: Array(lo), h.RANGE_MAX: Array(hi)})})


def answer_counts(count: Any) -> Any:
    """A handler releasing ``count(x, arrays)`` (one row in one cell per feature), masked."""

    def answer(msg: Message, request: SiteRequest) -> RecordDict:
        _, x, _ = training_matrix(request)
        counts = count(x, msg.content[r.ARRAYS])
        content = RecordDict()
        if h.COUNT_BITS in request.config:  # whole counts in the announced width (the server has every site's rows)
            if request.dp is not None:
                raise ShareableError("a DP site releases noised counts, not whole ones in a fixed width")
            values = np.rint(counts).astype(np.int64).reshape(-1)
            bits = np.full(values.shape, int(request.config[h.COUNT_BITS]), dtype=np.int64)
            content[r.ARRAYS] = ArrayRecord({h.COUNTS: masked(values, request.config, request.context, bits)})
            return content
        released = _released(request, {"counts": Block(counts, 1.0, x.shape[1])}, content)["counts"]
        content[r.ARRAYS] = ArrayRecord({h.COUNTS: masked(hb.to_fixed(released), request.config, request.context)})
        return content

    return answer


def head_level(request: SiteRequest, arrays: ArrayRecord, x: np.ndarray, targets: dict[str, np.ndarray],
               content: RecordDict, facts_key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One head's histograms of a level request (``request.config`` and ``arrays``: the head's view,
    :func:`head_requests`) as released (noised at a DP site, its facts into ``content``), and every entry's
    announced width (None: 64-bit words)."""
    x, y = labelled_rows(request.config, x, targets)
    histograms, blocks = level_histograms(request.config, arrays, x, y, request.dp is not None, request.context)
    bits = None
    if h.WIDTHS in arrays:  # packed in the announced widths (the server has every site's rows)
        if request.dp is not None:
            raise ShareableError("a DP site releases noised histograms, not entries in bounded widths")
        widths = hb.feature_widths(session_thresholds(ArrayRecord(), request.context))
        level_widths = arrays[h.WIDTHS].numpy()
        sent = np.unpackbits(arrays[h.SENT].numpy(), count=len(level_widths) * int(widths.sum()),
                             bitorder="little").reshape(len(level_widths), -1).astype(bool)
        check_unsent(histograms, sent, arrays, widths)
        bits = hist_wire.entry_bits(level_widths, widths) * sent[..., None]
    if request.dp is not None:
        noised = _released(request, blocks, content, facts_key)
        scale = scale_bits(request.config)
        histograms = np.stack([hb.to_fixed(noised["gradient"], scale), hb.to_fixed(noised["hessian"], scale)],
                              axis=-1)
    return histograms, bits


def answer_level(msg: Message, request: SiteRequest) -> RecordDict:
    """Every head's histograms of the level request (:func:`head_level`), one after the other in one vector,
    masked as one release."""
    _, x, targets = training_matrix(request)
    content = RecordDict()
    values, widths = [], []
    for i, (config, arrays) in enumerate(head_requests(request.config, msg.content[r.ARRAYS])):
        try:
            histograms, bits = head_level(dataclasses.replace(request, config=config), arrays, x, targets, content,
                                          h.privacy_key(i))
        except ShareableError as err:  # name the head: one refusal stops every head of the request
            raise ShareableError(f"head {str(config[h.HEAD])!r}: {err}") from err
        values.append(histograms.reshape(-1))
        widths.append(bits)
    compact = [bits is not None for bits in widths]
    if any(compact) and not all(compact):
        raise ShareableError("a level request announces entry widths for some of its heads only")
    bits = np.concatenate([b.reshape(-1) for b in widths]) if all(compact) else None
    content[r.ARRAYS] = ArrayRecord({h.HISTOGRAMS: masked(np.concatenate(values), request.config, request.context,
                                                          bits)})
    return content


def session_answer(answer: Any) -> Any:
    """``answer`` with the session's kept encoder (:func:`in_session`)."""

    def answer_in_session(msg: Message, request: SiteRequest) -> RecordDict:
        return answer(msg, in_session(request))

    return answer_in_session


def register_hist(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the ``query.hist_*`` handlers to ``client``."""
    for message, handler in SECURE_AGGREGATION.items():
        client.query(message.action)(refusing(handler))
    for message, answer in ((messages.HIST_RANGES, answer_ranges), (messages.HIST_BINS, answer_counts(bin_counts)),
                            (messages.HIST_CELLS, answer_counts(partition_counts)),
                            (messages.HIST_LEVEL, answer_level)):
        client.query(message.action)(handlers(session_answer(answer), ErrorCode.HIST_REQUEST))
