"""The closed loop: a deployed policy treats new patients, their outcomes return to the sites, the federation refits.

Issue 12 item 4 (``fednano simulate --deploy-cycles K``). After the first federated run has installed version 1
at the simulated clinics, each deployment period:

1. every clinic treats ``patients`` new patients of its own population (:func:`simulation.policy_rollout.
   treat_clinic`, up to the clinic's ``max_cycles`` each) with the policy it *serves*: the version installed in
   its own store (:class:`client.policy_store.PolicyStore`, verified against its kit's trust key), with the
   dose adjustment of later cycles (``recommend_frame(adjust=True)``), each record carrying the usual
   formulation the site stored with that version (as its service gives it: :class:`client.site_gate.GatedPolicy`);
   standard of care where nothing is
   installed, or where the release gate found the installed version significantly worse than standard of
   care on that site's own logs: the verdict the coordinator sent the site with the bundle, read from the
   site's store as ``fednano serve`` reads it (:meth:`client.policy_store.PolicyStore.site_gate`);
2. the simulator produces the true outcomes and the wearable rows of those cycles, and the clinic appends
   them to its own ``episodes.csv`` and ``vitals.csv`` — then the site is validated again exactly as any site
   file (:func:`shared.validation.load_site`), so a period that wrote a bad row stops the loop;
3. the same patients (same seed) are treated under standard of care too, which only the simulator can do:
   the period's **cost against standard of care** is the difference of the mean true utilities per cycle. The
   clinics' practice gives every cycle, while every policy applies the label's hard rules (no dose without a
   pre-cycle blood count, holds, caps: ``safety_limits``), so the same patients are treated a third time by
   standard of care under those rules (:func:`simulation.policy_evaluation.standard_of_care`, as the
   evaluation judges every version): **cost against standard of care under the hard rules** is what the
   policy's own choices cost, the difference of the two costs what the rules cost (measured: at a clinic that
   misses 14 % of blood counts the holds alone cost 0.05 utility per cycle);
4. the federation runs again on the grown data (same kit, so the next version number), gates and ships.

Every recommendation a clinic makes is logged with the options it was drawn from and their probabilities
(``decisions.csv``, :mod:`client.decision_log`): probability 1 without exploration. With ``exploration``
(``--explore``, :mod:`shared.exploration`) the first cycles are randomised inside the hard rules: a dose spread
around what the clinic serves, the formulation in equipoise with what it serves (judged by the served structured
policy's models; while standard of care is served, by the models of the last candidate the gate stopped, or of
the installed version the site's own gate found worse) and, when the last candidate was stopped by the gate in
equipoise, a trial arm of that candidate. The period's figures count the first cycles that got the trial arm's
formulation, another formulation in equipoise or another dose; its cost against standard of care includes theirs.

Each period's own figures use the rollout's *true expected* outcomes (``utility`` per cycle, as
:mod:`simulation.policy_rollout` defines it); each version's value / oracle is measured exactly as version 1's
(:func:`simulation.policy_evaluation.evaluate_policies`, fresh first-cycle patients of every clinic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from client.decision_log import append_decisions, decision_rows
from client.policy_store import PolicyStore, site_store_root
from client.site_gate import UsualFormulations
from shared.dosing_policy import ActionSpace, DosingPolicy, SafetyRules
from shared.exploration import Exploration, draw
from shared.policy_loader import AnyPolicy, policy_from_bundle
from shared.validation import load_site
from simulation.clinics import World
from simulation.policy_evaluation import standard_of_care as soc_under_rules
from simulation.policy_rollout import standard_of_care, treat_clinic


@dataclass(frozen=True)
class Served:
    """What a clinic serves in a period: ``version`` (None: standard of care) and why; ``installed``: the version
    its store holds, loaded, served or not; ``usual``: the usual formulations the site stored with it."""

    version: int | None
    reason: str
    installed: AnyPolicy | None = field(default=None, compare=False, repr=False)
    usual: UsualFormulations | None = field(default=None, compare=False, repr=False)


def served_policy(site: Path, trust_key: Path) -> tuple[AnyPolicy | None, Served]:
    """The policy a site serves: its store's installed version, unless the verdict stored with that version (the
    release gate on this site's own logs) finds it worse than standard of care — the product's rule
    (:mod:`client.site_gate`); the simulator's standard of care is then the clinic's own practice."""
    store = PolicyStore(site_store_root(site), trust_key)
    installed = store.installed_path()
    if installed is None:
        return None, Served(None, "no policy installed: standard of care")
    policy = policy_from_bundle(installed, trust_key)  # the ensemble or the structured policy
    gate = store.site_gate()
    gate = gate if gate is not None and gate.version == policy.version else None
    if gate is not None and gate.worse:
        return None, Served(None, f"v{policy.version} installed, but the site's own logs find it worse than "
                                  f"standard of care ({gate.verdict.describe()}): standard of care served", policy,
                            gate.usual)
    return policy, Served(policy.version, f"v{policy.version} installed and served", policy,
                          None if gate is None else gate.usual)


def append_rows(path: Path, rows: pd.DataFrame) -> None:
    """Append ``rows`` to the site CSV at ``path`` in the column order of its header."""
    header = pd.read_csv(path, nrows=0).columns.tolist()
    missing = sorted(set(header) - set(rows.columns))
    if missing:
        raise ValueError(f"{path}: the new rows lack the column(s) {missing}")
    rows[header].to_csv(path, mode="a", header=False, index=False)


FIXED = Exploration(trial_share=0.0, spread_share=0.0)
"""No exploration: each decision's one option, with probability 1."""


