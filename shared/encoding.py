"""Feature encoding that every site shares, learned from aggregates alone (the federated-statistics phase).

A model trained across sites only makes sense if every site turns its rows into the same numbers: the same
means and scales for numeric columns, the same one-hot columns in the same order for categories, the same
class indices for labels. Fitting a scaler per site would give each site its own coordinates. Pooling the
rows to fit one scaler is not allowed: no row leaves a site. So the first phase of a run is federated
statistics:

1. each site summarises its *training* rows in a ``SiteStatistics`` (counts, sums, centred sums of
   squares, min / max, category and class counts) and sends it as a ``MetricRecord`` (numbers) and a
   ``ConfigRecord`` (category names);
2. the server adds the summaries up (``combine``) and fits one ``FeatureEncoder`` on the total;
3. the encoder goes back to every site (``to_config_record``) and, later, into the signed policy bundle
   (``to_dict``), so training, evaluation and deployment all encode identically.

The combined statistics equal those of the pooled rows, so the encoder equals one fit on the pooled table.

Numerics. Sums are float64. The spread of a column is not kept as a raw sum of squares, whose variance
``Σx²/n − (Σx/n)²`` cancels catastrophically when the mean is large against the spread (a particle size of
1e3 nm ± 0.1, or a day count of 1e9 ± 1, loses most or all of its digits). Each site keeps the centred sum
of squares ``M2 = Σ(x − x̄)²`` (two passes over its own rows), and sites are merged with the pairwise update
of Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for computing sample
variances", COMPSTAT 1982 / Stanford CS tech. report STAN-CS-79-773; the pairwise update, in mean form::

    n = n_a + n_b,   δ = x̄_b − x̄_a,   M2 = M2_a + M2_b + δ² · n_a · n_b / n

which is exact in exact arithmetic and stable in floating point. What remains is the rounding of each
site's mean: the combined spread is accurate to about ``2.2e-16 · |mean| / sd`` relative — 1e-13 for the
nanoparticle features (O(1e3) at most), still 1e-9 for a 1e9 ± 1 column, where the raw sum of squares would
give nothing at all. (Shifting every value by a reference shared by all sites would remove even that, at
the cost of one more round trip; not worth it here.) The raw sum of squares is still available as
``Moments.sum_of_squares`` for readers who want it.

Privacy. What leaves a site is the aggregate listed above, nothing per row; but a min or max is one
patient's value, and a category seen once is one patient's category. A site under differential privacy
therefore sends something else (``client.statistics``): its row count, each numeric column's counts on a
fixed grid over the column's *declared* range (``shared.bounds``: a histogram's noise does not grow with the
range, a sum's does), and category and class counts over the *declared* values, all with Gaussian noise;
its moments are then read off its noised histograms and its min and max are the declared bounds. Every site
also sends the exact grid counts of its numeric columns, so a federation with noised sites fits the encoder
from the summed histograms (:meth:`FeatureEncoder.fit_statistics`): bins under ``NOISE_THRESHOLD`` noise sds
are dropped, means and scales are those of the rest (bin centres, plus the within-bin spread), missing-value
indicators follow the contract's "may be missing", vocabularies and classes are the declared ones. Without
noised sites nothing changes: moments as above.

Example
-------
>>> site_stats = [SiteStatistics.from_frame(train_rows, task) for train_rows in sites]  # doctest: +SKIP
>>> encoder = FeatureEncoder(task).fit_statistics(combine(site_stats))                  # doctest: +SKIP
>>> X = encoder.transform(train_rows)                   # float32, encoder.n_features_out_ columns  # doctest: +SKIP
>>> y = encoder.encode_targets(train_rows)              # {outcome name: float32 array, NaN = missing}  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, MetricRecord

from shared.bounds import (
    declared_categories,
    declared_classes,
    declared_range,
    grid_centres,
    grid_counts,
    may_be_missing,
    value_grid,
)
from shared.task import Outcome, TaskSpec

ENCODER_FORMAT = "fednano/feature-encoder"
ENCODER_FORMAT_VERSION = 1
"""Identify the ``to_dict`` layout; ``from_dict`` refuses any other."""

ENCODER_CONFIG_KEY = "feature-encoder"
"""The ConfigRecord key holding the encoder as JSON text."""

STATISTICS_BINS = 16
"""Bins of the statistics phase's grid per column: coarse, so that under DP the bins where rows crowd hold
many noise sds of counts (at ε 0.15 per site a bin's noise sd is ~150 rows); fine enough to standardise."""
NOISE_THRESHOLD = 2.0
"""Under DP, summed bins with fewer counts than this many noise sds are read as empty."""
MISSING_SUFFIX = "__missing"
ONE_HOT_SEPARATOR = "__"
"""Output column names: ``bilirubin_umol_l__missing`` (0/1 indicator), ``sex__F`` (one-hot)."""

BINARY_01 = ("0", "1")
"""A binary outcome whose labels are among these keeps 0 → 0 and 1 → 1 even when one class is absent."""


class NotFittedError(ValueError, AttributeError):
    """An encoder used before ``fit_statistics`` (or ``from_dict``); same bases as scikit-learn's."""


# ---------------------------------------------------------------------------------------------------------
# Aggregates of one column


@dataclass(frozen=True)
class Moments:
    """Count, sum and centred sum of squares (M2) of one column's non-missing values; ``+`` merges two.

    Parameters
    ----------
    count : int, default 0
        Number of non-missing values.
    sum : float, default 0.0
        Their sum (float64).
    m2 : float, default 0.0
        Sum of squared deviations from their mean, ``Σ(x − x̄)²``.
    """

    count: int = 0
    sum: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """Moments of ``values`` (float64), ignoring NaN; two passes, so M2 is centred exactly."""
        present = values[~np.isnan(values)]
        if present.size == 0:
            return cls()
        total = float(present.sum())
        mean = total / present.size
        return cls(int(present.size), total, float(np.square(present - mean).sum()))

    def __add__(self, other: Moments) -> Moments:
        """The moments of both samples together (Chan, Golub & LeVeque 1979, pairwise update, mean form)."""
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        count = self.count + other.count
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return Moments(count, self.sum + other.sum, m2)

    @property
    def mean(self) -> float:
        """Mean of the values; NaN when there are none."""
        return self.sum / self.count if self.count else math.nan

    @property
    def variance(self) -> float:
        """Population variance ``M2 / n``; NaN when there are no values."""
        return self.m2 / self.count if self.count else math.nan

    @property
    def sum_of_squares(self) -> float:
        """Raw ``Σx²``, derived; do not compute a variance from it (cancellation)."""
        return self.m2 + self.sum * self.mean if self.count else 0.0


@dataclass(frozen=True)
class NumericSummary:
    """Moments plus min and max of one numeric feature; ``+`` merges two (min of mins, max of maxes).

    With no values, ``min`` is +inf and ``max`` is -inf: the identities of min and max.
    """

    moments: Moments = field(default_factory=Moments)
    min: float = math.inf
    max: float = -math.inf

    @classmethod
    def of(cls, values: np.ndarray) -> NumericSummary:
        present = values[~np.isnan(values)]
        if present.size == 0:
            return cls()
        return cls(Moments.of(present), float(present.min()), float(present.max()))

    def __add__(self, other: NumericSummary) -> NumericSummary:
        return NumericSummary(self.moments + other.moments, min(self.min, other.min), max(self.max, other.max))


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in sorted(set(a) | set(b))}


