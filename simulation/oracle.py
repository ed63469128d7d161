"""The oracle: the true expected outcomes and utility of any (formulation, dose, interval) for any patient.

One cycle's pharmacology (:mod:`simulation.disposition`) feeds the outcome models
(:mod:`simulation.effect`); everything broadcasts, so :func:`utility_grid` evaluates a patients ×
formulations × doses × intervals grid in one pass. The clinics (:mod:`simulation.clinics`) draw their
observed outcomes from the same functions, so a policy's value computed here is the value it would have
in the simulated world.

Utility = P(response) − W_TOXICITY · P(any grade ≥ 3 toxicity) − W_CHF · P(heart failure this cycle).
The weights are value judgements of this project (a response is worth twice the harm of a grade-3
toxicity; heart failure, mostly irreversible, three times a response), not measured quantities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulation import disposition, effect
from simulation.formulations import Formulations
from simulation.patients import DOUBLING_TIME_D, EPR_PERMEABILITY, SENSITIVITY, tumour_table

W_TOXICITY = 0.5
W_CHF = 3.0


@dataclass
class PatientState:
    """What is true about a patient at the start of a cycle (arrays of one shape, broadcastable)."""

    age_years: np.ndarray
    female: np.ndarray
    bsa_m2: np.ndarray
    bilirubin_umol_l: np.ndarray
    creatinine_clearance_ml_min: np.ndarray
    anc_baseline_e9_l: np.ndarray
    ecog: np.ndarray
    tumour_type: np.ndarray
    tumour_burden_mm: np.ndarray
    cumulative_dose_mg_m2: np.ndarray


@dataclass
class Pharmacology:
    """Dose-independent pharmacology of a formulation in a patient (exposures are per mg/m²)."""

    carrier_cl_l_h_m2: np.ndarray
    released_fraction: np.ndarray
    free_fraction: np.ndarray
    delivery_fraction: np.ndarray
    tumour_exposure_per_mg_m2: np.ndarray
    free_auc_per_mg_m2: np.ndarray
    carried_auc_per_mg_m2: np.ndarray


@dataclass
class CycleOutcomes:
    """Expected outcomes of a cycle (probabilities over patients with the same covariates)."""

    p_response: np.ndarray
    p_neutropenia: np.ndarray
    p_ppe: np.ndarray
    p_charge_reaction: np.ndarray
    p_toxicity: np.ndarray
    p_chf: np.ndarray
    log_kill: np.ndarray
    marrow_x: np.ndarray

    @property
    def utility(self) -> np.ndarray:
        return self.p_response - W_TOXICITY * self.p_toxicity - W_CHF * self.p_chf


def pharmacology(state: PatientState, f: Formulations) -> Pharmacology:
    """Disposition of formulation(s) ``f`` in patient(s) ``state`` (broadcast together)."""
    cl = disposition.carrier_clearance(f.particle_size_nm, f.zeta_mv, f.pegylated,
                                       state.creatinine_clearance_ml_min, state.bsa_m2)
    released = disposition.released_in_plasma_fraction(cl, f.release_tau_h, f.release_beta)
    delivery = disposition.tumour_delivery_fraction(
        f.particle_size_nm, cl, tumour_table(EPR_PERMEABILITY)[state.tumour_type])
    free = disposition.free_fraction(f.encapsulation_pct, released)
    return Pharmacology(
        carrier_cl_l_h_m2=cl,
        released_fraction=released,
        free_fraction=free,
        delivery_fraction=delivery,
        tumour_exposure_per_mg_m2=disposition.tumour_exposure_per_mg_m2(
            f.encapsulation_pct, released, delivery, f.release_tau_h, f.release_beta),
        free_auc_per_mg_m2=free / disposition.free_drug_clearance(state.bilirubin_umol_l, state.female),
        carried_auc_per_mg_m2=(1.0 - free) / cl,
    )


def growth_rate_per_day(tumour_type: np.ndarray) -> np.ndarray:
    """Net exponential regrowth rate ln2 / doubling time."""
    return np.log(2.0) / tumour_table(DOUBLING_TIME_D)[tumour_type]


def cycle_outcomes(state: PatientState, f: Formulations, pk: Pharmacology, dose_mg_m2, interval_days) -> CycleOutcomes:
    """Expected outcomes of giving ``dose_mg_m2`` of ``f`` with the next cycle after ``interval_days``."""
    log_kill = effect.kill_rate(pk.tumour_exposure_per_mg_m2 * dose_mg_m2,
                                tumour_table(SENSITIVITY)[state.tumour_type], state.tumour_burden_mm, state.ecog)
    p_response = effect.response_probability(log_kill, growth_rate_per_day(state.tumour_type), interval_days)
    marrow_x = effect.marrow_exposure(pk.free_auc_per_mg_m2 * dose_mg_m2, pk.carried_auc_per_mg_m2 * dose_mg_m2,
                                      state.age_years, state.ecog)
    p_neutropenia = effect.neutropenia_probability(marrow_x, state.anc_baseline_e9_l)
    p_ppe = effect.ppe_probability(effect.ppe_intensity(
        dose_mg_m2, f.encapsulation_pct, pk.released_fraction, pk.carrier_cl_l_h_m2, interval_days,
        disposition.CARRIER_VOLUME_L_M2))
    p_charge = effect.charge_reaction_probability(f.zeta_mv, dose_mg_m2)
    p_chf = effect.chf_cycle_probability(state.cumulative_dose_mg_m2, pk.free_fraction * dose_mg_m2)
    return CycleOutcomes(
        p_response=p_response, p_neutropenia=p_neutropenia, p_ppe=p_ppe, p_charge_reaction=p_charge,
        p_toxicity=effect.any_of(p_neutropenia, p_ppe, p_charge), p_chf=p_chf, log_kill=log_kill,
        marrow_x=marrow_x,
    )


def _expand(state: PatientState, axes: int) -> PatientState:
    """Give every patient array ``axes`` trailing length-1 axes."""
    shape = (-1,) + (1,) * axes
    return PatientState(**{k: np.asarray(v).reshape(shape) for k, v in vars(state).items()})


def _formulations_on_axis(f: Formulations, axes: int) -> Formulations:
    """Formulation arrays on axis 1 of a (patients, formulations, ...) grid."""
    shape = (1, -1) + (1,) * (axes - 1)
    return Formulations(**{k: np.asarray(v).reshape(shape) for k, v in vars(f).items()})


def outcome_grid(state: PatientState, catalogue: Formulations, doses_mg_m2, intervals_days) -> CycleOutcomes:
    """Expected outcomes on the grid patients × formulations × doses × intervals."""
    s = _expand(state, 3)
    f = _formulations_on_axis(catalogue, 3)
    pk = pharmacology(s, f)
    dose = np.asarray(doses_mg_m2, dtype=float).reshape(1, 1, -1, 1)
    interval = np.asarray(intervals_days, dtype=float).reshape(1, 1, 1, -1)
    return cycle_outcomes(s, f, pk, dose, interval)


def utility_grid(state: PatientState, catalogue: Formulations, doses_mg_m2, intervals_days) -> np.ndarray:
    """True expected utility on the grid patients × formulations × doses × intervals."""
    return outcome_grid(state, catalogue, doses_mg_m2, intervals_days).utility


@dataclass
class OracleChoice:
    """The best action per patient and its value."""

    formulation: np.ndarray  # index into the catalogue
    dose_mg_m2: np.ndarray
    interval_days: np.ndarray
    utility: np.ndarray


def best_action(state: PatientState, catalogue: Formulations, doses_mg_m2, intervals_days) -> OracleChoice:
    """The action of highest true expected utility for each patient (the oracle policy)."""
    doses = np.asarray(doses_mg_m2, dtype=float)
    intervals = np.asarray(intervals_days, dtype=float)
    u = utility_grid(state, catalogue, doses, intervals)
    flat = u.reshape(u.shape[0], -1).argmax(axis=1)
    fi, di, ii = np.unravel_index(flat, u.shape[1:])
    return OracleChoice(formulation=fi, dose_mg_m2=doses[di], interval_days=intervals[ii],
                        utility=u.reshape(u.shape[0], -1)[np.arange(u.shape[0]), flat])
