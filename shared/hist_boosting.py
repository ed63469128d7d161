"""Histogram gradient boosting built from SUMS of gradient/hessian histograms, so sites can grow one tree.

The tree learner of XGBoost's ``tree_method="hist"`` (Chen & Guestrin, "XGBoost: A Scalable Tree Boosting
System", KDD 2016, §2.2 and §3.1; histogram aggregation as in LightGBM, Ke et al., NeurIPS 2017) never looks
at a row when it chooses a split: it looks at, per tree node and feature, the sums of the rows' gradients g
and hessians h in each bin. Sums of per-site histograms are the pooled histograms, so a server that adds
them chooses exactly the split a pooled learner would (the idea of SecureBoost, Cheng et al., IEEE
Intelligent Systems 2021, and of NVIDIA FLARE's histogram-based federated XGBoost). This module holds the
pieces both sides share, in the order a run uses them:

1. **Global bins.** Every site counts its rows of each feature on a uniform grid of ``N_CELLS`` cells
   between the federated minimum and maximum (:func:`grid_counts`); the server adds the counts, splits the
   cells where rows crowd into finer cells that every site counts again (:func:`cell_counts`, up to
   ``REFINE_PASSES`` times), and cuts each feature into at most ``max_bin`` bins of about equal total count,
   at cell boundaries (:func:`global_thresholds`): a quantile sketch of the pooled column built from
   mergeable histograms (Ben-Haim & Tom-Tov, "A Streaming Parallel Decision Tree Algorithm", JMLR 2010).
   When a feature has at most ``max_bin`` occupied cells, every occupied cell gets its own bin (as XGBoost
   gives every distinct value its own bin when there are few). A row's bin is
   ``searchsorted(thresholds, x, side="right")``, so ``bin <= t`` exactly when ``x < thresholds[t]``:
   XGBoost's own split rule, which makes the exported trees route every value as the learner did.
2. **Gradients** of the objective at the current margins (:func:`gradients`): ``binary:logistic``,
   ``reg:squarederror`` and ``multi:softprob`` (one tree per class and round, as XGBoost does), with
   XGBoost's hessians (``p(1 − p)``, ``1``, ``2p(1 − p)``).
3. **Histograms** per (tree, node, feature, bin) of g and h in fixed point (:func:`level_histograms`;
   below the root only one child per split is needed, see :class:`LevelGrower`):
   integers ``round(v · 2^scale_bits)`` per row (``TreeParams.scale_bits``, a parameter of the algorithm that
   the federation and the pooled learner share), summed in int64. Integer sums do not depend on the
   order of addition, so a federated sum is bit-for-bit the pooled sum; they are also what secure
   summation (``shared.secure_sum``) masks modulo 2^64.
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

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, softmax

N_CELLS = 8192
"""Grid cells per feature for the bin-edge histograms (one message per run, ``N_CELLS`` counts per feature):
fine enough that distinct values of a small table rarely share a cell (120 normal values: 1 pair in 120)."""

MAX_BIN = 256
"""XGBoost's default ``max_bin``."""

REFINE_PASSES = 2
"""Refinement passes after the grid counts (one message each): 8192 · 64 · 64 = 2^25 cells of the range, finer
than float32's 24-bit significand, so two passes separate any two distinct float32 values in the upper half of
the range (and almost all others)."""

REFINE_SPLIT = 64
"""Sub-cells a crowded cell is split into in one refinement pass."""

MAX_REFINED_CELLS = 128
"""Cells split per feature and pass: at most 128 · 63 new boundaries, the size of the first grid."""

FIXED_POINT_BITS = 32
"""The finest fixed-point scale: entries ``round(v · 2^32)``, resolution 2.3e-10 per row; int64 holds sums
below 2^31. Counts released under DP use it; gradient and hessian histograms use ``TreeParams.scale_bits``."""

SCALE_BITS = 12
"""Default ``TreeParams.scale_bits``: the fixed-point scale of gradient/hessian histograms. 2^12 (resolution
2.4e-4 per row) grew trees as accurate as 2^32's within the paired-bootstrap noise on the simulator and the
liposome folds, at 290 kB per tree instead of 476 (BENCHMARKS.md, benchmarks/federated_hist_scale.py)."""

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
    """Every feature's bin thresholds from the summed grid counts (features, n_cells), without refinement."""
    return [feature_thresholds(counts[f], cell_bounds(lo[f], hi[f], n_cells), max_bin) for f in range(len(counts))]


