"""Dose adjustment across cycles learned offline from logged trajectories: fitted-Q iteration, federable.

What it learns: how to set the dose of cycle t ≥ 2 from what the previous cycle showed — its dose, grade ≥ 3
toxicity, ANC nadir and efficacy, and the wearable summary of that cycle (fever days, maximum temperature,
minimum SpO2, mean steps, change in steps) — besides the patient's covariates, the cycle number and the
cumulative anthracycline dose. The state is exactly the flat record table the recommender computes on
(:func:`shared.patient_record.records_frame`), so a fitted adjuster applies to a patient record as it is.

Method: fitted-Q iteration (Ernst, Geurts & Wehenkel, "Tree-based batch mode reinforcement learning",
JMLR 6:503-556, 2005; Riedmiller, "Neural fitted Q iteration", ECML 2005) with a linear Q-function
``Q(s, d) = φ(s, d)·w``; ``φ`` holds 1, the standardised state (missing values imputed at the mean, with a
missing-indicator per column that can be missing), the standardised dose ``d``, ``d²`` and ``d ×`` every
state term. Each iteration regresses (ridge) the targets ``y = r + γ · max_{d'} Q_k(s', d')`` (``y = r``
after a patient's last recorded cycle) on ``φ(s, d)``. The reward of a cycle is the simulator's utility
with the realised outcomes: ``r = response − W_TOXICITY · toxicity_grade3 − W_CHF · chf``.

Offline, the max over ``d'`` and the recommended dose are restricted to a band of ``± max_change`` around
the previous cycle's dose: logged clinics change doses by at most a label reduction, so the data say
little about larger jumps, where a linear Q extrapolates; constraining the action set to the data's
support is the batch-constrained idea of Fujimoto, Meger & Precup, "Off-policy deep reinforcement learning
without exploration", ICML 2019.

Federated: everything the fit needs is a sum over transitions, so sites send sums and never rows —
per-column counts, sums and centred sums of squares for the feature scaling, then in every iteration the ridge
sufficient statistics ``A = Σ φφᵀ``, ``b = Σ φ y`` and ``n`` on their training split (Karr, Lin, Sanil &
Reiter 2005, "Secure regression on distributed databases", JCGS 14(2), for the summed normal equations).
The server adds them and solves ``(A + αI) w = b``, so federated FQI equals pooled FQI up to rounding:
:func:`fitted_q_iteration` is the one loop both use.

Under differential privacy (a site whose ``site.toml`` enables DP) the same sums are released by sufficient-
statistics perturbation (Sheffet, "Differentially private ordinary least squares", ICML 2017; Wang,
"Revisiting differentially private linear regression", NeurIPS 2018): this module bounds what one
transition can contribute — :func:`bounded_scaling_sums` clips every column to a public range,
:meth:`DoseAdjuster.clipped_ridge_sums` clips ``‖φ‖`` to ``FEATURE_NORM_CLIP`` and ``|y|`` to
:func:`target_bound` — and ``client.adjustment_handlers`` adds the Gaussian noise and charges the ledger.

Example
-------
>>> transitions = site_transitions(site.episodes, site.vitals)               # doctest: +SKIP
>>> adjuster = DoseAdjuster(gamma=0.9).fit(transitions)                       # doctest: +SKIP
>>> adjuster.best_dose(records_frame(records), DOSE_GRID_MG_M2, max_dose=80)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.encoding import Moments
from shared.patient_record import PREVIOUS_PREFIX, WEARABLE_PREFIX, PatientRecord, PreviousCycle, WearableSummary
from shared.schema import EPISODE_COLUMNS, TUMOUR_TYPES, VITALS_COLUMNS, columns_by_name
from shared.wearables import FEVER_THRESHOLD_C, SUMMARY_FIELDS

# The simulator's utility weights (simulation.oracle.W_TOXICITY / W_CHF; shared code does not import the
# simulator, tests/test_dose_adjustment.py checks they agree): a response is worth twice the harm of a grade-3
# toxicity, heart failure three times a response.
W_TOXICITY = 0.5
W_CHF = 3.0

DOSE_GRID_MG_M2 = tuple(float(d) for d in range(10, 85, 5))
"""Doses considered (mg/m²): the clinics' range, 10-80 mg/m² in steps of 5 (liposomal doxorubicin labels)."""