class Recommender:
    """A clinic's telemedicine service for one period: what it serves (``policy``, None: standard of care as the
    clinic practises it, ``soc``), randomised on first cycles by ``exploration`` (with the ``trial`` arm if
    any), every decision logged with its options (``log``: rows of ``decisions.csv``). ``judge``: while
    standard of care is served, a structured policy whose models say which other formulation is in equipoise
    with it (:meth:`shared.structured_policy.StructuredDosingPolicy.equipoise_with`): the candidate the gate
    stopped, or the installed version the site's own gate found worse. ``usual``: the site's usual formulations,
    given to every record the policies see (:meth:`client.site_gate.UsualFormulations.annotate`)."""

    def __init__(self, policy: AnyPolicy | None, soc, exploration: Exploration | None, trial: AnyPolicy | None,
                 rng: np.random.Generator, judge: AnyPolicy | None = None, usual: UsualFormulations | None = None):
        self.policy, self.soc, self.exploration, self.trial, self.rng = policy, soc, exploration, trial, rng
        self.usual = usual
        self.judge = judge if hasattr(judge, "equipoise_with") else None
        self.rules = policy or trial or self.judge or DosingPolicy(  # type: ignore[arg-type]
            encoder=None, members={}, formulations={}, action_space=ActionSpace(), safety=SafetyRules())
        self.log: list[pd.DataFrame] = []
        self.first_cycles = self.trial_arm = self.equipoise = self.spread = 0

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.reset_index(drop=True)
        if self.usual is not None:
            frame = self.usual.annotate(frame)
        first = frame["cycle"].to_numpy(dtype=int) == 1
        self.first_cycles += int(first.sum())
        exploring = self.exploration is not None and first.any()
        alternatives = None
        if self.policy is None:
            served = self.soc(frame)
            if exploring and self.judge is not None:
                rows = np.flatnonzero(first)
                alternatives = self.judge.equipoise_with(frame.iloc[rows], served.iloc[rows])
                alternatives["row"] = rows[alternatives["row"].to_numpy(dtype=int)]
        elif exploring and hasattr(self.policy, "recommend_with_alternatives"):  # the structured policy
            served, alternatives = self.policy.recommend_with_alternatives(frame)
        else:
            served = self.policy.recommend_frame(frame, adjust=True)
        served = served.reset_index(drop=True)
        arms: list[tuple[float, pd.DataFrame]] = [(1.0, served)]
        if exploring and self.trial is not None:
            shares = self.exploration.arm_shares(trial=True)
            arms = [(shares[0], served), (shares[1], self.trial.recommend_frame(frame, adjust=False))]
        cap, _ = self.rules.safety_limits(frame)
        grid = self.rules.action_space.doses()
        options = FIXED.options([(1.0, served)], cap, grid)  # one option per decision, probability 1
        if exploring:
            randomised = self.exploration.options(arms, cap, grid, alternatives)
            options = pd.concat([options[~first[options["row"].to_numpy()]],
                                 randomised[first[randomised["row"].to_numpy()]]], ignore_index=True)
        chosen = draw(options, self.rng).set_index("row")
        giving = np.flatnonzero(served["action"].astype(str).to_numpy() == "give")
        version = None if self.policy is None else self.policy.version
        self.log.append(decision_rows(frame, options[options["row"].isin(giving)], version))
        actions = served.copy()
        if exploring:
            rows = chosen.index[first[chosen.index]]
            given = chosen.loc[rows, ["formulation_id", "dose_mg_m2", "interval_days"]]
            differs = ~same_action(actions.loc[rows], given)
            formulation = given["formulation_id"].astype(str).to_numpy()
            other = actions.loc[rows, "formulation_id"].astype(str).to_numpy() != formulation
            trial_f = (arms[-1][1].loc[rows, "formulation_id"].astype(str).to_numpy() == formulation
                       if len(arms) > 1 else np.zeros(len(rows), dtype=bool))
            changed = rows[differs]  # only where every arm gives (shared.exploration): the served action was "give"
            actions.loc[changed, ["formulation_id", "dose_mg_m2", "interval_days"]] = given[differs].to_numpy()
            self.spread += int((differs & ~other).sum())  # the served formulation, another dose
            self.trial_arm += int((other & trial_f).sum())
            self.equipoise += int((other & ~trial_f).sum())
        return actions

    def decisions(self) -> pd.DataFrame:
        return pd.concat(self.log, ignore_index=True) if self.log else pd.DataFrame()


