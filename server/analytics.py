"""The coordinator's side of federated analytics: ask sites for aggregates, combine them into the seed's tables.

The phases, each a few ``grid.send_and_receive`` rounds of ``query.analytics_*`` messages answered by
``client.analytics`` (sites send sums, never rows):

1. **describe** — count, mean, sd (sample, ``n − 1``), min, max of each numeric column; site moments merged
   with the pairwise update of Chan, Golub & LeVeque (1979), STAN-CS-79-773 (``shared.encoding.Moments``).
   Quantiles (1, 25, 50, 75, 99 %) are interpolated in the summed histogram on the fixed grid of the
   column's declared range (100 bins), so their resolution is one bin (whole-number columns: the whole
   number in the bin; without DP: also clipped to [min, max]). Under DP the min and max are not
   released (each is one patient's value): ``min``/``max`` are null and the DP quantiles stand in.
2. **regression** — linear (efficacy) from the summed sufficient statistics ``XᵀX, Xᵀy, yᵀy, n`` (Karr, Lin,
   Sanil & Reiter 2005, "Secure regression on distributed databases", JCGS 14(2)); logistic (response,
   grade ≥ 3 toxicity) by Newton–Raphson, the server sending β and the sites returning gradient and Hessian
   sums each iteration. Covariates are standardised with the federated mean and sd for conditioning;
   coefficients, standard errors (``σ²(XᵀX)⁻¹`` resp. the inverse Hessian), t / z statistics and p-values
   (scipy.stats) are reported on the ORIGINAL scale of each covariate (an exact linear map). Complete-case
   rows per outcome; a covariate that is an exact linear combination of earlier ones (e.g. two formulation
   properties that only a few formulations span) is reported as aliased (null), as R's ``lm`` does.
3. **anova** — one-way ANOVA of efficacy across formulations from per-site group counts, sums and sums of
   squares: F = (SSB / (k − 1)) / (SSW / (N − k)), p = ``scipy.stats.f.sf``.
4. **pca** — the correlation matrix of the k-means features (complete cases) from summed ``Σz`` and ``Σzzᵀ``;
   eigenvalues, explained-variance ratios, loadings.
5. **kmeans** — features standardised with the federated complete-case mean and sd; initial centroids from
   aggregates only: ``k`` points equally spaced (phase drawn from ``seed``) on the one-sd ellipse of the
   first two principal components, i.e. the global mean ± one sd along the top components (for k = 2:
   mean ± 1 sd along PC1). No site is asked for a row. Lloyd (1982) iterations with per-cluster counts and
   sums from each site until no centroid moves more than ``tolerance`` (or the iteration cap); then cluster
   profiles like the seed's Table 3, the inertia and the simplified silhouette (Rousseeuw 1987 with
   centroid distances: Hruschka et al. 2004), and a 2-D histogram of the projected rows for the plot.

Differential privacy is the sites' decision (``client.analytics``). The run announces how many queries it
will ask (so a DP site can calibrate σ for all of them at its δ and refuse a run it cannot finish) and the
ε it asks them to spend; under DP the iteration caps are small and fixed in advance. Everything the server
does with noisy sums is post-processing (free of privacy cost): after a DP describe, later queries clip each
continuous column to a DP estimate of where its values lie instead of the schema's wide limits
(``dp_analysis_bounds``); counts below 1 are treated as 1, variances below 0 as 0; Gram and Hessian
matrices get an eigenvalue floor of the noise's size (a ridge); rates and means are clipped to their range;
histogram cells within the noise are read as empty. Standard errors and p-values under DP do not include
the DP noise. A site that fails or refuses a query is left out of the rest of the
run and named in ``failures``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from scipy import stats as scipy_stats

from shared.config import settings_from_run_config
from shared.encoding import Moments
from shared.schema import EPISODE_COLUMNS, OUTCOMES
from shared.task import NANOPARTICLE_TASK, TaskSpec

DESCRIBE = "analytics_describe"
LINEAR = "analytics_linear"
LOGISTIC = "analytics_logistic"
ANOVA = "analytics_anova"
PCA = "analytics_pca"
LLOYD = "analytics_lloyd"
PROFILES = "analytics_profiles"
"""Query names; the message type is ``query.<name>`` (the site registers them in ``client.analytics``)."""

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

QUANTILE_LEVELS = (0.01, 0.25, 0.5, 0.75, 0.99)
HISTOGRAM_BINS = 100
PROJECTION_BINS = 30
PROJECTION_LIMIT_SD = 4.0
"""The plot's grid spans ± this many sd of each principal-component score (rows beyond go to the edge)."""
DP_NOISE_THRESHOLD = 3.0
"""Under DP, a histogram cell below this many noise sds is read as empty (else the noise in the many empty
cells adds spurious mass to the tails)."""
DP_CLIP_SD = 4.0
"""Under DP, queries after describe clip each continuous column to its DP 1st-99th percentiles and DP mean ±
this many DP sds (``dp_analysis_bounds``), within the declared range: post-processing of the describe release
that shrinks each row's bound, hence the noise, by up to an order of magnitude (the schema's ranges are
physiological limits, often tens of sds wide), at the cost of winsorising far tails."""
DP_MASS_KEPT = 0.5
"""Under DP, quantiles come from the histogram with sub-threshold cells dropped when that keeps at least this
share of the noisy total (a concentrated column); otherwise from the running sum of all noisy cells."""
SITE_MIN_CELL_COUNT = 5
"""Sites send plot cells under this many rows as 0; must match ``client.analytics.MIN_CELL_COUNT`` (the server
does not import the client package)."""
MOMENT_KEYS = ("count", "sum", "sumsq", "raw-sum", "m2")
"""What a site sends per column or group: shifted sums (always) and exact moments (without DP only)."""
MAX_LOG_ODDS = 700.0
"""exp() of a larger log-odds overflows float64; such an odds ratio is reported as null."""
ALIAS_TOLERANCE = 1e-9
"""A covariate whose residual sum of squares on the earlier ones is below this share of its own is aliased."""


class NoAnswers(RuntimeError):
    """No site answered a query: the analysis cannot be computed."""


