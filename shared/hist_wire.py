"""How wide every summed entry of federated histogram boosting travels, from bounds the server can prove.

``shared.wire_ints`` sends an entry in w bits when the server knows a range of fewer than 2^w values that
the SUM over sites must lie in. Here are those ranges, for a run whose sites all reported their training row
counts (their total is ``n_rows``; without it — a DP site, whose noised releases have no such bound — the
phase keeps the 64-bit fixed-point encoding):

- Counts (grid and refined cells): every training row lies in exactly one cell of each feature, so a summed
  count is in [0, n_rows].
- Gradients, fixed point ``rint(g · 2^FIXED_POINT_BITS)``: for logistic and softmax losses ``g = p − y`` with
  p ∈ [0, 1] and y ∈ {0, 1}, so |g| ≤ 1 and a node's summed bin is in [−n_rows · 2^32, n_rows · 2^32].
  Squared error has no such bound (the margin and the label are not bounded by the contract), so its
  gradients stay 64-bit.
- Hessians: 0 ≤ h ≤ ``HESSIAN_BOUNDS[objective]`` per row, so a root's bin is in [0, n_rows · bound · 2^32].
  Below the root a requested node is a child of a node whose summed histogram the server holds, and its
  rows are some of its parent's: every row's fixed-point hessian being >= 0, the child's bin b of feature f
  lies in [0, H_parent(f, b)], so feature f of that node needs only the bits of max_b H_parent(f, b).

The widths go to the sites with the request (one byte per requested node, feature and channel), so a site
encodes exactly what the server will decode.
"""

from __future__ import annotations

import numpy as np

from shared.hist_boosting import FIXED_POINT_BITS, HESSIAN_BOUNDS
from shared.wire_ints import signed_bits, unsigned_bits

GRADIENT_BOUNDS = {"binary:logistic": 1.0, "multi:softprob": 1.0}
"""Largest |gradient| of one row, where the loss bounds it (squared error does not)."""


def fixed_bound(per_row: float, n_rows: int) -> int:
    """Largest |sum| of ``n_rows`` fixed-point values each of magnitude at most ``per_row``."""
    return int(n_rows) * int(np.ceil(per_row * 2.0 ** FIXED_POINT_BITS))


def count_bits(n_rows: int) -> int:
    """Width of a summed count over ``n_rows`` rows."""
    return unsigned_bits(n_rows)


def level_widths(objective: str, n_rows: int, parents: list[np.ndarray | None], n_features: int) -> np.ndarray:
    """Widths (uint8, requested nodes × features × (gradient, hessian)) of one level request.

    ``parents[i]`` is the summed fixed-point histogram (features, width, 2) of requested node i's parent, or
    None for a root.
    """
    gradient = (signed_bits(fixed_bound(GRADIENT_BOUNDS[objective], n_rows)) if objective in GRADIENT_BOUNDS
                else 64)
    root_hessian = unsigned_bits(fixed_bound(HESSIAN_BOUNDS[objective], n_rows))
    widths = np.zeros((len(parents), n_features, 2), dtype=np.uint8)
    widths[..., 0] = gradient
    for i, parent in enumerate(parents):
        if parent is None:
            widths[i, :, 1] = root_hessian
        else:
            largest = np.asarray(parent[..., 1], dtype=np.int64).max(axis=1)
            widths[i, :, 1] = [min(root_hessian, unsigned_bits(int(v))) for v in largest]
    return widths


def entry_bits(widths: np.ndarray, feature_widths: np.ndarray) -> np.ndarray:
    """Every entry's width (int64, nodes × Σ feature bins × 2) of packed histograms
    (``shared.hist_boosting.pack_histograms``), from the per-feature widths of :func:`level_widths`."""
    feature_of_bin = np.repeat(np.arange(len(feature_widths)), feature_widths)
    return np.asarray(widths, dtype=np.int64)[:, feature_of_bin, :]
