"""Safe exploration of first-cycle decisions, each recommendation drawn with a known probability and logged.

A policy learned from logs can only be proven on the actions the logs cover (:mod:`client.ope`: no credit off
their support), and the logs of a site that always does the same thing cover nothing else. Exploration makes
the data the next version needs, at a bounded, measured cost, inside the hard safety rules. Three sources of
randomisation, applied to **first cycles** only (the decision the policy's models and the release gate are
about; later cycles follow the served policy's adjustment and safety rules from whatever was given):

1. **a trial arm** — a candidate the release gate could neither pass nor find worse than standard of care
   (its 95 % interval of the improvement contains 0: equipoise between the two, the condition for
   randomising patients between treatments; Freedman, NEJM 1987), and whose interval rules out a loss larger
   than ``trial_margin`` utility per patient (a non-inferiority margin: a gate too noisy to bound the loss,
   e.g. under DP, starts no trial; :meth:`Exploration.allows_trial`). Each patient gets the trial arm's
   action with probability ``trial_share``, otherwise what the site serves (its installed version, or standard
   of care). This is a randomised comparison of the two policies at the sites, the evidence a clinic would
   ask for; its cost is at most ``trial_share`` × the candidate's shortfall, and the next gate values the
   candidate on exactly weighted data;
2. **a formulation in equipoise** — the best-scoring other formulation whose best supported action's optimistic
   utility reaches the pessimistic score of what the site serves (their confidence bounds overlap, or it is
   better: the data do not show it worse) takes ``equipoise_share`` of the served arm's probability
   (:meth:`shared.structured_policy.StructuredDosingPolicy.equipoise_with`); one per decision, so its own dose
   keeps 0.2 × 0.6 = 0.12 ≥ ``shared.off_policy.MIN_SUPPORT`` and the next gate values it on the support. The
   judge is the served structured policy; **while standard of care is served**, the last candidate the gate
   stopped, or the installed version the site's own gate found worse (:class:`simulation.deployment.
   Recommender`): otherwise a candidate whose actions are off the logs' support is stopped by the gate's
   pessimism, standard of care is served, and the logs never come to cover what the candidate would do (the
   lock-out measured in BENCHMARKS.md, "Closed loop with exploration", seed 2). A formulation the models are
   sure is worse is never tried;
3. **a dose spread** — the arm's dose is kept with probability ``1 − spread_share``; otherwise one of the
   other doses at most ``spread_steps`` dose steps and ±``dose_spread`` from it, uniformly (one step each way by
   default, so that every option keeps a probability the off-policy estimate can use: with the trial arm,
   0.5 × 0.4 / 2 = 0.1, an importance weight of 10 = ``shared.off_policy.W_MAX``). A spread dose is
   never above the hard rules' cap for the record (hepatic reduction, cumulative limit, dose-change limit;
   :meth:`DosingPolicy.safety_limits`), and never above the arm's own dose when a rule capped that dose (the
   monotone guard, the toxicity ceiling): exploration never raises a dose a safety rule lowered. Dose-finding
   around the chosen dose is how the dose–response slope of each formulation becomes estimable (randomised dose
   spread: Thall & Cook, Biometrics 2004; conservative exploration: Wu, Shariff, Lattimore & Szepesvári,
   NeurIPS 2016).

A decision where an arm withholds or stops is not explored: the served action is given with probability 1.

The options of each decision with their probabilities are what the telemedicine service logs
(``decisions.csv``, :data:`shared.schema.DECISION_COLUMNS`), so the site's off-policy estimate divides by the
exact probability of the action given (:func:`client.ope.site_value_sums`).

Example
-------
>>> exploration = Exploration(trial_share=0.5)                                          # doctest: +SKIP
>>> options = exploration.options([(0.5, served_actions), (0.5, trial_actions)], cap, dose_grid)
>>> chosen = draw(options, np.random.default_rng(0))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

UPWARD_LIMITING_RULES = frozenset({"monotone-guard", "toxicity-ceiling"})
"""Rules that lowered a policy's own dose: a spread dose never goes above a dose one of them set."""

OPTION_COLUMNS = ("row", "formulation_id", "dose_mg_m2", "interval_days", "probability")


