"""Dosing policies judged in the simulated world, where the true outcome of every action is known.

Fresh patients are drawn from each clinic's own population (:func:`simulation.patients.sample_patients`),
at the start of their first cycle, and measured as the clinic measures them (lab noise and missingness,
:func:`simulation.clinics.measure_lab`). Each policy sees only that record; the oracle
(:mod:`simulation.oracle`) scores the action it chose with the patient's *true* state:

- **value**: mean true utility P(response) − 0.5·P(grade ≥ 3 toxicity) − 3·P(heart failure) of the chosen
  action (0 when the dose is withheld or treatment stops: nothing given, nothing gained or risked);
- **oracle**: the best action for the true state within the same hard limits (catalogue, dose grid and
  intervals, hepatic and cumulative caps, hold rules) — the ceiling any policy with these limits can reach;
- **regret** = oracle − value, and **value / oracle** (``value_ratio``, also ``value_oracle``);
- **response rate**, **toxicity rate** (grade ≥ 3) and **heart-failure rate**: the true probabilities of the
  chosen actions, averaged.

Policies: the federated one (the signed bundle), local-only (each site's models on its own data), pooled
(one model on all sites' data), standard of care (the clinic's usual formulation at the label dose and
interval for the tumour type, label hepatic reduction: fixed BSA dosing) and the oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from shared.dosing_policy import DosingPolicy
from shared.patient_record import PREVIOUS_PREFIX, WEARABLE_PREFIX, PreviousCycle, WearableSummary
from shared.schema import TUMOUR_TYPES
from simulation.clinics import ClinicProfile, World, measure_lab
from simulation.formulations import Formulations
from simulation.oracle import PatientState, cycle_outcomes, outcome_grid, pharmacology
from simulation.patients import sample_patients
from simulation.policy_rollout import standard_of_care as clinic_practice

Decide = Callable[[pd.DataFrame], pd.DataFrame]
"""A policy as the evaluation runs it: records → formulation_id, dose_mg_m2, interval_days, action."""


def fresh_patients(world: World, clinic: ClinicProfile, n: int, seed: int) -> tuple[PatientState, pd.DataFrame]:
    """``n`` new first-cycle patients of ``clinic``: their true state, and their records as the clinic sees them
    (the flat form of :func:`shared.patient_record.records_frame`)."""
    rng = np.random.default_rng([seed, clinic.seed, 7])
    p = sample_patients(rng, n, clinic.population)
    state = PatientState(age_years=p.age_years, female=p.female, bsa_m2=p.bsa_m2,
                         bilirubin_umol_l=p.bilirubin_umol_l, creatinine_clearance_ml_min=p.creatinine_clearance_ml_min,
                         anc_baseline_e9_l=p.anc_baseline_e9_l, ecog=p.ecog, tumour_type=p.tumour_type,
                         tumour_burden_mm=p.tumour_burden_mm, cumulative_dose_mg_m2=p.prior_dose_mg_m2)
    catalogue = tuple(str(i) for i in world.catalogue(clinic).formulation_id)
    frame = pd.DataFrame({
        "patient_id": [f"{clinic.name}-eval-{i:05d}" for i in range(n)], "cycle": 1,
        "age_years": np.round(p.age_years, 1), "sex": np.where(p.female, "F", "M"),
        "weight_kg": np.round(p.weight_kg, 1), "height_cm": np.round(p.height_cm, 1),
        "bsa_m2": np.round(p.bsa_m2, 3),
        "bilirubin_umol_l": np.round(measure_lab(rng, p.bilirubin_umol_l, clinic.lab_missing), 1),
        "creatinine_clearance_ml_min": np.round(measure_lab(rng, p.creatinine_clearance_ml_min, clinic.lab_missing), 1),
        "anc_baseline_e9_l": np.round(measure_lab(rng, p.anc_baseline_e9_l, clinic.lab_missing), 2),
        "ecog": p.ecog, "tumour_type": np.asarray(TUMOUR_TYPES)[p.tumour_type],
        "tumour_burden_mm": np.round(p.tumour_burden_mm, 1),
        "cumulative_dose_mg_m2": np.round(p.prior_dose_mg_m2, 1),
    })
    frame["catalogue"] = [catalogue] * n
    for name in [*PreviousCycle.model_fields, *WearableSummary.model_fields]:  # no history at a first cycle
        frame[(PREVIOUS_PREFIX if name in PreviousCycle.model_fields else WEARABLE_PREFIX) + name] = np.nan
    return state, frame


def standard_of_care(world: World, clinic: ClinicProfile, limits: DosingPolicy) -> Decide:
    """Fixed BSA dosing as the clinic practises it (:func:`simulation.policy_rollout.standard_of_care`: its usual
    formulation, label dose and interval, label hepatic reduction), under the same cumulative cap and holds as
    every policy."""
    practice = clinic_practice(world, clinic)

    def decide(frame: pd.DataFrame) -> pd.DataFrame:
        _, verdict = limits.safety_limits(frame)
        actions = practice(frame).reset_index(drop=True)
        remaining = limits.safety.cumulative_limit_mg_m2 - frame["cumulative_dose_mg_m2"].to_numpy(dtype=float)
        actions["dose_mg_m2"] = np.minimum(actions["dose_mg_m2"].to_numpy(dtype=float), remaining)
        actions["action"] = verdict
        return actions

    return decide


def true_outcomes(state: PatientState, catalogue: Formulations, actions: pd.DataFrame) -> dict[str, np.ndarray]:
    """The true expected outcomes of each patient's chosen action (zeros where nothing is given)."""
    ids = [str(i) for i in catalogue.formulation_id]
    give = actions["action"].to_numpy() == "give"
    index = np.array([ids.index(f) if g else 0 for f, g in zip(actions["formulation_id"], give, strict=True)])
    f = catalogue.take(index)
    dose = np.where(give, actions["dose_mg_m2"].to_numpy(dtype=float), 0.0)
    interval = np.where(give, actions["interval_days"].to_numpy(dtype=float), 28.0)
    out = cycle_outcomes(state, f, pharmacology(state, f), dose, interval)
    result = {"utility": out.utility, "response": out.p_response, "toxicity": out.p_toxicity, "chf": out.p_chf}
    return {k: np.where(give, v, 0.0) for k, v in result.items()} | {"dose": dose, "given": give}


