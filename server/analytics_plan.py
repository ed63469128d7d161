"""What a federated-analytics run computes: its settings and, per task, which columns each analysis uses.

For the built-in task, the seed paper's analyses on the schema's columns (ranges from ``shared.bounds``); for
a generic task, their closest analogue. Under DP a column without a declared range is dropped (one row's
contribution to its sums would be unbounded) and named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.bounds import declared_range
from shared.config import settings_from_run_config
from shared.protocol.hist import secure_sum_mode
from shared.schema import EPISODE_COLUMNS, OUTCOMES
from shared.task import NANOPARTICLE_TASK, TaskSpec

REGRESSION_COVARIATES = ("dose_mg_m2", "particle_size_nm", "zeta_mv", "encapsulation_pct", "pegylated",
                         "age_years", "ecog", "anc_baseline_e9_l", "cumulative_dose_mg_m2", "interval_days")
"""Covariates of the built-in task's regressions: what was given (dose, interval), the carrier's properties
(size, charge, encapsulation, PEGylation) and the patient factors the simulator's outcome model and the
clinics' dosing habits depend on (age, ECOG, baseline neutrophils, prior anthracycline)."""
LINEAR_OUTCOMES = ("efficacy_pct",)
LOGISTIC_OUTCOMES = ("response", "toxicity_grade3")
ANOVA_RESPONSE, ANOVA_FACTOR = "efficacy_pct", "formulation_id"
KMEANS_FEATURES = ("particle_size_nm", "zeta_mv", "encapsulation_pct", "drug_loading_pct", "dose_mg_m2",
                   "age_years", "anc_baseline_e9_l", "cumulative_dose_mg_m2")
"""k-means / PCA features of the built-in task: formulation, dose and the patient factors of the seed's
cluster table (continuous columns only; binary and ordinal columns distort Euclidean distances)."""
PROFILE_OUTCOMES = ("response", "toxicity_grade3", "efficacy_pct")
HISTOGRAM_BINS = 100
ANALYSES = ("describe", "regression", "anova", "pca", "kmeans")
"""What ``fednano analytics --analyses`` may choose (default all). k-means starts from the PCA, so choosing
``kmeans`` runs ``pca`` too (and it is charged)."""
DESCRIBE_SHARE = 0.5
"""Share of the run's privacy loss that describe gets when other analyses run too. Describe is the numbers a
researcher reads first and most (means, sds, quantiles of every column), one query against the other
analyses' ~14 (Newton and Lloyd iterations): under an equal split its means missed 2 % of the declared range
at ε = 1 on 3 clinics of ~1,300 rows (2.4 %, medians 5.4 % against 5 %; BENCHMARKS.md "dp-accuracy"). Half
leaves its noise √2 times what describe alone at the run's ε would get."""
BUDGET_RULE = ("the run's ε at each DP site is split over the chosen analyses as shares of its Rényi privacy loss: "
               f"describe gets {DESCRIBE_SHARE:g} when other analyses run (all of it alone), the rest is split over "
               "the other analyses in proportion to the queries each asks (regression 1 linear + the Newton "
               "iterations, anova 1, pca 1, kmeans the Lloyd iterations + 1 profile), so every query of those gets "
               "the same noise. A query with share w of the loss gets noise multiplier σ₁/√w, σ₁ the noise of one "
               "query spending the whole ε: the planned queries compose (Rényi DP, Gaussian mechanism) to exactly "
               "the run's ε, each charged to the site's ledger with its own σ. Unchosen analyses ask nothing and "
               "spend nothing, so their budget stays in the site's ledger. The ε booked to an analysis is its site "
               "ledger's increase over its queries (ε does not add up under Rényi composition: a run's first "
               "queries add more ε than its later ones at the same σ)")
"""The stated rule of issue 19, item 4; the site applies it in its one DP release (``client.dp.PhaseRelease``)."""


def analysis_shares(queries: dict[str, int]) -> dict[str, float]:
    """Each analysis's share of the run's privacy loss by :data:`BUDGET_RULE`, from its planned queries
    (analyses asking none get none)."""
    asking = {name: n for name, n in queries.items() if n > 0}
    others = {name: n for name, n in asking.items() if name != "describe"}
    if "describe" not in asking or not others:
        total = sum(asking.values())
        return {name: n / total for name, n in asking.items()}
    rest = sum(others.values())
    return {"describe": DESCRIBE_SHARE} | {name: (1 - DESCRIBE_SHARE) * n / rest for name, n in others.items()}


