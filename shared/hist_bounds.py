"""Feasible ranges of histogram boosting's summed releases: a poisoned site's influence bounded by what is public.

The phase (``server.hist_phase``) sums two kinds of release over the sites (``client.hist_handlers``): row counts
per feature on a grid or a refined partition, and per requested node the fixed-point gradient and hessian
histograms of each feature's bins (``shared.hist_boosting``; units of 2^−s, s the run's ``scale_bits``). What
every honest contribution satisfies, with N the rows behind the sum (the training rows each site reported in
``query.hist_ranges``, itself capped by its site-check row count; the site-check count alone when a site said
none; none for a DP site):

- counts: every count ≥ 0; every training row lies in exactly one cell of each feature, so each feature's
  counts add to N (to at most N where only the site-check count is known), and without a known N at least
  every feature's counts add to the same total;
- hessian bins: ``0 ≤ H[f, b]`` (a row's hessian is ≥ 0, so its fixed-point one too); a node's rows lie in
  one bin of every feature, so every feature's bins add to the same node total, at most
  ``⌈h_max · 2^s⌉ · N`` (h_max = ``HESSIAN_BOUNDS``: p(1 − p) ≤ 1/4 for logistic, 1 for squared error);
- gradient bins: every row of a bin has ``|rint(g · 2^s)| ≤ ⌈B · 2^s⌉`` and ``rint(h · 2^s) ≥ floor``
  (``shared.hist_wire``: B = 1 for logistic and softmax, the margin bound plus the declared label bound for
  squared error, DP sites' squared-error gradients clipped; floor = 2^s for squared error, from the margin
  bound otherwise), so ``|G[f, b]| ≤ H[f, b] · ⌈B · 2^s⌉ / floor``; its bins add to the same node total over
  every feature too;
- a child's bins lie within its parent's: ``H_child[f, b] ≤ H_parent[f, b]`` (the sibling, parent − child,
  is a node's histogram too).

The check, the DP allowance (each DP site's stated ``noise-sd``, per entry times the block's per-row bound,
``client.dp.gaussian_release``) and the refusal (:class:`shared.sum_bounds.InfeasibleSum`, naming the release,
the entry and the bound, never a value) are ``shared.sum_bounds.check_bounds``; a DP site rounds each noised
entry to the fixed-point grid, half a unit per entry, which the limits allow for. ``server.hist_phase`` checks
each site's own release with ``secure-sum = off`` (the site is dropped, named, and the round regrown without it)
and the one masked sum otherwise (the heads stop, as when a site is lost).

What this cannot bound: a site's histograms anywhere inside these limits (a site may move its gradients within
``±B`` per row, or report fewer rows), a site claiming as training rows up to its whole declared table, and
under DP (no row counts) the totals, which only the noise-free consistency of features and of parent and
child bounds.
"""

from __future__ import annotations

import math

import numpy as np

from shared.hist_boosting import HESSIAN_BOUNDS
from shared.hist_wire import Parent
from shared.sum_bounds import Bound, Contributors, check_bounds

ROUNDING = 0.5
"""Most a DP site's fixed-point rounding of one noised entry moves it (units of the fixed-point scale)."""


def count_bounds(counts: list[np.ndarray], who: Contributors, exact: bool) -> list[Bound]:
    """The constraints of one count release (``counts``: one array per feature, its cells; units of rows).

    ``who.declared``: the rows behind the sum (None: unknown); ``exact``: ``who.declared`` is the training rows
    themselves (each feature's counts add to it), else only a cap."""
    dp = len(who.noise_sd)
    flat = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in counts])
    totals = np.array([float(np.sum(c)) for c in counts])
    cells = np.array([np.size(c) for c in counts], dtype=np.float64)
    rounding = dp * ROUNDING * 2.0 ** -31  # the 32-bit fixed point a DP site sends its noised counts in
    out = [Bound("cell counts", flat, -rounding, np.inf, 1.0, "every count ≥ 0")]
    if who.declared is not None:
        low = who.declared if exact else -np.inf
        text = ("each feature's counts adding to the sites' training rows (hist ranges)" if exact else
                "each feature's counts adding to ≤ the sum of the sites' declared row counts (site check)")
        out.append(Bound("cell counts", totals, low - rounding * cells, who.declared + rounding * cells,
                         np.sqrt(cells), text))
    elif len(counts) > 1:
        out.append(Bound("cell counts", totals - totals[0], -rounding * (cells + cells[0]),
                         rounding * (cells + cells[0]), np.sqrt(cells + cells[0]),
                         "every feature's counts adding to the same total (every row in one cell per feature)"))
    return out


def check_counts(phase: str, counts: list[np.ndarray], who: Contributors, exact: bool) -> None:
    """Raise :class:`InfeasibleSum` if the count release breaks :func:`count_bounds`; None if feasible."""
    check_bounds(phase, count_bounds(counts, who, exact), who)


def per_row_gradient(objective: str, bound: float | None, clip: float, who: Contributors) -> float | None:
    """Largest |gradient| of one row over the contributors: 1 for logistic and softmax; for squared error the
    request's bound (None: unbounded) at sites without DP, the clip at DP sites (their gradients are clipped)."""
    if objective != "reg:squarederror":
        return 1.0
    dp = len(who.noise_sd)
    if dp == who.sites:
        return clip if bound is None else min(bound, clip)
    if bound is None:
        return None
    return max(bound, clip) if dp else bound


