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
histogram cells within the noise are read as empty. A site that fails or refuses a query is left out of the
rest of the run and named in ``failures``.

What the noise does to each number is reported with it (``shared.dp_error``): describe statistics, ANOVA
groups and cluster profiles carry ``noise`` entries (noise sd, 95 % interval, estimable or "not estimable at
ε = …" with the ε that would make it estimable); regression standard errors include the DP noise
(``se_dp_noise`` beside ``se_sampling``); ANOVA's F and η², the PCA spectrum and loadings have bootstrap noise
sds; the k-means inertia and simplified silhouette carry ``noise`` entries too.

Budget (``--analyses``): only the chosen analyses are planned and asked (``AnalyticsSettings.analyses``); a DP
site sets one σ for the announced queries, so the run's ε is split over the analyses in proportion to their
queries (``server.analytics_plan.BUDGET_RULE``); under DP every announced Newton and Lloyd iteration is asked,
so ε spent equals ε planned, and ``budget`` books each site's ledger increase to the analysis that asked.

Feasibility (``shared.analytics_bounds``): every answer is checked against what is public — its arrays within the
rows behind them times their per-row terms' ranges, its counts within the declared row counts of the site check.
A site's own answer (``secure-sum = off``) that fails is dropped with the site for the rest of the run and named in
``infeasible``; a secure sum that fails is refused (``InfeasibleSum``), which skips the analysis asking it (an
infeasible describe ends the run: every later analysis is standardised by it). Never a value in the reason.
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
from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.analytics_plan import (
    ANALYSES,
    BUDGET_RULE,
    AnalyticsPlan,
    AnalyticsSettings,
    ReleaseSchedule,
    analysis_shares,
    plan_for,
)
from server.secure_aggregation import SecureProtocolError, SecureSession
from server.site_check import usable_sites
from shared import dp_error
from shared.analytics import (
    LOGISTIC_FLOOR_NOISE_SDS,
    QUANTILE_LEVELS,
    anova_table,
    bin_resolution_sd,
    coefficient_table,
    combine_moments,
    correlation_pca,
    denoised_counts,
    design_map,
    eigenvalue_noise_bound,
    eigenvalue_sd,
    histogram_quantiles,
    independent_columns,
    inertia_bound,
    initial_centroids,
    linear_fit,
    lloyd_update,
    logistic_step_noise,
    moments_error,
    noisy_gram_inverse,
    noisy_histogram_quantiles,
    quantile_cells,
    row_bound,
    shifted_sums,
    snap_to_integers,
    standardised_box,
    threshold_shift,
    triu_scale,
    unpack_triu,
    with_noise_parts,
)
from shared.analytics_bounds import check_analytics
from shared.metrics import json_safe
from shared.protocol import analytics as wire
from shared.protocol import messages, records
from shared.protocol.analytics import MIN_CELL_COUNT
from shared.protocol.hist import SECURE_NODES, secure_sum_mode
from shared.protocol.messages import MessageName
from shared.protocol.privacy import RELEASE_INDEX, RELEASE_WEIGHTS, RELEASES, RunPlan
from shared.protocol.records import SITE_NAME
from shared.secure_sum import MIN_SITES
from shared.sum_bounds import Contributors, InfeasibleSum, declared_rows

PROJECTION_BINS = 30
PROJECTION_LIMIT_SD = 4.0
"""The plot's grid spans ± this many sd of each principal-component score (rows beyond go to the edge)."""
DP_CLIP_SD = 4.0
"""Under DP, queries after describe clip each continuous column to its DP 1st-99th percentiles and DP mean ±
this many DP sds (``dp_analysis_bounds``), within the declared range: post-processing of the describe release
that shrinks each row's bound, hence the noise, by up to an order of magnitude (the schema's ranges are
physiological limits, often tens of sds wide), at the cost of winsorising far tails."""
MOMENT_KEYS = ("count", "sum", "sumsq", "raw-sum", "m2")
"""What a site sends per column or group: shifted sums (always) and exact moments (without DP only)."""
MAX_LOG_ODDS = 700.0
"""exp() of a larger log-odds overflows float64; such an odds ratio is reported as null."""


class NoAnswers(RuntimeError):
    """No site answered a query: the analysis cannot be computed."""


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


Asker = Callable[[MessageName, dict[str, Any], dict[str, np.ndarray], Sequence[Hashable]],
                 dict[Hashable, "SiteAnswer | str"]]
"""``asker(query, config, arrays, sites) -> {site id: SiteAnswer or the reason it failed}``."""


class GridAsker:
    """Asks Flower nodes through the Grid: one ``query.analytics_*`` message per node, replies by node id."""

    def __init__(self, grid: Grid, timeout: float | None = None):
        """Keep the arguments (see the class docstring)."""
        self.grid = grid
        self.timeout = timeout

    def __call__(self, query: MessageName, config: dict[str, Any], arrays: dict[str, np.ndarray],
                 sites: Sequence[Hashable]) -> dict[Hashable, SiteAnswer | str]:
        """Send the request to every node in ``sites``; a missing reply counts as a failure."""
        content = wire.request(config, arrays)
        sent = [Message(content, dst_node_id=int(n), message_type=query.type) for n in sites]
        out: dict[Hashable, SiteAnswer | str] = {n: "no reply" for n in sites}
        for reply in self.grid.send_and_receive(sent, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                out[node] = reply.error.reason
                continue
            released, labels, meta = wire.reply_parts(reply.content)
            out[node] = SiteAnswer(str(meta.get(SITE_NAME, node)), released, labels, meta)
        return out


class AnalyticsSession:
    """The run's conversation with the sites: numbers the queries, announces how many, drops failing sites.

    Parameters
    ----------
    asker : Asker
        How to reach the sites (``GridAsker`` under Flower, an in-process asker in tests and benchmarks).
    sites : sequence of hashable
        Site (node) ids to ask.
    planned_queries : int
        ``AnalyticsPlan.queries``: sent to every site with each query, so a DP site sets its noise for all of
        them at once (its ε for analytics is its own: ``client.dp``).
    names : dict, optional
        Display names of the site ids (for failures before any answer).
    declared : dict, optional
        Site id → its declared row count (site check; None for a site that declared none, a DP site): the cap
        of the feasibility check of every answer (``shared.analytics_bounds``). A site's own answer that no
        rows within the declared ranges could give is dropped with the site (named in ``infeasible``); a
        secure sum that none could give is refused (``InfeasibleSum``: the analysis is skipped, naming why).
    schedule : ReleaseSchedule, optional
        ``AnalyticsPlan.schedule``: each analysis's release indices and each query's weight, sent with every
        query so a DP site splits its ε by ``BUDGET_RULE``; without it, queries are numbered as asked and the
        sites' noise is equal for all.
    """

    def __init__(self, asker: Asker, sites: Sequence[Hashable], planned_queries: int,
                 names: dict[Hashable, str] | None = None, schedule: ReleaseSchedule | None = None,
                 declared: dict[Hashable, float | None] | None = None):
        """Keep the arguments (see the class docstring)."""
        self.asker = asker
        self.declared = dict(declared or {})
        self.ranges: dict[str, tuple[float, float]] = {}
        """The columns' declared ranges (set by :func:`run_analyses`): the feasibility check's bound of the exact
        sums of unclipped values, whatever the request's (DP-narrowed) ranges."""
        self.infeasible: dict[str, dict[str, str]] = {}  # query → site (or "sum") → the bound it broke
        self.sites = list(sites)
        self.planned_queries = int(planned_queries)
        self.schedule = schedule
        self._beyond_plan = 0
        self.names = dict(names or {})
        self.asked = 0
        self.failures: dict[str, dict[str, str]] = {}
        self.privacy: dict[str, dict[str, Any]] = {}
        self.timing: dict[str, dict[str, float]] = {}
        self.analysis = ""
        """The analysis now asking (set by :func:`run_analyses`): queries and ε are booked to it."""
        self.asked_by: dict[str, int] = {}
        self.spent_by: dict[str, dict[str, float]] = {}
        self._last_spent: dict[str, float] = {}

    def ask(self, message: MessageName, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[SiteAnswer]:
        """Ask every remaining site; returns the answers, raises :class:`NoAnswers` if none came."""
        query = message.action
        if not self.sites:
            raise NoAnswers(f"{query}: no site left to ask")
        request = {**config, **self._release_terms()}
        self.asked += 1
        self.asked_by[self.analysis] = self.asked_by.get(self.analysis, 0) + 1
        start = time.perf_counter()
        replies = self.asker(message, request, arrays, self.sites)
        clock = self.timing.setdefault(query, {"queries": 0, "seconds": 0.0})
        clock["queries"] += 1
        clock["seconds"] += time.perf_counter() - start
        secure = getattr(self.asker, "secure", False)  # one summed answer (server.secure_analytics)
        answers = []
        for site in list(self.sites):
            reply = replies.get(site, None if secure else "no reply")
            if reply is None:
                continue  # a secure sum that failed elsewhere: this site did nothing wrong
            if isinstance(reply, str):
                name = self.names.get(site, str(site))
                self.failures.setdefault(query, {})[name] = reply
                self.sites.remove(site)
                log(INFO, "analytics: %s left out after %s: %s", name, query, reply)
                continue
            self.names[site] = reply.site
            self.privacy[reply.site] = {k: v for k, v in reply.meta.items()
                                        if k not in ("site-name", wire.SECURE_LAYOUT)}
            self._book(reply)
            if not secure:  # its own answer in the clear: checked alone, dropped with the site if infeasible
                try:
                    check_analytics(query, request, arrays, reply.arrays, self.contributors([site], [reply]),
                                    self.ranges)
                except InfeasibleSum as err:
                    self.infeasible.setdefault(query, {})[reply.site] = str(err)
                    self.sites.remove(site)
                    log(INFO, "analytics: %s dropped: %s", reply.site, err)
                    continue
            answers.append(reply)
        if secure:
            if self.asker.total is None:
                raise NoAnswers(self.asker.error or f"no site answered {query}")
            members = [site for site in self.sites if isinstance(replies.get(site), SiteAnswer)]
            who = self.contributors(members, [replies[site] for site in members])
            try:
                check_analytics(query, request, arrays, self.asker.total.arrays, who, self.ranges)
            except InfeasibleSum as err:
                self.infeasible.setdefault(query, {})["sum"] = str(err)
                log(INFO, "analytics: the secure sum of %s refused: %s", query, err)
                raise
            answers = [self.asker.total]
        if not answers:
            reasons = "; ".join(f"{s}: {r}" for s, r in self.failures.get(query, {}).items())
            raise NoAnswers(f"no site answered {query} ({reasons or 'no site'})")
        return answers


    def contributors(self, sites: Sequence[Hashable], answers: Sequence[SiteAnswer]) -> Contributors:
        """What is public about the sites of one answer (``shared.sum_bounds``): their declared row counts (None
        if one declared none) and the noise sd each DP site stated."""
        declared = [self.declared.get(site) for site in sites]
        return Contributors.of(declared, (a.noise_sd for a in answers if a.dp))

    def _release_terms(self) -> dict[str, Any]:
        """This query's release index among the planned ones, how many are planned and (with a schedule) every
        planned release's weight."""
        if self.schedule is None:
            return {RELEASE_INDEX: self.asked, RELEASES: max(self.planned_queries, self.asked + 1)}
        index = self.schedule.index(self.analysis, self.asked_by.get(self.analysis, 0))
        if index is None:  # beyond the plan (a run without DP): numbered after it; a DP site refuses it
            index = self.schedule.total + self._beyond_plan
            self._beyond_plan += 1
            return {RELEASE_INDEX: index, RELEASES: index + 1}
        return {RELEASE_INDEX: index, RELEASES: self.schedule.total, RELEASE_WEIGHTS: self.schedule.weights()}

    def _book(self, reply: SiteAnswer) -> None:
        """Book the ε a DP site's ledger added for this query to the analysis asking it."""
        if not reply.dp or "epsilon-at-start" not in reply.meta:
            return
        spent = float(reply.meta["epsilon-spent"])
        before = self._last_spent.get(reply.site, float(reply.meta["epsilon-at-start"]))
        mine = self.spent_by.setdefault(reply.site, {})
        mine[self.analysis] = mine.get(self.analysis, 0.0) + spent - before
        self._last_spent[reply.site] = spent

    def budget(self, planned: dict[str, int]) -> dict[str, Any]:
        """Planned against spent: queries per analysis, and per DP site its ε planned for this run, spent in it
        (its ledger's increase since the run's first analytics release) and booked to each analysis."""
        total_planned = max(sum(planned.values()), 1)
        sites = {}
        for site, facts in self.privacy.items():
            if not facts.get("dp") or "epsilon-at-start" not in facts:
                continue
            spent = float(facts["epsilon-spent"]) - float(facts["epsilon-at-start"])
            sites[site] = {"epsilon_planned": float(facts["epsilon-planned"]), "epsilon_spent": spent,
                           "epsilon_left_in_ledger": float(facts["epsilon-budget"]) - float(facts["epsilon-spent"]),
                           "epsilon_spent_by_analysis": dict(self.spent_by.get(site, {}))}
        shares = analysis_shares(planned)
        return {"rule": BUDGET_RULE,
                "analyses": {name: {"queries_planned": q, "queries_asked": self.asked_by.get(name, 0),
                                    "share_of_queries": q / total_planned,
                                    "share_of_privacy_loss": shares.get(name, 0.0)} for name, q in planned.items()},
                "sites": sites}


def total(answers: Sequence[SiteAnswer], key: str) -> np.ndarray:
    """The sum over sites of one released array."""
    return np.sum([np.asarray(a.arrays[key], dtype=np.float64) for a in answers], axis=0)


def site_names(answers: Sequence[SiteAnswer]) -> list[str]:
    """The sites behind the answers (a secure sum's one answer names its members)."""
    return [name for a in answers for name in a.meta.get("members", [a.site])]


def any_dp(answers: Sequence[SiteAnswer]) -> bool:
    """Whether any of the answers was noised."""
    return any(a.dp for a in answers)


def summed_noise_sd(answers: Sequence[SiteAnswer]) -> float:
    """Sd of the noise on a summed entry of scale 1 (independent noise per site)."""
    return math.sqrt(sum(a.noise_sd ** 2 for a in answers))


def run_epsilon(answers: Sequence[SiteAnswer]) -> float:
    """The ε the DP sites planned for this run's analytics (the largest, if they differ): the ε a "not
    estimable at ε = …" refers to; NaN without DP."""
    values = [float(a.meta.get("epsilon-planned", math.nan)) for a in answers if a.dp]
    values = [v for v in values if math.isfinite(v)]
    return max(values) if values else math.nan


def quantile_error(counts: np.ndarray, noise_sd: float, low: float, high: float, integer: bool,
                   bins: int, epsilon: float) -> dict[str, dict[str, Any]] | None:
    """Noise sd, 95 % interval and estimability of each DP histogram quantile (``shared.dp_error``), three parts
    in quadrature: the spread of a parametric bootstrap of the histogram's noise through the same estimator;
    the estimator's bias, which for quantiles read from the thresholded cells is the shift from reading
    sub-threshold cells as empty (``shared.analytics.threshold_shift``, the distance to the all-cells
    quantile) and otherwise the bootstrap's own shift (its mean's distance from the released value: a noisy
    histogram's quantiles move towards where empty cells' noise adds mass); and the bin's resolution read from
    the released histogram (``shared.analytics.bin_resolution_sd``: where the quantile's bin holds a spike
    above its neighbours, a value at an unknown point of the bin; where the density is smooth, half of
    Sheppard's ``width / √12``). A whole-number column snapped to the one whole number of a bin narrower than
    1 keeps the bootstrap's spread and shift only: a quantile in the right bin is exact. None when the
    histogram gives no quantile.

    The interval is for the pooled rows' quantile, not only the noise-free estimator's: until issue 19's fourth
    pass the resolution term was ``width / √12`` for every quantile, which covered the pooled median 0.98-1.00
    at 10 sites × 10⁴ rows with an sd 6-18 × the noise's error; a smaller fixed term missed the columns with
    few distinct values (the simulator's ten formulations), whose medians sit up to half a bin or more from
    the interpolated point, and at 5 × 4,000 rows the long-tailed columns, whose thresholded medians moved
    (BENCHMARKS.md, issue 19's fourth pass)."""
    def estimate(cells: np.ndarray) -> np.ndarray:
        """The quantiles as an array, NaN when the histogram is empty."""
        q = noisy_histogram_quantiles(cells, noise_sd, low, high)
        if q is None:
            return np.full(len(QUANTILE_LEVELS), np.nan)
        return np.array(list((snap_to_integers(q, low, high, bins) if integer else q).values()))

    released = estimate(counts)
    if not np.isfinite(released).all():
        return None
    spread, centre = dp_error.bootstrap(counts, noise_sd, estimate, dp_error.BOOTSTRAP_DRAWS,
                                        dp_error.BOOTSTRAP_SEED)
    bias = np.abs(centre - released)
    snapped = integer and (high - low) / bins < 1
    moved = None if snapped else threshold_shift(counts, noise_sd, low, high)
    if moved is not None:
        bias = moved
    cells = quantile_cells(counts, noise_sd)
    resolution = [0.0 if snapped else bin_resolution_sd(cells, float(value), low, high) for value in released]
    allowed = dp_error.ESTIMABLE_WIDTH_SHARE * (high - low)
    names = [f"p{round(level * 100):02d}" for level in QUANTILE_LEVELS]
    return {name: dp_error.judged(float(value), math.sqrt(float(sd) ** 2 + float(b) ** 2 + res ** 2), allowed,
                                  epsilon, bounds=(low, high))
            for name, value, sd, b, res in zip(names, released, spread, bias, resolution, strict=True)}


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


def combine_describe(answers: Sequence[SiteAnswer], columns: Sequence[str], plan: AnalyticsPlan,
                     bins: int) -> dict[str, dict[str, Any]]:
    """Per column: count, mean, sd (n − 1), min, max (null under DP) and histogram quantiles."""
    bounds = plan.bounds_array(columns)
    centres = np.where(np.isfinite(bounds).all(axis=1), bounds.mean(axis=1), 0.0)
    histogram = total(answers, "histogram").reshape(len(columns), bins)
    noise_sd = summed_noise_sd(answers)
    dp = any_dp(answers)
    epsilon = run_epsilon(answers)
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
        if dp and bounded:
            entry["noise"] = moments_error(parts, float(centres[j]), (float(low), float(high)), noise_sd, epsilon)
            entry["noise"] |= quantile_error(histogram[j], noise_sd, float(low), float(high),
                                             column in plan.integers, bins, epsilon) or {}
        if not dp and moments.count > 0 and all("min" in a.arrays for a in answers):  # not under a secure sum
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
    answers = session.ask(messages.ANALYTICS_DESCRIBE, {"columns": columns, "bins": bins},
                          {"bounds": plan.bounds_array(columns)})
    return combine_describe(answers, columns, plan, bins)


def linear_phase(session: AnalyticsSession, plan: AnalyticsPlan, describe: dict) -> dict[str, Any]:
    """Linear regression of each planned outcome on the covariates, one query (Karr et al. 2005)."""
    covariates, outcomes = list(plan.covariates), list(plan.linear)
    x = standardisation(describe, covariates, plan)
    y = standardisation(describe, outcomes, plan)
    arrays = {k: np.concatenate([x[k], y[k]]) for k in ("centre", "scale", "bounds")}
    answers = session.ask(messages.ANALYTICS_LINEAR, {"covariates": covariates, "outcomes": outcomes}, arrays)
    d = len(covariates) + 1
    out = {}
    for j, outcome in enumerate(outcomes):
        gram = unpack_triu(total(answers, f"{outcome}/gram"), d)
        out[outcome] = linear_fit(gram, total(answers, f"{outcome}/xty"), float(total(answers, f"{outcome}/yty")[0]),
                                  covariates, x, float(y["centre"][j]), float(y["scale"][j]),
                                  summed_noise_sd(answers), float(row_bound(y)[j]))
        out[outcome]["sites"] = site_names(answers)
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
        answers = session.ask(messages.ANALYTICS_LOGISTIC, {"covariates": covariates, "outcomes": active}, arrays)
        dp = any_dp(answers)
        for o in active:
            s = state[o]
            hessian = unpack_triu(total(answers, f"{o}/hessian"), d)
            gradient = total(answers, f"{o}/gradient")
            if s["kept"] is None:
                s["kept"] = list(range(d)) if dp else independent_columns(hessian)
            kept = s["kept"]
            bound = np.concatenate([[0.0], row_bound(x)])[kept][1:]
            inverse = noisy_gram_inverse(hessian[np.ix_(kept, kept)], bound, 0.25, summed_noise_sd(answers),
                                         LOGISTIC_FLOOR_NOISE_SDS if dp else None)
            step = inverse @ gradient[kept]
            before = s["beta"].copy()
            s["beta"][kept] += step
            if dp:  # the noise carried through every step (shared.analytics.logistic_step_noise)
                s["noise"] = logistic_step_noise(hessian, gradient, before, s["beta"], s.get("noise", np.zeros((d, d))),
                                                 bound, summed_noise_sd(answers))
            s.update(inverse=inverse, n=float(total(answers, f"{o}/count")[0]), dp=dp, iterations=s["iterations"] + 1,
                     loglik=None if dp else float(total(answers, f"{o}/loglik")[0]),
                     sites=site_names(answers))
            s["converged"] = bool(np.max(np.abs(step)) < settings.tolerance) and not dp  # DP: ask all announced
    m = design_map(x["centre"], x["scale"])
    out = {}
    for o, s in state.items():
        if "inverse" not in s:
            continue
        covariance = np.zeros((d, d))
        covariance[np.ix_(s["kept"], s["kept"])] = s["inverse"]
        estimate = m.T @ s["beta"]
        if s["dp"]:
            sampling, noise = m.T @ covariance @ m, m.T @ s["noise"] @ m
            table = with_noise_parts(coefficient_table(covariates, estimate, sampling + noise, s["kept"], None),
                                     sampling, noise)
        else:
            table = coefficient_table(covariates, estimate, m.T @ covariance @ m, s["kept"], None)
        for row in table.values():
            finite = row["estimate"] is not None and row["estimate"] < MAX_LOG_ODDS
            row["odds_ratio"] = math.exp(row["estimate"]) if finite else None
        out[o] = {"n": s["n"] if s["dp"] else int(round(s["n"])), "iterations": s["iterations"],
                  "converged": s["converged"], "log_likelihood": s["loglik"], "coefficients": table, "dp": s["dp"],
                  "sites": s["sites"], "scale": "original units of each covariate; log-odds",
                  "standard_errors": "inverse Hessian (Wald); z-statistics and normal p-values"
                                     + ("; under DP plus the DP noise carried through every Newton step "
                                           "(parametric bootstrap through the floored steps)"
                                        if s["dp"] else "")}
    return out


def anova_phase(session: AnalyticsSession, plan: AnalyticsPlan) -> dict[str, Any]:
    """Phase 3: one query for per-group moments, merged per group across sites (Chan et al. 1979)."""
    response, factor = plan.anova
    bounds = plan.bounds_array([response])
    answers = session.ask(messages.ANALYTICS_ANOVA, {"response": response, "factor": factor}, {"bounds": bounds})
    centre = float(bounds[0].mean()) if np.isfinite(bounds).all() else 0.0
    parts: dict[str, list[dict[str, float]]] = {}
    for a in answers:
        for g, label in enumerate(a.labels.get("groups", [])):
            parts.setdefault(label, []).append({key: float(np.asarray(a.arrays[key]).ravel()[g])
                                                for key in MOMENT_KEYS if key in a.arrays})
    groups = {label: combine_moments(p, centre, tuple(bounds[0])) for label, p in parts.items()}
    table = anova_table(groups)
    if any_dp(answers):
        noise_sds, epsilon = group_noise_sds(answers, list(parts)), run_epsilon(answers)
        for label, entry in table["groups"].items():
            entry["n"] = float(entry["n"])
            entry["noise"] = moments_error(parts[label], centre, tuple(bounds[0]), noise_sds[label], epsilon)
        table["f_noise_sd"], table["eta_squared_noise_sd"] = anova_f_noise_sd(parts, centre, tuple(bounds[0]),
                                                                              noise_sds)
    else:
        table["n"] = int(round(table["n"]))
        for entry in table["groups"].values():
            entry["n"] = int(round(entry["n"]))
    return {"response": response, "factor": factor, **table, "dp": any_dp(answers),
            "sites": site_names(answers)}


def group_noise_sds(answers: Sequence[SiteAnswer], labels: Sequence[str]) -> dict[str, float]:
    """Per ANOVA group, the sd of the summed noise on an entry of scale 1: from the answers that released the
    group only. A site releases the groups it has (``client.analytics.group_moments``), so a formulation given
    at 3 of 10 sites carries the noise of 3 (under a secure sum every site lays out, and noises, every group:
    the one summed answer names them all). Until issue 19's fifth pass every group was given the noise of
    every site (:func:`summed_noise_sd`): at 10 sites × 10⁴ rows, where a formulation is at 3.25 sites on
    average, the groups' mean noise sd was 1.74 × their error and F's 1.85 × (BENCHMARKS.md)."""
    return {label: math.sqrt(sum(a.noise_sd ** 2 for a in answers if label in a.labels.get("groups", [])))
            for label in labels}


def anova_f_noise_sd(parts: dict[str, list[dict[str, float]]], centre: float, bounds: tuple[float, float],
                     noise_sds: dict[str, float]) -> tuple[float | None, float | None]:
    """Noise sds of ANOVA's F and η² under DP: a parametric bootstrap (``shared.dp_error``) of the groups'
    summed count, sum and sum of squares (noise sds τ_g, τ_g h, τ_g h², with τ_g the group's own summed noise,
    :func:`group_noise_sds`) through the same estimator."""
    labels = sorted(parts)
    sums = np.array([shifted_sums(parts[g], centre) for g in labels])
    half = (bounds[1] - bounds[0]) / 2
    tau = np.array([noise_sds[g] for g in labels])

    def f_of(noisy: np.ndarray) -> np.ndarray:
        """F from noisy (count, sum, sumsq) rows, post-processed as the release is."""
        groups = {g: combine_moments([{"count": n, "sum": s1, "sumsq": s2}], centre, bounds)
                  for g, (n, s1, s2) in zip(labels, noisy, strict=True)}
        table = anova_table(groups)
        return np.array([table["f"], math.nan if table["eta_squared"] is None else table["eta_squared"]])

    sds = dp_error.bootstrap_sd(sums, np.outer(tau, [1.0, half, half ** 2]), f_of)
    return tuple(float(sd) if math.isfinite(sd) else None for sd in sds)


def pca_phase(session: AnalyticsSession, plan: AnalyticsPlan, describe: dict) -> dict[str, Any]:
    """Phase 4: one query for ``Σ[1,z][1,z]ᵀ``; returns the PCA."""
    features = list(plan.features)
    x = standardisation(describe, features, plan)
    answers = session.ask(messages.ANALYTICS_PCA, {"features": features}, x)
    released = total(answers, "gram")
    result = correlation_pca(unpack_triu(released, len(features) + 1), x, features)
    result.update(dp=any_dp(answers), sites=site_names(answers))
    if result["dp"]:
        def spectrum(gram: np.ndarray) -> np.ndarray:
            """Eigenvalues and explained-variance ratios of a (re-noised) Gram release."""
            pca = correlation_pca(unpack_triu(gram, len(features) + 1), x, features)
            return np.concatenate([pca["eigenvalues"], pca["explained_variance_ratio"] or [np.nan] * len(features),
                                   np.ravel(pca["components"])])

        p = len(features)
        # root-mean-square, not sd: noise spreads a matrix's spectrum (the top eigenvalues up, the bottom down),
        # a shift the sd leaves out: with the sd, 2 runs × 3 sites × ~1,300 rows covered the non-DP
        # eigenvalues 0.33-0.64 of the time at ε = 0.5-3
        scale = summed_noise_sd(answers) * triu_scale(row_bound(x))
        sd = dp_error.bootstrap_rmse(released, scale, spectrum)
        # eigenvalues: where the noise's reach is large against the spectrum, Weyl's bound as an sd (± 1.96 sd is
        # the bound), since the bootstrap's root-mean-square distance missed the spectrum's outward spread; where it
        # is small, that distance per eigenvalue (shared.analytics.eigenvalue_sd)
        sd[:p] = eigenvalue_sd(sd[:p], eigenvalue_noise_bound(released, scale, p + 1), np.array(result["eigenvalues"]))
        result["noise"] = {"eigenvalues_noise_sd": sd[:p].tolist(),
                           "explained_variance_ratio_noise_sd": sd[p:2 * p].tolist(),
                           "components_noise_sd": sd[2 * p:].reshape(p, p).tolist(),
                           "method": "parametric bootstrap of the Gram release's DP noise, root-mean-square "
                                     "distance from the released values (shared.dp_error.bootstrap_rmse); "
                                     "eigenvalues: that distance where the noise's reach is under "
                                     "a quarter of the spectrum's spread, else a 95 % bound on the noise's spectral "
                                     "norm (Weyl) / 1.96 (shared.analytics.eigenvalue_sd)"}
    if not result["dp"]:
        result["n"] = int(round(result["n"]))
    return result


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
        answers = session.ask(messages.ANALYTICS_LLOYD, {"features": features}, x | {"centroids": centroids})
        dp = any_dp(answers)
        counts, sums = total(answers, "count"), total(answers, "sum").reshape(centroids.shape)
        if not dp:
            inertia_history.append(float(total(answers, "inertia")[0]))
        new = lloyd_update(centroids, counts, sums, box)
        iterations += 1
        shift = float(np.max(np.linalg.norm(new - centroids, axis=1)))
        centroids = new
        if shift < settings.tolerance and not dp:  # under DP every announced iteration is asked
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
    answers = session.ask(messages.ANALYTICS_PROFILES,
                          {"features": features, "outcomes": outcomes, "grid-bins": PROJECTION_BINS}, arrays)
    dp = any_dp(answers)
    k, p = centroids.shape
    counts = np.maximum(total(answers, "count"), 0.0)
    sums = total(answers, "sum").reshape(k, p)
    outcome_counts = total(answers, "outcome-count").reshape(k, len(outcomes))
    outcome_sums = total(answers, "outcome-sum").reshape(k, len(outcomes))
    centre = np.where(np.isfinite(outcome_bounds).all(axis=1), outcome_bounds.mean(axis=1), 0.0)
    n = max(float(counts.sum()), 1.0)
    noise_sd, epsilon = summed_noise_sd(answers), run_epsilon(answers)
    bound, feature_bounds = row_bound(x), x["bounds"]
    raw_counts = total(answers, "count")
    profiles = []
    for c in range(k):
        size = max(counts[c], 1.0)
        row = {"cluster": c, "n": float(counts[c]) if dp else int(round(counts[c])), "share": counts[c] / n,
               "silhouette": float(total(answers, "silhouette")[c] / size) if counts[c] >= 1 else None,
               "means": dict(zip(features, (x["centre"] + x["scale"] * sums[c] / size).tolist(), strict=True)),
               "outcomes": {}}
        if dp:
            row["noise"] = {f: dp_error.judged(
                row["means"][f], float(x["scale"][i]) * dp_error.mean_noise_sd(raw_counts[c], sums[c, i], bound[i],
                                                                                 noise_sd),
                dp_error.ESTIMABLE_WIDTH_SHARE * dp_error.range_width(feature_bounds[i]), epsilon,
                clamped=raw_counts[c] < 1) for i, f in enumerate(features)}
        for j, outcome in enumerate(outcomes):
            present = outcome_counts[c, j]
            value = centre[j] + outcome_sums[c, j] / present if present >= 1 else math.nan
            clamped = present < 1
            if np.isfinite(outcome_bounds[j]).all() and math.isfinite(value):
                clamped = clamped or not outcome_bounds[j, 0] <= value <= outcome_bounds[j, 1]
                value = float(np.clip(value, *outcome_bounds[j]))
            row["outcomes"][outcome] = {"n": float(present) if dp else int(round(present)), "mean": value}
            if dp:
                half = dp_error.range_width(outcome_bounds[j]) / 2
                row["outcomes"][outcome]["noise"] = dp_error.judged(
                    value, dp_error.mean_noise_sd(present, outcome_sums[c, j], half, noise_sd),
                    dp_error.ESTIMABLE_WIDTH_SHARE * 2 * half, epsilon, clamped=clamped,
                    bounds=tuple(outcome_bounds[j]))
        profiles.append(row)
    projected = (centroids @ top.T).tolist()
    edges = [np.linspace(lo, hi, PROJECTION_BINS + 1).tolist() for lo, hi in limits]
    inertia = float(total(answers, "inertia").sum())
    silhouette = float(total(answers, "silhouette").sum() / n)
    diagnostics_noise = {}
    if dp:
        diagnostics_noise = {"noise": kmeans_diagnostics_noise(inertia, silhouette, n, k,
                                                               inertia_bound(standardised_box(x), centroids),
                                                               noise_sd, epsilon)}
    return {"dp": dp, "n": n if dp else int(round(n)), "inertia": inertia, **diagnostics_noise,
            "silhouette_simplified": silhouette,
            "silhouette_note": "simplified silhouette: per row (b − a) / max(a, b) with a, b the distances to the "
                               "nearest and second-nearest centroid (Hruschka et al. 2004), averaged",
            "profiles": profiles, "sites": site_names(answers),
            "projection": {"axes": ["PC1", "PC2"], "x_edges": edges[0], "y_edges": edges[1],
                           "counts": np.maximum(denoised_counts(total(answers, "projection"),
                                                                summed_noise_sd(answers)), 0.0).tolist(),
                           "centroids": projected,
                           "note": f"rows projected at each site and counted on a {PROJECTION_BINS}x"
                                   f"{PROJECTION_BINS} grid, summed over sites"
                                   + ("" if dp else f"; cells under {MIN_CELL_COUNT} rows at a site "
                                                    "are sent as 0")}}


def kmeans_diagnostics_noise(inertia: float, silhouette: float, n: float, k: int, bound: float, noise_sd: float,
                             epsilon: float) -> dict[str, dict[str, Any]]:
    """Noise sd, 95 % interval and estimability (``shared.dp_error``) of the DP inertia and simplified silhouette.

    The inertia is the sum of ``k`` released per-cluster sums, each with noise of sd ``noise_sd × bound``
    (``bound`` the sites' per-row bound, ``shared.analytics.inertia_bound``): sd ``noise_sd · bound · √k``,
    estimable when at most ``ESTIMABLE_WIDTH_SHARE`` of the inertia wide. The
    silhouette is ``S / n`` from ``k`` noisy silhouette sums (row bound 1) and ``k`` noisy counts: by the delta
    method sd ``noise_sd √k / n · √(1 + s²)``, interval within [−1, 1], judged against ``ESTIMABLE_WIDTH_SHARE``
    of that range."""
    inertia_sd = noise_sd * bound * math.sqrt(k)
    silhouette_sd = noise_sd * math.sqrt(k) / max(n, 1.0) * math.sqrt(1.0 + silhouette ** 2)
    share = dp_error.ESTIMABLE_WIDTH_SHARE
    return {"inertia": dp_error.judged(inertia, inertia_sd, share * max(inertia, 0.0), epsilon),
            "silhouette_simplified": dp_error.judged(silhouette, silhouette_sd, share * 2.0, epsilon,
                                                     bounds=(-1.0, 1.0))}


def run_analyses(session: AnalyticsSession, plan: AnalyticsPlan, settings: AnalyticsSettings) -> dict[str, Any]:
    """Every planned analysis in order; an analysis no site could answer is recorded as skipped with why."""
    result: dict[str, Any] = {"describe": {}, "regression": {"covariates": list(plan.covariates), "linear": {},
                                                            "logistic": {}},
                              "anova": None, "pca": None, "kmeans": None}
    skipped = dict(plan.skipped)
    chosen = settings.chosen
    session.ranges = dict(plan.bounds)
    describe: dict[str, dict] = {}
    if "describe" in chosen:
        session.analysis = "describe"
        try:
            describe = describe_phase(session, plan, settings.bins)
        except (NoAnswers, InfeasibleSum) as err:
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
    session.analysis = "regression"
    if "regression" in chosen and plan.linear and plan.covariates:
        result["regression"]["linear"] = _attempt(lambda: linear_phase(session, plan, describe), "linear", skipped)
    if "regression" in chosen and plan.logistic and plan.covariates:
        result["regression"]["logistic"] = _attempt(lambda: logistic_phase(session, plan, describe, settings),
                                                    "logistic", skipped)
    session.analysis = "anova"
    if "anova" in chosen and plan.anova:
        result["anova"] = _attempt(lambda: anova_phase(session, plan), "anova", skipped)
    session.analysis = "pca"
    if "pca" in chosen and plan.features:
        pca = _attempt(lambda: pca_phase(session, plan, describe), "pca", skipped)
        result["pca"] = pca
        session.analysis = "kmeans"
        if "kmeans" in chosen and pca is not None:
            result["kmeans"] = _attempt(lambda: kmeans_phase(session, plan, pca, settings), "kmeans", skipped)
    result["analyses"] = list(chosen)
    result["not_chosen"] = [a for a in ANALYSES if a not in chosen]
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
        "infeasible": session.infeasible,
        "queries": {"planned": session.planned_queries, "asked": session.asked},
        "budget": session.budget(plan.queries_by_analysis(settings)),
        "timing": session.timing,
        "settings": asdict(settings),
        "plan": {"columns": list(plan.columns), "covariates": list(plan.covariates), "linear": list(plan.linear),
                 "logistic": list(plan.logistic), "anova": list(plan.anova) if plan.anova else None,
                 "features": list(plan.features), "profile_outcomes": list(plan.profile_outcomes),
                 "bounds": {c: list(plan.range_of(c)) for c in plan.columns + plan.covariates + plan.features}},
        "rows": "all rows of each site's table; complete cases per analysis",
    })
    return json_safe(result)


# ---------------------------------------------------------------------------------------------------------
# The secure sum (``secure-sum``: pairwise or recovering)
#
# Federated analytics through the one secure-sum protocol: the server learns each query's sums, not a site's.
#
# An :data:`server.analytics_phase.Asker` (:class:`SecureGridAsker`) over Flower's Grid that asks every query
# through a :class:`server.secure_aggregation.SecureSession` (the run's ``secure-sum`` mode, pairwise or
# recovering): each site answers with all the arrays of its answer in one masked fixed-point vector
# (``client.analytics.secure_reply``), so each query is one release, and the asker returns the sum as one
# answer (:attr:`SecureGridAsker.total`) beside each site's privacy facts (which travel in the clear, as the
# arrays' names and shapes do). A query with group labels (ANOVA) first asks the labels alone and then every
# site with their union. Under DP the sites noise before masking; the sum's noise sd is the root of the sum of
# the sites' noise variances, as for plain sums.
#
# What the server no longer sees, and so no longer reports, without DP: the minima and maxima of describe
# (null, as under DP: not sums) and the sites' exact centred moments (the shifted sums about the public centre
# give the same moments within the fixed-point rounding). The log-likelihood and inertia, sums, are summed.
#
# Lost sites: with ``recovering``, a site lost in any round of a query is left out from then on and the query's
# sum is that of the sites whose masked vector arrived; with ``pairwise``, the query fails naming the lost site
# (its masks stay in the sum), the analysis asking it is skipped, and the next query exchanges fresh keys among
# the sites left.

LABELLED = {messages.ANALYTICS_ANOVA.action: "groups"}
"""Queries whose blocks are laid out by site-specific labels: asked for the labels first, then with their union."""
SECURE_GROUPS, LABELS_ONLY, EXACT_EXTRAS = "groups", "labels-only", "exact-extras"
"""Request keys (``client.analytics.SECURE_GROUPS``, ``LABELS_ONLY``, ``EXACT_EXTRAS``)."""


class SecureGridAsker:
    """Asks every analytics query through the secure sum (module docstring).

    Parameters
    ----------
    grid : Grid
    mode : str                  pairwise | recovering
    threshold : int, default 0  recovering: the Shamir threshold (0: ⌊n/2⌋ + 1)
    exact : bool, default True  the run has no DP site: sites add the exact extras that are sums (log-likelihood,
                                inertia), so every site's answer has the same arrays

    After each call, :attr:`total` is the summed answer (None when the sum failed, then :attr:`error` says why).
    """

    secure = True

    def __init__(self, grid: Grid, mode: str, threshold: int = 0, exact: bool = True) -> None:
        self.grid, self.mode, self.threshold, self.exact = grid, mode, int(threshold), exact
        self.session: SecureSession | None = None
        self.total: SiteAnswer | None = None
        self.error = ""

    def _session(self, sites: list[int]) -> SecureSession:
        """The run's session; a fresh one (new keys) whenever the sites differ from the pairwise key table's."""
        if self.session is None or (self.mode == "pairwise" and self.session.base.get(SECURE_NODES) != sites):
            self.session = SecureSession(self.grid, sites, self.mode, threshold=self.threshold)
            if self.mode == "pairwise":
                self.session.exchange_keys()
        self.session.nodes = [n for n in sites if n not in self.session.lost]
        return self.session

    def __call__(self, query: MessageName, config: dict[str, Any], arrays: dict[str, np.ndarray],
                 sites: Sequence[Hashable]) -> dict[Hashable, SiteAnswer | str]:
        """Ask ``query`` of ``sites`` through the secure sum: per site its facts (or why it failed); the sum in
        :attr:`total`."""
        self.total, self.error = None, ""
        out: dict[Hashable, SiteAnswer | str] = {}
        try:
            session = self._session([int(s) for s in sites])
            for node in sites:
                if int(node) in session.lost:
                    out[node] = f"lost in an earlier secure sum: {session.lost[int(node)]}"
            request = {**config, EXACT_EXTRAS: self.exact}
            record = records.to_array_record(arrays)
            if query.action in LABELLED:
                replies, failed = session.ask_all(query, {**request, LABELS_ONLY: True}, record)
                session.lose(failed)
                key = LABELLED[query.action]
                request[SECURE_GROUPS] = sorted({label for c in replies.values()
                                                 for label in wire.reply_parts(c)[1].get(key, [])}) or [""]
            vector = session.summed_floats(query, request, record, wire.SECURE_VALUES)
        except SecureProtocolError as err:
            lost = self.session.lost if self.session is not None else {}
            out.update({node: reason for node, reason in lost.items() if node in sites})
            self.error = (f"{query.action}: the secure sum failed at node {err.node}: {err.reason}"
                          + (" (pairwise masks: a lost site's masks stay in the sum; secure-sum = recovering "
                             "survives it)" if self.mode == "pairwise" else ""))
            if err.node in sites:
                out.setdefault(err.node, err.reason)
            return out
        members = []
        for node in session.summed_nodes:
            _, labels, meta = wire.reply_parts(session.replies[node])
            out[node] = SiteAnswer(str(meta.get(SITE_NAME, node)), {}, labels, meta)
            members.append(out[node])
        for node, reason in session.lost.items():
            if node in sites and node not in out:
                out[node] = reason
        self.total = summed_answer(members, vector)
        return out


def summed_answer(members: list[SiteAnswer], vector: np.ndarray) -> SiteAnswer:
    """The sum as one answer: arrays cut from the vector by the first site's layout (every site's must be the
    same: ValueError otherwise), labels as sent, and the privacy facts of the sum (any DP, the root of the summed
    noise variances, the largest ε planned)."""
    layouts = {m.meta[wire.SECURE_LAYOUT] for m in members}
    if len(layouts) != 1:
        raise ValueError(f"the sites laid out their answers in {len(layouts)} different ways: no sum")
    arrays, at = {}, 0
    for name, shape in wire.layout_of(layouts.pop()):
        size = int(np.prod(shape)) if shape else 1
        arrays[name] = vector[at:at + size].reshape(shape)
        at += size
    if at != vector.size:
        raise ValueError(f"a summed vector of {vector.size} entries for a layout of {at}")
    dp = any(m.dp for m in members)
    meta: dict[str, Any] = {"dp": dp, "members": [m.site for m in members]}
    if dp:
        meta["noise-sd"] = math.sqrt(sum(m.noise_sd ** 2 for m in members))
        planned = [float(m.meta["epsilon-planned"]) for m in members if m.dp and "epsilon-planned" in m.meta]
        if planned:
            meta["epsilon-planned"] = max(planned)
    name = f"secure sum of {len(members)} sites"
    return SiteAnswer(name, arrays, members[0].labels if members else {}, meta)


def run_analytics_federation(grid: Grid, settings: AnalyticsSettings, out_dir: Path) -> dict[str, Any]:
    """Site check (``server.site_check``), then every analysis; writes ``out_dir/analytics.json``. Sites under DP
    that refuse the ``analytics`` phase are named in ``refused``."""
    sites, nodes = usable_sites(grid, settings.min_nodes, RunPlan(("analytics",)))
    if sites.dp_nodes() and not settings.dp:  # the sites decide: plan the run for their DP, whatever was asked
        log(INFO, "analytics: %d site(s) answer under DP; the run uses the DP plan", len(sites.dp_nodes()))
        settings = replace(settings, dp=True)
    nodes = sites.granting("analytics")
    plan = plan_for(settings.task(), settings.dp)
    mode = secure_sum_mode(settings.secure_sum)
    asker: Asker = GridAsker(grid)
    if mode != "off" and len(nodes) >= MIN_SITES:  # one site: its sum is its answer, nothing to hide it among
        asker = SecureGridAsker(grid, mode, settings.secure_threshold, exact=not settings.dp)
    session = AnalyticsSession(asker, nodes, plan.queries(settings), dict(sites.usable), plan.schedule(settings),
                               {n: declared_rows(sites.summaries.get(n, {})) for n in nodes})
    result = run_analyses(session, plan, settings)
    result["sites"] = sorted(sites.usable.values())
    result["rejected"] = {name: errors for name, errors in sites.rejected.values()}
    result["refused"] = sites.refusing("analytics")
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
