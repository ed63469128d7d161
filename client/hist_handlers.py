"""What a hospital answers in federated histogram boosting: bins, gradient/hessian histograms, masked and noised.

The site side of ``server.hist_phase`` (the protocol and its sources are described there and in
``shared.hist_boosting``). Every answer is computed from the site's training split, encoded with the run's
federated encoder; what leaves the site is per-feature minima and maxima, grid counts and per-node
histograms: sums over rows, never a row.

- ``query.hist_keys``: a fresh X25519 key pair for this run's secure sum (``shared.secure_sum``); the
  private key stays in the node's context state, the public key goes to the server.
- ``query.hist_ranges``: per encoded feature, the minimum and maximum of the site's rows (the statistics
  phase has already released the same minima and maxima of the raw columns).
- ``query.hist_bins``: per feature, row counts on the grid between the federated minimum and maximum.
- ``query.hist_cells``: per feature, row counts on a finer partition the server sends (the grid with its
  crowded cells split, ``shared.hist_boosting.global_thresholds``); asked at most ``REFINE_PASSES`` times.
- ``query.hist_level``: for the requested frontier nodes of the round's trees (one child per split parent,
  the server derives the sibling by subtraction), the fixed-point histograms of the objective's gradients and
  hessians at the margins of the trees so far (sent with the request), each feature's own bins only.

What the counts disclose. Summed over sites (and masked, so the server sees only the sum), the grid and
cell counts are the pooled histogram of each feature at the resolution of the final cells: where rows
crowd, cells are split until each holds one distinct value, so for a small table the server learns the
pooled multiset of each column's values to about float32 precision (not which site or row holds them) —
as much as XGBoost's own cut points, which the exported trees carry anyway. A cell holding a single row
is never split further. Under DP every count release is noised like the grid counts below.

Differential privacy. When the run grants this phase an ε (``dp-epsilon`` > 0), every grid-count and
histogram release is a Gaussian mechanism (Dwork & Roth 2014, App. A) on the site's sums: one row changes
each of the ``touched`` entries of a block by at most its bound (gradient bound 1 for logistic and softmax,
``dp-gradient-clip`` for squared error, whose gradients are clipped; hessian bound 1/4, 1/2 or 1; a count 1),
so after dividing by the bounds the L2 sensitivity is ``Δ = sqrt(Σ touched)`` and noise of sd ``σ·Δ·bound``
makes it ``(α, α/2σ²)``-RDP: the ledger entry ``(σ, 1.0, 1)`` (Mironov 2017), charged to the site's privacy
ledger (``client.ledger``; the same ledger DP-SGD and analytics charge) when its ``site.toml`` enables DP.
``σ`` is the smallest that lets the run's announced releases (``dp-releases``) compose to ε; a site refuses
a release its remaining budget cannot pay. Noise is added before masking, so the server sees only the sum
of the noised histograms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.ledger import PrivacyLedger, calibrate_noise
from client.site_query import site_query
from client.training import encode, split_site
from shared import hist_boosting as hb
from shared import secure_sum
from shared.boosting import Head, head_labels
from shared.encoding import FeatureEncoder
from shared.hist_records import thresholds_from_record, trees_from_record

QUERY_KEYS = "hist_keys"
QUERY_RANGES = "hist_ranges"
QUERY_BINS = "hist_bins"
QUERY_CELLS = "hist_cells"
QUERY_LEVEL = "hist_level"
STATE_KEY = "hist-secure-sum"
ERROR_HIST_REQUEST = 4004
"""Error code of a request a site cannot answer (a reused mask label, a lone site asked to mask)."""

HESSIAN_BOUNDS = {"binary:logistic": 0.25, "multi:softprob": 0.5, "reg:squarederror": 1.0}
"""Largest hessian one row can have: p(1 − p) ≤ 1/4, 2p(1 − p) ≤ 1/2, 1."""

DEFAULT_DELTA = 1e-5
"""δ of the Gaussian mechanism for a site without a ledger of its own."""


# ---------------------------------------------------------------------------------------------------------
# The site's rows, as every message of the phase sees them


def training_matrix(site: Any, config: ConfigRecord) -> tuple[FeatureEncoder, np.ndarray, dict[str, np.ndarray]]:
    """The encoder, the encoded training features (float32) and targets of the site's training split."""
    encoder = FeatureEncoder.from_config_record(config)
    rows = split_site(site.episodes, site.task, int(config["split-seed"]))["train"]
    data = encode(encoder, rows)
    return encoder, np.asarray(data.x, dtype=np.float32), data.targets


