"""The statistics a site sends for the federated encoder: exact, or through the DP release.

Exact: :meth:`shared.encoding.SiteStatistics.from_frame` of the training split (counts, sums, centred sums
of squares, min, max, category and class counts, grid counts). Under DP (:func:`private_statistics`), one
Gaussian release (``client.dp``) of what one row can change by at most one each:

- the row count;
- each numeric column's and regression outcome's counts on its fixed grid over the declared range (one bin
  per column);
- category counts over each categorical column's declared values, class counts over each outcome's declared
  classes (one per column).

The L2 sensitivity is ``sqrt(1 + columns with a grid + categorical columns + class outcomes)``. Everything
else the server gets is read off these (post-processing costs no privacy): moments from the noised
histograms, min and max as the declared bounds. A column with no declared range or values cannot be released,
and the site refuses the phase naming it.
"""

from __future__ import annotations

import math

import numpy as np

from client.dp import Block, PhaseRelease, PrivacyRefused
from shared.bounds import declared_categories, declared_classes, declared_range, grid_centres
from shared.encoding import Moments, NumericSummary, SiteStatistics, statistics_grids
from shared.protocol.privacy import ReleaseFacts
from shared.task import TaskSpec


def histogram_moments(counts: np.ndarray, edges: np.ndarray) -> Moments:
    """Count, sum and M2 of a column read off its (noised) grid counts, negative counts taken as 0."""
    weights = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = float(weights.sum())
    if total <= 0:
        return Moments()
    centres = grid_centres(edges)
    mean = float(np.sum(weights * centres) / total)
    return Moments(int(round(total)), mean * round(total), float(np.sum(weights * np.square(centres - mean))))


def private_statistics(exact: SiteStatistics, task: TaskSpec, release: PhaseRelease,
                       index: int = 0) -> tuple[SiteStatistics, ReleaseFacts]:
    """The DP form of a site's statistics (module docstring); charges the site's ledger."""
    grids = statistics_grids(task)
    columns = list(task.numeric) + [o.name for o in task.outcomes if o.kind == "regression"]
    unbounded = [c for c in columns if c not in grids]
    categories = {c: declared_categories(task, c) for c in task.categorical}
    classes = {o.name: declared_classes(task, o.name) for o in task.outcomes if o.kind != "regression"}
    undeclared = [c for c, v in {**categories, **classes}.items() if v is None]
    if unbounded or undeclared:
        raise PrivacyRefused(
            "statistics need a declared range for every numeric column and declared values for every "
            f"categorical one; missing: {', '.join(unbounded + undeclared)} (declare them in task.toml)")
    blocks = {"n-rows": Block(np.array([float(exact.n_rows)]), 1.0, 1),
              "histograms": Block(np.stack([exact.histograms[c] for c in columns]), 1.0, len(columns))}
    if categories:
        blocks["categorical"] = Block(_counts(exact.categorical, categories), 1.0, len(categories))
    if classes:
        blocks["classification"] = Block(_counts(exact.classification, classes), 1.0, len(classes))
    noised, facts = release.release(blocks, index)
    histograms = dict(zip(columns, noised["histograms"], strict=True))
    moments = {c: histogram_moments(histograms[c], grids[c]) for c in columns}
    stats = SiteStatistics(
        n_rows=max(int(round(float(noised["n-rows"][0]))), 0),
        numeric={c: NumericSummary(moments[c], *declared_range(task, c)) for c in task.numeric},
        categorical=_uncounted(noised.get("categorical"), categories),
        regression={o.name: moments[o.name] for o in task.outcomes if o.kind == "regression"},
        classification=_uncounted(noised.get("classification"), classes),
        histograms=histograms, noise_var=facts.noise_sd ** 2)
    return stats, facts


def _counts(observed: dict[str, dict[str, int]], declared: dict[str, tuple[str, ...]]) -> np.ndarray:
    """Counts over the declared values of each column, concatenated (a value outside them is not counted)."""
    return np.array([observed[c].get(v, 0) for c, values in declared.items() for v in values], dtype=np.float64)


def _uncounted(noised: np.ndarray | None, declared: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
    """Noised concatenated counts back to {column: {value: count ≥ 0}}."""
    result, i = {}, 0
    for column, values in declared.items():
        result[column] = {v: max(int(round(float(noised[i + j]))), 0) for j, v in enumerate(values)}
        i += len(values)
    return result


def noised_rows(stats: SiteStatistics) -> float:
    """The row count a DP site reports as its weight in later phases (at least 1)."""
    return float(max(stats.n_rows, 1)) if math.isfinite(stats.n_rows) else 1.0