def oracle_outcomes(state: PatientState, catalogue: Formulations, frame: pd.DataFrame,
                    limits: DosingPolicy) -> dict[str, np.ndarray]:
    """The true best action per patient within the hard limits, and its true outcomes."""
    cap, verdict = limits.safety_limits(frame)
    doses = limits.action_space.doses()
    intervals = limits.action_space.intervals(frame["tumour_type"])  # (patients, delays)
    n = len(intervals)
    distinct = np.unique(intervals)
    grid = outcome_grid(state, catalogue, doses, distinct).utility  # (patients, formulations, doses, distinct)
    utility = np.take_along_axis(grid, np.searchsorted(distinct, intervals)[:, None, None, :], axis=3)
    utility = np.where(doses[None, None, :, None] <= cap[:, None, None, None] + 1e-9, utility, -np.inf)
    flat = utility.reshape(n, -1).argmax(axis=1)
    fi, di, ii = np.unravel_index(flat, utility.shape[1:])
    actions = pd.DataFrame({"action": verdict, "formulation_id": [str(catalogue.formulation_id[i]) for i in fi],
                            "dose_mg_m2": doses[di], "interval_days": intervals[np.arange(n), ii]})
    return true_outcomes(state, catalogue, actions)


def summarise(outcomes: dict[str, np.ndarray], oracle: dict[str, np.ndarray]) -> dict[str, float]:
    """Value, regret and rates of one policy on one group of patients."""
    value, best = float(outcomes["utility"].mean()), float(oracle["utility"].mean())
    given = outcomes["given"]
    return {"value": value, "oracle_value": best, "regret": best - value,
            "value_ratio": value / best if best > 0 else float("nan"),
            "value_oracle": value / best if best > 0 else float("nan"),  # issue 12's name for the same ratio
            "response_rate": float(outcomes["response"].mean()), "toxicity_rate": float(outcomes["toxicity"].mean()),
            "chf_rate": float(outcomes["chf"].mean()),
            "mean_dose_mg_m2": float(outcomes["dose"][given].mean()) if given.any() else 0.0,
            "treated_share": float(given.mean()), "patients": int(len(given))}


def evaluate_policies(world: World, policies: dict[str, Callable[[str], Decide]], limits: DosingPolicy,
                      n_per_site: int = 500, seed: int = 0, sites: list[str] | None = None) -> dict:
    """Every policy on fresh patients of every clinic (or of ``sites``), per site and overall.

    ``policies`` maps a name to ``site name → decide function`` (local-only policies differ per site);
    ``limits`` is a policy whose hard rules (caps, holds) and action space the oracle shares."""
    per_site: dict[str, dict[str, dict]] = {}
    pooled: dict[str, list[dict[str, np.ndarray]]] = {}
    for clinic in world.clinics:
        if sites is not None and clinic.name not in sites:
            continue
        state, frame = fresh_patients(world, clinic, n_per_site, seed)
        catalogue = world.catalogue(clinic)
        oracle = oracle_outcomes(state, catalogue, frame, limits)
        results = {"oracle": oracle, "standard_of_care": true_outcomes(
            state, catalogue, standard_of_care(world, clinic, limits)(frame))}
        for name, for_site in policies.items():
            results[name] = true_outcomes(state, catalogue, for_site(clinic.name)(frame))
        per_site[clinic.name] = {name: summarise(out, oracle) for name, out in results.items()}
        for name, out in results.items():
            pooled.setdefault(name, []).append(out | {"oracle": oracle["utility"]})
    overall = {}
    for name, parts in pooled.items():
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "oracle"}
        overall[name] = summarise(merged, {"utility": np.concatenate([p["oracle"] for p in parts])})
    # issue 12's interface, policy.evaluation.<policy>.{value, value_oracle}: the overall figures by name
    by_name = {name: {"value": m["value"], "value_oracle": m["value_oracle"]} for name, m in overall.items()}
    return {**by_name, "patients_per_site": n_per_site, "overall": overall, "per_site": per_site}


def random_decider(limits: DosingPolicy, seed: int) -> Decide:
    """The bottom of the scale: a formulation of the patient's catalogue and a dose of the action space, uniformly
    at random among what the hard rules allow, at the label interval."""
    rng = np.random.default_rng(seed)

    def decide(frame: pd.DataFrame) -> pd.DataFrame:
        cap, verdict = limits.safety_limits(frame)
        doses = limits.action_space.doses()
        chosen_doses = []
        for allowed_cap in cap:
            allowed = doses[doses <= allowed_cap + 1e-9]
            chosen_doses.append(float(rng.choice(allowed)) if len(allowed) else float(doses[0]))
        formulations = [str(rng.choice(list(catalogue))) for catalogue in frame["catalogue"]]
        return pd.DataFrame({"action": verdict, "formulation_id": formulations, "dose_mg_m2": chosen_doses,
                             "interval_days": limits.action_space.intervals(frame["tumour_type"])[:, 0]})

    return decide


def policy_decider(policy: DosingPolicy, adjust: bool = False) -> Decide:
    """A :class:`DosingPolicy` as a decide function (first cycles: no adjustment applies)."""
    return lambda frame: policy.recommend_frame(frame, adjust=adjust)