@dataclass(frozen=True)
class Exploration:
    """How much to explore (module docstring).

    Parameters
    ----------
    trial_share : float, default 0.5
        Probability a first-cycle patient gets the trial arm's action, when there is a trial arm (1:1
        allocation, the usual randomised comparison).
    dose_spread : float, default 0.25
        Relative half-width of the dose spread (±25 %, the dose-change band the hard rules allow between cycles).
    spread_share : float, default 0.4
        Probability of another dose step within the spread than the arm's own dose.
    spread_steps : int, default 1
        How many dose steps the spread reaches each way (within ``dose_spread``).
    equipoise_share : float, default 0.2
        Probability, within the served arm, of the other formulation in equipoise with the served action (module
        docstring, item 2).
    trial_margin : float, default 0.1
        Largest loss per patient against standard of care (utility; the gate's lower 95 % bound) a candidate's
        trial may risk: about the gap between standard of care and the oracle's best action on the default world.
    """

    trial_share: float = 0.5
    dose_spread: float = 0.25
    spread_share: float = 0.4
    spread_steps: int = 1
    equipoise_share: float = 0.2
    trial_margin: float = 0.1

    def __post_init__(self):
        for name in ("trial_share", "dose_spread", "spread_share", "equipoise_share"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Exploration.{name} = {value!r}: expected a number in [0, 1)")
        if self.spread_steps < 1:
            raise ValueError(f"Exploration.spread_steps = {self.spread_steps!r}: expected 1 or more")

    def allows_trial(self, gate: dict) -> bool:
        """Whether a candidate the gate judged (``shared.off_policy.GateResult.to_dict``) may be a trial arm: in
        equipoise (lower bound ≤ 0 < upper bound) and no loss beyond ``trial_margin`` (lower > −margin)."""
        lower, upper = gate.get("lower"), gate.get("upper")
        if lower is None or upper is None or self.trial_share == 0:
            return False
        return upper > 0 and -self.trial_margin < lower <= 0

    def arm_shares(self, trial: bool) -> tuple[float, ...]:
        """The served arm's share, then the trial arm's if there is one."""
        return (1.0 - self.trial_share, self.trial_share) if trial else (1.0,)

    def options(self, arms: Sequence[tuple[float, pd.DataFrame]], cap: np.ndarray, dose_grid: np.ndarray,
                alternatives: pd.DataFrame | None = None) -> pd.DataFrame:
        """Every option of each decision with its probability (rows of :data:`OPTION_COLUMNS`).

        ``arms``: (share, actions) pairs whose shares sum to 1, the first being what the site serves; each
        actions frame is aligned with the records (columns action, formulation_id, dose_mg_m2, interval_days,
        optionally ``rules``: lists of :class:`shared.dosing_policy.RuleApplied`). ``cap``: the hard rules' dose
        cap per record; ``dose_grid``: the allowed dose steps (mg/m²). ``alternatives``: actions in equipoise
        with the served one (row, formulation_id, dose_mg_m2, interval_days; :meth:`shared.structured_policy.
        StructuredDosingPolicy.recommend_with_alternatives`), which share ``equipoise_share`` of the served
        arm's probability equally; an optional column ``ceiling`` caps their spread doses. Options of the same
        action from two arms are merged (probabilities added)."""
        shares = np.array([share for share, _ in arms], dtype=float)
        if not np.isclose(shares.sum(), 1.0) or (shares < 0).any():
            raise ValueError(f"arm shares {shares.tolist()} must be non-negative and sum to 1")
        n = len(arms[0][1])
        giving = np.ones(n, dtype=bool)
        for _, actions in arms:
            giving &= actions["action"].astype(str).to_numpy() == "give"
        rows = np.flatnonzero(giving)
        grid = np.asarray(dose_grid, dtype=float)
        parts = []
        for i, (share, actions) in enumerate(arms):
            if share <= 0:
                continue
            taken = actions.iloc[rows].assign(row=rows)
            limited = np.array([any(r.rule in UPWARD_LIMITING_RULES for r in rules) for rules in taken["rules"]],
                               dtype=bool) if "rules" in taken else np.zeros(rows.size, dtype=bool)
            own = np.full(rows.size, share)
            if i == 0 and alternatives is not None and self.equipoise_share > 0:
                alt = alternatives[np.isin(alternatives["row"].to_numpy(), rows)]
                k = alt.groupby("row").size()
                own = np.where(k.reindex(rows).fillna(0).to_numpy() > 0, share * (1 - self.equipoise_share), share)
                if len(alt):
                    alt_limited = pd.Series(limited, index=rows).reindex(alt["row"]).to_numpy()
                    ceiling = alt["ceiling"].to_numpy(dtype=float) if "ceiling" in alt else None
                    parts.append(self._spread(alt, share * self.equipoise_share / k.reindex(alt["row"]).to_numpy(),
                                              alt_limited, cap, grid, ceiling))
            parts.append(self._spread(taken, own, limited, cap, grid))
        served = arms[0][1]
        still = np.flatnonzero(~giving)  # not explored: the served action, probability 1
        parts.append(pd.DataFrame({"row": still, "formulation_id": served["formulation_id"].to_numpy()[still],
                                   "dose_mg_m2": served["dose_mg_m2"].to_numpy(dtype=float)[still],
                                   "interval_days": served["interval_days"].to_numpy(dtype=float)[still],
                                   "probability": 1.0}))
        options = pd.concat(parts, ignore_index=True)
        options = options.groupby(["row", "formulation_id", "dose_mg_m2", "interval_days"], as_index=False,
                                  dropna=False, sort=True)["probability"].sum()
        return options[list(OPTION_COLUMNS)]

    def _spread(self, actions: pd.DataFrame, share: np.ndarray, limited: np.ndarray, cap: np.ndarray,
                grid: np.ndarray, ceiling: np.ndarray | None = None) -> pd.DataFrame:
        """Options of ``actions`` (one per line: row, formulation_id, dose_mg_m2, interval_days) with
        probability ``share`` each: the action's dose, and the spread around it within the caps (``limited``:
        a safety rule lowered that dose, so nothing above it; ``ceiling``: a further dose limit per line)."""
        rows = actions["row"].to_numpy(dtype=int)
        dose = actions["dose_mg_m2"].to_numpy(dtype=float)
        upper = np.where(limited, np.minimum(dose, cap[rows]), cap[rows])  # a spread dose is never above either
        if ceiling is not None:
            upper = np.minimum(upper, np.maximum(ceiling, dose))
        step = float(np.min(np.diff(grid))) if grid.size > 1 else 1.0
        distance = np.abs(grid[None, :] - dose[:, None])
        near = (distance <= self.dose_spread * dose[:, None] + 1e-9) & (distance <= self.spread_steps * step + 1e-9) \
            & (grid[None, :] <= upper[:, None] + 1e-9) & (distance > 1e-9) & (self.spread_share > 0)
        others = near.sum(axis=1)
        own = np.where(others > 0, 1.0 - self.spread_share, 1.0) * share
        r_i, g_i = np.nonzero(near)
        spread = self.spread_share * share[r_i] / np.maximum(others[r_i], 1)
        formulation = actions["formulation_id"].to_numpy()
        interval = actions["interval_days"].to_numpy(dtype=float)
        return pd.DataFrame({"row": np.concatenate([rows, rows[r_i]]),
                             "formulation_id": np.concatenate([formulation, formulation[r_i]]),
                             "dose_mg_m2": np.concatenate([dose, grid[g_i]]),
                             "interval_days": np.concatenate([interval, interval[r_i]]),
                             "probability": np.concatenate([own, spread])})


def draw(options: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """One option per decision, drawn with its probability: the chosen options (one per ``row``, sorted by
    row) with their probability; ``options`` gets a boolean ``chosen`` column in place."""
    uniform = rng.random(int(options["row"].max()) + 1 if len(options) else 0)
    ordered = options.sort_values(["row", "formulation_id", "dose_mg_m2", "interval_days"], kind="stable")
    cumulative = ordered.groupby("row")["probability"].cumsum() / ordered.groupby("row")["probability"].transform(
        "sum")
    before = cumulative - ordered["probability"] / ordered.groupby("row")["probability"].transform("sum")
    u = uniform[ordered["row"].to_numpy()]
    hit = (before.to_numpy() <= u) & (u < cumulative.to_numpy())
    last = ~ordered["row"].duplicated(keep="last").to_numpy()  # rounding: the last option takes u ≈ 1
    no_hit = ~pd.Series(hit).groupby(ordered["row"].to_numpy()).transform("any").to_numpy()
    hit |= last & no_hit
    options["chosen"] = False
    options.loc[ordered.index[hit], "chosen"] = True
    return options[options["chosen"]].sort_values("row").reset_index(drop=True)