# ---------------------------------------------------------------------------------------------------------
# Settings and plan


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
    epsilon : float, default 1.0
        ε each DP site is asked to spend on the whole run (all its queries together).
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
        Newton stops when no standardised coefficient moves more; Lloyd when no centroid does.
    """

    k: int = 3
    seed: int = 0
    dp: bool = False
    epsilon: float = 1.0
    task_path: str = ""
    min_nodes: int = 1
    bins: int = HISTOGRAM_BINS
    newton_iterations: int = 25
    lloyd_iterations: int = 100
    dp_newton_iterations: int = 5
    dp_lloyd_iterations: int = 5
    tolerance: float = 1e-9

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
        count = 1
        count += 1 if self.linear and self.covariates else 0
        count += settings.max_newton if self.logistic and self.covariates else 0
        count += 1 if self.anova else 0
        count += 2 + settings.max_lloyd if self.features else 0
        return count

    def range_of(self, column: str) -> tuple[float, float]:
        """The declared range, (nan, nan) when none."""
        return self.bounds.get(column, (math.nan, math.nan))

    def bounds_array(self, columns: Sequence[str]) -> np.ndarray:
        """(p, 2) ranges of ``columns`` (NaN where none is declared)."""
        return np.array([self.range_of(c) for c in columns], dtype=np.float64).reshape(-1, 2)


def schema_bounds() -> dict[str, tuple[float, float]]:
    """Declared ranges of the built-in schema's numeric columns (0/1 for bool columns)."""
    bounds = {}
    for column in EPISODE_COLUMNS:
        if column.dtype == "bool":
            bounds[column.name] = (0.0, 1.0)
        elif column.is_numeric and column.low is not None and column.high is not None:
            bounds[column.name] = (float(column.low), float(column.high))
    return bounds


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


# ---------------------------------------------------------------------------------------------------------
# Asking the sites


@dataclass
class SiteAnswer:
    """One site's reply: released arrays, public labels, and its privacy facts (``dp``, ``sigma``, ε spent)."""

    site: str
    arrays: dict[str, np.ndarray]
    labels: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dp(self) -> bool:
        """Whether the site noised this answer."""
        return bool(self.meta.get("dp", False))

    @property
    def noise_sd(self) -> float:
        """Sd of the noise the site added to an entry of scale 1 (0 without DP)."""
        return float(self.meta.get("noise-sd", 0.0)) if self.dp else 0.0


Asker = Callable[[str, dict[str, Any], dict[str, np.ndarray], Sequence[Hashable]], dict[Hashable, "SiteAnswer | str"]]
"""``asker(query, config, arrays, sites) -> {site id: SiteAnswer or the reason it failed}``."""


class GridAsker:
    """Asks Flower nodes through the Grid: one ``query.<name>`` message per node, replies by node id."""

    def __init__(self, grid: Grid, timeout: float | None = None):
        """Keep the arguments (see the class docstring)."""
        self.grid = grid
        self.timeout = timeout

    def __call__(self, query: str, config: dict[str, Any], arrays: dict[str, np.ndarray],
                 sites: Sequence[Hashable]) -> dict[Hashable, SiteAnswer | str]:
        """Send the request to every node in ``sites``; a missing reply counts as a failure."""
        content = RecordDict({
            "config": ConfigRecord(config),
            "arrays": ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v, dtype=np.float64))
                                              for k, v in arrays.items()})})
        messages = [Message(content, dst_node_id=int(n), message_type=f"query.{query}") for n in sites]
        out: dict[Hashable, SiteAnswer | str] = {n: "no reply" for n in sites}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                out[node] = reply.error.reason
                continue
            meta = dict(reply.content["meta"])
            out[node] = SiteAnswer(str(meta.get("site-name", node)),
                                   {k: v.numpy() for k, v in reply.content["release"].items()},
                                   {k: [str(x) for x in v] for k, v in reply.content["labels"].items()}, meta)
        return out