NUMERIC_STATE = (
    "cycle", "age_years", "bsa_m2", "bilirubin_umol_l", "creatinine_clearance_ml_min", "anc_baseline_e9_l",
    "ecog", "tumour_burden_mm", "cumulative_dose_mg_m2",
    "previous_dose_mg_m2", "previous_interval_days", "previous_toxicity_grade3", "previous_anc_nadir_e9_l",
    "previous_efficacy_pct",
    "wearable_fever_days", "wearable_max_temperature_c", "wearable_min_spo2_pct", "wearable_mean_steps",
    "wearable_steps_change_pct",
)
"""Record-frame columns of the state (``shared.patient_record.records_frame`` names)."""
STATE_COLUMNS = NUMERIC_STATE + ("female",) + tuple(f"tumour_{t}" for t in TUMOUR_TYPES[1:])
"""The state's columns: the numeric ones, sex and tumour type (one-hot, the first type as reference)."""
MISSABLE = (
    "bilirubin_umol_l", "creatinine_clearance_ml_min", "anc_baseline_e9_l", "tumour_burden_mm",
    "previous_anc_nadir_e9_l", "previous_efficacy_pct", "wearable_fever_days", "wearable_max_temperature_c",
    "wearable_min_spo2_pct", "wearable_mean_steps", "wearable_steps_change_pct",
)
"""State columns a record may lack (labs not taken, outcome lost, wearable not worn): each gets an indicator."""
CLIP = {"wearable_steps_change_pct": (-100.0, 200.0), "previous_efficacy_pct": (-300.0, 100.0)}
"""Heavy-tailed columns are clipped before scaling (a few extreme values would dominate a linear fit)."""

_EPISODE = columns_by_name(EPISODE_COLUMNS)
_VITALS = columns_by_name(VITALS_COLUMNS)
_SCHEMA_COLUMN = {"previous_dose_mg_m2": "dose_mg_m2", "previous_interval_days": "interval_days",
                  "previous_toxicity_grade3": "toxicity_grade3", "previous_anc_nadir_e9_l": "anc_nadir_e9_l",
                  "previous_efficacy_pct": "efficacy_pct"}
_WEARABLE_RANGES = {"wearable_fever_days": (0.0, 43.0),  # days of a cycle (shared.patient_record.WearableSummary)
                    "wearable_max_temperature_c": (_VITALS["temperature_c"].low, _VITALS["temperature_c"].high),
                    "wearable_min_spo2_pct": (_VITALS["spo2_pct"].low, _VITALS["spo2_pct"].high),
                    "wearable_mean_steps": (_VITALS["steps"].low, _VITALS["steps"].high)}


def _public_range(name: str) -> tuple[float, float]:
    """The site-data contract's range of a state column (``shared.schema``; ``CLIP`` where it is tighter)."""
    if name in CLIP:
        return CLIP[name]
    if name in _WEARABLE_RANGES:
        return _WEARABLE_RANGES[name]
    column = _EPISODE.get(_SCHEMA_COLUMN.get(name, name))
    if column is None or column.dtype == "bool":
        return (0.0, 1.0)
    return (float(column.low), float(column.high))


PUBLIC_RANGES = np.array([_public_range(name) for name in NUMERIC_STATE]
                         + [(0.0, 1.0)] * (len(STATE_COLUMNS) - len(NUMERIC_STATE))  # sex, tumour
                         + [(_EPISODE["dose_mg_m2"].low, _EPISODE["dose_mg_m2"].high)], dtype=float)
"""Public (low, high) of every state column and, last, the dose: the schema's limits, never the data's. A DP
site clips to them before its scaling sums, so one transition changes each column's sums by a known amount."""

FEATURE_NORM_CLIP = 10.0
"""``C_φ``: under DP a transition's ``φ`` is scaled down to this L2 norm. On the simulated clinics (5 clinics,
seed 0, 4,466 transitions) the median ``‖φ‖`` is 6.1 and the 90th percentile 10.3, so about one row in ten is
shrunk; the bound is a fixed public constant, not read off a site's data."""

REWARD_BOUND = W_TOXICITY + W_CHF
"""Largest ``|r|``: a cycle's utility ``response − W_TOXICITY · toxicity − W_CHF · chf`` lies in [−3.5, 1]."""


def target_bound(gamma: float) -> float:
    """``C_y``: the bound DP clips fitted-Q targets to, ``max|r| / (1 − γ)`` (the largest discounted return;
    Sutton & Barto 2018, §3.3). ``γ`` must be below 1."""
    if not 0 <= gamma < 1:
        raise ValueError(f"fqi gamma must be in [0, 1) for a DP release (targets are bounded by max|r|/(1-γ)), "
                         f"got {gamma!r}")
    return REWARD_BOUND / (1.0 - gamma)


