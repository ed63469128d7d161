"""How wide every summed entry of federated histogram boosting travels, from bounds the server can prove.

``shared.wire_ints`` sends an entry in w bits when the server knows a range of fewer than 2^w values that
the SUM over sites must lie in. Here are those ranges, for a run whose sites all reported their training row
counts (their total is ``n_rows``; without it — a DP site, whose noised releases have no such bound — the
phase keeps the 64-bit fixed-point encoding):

- Counts (grid and refined cells): every training row lies in exactly one cell of each feature, so a summed
  count is in [0, n_rows].
- Gradients, fixed point ``rint(g · 2^s)`` (s = ``TreeParams.scale_bits``, the run's scale: every bound below
  is in units of 2^−s), with |g| ≤ B per row: for logistic and softmax
  losses ``g = p − y`` with p ∈ [0, 1] and y ∈ {0, 1}, so B = 1; for squared error ``g = m − y``, so B is the
  margin bound (:func:`margin_bound`, from the leaf values the server holds) plus the largest |label| the
  target's declared range allows once standardised (no declared range: no bound, 64 bits). A site checks its
  rows against the B the request states and refuses when one exceeds it. A root's summed bin is then in
  [−n_rows · ⌈B · 2^s⌉, n_rows · ⌈B · 2^s⌉] (|rint(x)| ≤ ⌈|x|⌉); a child's bin holds at most its parent's
  rows of that bin, which the parent's summed hessian bounds when every row's fixed-point hessian is at least
  ``floor`` (exactly 2^s for squared error; :func:`hessian_floor` for the others): count ≤ H_parent(f, b) // floor.
- Hessians: 0 ≤ h ≤ ``HESSIAN_BOUNDS[objective]`` per row, so a root's bin is in [0, n_rows · ⌈bound · 2^s⌉].
  Below the root a requested node is a child of a node whose summed histogram the server holds, and its
  rows are some of its parent's: every row's fixed-point hessian being >= 0, the child's bin b of feature f
  lies in [0, H_parent(f, b)], so feature f of that node needs only the bits of max_b H_parent(f, b).

Some entries need no bits at all (:func:`sent_bins`): a child's bins of its parent's split feature are known
(its parent's, on its side), and a bin where its parent's summed hessian is 0 is empty when every row's
fixed-point hessian is at least 1 — which the server proves from the leaf values it holds
(:func:`rows_have_hessian`), else it asks for those bins too. At a coarse scale a logistic or softmax row of
large |margin| may round to a hessian of 0: the floor is then 0, the proof is not made, and the bins are asked
for (and a child's gradient widths fall back to n_rows rows); a site whose unsent bin holds a nonzero entry
refuses (``client.hist_handlers.check_unsent``), so a wrong proof stops the head rather than change a sum.

The widths go to the sites with the request (one byte per requested node, feature and channel), and which
bins to send (one bit per requested node and bin), so a site encodes exactly what the server will decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from shared.hist_boosting import HESSIAN_BOUNDS, LevelGrower, Tree
from shared.wire_ints import signed_bits, unsigned_bits

GRADIENT_BOUNDS = {"binary:logistic": 1.0, "multi:softprob": 1.0}
"""Largest |gradient| of one row, where the loss bounds it (squared error does not)."""


def fixed_bound(per_row: float, n_rows: int, scale_bits: int) -> int:
    """Largest |sum| of ``n_rows`` values ``rint(v · 2^scale_bits)`` each with |v| at most ``per_row``."""
    return int(n_rows) * int(np.ceil(per_row * 2.0 ** scale_bits))


def count_bits(n_rows: int) -> int:
    """Width of a summed count over ``n_rows`` rows."""
    return unsigned_bits(n_rows)


def level_widths(objective: str, n_rows: int, parents: list[Parent | None], n_features: int,
                 gradient_bound: float | None, floor: int, scale_bits: int) -> np.ndarray:
    """Widths (uint8, requested nodes × features × (gradient, hessian)) of one level request.

    ``parents[i]`` is what the server knows of requested node i's parent (:func:`parents_of`), None for a root;
    ``gradient_bound`` the largest |gradient| of a row (None: unbounded, 64 bits); ``floor`` a lower bound of
    every row's fixed-point hessian (:func:`hessian_floor`, 0 when none is known); ``scale_bits`` the run's
    fixed-point scale (``TreeParams.scale_bits``).
    """
    root_hessian = unsigned_bits(fixed_bound(HESSIAN_BOUNDS[objective], n_rows, scale_bits))

    def gradient_bits(rows: int) -> int:
        return 64 if gradient_bound is None else signed_bits(fixed_bound(gradient_bound, rows, scale_bits))

    widths = np.zeros((len(parents), n_features, 2), dtype=np.uint8)
    for i, parent in enumerate(parents):
        if parent is None:
            widths[i, :, 0], widths[i, :, 1] = gradient_bits(n_rows), root_hessian
            continue
        largest = np.asarray(parent.histogram[..., 1], dtype=np.int64).max(axis=1)
        for f, hessian in enumerate(largest.tolist()):
            rows = min(n_rows, hessian // floor) if floor >= 1 else n_rows
            widths[i, f] = gradient_bits(rows), min(root_hessian, unsigned_bits(hessian))
    return widths


def entry_bits(widths: np.ndarray, feature_widths: np.ndarray) -> np.ndarray:
    """Every entry's width (int64, nodes × Σ feature bins × 2) of packed histograms
    (``shared.hist_boosting.pack_histograms``), from the per-feature widths of :func:`level_widths`."""
    feature_of_bin = np.repeat(np.arange(len(feature_widths)), feature_widths)
    return np.asarray(widths, dtype=np.int64)[:, feature_of_bin, :]


# ---------------------------------------------------------------------------------------------------------
# Bins a requested node cannot have rows in, which no site sends


@dataclass(frozen=True)
class Parent:
    """What the server knows of a requested child's parent: its summed histogram (features, width, 2), its
    split, and on which side the child is."""

    histogram: np.ndarray
    feature: int
    split_bin: int
    left: bool


def margin_bound(rounds: list[list[Tree]], n_outputs: int, base_margin: float) -> float:
    """Largest |margin| any row can have after ``rounds``: the base margin plus, per round, the largest |leaf
    value| of the output's tree (a row reaches one leaf per tree)."""
    per_output = np.full(n_outputs, abs(base_margin))
    for trees in rounds:
        for k, tree in enumerate(trees):
            per_output[k] += float(np.max(np.abs(tree.leaf_value)))
    return float(per_output.max())