def level_bounds(histograms: np.ndarray, widths: np.ndarray, objective: str, scale_bits: int,
                 gradient_bound: float | None, floor: int, clip: float, parents: list[Parent | None],
                 skip_split: bool, who: Contributors, rows: float | None, depth: int = 0) -> list[Bound]:
    """The constraints of one head's level release (module docstring).

    ``histograms``: (nodes, features, max width, 2) fixed-point (gradient, hessian), zero past each feature's
    ``widths``; ``gradient_bound``: the request's per-row bound (``shared.hist_wire.gradient_bound``);
    ``floor``: the fixed-point hessian floor of every row (``shared.hist_wire.hessian_floor``; 0: none);
    ``clip``: DP sites' squared-error gradient clip; ``parents``: each node's parent (None at a root);
    ``skip_split``: a child's parent-split feature was not sent (one site's own release: its bins there are
    the server's, from the parent), so it takes no part in the checks that add over bins; ``rows``: the rows
    behind the sum (None: unknown); ``depth``: the requested nodes' depth (a parent's histogram may be its
    parent's minus a sibling's, down from the root: up to ``depth`` releases' noise, which the parent-child
    allowance takes)."""
    hist = np.asarray(histograms, dtype=np.float64)
    nodes, features, width, _ = hist.shape
    unit = 2.0 ** int(scale_bits)
    h_max = HESSIAN_BOUNDS[objective]
    b_row = per_row_gradient(objective, gradient_bound, clip, who)
    g_noise = (clip if objective == "reg:squarederror" else 1.0) * unit  # a DP site's gradient block's bound
    h_noise = h_max * unit
    dp = len(who.noise_sd)
    padding = np.arange(width)[None, :] >= np.asarray(widths)[:, None]  # (features, width)
    real = np.broadcast_to(~padding, (nodes, features, width))
    g, h = hist[..., 0], hist[..., 1]
    out = [Bound("hessian bins", h[real], -dp * ROUNDING, np.inf, h_noise, "every bin's hessian sum ≥ 0"),
           Bound("padding bins", hist[np.broadcast_to(padding, (nodes, features, width))], 0.0, 0.0, 0.0,
                 "no entry past a feature's bins")]
    if b_row is not None and floor >= 1:
        ratio = math.ceil(b_row * unit) / floor
        slack = dp * ROUNDING * (1.0 + ratio)
        out.append(Bound("gradient bins", (np.abs(g) - ratio * h)[real], -np.inf, slack,
                         math.hypot(g_noise, ratio * h_noise),
                         "|gradient sum| ≤ hessian sum · ⌈B · 2^s⌉ / (every row's least fixed-point hessian), "
                         "B the rows' gradient bound"))
    used = np.ones((nodes, features), dtype=bool)
    if skip_split:
        for i, parent in enumerate(parents):
            if parent is not None:
                used[i, parent.feature] = False
    bins = np.asarray(widths, dtype=np.float64)
    totals = hist.sum(axis=2)  # (nodes, features, 2)
    for i in range(nodes):
        kept = np.flatnonzero(used[i])
        if len(kept) < 2:
            continue
        ref = kept[0]
        span = bins[kept] + bins[ref]
        for c, name, noise in ((0, "gradient", g_noise), (1, "hessian", h_noise)):
            out.append(Bound(f"{name} node totals", totals[i, kept, c] - totals[i, ref, c], -dp * ROUNDING * span,
                             dp * ROUNDING * span, noise * np.sqrt(span),
                             f"every feature's {name} bins adding to the node's same total (each row in one bin "
                             "per feature)"))
    if rows is not None:
        cap = math.ceil(h_max * unit) * rows
        out.append(Bound("hessian node totals", totals[..., 1][used], -np.inf,
                         cap + dp * ROUNDING * np.repeat(bins[None, :], nodes, axis=0)[used],
                         h_noise * np.sqrt(np.repeat(bins[None, :], nodes, axis=0)[used]),
                         "a node's hessian sum ≤ ⌈h_max · 2^s⌉ · the rows (h_max the loss's largest hessian: "
                         "1/4 logistic, 1/2 softmax, 1 squared error)"))
    children = [i for i, p in enumerate(parents) if p is not None]
    if children:
        parent_h = np.stack([np.asarray(parents[i].histogram[..., 1], dtype=np.float64) for i in children])
        child_h = h[children][:, :, :parent_h.shape[2]]
        mask = real[children][:, :, :parent_h.shape[2]]
        out.append(Bound("hessian bins", (child_h - parent_h)[mask], -np.inf, dp * ROUNDING * 2,
                         h_noise * np.sqrt(depth + 1.0), "a child's hessian bin ≤ its parent's (the sibling's is ≥ 0)"))
    return out


def check_level(phase: str, histograms: np.ndarray, widths: np.ndarray, objective: str, scale_bits: int,
                gradient_bound: float | None, floor: int, clip: float, parents: list[Parent | None],
                skip_split: bool, who: Contributors, rows: float | None, depth: int = 0) -> None:
    """Raise :class:`InfeasibleSum` if one head's level release breaks :func:`level_bounds`; None if feasible."""
    check_bounds(phase, level_bounds(histograms, widths, objective, scale_bits, gradient_bound, floor, clip,
                                     parents, skip_split, who, rows, depth), who)