@dataclass(frozen=True)
class ReleaseSchedule:
    """The run's planned queries in the order they are asked, as release indices per analysis, and each
    query's weight (its share of the run's privacy loss) that a DP site sets its noise by.

    Analysis ``a`` owns release indices ``start(a) … start(a) + queries[a] − 1`` whether or not its queries
    are all asked (an analysis that fails early leaves its indices unused: the site's check stays
    conservative), so a query's noise does not depend on what was skipped before it.
    """

    queries: dict[str, int]
    shares: dict[str, float]

    @classmethod
    def of(cls, queries: dict[str, int]) -> ReleaseSchedule:
        """The schedule of these planned queries (in asking order) under :data:`BUDGET_RULE`."""
        return cls(dict(queries), analysis_shares(queries))

    @property
    def total(self) -> int:
        """Planned queries of the run."""
        return sum(self.queries.values())

    def start(self, analysis: str) -> int:
        """Release index of the analysis's first query."""
        names = list(self.queries)
        return sum(self.queries[name] for name in names[:names.index(analysis)])

    def index(self, analysis: str, k: int) -> int | None:
        """Release index of the analysis's ``k``-th query (0-based); None beyond its plan."""
        if analysis not in self.queries or not 0 <= k < self.queries[analysis]:
            return None
        return self.start(analysis) + k

    def weights(self) -> list[float]:
        """Each planned release's share of the run's privacy loss, in release order (sums to 1)."""
        return [self.shares[name] / n for name, n in self.queries.items() for _ in range(n)]


def chosen_analyses(text: str) -> tuple[str, ...]:
    """The analyses named in a comma-separated list, in the run's order, with ``pca`` added for ``kmeans``;
    ``ValueError`` naming the allowed ones for an unknown or empty list."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in ANALYSES]
    if unknown or not names:
        raise ValueError(f"unknown analysis {', '.join(map(repr, unknown))}; expected a comma-separated list of "
                         f"{', '.join(ANALYSES)}" if unknown else
                         f"no analysis chosen; expected a comma-separated list of {', '.join(ANALYSES)}")
    if "kmeans" in names:
        names.append("pca")
    return tuple(a for a in ANALYSES if a in names)


def schema_bounds() -> dict[str, tuple[float, float]]:
    """Declared ranges of the built-in schema's numeric columns (0/1 for bool columns)."""
    return {c.name: bounds for c in EPISODE_COLUMNS
            if (bounds := declared_range(NANOPARTICLE_TASK, c.name)) is not None}


