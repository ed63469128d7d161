"""Feasibility of a summed release: is every entry where a sum of honest contributions could lie?

Under the secure sum (``server.secure_aggregation``) the coordinator sees only the sum of the sites'
contributions, never one site's. It cannot clip a site, but it can check the sum against what is public: the
task's declared value ranges (``shared.bounds``), the sites' declared row counts (the site check's reply, in the
clear, for sites not under DP) and the DP facts of the sites in the sum (the noise sd each states, in the
clear). A release that no set of honest contributions could have produced is refused (:class:`InfeasibleSum`,
naming the phase, the entry and the bound, never a value). With ``secure-sum = off`` every site's contribution
is visible and the same check runs on each alone (one site, its own declared count and noise): the phase drops
the site it names.

What the federated statistics' summed vector (``shared.statistics_vector``) must satisfy, with N the summed
row count, per numeric column or regression outcome (C, S, Q) = (count, sum, Σx²) and declared range [lo, hi]:

- N ≥ 0, and N ≤ Σ declared row counts when every site in the sum declared one (no DP site among them);
- the noise-variance entry equals Σ σ_i² over the DP sites in the sum (their stated noise sd);
- 0 ≤ C ≤ N;  C·lo ≤ S ≤ C·hi;  C·min(x²) ≤ Q ≤ C·max(lo², hi²);  Q ≥ S² / C (Cauchy–Schwarz: the pooled
  sum of squares is at least the squared sum over the count, for any contributions that are each feasible);
- category and class counts ≥ 0, each column's counts adding to at most N; grid counts ≥ 0 adding to at most N.

DP allowance. A DP site noises its counts before masking (``client.statistics``), so its honest vector breaks
the counting constraints by its noise. Each of a release's constraints is widened by a bound its noise exceeds
with probability below p = :data:`REFUSAL_PROBABILITY` / (entries of the release), so that an honest release is
refused with probability below 1e−6 per DP site in it (Bonferroni: a release has fewer constraints that its
noise can break than entries):
k = Φ⁻¹(1 − p) standard deviations (5.85 for the built-in task's 412 entries) for an entry that is a linear
function of the noise, and for a count read off a column's clipped, rounded noised grid
(which can exceed the row count by Σ|e_b| over its B bins plus the row count's own noise) the Cauchy–Schwarz
bound Σ|e| ≤ √m · ‖e‖ with ‖e‖² / σ² below the χ²_m quantile at 1 − p (m = B + 1 entries), plus the rounding.
The range constraints need no allowance: a DP site's sums are read off noised grid counts at the grid's
centres, which lie in [lo, hi]. The allowance uses each DP site's stated noise sd: a site that overstates its
noise widens its own allowance (and the run record shows the σ it stated).

Fixed point: the secure sum rounds each entry to 2^−40 per site (``server.secure_aggregation``); every bound
allows that and a relative float64 error of 1e−9.

Other summed releases (:func:`check_bounds`). A release whose entries are sums over rows of per-row terms with a
public bound (the analytics queries, ``shared.analytics_bounds``) is checked as a list of :class:`Bound`: each a
released array that must lie between two limits that are linear in other released entries (a count times a
declared range) or in the declared row count, with the sd of its DP noise per unit of a site's stated noise sd.
The allowance is the linear one above, k = Φ⁻¹(1 − p) with p = :data:`REFUSAL_PROBABILITY` / (the release's
checked entries).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chi2, norm

from shared.bounds import declared_range
from shared.encoding import STATISTICS_BINS
from shared.statistics_vector import StatisticsLayout
from shared.task import TaskSpec

REFUSAL_PROBABILITY = 1e-6
"""The most an honest DP site's noise may make a release's check fail (per release and DP site)."""
FIXED_POINT_QUANTUM = 2.0 ** -40
RELATIVE_TOLERANCE = 1e-9
DECLARED_ROW_KEYS = ("n_episodes", "n_rows")
"""Site-check summary keys of a site's declared row count (built-in task, generic task): all its rows, so at
least its training split's."""


class InfeasibleSum(ValueError):
    """A summed release no honest contributions could produce; the message names phase, entry and bound."""

    def __init__(self, phase: str, entry: str, bound: str) -> None:
        self.phase, self.entry, self.bound = phase, entry, bound
        super().__init__(f"{phase}: the summed {entry} is infeasible: it must satisfy {bound} (refused: a site "
                         "sent more than its declared rows and the task's declared ranges allow)")


