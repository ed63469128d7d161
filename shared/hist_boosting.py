"""Histogram gradient boosting built from SUMS of gradient/hessian histograms, so sites can grow one tree.

The tree learner of XGBoost's ``tree_method="hist"`` (Chen & Guestrin, "XGBoost: A Scalable Tree Boosting
System", KDD 2016, §2.2 and §3.1; histogram aggregation as in LightGBM, Ke et al., NeurIPS 2017) never looks
at a row when it chooses a split: it looks at, per tree node and feature, the sums of the rows' gradients g
and hessians h in each bin. Sums of per-site histograms are the pooled histograms, so a server that adds
them chooses exactly the split a pooled learner would (the idea of SecureBoost, Cheng et al., IEEE
Intelligent Systems 2021, and of NVIDIA FLARE's histogram-based federated XGBoost). This module holds the
pieces both sides share, in the order a run uses them:

1. **Global bins.** Every site counts its rows of each feature on a uniform grid of ``N_CELLS`` cells
   between the federated minimum and maximum (:func:`grid_counts`); the server adds the counts and cuts
   each feature into at most ``max_bin`` bins of about equal total count, at cell boundaries
   (:func:`thresholds_from_counts`): a weighted quantile sketch of the pooled column built from
   mergeable histograms (Ben-Haim & Tom-Tov, "A Streaming Parallel Decision Tree Algorithm", JMLR 2010).
   When a feature has at most ``max_bin`` occupied cells, every occupied cell gets its own bin (as XGBoost
   gives every distinct value its own bin when there are few). A row's bin is
   ``searchsorted(thresholds, x, side="right")``, so ``bin <= t`` exactly when ``x < thresholds[t]``:
   XGBoost's own split rule, which makes the exported trees route every value as the learner did.
2. **Gradients** of the objective at the current margins (:func:`gradients`): ``binary:logistic``,
   ``reg:squarederror`` and ``multi:softprob`` (one tree per class and round, as XGBoost does), with
   XGBoost's hessians (``p(1 − p)``, ``1``, ``2p(1 − p)``).
3. **Histograms** per (tree, node, feature, bin) of g and h in fixed point (:func:`level_histograms`):
   integers ``round(v · 2^FIXED_POINT_BITS)`` per row, summed in int64. Integer sums do not depend on the
   order of addition, so a federated sum is bit-for-bit the pooled sum; they are also what secure
   summation (``client.secure_sum``) masks modulo 2^64.
4. **Splits** (:class:`LevelGrower`): XGBoost's structure score. For a node with sums G, H and a split into
   L and R, ``gain = G_L²/(H_L + λ) + G_R²/(H_R + λ) − G²/(H + λ)`` (Chen & Guestrin eq. 7 without the
   constant ½, as XGBoost reports ``loss_chg``); a split needs ``gain > SPLIT_EPSILON`` and
   ``H_L, H_R ≥ min_child_weight``; ties go to the lowest (feature, bin) as in XGBoost. Leaf weight
   ``w = −G/(H + λ)`` (eq. 5), stored times the learning rate. After growth, splits whose children are
   leaves and whose gain is below γ are pruned bottom-up (XGBoost's ``prune`` updater).

The pooled reference learner with the scikit-learn API is :class:`shared.hist_learner.HistGradientBoosting`;
the export to XGBoost's JSON model is :mod:`shared.xgboost_json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, softmax

N_CELLS = 8192
"""Grid cells per feature for the bin-edge histograms (one message per run, ``N_CELLS`` counts per feature):
fine enough that distinct values of a small table rarely share a cell (120 normal values: 1 pair in 120)."""

MAX_BIN = 256
"""XGBoost's default ``max_bin``."""

FIXED_POINT_BITS = 32
"""Histogram entries are integers ``round(v · 2^32)``: resolution 2.3e-10 per row; int64 holds sums below 2^31."""

SPLIT_EPSILON = 1e-6
"""XGBoost's ``kRtEps``: a split must improve the structure score by more than this."""

HESSIAN_FLOOR = 1e-16
"""XGBoost floors the hessians of logistic and softmax losses at this value."""