@dataclass(frozen=True)
class AnalyticsSettings:
    """What ``fednano analytics`` takes (run-config keys are these names hyphenated).

    Parameters
    ----------
    k : int, default 3
        Clusters of the k-means.
    seed : int, default 0
        Phase of the initial centroids on the principal-component ellipse.
    dp : bool, default False
        Whether the run expects DP sites: then the iteration caps are the ``dp_*`` ones, fixed in advance.
    task_path : str, default ""
        A generic task's task.toml; empty for the built-in nanoparticle task.
    min_nodes : int, default 1
        The site check waits for this many SuperNodes.
    bins : int, default 100
        Histogram bins over each column's declared range (quantiles; DP-safe: one row is in one bin).
    newton_iterations, lloyd_iterations : int, default 25, 100
        Caps without DP (the loops stop earlier on convergence).
    dp_newton_iterations, dp_lloyd_iterations : int, default 5, 5
        Caps with DP: every DP query costs budget, so they are few and announced in advance.
    tolerance : float, default 1e-9
        Newton stops when no standardised coefficient moves more; Lloyd when no centroid does (without DP:
        under DP every announced iteration is asked, so the ε spent is the ε planned).
    analyses : str, default "describe,regression,anova,pca,kmeans"
        The analyses to run (:data:`ANALYSES`, comma-separated); only they are planned, asked and charged.
    secure_sum : str, default "pairwise"
        How the sites' answers are summed (``shared.protocol.hist.SECURE_SUM_MODES``, the run's one secure-sum
        mode): off | pairwise | recovering (``server.analytics_phase.SecureGridAsker``).
    secure_threshold : int, default 0
        Recovering: the Shamir threshold (0: ⌊n/2⌋ + 1 of the sites).
    """

    k: int = 3
    seed: int = 0
    dp: bool = False
    task_path: str = ""
    min_nodes: int = 1
    bins: int = HISTOGRAM_BINS
    newton_iterations: int = 25
    lloyd_iterations: int = 100
    dp_newton_iterations: int = 5
    dp_lloyd_iterations: int = 5
    tolerance: float = 1e-9
    analyses: str = ",".join(ANALYSES)
    secure_sum: str = "pairwise"
    secure_threshold: int = 0

    def __post_init__(self) -> None:
        chosen_analyses(self.analyses)  # an unknown name fails here, naming the allowed ones
        object.__setattr__(self, "secure_sum", secure_sum_mode(self.secure_sum))

    @property
    def chosen(self) -> tuple[str, ...]:
        """The analyses this run asks for (``pca`` with ``kmeans``)."""
        return chosen_analyses(self.analyses)

    @classmethod
    def from_run_config(cls, run_config: dict) -> AnalyticsSettings:
        """Settings from a Flower run config (hyphenated keys), defaults for the rest."""
        return settings_from_run_config(cls, run_config)

    def task(self) -> TaskSpec:
        """The task whose columns are analysed."""
        return TaskSpec.from_toml(self.task_path) if self.task_path else NANOPARTICLE_TASK

    @property
    def max_newton(self) -> int:
        """Newton iterations the run may ask for."""
        return self.dp_newton_iterations if self.dp else self.newton_iterations

    @property
    def max_lloyd(self) -> int:
        """Lloyd iterations the run may ask for."""
        return self.dp_lloyd_iterations if self.dp else self.lloyd_iterations


@dataclass(frozen=True)
class AnalyticsPlan:
    """Which columns each analysis uses, their declared ranges, and what is skipped and why."""

    columns: tuple[str, ...]
    bounds: dict[str, tuple[float, float]]
    covariates: tuple[str, ...] = ()
    linear: tuple[str, ...] = ()
    logistic: tuple[str, ...] = ()
    anova: tuple[str, str] | None = None
    features: tuple[str, ...] = ()
    profile_outcomes: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    integers: frozenset[str] = frozenset()
    """Columns holding whole numbers (counts, scores, 0/1): their quantiles are whole numbers too."""

    def queries(self, settings: AnalyticsSettings) -> int:
        """How many queries the run asks at most (what a DP site calibrates its σ for)."""
        return sum(self.queries_by_analysis(settings).values())

    def queries_by_analysis(self, settings: AnalyticsSettings) -> dict[str, int]:
        """Queries each chosen analysis asks at most (under DP: exactly); unchosen ones ask none."""
        chosen = settings.chosen
        regression = ((1 if self.linear and self.covariates else 0)
                      + (settings.max_newton if self.logistic and self.covariates else 0))
        counts = {"describe": 1, "regression": regression, "anova": 1 if self.anova else 0,
                  "pca": 1 if self.features else 0, "kmeans": 1 + settings.max_lloyd if self.features else 0}
        return {name: counts[name] for name in ANALYSES if name in chosen}

    def schedule(self, settings: AnalyticsSettings) -> ReleaseSchedule:
        """The run's planned queries as release indices and weights (:class:`ReleaseSchedule`)."""
        return ReleaseSchedule.of(self.queries_by_analysis(settings))

    def range_of(self, column: str) -> tuple[float, float]:
        """The declared range, (nan, nan) when none."""
        return self.bounds.get(column, (math.nan, math.nan))

    def bounds_array(self, columns: Sequence[str]) -> np.ndarray:
        """(p, 2) ranges of ``columns`` (NaN where none is declared)."""
        return np.array([self.range_of(c) for c in columns], dtype=np.float64).reshape(-1, 2)


def plan_for(task: TaskSpec, dp: bool) -> AnalyticsPlan:
    """The analyses of ``task``: the seed's for the built-in task, their closest analogue for a generic one.

    Under DP, columns without a declared range are dropped (their sensitivity is unbounded) and named in
    ``notes``; an analysis whose outcome has no range is skipped.
    """
    plan = _nanoparticle_plan() if task == NANOPARTICLE_TASK else _generic_plan(task)
    return _bounded(plan) if dp else plan


