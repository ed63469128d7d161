"""Multi-cycle rollouts of dosing policies in the simulated world: a policy's value over a whole treatment.

Fresh patients of each clinic (its own population, measurement habits and wearables) are treated cycle by
cycle. Each cycle the policy sees only the patient's record as a site would hold it — the flat record frame
of :func:`shared.patient_record.records_frame`, built from the observed episode rows and wearable readings by
:func:`shared.dose_adjustment.cycle_frames` — and returns an action per patient (``give`` with formulation,
dose and interval; ``withhold``: no drug this cycle; ``stop``). The truth is the SAME code the clinics' logs
come from (:mod:`simulation.clinics`: :func:`~simulation.clinics.realise_cycle` draws the outcomes from the
oracle's equations with the patient's random effects, :meth:`~simulation.clinics.Cohort.carry_over` carries
tumour burden, cumulative dose, neutrophil recovery and age to the next cycle, and
:meth:`~simulation.clinics.Cohort.stops` ends treatment on progression, heart failure or dropout), so a
policy is scored on the dynamics its training data came from.

Scores (per cycle, from the true state): the oracle's expected utility of the action taken
(P(response) − 0.5·P(grade ≥ 3 toxicity) − 3·P(heart failure), :mod:`simulation.oracle`), its response and
toxicity probabilities, and the myopic oracle's best utility at the same state (:func:`simulation.oracle.best_action`
over the dose grid and intervals). Per patient: the total utility over the cycles given. A policy's **value**
is the mean total utility per patient; its **regret** is the myopic oracle policy's value on the same
patients minus its own (the myopic oracle — the best single-cycle action every cycle from the true state — is
a strong reference, not the optimum over whole trajectories, so regret can be negative).

Policies here: standard of care (label dose by tumour type, label hepatic reduction, 25 % reduction after a
grade ≥ 3 toxicity and a week's delay — the clinics' habit, applied deterministically), any policy wrapped
with the fitted-Q dose adjuster from cycle 2 (:func:`with_adjustment`), a
:class:`shared.dosing_policy.DosingPolicy` (``recommend_frame``), and :class:`MyopicOracle`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.dose_adjustment import DOSE_GRID_MG_M2, DoseAdjuster, cycle_frames
from shared.schema import EPISODE_COLUMNS
from simulation.clinics import (
    LABEL_DOSE_MG_M2,
    LABEL_INTERVAL_D,
    TOXICITY_DOSE_REDUCTION,
    ClinicProfile,
    Cohort,
    World,
    cycle_vitals,
    label_hepatic_factor,
    measure_lab,
    observed_covariates,
    observed_outcomes,
    realise_cycle,
    treatment_columns,
)
from simulation.formulations import Formulations
from simulation.oracle import PatientState, best_action
from simulation.patients import sample_patients

Policy = Callable[[pd.DataFrame], pd.DataFrame]
"""Record frame → one action row per record: ``action`` (give / withhold / stop), ``formulation_id``,
``dose_mg_m2``, ``interval_days``."""
INTERVALS_D = (21.0, 28.0)
"""Intervals the oracle chooses from: the label intervals (q3w, q4w)."""
WITHHELD_INTERVAL_D = 7.0
"""A withheld cycle without an interval from the policy is a one-week delay."""


@dataclass(frozen=True)
class MyopicOracle:
    """Each cycle, the action of highest true expected utility for that cycle (``simulation.oracle.best_action``
    on the patient's TRUE state) — it sees what no policy can; the reference of the regret."""

    doses: tuple[float, ...] = DOSE_GRID_MG_M2
    intervals: tuple[float, ...] = INTERVALS_D

    def act(self, state: PatientState, catalogue: Formulations) -> pd.DataFrame:
        choice = best_action(state, catalogue, self.doses, self.intervals)
        chosen = np.asarray(catalogue.formulation_id)[choice.formulation]
        return pd.DataFrame({"action": "give", "formulation_id": chosen,
                             "dose_mg_m2": choice.dose_mg_m2, "interval_days": choice.interval_days})


def standard_of_care(world: World, clinic: ClinicProfile) -> Policy:
    """Fixed BSA dosing as the clinics practise it: the clinic's usual formulation; at cycle 1 the label dose
    and interval for the tumour type (Doxil/Caelyx SmPC) with the label hepatic reduction; later, the previous
    dose, reduced by 25 % (to 5 mg/m², at least 10) and delayed a week after a grade ≥ 3 toxicity."""
    usual = str(world.catalogue(clinic).formulation_id[int(np.argmax(clinic.formulation_preference))])

    def decide(frame: pd.DataFrame) -> pd.DataFrame:
        hepatic = label_hepatic_factor(frame["bilirubin_umol_l"].to_numpy(dtype=float))
        label = frame["tumour_type"].map(LABEL_DOSE_MG_M2).to_numpy(dtype=float)
        interval = frame["tumour_type"].map(LABEL_INTERVAL_D).to_numpy(dtype=float)
        first = np.clip(5.0 * np.rint(label * hepatic / 5.0), 10.0, 80.0)
        previous = frame["previous_dose_mg_m2"].to_numpy(dtype=float)
        toxic = frame["previous_toxicity_grade3"].to_numpy(dtype=float) == 1
        reduced = np.maximum(5.0 * np.rint(previous * TOXICITY_DOSE_REDUCTION / 5.0), 10.0)
        dose = np.where(np.isnan(previous), first, np.where(toxic, reduced, previous))
        return pd.DataFrame({"action": "give", "formulation_id": usual, "dose_mg_m2": dose,
                             "interval_days": interval + 7.0 * toxic})

    return decide


def with_adjustment(policy: Policy, adjuster: DoseAdjuster, doses: Sequence[float] = DOSE_GRID_MG_M2,
                    max_dose: float = max(DOSE_GRID_MG_M2)) -> Policy:
    """``policy`` with the dose of every given cycle from cycle 2 on chosen by the fitted-Q ``adjuster``
    (formulation and interval stay the policy's; ``max_dose`` caps it)."""

    def decide(frame: pd.DataFrame) -> pd.DataFrame:
        actions = policy(frame).reset_index(drop=True).copy()
        later = (frame["previous_dose_mg_m2"].notna().to_numpy() & (actions["action"] == "give").to_numpy())
        if later.any():
            dose = actions["dose_mg_m2"].to_numpy(dtype=float).copy()
            dose[later] = adjuster.best_dose(frame[later], doses, max_dose)
            actions["dose_mg_m2"] = dose
        return actions

    return decide


@dataclass
class Treated:
    """What treating a clinic's patients under a policy produced: the scored log (:func:`rollout_clinic`'s
    table) and the same cycles as the clinic's site files hold them (``episodes.csv`` and ``vitals.csv`` rows,
    schema of :mod:`shared.schema`), ready to be appended to the site's own data."""

    cycles: pd.DataFrame
    episodes: pd.DataFrame
    vitals: pd.DataFrame


def rollout_clinic(world: World, clinic: ClinicProfile, policy: Policy | MyopicOracle, n_patients: int,
                   seed: int) -> pd.DataFrame:
    """Treat ``n_patients`` fresh patients of ``clinic`` for up to its ``max_cycles`` under ``policy``.

    Returns one row per patient-cycle: ``patient``, ``cycle``, the action, formulation, dose and interval,
    the true expected ``utility``, ``p_response``, ``p_toxicity``, ``p_chf`` of the action, the myopic
    oracle's ``best_utility`` at that state, and the realised ``response``/``toxicity``/``chf``. The same
    ``seed`` gives the same patients for every policy."""
    return treat_clinic(world, clinic, policy, n_patients, seed).cycles


def treat_clinic(world: World, clinic: ClinicProfile, policy: Policy | MyopicOracle, n_patients: int, seed: int,
                 ids: str = "R") -> Treated:
    """:func:`rollout_clinic` that also keeps the clinic's records of the cycles it treated. ``ids`` tags the
    patient and episode identifiers (``<clinic>-<ids>P00012``, ``<clinic>-<ids>E0300012``), so records of
    different periods never collide in one site file. A withheld cycle is recorded as given at dose 0 (the
    site's records hold what was given); a stopped patient has no row for that cycle."""
    patient_rng = np.random.default_rng([clinic.seed, seed, 1])
    rng = np.random.default_rng([clinic.seed, seed, 2])
    patients = sample_patients(patient_rng, n_patients, clinic.population)
    pid = np.array([f"{clinic.name}-{ids}P{i:05d}" for i in range(n_patients)])
    catalogue = world.catalogue(clinic)
    formulation_ids = [str(i) for i in catalogue.formulation_id]
    oracle = policy if isinstance(policy, MyopicOracle) else MyopicOracle()
    cohort = Cohort.start(patients)
    previous_rows, previous_vitals, log, records, vitals_log = None, None, [], [], []

    for cycle in range(1, clinic.max_cycles + 1):
        idx = np.flatnonzero(cohort.active)
        if idx.size == 0:
            break
        state = cohort.state(idx)
        bilirubin_seen = measure_lab(rng, state.bilirubin_umol_l, clinic.lab_missing)
        current = pd.DataFrame({"episode_id": [f"{clinic.name}-{ids}E{cycle:02d}{i:05d}" for i in idx],
                                "patient_id": pid[idx], "cycle": cycle, "start_day": cohort.start_day[idx],
                                **observed_covariates(rng, clinic, cohort, idx, state, bilirubin_seen)})
        history = current if previous_rows is None else pd.concat([previous_rows, current], ignore_index=True)
        frame = cycle_frames(history, previous_vitals, catalogue=formulation_ids).iloc[len(history) - len(current):]
        frame = frame.reset_index(drop=True)
        actions = (policy.act(state, catalogue) if isinstance(policy, MyopicOracle) else policy(frame))
        actions = actions.reset_index(drop=True)
        kind = actions["action"].astype(str).to_numpy()
        best_utility = best_action(state, catalogue, oracle.doses, oracle.intervals).utility

        stop = kind == "stop"
        cohort.active[idx[stop]] = False
        keep = ~stop
        idx, state, kind, actions, current = (idx[keep], _take(state, keep), kind[keep],
                                              actions[keep].reset_index(drop=True), current[keep])
        best_utility = best_utility[keep]
        if idx.size == 0:
            break
        given = kind == "give"
        unknown = sorted(set(actions["formulation_id"][given].astype(str)) - set(formulation_ids))
        if unknown:
            raise ValueError(f"{clinic.name}: the policy chose formulation(s) {unknown} outside the catalogue "
                             f"{formulation_ids}")
        index = np.array([formulation_ids.index(str(f)) if g else 0
                          for f, g in zip(actions["formulation_id"], given, strict=True)])
        f = catalogue.take(index)
        dose = np.where(given, actions["dose_mg_m2"].to_numpy(dtype=float), 0.0)
        interval = actions["interval_days"].to_numpy(dtype=float)
        interval = np.where(given, interval, np.nan_to_num(interval, nan=WITHHELD_INTERVAL_D)).astype(int)
        outcome = realise_cycle(rng, clinic, cohort, idx, state, f, dose, interval)
        rows = current.assign(**treatment_columns(f, dose, interval, state.bsa_m2),
                              **observed_outcomes(rng, outcome))
        vitals = cycle_vitals(rng, clinic, patients, pid, rows, [(idx, outcome.nadir, outcome.ppe)])
        records.append(rows)
        vitals_log.append(vitals)
        expected = outcome.expected
        log.append(pd.DataFrame({
            "clinic": clinic.name, "patient": pid[idx], "cycle": cycle, "action": kind,
            "formulation_id": np.where(given, f.formulation_id, ""), "dose_mg_m2": dose, "interval_days": interval,
            "utility": expected.utility, "p_response": expected.p_response, "p_toxicity": expected.p_toxicity,
            "p_chf": expected.p_chf, "best_utility": best_utility, "response": outcome.efficacy_seen >= 30.0,
            "toxicity": outcome.toxicity, "chf": outcome.chf,
        }))
        cohort.carry_over(idx, outcome, dose, interval)
        cohort.stops(rng, idx, outcome)
        previous_rows, previous_vitals = rows, vitals
    episodes = pd.concat(records, ignore_index=True)[[c.name for c in EPISODE_COLUMNS]]
    return Treated(pd.concat(log, ignore_index=True), episodes, pd.concat(vitals_log, ignore_index=True))


def _take(state: PatientState, keep: np.ndarray) -> PatientState:
    return PatientState(**{k: np.asarray(v)[keep] for k, v in vars(state).items()})


def summarise(cycles: pd.DataFrame) -> dict[str, float]:
    """A policy's rollout in numbers: ``value`` (mean total true utility per patient), ``response_rate`` and
    ``toxicity_rate`` (mean true P(response) / P(grade ≥ 3 toxicity) over the cycles given), ``chf_rate``,
    ``cycles_per_patient``, ``mean_dose_mg_m2`` (given cycles) and ``myopic_regret_per_cycle`` (the myopic
    oracle's utility at each visited state minus the action's)."""
    given = cycles["action"] == "give"
    per_patient = cycles.groupby("patient")["utility"].sum()
    return {"patients": int(per_patient.size), "value": float(per_patient.mean()),
            "response_rate": float(cycles.loc[given, "p_response"].mean()),
            "toxicity_rate": float(cycles.loc[given, "p_toxicity"].mean()),
            "chf_rate": float(cycles.loc[given, "p_chf"].mean()),
            "cycles_per_patient": float(len(cycles) / max(per_patient.size, 1)),
            "mean_dose_mg_m2": float(cycles.loc[given, "dose_mg_m2"].mean()),
            "myopic_regret_per_cycle": float((cycles["best_utility"] - cycles["utility"]).mean())}


def compare_policies(world: World, policies: dict[str, Callable[[ClinicProfile], Policy | MyopicOracle]],
                     n_patients: int, seed: int) -> dict:
    """Every policy (name → clinic → policy) rolled out on the same fresh patients of every clinic; per site
    and overall :func:`summarise` numbers, with ``regret`` = the myopic oracle's value − the policy's."""
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in policies}
    tables["myopic_oracle"] = []
    for clinic in world.clinics:
        tables["myopic_oracle"].append(rollout_clinic(world, clinic, MyopicOracle(), n_patients, seed))
        for name, make in policies.items():
            tables[name].append(rollout_clinic(world, clinic, make(clinic), n_patients, seed))
    per_site = {c.name: {name: summarise(parts[i]) for name, parts in tables.items()}
                for i, c in enumerate(world.clinics)}
    overall = {name: summarise(pd.concat(parts, ignore_index=True)) for name, parts in tables.items()}
    for block in [overall, *per_site.values()]:
        for numbers in block.values():
            numbers["regret"] = block["myopic_oracle"]["value"] - numbers["value"]
    return {"patients_per_site": n_patients, "seed": seed, "overall": overall, "per_site": per_site}