OBJECTIVES = ("binary:logistic", "reg:squarederror", "multi:softprob")

LEAF = -1
"""``feature`` of a leaf node (and ``left`` / ``right`` of a leaf, as in XGBoost's JSON)."""


# ---------------------------------------------------------------------------------------------------------
# 1. Global bins


def cell_bounds(lo: float, hi: float, n_cells: int = N_CELLS) -> np.ndarray:
    """The inner boundaries (float32, increasing, unique) of ``n_cells`` equal cells on ``[lo, hi]``."""
    if not np.isfinite(lo) or not np.isfinite(hi) or hi < lo:
        raise ValueError(f"cell_bounds: expected finite lo <= hi, got lo={lo!r}, hi={hi!r}")
    if hi == lo:
        return np.zeros(0, dtype=np.float32)
    inner = lo + (hi - lo) * np.arange(1, n_cells) / n_cells
    return np.unique(inner.astype(np.float32))


def grid_counts(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_cells: int = N_CELLS) -> np.ndarray:
    """Per feature, how many rows of ``x`` fall in each cell of its grid: int64 array (features, n_cells)."""
    x = np.asarray(x, dtype=np.float32)
    counts = np.zeros((x.shape[1], n_cells), dtype=np.int64)
    for f in range(x.shape[1]):
        cells = np.searchsorted(cell_bounds(lo[f], hi[f], n_cells), x[:, f], side="right")
        counts[f] = np.bincount(cells, minlength=n_cells)[:n_cells]
    return counts


def feature_thresholds(counts: np.ndarray, bounds: np.ndarray, max_bin: int = MAX_BIN) -> np.ndarray:
    """One feature's bin thresholds (float32, increasing) from its summed cell counts.

    A bin ends after an occupied cell (count >= 0.5, so DP-noised counts work too). With at most ``max_bin``
    occupied cells each gets its own bin; else bins end where the cumulative count first reaches
    ``k · total / max_bin``. The threshold between two bins is the lower boundary of the next occupied
    cell: like XGBoost's cut at the next value, an unseen value between two bins goes left.
    """
    counts = np.clip(np.asarray(counts, dtype=np.float64)[:len(bounds) + 1], 0.0, None)
    occupied = np.flatnonzero(counts >= 0.5)
    if len(occupied) <= max_bin:
        last_cells = occupied[:-1]
    else:
        cumulative = np.cumsum(counts)
        targets = cumulative[-1] * np.arange(1, max_bin) / max_bin
        last_cells = np.unique(np.searchsorted(cumulative, targets, side="left"))
        last_cells = last_cells[last_cells < occupied[-1]]
    next_occupied = occupied[np.searchsorted(occupied, last_cells, side="right")]
    return bounds[next_occupied - 1].astype(np.float32)


def thresholds_from_counts(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_bin: int = MAX_BIN,
                           n_cells: int = N_CELLS) -> list[np.ndarray]:
    """Every feature's bin thresholds from the summed grid counts (features, n_cells)."""
    return [feature_thresholds(counts[f], cell_bounds(lo[f], hi[f], n_cells), max_bin) for f in range(len(counts))]


def bin_rows(x: np.ndarray, thresholds: list[np.ndarray]) -> np.ndarray:
    """Each value's bin (int32, rows × features): the number of thresholds at or below it."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(thresholds):
        raise ValueError(f"bin_rows: expected a 2-D array with {len(thresholds)} columns, got shape {x.shape}")
    return np.column_stack([np.searchsorted(t, x[:, f], side="right") for f, t in enumerate(thresholds)]
                           ).astype(np.int32).reshape(len(x), len(thresholds))


def n_bins(thresholds: list[np.ndarray]) -> int:
    """Bins of the widest feature (every histogram is that wide)."""
    return 1 + max((len(t) for t in thresholds), default=0)


def pack_thresholds(thresholds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds as two arrays for a message: all values, and each feature's start offset (+ the end)."""
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in thresholds])]).astype(np.int64)
    values = np.concatenate(thresholds).astype(np.float32) if thresholds else np.zeros(0, np.float32)
    return values, offsets