def labelled_rows(config: ConfigRecord, x: np.ndarray, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The rows whose label for this head is recorded, and their labels (class index for softmax)."""
    positive = int(config["positive-class"])
    head = Head(str(config["outcome"]), str(config["kind"]), positive if positive >= 0 else None)
    y = head_labels(head, targets) if head.kind != "multiclass" else targets[head.outcome].astype(float)
    keep = ~np.isnan(y)
    return x[keep], y[keep]


# ---------------------------------------------------------------------------------------------------------
# Answers


def ranges(x: np.ndarray) -> ArrayRecord:
    """Per feature min and max of the site's rows (+inf / −inf when it has none, so they drop out)."""
    if len(x) == 0:
        return ArrayRecord({"min": Array(np.full(x.shape[1], np.inf)), "max": Array(np.full(x.shape[1], -np.inf))})
    return ArrayRecord({"min": Array(x.min(axis=0).astype(np.float64)), "max": Array(x.max(axis=0).astype(np.float64))})


def bin_counts(x: np.ndarray, arrays: ArrayRecord, noise: Noise | None) -> np.ndarray:
    """Fixed-point grid counts (features, cells), noised when ``noise`` is given."""
    lo, hi = arrays["lo"].numpy(), arrays["hi"].numpy()
    counts = hb.to_fixed(hb.grid_counts(x, lo, hi).astype(np.float64))
    if noise is not None:
        counts = counts + noise.fixed(counts.shape, sd=noise.sigma * math.sqrt(x.shape[1]))
    return counts


def partition_counts(x: np.ndarray, arrays: ArrayRecord, noise: Noise | None) -> np.ndarray:
    """Fixed-point counts on the server's refined partition (every feature's cells, concatenated), noised when
    ``noise`` is given (one row is in one cell per feature, as on the grid)."""
    bounds = hb.unpack_thresholds(arrays["cell-bounds"].numpy(), arrays["cell-offsets"].numpy())
    counts = hb.to_fixed(np.concatenate(hb.cell_counts(x, bounds)).astype(np.float64))
    if noise is not None:
        counts = counts + noise.fixed(counts.shape, sd=noise.sigma * math.sqrt(x.shape[1]))
    return counts


def level_histograms(config: ConfigRecord, arrays: ArrayRecord, x: np.ndarray, y: np.ndarray,
                     noise: Noise | None) -> np.ndarray:
    """Fixed-point histograms of the requested nodes, packed (nodes, Σ feature bins, 2), noised when asked."""
    objective = str(config["objective"])
    thresholds = thresholds_from_record(arrays)
    bins = hb.bin_rows(x, thresholds)
    n_out = int(config["n-outputs"])
    finished = trees_from_record(arrays, "model")
    rounds = [finished[i:i + n_out] for i in range(0, len(finished), n_out)]
    margin = hb.predict_margin(rounds, bins, n_out, float(config["base-margin"]))
    g, h = hb.gradients(objective, y, margin)
    clip = float(config["dp-gradient-clip"])
    if noise is not None and objective == "reg:squarederror":
        g = np.clip(g, -clip, clip)
    positions = hb.frontier_positions(trees_from_record(arrays, "growing"), bins)
    frontier = [(int(k), int(node)) for k, node in arrays["frontier"].numpy()]
    histograms = hb.pack_histograms(hb.level_histograms(bins, positions, frontier, g, h, hb.n_bins(thresholds)),
                                    hb.feature_widths(thresholds))
    if noise is not None:
        trees = len({k for k, _ in frontier})
        delta = math.sqrt(2 * trees * len(thresholds))  # a row: one requested node per tree, one bin per feature
        g_bound = clip if objective == "reg:squarederror" else 1.0
        histograms[..., 0] += noise.fixed(histograms.shape[:-1], sd=noise.sigma * delta * g_bound)
        histograms[..., 1] += noise.fixed(histograms.shape[:-1], sd=noise.sigma * delta * HESSIAN_BOUNDS[objective])
    return histograms


class Noise:
    """The Gaussian noise of one release: σ (the noise multiplier) and a generator seeded from OS entropy."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma
        self.rng = np.random.default_rng()

    def fixed(self, shape: tuple[int, ...], sd: float) -> np.ndarray:
        return hb.to_fixed(self.rng.normal(0.0, sd, size=shape))


def release_noise(config: ConfigRecord, ledger: PrivacyLedger | None, run_id: Any) -> Noise | None:
    """The noise of this release (None without DP); checks the ledger can pay and charges it."""
    epsilon = float(config["dp-epsilon"])
    if epsilon <= 0:
        return None
    planned, index = int(config["dp-releases"]), int(config["dp-release-index"])
    delta = ledger.delta if ledger is not None else DEFAULT_DELTA
    sigma = calibrate_noise(epsilon, delta, 1.0, planned)
    if ledger is not None:
        ledger.check_affordable(sigma, 1.0, max(1, planned - index))
        ledger.record(sigma, 1.0, 1, run_id=run_id, server_round=index)
    return Noise(sigma)


def masked(values: np.ndarray, config: ConfigRecord, context: Context) -> Array:
    """``values`` as sent: masked for the secure sum when the run asks for it, else as they are."""
    if not bool(config["secure-sum"]):
        return Array(values)
    state = context.state.get(STATE_KEY)
    if state is None or str(state["session"]) != str(config["secure-session"]):
        raise secure_sum.SecureSumError("no secure-sum key for this session at this site (query.hist_keys first)")
    sequence = int(config["secure-sequence"])
    if sequence <= int(state["last-sequence"]):
        raise secure_sum.SecureSumError(f"mask label {sequence} was already used: refusing to reuse a mask")
    state["last-sequence"] = sequence
    peers = dict(zip((int(n) for n in config["secure-nodes"]), config["secure-keys"], strict=True))
    label = f"{config['secure-session']}/{sequence}"
    return Array(secure_sum.mask(values, bytes(state["private-key"]), context.node_id, peers, label))


# ---------------------------------------------------------------------------------------------------------
# Registration


def register_hist(client: ClientApp, site_source_fn: Callable[[Context], Any], load_fn: Callable[[Any], Any],
                  ledger_fn: Callable[[Any, Any], PrivacyLedger | None]) -> ClientApp:
    """Add the ``query.hist_*`` handlers to ``client`` (arguments as ``client.analytics.register_analytics``)."""
    client.query(QUERY_KEYS)(_keys)
    for name in (QUERY_RANGES, QUERY_BINS, QUERY_CELLS, QUERY_LEVEL):
        client.query(name)(_handler(name, site_source_fn, load_fn, ledger_fn))
    return client


def _keys(msg: Message, context: Context) -> Message:
    """A fresh key pair for the session; the private key stays in this node's context state."""
    private_key = secure_sum.new_private_key()
    session = str(msg.content["config"]["secure-session"])
    context.state[STATE_KEY] = ConfigRecord({"session": session, "private-key": private_key, "last-sequence": -1})
    reply = ConfigRecord({"public-key": secure_sum.public_key(private_key)})
    return Message(RecordDict({"keys": reply}), reply_to=msg)


def _handler(name: str, site_source_fn, load_fn, ledger_fn) -> Callable[[Message, Context], Message]:
    """The query handler of ``query.<name>``, answering from this node's training split."""

    def answer_query(msg: Message, context: Context, site: Any, ledger: PrivacyLedger | None, who: str) -> RecordDict:
        return RecordDict({"arrays": _answer(name, msg, context, site, ledger)})

    return site_query(name, site_source_fn, load_fn, ledger_fn, answer_query, ERROR_HIST_REQUEST)


def _answer(name: str, msg: Message, context: Context, site: Any, ledger: PrivacyLedger | None) -> ArrayRecord:
    config, arrays = msg.content["config"], msg.content["arrays"]
    _, x, targets = training_matrix(site, config)
    if name == QUERY_RANGES:
        return ranges(x)
    if name == QUERY_BINS:
        counts = bin_counts(x, arrays, release_noise(config, ledger, context.run_id))
        return ArrayRecord({"counts": masked(counts, config, context)})
    if name == QUERY_CELLS:
        counts = partition_counts(x, arrays, release_noise(config, ledger, context.run_id))
        return ArrayRecord({"counts": masked(counts, config, context)})
    x, y = labelled_rows(config, x, targets)
    histograms = level_histograms(config, arrays, x, y, release_noise(config, ledger, context.run_id))
    return ArrayRecord({"histograms": masked(histograms, config, context)})