# ---------------------------------------------------------------------------------------------------------
# One site's statistics


@dataclass
class SiteStatistics:
    """Aggregates of one site's training rows (or of several sites', after ``combine``).

    Parameters
    ----------
    n_rows : int
        Number of rows summarised; a numeric feature with ``count < n_rows`` has missing values.
    numeric : dict of str to NumericSummary
        Per numeric feature: count of non-missing values, sum, centred sum of squares, min, max.
    categorical : dict of str to dict of str to int
        Per categorical feature: rows per category value (missing cells are not counted).
    regression : dict of str to Moments
        Per regression outcome: count of non-missing values, sum, centred sum of squares.
    classification : dict of str to dict of str to int
        Per binary or multiclass outcome: rows per class label, labels as text (``1``, ``1.0`` → ``"1"``).
    histograms : dict of str to ndarray, default {}
        Per numeric feature and regression outcome with a declared range: counts on
        ``value_grid(*declared_range, STATISTICS_BINS)``.
    noise_var : float, default 0.0
        Variance of the Gaussian noise on each count (0 for exact statistics; sums of sites add).
    """

    n_rows: int
    numeric: dict[str, NumericSummary]
    categorical: dict[str, dict[str, int]]
    regression: dict[str, Moments]
    classification: dict[str, dict[str, int]]
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    noise_var: float = 0.0

    @classmethod
    def from_frame(cls, df: pd.DataFrame, task: TaskSpec) -> SiteStatistics:
        """Summarise ``df``, which must hold only the site's training rows (select them first)."""
        _require_columns(df, list(task.features) + [o.name for o in task.outcomes], "SiteStatistics.from_frame")
        return cls(
            n_rows=len(df),
            numeric={name: NumericSummary.of(_floats(df[name], name)) for name in task.numeric},
            categorical={name: _value_counts(df[name]) for name in task.categorical},
            regression={o.name: Moments.of(_floats(df[o.name], o.name)) for o in task.outcomes
                        if o.kind == "regression"},
            classification={o.name: _value_counts(df[o.name]) for o in task.outcomes if o.kind != "regression"},
            histograms={name: grid_counts(_floats(df[name], name), edges)
                        for name, edges in statistics_grids(task).items()},
        )

    def to_records(self) -> tuple[MetricRecord, ConfigRecord]:
        """Numbers in a MetricRecord, column names and category / class names in a ConfigRecord.

        Column names travel as lists in the ConfigRecord and every per-column number sits at the same
        position in a list of the MetricRecord, so no column name is ever parsed out of a record key.
        """
        numeric = list(self.numeric.values())
        metrics: dict[str, Any] = {
            "n-rows": int(self.n_rows),
            "numeric.count": [s.moments.count for s in numeric],
            "numeric.sum": [float(s.moments.sum) for s in numeric],
            "numeric.m2": [float(s.moments.m2) for s in numeric],
            "numeric.min": [float(s.min) for s in numeric],
            "numeric.max": [float(s.max) for s in numeric],
            "regression.count": [m.count for m in self.regression.values()],
            "regression.sum": [float(m.sum) for m in self.regression.values()],
            "regression.m2": [float(m.m2) for m in self.regression.values()],
        }
        config: dict[str, Any] = {
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "regression": list(self.regression),
            "classification": list(self.classification),
        }
        for group in ("categorical", "classification"):
            for i, counts in enumerate(getattr(self, group).values()):
                config[f"{group}.{i}.values"] = list(counts)
                metrics[f"{group}.{i}.counts"] = [int(n) for n in counts.values()]
        config["histograms"] = list(self.histograms) or [""]
        for i, counts in enumerate(self.histograms.values()):
            metrics[f"histogram.{i}"] = [float(c) for c in counts]
        metrics["noise-var"] = float(self.noise_var)
        return MetricRecord(metrics), ConfigRecord(config)

    @classmethod
    def from_records(cls, metrics: MetricRecord, config: ConfigRecord) -> SiteStatistics:
        """Inverse of ``to_records``; a missing key or lists of unequal length raise ``ValueError``."""
        read = _RecordReader(metrics, config)
        numeric_names = read.names("numeric")
        regression_names = read.names("regression")
        numeric = [
            NumericSummary(Moments(int(n), float(s), float(m2)), float(lo), float(hi))
            for n, s, m2, lo, hi in zip(*(read.numbers(f"numeric.{k}", len(numeric_names))
                                          for k in ("count", "sum", "m2", "min", "max")), strict=True)
        ]
        regression = [
            Moments(int(n), float(s), float(m2))
            for n, s, m2 in zip(*(read.numbers(f"regression.{k}", len(regression_names))
                                  for k in ("count", "sum", "m2")), strict=True)
        ]
        return cls(
            n_rows=int(read.number("n-rows")),
            numeric=dict(zip(numeric_names, numeric, strict=True)),
            categorical=read.counts("categorical"),
            regression=dict(zip(regression_names, regression, strict=True)),
            classification=read.counts("classification"),
            histograms={name: np.asarray(read.numbers(f"histogram.{i}", STATISTICS_BINS), dtype=np.float64)
                        for i, name in enumerate(n for n in read.names("histograms") if n)},
            noise_var=float(read.number("noise-var")),
        )