@dataclass(frozen=True)
class Cells:
    """One feature's partition of the line into cells, and the (summed) number of rows in each.

    Cell ``i`` is ``[bounds[i − 1], bounds[i])`` (the first and last cells are open towards ∓∞, and the
    federated minimum and maximum ``lo`` / ``hi`` bound them in practice), so a value's cell is
    ``searchsorted(bounds, x, side="right")``, the rule of :func:`bin_rows`.
    """

    bounds: np.ndarray  # float32, increasing, unique: the inner boundaries
    counts: np.ndarray  # float64, len(bounds) + 1


def compact(bounds: np.ndarray, counts: np.ndarray) -> Cells:
    """The same partition with every run of empty cells merged into one (drops boundaries between two empty
    cells). A boundary next to an occupied cell stays, so :func:`feature_thresholds` cuts exactly where it
    would on the uncompacted cells, and later messages carry about two boundaries per occupied cell."""
    counts = np.asarray(counts, dtype=np.float64)[:len(bounds) + 1]  # a grid may have lost float32-equal bounds
    empty = counts < 0.5
    keep = ~(empty[:-1] & empty[1:])
    kept_cells = np.concatenate([[True], keep])  # cell i + 1 starts a new cell iff boundary i is kept
    merged = np.add.reduceat(counts, np.flatnonzero(kept_cells)) if len(counts) else counts
    return Cells(np.asarray(bounds, dtype=np.float32)[keep], merged)


def crowded(cells: Cells, max_bin: int = MAX_BIN, limit: int = MAX_REFINED_CELLS) -> np.ndarray:
    """The cells worth splitting (at most ``limit``, most crowded first, then lowest index).

    A cell is worth splitting when it holds two rows or more (count ≥ 1.5, so DP-noised counts work) and a
    bin edge could fall inside it: either the feature has at most ``max_bin`` occupied cells (then every
    distinct value may get its own bin, as XGBoost gives it) or the cell holds more than ``total / max_bin``
    rows (a quantile cut of :func:`feature_thresholds` would land inside it).
    """
    counts = cells.counts
    few_values = np.count_nonzero(counts >= 0.5) <= max_bin
    worth = (counts >= 1.5) & (few_values | (counts > counts.sum() / max_bin))
    candidates = np.flatnonzero(worth)
    order = np.argsort(-counts[candidates], kind="stable")
    return np.sort(candidates[order[:limit]])


def refined_bounds(cells: Cells, lo: float, hi: float, max_bin: int = MAX_BIN,
                   split: int = REFINE_SPLIT) -> np.ndarray:
    """The partition's boundaries plus ``split − 1`` equally spaced ones inside every :func:`crowded` cell.

    The outer cells are split within ``[lo, hi]``. Boundaries that float32 cannot place strictly inside a
    cell are dropped, so a cell of equal values stops being split once it is as narrow as float32 allows.
    """
    edges = np.concatenate([[lo], cells.bounds.astype(np.float64), [hi]])
    new = [cells.bounds]
    for cell in crowded(cells, max_bin):
        a, b = edges[cell], edges[cell + 1]
        inner = (a + (b - a) * np.arange(1, split) / split).astype(np.float32)
        new.append(inner[(inner > a) & (inner < b)])
    return np.unique(np.concatenate(new).astype(np.float32))


def cell_counts(x: np.ndarray, bounds: list[np.ndarray]) -> list[np.ndarray]:
    """Per feature, how many rows of ``x`` fall in each cell of its partition (int64, len(bounds[f]) + 1)."""
    x = np.asarray(x, dtype=np.float32)
    return [np.bincount(np.searchsorted(b, x[:, f], side="right"), minlength=len(b) + 1).astype(np.int64)
            for f, b in enumerate(bounds)]