def same_action(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """Row by row: the same formulation at the same dose."""
    return (a["formulation_id"].astype(str).to_numpy() == b["formulation_id"].astype(str).to_numpy()) & (
        np.abs(a["dose_mg_m2"].to_numpy(dtype=float) - b["dose_mg_m2"].to_numpy(dtype=float)) < 1e-9)


def treat_period(world: World, sites: dict[str, tuple[Path, Path]], period: int, patients: int,
                 seed: int, exploration: Exploration | None = None,
                 trials: dict[str, AnyPolicy] | None = None, candidate: AnyPolicy | None = None) -> dict[str, dict]:
    """One deployment period at every clinic of ``sites`` (name → (site folder, trust key)): treat, append,
    re-validate. ``exploration``: randomise first cycles (module docstring), with ``trials[clinic]`` as the
    trial arm where given; where standard of care is served, formulations in equipoise with it are judged by
    ``candidate`` (the last candidate the gate stopped) or else by the installed version. Returns per site
    what was served, the patients and cycles treated, the first cycles explored, and the mean true utility per
    cycle under the served policy and under standard of care for the same patients."""
    result = {}
    for clinic in world.clinics:
        if clinic.name not in sites:
            continue
        folder, trust = sites[clinic.name]
        policy, served = served_policy(folder, trust)
        soc = standard_of_care(world, clinic)
        period_seed = seed * 1000 + period
        trial = (trials or {}).get(clinic.name) if exploration is not None else None
        judge = (candidate or served.installed) if exploration is not None and policy is None else None
        recommender = Recommender(policy, soc, exploration, trial, np.random.default_rng([clinic.seed, period_seed, 7]),
                                  judge, served.usual)
        judged_by = None if recommender.judge is None else (
            "the stopped candidate" if recommender.judge is candidate else f"installed v{served.installed.version}")
        treated = treat_clinic(world, clinic, recommender, patients, period_seed, ids=f"D{period}")
        baseline = treat_clinic(world, clinic, soc, patients, period_seed, ids=f"D{period}").cycles
        ruled = treat_clinic(world, clinic, soc_under_rules(world, clinic, recommender.rules), patients, period_seed,
                             ids=f"D{period}").cycles
        append_rows(folder / "episodes.csv", treated.episodes)
        if (folder / "vitals.csv").exists():
            append_rows(folder / "vitals.csv", treated.vitals)
        append_decisions(folder, recommender.decisions())
        load_site(folder)  # the grown site is validated as any site file; SiteDataError stops the loop
        value, soc_value = float(treated.cycles["utility"].mean()), float(baseline["utility"].mean())
        soc_ruled = float(ruled["utility"].mean())
        result[clinic.name] = {
            "served_version": served.version, "served": served.reason, "patients": patients,
            "cycles": len(treated.cycles), "value_per_cycle": value, "soc_value_per_cycle": soc_value,
            "cost_vs_soc": soc_value - value,
            "soc_under_rules_value_per_cycle": soc_ruled, "cost_vs_soc_under_rules": soc_ruled - value,
            "toxicity_rate": float(np.mean(treated.cycles["p_toxicity"])),
            "soc_toxicity_rate": float(np.mean(baseline["p_toxicity"])),
            "exploration": {"first_cycles": recommender.first_cycles, "trial_arm": recommender.trial_arm,
                            "equipoise": recommender.equipoise, "dose_spread": recommender.spread,
                            "trial": trial is not None,
                            "equipoise_judged_by": judged_by}}
    return result