def statistics_grids(task: TaskSpec) -> dict[str, np.ndarray]:
    """The grid edges of every numeric feature and regression outcome that has a declared range."""
    columns = list(task.numeric) + [o.name for o in task.outcomes if o.kind == "regression"]
    return {name: value_grid(*bounds, STATISTICS_BINS) for name in columns
            if (bounds := declared_range(task, name)) is not None}


def combine(stats: list[SiteStatistics]) -> SiteStatistics:
    """Add the statistics of several sites: equal to the statistics of their pooled rows.

    Every site must summarise the same columns (one task); otherwise ``ValueError`` names the difference.
    """
    if not stats:
        raise ValueError("combine: expected the statistics of at least one site; got none")
    first = stats[0]
    for i, other in enumerate(stats[1:], start=1):
        for group in ("numeric", "categorical", "regression", "classification"):
            if list(getattr(other, group)) != list(getattr(first, group)):
                raise ValueError(f"combine: site {i} summarises {group} columns {list(getattr(other, group))}, "
                                 f"site 0 {list(getattr(first, group))}; all sites must use one task")
    total = first
    for other in stats[1:]:
        total = SiteStatistics(
            n_rows=total.n_rows + other.n_rows,
            numeric={k: v + other.numeric[k] for k, v in total.numeric.items()},
            categorical={k: _add_counts(v, other.categorical[k]) for k, v in total.categorical.items()},
            regression={k: v + other.regression[k] for k, v in total.regression.items()},
            classification={k: _add_counts(v, other.classification[k]) for k, v in total.classification.items()},
            histograms={k: v + other.histograms[k] for k, v in total.histograms.items() if k in other.histograms},
            noise_var=total.noise_var + other.noise_var,
        )
    return total