def global_cells(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 count: Callable[[list[np.ndarray]], list[np.ndarray]], max_bin: int = MAX_BIN,
                 passes: int = REFINE_PASSES) -> list[Cells]:
    """Every feature's final cells: the summed grid counts, refined where rows crowd into a cell.

    A federated quantile summary in the spirit of the mergeable histogram sketches of Ben-Haim & Tom-Tov
    (JMLR 2010) and of XGBoost's weighted quantile sketch (Chen & Guestrin, KDD 2016, §3.3), exact to merge
    because every site counts on one partition: the server compacts the grid (:func:`compact`), splits the
    crowded cells into ``REFINE_SPLIT`` sub-cells (:func:`refined_bounds`), and ``count(bounds)`` returns the
    counts of all rows on the new partition (a federation sums the sites' :func:`cell_counts`; the pooled
    learner counts its own rows); up to ``passes`` times, stopping early when nothing is crowded.
    """
    cells = [compact(cell_bounds(lo[f], hi[f], grid.shape[1]), grid[f]) for f in range(len(grid))]
    for _ in range(passes):
        bounds = [refined_bounds(c, lo[f], hi[f], max_bin) for f, c in enumerate(cells)]
        if all(len(b) == len(c.bounds) for b, c in zip(bounds, cells, strict=True)):
            break
        cells = [compact(b, n) for b, n in zip(bounds, count(bounds), strict=True)]
    return cells


def global_thresholds(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                      count: Callable[[list[np.ndarray]], list[np.ndarray]], max_bin: int = MAX_BIN,
                      passes: int = REFINE_PASSES) -> list[np.ndarray]:
    """Every feature's bin thresholds, cut by :func:`feature_thresholds` from its :func:`global_cells`.

    Error bound (the sketch's ε·n): an edge targets the rank ``k · n / max_bin`` and ends the final cell in
    which the cumulative count first reaches it, so the number of rows below the edge is at least the target
    and less than the target plus that cell's count: every quantile is off by less than the largest count
    of a final cell. With at most ``max_bin`` distinct values, refined to float32 resolution, every distinct
    value gets its own bin (XGBoost's cuts when a feature has few values).
    """
    return [feature_thresholds(c.counts, c.bounds, max_bin) for c in global_cells(grid, lo, hi, count, max_bin,
                                                                                   passes)]


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


def to_fixed(values: np.ndarray, scale_bits: int = FIXED_POINT_BITS) -> np.ndarray:
    """Values as int64 fixed-point integers ``round(v · 2^scale_bits)``."""
    return np.rint(np.asarray(values, dtype=np.float64) * 2.0 ** scale_bits).astype(np.int64)


def from_fixed(values: np.ndarray, scale_bits: int = FIXED_POINT_BITS) -> np.ndarray:
    """Fixed-point integers (of scale ``2^scale_bits``) back to float64."""
    return np.asarray(values, dtype=np.int64).astype(np.float64) / 2.0 ** scale_bits


def level_histograms(bins: np.ndarray, positions: np.ndarray, frontier: list[tuple[int, int]], g: np.ndarray,
                     h: np.ndarray, width: int, scale_bits: int) -> np.ndarray:
    """Fixed-point gradient and hessian histograms of the frontier nodes: int64 (nodes, features, width, 2).

    ``positions[k]`` is each row's node in tree ``k``; ``frontier`` lists (tree, node) pairs; tree ``k`` sums
    output ``k`` of ``g`` and ``h``, each row's value as ``round(v · 2^scale_bits)``. A site calls this on its
    rows; the pooled learner on all rows.
    """
    n_features = bins.shape[1]
    out = np.zeros((len(frontier), n_features, width, 2), dtype=np.int64)
    g_fixed, h_fixed = to_fixed(g, scale_bits), to_fixed(h, scale_bits)
    for i, (tree, node) in enumerate(frontier):
        rows = np.flatnonzero(positions[tree] == node)
        for f in range(n_features):
            np.add.at(out[i, f, :, 0], bins[rows, f], g_fixed[rows, tree])
            np.add.at(out[i, f, :, 1], bins[rows, f], h_fixed[rows, tree])
    return out


def feature_widths(thresholds: list[np.ndarray]) -> np.ndarray:
    """Bins of each feature (int64)."""
    return np.array([len(t) + 1 for t in thresholds], dtype=np.int64)