RECORD_FIELDS = tuple(name for name in PatientRecord.model_fields
                      if name not in ("previous_cycle", "wearable_summary", "source"))
PREVIOUS_FIELDS = tuple(PreviousCycle.model_fields)
WEARABLE_FIELDS = tuple(WearableSummary.model_fields)
VITAL_READINGS = ("temperature_c", "heart_rate_bpm", "spo2_pct", "steps")
_ROUNDING = {"max_temperature_c": 2, "mean_heart_rate_bpm": 1, "min_spo2_pct": 1, "mean_steps": 0,
             "steps_change_pct": 1}


# ---------------------------------------------------------------------------------------------------------
# Site side: logged episodes → record frames → transitions


def summarise_cycles(vitals: pd.DataFrame | None) -> pd.DataFrame:
    """:func:`shared.wearables.summarise_cycle` of every episode at once (the same numbers: means are summed
    as pandas sums each episode's values, rounding is Python's), indexed by episode id; episodes without any
    reading are absent."""
    if vitals is None or vitals.empty:
        return pd.DataFrame(columns=list(SUMMARY_FIELDS), index=pd.Index([], name="episode_id"))
    readings = vitals[list(VITAL_READINGS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    days = np.isfinite(readings).any(axis=1)
    codes, episodes = pd.factorize(vitals["episode_id"].astype(str).to_numpy()[days])
    order = np.argsort(codes, kind="stable")
    x, day, codes = readings[days][order], vitals["day"].to_numpy(dtype=float)[days][order], codes[order]
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(codes)]
    temperature, heart_rate, spo2, steps = x.T
    rows = []
    for a, b in zip(starts, ends, strict=True):
        t, s, d = temperature[a:b], steps[a:b], day[a:b]
        half = d.max() / 2
        first, second = _mean(s[d <= half]), _mean(s[d > half])
        change = 100.0 * (second - first) / first if first and np.isfinite(first) and np.isfinite(second) else None
        rows.append((b - a, int((t >= FEVER_THRESHOLD_C).sum()), _round(_extreme(np.nanmax, t), 2),
                     _round(_mean(heart_rate[a:b]), 1), _round(_extreme(np.nanmin, spo2[a:b]), 1),
                     _round(_mean(s), 0), _round(change, 1)))
    out = pd.DataFrame(rows, columns=list(SUMMARY_FIELDS), index=pd.Index(episodes[codes[starts]], name="episode_id"))
    return out.astype({name: float for name in _ROUNDING})


def _mean(values: np.ndarray) -> float:
    """The mean of the non-missing values as pandas computes it (NaN filled with 0, numpy sum, / count)."""
    seen = np.isfinite(values)
    count = seen.sum()
    return float(np.where(seen, values, 0.0).sum() / count) if count else np.nan


def _extreme(fn, values: np.ndarray) -> float:
    return float(fn(values)) if np.isfinite(values).any() else np.nan


def _round(value, digits: int) -> float:
    return np.nan if value is None or not np.isfinite(value) else round(float(value), digits)


def cycle_frames(episodes: pd.DataFrame, vitals: pd.DataFrame | None,
                 catalogue: Sequence[str] | None = None) -> pd.DataFrame:
    """One record-frame row per episode (same index): the patient at the start of that cycle as the
    recommender sees them — the episode's covariates, the previous cycle's treatment and outcome
    (``previous_*``) and the summary of its wearable readings (``wearable_*``; NaN without ``vitals``).
    ``catalogue`` defaults to the formulations the episodes hold. Columns as ``records_frame``."""
    frame = episodes[[c for c in RECORD_FIELDS if c in episodes.columns]].copy()
    ids = tuple(sorted(episodes["formulation_id"].astype(str).unique())) if catalogue is None else tuple(catalogue)
    frame["catalogue"] = [ids] * len(frame)
    key = episodes["patient_id"].astype(str) + "#" + episodes["cycle"].astype(int).astype(str)
    before = episodes.set_index(episodes["patient_id"].astype(str) + "#" + (episodes["cycle"].astype(int) + 1)
                                .astype(str))
    before = before[~before.index.duplicated()]
    found = key.isin(before.index).to_numpy()
    prev = before.reindex(key.to_numpy())
    for name in PREVIOUS_FIELDS:
        values = prev[name].to_numpy() if name in prev.columns else np.full(len(prev), np.nan)
        frame[PREVIOUS_PREFIX + name] = values if name == "formulation_id" else values.astype(float)
    if vitals is None:
        for name in WEARABLE_FIELDS:
            frame[WEARABLE_PREFIX + name] = np.nan
    else:
        summary = summarise_cycles(vitals).reindex(prev["episode_id"].astype(str).to_numpy())
        for name in WEARABLE_FIELDS:
            values = summary[name].to_numpy(dtype=float)
            if name in ("days_recorded", "fever_days"):  # a previous cycle without readings: 0 days
                values = np.where(found & np.isnan(values), 0.0, values)
            frame[WEARABLE_PREFIX + name] = values
    return frame


def cycle_reward(episodes: pd.DataFrame) -> np.ndarray:
    """Realised utility of each episode: response − W_TOXICITY · grade ≥ 3 toxicity − W_CHF · heart failure
    (NaN when the response was not recorded)."""
    response = pd.to_numeric(episodes["response"], errors="coerce").to_numpy(dtype=float)
    return (response - W_TOXICITY * episodes["toxicity_grade3"].to_numpy(dtype=float)
            - W_CHF * episodes["chf"].to_numpy(dtype=float))


@dataclass
class Transitions:
    """Logged transitions (s, d, r, s', terminal) of cycles t ≥ 2, states as record frames."""

    state: pd.DataFrame
    dose: np.ndarray
    reward: np.ndarray
    next_state: pd.DataFrame  # a row per transition; a terminal row repeats the state (never used)
    terminal: np.ndarray

    def __len__(self) -> int:
        return len(self.dose)

    @classmethod
    def concat(cls, parts: Sequence[Transitions]) -> Transitions:
        return cls(state=pd.concat([p.state for p in parts], ignore_index=True),
                   dose=np.concatenate([p.dose for p in parts]), reward=np.concatenate([p.reward for p in parts]),
                   next_state=pd.concat([p.next_state for p in parts], ignore_index=True),
                   terminal=np.concatenate([p.terminal for p in parts]))


def site_transitions(episodes: pd.DataFrame, vitals: pd.DataFrame | None) -> Transitions:
    """The transitions of a site's logged trajectories: every episode of cycle ≥ 2 whose response was
    recorded, with its dose and reward and the patient's next cycle (terminal if there is none: treatment
    stopped, so nothing more is gained or lost). Computed at the site; only sums of it leave."""
    frames = cycle_frames(episodes, vitals)
    reward = cycle_reward(episodes)
    cycle = episodes["cycle"].to_numpy(dtype=int)
    pid = episodes["patient_id"].astype(str).to_numpy()
    position = pd.Series(np.arange(len(episodes)), index=pd.Index(pid).astype(str) + "#" + cycle.astype(str))
    position = position[~position.index.duplicated()]
    following = position.reindex(pd.Index(pid).astype(str) + "#" + (cycle + 1).astype(str)).to_numpy()
    use = np.flatnonzero((cycle >= 2) & np.isfinite(reward))
    terminal = np.isnan(following[use])
    next_rows = np.where(terminal, use, np.nan_to_num(following[use], nan=0)).astype(int)
    return Transitions(state=frames.iloc[use].reset_index(drop=True),
                       dose=episodes["dose_mg_m2"].to_numpy(dtype=float)[use], reward=reward[use],
                       next_state=frames.iloc[next_rows].reset_index(drop=True), terminal=terminal)


def state_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The raw state (``STATE_COLUMNS``, NaN where missing, ``CLIP`` applied) of every record-frame row."""
    n = len(frame)
    columns = []
    for name in NUMERIC_STATE:
        values = (pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float) if name in frame.columns
                  else np.full(n, np.nan))
        if name in CLIP:
            values = np.clip(values, *CLIP[name])
        columns.append(values)
    columns.append((frame["sex"].astype(str).to_numpy() == "F").astype(float))
    tumour = frame["tumour_type"].astype(str).to_numpy()
    columns += [(tumour == t).astype(float) for t in TUMOUR_TYPES[1:]]
    return np.column_stack(columns) if n else np.zeros((0, len(STATE_COLUMNS)))


def scaling_sums(transitions: Transitions) -> dict[str, np.ndarray]:
    """Per column of the state and, last, the dose: count, sum and centred sum of squares (M2) of the
    non-missing values — what a site sends for the federated feature scaling."""
    x = np.column_stack([state_matrix(transitions.state), transitions.dose])
    moments = [Moments.of(x[:, j]) for j in range(x.shape[1])]
    return {"count": np.array([float(m.count) for m in moments]), "sum": np.array([m.sum for m in moments]),
            "m2": np.array([m.m2 for m in moments])}


def combine_scaling(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several sites' :func:`scaling_sums` as those of their union (Chan, Golub & LeVeque 1979 pairwise
    update, ``shared.encoding.Moments``), so the scaling does not lose digits to ``Σx² − n x̄²``."""
    width = len(parts[0]["count"])
    total = [Moments() for _ in range(width)]
    for part in parts:
        for j in range(width):
            total[j] = total[j] + Moments(int(part["count"][j]), float(part["sum"][j]), float(part["m2"][j]))
    return {"count": np.array([float(m.count) for m in total]), "sum": np.array([m.sum for m in total]),
            "m2": np.array([m.m2 for m in total])}


def add_sums(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The element-wise sum of several sites' sums (same keys)."""
    return {key: np.sum([p[key] for p in parts], axis=0) for key in parts[0]}


def bounded_scaling_sums(transitions: Transitions) -> dict[str, np.ndarray]:
    """What a DP site noises for the feature scaling: per column (``PUBLIC_RANGES`` order) the count of
    non-missing values and the sums of ``x − c`` and ``(x − c)²``, with ``x`` clipped to the column's public
    range and ``c`` its midpoint. One transition changes the count by at most 1, the first sum by at most
    the half-range ``h`` and the second by at most ``h²`` (see ``scaling_bounds``)."""
    x = np.column_stack([state_matrix(transitions.state), transitions.dose])
    low, high = PUBLIC_RANGES[:, 0], PUBLIC_RANGES[:, 1]
    shifted = np.clip(x, low, high) - (low + high) / 2
    present = ~np.isnan(x)
    shifted = np.where(present, shifted, 0.0)
    return {"count": present.sum(axis=0).astype(float), "shifted_sum": shifted.sum(axis=0),
            "shifted_square": np.square(shifted).sum(axis=0)}


def scaling_bounds() -> dict[str, np.ndarray]:
    """Per entry of :func:`bounded_scaling_sums`, the most one transition can change it: 1, ``h``, ``h²``."""
    half = (PUBLIC_RANGES[:, 1] - PUBLIC_RANGES[:, 0]) / 2
    return {"count": np.ones(len(half)), "shifted_sum": half, "shifted_square": half**2}


def scaling_from_bounded(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(Noised) :func:`bounded_scaling_sums` as :func:`scaling_sums`' count, sum and M2 — post-processing,
    which costs no privacy (Dwork & Roth 2014, Prop. 2.1): the count is rounded and kept ≥ 0, the mean kept
    inside the public range and M2 ≥ 0 (``M2 = Σ(x − c)² − n (x̄ − c)²``)."""
    half = (PUBLIC_RANGES[:, 1] - PUBLIC_RANGES[:, 0]) / 2
    middle = (PUBLIC_RANGES[:, 1] + PUBLIC_RANGES[:, 0]) / 2
    count = np.maximum(np.round(sums["count"]), 0.0)
    seen = count > 0
    shifted_mean = np.clip(np.divide(sums["shifted_sum"], count, out=np.zeros_like(count), where=seen), -half, half)
    m2 = np.maximum(sums["shifted_square"] - count * shifted_mean**2, 0.0)
    return {"count": count, "sum": np.where(seen, count * (shifted_mean + middle), 0.0),
            "m2": np.where(seen, m2, 0.0)}


def centred_scaling_sums(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`scaling_sums`' count, sum and M2 (a site's, exact or noised) as quantities that add across sites, for
    the secure sum (``server.adjustment_phase``): the count, ``Σ(x − c)`` and ``Σ(x − c)²`` about each column's
    public midpoint ``c`` (``PUBLIC_RANGES``: public, so nothing of the site's), with
    ``Σ(x − c)² = M2 + n (x̄ − c)²``. Centring on ``c`` rather than 0 keeps the cancellation of
    :func:`scaling_from_centred` to ``(x̄ − c)² / variance`` instead of ``x̄² / variance``."""
    middle = (PUBLIC_RANGES[:, 1] + PUBLIC_RANGES[:, 0]) / 2
    count = np.asarray(sums["count"], dtype=np.float64)
    seen = count > 0
    shifted_mean = np.divide(sums["sum"], count, out=np.zeros_like(count), where=seen) - middle
    return {"count": count, "shifted_sum": np.where(seen, count * shifted_mean, 0.0),
            "shifted_square": np.where(seen, np.asarray(sums["m2"], dtype=np.float64) + count * shifted_mean**2, 0.0)}


def scaling_from_centred(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sites' summed :func:`centred_scaling_sums` as :func:`scaling_sums`' count, sum and M2 of their union (what
    :func:`combine_scaling` gives, to the secure sum's fixed-point rounding): ``M2 = Σ(x − c)² − (Σ(x − c))² / n``.
    The count is rounded (a sum of integer counts, off by the fixed-point rounding only) and M2 kept ≥ 0."""
    middle = (PUBLIC_RANGES[:, 1] + PUBLIC_RANGES[:, 0]) / 2
    count = np.rint(np.asarray(sums["count"], dtype=np.float64))
    seen = count > 0
    shifted_mean = np.divide(sums["shifted_sum"], count, out=np.zeros_like(count), where=seen)
    m2 = np.maximum(sums["shifted_square"] - count * shifted_mean**2, 0.0)
    return {"count": count, "sum": np.where(seen, count * (shifted_mean + middle), 0.0), "m2": np.where(seen, m2, 0.0)}


# ---------------------------------------------------------------------------------------------------------
# The model


class DoseAdjuster:
    """Linear Q-function of the next dose given the previous cycle, fitted by fitted-Q iteration.

    Fitted-Q iteration: Ernst, Geurts & Wehenkel, JMLR 6:503-556 (2005); Riedmiller, ECML 2005. The action
    set is constrained to the logged data's support (Fujimoto et al., ICML 2019): ``± max_change`` around the
    previous dose.

    Parameters
    ----------
    alpha : float, default 100.0
        Ridge penalty on every coefficient but the intercept, in units of standardised features. Fitted-Q
        with a linear Q and a max can diverge (Baird 1995; Tsitsiklis & Van Roy 1997); on the simulated
        clinics (≈ 3,700 transitions) α = 1 diverged after ~10 iterations, α = 100 converged (change < 1e-4
        by iteration 25).
    gamma : float, default 0.9
        Discount of the next cycles' utility.
    iterations : int, default 25
        Fitted-Q iterations (a horizon of ``iterations`` cycles is propagated exactly).
    doses : tuple of float, default ``DOSE_GRID_MG_M2``
        Doses (mg/m²) the max in the targets runs over.
    max_change : float, default 0.25
        Largest relative change from the previous cycle's dose (the clinics' label reduction is 25 %).

    Attributes
    ----------
    mean_, scale_ : ndarray
        Mean and sd of every ``STATE_COLUMNS`` column and, last, of the dose (non-missing values).
    coef_ : ndarray
        ``w`` of ``Q(s, d) = φ(s, d)·w``.
    n_transitions_ : int
        Transitions the final regression used.
    history_ : list of float
        Largest absolute coefficient change at each iteration (convergence).
    """

    def __init__(self, alpha: float = 100.0, gamma: float = 0.9, iterations: int = 25,
                 doses: tuple[float, ...] = DOSE_GRID_MG_M2, max_change: float = 0.25) -> None:
        self.alpha = alpha
        self.gamma = gamma
        self.iterations = iterations
        self.doses = doses
        self.max_change = max_change

    # -- features ---------------------------------------------------------------------------------------
    def set_scaling(self, sums: dict[str, np.ndarray]) -> DoseAdjuster:
        """Feature scaling from (combined) :func:`scaling_sums`; a constant or unseen column gets sd 1."""
        count = np.maximum(sums["count"], 1.0)
        mean = sums["sum"] / count
        sd = np.sqrt(np.maximum(sums["m2"], 0.0) / count)
        self.mean_ = mean
        self.scale_ = np.where(sd > 1e-8 * np.maximum(np.abs(mean), 1.0), sd, 1.0)
        return self

    @property
    def n_features_(self) -> int:
        m = len(STATE_COLUMNS)
        return 1 + m + len(MISSABLE) + 2 + m

    def _state_terms(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        raw = state_matrix(frame)
        z = (raw - self.mean_[:-1]) / self.scale_[:-1]
        missing = np.isnan(raw)
        z[missing] = 0.0
        indicators = missing[:, [STATE_COLUMNS.index(c) for c in MISSABLE]].astype(float)
        return z, indicators

    def features(self, frame: pd.DataFrame, dose) -> np.ndarray:
        """``φ(s, d)``: 1, standardised state, missing indicators, d, d², d × state (one row per record)."""
        z, indicators = self._state_terms(frame)
        return self._phi(z, indicators, np.broadcast_to(np.asarray(dose, dtype=float), (len(z),)))

    def _phi(self, z: np.ndarray, indicators: np.ndarray, dose: np.ndarray) -> np.ndarray:
        d = ((dose - self.mean_[-1]) / self.scale_[-1])[:, None]
        return np.hstack([np.ones((len(z), 1)), z, indicators, d, d * d, d * z])

    def q_values(self, frame: pd.DataFrame, doses) -> np.ndarray:
        """``Q(s, d)`` of every record (rows) and dose in ``doses`` (columns)."""
        doses = np.asarray(doses, dtype=float)
        z, indicators = self._state_terms(frame)
        coef = getattr(self, "coef_", None)
        if coef is None:
            return np.zeros((len(z), len(doses)))
        return np.column_stack([self._phi(z, indicators, np.full(len(z), d)) @ coef for d in doses])

    def allowed(self, frame: pd.DataFrame, doses, max_dose) -> np.ndarray:
        """Which ``doses`` each record may get: within ``± max_change`` of its previous dose (any dose at cycle
        1) and at most ``max_dose`` (scalar or per record); a record whose band lies above its cap may get
        any dose up to the cap."""
        doses = np.asarray(doses, dtype=float)[None, :]
        previous = pd.to_numeric(frame["previous_dose_mg_m2"], errors="coerce").to_numpy(dtype=float)[:, None]
        cap = np.broadcast_to(np.asarray(max_dose, dtype=float), (len(frame),))[:, None]
        tolerance = 1e-9
        band = np.where(np.isnan(previous), True,
                        (doses >= previous * (1 - self.max_change) - tolerance)
                        & (doses <= previous * (1 + self.max_change) + tolerance))
        capped = doses <= cap + tolerance
        mask = band & capped
        empty = ~mask.any(axis=1)
        mask[empty] = capped[empty]
        return mask

    def best_dose(self, frame: pd.DataFrame, doses=DOSE_GRID_MG_M2, max_dose=np.inf) -> np.ndarray:
        """The dose of highest Q among the allowed ones (:meth:`allowed`) for every record; a record whose cap
        is below every dose in ``doses`` gets its cap."""
        doses = np.asarray(doses, dtype=float)
        mask = self.allowed(frame, doses, max_dose)
        q = np.where(mask, self.q_values(frame, doses), -np.inf)
        choice = doses[q.argmax(axis=1)]
        cap = np.broadcast_to(np.asarray(max_dose, dtype=float), (len(frame),))
        return np.where(mask.any(axis=1), choice, np.minimum(cap, doses.min()))

    # -- fitting ----------------------------------------------------------------------------------------
    def targets(self, transitions: Transitions) -> np.ndarray:
        """``y = r + γ max_{d'} Q_k(s', d')`` at the current coefficients (``r`` at a terminal transition)."""
        y = transitions.reward.astype(float).copy()
        go_on = ~transitions.terminal
        if getattr(self, "coef_", None) is not None and go_on.any() and self.gamma > 0:
            nxt = transitions.next_state[go_on]
            q = np.where(self.allowed(nxt, self.doses, np.inf), self.q_values(nxt, self.doses), -np.inf)
            y[go_on] += self.gamma * q.max(axis=1)
        return y

    def ridge_sums(self, transitions: Transitions) -> dict[str, np.ndarray]:
        """The sufficient statistics of this iteration's ridge regression on ``transitions``:
        ``A = Σ φφᵀ``, ``b = Σ φ y`` and ``n`` — what a site sends."""
        phi = self.features(transitions.state, transitions.dose)
        y = self.targets(transitions)
        return {"gram": phi.T @ phi, "moment": phi.T @ y, "n": np.array([float(len(y))])}

    def clipped_ridge_sums(self, transitions: Transitions, feature_clip: float = FEATURE_NORM_CLIP
                           ) -> dict[str, np.ndarray]:
        """:meth:`ridge_sums` with every row's contribution bounded, for a DP release (Wang 2018, §3;
        Sheffet 2017): ``φ`` scaled to L2 norm at most ``feature_clip`` and ``y`` clipped to
        ``± target_bound(gamma)``, so one transition changes ``A`` by at most ``feature_clip²`` and ``b`` by
        at most ``feature_clip · target_bound(gamma)`` in L2 (Frobenius) norm, and ``n`` by 1."""
        phi = self.features(transitions.state, transitions.dose)
        norms = np.linalg.norm(phi, axis=1)
        phi = phi * np.minimum(1.0, feature_clip / np.maximum(norms, 1e-300))[:, None]
        bound = target_bound(self.gamma)
        y = np.clip(self.targets(transitions), -bound, bound)
        return {"gram": phi.T @ phi, "moment": phi.T @ y, "n": np.array([float(len(y))])}

    def solve(self, sums: dict[str, np.ndarray]) -> np.ndarray:
        """``w`` solving ``(A + α P) w = b`` (``P`` the identity without the intercept)."""
        penalty = np.eye(len(sums["moment"])) * self.alpha
        penalty[0, 0] = 0.0
        return np.linalg.solve(sums["gram"] + penalty, sums["moment"])

    def fit(self, transitions: Transitions) -> DoseAdjuster:
        """Pooled fitted-Q iteration on ``transitions`` (the same loop a federation runs over its sites)."""
        return fitted_q_iteration(self, lambda: [scaling_sums(transitions)],
                                  lambda adjuster: [adjuster.ridge_sums(transitions)])

    # -- persistence ------------------------------------------------------------------------------------
    def get_params(self) -> dict:
        return {"alpha": self.alpha, "gamma": self.gamma, "iterations": self.iterations,
                "doses": list(self.doses), "max_change": self.max_change}

    def to_dict(self) -> dict:
        """JSON-safe form (for the policy bundle's ``policy.json`` under ``"adjustment"``)."""
        return {"method": "fitted-Q iteration (Ernst et al. 2005), linear Q, ridge", "params": self.get_params(),
                "state_columns": list(STATE_COLUMNS), "missing_indicators": list(MISSABLE),
                "reward": {"response": 1.0, "toxicity_grade3": -W_TOXICITY, "chf": -W_CHF},
                "mean": self.mean_.tolist(), "scale": self.scale_.tolist(), "coef": self.coef_.tolist(),
                "n_transitions": int(self.n_transitions_), "history": [float(h) for h in self.history_]}

    @classmethod
    def from_dict(cls, data: dict) -> DoseAdjuster:
        """The adjuster :meth:`to_dict` wrote; a different state definition is a ``ValueError``."""
        if list(data["state_columns"]) != list(STATE_COLUMNS) or list(data["missing_indicators"]) != list(MISSABLE):
            raise ValueError("adjustment: the bundle's state columns differ from this version's STATE_COLUMNS")
        params = dict(data["params"])
        params["doses"] = tuple(float(d) for d in params["doses"])
        adjuster = cls(**params)
        adjuster.mean_ = np.asarray(data["mean"], dtype=float)
        adjuster.scale_ = np.asarray(data["scale"], dtype=float)
        adjuster.coef_ = np.asarray(data["coef"], dtype=float)
        if adjuster.coef_.shape != (adjuster.n_features_,) or adjuster.mean_.shape != (len(STATE_COLUMNS) + 1,):
            raise ValueError(f"adjustment: expected {adjuster.n_features_} coefficients, got {adjuster.coef_.shape}")
        adjuster.n_transitions_ = int(data["n_transitions"])
        adjuster.history_ = [float(h) for h in data["history"]]
        return adjuster


def fitted_q_iteration(adjuster: DoseAdjuster, scaling_fn: Callable[[], list[dict]],
                       ridge_fn: Callable[[DoseAdjuster], list[dict]]) -> DoseAdjuster:
    """Fitted-Q iteration from summed statistics: ``scaling_fn()`` returns each site's :func:`scaling_sums`,
    ``ridge_fn(adjuster)`` each site's :meth:`DoseAdjuster.ridge_sums` at the adjuster's current ``coef_``
    (None before the first iteration, so the first targets are the rewards). Pooled fitting passes one
    "site"; the ServerApp (``server.adjustment_phase``) passes Flower queries. Returns the fitted adjuster."""
    adjuster.set_scaling(combine_scaling(scaling_fn()))
    adjuster.coef_ = None
    adjuster.history_ = []
    for _ in range(adjuster.iterations):
        sums = add_sums(ridge_fn(adjuster))
        coef = adjuster.solve(sums)
        previous = adjuster.coef_
        adjuster.history_.append(float(np.max(np.abs(coef - (0.0 if previous is None else previous)))))
        adjuster.coef_ = coef
        adjuster.n_transitions_ = int(sums["n"][0])
    if not math.isfinite(float(np.sum(adjuster.coef_))):
        raise FloatingPointError("fitted-Q iteration diverged (non-finite coefficients)")
    return adjuster