class _RecordReader:
    """Reads the layout written by ``SiteStatistics.to_records``, naming the key that is missing or wrong."""

    def __init__(self, metrics: MetricRecord, config: ConfigRecord) -> None:
        self.metrics, self.config = metrics, config

    def _get(self, record: MetricRecord | ConfigRecord, kind: str, key: str) -> Any:
        if key not in record:
            raise ValueError(f"site statistics: the {kind} has no key {key!r}")
        return record[key]

    def number(self, key: str) -> int | float:
        value = self._get(self.metrics, "MetricRecord", key)
        if isinstance(value, list):
            raise ValueError(f"site statistics: MetricRecord key {key!r} must hold a number; got a list")
        return value

    def numbers(self, key: str, length: int) -> list[int | float]:
        value = self._get(self.metrics, "MetricRecord", key)
        if not isinstance(value, list) or len(value) != length:
            raise ValueError(f"site statistics: MetricRecord key {key!r} must hold a list of {length} numbers; "
                             f"got {value!r}")
        return value

    def names(self, key: str) -> list[str]:
        value = self._get(self.config, "ConfigRecord", key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"site statistics: ConfigRecord key {key!r} must hold a list of names; got {value!r}")
        return value

    def counts(self, group: str) -> dict[str, dict[str, int]]:
        result = {}
        for i, column in enumerate(self.names(group)):
            values = self.names(f"{group}.{i}.values")
            counts = self.numbers(f"{group}.{i}.counts", len(values))
            result[column] = {v: int(n) for v, n in zip(values, counts, strict=True)}
        return result


# ---------------------------------------------------------------------------------------------------------
# The encoder