def pack_histograms(histograms: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Histograms (nodes, features, width, 2) without the padding bins: (nodes, Σ widths, 2).

    Every feature's histogram is as wide as the widest; a 0/1 column has 2 real bins of ``width``, so what
    a site sends is each feature's own bins only (the padding is zero, and would only carry DP noise)."""
    return np.concatenate([histograms[:, f, :w] for f, w in enumerate(widths)], axis=1) if len(widths) \
        else np.zeros((len(histograms), 0, 2), dtype=np.int64)


def unpack_histograms(packed: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_histograms`: zero-padded to (nodes, features, max width, 2)."""
    out = np.zeros((len(packed), len(widths), int(max(widths, default=1)), 2), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(widths)])
    for f, w in enumerate(widths):
        out[:, f, :w] = packed[:, starts[f]:starts[f] + w]
    return out


# ---------------------------------------------------------------------------------------------------------
# 4. Trees and their growth


HESSIAN_BOUNDS = {"binary:logistic": 0.25, "multi:softprob": 0.5, "reg:squarederror": 1.0}
"""Largest hessian one row can have: p(1 − p) ≤ 1/4, 2p(1 − p) ≤ 1/2, 1 (the per-row bound of a DP release
of hessian histograms)."""


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
    scale_bits : int, default SCALE_BITS
        Fixed-point scale of the histograms: every row's gradient and hessian is summed as
        ``round(v · 2^scale_bits)`` (not XGBoost's: it sums floats). Part of the algorithm: the federation and
        the pooled learner with the same ``scale_bits`` grow the same trees bit for bit; a coarser scale makes
        every summed entry (32 − scale_bits) bits narrower on the wire.
    """

    learning_rate: float = 0.1
    max_depth: int = 4
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        if not 1 <= int(self.scale_bits) <= FIXED_POINT_BITS:
            raise ValueError(f"TreeParams: scale_bits must be in 1 .. {FIXED_POINT_BITS}, got {self.scale_bits}")


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


def node_totals(histogram: np.ndarray, scale_bits: int) -> tuple[float, float]:
    """G and H of a node from its histogram (features, width, 2): the sum over feature 0's bins."""
    totals = from_fixed(histogram[0].sum(axis=0), scale_bits)
    return float(totals[0]), float(totals[1])


def leaf_weight(gradient: float, hessian: float, params: TreeParams) -> float:
    """XGBoost's ``CalcWeight``: −G/(H + λ), or 0 when H is below ``min_child_weight`` or not positive."""
    if hessian < params.min_child_weight or hessian <= 0.0:
        return 0.0
    return -gradient / (hessian + params.reg_lambda)


def best_split(histogram: np.ndarray, params: TreeParams, widths: np.ndarray | None = None) -> Split:
    """The split of largest gain of a node from its fixed-point histogram (features, width, 2).

    With ``widths`` (each feature's own bins, :func:`feature_widths`), only a feature's own bin boundaries are
    candidates: a split after its last bin has no row on the right. With exact sums its right side is empty, so it
    never wins; with DP-noised histograms each feature's total carries its own noise, so G − G_left and H − H_left
    (totals read off feature 0) can look like a right child, and the split would point past the feature's
    thresholds."""
    stats = from_fixed(histogram, params.scale_bits)
    left = np.cumsum(stats, axis=1)[:, :-1, :]  # rows with bin <= t, for t = 0 .. width - 2
    g_total, h_total = node_totals(histogram, params.scale_bits)
    g_left, h_left = left[..., 0], left[..., 1]
    g_right, h_right = g_total - g_left, h_total - h_left
    lam = params.reg_lambda
    gain = g_left ** 2 / (h_left + lam) + g_right ** 2 / (h_right + lam) - g_total ** 2 / (h_total + lam)
    allowed = (h_left >= params.min_child_weight) & (h_right >= params.min_child_weight)
    if widths is not None:
        allowed &= np.arange(allowed.shape[1])[None, :] < np.asarray(widths)[:, None] - 1
    gain = np.where(allowed, gain, -np.inf)
    if gain.size == 0:
        return Split(LEAF, 0, 0.0)
    feature, split_bin = np.unravel_index(int(np.argmax(gain)), gain.shape)  # first maximum: lowest feature, bin
    best = float(gain[feature, split_bin])
    if not best > SPLIT_EPSILON:
        return Split(LEAF, 0, 0.0)
    return Split(int(feature), int(split_bin), best)


class LevelGrower:
    """Grows the trees of one boosting round level by level from (summed) histograms of the frontier nodes.

    Histogram subtraction (LightGBM, Ke et al., NeurIPS 2017, §2: "the histogram of a leaf can be obtained by
    the difference of its parent's and its neighbor's histograms"): below the roots, only one child of each
    pair of siblings is asked for (:attr:`requested`: the one with the smaller hessian sum, the left on a
    tie), and the grower derives the other as parent − child. In fixed-point integers the difference is the
    sibling's own histogram bit for bit, so the trees do not change and sites send half the histograms. The
    children of the deepest split level are leaves, whose G and H the grower reads off the parent's histogram
    (the bins left and right of the split), so that level is never asked for.

    Parameters
    ----------
    n_trees : int
        Trees grown together (one per output: 1, or the number of classes for softmax).
    thresholds : list of ndarray
        Every feature's bin thresholds (for the split values of the exported trees).
    params : TreeParams

    Use: while not ``done``: histograms of ``requested`` → :meth:`grow`. Then ``trees``.
    """

    def __init__(self, n_trees: int, thresholds: list[np.ndarray], params: TreeParams) -> None:
        self.thresholds = thresholds
        self.widths = feature_widths(thresholds)
        self.params = params
        self.trees = [Tree() for _ in range(n_trees)]
        self.frontier: list[tuple[int, int]] = [(k, 0) for k in range(n_trees)]
        self.depth = 0
        self.parent_histograms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def done(self) -> bool:
        return not self.frontier

    @property
    def last_level(self) -> bool:
        """At the deepest level the nodes become leaves."""
        return self.depth >= self.params.max_depth

    @property
    def requested(self) -> list[tuple[int, int]]:
        """The frontier nodes whose histograms :meth:`grow` needs: every root; below, one child per parent."""
        if self.depth == 0:
            return list(self.frontier)
        asked = []
        for (k, left), (_, right) in zip(self.frontier[0::2], self.frontier[1::2], strict=True):
            hessian = self.trees[k].hessian
            asked.append((k, left if hessian[left] <= hessian[right] else right))
        return asked

    def frontier_histograms(self, histograms: np.ndarray) -> list[np.ndarray]:
        """Histograms of every frontier node from those of :attr:`requested`: the others by subtraction."""
        requested = self.requested
        if len(histograms) != len(requested):
            raise ValueError(f"LevelGrower.grow: expected histograms for {len(requested)} requested nodes, "
                             f"got {len(histograms)}")
        given = dict(zip(requested, histograms, strict=True))
        full = []
        for k, node in self.frontier:
            if (k, node) in given:
                full.append(given[(k, node)])
                continue
            tree = self.trees[k]
            parent = tree.parent[node]
            sibling = tree.left[parent] if tree.right[parent] == node else tree.right[parent]
            full.append(self.parent_histograms[(k, parent)] - given[(k, sibling)])
        return full

    def grow(self, histograms: np.ndarray) -> None:
        """Set the frontier nodes from the histograms of :attr:`requested` (features, width, 2 each)."""
        next_frontier, parents = [], {}
        for (k, node), histogram in zip(self.frontier, self.frontier_histograms(histograms), strict=True):
            tree = self.trees[k]
            self.set_node(tree, node, *node_totals(histogram, self.params.scale_bits))
            split = Split(LEAF, 0, 0.0) if self.last_level else best_split(histogram, self.params, self.widths)
            if split.feature == LEAF:
                continue
            tree.feature[node], tree.split_bin[node], tree.gain[node] = split.feature, split.split_bin, split.gain
            tree.threshold[node] = float(self.thresholds[split.feature][split.split_bin])
            children = tree.add_children(node)
            for child, totals in zip(children, children_totals(histogram, split, self.params.scale_bits),
                                     strict=True):
                self.set_node(tree, child, *totals)
            parents[(k, node)] = histogram
            next_frontier += [(k, child) for child in children]
        self.frontier, self.parent_histograms = next_frontier, parents
        self.depth += 1
        if self.last_level:  # the children just made are leaves: their totals came from the parents
            self.frontier, self.parent_histograms = [], {}
        if self.done:
            for tree in self.trees:
                prune(tree, self.params.gamma)

    def set_node(self, tree: Tree, node: int, gradient: float, hessian: float) -> None:
        """A node's hessian sum, weight and (shrunk) leaf value from its G and H."""
        tree.hessian[node] = hessian
        tree.weight[node] = leaf_weight(gradient, hessian, self.params)
        tree.leaf_value[node] = self.params.learning_rate * tree.weight[node]


def children_totals(histogram: np.ndarray, split: Split, scale_bits: int
                    ) -> tuple[tuple[float, float], tuple[float, float]]:
    """(G, H) of the left and right child of a split, summed in fixed point from the parent's histogram."""
    column = histogram[split.feature]
    left = column[:split.split_bin + 1].sum(axis=0)
    right = column.sum(axis=0) - left
    (g_left, h_left), (g_right, h_right) = from_fixed(left, scale_bits), from_fixed(right, scale_bits)
    return (float(g_left), float(h_left)), (float(g_right), float(h_right))


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