def smallest_hessian(objective: str, margin: float, n_outputs: int) -> float:
    """A lower bound of every row's hessian when every |margin| is at most ``margin``.

    Squared error: h = 1. Logistic: h = p(1 − p) with p = σ(m), smallest at |m| = ``margin``. Softmax over K
    classes with every |m_k| ≤ M: each p_k and 1 − p_k is at least a = 1 / (1 + (K − 1) e^{2M}), so
    h = 2 p (1 − p) ≥ 2 a (1 − a).
    """
    if objective == "reg:squarederror":
        return 1.0
    if not np.isfinite(margin):
        return 0.0
    if objective == "binary:logistic":
        p = float(expit(-margin))
        return p * (1.0 - p)
    a = 1.0 / (1.0 + (n_outputs - 1) * np.exp(min(2.0 * margin, 700.0)))
    return float(2.0 * a * (1.0 - a))


def hessian_floor(objective: str, margin: float, n_outputs: int, scale_bits: int) -> int:
    """A lower bound of every row's fixed-point hessian ``rint(h · 2^scale_bits)``: exactly 2^scale_bits for
    squared error; else half of :func:`smallest_hessian` in fixed point, rounded down (the half absorbs
    floating-point error in the sites' computation of p; with x ≥ 2f ≥ 2, rint(x) ≥ x − ½ ≥ f). 0 when the
    scale is too coarse for the bound: a row's hessian may then round to 0."""
    if objective == "reg:squarederror":
        return 2 ** int(scale_bits)
    return int(np.floor(smallest_hessian(objective, margin, n_outputs) * 2.0 ** (int(scale_bits) - 1)))


def rows_have_hessian(objective: str, margin: float, n_outputs: int, scale_bits: int) -> bool:
    """Whether every row's fixed-point hessian is at least 1 (:func:`hessian_floor`): then a bin whose summed
    hessian is 0 holds no row, and a child's bin no row either."""
    return hessian_floor(objective, margin, n_outputs, scale_bits) >= 1


def gradient_bound(objective: str, margin: float, label_bound: float | None) -> float | None:
    """Largest |gradient| of a row: 1 for logistic and softmax; for squared error the margin bound plus the
    largest |standardised label| (``label_bound``; None when the target has no declared range)."""
    if objective in GRADIENT_BOUNDS:
        return GRADIENT_BOUNDS[objective]
    if label_bound is None or not np.isfinite(margin):
        return None
    return float(margin + label_bound)


def sent_bins(parents: list[Parent | None], feature_widths: np.ndarray, rows_visible: bool) -> np.ndarray:
    """Which packed bins (bool, requested nodes × Σ feature bins) the sites send.

    A root sends every bin. A child sends none of its parent's split feature (its bins there are its
    parent's on its side of the split, 0 on the other: :func:`fill_known`) and, when ``rows_visible``
    (:func:`rows_have_hessian`), none where its parent's summed hessian is 0 (no row of the parent there, so
    none of the child).
    """
    starts = np.concatenate([[0], np.cumsum(feature_widths)])
    sent = np.ones((len(parents), int(starts[-1])), dtype=bool)
    for i, parent in enumerate(parents):
        if parent is None:
            continue
        if rows_visible:
            sent[i] = np.concatenate([parent.histogram[f, :w, 1] != 0 for f, w in enumerate(feature_widths)])
        sent[i, starts[parent.feature]:starts[parent.feature + 1]] = False
    return sent


def fill_known(histograms: np.ndarray, parents: list[Parent | None]) -> None:
    """Put each child's histogram of its parent's split feature in place (histograms: nodes × features ×
    width × 2, with 0 there as received)."""
    for i, parent in enumerate(parents):
        if parent is None:
            continue
        column = parent.histogram[parent.feature].copy()
        side = np.arange(len(column)) <= parent.split_bin
        column[~side if parent.left else side] = 0
        histograms[i, parent.feature] = column


def parents_of(grower: LevelGrower) -> list[Parent | None]:
    """The :class:`Parent` of every requested node of ``grower`` (None for roots)."""
    if grower.depth == 0:
        return [None] * len(grower.requested)
    out: list[Parent | None] = []
    for k, node in grower.requested:
        tree = grower.trees[k]
        parent = tree.parent[node]
        out.append(Parent(grower.parent_histograms[(k, parent)], tree.feature[parent], tree.split_bin[parent],
                          tree.left[parent] == node))
    return out