def unpack_thresholds(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """The inverse of :func:`pack_thresholds`."""
    return [np.asarray(values[offsets[f]:offsets[f + 1]], dtype=np.float32) for f in range(len(offsets) - 1)]


# ---------------------------------------------------------------------------------------------------------
# 2. Objectives


def n_outputs(objective: str, n_classes: int = 0) -> int:
    """Trees per boosting round: one, or one per class for softmax."""
    check_objective(objective)
    return n_classes if objective == "multi:softprob" else 1


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")


def base_margin(objective: str, base_score: float) -> float:
    """The starting margin of every row: logit of ``base_score`` for logistic, else ``base_score`` itself
    (XGBoost's ``ProbToMargin``; for softmax a common margin cancels)."""
    check_objective(objective)
    if objective == "binary:logistic":
        return float(np.log(base_score / (1.0 - base_score)))
    return float(base_score)


def gradients(objective: str, y: np.ndarray, margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and hessian of the loss per row and output, each (rows, outputs), as XGBoost computes them."""
    y = np.asarray(y, dtype=np.float64)
    if objective == "binary:logistic":
        p = expit(margin[:, 0])
        return (p - y)[:, None], np.maximum(p * (1.0 - p), HESSIAN_FLOOR)[:, None]
    if objective == "reg:squarederror":
        return (margin[:, 0] - y)[:, None], np.ones((len(y), 1))
    if objective == "multi:softprob":
        p = softmax(margin, axis=1)
        onehot = np.zeros_like(p)
        onehot[np.arange(len(y)), y.astype(int)] = 1.0
        return p - onehot, np.maximum(2.0 * p * (1.0 - p), HESSIAN_FLOOR)
    check_objective(objective)
    raise AssertionError("unreachable")


def transform(objective: str, margin: np.ndarray) -> np.ndarray:
    """Predictions from margins: probabilities (1-D for logistic, rows × classes for softmax) or values."""
    if objective == "binary:logistic":
        return expit(margin[:, 0])
    if objective == "multi:softprob":
        return softmax(margin, axis=1)
    return margin[:, 0]


# ---------------------------------------------------------------------------------------------------------
# 3. Fixed-point histograms


def to_fixed(values: np.ndarray) -> np.ndarray:
    """Values as int64 fixed-point integers ``round(v · 2^FIXED_POINT_BITS)``."""
    return np.rint(np.asarray(values, dtype=np.float64) * 2.0 ** FIXED_POINT_BITS).astype(np.int64)


def from_fixed(values: np.ndarray) -> np.ndarray:
    """Fixed-point integers back to float64."""
    return np.asarray(values, dtype=np.int64).astype(np.float64) / 2.0 ** FIXED_POINT_BITS


def level_histograms(bins: np.ndarray, positions: np.ndarray, frontier: list[tuple[int, int]], g: np.ndarray,
                     h: np.ndarray, width: int) -> np.ndarray:
    """Fixed-point gradient and hessian histograms of the frontier nodes: int64 (nodes, features, width, 2).

    ``positions[k]`` is each row's node in tree ``k``; ``frontier`` lists (tree, node) pairs; tree ``k`` sums
    output ``k`` of ``g`` and ``h``. A site calls this on its rows; the pooled learner on all rows.
    """
    n_features = bins.shape[1]
    out = np.zeros((len(frontier), n_features, width, 2), dtype=np.int64)
    g_fixed, h_fixed = to_fixed(g), to_fixed(h)
    for i, (tree, node) in enumerate(frontier):
        rows = np.flatnonzero(positions[tree] == node)
        for f in range(n_features):
            np.add.at(out[i, f, :, 0], bins[rows, f], g_fixed[rows, tree])
            np.add.at(out[i, f, :, 1], bins[rows, f], h_fixed[rows, tree])
    return out


# ---------------------------------------------------------------------------------------------------------
# 4. Trees and their growth


@dataclass(frozen=True)
class TreeParams:
    """XGBoost's tree parameters, with its names in comments.

    Parameters
    ----------
    learning_rate : float, default 0.1   (``eta``)
    max_depth : int, default 4
    reg_lambda : float, default 1.0      (``lambda``: L2 penalty on leaf weights)
    gamma : float, default 0.0           (``min_split_loss``)
    min_child_weight : float, default 1.0
    """

    learning_rate: float = 0.1
    max_depth: int = 4
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0


@dataclass
class Tree:
    """One regression tree in XGBoost's node layout (node 0 the root, children after their parent).

    A split node sends a row left when its ``bin <= split_bin`` (equivalently ``x < threshold``).
    ``weight`` is the unshrunk ``−G/(H + λ)`` of every node; ``leaf_value`` is ``learning_rate · weight``.
    """

    feature: list[int] = field(default_factory=lambda: [LEAF])
    split_bin: list[int] = field(default_factory=lambda: [0])
    threshold: list[float] = field(default_factory=lambda: [0.0])
    left: list[int] = field(default_factory=lambda: [LEAF])
    right: list[int] = field(default_factory=lambda: [LEAF])
    parent: list[int] = field(default_factory=lambda: [LEAF])
    weight: list[float] = field(default_factory=lambda: [0.0])
    leaf_value: list[float] = field(default_factory=lambda: [0.0])
    gain: list[float] = field(default_factory=lambda: [0.0])
    hessian: list[float] = field(default_factory=lambda: [0.0])

    @property
    def n_nodes(self) -> int:
        return len(self.feature)

    def add_children(self, node: int) -> tuple[int, int]:
        """Append two leaves under ``node``; returns their ids."""
        ids = (self.n_nodes, self.n_nodes + 1)
        for _ in ids:
            for name, value in (("feature", LEAF), ("split_bin", 0), ("threshold", 0.0), ("left", LEAF),
                                ("right", LEAF), ("parent", node), ("weight", 0.0), ("leaf_value", 0.0),
                                ("gain", 0.0), ("hessian", 0.0)):
                getattr(self, name).append(value)
        self.left[node], self.right[node] = ids
        return ids

    def positions(self, bins: np.ndarray) -> np.ndarray:
        """The node each row reaches (a leaf, or a node not split yet)."""
        node = np.zeros(len(bins), dtype=np.int64)
        for current in range(self.n_nodes):  # parents come before children
            if self.feature[current] == LEAF:
                continue
            here = node == current
            goes_left = bins[here, self.feature[current]] <= self.split_bin[current]
            node[here] = np.where(goes_left, self.left[current], self.right[current])
        return node

    def predict_bins(self, bins: np.ndarray) -> np.ndarray:
        """Each row's leaf value."""
        return np.asarray(self.leaf_value)[self.positions(bins)]


@dataclass(frozen=True)
class Split:
    """The best split of one node, or none (``feature == LEAF``)."""

    feature: int
    split_bin: int
    gain: float


def node_totals(histogram: np.ndarray) -> tuple[float, float]:
    """G and H of a node from its histogram (features, width, 2): the sum over feature 0's bins."""
    totals = from_fixed(histogram[0].sum(axis=0))
    return float(totals[0]), float(totals[1])


def leaf_weight(gradient: float, hessian: float, params: TreeParams) -> float:
    """XGBoost's ``CalcWeight``: −G/(H + λ), or 0 when H is below ``min_child_weight`` or not positive."""
    if hessian < params.min_child_weight or hessian <= 0.0:
        return 0.0
    return -gradient / (hessian + params.reg_lambda)


def best_split(histogram: np.ndarray, params: TreeParams) -> Split:
    """The split of largest gain of a node from its fixed-point histogram (features, width, 2)."""
    stats = from_fixed(histogram)
    left = np.cumsum(stats, axis=1)[:, :-1, :]  # rows with bin <= t, for t = 0 .. width - 2
    g_total, h_total = node_totals(histogram)
    g_left, h_left = left[..., 0], left[..., 1]
    g_right, h_right = g_total - g_left, h_total - h_left
    lam = params.reg_lambda
    gain = g_left ** 2 / (h_left + lam) + g_right ** 2 / (h_right + lam) - g_total ** 2 / (h_total + lam)
    allowed = (h_left >= params.min_child_weight) & (h_right >= params.min_child_weight)
    gain = np.where(allowed, gain, -np.inf)
    if gain.size == 0:
        return Split(LEAF, 0, 0.0)
    feature, split_bin = np.unravel_index(int(np.argmax(gain)), gain.shape)  # first maximum: lowest feature, bin
    best = float(gain[feature, split_bin])
    if not best > SPLIT_EPSILON:
        return Split(LEAF, 0, 0.0)
    return Split(int(feature), int(split_bin), best)


class LevelGrower:
    """Grows the trees of one boosting round level by level from (summed) frontier histograms.

    Parameters
    ----------
    n_trees : int
        Trees grown together (one per output: 1, or the number of classes for softmax).
    thresholds : list of ndarray
        Every feature's bin thresholds (for the split values of the exported trees).
    params : TreeParams

    Use: while not ``done``: histograms of ``frontier`` → :meth:`grow`. Then ``trees``.
    """

    def __init__(self, n_trees: int, thresholds: list[np.ndarray], params: TreeParams) -> None:
        self.thresholds = thresholds
        self.params = params
        self.trees = [Tree() for _ in range(n_trees)]
        self.frontier: list[tuple[int, int]] = [(k, 0) for k in range(n_trees)]
        self.depth = 0

    @property
    def done(self) -> bool:
        return not self.frontier

    @property
    def last_level(self) -> bool:
        """At the deepest level only node totals matter (the nodes become leaves)."""
        return self.depth >= self.params.max_depth

    def grow(self, histograms: np.ndarray) -> None:
        """Set the frontier nodes from their histograms (frontier, features, width, 2): split or leaf."""
        if len(histograms) != len(self.frontier):
            raise ValueError(f"LevelGrower.grow: expected histograms for {len(self.frontier)} frontier nodes, "
                             f"got {len(histograms)}")
        next_frontier = []
        for (k, node), histogram in zip(self.frontier, histograms, strict=True):
            tree = self.trees[k]
            g_total, h_total = node_totals(histogram)
            tree.hessian[node] = h_total
            tree.weight[node] = leaf_weight(g_total, h_total, self.params)
            tree.leaf_value[node] = self.params.learning_rate * tree.weight[node]
            split = Split(LEAF, 0, 0.0) if self.last_level else best_split(histogram, self.params)
            if split.feature == LEAF:
                continue
            tree.feature[node], tree.split_bin[node], tree.gain[node] = split.feature, split.split_bin, split.gain
            tree.threshold[node] = float(self.thresholds[split.feature][split.split_bin])
            next_frontier += [(k, child) for child in tree.add_children(node)]
        self.frontier = next_frontier
        self.depth += 1
        if self.done:
            for tree in self.trees:
                prune(tree, self.params.gamma)


def prune(tree: Tree, gamma: float) -> None:
    """Turn back into leaves the splits with gain below ``gamma`` whose children are leaves, bottom-up.

    Pruned children stay in the node arrays, detached (XGBoost marks them deleted; the export drops them).
    """
    for node in reversed(range(tree.n_nodes)):
        left, right = tree.left[node], tree.right[node]
        if left == LEAF or tree.feature[left] != LEAF or tree.feature[right] != LEAF:
            continue
        if tree.gain[node] < gamma:
            tree.feature[node], tree.left[node], tree.right[node], tree.gain[node] = LEAF, LEAF, LEAF, 0.0


def frontier_positions(trees: list[Tree], bins: np.ndarray) -> np.ndarray:
    """Each row's node in each tree (trees, rows)."""
    return np.stack([tree.positions(bins) for tree in trees]) if trees else np.zeros((0, len(bins)), np.int64)


def predict_margin(rounds: list[list[Tree]], bins: np.ndarray, n_outputs: int, start: float) -> np.ndarray:
    """Margins (rows, outputs): ``start`` plus every round's leaf values, added round by round."""
    margin = np.full((len(bins), n_outputs), start, dtype=np.float64)
    for trees in rounds:
        for k, tree in enumerate(trees):
            margin[:, k] += tree.predict_bins(bins)
    return margin