def _nanoparticle_plan() -> AnalyticsPlan:
    """The seed's analyses on the built-in schema (ranges from ``shared.schema``)."""
    return AnalyticsPlan(
        columns=tuple(NANOPARTICLE_TASK.numeric) + ("efficacy_pct", "response", "toxicity_grade3"),
        bounds=schema_bounds(), covariates=REGRESSION_COVARIATES, linear=LINEAR_OUTCOMES,
        logistic=LOGISTIC_OUTCOMES, anova=(ANOVA_RESPONSE, ANOVA_FACTOR), features=KMEANS_FEATURES,
        profile_outcomes=PROFILE_OUTCOMES,
        integers=frozenset(c.name for c in EPISODE_COLUMNS if c.dtype in ("int", "bool")),
        notes=(f"regression covariates: {', '.join(REGRESSION_COVARIATES)}; complete-case rows per outcome",
               f"outcomes: {', '.join(OUTCOMES)}"))


def _generic_plan(task: TaskSpec) -> AnalyticsPlan:
    """The closest analogue for a task spec: its numeric features, its target, its first category."""
    outcome = task.outcomes[0]
    numeric = tuple(task.numeric)
    bounds = {name: (float(lo), float(hi)) for name, (lo, hi) in task.ranges.items()}
    skipped, notes = {}, ["generic task: all rows of each site's table, complete cases per analysis"]
    regression = outcome.kind == "regression"
    if outcome.kind == "binary":
        bounds.setdefault(outcome.name, (0.0, 1.0))
    if not regression:
        skipped["linear"] = f"target {outcome.name!r} is {outcome.kind}, not a regression target"
    if outcome.kind != "binary":
        skipped["logistic"] = (f"target {outcome.name!r} is {outcome.kind}; logistic regression needs a binary "
                               "0/1 target (multinomial regression is not implemented)")
    if not numeric:
        skipped.update(linear="no numeric covariates", logistic="no numeric covariates",
                       kmeans="no numeric features", pca="no numeric features")
    anova = None
    if task.categorical and (regression or numeric):
        anova = (outcome.name if regression else numeric[0], task.categorical[0])
    elif not regression and numeric:
        anova = (numeric[0], outcome.name)
    else:
        skipped["anova"] = "no grouping column (categorical feature or class target) with a numeric response"
    return AnalyticsPlan(
        columns=numeric + ((outcome.name,) if regression else ()), bounds=bounds,
        covariates=numeric, linear=(outcome.name,) if regression and numeric else (),
        logistic=(outcome.name,) if outcome.kind == "binary" and numeric else (), anova=anova,
        features=numeric, profile_outcomes=(outcome.name,) if regression else (),
        skipped=skipped, notes=tuple(notes))


def _bounded(plan: AnalyticsPlan) -> AnalyticsPlan:
    """The plan without the columns that have no declared range (DP needs a bound per row)."""
    def has(column: str) -> bool:
        """Whether the column has a finite declared range."""
        return all(math.isfinite(v) for v in plan.range_of(column))

    dropped = sorted({c for c in plan.columns + plan.covariates + plan.features + plan.profile_outcomes
                      if not has(c)})
    skipped = dict(plan.skipped)
    linear = tuple(o for o in plan.linear if has(o))
    if len(linear) < len(plan.linear):
        skipped["linear"] = "under DP the outcome needs a declared range"
    anova = plan.anova if plan.anova is None or has(plan.anova[0]) else None
    if plan.anova is not None and anova is None:
        skipped["anova"] = f"under DP the response {plan.anova[0]!r} needs a declared range"
    notes = plan.notes + ((f"left out under DP, no declared range: {', '.join(dropped)}",) if dropped else ())
    return AnalyticsPlan(
        columns=tuple(c for c in plan.columns if has(c)), bounds=plan.bounds,
        covariates=tuple(c for c in plan.covariates if has(c)), linear=linear, logistic=plan.logistic,
        anova=anova, features=tuple(c for c in plan.features if has(c)),
        profile_outcomes=tuple(c for c in plan.profile_outcomes if has(c)), skipped=skipped, notes=notes,
        integers=plan.integers)
