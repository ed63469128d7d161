"""The federated statistics as one vector of sums, so that the secure sum can add them (``server.statistics_phase``).

``shared.encoding.combine`` merges sites' statistics exactly, but not all of what it merges is a sum: a column's
centred sum of squares is merged by Chan, Golub & LeVeque (1979) from each site's mean, min and max are not
sums, and each site names only the category values it has. To mask them, a site lays out its statistics as
one float vector in a layout every site shares (:class:`StatisticsLayout`, the union of the sites' names, which
travel in the clear first) of quantities that add:

``n_rows, noise_var, (count, sum, Σx²) per numeric column, (count, sum, Σy²) per regression outcome, category
counts per categorical column and class counts per outcome over the union of values, the grid counts``

where Σx² = M2 + sum² / count is the site's raw sum of squares; the server's summed vector gives the pooled
moments back (M2 = Σx² − sum² / count, the pooled centred sum of squares), which equal ``combine``'s up to the
fixed-point rounding of the secure sum and float64 cancellation in Σx² (relative to the column's mean², so
for a column of mean m and sd s a relative error of about 1e−16 · (m / s)² in its variance). Min and max are
taken over the sites whose input is in the sum, as they were sent (in the clear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from shared.encoding import STATISTICS_BINS, Moments, NumericSummary, SiteStatistics
from shared.protocol import records as r

VALUES = "values"
"""Array name of a site's masked statistics vector (``query.statistics_masked`` reply)."""
MINIMA, MAXIMA = "min", "max"
"""MetricRecord keys of a ``query.statistics_layout`` reply: per numeric column (the layout's order), min and max."""
LAYOUT_PREFIX = "layout"
"""ConfigRecord keys of a layout: ``layout.<group>`` names, ``layout.<group>.<i>`` a column's values."""