@dataclass(frozen=True)
class Contributors:
    """What is public about the sites in one sum: how many, their declared row counts, the DP sites' noise sd.

    ``declared`` is None when some site in the sum declared no row count (a DP site: its site-check reply
    carries no counts), so the row count has no upper cap.
    """

    sites: int
    declared: float | None = None
    noise_sd: tuple[float, ...] = field(default_factory=tuple)
    p: float = REFUSAL_PROBABILITY
    """Probability one constraint's allowance may be exceeded by honest noise (:func:`check_statistics` sets
    it to REFUSAL_PROBABILITY / entries)."""

    @classmethod
    def of(cls, rows: Sequence[float | None], noise_sd: Iterable[float] = ()) -> Contributors:
        """The contributors of a sum over ``len(rows)`` sites, each with its declared row count (None: it declared
        none, so the sum's row count has no cap) and the noise sd each DP site among them stated."""
        return cls(len(rows), None if any(v is None for v in rows) else float(sum(rows)),
                   tuple(float(s) for s in noise_sd))

    @property
    def row_cap(self) -> float:
        """The most rows the sites in the sum can hold: their declared row counts summed, or no cap (∞) when one of
        them declared none."""
        return np.inf if self.declared is None else self.declared

    @property
    def noise_var(self) -> float:
        return float(sum(s * s for s in self.noise_sd))

    def linear(self, entries: int = 1) -> float:
        """Allowance of a sum of ``entries`` noised entries (and a row count): k · √entries · √Σσ², k = Φ⁻¹(1 − p)."""
        return float(norm.isf(self.p)) * math.sqrt(entries * self.noise_var)

    def clipped(self, entries: int) -> float:
        """Allowance of a count read off ``entries`` clipped, rounded noised counts, over the noised row count:
        per DP site √m · σ · √χ²_m(1 − p) with m = entries + 1, plus (m + 1) / 2 of rounding."""
        m = entries + 1
        per_sd = math.sqrt(m * chi2.isf(self.p, m))
        return float(sum(per_sd * s + (m + 1) / 2 for s in self.noise_sd))

    def tolerance(self, scale: float) -> float:
        """Fixed-point and float slack on a bound of magnitude ``scale``."""
        return self.sites * FIXED_POINT_QUANTUM * 4 + RELATIVE_TOLERANCE * abs(scale)


def declared_rows(summary: dict[str, float]) -> float | None:
    """A site's declared row count from its site-check summary, or None (a DP site declares none)."""
    for key in DECLARED_ROW_KEYS:
        if key in summary:
            return float(summary[key])
    return None


def check_statistics(layout: StatisticsLayout, total: np.ndarray, task: TaskSpec, who: Contributors,
                     phase: str = "statistics") -> None:
    """Raise :class:`InfeasibleSum` if the summed statistics vector ``total`` breaks a constraint of the module
    docstring for the contributors ``who``; return None if it is feasible."""
    total = np.asarray(total, dtype=np.float64)
    who = dataclasses.replace(who, p=REFUSAL_PROBABILITY / layout.size)
    if total.shape != (layout.size,) or not np.all(np.isfinite(total)):
        raise InfeasibleSum(phase, "statistics vector", f"{layout.size} finite entries")

    def need(ok: bool, entry: str, bound: str) -> None:
        if not ok:
            raise InfeasibleSum(phase, entry, bound)

    rows = float(total[0])
    need(rows >= -who.tolerance(0), "row count", "row count ≥ 0")
    if who.declared is not None:
        need(rows <= who.declared + who.linear() + who.tolerance(who.declared), "row count",
             "row count ≤ the sum of the sites' declared row counts (site check)")
    need(abs(float(total[1]) - who.noise_var) <= who.tolerance(who.noise_var) + RELATIVE_TOLERANCE * who.noise_var,
         "noise variance", "noise variance = Σ σ² of the DP sites' stated noise sd")
    at = 2
    for group in ("numeric", "regression"):
        for name in getattr(layout, group):
            _check_moments(need, total[at:at + 3], rows, declared_range(task, name), who, f"{group} column {name!r}")
            at += 3
    for group in ("categorical", "classification"):
        for column, values in getattr(layout, group).items():
            counts = total[at:at + len(values)]
            entry = f"{group} column {column!r} counts"
            need(bool(np.all(counts >= -who.tolerance(0))), entry, "every count ≥ 0")
            need(float(counts.sum()) <= rows + who.clipped(len(values)) + who.tolerance(rows), entry,
                 "counts adding to ≤ the summed row count (+ DP allowance)")
            at += len(values)
    for name in layout.histograms:
        counts = total[at:at + STATISTICS_BINS]
        entry = f"grid counts of {name!r}"
        need(bool(np.all(counts >= -who.linear() - who.tolerance(0))), entry, "every count ≥ 0 (− DP allowance)")
        need(float(counts.sum()) <= rows + who.linear(STATISTICS_BINS + 1) + len(who.noise_sd) / 2
             + who.tolerance(rows), entry, "counts adding to ≤ the summed row count (+ DP allowance)")
        at += STATISTICS_BINS


