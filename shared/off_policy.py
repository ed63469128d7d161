"""Off-policy evaluation of a dosing policy from logged cycles, and the release gate built on it.

What a candidate policy π would achieve on a site's patients, estimated from the cycles the site logged under
its own practice, without trying π on anyone. The value of a deterministic policy is
``V(π) = E[U(x, π(x))]`` with the utility ``U = response − 0.5 · grade ≥ 3 toxicity − 3 · heart failure``
(the simulator's oracle weights; ``simulation.oracle``). Doubly robust with a continuous dose (Dudík, Langford
& Li, ICML 2011; for the dose, Kallus & Zhou, AISTATS 2018, "Policy evaluation and optimization with
continuous treatments", a kernel on the dose), each logged cycle ``i`` gives

    Γᵢ(π) = q̂(xᵢ, π(xᵢ)) + wᵢ(π) · (rᵢ − q̂(xᵢ, aᵢ)),
    wᵢ(π) = 1{fᵢ = f_π(xᵢ)} · K_h(dᵢ − d_π(xᵢ)) / (p̂(fᵢ | xᵢ) · p̂(dᵢ | fᵢ, xᵢ)),  clipped at ``W_MAX``,

with ``q̂`` the policy's own outcome models, ``p̂`` the site's logging policy (fitted at the site and never
sent: ``client.ope``), ``K_h`` a box kernel of width ``h`` (the action space's dose step) and ``Γᵢ = 0`` where
π gives nothing (withhold, stop). The estimate is consistent if either ``q̂`` or ``p̂`` is. Weights are
clipped (Ionides 2008, "Truncated importance sampling") and every ``Γ`` to ``[−G_MAX, G_MAX]``: a bias
traded for bounded variance, and the per-row bound a DP release needs.

**Off the logs' support, the models' lower bound.** Doubly robust is unbiased where the logging policy could
have taken π's action (positivity); where it could not, Γ is the outcome model's guess, and a candidate choosing
actions the sites never take would be credited with its own models' extrapolation (measured: the top dose of
the least used formulation for everyone scored +0.16 utility over standard of care). So a cycle whose candidate
action the logging policy takes with probability below ``MIN_SUPPORT`` (formulation probability times the dose
density over the kernel's width, or the exact logged probability: ``client.decision_log``) gets standard of
care's Γ plus a pessimistic credit: the outcome models' lower 95 % confidence bound on the candidate's
improvement over standard of care for that patient, never more than the plain difference
(``client.ope.off_support_credit``; 0 for a policy whose models carry no such bound, the ensemble). The gate
can then pass a candidate only on what the logs show plus what its models are sure of — the pessimism of
offline decision making (Jin, Yang & Wang, ICML 2021; Thomas, Theocharous & Ghavamzadeh, AAAI 2015,
high-confidence off-policy evaluation). Before 2026-12-02 such a cycle earned no credit at all, which hid a
truly better structured candidate (estimate +0.020 against a true +0.130 in the closed loop) and was optimistic
for a candidate worse off the support (BENCHMARKS.md, "Release gate's off-policy estimate against the truth").

A site sends sums only (:class:`ValueSums`): its count and the sums of ``Γ(candidate)``, ``Γ(standard of
care)``, their difference and its square. The server adds them (:func:`gate`): the mean difference, its
standard error (with the DP noise of the sums added when sites noised them) and a 95 % interval; the
candidate ships only if the interval's lower bound is above 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

W_TOXICITY, W_CHF = 0.5, 3.0
"""Utility weights of grade ≥ 3 toxicity and heart failure (the oracle's: ``simulation.oracle``)."""
W_MAX = 10.0
"""Largest importance weight (truncated importance sampling, Ionides 2008): logged cycles far from the
logging policy's habits would otherwise dominate the estimate."""
MIN_SUPPORT = 1.0 / W_MAX
"""Smallest probability with which the logging policy takes an action (formulation, dose within the kernel)
for the action to count as within the logs' support: a rarer action's importance weight would exceed
``W_MAX``."""
G_MAX = 2.0
"""Each Γ is clipped to [−G_MAX, G_MAX]: utilities lie in [−3.5, 1]; a DR term beyond ±2 is a weight times a
surprise, and the bound is what one cycle may change a released sum by."""
Z_95 = 1.959963984540054
"""Two-sided 95 % normal quantile."""
CHF_SCALE_MG_M2, CHF_SHAPE = 748.0, 4.6
"""P(heart failure by cumulative doxorubicin dose D) = 1 − exp(−(D/748)^4.6) (fit to Swain et al., Cancer 2003;
``simulation.effect``), applied to the total dose: the public, cautious form a site can compute."""


def chf_cycle_probability(cumulative_before_mg_m2, dose_mg_m2) -> np.ndarray:
    """P(heart failure during a cycle of ``dose`` given none before), on the total anthracycline dose."""
    def cumulative(d):
        return 1.0 - np.exp(-((np.asarray(d, dtype=float) / CHF_SCALE_MG_M2) ** CHF_SHAPE))

    before = cumulative(cumulative_before_mg_m2)
    after = cumulative(np.asarray(cumulative_before_mg_m2, dtype=float) + np.asarray(dose_mg_m2, dtype=float))
    return np.where(before < 1.0, (after - before) / np.maximum(1.0 - before, 1e-12), 0.0)


def utility(p_response, p_toxicity, p_chf) -> np.ndarray:
    """Expected utility of an action from its outcome probabilities (or realised 0/1 outcomes)."""
    return np.asarray(p_response, dtype=float) - W_TOXICITY * np.asarray(p_toxicity, dtype=float) \
        - W_CHF * np.asarray(p_chf, dtype=float)


def box_kernel(logged_dose, target_dose, width: float) -> np.ndarray:
    """``K_h(d − d_π)``: 1/h where the logged dose is within h/2 of the target, else 0."""
    near = np.abs(np.asarray(logged_dose, dtype=float) - np.asarray(target_dose, dtype=float)) <= width / 2 + 1e-9
    return near / width


def dr_terms(q_target, q_logged, reward, weight, gives) -> np.ndarray:
    """Γ per logged cycle (module docstring): weights clipped at ``W_MAX``, terms at ``±G_MAX``; 0 where the
    policy gives nothing."""
    w = np.minimum(np.nan_to_num(np.asarray(weight, dtype=float), nan=0.0), W_MAX)
    residual = np.asarray(reward, dtype=float) - np.nan_to_num(np.asarray(q_logged, dtype=float))
    gamma = np.nan_to_num(np.asarray(q_target, dtype=float)) + w * residual
    return np.where(np.asarray(gives, dtype=bool), np.clip(gamma, -G_MAX, G_MAX), 0.0)


@dataclass(frozen=True)
class ValueSums:
    """What a site releases for the gate: count and sums of Γ(candidate), Γ(standard of care), their difference
    and its square; ``noise_sd`` is the sd of the DP noise on an entry of per-row bound 1 (0 without DP)."""

    n: float
    candidate: float
    standard: float
    difference: float
    difference_sq: float
    noise_sd: float = 0.0

    BOUNDS = {"n": 1.0, "candidate": G_MAX, "standard": G_MAX, "difference": 2 * G_MAX,
              "difference_sq": 4 * G_MAX ** 2}
    """How much one logged cycle changes each sum at most."""

    @classmethod
    def of(cls, candidate: np.ndarray, standard: np.ndarray) -> ValueSums:
        d = np.asarray(candidate, dtype=float) - np.asarray(standard, dtype=float)
        return cls(float(len(d)), float(np.sum(candidate)), float(np.sum(standard)), float(np.sum(d)),
                   float(np.sum(d * d)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.array([getattr(self, k)]) for k in self.BOUNDS}


@dataclass
class GateResult:
    """The gate's decision and the figures behind it."""

    estimate: float
    lower: float
    upper: float
    soc_estimate: float
    candidate_estimate: float
    n: float
    passed: bool
    reason: str
    per_site: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """As JSON holds it: an estimate that could not be made (NaN) is ``None``."""
        return _finite_or_none(asdict(self))


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def interval(sums: Sequence[ValueSums]) -> tuple[float, float, float, float, float]:
    """Mean difference, its standard error (sampling and DP noise), candidate and SOC means, count."""
    n = sum(s.n for s in sums)
    if n < 2:
        return math.nan, math.nan, math.nan, math.nan, n
    mean = sum(s.difference for s in sums) / n
    variance = max(sum(s.difference_sq for s in sums) / n - mean ** 2, 0.0)
    noise = sum((s.noise_sd * ValueSums.BOUNDS["difference"]) ** 2 for s in sums)
    se = math.sqrt(variance / n + noise / n ** 2)
    return mean, se, sum(s.candidate for s in sums) / n, sum(s.standard for s in sums) / n, n


def gate(by_site: Mapping[str, ValueSums], min_cycles: int = 30) -> GateResult:
    """Sum the sites' releases; the candidate passes if the lower 95 % bound of (candidate − SOC) is above 0.

    Per site the same interval says whether that site's own logs find the candidate significantly worse
    than its standard of care (``worse``: such a site should keep serving standard of care)."""
    per_site = {}
    for site, s in by_site.items():
        mean, se, cand, soc, n = interval([s])
        per_site[site] = {"estimate": mean, "lower": mean - Z_95 * se, "upper": mean + Z_95 * se,
                          "candidate": cand, "standard_of_care": soc, "n": n,
                          "worse": bool(n >= min_cycles and mean + Z_95 * se < 0)}
    mean, se, cand, soc, n = interval(list(by_site.values()))
    lower, upper = mean - Z_95 * se, mean + Z_95 * se
    if not n >= min_cycles or not math.isfinite(lower):
        passed, reason = False, f"too few logged first cycles to judge ({n:g} < {min_cycles})"
    elif lower > 0:
        passed, reason = True, (f"candidate beats standard of care on the sites' logs: {mean:+.3f} utility per "
                                f"patient, 95 % interval [{lower:+.3f}, {upper:+.3f}] (n = {n:g})")
    else:
        passed, reason = False, (f"not shown better than standard of care: {mean:+.3f} utility per patient, 95 % "
                                 f"interval [{lower:+.3f}, {upper:+.3f}] includes or is below 0 (n = {n:g})")
    return GateResult(mean, lower, upper, soc, cand, n, passed, reason, per_site)
