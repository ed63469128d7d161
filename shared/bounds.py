"""What is public about a task's columns: declared ranges, categories, classes, whether a value may be missing.

A differentially private release needs, for every number it sums, a bound on what one row can add; a DP
site may name a category only if the name is public. Both come from the data contract, never from the data:
``shared.schema`` for the built-in task, ``task.toml`` ``[ranges]`` for a generic one (which declares no
categories, so its categorical columns cannot be released under DP).

:func:`value_grid` is the fixed grid a DP site counts a numeric column on (a histogram's noise does not
grow with the range, where a sum's does): linear, or log-spaced for a positive range spanning two orders of
magnitude or more (release time 0.01–5000 h, particle size 1–1000 nm), where a linear grid would put every
real value in its first bin.
"""

from __future__ import annotations

import numpy as np

from shared.schema import EPISODE_COLUMNS, columns_by_name
from shared.task import NANOPARTICLE_TASK, TaskSpec

GRID_BINS = 64
"""Bins of a column's DP histogram: ~1.6 % of a linear range, or a factor ≤ 1.23 per bin on a log range
spanning 0.01–5000: finer than the noise lets the sparse bins be read anyway."""
LOG_GRID_RATIO = 100.0
"""A positive range with high / low at least this is binned on a log scale."""
BINARY_CLASSES = ("0", "1")

_SCHEMA = columns_by_name(EPISODE_COLUMNS)


def _builtin(task: TaskSpec, column: str) -> bool:
    return task == NANOPARTICLE_TASK and column in _SCHEMA


def declared_range(task: TaskSpec, column: str) -> tuple[float, float] | None:
    """The column's declared inclusive range (0–1 for a 0/1 column), or None if none is declared."""
    if _builtin(task, column):
        spec = _SCHEMA[column]
        if spec.dtype == "bool":
            return 0.0, 1.0
        if spec.is_numeric and spec.low is not None and spec.high is not None:
            return float(spec.low), float(spec.high)
        return None
    if column in task.ranges:
        low, high = task.ranges[column]
        return float(low), float(high)
    if any(o.name == column and o.kind == "binary" for o in task.outcomes):
        return 0.0, 1.0
    return None


def declared_categories(task: TaskSpec, column: str) -> tuple[str, ...] | None:
    """The allowed values of a categorical column, or None if the contract does not list them."""
    if _builtin(task, column) and _SCHEMA[column].dtype == "category":
        return tuple(_SCHEMA[column].categories)
    return None


def declared_classes(task: TaskSpec, outcome: str) -> tuple[str, ...] | None:
    """The class labels of a classification outcome as text (``"0"``, ``"1"`` for a binary one), or None."""
    kinds = {o.name: o.kind for o in task.outcomes}
    if kinds.get(outcome) == "binary":
        return BINARY_CLASSES
    return declared_categories(task, outcome)


def may_be_missing(task: TaskSpec, column: str) -> bool | None:
    """Whether the contract allows an empty cell in the column; None if it does not say."""
    return bool(_SCHEMA[column].nullable) if _builtin(task, column) else None


def value_grid(low: float, high: float, bins: int = GRID_BINS) -> np.ndarray:
    """``bins + 1`` increasing edges over ``[low, high]`` (log-spaced for a wide positive range)."""
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ValueError(f"a grid needs a finite range with high > low; got [{low!r}, {high!r}]")
    if low > 0 and high / low >= LOG_GRID_RATIO:
        return np.geomspace(low, high, bins + 1)
    return np.linspace(low, high, bins + 1)


def grid_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of the non-missing ``values`` (clipped to the grid) per bin; one value is in one bin."""
    present = values[~np.isnan(values)]
    clipped = np.clip(present, edges[0], edges[-1])
    index = np.clip(np.searchsorted(edges, clipped, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(index, minlength=len(edges) - 1).astype(np.float64)


def grid_centres(edges: np.ndarray) -> np.ndarray:
    """A representative value per bin: the geometric centre on a log grid, else the midpoint."""
    if edges[0] > 0 and edges[-1] / edges[0] >= LOG_GRID_RATIO:
        return np.sqrt(edges[:-1] * edges[1:])
    return (edges[:-1] + edges[1:]) / 2