class AnalyticsSession:
    """The run's conversation with the sites: numbers the queries, announces the DP plan, drops failing sites.

    Parameters
    ----------
    asker : Asker
        How to reach the sites (``GridAsker`` under Flower, an in-process asker in tests and benchmarks).
    sites : sequence of hashable
        Site (node) ids to ask.
    planned_queries : int
        ``AnalyticsPlan.queries``: sent to every site as ``dp-queries``.
    epsilon : float
        ε a DP site is asked to spend on the whole run (``dp-epsilon``).
    names : dict, optional
        Display names of the site ids (for failures before any answer).
    """

    def __init__(self, asker: Asker, sites: Sequence[Hashable], planned_queries: int, epsilon: float,
                 names: dict[Hashable, str] | None = None):
        """Keep the arguments (see the class docstring)."""
        self.asker = asker
        self.sites = list(sites)
        self.planned_queries = int(planned_queries)
        self.epsilon = float(epsilon)
        self.names = dict(names or {})
        self.asked = 0
        self.failures: dict[str, dict[str, str]] = {}
        self.privacy: dict[str, dict[str, Any]] = {}
        self.timing: dict[str, dict[str, float]] = {}

    def ask(self, query: str, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[SiteAnswer]:
        """Ask every remaining site; returns the answers, raises :class:`NoAnswers` if none came."""
        if not self.sites:
            raise NoAnswers(f"{query}: no site left to ask")
        request = {**config, "query-index": self.asked, "dp-queries": max(self.planned_queries, self.asked + 1),
                   "dp-epsilon": self.epsilon}
        self.asked += 1
        start = time.perf_counter()
        replies = self.asker(query, request, arrays, self.sites)
        clock = self.timing.setdefault(query, {"queries": 0, "seconds": 0.0})
        clock["queries"] += 1
        clock["seconds"] += time.perf_counter() - start
        answers = []
        for site in list(self.sites):
            reply = replies.get(site, "no reply")
            if isinstance(reply, str):
                name = self.names.get(site, str(site))
                self.failures.setdefault(query, {})[name] = reply
                self.sites.remove(site)
                log(INFO, "analytics: %s left out after %s: %s", name, query, reply)
                continue
            self.names[site] = reply.site
            self.privacy[reply.site] = {k: v for k, v in reply.meta.items() if k != "site-name"}
            answers.append(reply)
        if not answers:
            reasons = "; ".join(f"{s}: {r}" for s, r in self.failures.get(query, {}).items())
            raise NoAnswers(f"no site answered {query} ({reasons or 'no site'})")
        return answers


# ---------------------------------------------------------------------------------------------------------
# Small numerical helpers (pure)


def unpack_triu(packed: np.ndarray, d: int) -> np.ndarray:
    """The symmetric (d, d) matrix whose upper triangle (row by row) is ``packed``."""
    out = np.zeros((d, d))
    out[np.triu_indices(d)] = np.asarray(packed, dtype=np.float64).ravel()
    return out + np.triu(out, 1).T


def total(answers: Sequence[SiteAnswer], key: str) -> np.ndarray:
    """The sum over sites of one released array."""
    return np.sum([np.asarray(a.arrays[key], dtype=np.float64) for a in answers], axis=0)


def any_dp(answers: Sequence[SiteAnswer]) -> bool:
    """Whether any of the answers was noised."""
    return any(a.dp for a in answers)


def summed_noise_sd(answers: Sequence[SiteAnswer]) -> float:
    """Sd of the noise on a summed entry of scale 1 (independent noise per site)."""
    return math.sqrt(sum(a.noise_sd ** 2 for a in answers))


def denoised_counts(counts: np.ndarray, noise_sd: float) -> np.ndarray:
    """Noisy counts with cells below ``DP_NOISE_THRESHOLD`` noise sds read as 0 (counts unchanged without noise)."""
    counts = np.asarray(counts, dtype=np.float64)
    if noise_sd <= 0:
        return counts
    return np.where(counts < DP_NOISE_THRESHOLD * noise_sd, 0.0, counts)


def floored_inverse(matrix: np.ndarray, floor: float) -> np.ndarray:
    """Inverse of a symmetric matrix with its eigenvalues raised to at least ``floor`` (and to 1e-12 × the
    largest if some are not positive, so a matrix that rounding left slightly indefinite still inverts)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    top = max(float(values.max()) if values.size else 0.0, 1e-300)
    if floor > 0 or values.min() <= 0:
        values = np.maximum(values, max(floor, 1e-12 * top))
    return (vectors / values) @ vectors.T


def row_bound(x: dict[str, np.ndarray]) -> np.ndarray:
    """Largest ``|z|`` of a clipped standardised value per column (what the sites' ``Standardiser.bound``
    gives; +inf without a range)."""
    bounds = x["bounds"]
    reach = np.maximum(np.abs(bounds[:, 0] - x["centre"]), np.abs(bounds[:, 1] - x["centre"])) / x["scale"]
    return np.where(np.isfinite(bounds).all(axis=1), reach, np.inf)


def noisy_gram_inverse(matrix: np.ndarray, bound: np.ndarray, factor: float, noise: float) -> np.ndarray:
    """Inverse of a Gram-type matrix ``Σ w [1, z][1, z]ᵀ`` (``0 ≤ w ≤ factor``, ``|z_j| ≤ bound_j``) that
    carries DP noise of sd ``noise × factor × b_j b_l`` on entry (j, l), with ``b = [1, bound]``.

    In the whitened coordinates ``G / (√factor b)(√factor b)ᵀ`` the noise has sd ``noise`` on every entry and
    spectral norm about ``2 √d · noise`` (a d × d symmetric Gaussian matrix); eigenvalues there are raised to
    that floor, so a least-squares or Newton step does not follow the noise along weakly identified
    directions (a ridge of the noise's own size and shape). ``noise = 0``: the plain inverse.
    """
    if noise <= 0:
        return floored_inverse(matrix, 0.0)
    scale = np.maximum(math.sqrt(factor) * np.concatenate([[1.0], np.asarray(bound, dtype=np.float64)]), 1e-12)
    outer = np.outer(scale, scale)
    return floored_inverse(matrix / outer, 2.0 * math.sqrt(len(scale)) * noise) / outer


def independent_columns(gram: np.ndarray, tolerance: float = ALIAS_TOLERANCE) -> list[int]:
    """Indices of the columns of a Gram matrix that are not linear combinations of earlier ones (column 0,
    the intercept, always kept): the pivots R's ``lm`` keeps."""
    kept = [0]
    for j in range(1, gram.shape[0]):
        if gram[j, j] <= 0:
            continue
        cross = gram[np.ix_(kept, [j])]
        residual = gram[j, j] - float((cross.T @ np.linalg.solve(gram[np.ix_(kept, kept)], cross))[0, 0])
        if residual > tolerance * gram[j, j]:
            kept.append(j)
    return kept


def design_map(centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``M`` with ``[1, (x − centre)/scale] = M [1, x]``: coefficients on the standardised design ``β'`` are
    ``Mᵀβ'`` on the original scale, and their covariance ``Mᵀ C M``."""
    d = len(centre) + 1
    m = np.eye(d)
    m[1:, 0] = -np.asarray(centre) / np.asarray(scale)
    m[1:, 1:] = np.diag(1.0 / np.asarray(scale))
    return m


def coefficient_table(names: Sequence[str], estimate: np.ndarray, covariance: np.ndarray, kept: Sequence[int],
                      df: float | None) -> dict[str, dict[str, float | None]]:
    """Per term: estimate, standard error, statistic and two-sided p-value (t with ``df``, else normal);
    aliased terms (not in ``kept``) are null."""
    table = {}
    for j, name in enumerate(["intercept", *names]):
        if j not in kept:
            table[name] = {"estimate": None, "se": None, "statistic": None, "p": None, "aliased": True}
            continue
        se = math.sqrt(covariance[j, j]) if covariance[j, j] > 0 else math.nan
        statistic = estimate[j] / se if se > 0 else math.nan
        if df is None:
            p = 2 * scipy_stats.norm.sf(abs(statistic))
        else:
            p = 2 * scipy_stats.t.sf(abs(statistic), df) if df > 0 else math.nan
        table[name] = {"estimate": float(estimate[j]), "se": se, "statistic": statistic, "p": float(p),
                       "aliased": False}
    return table


def histogram_quantiles(counts: np.ndarray, low: float, high: float,
                        levels: Sequence[float] = QUANTILE_LEVELS) -> dict[str, float] | None:
    """Quantiles interpolated linearly within the bins of a histogram on ``[low, high]`` (negative counts read
    as 0); None when the histogram is empty."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    if counts.sum() <= 0:
        return None
    return cdf_quantiles(np.cumsum(counts) / counts.sum(), low, high, levels)


def noisy_histogram_quantiles(counts: np.ndarray, noise_sd: float, low: float, high: float,
                              levels: Sequence[float] = QUANTILE_LEVELS) -> dict[str, float] | None:
    """Quantiles of a DP-noised histogram: from the cells above ``DP_NOISE_THRESHOLD`` noise sds if they hold
    at least ``DP_MASS_KEPT`` of the noisy total (few, full cells), else from the running sum of all noisy
    cells made monotone (the noise is zero-mean, so it does not pile up in the tails)."""
    counts = np.asarray(counts, dtype=np.float64)
    kept = denoised_counts(counts, noise_sd)
    if kept.sum() >= DP_MASS_KEPT * counts.sum():
        return histogram_quantiles(kept, low, high, levels)
    running = np.maximum.accumulate(np.maximum(np.cumsum(counts), 0.0))
    if running[-1] <= 0:
        return None
    return cdf_quantiles(running / running[-1], low, high, levels)


def cdf_quantiles(cdf: np.ndarray, low: float, high: float, levels: Sequence[float]) -> dict[str, float]:
    """Quantiles from a binned CDF on ``[low, high]``, linear within a bin: ``{"p01": ..., "p50": ...}``."""
    edges = np.linspace(low, high, len(cdf) + 1)
    out = {}
    for level in levels:
        i = min(int(np.searchsorted(cdf, level, side="left")), len(cdf) - 1)
        before = cdf[i - 1] if i > 0 else 0.0
        share = (level - before) / (cdf[i] - before) if cdf[i] > before else 0.0
        out[f"p{round(level * 100):02d}"] = float(edges[i] + share * (edges[i + 1] - edges[i]))
    return out


def snap_to_integers(quantiles: dict[str, float], low: float, high: float, bins: int) -> dict[str, float]:
    """Quantiles of a whole-number column: the whole number in each quantile's bin (bins narrower than 1
    hold at most one), instead of a point interpolated inside the bin; unchanged for wider bins."""
    width = (high - low) / bins
    if width >= 1:
        return quantiles
    snapped = {}
    for name, value in quantiles.items():
        i = min(int((value - low) / width), bins - 1)
        snapped[name] = float(round(low + (i + 0.5) * width))
    return snapped


@dataclass(frozen=True)
class ColumnMoments:
    """Combined count, mean and centred sum of squares (M2) of one column or group."""

    count: float
    mean: float
    m2: float

    @property
    def sd(self) -> float:
        """Sample standard deviation (``n − 1``); NaN below two values."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else math.nan


def combine_moments(parts: Sequence[dict[str, float]], centre: float, bounds: tuple[float, float]) -> ColumnMoments:
    """Merge per-site moments of one column or group.

    Each part has ``count``, ``sum`` and ``sumsq`` (about ``centre``) and, from a site without DP, the exact
    ``raw-sum`` and ``m2``. All exact: Chan et al. (1979) pairwise merge, as pooled. Otherwise the shifted
    sums are added (exact parts converted exactly) and the result post-processed: count ≥ 1, M2 ≥ 0, mean
    clipped to ``bounds``.
    """
    if all("m2" in p for p in parts):
        merged = Moments()
        for p in parts:
            merged = merged + Moments(int(round(p["count"])), p["raw-sum"], p["m2"])
        return ColumnMoments(float(merged.count), merged.mean if merged.count else math.nan, merged.m2)
    n = s1 = s2 = 0.0
    for p in parts:
        if "m2" in p:
            count = p["count"]
            mean = p["raw-sum"] / count if count else 0.0
            n, s1, s2 = n + count, s1 + p["raw-sum"] - count * centre, s2 + p["m2"] + count * (mean - centre) ** 2
        else:
            n, s1, s2 = n + p["count"], s1 + p["sum"], s2 + p["sumsq"]
    n = max(n, 1.0)
    mean = centre + s1 / n
    if all(math.isfinite(b) for b in bounds):
        mean = min(max(mean, bounds[0]), bounds[1])
    return ColumnMoments(n, mean, max(s2 - n * (mean - centre) ** 2, 0.0) if math.isfinite(s2) else math.nan)


def standardisation(describe: dict[str, dict], columns: Sequence[str], plan: AnalyticsPlan) -> dict[str, np.ndarray]:
    """``centre``, ``scale`` and ``bounds`` arrays for ``columns`` from the federated describe: the mean and
    sd where known and positive, else the range midpoint and 1."""
    centre, scale = [], []
    for column in columns:
        stats = describe.get(column, {})
        mean, sd = stats.get("mean"), stats.get("sd")
        low, high = plan.range_of(column)
        fallback = (low + high) / 2 if math.isfinite(low) and math.isfinite(high) else 0.0
        centre.append(mean if mean is not None and math.isfinite(mean) else fallback)
        scale.append(sd if sd is not None and math.isfinite(sd) and sd > 0 else 1.0)
    return {"centre": np.array(centre, dtype=np.float64), "scale": np.array(scale, dtype=np.float64),
            "bounds": plan.bounds_array(columns)}


# ---------------------------------------------------------------------------------------------------------
# 1. describe


def combine_describe(answers: Sequence[SiteAnswer], columns: Sequence[str], plan: AnalyticsPlan,
                     bins: int) -> dict[str, dict[str, Any]]:
    """Per column: count, mean, sd (n − 1), min, max (null under DP) and histogram quantiles."""
    bounds = plan.bounds_array(columns)
    centres = np.where(np.isfinite(bounds).all(axis=1), bounds.mean(axis=1), 0.0)
    histogram = total(answers, "histogram").reshape(len(columns), bins)
    noise_sd = summed_noise_sd(answers)
    dp = any_dp(answers)
    out = {}
    for j, column in enumerate(columns):
        parts = [{key: float(np.asarray(a.arrays[key]).ravel()[j]) for key in MOMENT_KEYS if key in a.arrays}
                 for a in answers]
        moments = combine_moments(parts, float(centres[j]), tuple(bounds[j]))
        low, high = bounds[j]
        bounded = bool(np.isfinite(bounds[j]).all())
        quantiles = None
        if bounded:
            quantiles = (noisy_histogram_quantiles(histogram[j], noise_sd, low, high) if dp
                         else histogram_quantiles(histogram[j], low, high))
        if quantiles and column in plan.integers:
            quantiles = snap_to_integers(quantiles, low, high, bins)
        entry = {"count": moments.count if dp else int(moments.count),
                 "mean": moments.mean, "sd": moments.sd, "min": None, "max": None, "quantiles": quantiles, "dp": dp}
        if not dp and moments.count > 0:
            entry["min"] = float(min(np.asarray(a.arrays["min"]).ravel()[j] for a in answers))
            entry["max"] = float(max(np.asarray(a.arrays["max"]).ravel()[j] for a in answers))
            if entry["quantiles"]:
                entry["quantiles"] = {q: min(max(v, entry["min"]), entry["max"]) for q, v in entry["quantiles"].items()}
        out[column] = entry
    return out


def dp_analysis_bounds(plan: AnalyticsPlan, describe: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Ranges for the queries after a DP describe (post-processing of released values: no privacy cost).

    A continuous column is clipped to the union of two DP estimates of where its values lie, each used only
    when it looks sound: its DP 1st-99th percentiles (if they bracket its DP mean) and its DP mean ±
    ``DP_CLIP_SD`` DP sds (if the sd is positive); within its declared range. Whole-number columns, and
    columns with neither estimate, keep their declared range: a wrong narrow range would bias, a wide one
    only adds noise.
    """
    bounds = dict(plan.bounds)
    for column, stats in describe.items():
        low, high = plan.range_of(column)
        if column in plan.integers or not (math.isfinite(low) and math.isfinite(high)):
            continue
        mean, sd, quantiles = stats.get("mean"), stats.get("sd"), stats.get("quantiles")
        if mean is None or not math.isfinite(mean):
            continue
        ranges = []
        if quantiles and quantiles["p01"] <= mean <= quantiles["p99"]:
            ranges.append((quantiles["p01"], quantiles["p99"]))
        if sd is not None and math.isfinite(sd) and sd > 0:
            ranges.append((mean - DP_CLIP_SD * sd, mean + DP_CLIP_SD * sd))
        if not ranges:
            continue
        clip_low = max(low, min(r[0] for r in ranges))
        clip_high = min(high, max(r[1] for r in ranges))
        if clip_high > clip_low:
            bounds[column] = (clip_low, clip_high)
    return bounds


def describe_phase(session: AnalyticsSession, plan: AnalyticsPlan, bins: int) -> dict[str, dict[str, Any]]:
    """Phase 1: the descriptive table of every planned column."""
    columns = list(plan.columns)
    answers = session.ask(DESCRIBE, {"columns": columns, "bins": bins}, {"bounds": plan.bounds_array(columns)})
    return combine_describe(answers, columns, plan, bins)


# ---------------------------------------------------------------------------------------------------------
# 2. regression


def linear_fit(gram: np.ndarray, xty: np.ndarray, yty: float, names: Sequence[str], x: dict[str, np.ndarray],
               y_centre: float, y_scale: float, noise: float = 0.0) -> dict[str, Any]:
    """Ordinary least squares from summed sufficient statistics of the standardised design and outcome,
    reported on the original scale: coefficients, SEs from ``σ²(XᵀX)⁻¹``, t, p, R², F. With DP ``noise``
    (sd per unit of scale, summed over sites) the Gram matrix is inverted by :func:`noisy_gram_inverse` and
    aliasing is not tested (noise hides it)."""
    n = float(gram[0, 0])
    dp = noise > 0
    kept = list(range(gram.shape[0])) if dp else independent_columns(gram)
    bound = np.concatenate([[0.0], row_bound(x)])[kept][1:] if dp else np.zeros(len(kept) - 1)
    inverse = noisy_gram_inverse(gram[np.ix_(kept, kept)], bound, 1.0, noise)
    beta = np.zeros(gram.shape[0])
    beta[kept] = inverse @ xty[kept]
    rss = max(float(yty - beta[kept] @ xty[kept]), 0.0)
    tss = max(float(yty - xty[0] ** 2 / n), 0.0) if n > 0 else math.nan
    df = n - len(kept)
    sigma2 = rss / df if df > 0 else math.nan
    covariance = np.zeros_like(gram)
    covariance[np.ix_(kept, kept)] = sigma2 * inverse
    m = design_map(x["centre"], x["scale"])
    estimate = y_scale * (m.T @ beta)
    estimate[0] += y_centre
    covariance = y_scale ** 2 * (m.T @ covariance @ m)
    r2 = 1 - rss / tss if tss > 0 else math.nan
    q = len(kept) - 1
    f = ((tss - rss) / q) / (rss / df) if q > 0 and df > 0 and rss > 0 else math.nan
    return {"n": n if dp else int(round(n)), "df_residual": df,
            "sigma": y_scale * math.sqrt(sigma2) if df > 0 else None, "r2": r2,
            "adj_r2": 1 - (1 - r2) * (n - 1) / df if df > 0 else None, "f": f,
            "f_p": float(scipy_stats.f.sf(f, q, df)) if math.isfinite(f) else None,
            "coefficients": coefficient_table(names, estimate, covariance, kept, df), "dp": dp,
            "scale": "original units of each covariate and of the outcome"}


def linear_phase(session: AnalyticsSession, plan: AnalyticsPlan, describe: dict) -> dict[str, Any]:
    """Linear regression of each planned outcome on the covariates, one query (Karr et al. 2005)."""
    covariates, outcomes = list(plan.covariates), list(plan.linear)
    x = standardisation(describe, covariates, plan)
    y = standardisation(describe, outcomes, plan)
    arrays = {k: np.concatenate([x[k], y[k]]) for k in ("centre", "scale", "bounds")}
    answers = session.ask(LINEAR, {"covariates": covariates, "outcomes": outcomes}, arrays)
    d = len(covariates) + 1
    out = {}
    for j, outcome in enumerate(outcomes):
        gram = unpack_triu(total(answers, f"{outcome}/gram"), d)
        out[outcome] = linear_fit(gram, total(answers, f"{outcome}/xty"), float(total(answers, f"{outcome}/yty")[0]),
                                  covariates, x, float(y["centre"][j]), float(y["scale"][j]),
                                  summed_noise_sd(answers))
        out[outcome]["sites"] = [a.site for a in answers]
    return out


def logistic_phase(session: AnalyticsSession, plan: AnalyticsPlan, describe: dict,
                   settings: AnalyticsSettings) -> dict[str, Any]:
    """Logistic regression of each planned 0/1 outcome by federated Newton–Raphson from β = 0.

    Each iteration the server sends β (standardised scale) and sums the sites' gradients and Hessians;
    an outcome stops when no coefficient moves more than ``settings.tolerance``. Standard errors come from
    the inverse of the last Hessian (at the β before the last, tiny, step); p-values from the normal (Wald).
    """
    covariates = list(plan.covariates)
    x = standardisation(describe, covariates, plan)
    d = len(covariates) + 1
    state = {o: {"beta": np.zeros(d), "kept": None, "converged": False, "iterations": 0} for o in plan.logistic}
    for _ in range(settings.max_newton):
        active = [o for o, s in state.items() if not s["converged"]]
        if not active:
            break
        arrays = dict(x) | {f"beta/{o}": state[o]["beta"] for o in active}
        answers = session.ask(LOGISTIC, {"covariates": covariates, "outcomes": active}, arrays)
        dp = any_dp(answers)
        for o in active:
            s = state[o]
            hessian = unpack_triu(total(answers, f"{o}/hessian"), d)
            gradient = total(answers, f"{o}/gradient")
            if s["kept"] is None:
                s["kept"] = list(range(d)) if dp else independent_columns(hessian)
            kept = s["kept"]
            bound = np.concatenate([[0.0], row_bound(x)])[kept][1:]
            inverse = noisy_gram_inverse(hessian[np.ix_(kept, kept)], bound, 0.25, summed_noise_sd(answers))
            step = inverse @ gradient[kept]
            s["beta"][kept] += step
            s.update(inverse=inverse, n=float(total(answers, f"{o}/count")[0]), dp=dp, iterations=s["iterations"] + 1,
                     loglik=None if dp else float(total(answers, f"{o}/loglik")[0]),
                     sites=[a.site for a in answers])
            s["converged"] = bool(np.max(np.abs(step)) < settings.tolerance)
    m = design_map(x["centre"], x["scale"])
    out = {}
    for o, s in state.items():
        if "inverse" not in s:
            continue
        covariance = np.zeros((d, d))
        covariance[np.ix_(s["kept"], s["kept"])] = s["inverse"]
        estimate = m.T @ s["beta"]
        table = coefficient_table(covariates, estimate, m.T @ covariance @ m, s["kept"], None)
        for row in table.values():
            finite = row["estimate"] is not None and row["estimate"] < MAX_LOG_ODDS
            row["odds_ratio"] = math.exp(row["estimate"]) if finite else None
        out[o] = {"n": s["n"] if s["dp"] else int(round(s["n"])), "iterations": s["iterations"],
                  "converged": s["converged"], "log_likelihood": s["loglik"], "coefficients": table, "dp": s["dp"],
                  "sites": s["sites"], "scale": "original units of each covariate; log-odds",
                  "standard_errors": "inverse Hessian (Wald); z-statistics and normal p-values"}
    return out


# ---------------------------------------------------------------------------------------------------------
# 3. one-way ANOVA


def anova_table(groups: dict[str, ColumnMoments]) -> dict[str, Any]:
    """One-way ANOVA from per-group count, mean and M2: SSB, SSW, F and ``scipy.stats.f.sf`` p-value."""
    groups = {g: m for g, m in groups.items() if m.count >= 1}
    n = sum(m.count for m in groups.values())
    k = len(groups)
    grand = sum(m.count * m.mean for m in groups.values()) / n if n else math.nan
    ssb = sum(m.count * (m.mean - grand) ** 2 for m in groups.values())
    ssw = sum(m.m2 for m in groups.values())
    df_b, df_w = k - 1, n - k
    f = (ssb / df_b) / (ssw / df_w) if df_b > 0 and df_w > 0 and ssw > 0 else math.nan
    return {"groups": {g: {"n": m.count, "mean": m.mean, "sd": m.sd} for g, m in sorted(groups.items())},
            "n": n, "k": k, "ss_between": ssb, "ss_within": ssw, "df_between": df_b, "df_within": df_w,
            "f": f, "p": float(scipy_stats.f.sf(f, df_b, df_w)) if math.isfinite(f) else None,
            "eta_squared": ssb / (ssb + ssw) if ssb + ssw > 0 else None}


def anova_phase(session: AnalyticsSession, plan: AnalyticsPlan) -> dict[str, Any]:
    """Phase 3: one query for per-group moments, merged per group across sites (Chan et al. 1979)."""
    response, factor = plan.anova
    bounds = plan.bounds_array([response])
    answers = session.ask(ANOVA, {"response": response, "factor": factor}, {"bounds": bounds})
    centre = float(bounds[0].mean()) if np.isfinite(bounds).all() else 0.0
    parts: dict[str, list[dict[str, float]]] = {}
    for a in answers:
        for g, label in enumerate(a.labels.get("groups", [])):
            parts.setdefault(label, []).append({key: float(np.asarray(a.arrays[key]).ravel()[g])
                                                for key in MOMENT_KEYS if key in a.arrays})
    groups = {label: combine_moments(p, centre, tuple(bounds[0])) for label, p in parts.items()}
    table = anova_table(groups)
    if any_dp(answers):
        for entry in table["groups"].values():
            entry["n"] = float(entry["n"])
    else:
        table["n"] = int(round(table["n"]))
        for entry in table["groups"].values():
            entry["n"] = int(round(entry["n"]))
    return {"response": response, "factor": factor, **table, "dp": any_dp(answers),
            "sites": [a.site for a in answers]}


# ---------------------------------------------------------------------------------------------------------
# 4-5. PCA and k-means


def correlation_pca(gram: np.ndarray, x: dict[str, np.ndarray], features: Sequence[str]) -> dict[str, Any]:
    """PCA of the correlation matrix from the summed Gram of ``[1, z]`` (z standardised by ``x``); also the
    complete-case mean and sd on the original scale (what k-means standardises with)."""
    n = max(float(gram[0, 0]), 2.0)
    sums, cross = gram[0, 1:], gram[1:, 1:]
    mean_z = sums / n
    covariance = (cross - n * np.outer(mean_z, mean_z)) / (n - 1)
    sd_z = np.sqrt(np.maximum(np.diag(covariance), 1e-12))
    correlation = np.clip(covariance / np.outer(sd_z, sd_z), -1.0, 1.0)
    np.fill_diagonal(correlation, 1.0)
    values, vectors = np.linalg.eigh(correlation)
    order = np.argsort(values)[::-1]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    mean = x["centre"] + x["scale"] * mean_z
    sd = x["scale"] * sd_z
    return {"features": list(features), "n": n, "mean": dict(zip(features, mean.tolist(), strict=True)),
            "sd": dict(zip(features, sd.tolist(), strict=True)), "eigenvalues": values.tolist(),
            "explained_variance_ratio": (values / values.sum()).tolist() if values.sum() > 0 else None,
            "components": vectors.T.tolist(),
            "basis": "correlation matrix of complete-case rows (features standardised by their complete-case "
                     "federated mean and sd); components are rows, sign: largest loading positive"}


def pca_phase(session: AnalyticsSession, plan: AnalyticsPlan, describe: dict) -> dict[str, Any]:
    """Phase 4: one query for ``Σ[1,z][1,z]ᵀ``; returns the PCA."""
    features = list(plan.features)
    x = standardisation(describe, features, plan)
    answers = session.ask(PCA, {"features": features}, x)
    result = correlation_pca(unpack_triu(total(answers, "gram"), len(features) + 1), x, features)
    result.update(dp=any_dp(answers), sites=[a.site for a in answers])
    if not result["dp"]:
        result["n"] = int(round(result["n"]))
    return result


def initial_centroids(eigenvalues: Sequence[float], components: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` standardised initial centroids from the PCA of the federated correlation matrix alone.

    k = 1: the mean (0). One feature: ``k`` points evenly spread over mean ± 1 sd. k = 2: mean ± 1 sd along
    PC1. k ≥ 3: ``k`` points equally spaced in angle, from a phase drawn with ``seed``, on the one-sd ellipse
    of PC1 and PC2 (``cos θ · sd₁ · v₁ + sin θ · sd₂ · v₂``). No row leaves a site.
    """
    components = np.asarray(components, dtype=np.float64)
    sd = np.sqrt(np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0))
    if k == 1:
        return np.zeros((1, components.shape[1]))
    if components.shape[0] < 2:
        return np.outer(np.linspace(-1.0, 1.0, k), sd[0] * components[0])
    if k == 2:
        return np.outer([1.0, -1.0], sd[0] * components[0])
    phase = np.random.default_rng(seed).uniform(0.0, 2 * np.pi / k)
    angles = phase + 2 * np.pi * np.arange(k) / k
    return np.outer(np.cos(angles), sd[0] * components[0]) + np.outer(np.sin(angles), sd[1] * components[1])


def standardised_box(x: dict[str, np.ndarray]) -> np.ndarray:
    """The (p, 2) range of clipped standardised values ``(bounds − centre) / scale`` (±inf without a range)."""
    bounds = x["bounds"]
    low = np.where(np.isnan(bounds[:, 0]), -np.inf, (bounds[:, 0] - x["centre"]) / x["scale"])
    high = np.where(np.isnan(bounds[:, 1]), np.inf, (bounds[:, 1] - x["centre"]) / x["scale"])
    return np.column_stack([low, high])


def lloyd_update(centroids: np.ndarray, counts: np.ndarray, sums: np.ndarray, box: np.ndarray) -> np.ndarray:
    """New centroids: per-cluster mean of the summed sums, kept in the (p, 2) ``box`` of clipped standardised
    values (a no-op without noise); a cluster with (noisy) count below 1 keeps its centroid."""
    new = centroids.copy()
    alive = counts >= 1
    new[alive] = sums[alive] / counts[alive, None]
    return np.clip(new, box[:, 0], box[:, 1])


def kmeans_phase(session: AnalyticsSession, plan: AnalyticsPlan, pca: dict, settings: AnalyticsSettings) -> dict:
    """Phase 5: Lloyd iterations from aggregate-only initial centroids, then profiles and diagnostics."""
    features = list(plan.features)
    x = {"centre": np.array([pca["mean"][f] for f in features]),
         "scale": np.array([pca["sd"][f] if pca["sd"][f] > 0 else 1.0 for f in features]),
         "bounds": plan.bounds_array(features)}
    components = np.array(pca["components"])
    box = standardised_box(x)
    start = initial_centroids(pca["eigenvalues"], components, settings.k, settings.seed)
    centroids, converged, iterations, inertia_history, dp = start.copy(), False, 0, [], False
    for _ in range(settings.max_lloyd):
        answers = session.ask(LLOYD, {"features": features}, x | {"centroids": centroids})
        dp = any_dp(answers)
        counts, sums = total(answers, "count"), total(answers, "sum").reshape(centroids.shape)
        if not dp:
            inertia_history.append(float(total(answers, "inertia")[0]))
        new = lloyd_update(centroids, counts, sums, box)
        iterations += 1
        shift = float(np.max(np.linalg.norm(new - centroids, axis=1)))
        centroids = new
        if shift < settings.tolerance:
            converged = True
            break
    profiles = profiles_phase(session, plan, x, centroids, components, pca["eigenvalues"])
    originals = x["centre"] + x["scale"] * centroids
    return {"k": settings.k, "features": features, "dp": dp or profiles["dp"],
            "standardisation": {"mean": pca["mean"], "sd": pca["sd"]},
            "initialisation": "k points equally spaced (phase from the seed) on the one-sd ellipse of the first "
                              "two principal components of the federated correlation matrix: mean ± sd along "
                              "the top components; computed from aggregates only",
            "initial_centroids_standardised": start.tolist(), "iterations": iterations, "converged": converged,
            "inertia_history": inertia_history, "centroids_standardised": centroids.tolist(),
            "centroids": [dict(zip(features, row.tolist(), strict=True)) for row in originals], **profiles}


def profiles_phase(session: AnalyticsSession, plan: AnalyticsPlan, x: dict[str, np.ndarray], centroids: np.ndarray,
                   components: np.ndarray, eigenvalues: Sequence[float]) -> dict[str, Any]:
    """Cluster profiles (seed's Table 3), inertia, simplified silhouette and the plot's projection histogram."""
    features, outcomes = list(plan.features), list(plan.profile_outcomes)
    top = components[:2] if components.shape[0] >= 2 else np.vstack([components[:1], np.zeros_like(components[:1])])
    spread = np.sqrt(np.maximum(np.asarray(eigenvalues[:2] if len(eigenvalues) >= 2 else [eigenvalues[0], 1.0]),
                                1e-12))
    limits = np.column_stack([-PROJECTION_LIMIT_SD * spread, PROJECTION_LIMIT_SD * spread])
    outcome_bounds = plan.bounds_array(outcomes)
    arrays = x | {"centroids": centroids, "outcome-bounds": outcome_bounds, "components": top.T, "limits": limits}
    answers = session.ask(PROFILES, {"features": features, "outcomes": outcomes, "grid-bins": PROJECTION_BINS},
                          arrays)
    dp = any_dp(answers)
    k, p = centroids.shape
    counts = np.maximum(total(answers, "count"), 0.0)
    sums = total(answers, "sum").reshape(k, p)
    outcome_counts = total(answers, "outcome-count").reshape(k, len(outcomes))
    outcome_sums = total(answers, "outcome-sum").reshape(k, len(outcomes))
    centre = np.where(np.isfinite(outcome_bounds).all(axis=1), outcome_bounds.mean(axis=1), 0.0)
    n = max(float(counts.sum()), 1.0)
    profiles = []
    for c in range(k):
        size = max(counts[c], 1.0)
        row = {"cluster": c, "n": float(counts[c]) if dp else int(round(counts[c])), "share": counts[c] / n,
               "silhouette": float(total(answers, "silhouette")[c] / size) if counts[c] >= 1 else None,
               "means": dict(zip(features, (x["centre"] + x["scale"] * sums[c] / size).tolist(), strict=True)),
               "outcomes": {}}
        for j, outcome in enumerate(outcomes):
            present = outcome_counts[c, j]
            value = centre[j] + outcome_sums[c, j] / present if present >= 1 else math.nan
            if np.isfinite(outcome_bounds[j]).all() and math.isfinite(value):
                value = float(np.clip(value, *outcome_bounds[j]))
            row["outcomes"][outcome] = {"n": float(present) if dp else int(round(present)), "mean": value}
        profiles.append(row)
    projected = (centroids @ top.T).tolist()
    edges = [np.linspace(lo, hi, PROJECTION_BINS + 1).tolist() for lo, hi in limits]
    return {"dp": dp, "n": n if dp else int(round(n)), "inertia": float(total(answers, "inertia").sum()),
            "silhouette_simplified": float(total(answers, "silhouette").sum() / n),
            "silhouette_note": "simplified silhouette: per row (b − a) / max(a, b) with a, b the distances to the "
                               "nearest and second-nearest centroid (Hruschka et al. 2004), averaged",
            "profiles": profiles, "sites": [a.site for a in answers],
            "projection": {"axes": ["PC1", "PC2"], "x_edges": edges[0], "y_edges": edges[1],
                           "counts": np.maximum(denoised_counts(total(answers, "projection"),
                                                                summed_noise_sd(answers)), 0.0).tolist(),
                           "centroids": projected,
                           "note": f"rows projected at each site and counted on a {PROJECTION_BINS}x"
                                   f"{PROJECTION_BINS} grid, summed over sites"
                                   + ("" if dp else f"; cells under {SITE_MIN_CELL_COUNT} rows at a site "
                                                    "are sent as 0")}}


# ---------------------------------------------------------------------------------------------------------
# All phases


def run_analyses(session: AnalyticsSession, plan: AnalyticsPlan, settings: AnalyticsSettings) -> dict[str, Any]:
    """Every planned analysis in order; an analysis no site could answer is recorded as skipped with why."""
    result: dict[str, Any] = {"describe": {}, "regression": {"covariates": list(plan.covariates), "linear": {},
                                                            "logistic": {}},
                              "anova": None, "pca": None, "kmeans": None}
    skipped = dict(plan.skipped)
    try:
        describe = describe_phase(session, plan, settings.bins)
    except NoAnswers as err:
        skipped["describe"] = str(err)
        return _finish(result, session, plan, settings, skipped)
    result["describe"] = describe
    declared = plan
    if any(s.get("dp") for s in describe.values()):
        plan = replace(plan, bounds=dp_analysis_bounds(plan, describe))
        result["analysis_bounds"] = {c: list(plan.range_of(c)) for c in plan.columns}
        if not settings.dp:
            settings = replace(settings, newton_iterations=settings.dp_newton_iterations,
                               lloyd_iterations=settings.dp_lloyd_iterations)
            result["dp_note"] = ("a site answered with DP though the run was not started for DP: the rest of the "
                                 "run used the DP iteration caps; that site's σ was calibrated for the "
                                 f"{session.planned_queries} queries announced, so it spent only part of its ε")
    if plan.linear and plan.covariates:
        result["regression"]["linear"] = _attempt(lambda: linear_phase(session, plan, describe), "linear", skipped)
    if plan.logistic and plan.covariates:
        result["regression"]["logistic"] = _attempt(lambda: logistic_phase(session, plan, describe, settings),
                                                    "logistic", skipped)
    if plan.anova:
        result["anova"] = _attempt(lambda: anova_phase(session, plan), "anova", skipped)
    if plan.features:
        pca = _attempt(lambda: pca_phase(session, plan, describe), "pca", skipped)
        result["pca"] = pca
        if pca is not None:
            result["kmeans"] = _attempt(lambda: kmeans_phase(session, plan, pca, settings), "kmeans", skipped)
    return _finish(result, session, declared, settings, skipped)


def _attempt(phase: Callable[[], Any], name: str, skipped: dict[str, str]) -> Any:
    """Run one analysis; if it cannot be computed, say why in ``skipped`` and go on with the others."""
    try:
        return phase()
    except (NoAnswers, np.linalg.LinAlgError, ValueError, ZeroDivisionError) as err:
        log(INFO, "analytics: %s skipped: %s", name, err)
        skipped[name] = f"{type(err).__name__}: {err}"
        return None


def _finish(result: dict, session: AnalyticsSession, plan: AnalyticsPlan, settings: AnalyticsSettings,
            skipped: dict[str, str]) -> dict[str, Any]:
    """The JSON-safe result: analyses plus what was skipped, failures, privacy, queries, timing, plan."""
    result.update({
        "skipped": skipped, "notes": list(plan.notes), "failures": session.failures, "privacy": session.privacy,
        "queries": {"planned": session.planned_queries, "asked": session.asked},
        "timing": session.timing,
        "settings": asdict(settings),
        "plan": {"columns": list(plan.columns), "covariates": list(plan.covariates), "linear": list(plan.linear),
                 "logistic": list(plan.logistic), "anova": list(plan.anova) if plan.anova else None,
                 "features": list(plan.features), "profile_outcomes": list(plan.profile_outcomes),
                 "bounds": {c: list(plan.range_of(c)) for c in plan.columns + plan.covariates + plan.features}},
        "rows": "all rows of each site's table; complete cases per analysis",
    })
    return json_safe(result)


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, NaN and ±inf as null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------------------------------------------------
# Flower


def run_analytics_federation(grid: Grid, settings: AnalyticsSettings, out_dir: Path) -> dict[str, Any]:
    """Site check (``server.app.check_sites``), then every analysis; writes ``out_dir/analytics.json``."""
    from server.app import usable_sites

    sites, nodes = usable_sites(grid, settings.min_nodes)
    plan = plan_for(settings.task(), settings.dp)
    session = AnalyticsSession(GridAsker(grid), nodes, plan.queries(settings), settings.epsilon, dict(sites.usable))
    result = run_analyses(session, plan, settings)
    result["sites"] = sorted(sites.usable.values())
    result["rejected"] = {name: errors for name, errors in sites.rejected.values()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analytics.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def make_analytics_server_app(settings: AnalyticsSettings, out_dir: Path | str) -> ServerApp:
    """A ServerApp running :func:`run_analytics_federation` with these settings (the run config is not read)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        """The ServerApp's entry point: every phase, then analytics.json."""
        run_analytics_federation(grid, settings, Path(out_dir))

    return server