def _check_moments(need, sums: np.ndarray, rows: float, bounds: tuple[float, float] | None, who: Contributors,
                   entry: str) -> None:
    """(count, sum, Σx²) of one column: the constraints of the module docstring."""
    count, total, squares = (float(v) for v in sums)
    need(count >= -who.tolerance(0), f"count of {entry}", "count ≥ 0")
    need(count <= rows + who.clipped(STATISTICS_BINS) + who.tolerance(rows), f"count of {entry}",
         "count ≤ the summed row count (+ DP allowance)")
    if bounds is None:
        need(squares >= -who.tolerance(0), f"sum of squares of {entry}", "Σx² ≥ 0")
        _cauchy_schwarz(need, count, total, squares, who, entry)
        return
    lo, hi = bounds
    top = max(lo * lo, hi * hi)
    bottom = 0.0 if lo <= 0 <= hi else min(lo * lo, hi * hi)
    need(count * lo - who.tolerance(count * lo) <= total <= count * hi + who.tolerance(count * hi),
         f"sum of {entry}", f"count · {lo:g} ≤ sum ≤ count · {hi:g} (declared range)")
    # a DP site's Σx² may exceed count · x² by one row's worth from rounding its count (client.statistics)
    slack = len(who.noise_sd) * top
    need(count * bottom - slack - who.tolerance(count * bottom) <= squares
         <= count * top + slack + who.tolerance(count * top),
         f"sum of squares of {entry}", f"count · {bottom:g} ≤ Σx² ≤ count · {top:g} (declared range)")
    _cauchy_schwarz(need, count, total, squares, who, entry)


def _cauchy_schwarz(need, count: float, total: float, squares: float, who: Contributors, entry: str) -> None:
    """Σx² ≥ (Σx)² / count: true of each feasible contribution and so of their sum (Titu's lemma)."""
    if count > 0:
        need(squares >= total * total / count - who.tolerance(squares) - who.tolerance(total * total / count),
             f"sum of squares of {entry}", "Σx² ≥ (Σx)² / count (Cauchy–Schwarz)")


@dataclass(frozen=True)
class Bound:
    """``low ≤ value ≤ high`` for one released array (element-wise, broadcast), a constraint of :func:`check_bounds`.

    ``noise`` is the sd, per unit of a site's stated noise sd, of the DP noise on ``value − low`` and ``value −
    high`` (the noised entry's per-row scale and that of the released entries the limits are made of, root of
    the sum of squares); 0 where nothing is noised. ``text`` states the bound in the error (never a value).
    """

    entry: str
    value: np.ndarray
    low: np.ndarray | float
    high: np.ndarray | float
    noise: np.ndarray | float
    text: str


def check_bounds(phase: str, bounds: list[Bound], who: Contributors) -> None:
    """Raise :class:`InfeasibleSum` naming the first :class:`Bound` broken beyond its DP allowance and the
    fixed-point tolerance; return None if every one holds (module docstring)."""
    entries = sum(int(np.size(b.value)) for b in bounds)
    k = float(norm.isf(REFUSAL_PROBABILITY / max(entries, 1)))
    sd = math.sqrt(who.noise_var)
    for b in bounds:
        value = np.asarray(b.value, dtype=np.float64)
        low, high = np.broadcast_to(b.low, value.shape), np.broadcast_to(b.high, value.shape)
        allowance = k * sd * np.broadcast_to(np.asarray(b.noise, dtype=np.float64), value.shape)
        slack = (who.sites * FIXED_POINT_QUANTUM * 4 + RELATIVE_TOLERANCE
                 * np.maximum(np.abs(np.nan_to_num(low, posinf=0, neginf=0)),
                              np.abs(np.nan_to_num(high, posinf=0, neginf=0))) + allowance)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(value) & (value >= low - slack) & (value <= high + slack)
        if not bool(np.all(ok)):
            raise InfeasibleSum(phase, b.entry, b.text)