class FeatureEncoder:
    """Turns a task's rows into one float32 matrix and its outcomes into float32 targets, identically at every site.

    Fit from statistics (``fit_statistics``), never from rows, so the federated fit and a fit on pooled rows
    agree. Columns out, in this order: the numeric features standardised (task order), a 0/1 missing
    indicator for each numeric feature that has missing values in the statistics, then one-hot columns per
    categorical feature over its global vocabulary (task order, values sorted).

    Parameters
    ----------
    task : TaskSpec
        Which columns are numeric features, categorical features and outcomes.

    Attributes
    ----------
    means_, scales_ : dict of str to float
        Per numeric feature: mean, and population standard deviation (1.0 where it is 0 or undefined).
        A feature with no value at all gets mean 0.0.
    vocabularies_ : dict of str to list of str
        Per categorical feature: the sorted category values seen in the statistics.
    missing_indicator_ : list of str
        Numeric features that get a 0/1 "was missing" column.
    target_means_, target_scales_ : dict of str to float
        Per regression outcome, like ``means_`` / ``scales_``.
    classes_ : dict of str to list of str
        Per binary or multiclass outcome: labels in index order (sorted; numerically when all look numeric).
    feature_names_out_ : list of str
        Names of the output columns (``age``, ``age__missing``, ``sex__F``).
    n_features_out_ : int
        Number of output columns.

    Example
    -------
    >>> encoder = fit_local(train_rows, task)              # doctest: +SKIP
    >>> X = encoder.transform(test_rows)                   # doctest: +SKIP
    """

    def __init__(self, task: TaskSpec) -> None:
        self.task = task

    # -- fitting ------------------------------------------------------------------------------------------

    def fit_statistics(self, stats: SiteStatistics) -> FeatureEncoder:
        """Learn means, scales, vocabularies, indicators and classes from (combined) statistics; from the
        summed histograms when some of them carry DP noise (module docstring)."""
        self._check_covers(stats)
        if stats.noise_var > 0:
            return self._fit_noised(stats)
        task = self.task
        numeric = {name: stats.numeric[name] for name in task.numeric}
        self.means_ = {name: _mean_or_zero(s.moments) for name, s in numeric.items()}
        self.scales_ = {name: _scale(s.moments) for name, s in numeric.items()}
        self.missing_indicator_ = [name for name, s in numeric.items() if s.moments.count < stats.n_rows]
        self.vocabularies_ = {name: sorted(stats.categorical[name]) for name in task.categorical}
        regression = [o.name for o in task.outcomes if o.kind == "regression"]
        self.target_means_ = {name: _mean_or_zero(stats.regression[name]) for name in regression}
        self.target_scales_ = {name: _scale(stats.regression[name]) for name in regression}
        self.classes_ = {o.name: _classes(o, stats.classification[o.name]) for o in task.outcomes
                         if o.kind != "regression"}
        self._set_names_out()
        return self

    def _fit_noised(self, stats: SiteStatistics) -> FeatureEncoder:
        task = self.task
        sd = math.sqrt(stats.noise_var)
        for name in list(task.numeric) + [o.name for o in task.outcomes if o.kind == "regression"]:
            if name not in stats.histograms:
                raise ValueError(f"fit_statistics: noised statistics need a grid for {name!r}, which has no "
                                 "declared range")
        moments = {name: _histogram_moments(stats.histograms[name], name, task, sd) for name in stats.histograms}
        self.means_ = {name: moments[name][0] for name in task.numeric}
        self.scales_ = {name: moments[name][1] for name in task.numeric}
        self.missing_indicator_ = [name for name in task.numeric if _noised_missing(task, name, stats, sd)]
        self.vocabularies_ = {}
        for name in task.categorical:
            declared = declared_categories(task, name)
            if declared is None:
                raise ValueError(f"fit_statistics: categorical column {name!r} has no declared categories; noised "
                                 "statistics cannot name its values")
            self.vocabularies_[name] = sorted(declared)
        regression = [o.name for o in task.outcomes if o.kind == "regression"]
        self.target_means_ = {name: moments[name][0] for name in regression}
        self.target_scales_ = {name: moments[name][1] for name in regression}
        self.classes_ = {}
        for outcome in task.outcomes:
            if outcome.kind != "regression":
                declared = declared_classes(task, outcome.name)
                if declared is None:
                    raise ValueError(f"fit_statistics: outcome {outcome.name!r} has no declared classes; noised "
                                     "statistics cannot name them")
                self.classes_[outcome.name] = _classes(outcome, dict.fromkeys(declared, 1))
        self._set_names_out()
        return self

    def _check_covers(self, stats: SiteStatistics) -> None:
        task = self.task
        wanted = {
            "numeric": task.numeric,
            "categorical": task.categorical,
            "regression": [o.name for o in task.outcomes if o.kind == "regression"],
            "classification": [o.name for o in task.outcomes if o.kind != "regression"],
        }
        for group, names in wanted.items():
            absent = [name for name in names if name not in getattr(stats, group)]
            if absent:
                raise ValueError(f"fit_statistics: the statistics have no {group} entry for {absent}; "
                                 "were they computed for another task?")

    def _set_names_out(self) -> None:
        names = list(self.task.numeric)
        names += [name + MISSING_SUFFIX for name in self.missing_indicator_]
        names += [f"{name}{ONE_HOT_SEPARATOR}{value}" for name in self.task.categorical
                  for value in self.vocabularies_[name]]
        self.feature_names_out_ = names
        self.n_features_out_ = len(names)

    def _check_fitted(self) -> None:
        if not hasattr(self, "feature_names_out_"):
            raise NotFittedError("this FeatureEncoder is not fitted yet; call fit_statistics or from_dict first")

    # -- encoding -----------------------------------------------------------------------------------------

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """The float32 feature matrix of ``df``: one row per row, ``n_features_out_`` columns.

        A missing numeric value becomes 0 (the global mean after standardising) and, if that feature has an
        indicator, a 1 there. A missing or unseen category gives all zeros in that feature's one-hot block.
        """
        self._check_fitted()
        task = self.task
        _require_columns(df, task.features, "transform")
        out = np.zeros((len(df), self.n_features_out_), dtype=np.float32)
        n_numeric = len(task.numeric)
        if n_numeric:
            values = np.column_stack([_floats(df[name], name) for name in task.numeric])
            means = np.array([self.means_[name] for name in task.numeric])
            scales = np.array([self.scales_[name] for name in task.numeric])
            missing = np.isnan(values)
            out[:, :n_numeric] = np.where(missing, 0.0, (values - means) / scales)
            for j, name in enumerate(self.missing_indicator_):
                out[:, n_numeric + j] = missing[:, task.numeric.index(name)]
        start = n_numeric + len(self.missing_indicator_)
        for name in task.categorical:
            vocabulary = self.vocabularies_[name]
            codes = pd.Index(vocabulary, dtype=object).get_indexer(_texts(df[name]))  # -1: missing or unseen
            rows = np.flatnonzero(codes >= 0)
            out[rows, start + codes[rows]] = 1.0
            start += len(vocabulary)
        return out

    def encode_targets(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Every outcome of ``df`` as float32: binary 0/1 and multiclass class index (positions in
        ``classes_``), regression standardised. A missing outcome stays NaN, for the loss to mask.

        A class label absent from the statistics raises ``ValueError`` naming the outcome and the labels.
        """
        self._check_fitted()
        _require_columns(df, [o.name for o in self.task.outcomes], "encode_targets")
        targets = {}
        for outcome in self.task.outcomes:
            if outcome.kind == "regression":
                values = _floats(df[outcome.name], outcome.name)
                scaled = (values - self.target_means_[outcome.name]) / self.target_scales_[outcome.name]
                targets[outcome.name] = scaled.astype(np.float32)
            else:
                targets[outcome.name] = self._class_indices(outcome.name, df[outcome.name])
        return targets

    def _class_indices(self, name: str, series: pd.Series) -> np.ndarray:
        labels = _texts(series)
        codes = pd.Index(self.classes_[name], dtype=object).get_indexer(labels)
        missing = labels.isna().to_numpy()
        unseen = (codes < 0) & ~missing
        if unseen.any():
            found = sorted(set(labels[unseen]))
            raise ValueError(f"encode_targets: outcome {name!r} holds labels {found} that the training "
                             f"statistics never saw (classes: {self.classes_[name]})")
        indices = codes.astype(np.float32)
        indices[missing] = np.nan
        return indices

    def decode_regression(self, name: str, values: np.ndarray) -> np.ndarray:
        """Standardised predictions of regression outcome ``name`` back in the outcome's unit (float64)."""
        self._check_fitted()
        if name not in self.target_means_:
            raise ValueError(f"decode_regression: {name!r} is not a regression outcome of the task; "
                             f"regression outcomes: {list(self.target_means_)}")
        return np.asarray(values, dtype=np.float64) * self.target_scales_[name] + self.target_means_[name]

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder, as JSON-safe values (no NaN, no tuples, no numpy)."""
        self._check_fitted()
        return {
            "format": ENCODER_FORMAT,
            "version": ENCODER_FORMAT_VERSION,
            "task": _task_to_dict(self.task),
            "means": dict(self.means_),
            "scales": dict(self.scales_),
            "vocabularies": {k: list(v) for k, v in self.vocabularies_.items()},
            "missing_indicator": list(self.missing_indicator_),
            "target_means": dict(self.target_means_),
            "target_scales": dict(self.target_scales_),
            "classes": {k: list(v) for k, v in self.classes_.items()},
            "feature_names_out": list(self.feature_names_out_),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureEncoder:
        """Rebuild an encoder written by ``to_dict``; a wrong format, version or layout raises ``ValueError``."""
        if data.get("format") != ENCODER_FORMAT or data.get("version") != ENCODER_FORMAT_VERSION:
            raise ValueError(f"FeatureEncoder.from_dict: expected format {ENCODER_FORMAT!r} version "
                             f"{ENCODER_FORMAT_VERSION}; got {data.get('format')!r} version {data.get('version')!r}")
        try:
            encoder = cls(_task_to_spec(data["task"]))
            encoder.means_ = {k: float(v) for k, v in data["means"].items()}
            encoder.scales_ = {k: float(v) for k, v in data["scales"].items()}
            encoder.vocabularies_ = {k: [str(x) for x in v] for k, v in data["vocabularies"].items()}
            encoder.missing_indicator_ = [str(x) for x in data["missing_indicator"]]
            encoder.target_means_ = {k: float(v) for k, v in data["target_means"].items()}
            encoder.target_scales_ = {k: float(v) for k, v in data["target_scales"].items()}
            encoder.classes_ = {k: [str(x) for x in v] for k, v in data["classes"].items()}
        except KeyError as exc:
            raise ValueError(f"FeatureEncoder.from_dict: missing key {exc.args[0]!r}") from exc
        encoder._check_state_matches_task()
        encoder._put_in_task_order()
        encoder._set_names_out()
        if encoder.feature_names_out_ != data.get("feature_names_out"):
            raise ValueError("FeatureEncoder.from_dict: feature_names_out does not match the stored task and "
                             "vocabularies; the dict was edited or written by another version")
        return encoder

    def _check_state_matches_task(self) -> None:
        task = self.task
        regression = [o.name for o in task.outcomes if o.kind == "regression"]
        expected = {
            "means": (self.means_, task.numeric), "scales": (self.scales_, task.numeric),
            "vocabularies": (self.vocabularies_, task.categorical),
            "target_means": (self.target_means_, regression), "target_scales": (self.target_scales_, regression),
            "classes": (self.classes_, [o.name for o in task.outcomes if o.kind != "regression"]),
        }
        for key, (learned, names) in expected.items():
            if sorted(learned) != sorted(names):
                raise ValueError(f"FeatureEncoder.from_dict: {key!r} covers {sorted(learned)}; the task needs "
                                 f"{sorted(names)}")
        if not set(self.missing_indicator_) <= set(task.numeric):
            raise ValueError("FeatureEncoder.from_dict: 'missing_indicator' names columns that are not numeric "
                             "features of the task")

    def _put_in_task_order(self) -> None:
        """Learned dicts keyed in task order, as ``fit_statistics`` leaves them (JSON may sort keys)."""
        task = self.task
        for learned, names in (("means_", task.numeric), ("scales_", task.numeric),
                               ("vocabularies_", task.categorical)):
            setattr(self, learned, {name: getattr(self, learned)[name] for name in names})
        outcomes = [o.name for o in task.outcomes]
        for learned in ("target_means_", "target_scales_", "classes_"):
            values = getattr(self, learned)
            setattr(self, learned, {name: values[name] for name in outcomes if name in values})

    def to_config_record(self) -> ConfigRecord:
        """The encoder for sites: its ``to_dict`` as JSON text under ``ENCODER_CONFIG_KEY``."""
        return ConfigRecord({ENCODER_CONFIG_KEY: json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)})

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> FeatureEncoder:
        """Inverse of ``to_config_record``."""
        if ENCODER_CONFIG_KEY not in record or not isinstance(record[ENCODER_CONFIG_KEY], str):
            raise ValueError(f"FeatureEncoder.from_config_record: the ConfigRecord has no text key "
                             f"{ENCODER_CONFIG_KEY!r}")
        return cls.from_dict(json.loads(record[ENCODER_CONFIG_KEY]))

    def __repr__(self) -> str:
        fitted = f", n_features_out_={self.n_features_out_}" if hasattr(self, "n_features_out_") else ""
        return (f"FeatureEncoder(task=<{len(self.task.numeric)} numeric, {len(self.task.categorical)} "
                f"categorical, {len(self.task.outcomes)} outcomes>{fitted})")


def fit_local(df: pd.DataFrame, task: TaskSpec) -> FeatureEncoder:
    """An encoder fit on one site's own rows, for local-only baselines (same code path as the federated fit)."""
    return FeatureEncoder(task).fit_statistics(SiteStatistics.from_frame(df, task))


# ---------------------------------------------------------------------------------------------------------
# Small pure helpers


def _require_columns(df: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    absent = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if absent:
        raise ValueError(f"{where}: the frame has no column {', '.join(map(repr, absent))}")


def _floats(series: pd.Series, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for missing; text or ±inf raises, naming the column."""
    try:
        values = pd.to_numeric(series, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"column {name!r} must be numeric: {exc}") from exc
    infinite = np.flatnonzero(np.isinf(values))
    if infinite.size:
        raise ValueError(f"column {name!r} holds infinite values at row positions {infinite[:5].tolist()}; "
                         "validate the site first")
    return values


def _label_text(value: Any) -> str | None:
    """A category value or class label as text, None when missing; ``1``, ``1.0``, ``True`` all read "1"."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


def _texts(series: pd.Series) -> pd.Series:
    """``_label_text`` of every cell, as an object series with NaN where missing."""
    return series.map(_label_text).astype(object).where(series.notna(), np.nan)


def _value_counts(series: pd.Series) -> dict[str, int]:
    """Rows per non-missing value (as text), keys sorted."""
    counts = _texts(series).dropna().value_counts()
    return {str(k): int(counts[k]) for k in sorted(counts.index)}


def _mean_or_zero(moments: Moments) -> float:
    return moments.mean if moments.count else 0.0


def _scale(moments: Moments) -> float:
    """Population standard deviation, or 1.0 where it is 0 or undefined (so scaling never divides by 0)."""
    sd = math.sqrt(moments.variance) if moments.count else math.nan
    return sd if math.isfinite(sd) and sd > 0 else 1.0


def _histogram_moments(counts: np.ndarray, name: str, task: TaskSpec, noise_sd: float) -> tuple[float, float]:
    """Mean and scale of a column from its summed, noised grid counts: bins above ``NOISE_THRESHOLD`` noise
    sds, at their centres, plus the spread within a bin (a bin's width² / 12). With no such bin: the declared
    range's midpoint and the sd of a uniform value over it."""
    edges = value_grid(*declared_range(task, name), STATISTICS_BINS)
    kept = np.where(counts > NOISE_THRESHOLD * noise_sd, counts, 0.0)
    if kept.sum() <= 0:
        return float((edges[0] + edges[-1]) / 2), float((edges[-1] - edges[0]) / math.sqrt(12))
    centres, widths = grid_centres(edges), np.diff(edges)
    mean = float(np.sum(kept * centres) / kept.sum())
    variance = float(np.sum(kept * (np.square(centres - mean) + np.square(widths) / 12)) / kept.sum())
    return mean, math.sqrt(variance) if variance > 0 else 1.0


def _noised_missing(task: TaskSpec, name: str, stats: SiteStatistics, noise_sd: float) -> bool:
    """Whether a numeric feature gets a missing-value indicator when the statistics are noised: as the contract
    says it may be missing, else when the noised counts miss more rows than the noise explains."""
    declared = may_be_missing(task, name)
    if declared is not None:
        return declared
    present = float(np.sum(stats.histograms[name]))
    return stats.n_rows - present > NOISE_THRESHOLD * noise_sd * math.sqrt(STATISTICS_BINS + 1)


def _classes(outcome: Outcome, counts: dict[str, int]) -> list[str]:
    """Class labels in index order: sorted numerically when all look numeric, else as text."""
    labels = list(counts)
    if outcome.kind == "binary":
        if len(labels) > 2:
            raise ValueError(f"fit_statistics: binary outcome {outcome.name!r} has {len(labels)} classes "
                             f"{labels}; a binary outcome has at most 2")
        if set(labels) <= set(BINARY_01):
            return list(BINARY_01)
    numbers = [_as_number(label) for label in labels]
    if all(n is not None for n in numbers):
        return [label for _, label in sorted(zip(numbers, labels, strict=True))]
    return sorted(labels)


def _as_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _task_to_dict(task: TaskSpec) -> dict[str, Any]:
    return {
        "outcomes": [{"name": o.name, "kind": o.kind} for o in task.outcomes],
        "numeric": list(task.numeric),
        "categorical": list(task.categorical),
        "split": task.split,
        "group": task.group,
        "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in task.ranges.items()},
    }


def _task_to_spec(data: dict[str, Any]) -> TaskSpec:
    return TaskSpec(
        outcomes=tuple(Outcome(o["name"], o["kind"]) for o in data["outcomes"]),
        numeric=tuple(data["numeric"]),
        categorical=tuple(data["categorical"]),
        split=data.get("split"),
        ranges={k: (float(lo), float(hi)) for k, (lo, hi) in data.get("ranges", {}).items()},
        group=data.get("group"),
    )