@dataclass(frozen=True)
class StatisticsLayout:
    """The names a statistics vector is laid out by: columns per group, values per categorical / class column."""

    numeric: tuple[str, ...]
    categorical: dict[str, tuple[str, ...]]
    regression: tuple[str, ...]
    classification: dict[str, tuple[str, ...]]
    histograms: tuple[str, ...]

    @classmethod
    def of(cls, stats: SiteStatistics) -> StatisticsLayout:
        """The layout of one site's statistics (its category and class values, sorted)."""
        return cls(tuple(stats.numeric), {c: tuple(sorted(v)) for c, v in stats.categorical.items()},
                   tuple(stats.regression), {c: tuple(sorted(v)) for c, v in stats.classification.items()},
                   tuple(stats.histograms))

    def union(self, other: StatisticsLayout) -> StatisticsLayout:
        """The layout of both sites' statistics: one task's columns (``ValueError`` naming the group otherwise),
        the union of their values."""
        for group in ("numeric", "regression", "histograms"):
            if getattr(self, group) != getattr(other, group):
                raise ValueError(f"statistics layout: {group} columns {list(getattr(other, group))} differ from "
                                 f"{list(getattr(self, group))}; all sites must use one task")
        for group in ("categorical", "classification"):
            if list(getattr(self, group)) != list(getattr(other, group)):
                raise ValueError(f"statistics layout: {group} columns differ between sites; all sites must use "
                                 "one task")
        merged = {group: {c: tuple(sorted(set(values) | set(getattr(other, group)[c])))
                          for c, values in getattr(self, group).items()}
                  for group in ("categorical", "classification")}
        return StatisticsLayout(self.numeric, merged["categorical"], self.regression, merged["classification"],
                                self.histograms)

    @property
    def size(self) -> int:
        """Entries of the vector."""
        return (2 + 3 * (len(self.numeric) + len(self.regression))
                + sum(len(v) for v in self.categorical.values()) + sum(len(v) for v in self.classification.values())
                + STATISTICS_BINS * len(self.histograms))

    def to_config(self) -> ConfigRecord:
        """The layout as ConfigRecord keys (lists of names; an empty list stands as ``[""]``)."""
        config = {}
        for group in ("numeric", "regression", "histograms"):
            config[f"{LAYOUT_PREFIX}.{group}"] = list(getattr(self, group)) or [""]
        for group in ("categorical", "classification"):
            columns = getattr(self, group)
            config[f"{LAYOUT_PREFIX}.{group}"] = list(columns) or [""]
            for i, values in enumerate(columns.values()):
                config[f"{LAYOUT_PREFIX}.{group}.{i}"] = list(values) or [""]
        return ConfigRecord(config)

    @classmethod
    def from_config(cls, config: ConfigRecord) -> StatisticsLayout:
        """Inverse of :meth:`to_config`; a missing key raises ``ValueError`` naming it."""

        def names(key: str) -> tuple[str, ...]:
            if key not in config:
                raise ValueError(f"statistics layout: the request has no key {key!r}")
            return tuple(str(v) for v in config[key] if str(v))

        columns = {group: {c: names(f"{LAYOUT_PREFIX}.{group}.{i}")
                           for i, c in enumerate(names(f"{LAYOUT_PREFIX}.{group}"))}
                   for group in ("categorical", "classification")}
        return cls(names(f"{LAYOUT_PREFIX}.numeric"), columns["categorical"], names(f"{LAYOUT_PREFIX}.regression"),
                   columns["classification"], names(f"{LAYOUT_PREFIX}.histograms"))

    def vector(self, stats: SiteStatistics) -> np.ndarray:
        """One site's statistics as the float64 vector of sums (module docstring). A category or class value
        outside the layout raises ``ValueError`` naming the column (its count would be lost)."""
        parts: list[np.ndarray] = [np.array([float(stats.n_rows), float(stats.noise_var)])]
        for name in self.numeric:
            parts.append(raw_sums(stats.numeric[name].moments))
        for name in self.regression:
            parts.append(raw_sums(stats.regression[name]))
        for group in ("categorical", "classification"):
            for column, values in getattr(self, group).items():
                counts = getattr(stats, group)[column]
                outside = set(counts) - set(values)
                if outside:
                    raise ValueError(f"statistics layout: {len(outside)} value(s) of {group} column {column!r} are "
                                     "not in the layout")
                parts.append(np.array([float(counts.get(v, 0)) for v in values]))
        for name in self.histograms:
            parts.append(np.asarray(stats.histograms[name], dtype=np.float64).reshape(STATISTICS_BINS))
        return np.concatenate(parts)

    def statistics(self, total: np.ndarray, minima: dict[str, float], maxima: dict[str, float]) -> SiteStatistics:
        """The pooled statistics from a summed vector, with the numeric columns' min and max as given."""
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.size,):
            raise ValueError(f"statistics layout: a summed vector of {total.shape} entries, expected {self.size}")
        at = 2
        numeric, regression = {}, {}
        for name in self.numeric:
            numeric[name] = NumericSummary(moments(total[at:at + 3]), minima[name], maxima[name])
            at += 3
        for name in self.regression:
            regression[name] = moments(total[at:at + 3])
            at += 3
        counted = {}
        for group in ("categorical", "classification"):
            counted[group] = {}
            for column, values in getattr(self, group).items():
                counted[group][column] = {v: int(round(float(c))) for v, c in
                                          zip(values, total[at:at + len(values)], strict=True)}
                at += len(values)
        histograms = {}
        for name in self.histograms:
            histograms[name] = total[at:at + STATISTICS_BINS].copy()
            at += STATISTICS_BINS
        return SiteStatistics(n_rows=int(round(float(total[0]))), numeric=numeric, categorical=counted["categorical"],
                              regression=regression, classification=counted["classification"],
                              histograms=histograms, noise_var=float(total[1]))


def raw_sums(m: Moments) -> np.ndarray:
    """(count, sum, Σx²) of a column's moments: Σx² = M2 + sum² / count."""
    return np.array([float(m.count), float(m.sum), float(m.m2) + (m.sum ** 2 / m.count if m.count else 0.0)])


def moments(sums: np.ndarray) -> Moments:
    """Moments from summed (count, sum, Σx²): M2 = Σx² − sum² / count, at least 0 (fixed-point rounding)."""
    count = int(round(float(sums[0])))
    if count <= 0:
        return Moments()
    total = float(sums[1])
    return Moments(count, total, max(float(sums[2]) - total ** 2 / count, 0.0))


def layout_reply(content: RecordDict) -> tuple[StatisticsLayout, dict[str, float], dict[str, float]]:
    """A layout reply read back (the server's side of step 1): the layout, the minima and maxima by column."""
    own = StatisticsLayout.from_config(ConfigRecord(dict(content[r.NAMES])))
    metrics = content[r.STATISTICS]
    return (own, dict(zip(own.numeric, map(float, metrics[MINIMA]), strict=True)),
            dict(zip(own.numeric, map(float, metrics[MAXIMA]), strict=True)))
