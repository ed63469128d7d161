"""Effect and toxicity of one treatment cycle, as closed-form probabilities and as random draws.

Every outcome model is monotone in one log-normal per-patient random effect, so the probability over
the population of patients with the same covariates is a normal tail (``scipy.special.ndtr``): the
oracle is exact and vectorised, and the draws for the clinics use the same equations.

- Tumour response: log-kill per cycle with an Emax exposure-response and exponential regrowth over the
  interval (the growth-inhibition idea of Simeoni et al., Cancer Res 2004;64:1094, in its discrete
  per-cycle form, Norton & Simon 1977). Response = shrinkage ≥ 30 % (RECIST 1.1, Eisenhauer 2009).
- Neutropenia: the semi-mechanistic myelosuppression model of Friberg et al. (J Clin Oncol
  2002;20:4713): proliferating pool, three transit compartments, feedback (Circ0/Circ)^γ; grade ≥ 3 at a
  nadir ANC below 1.0 × 10⁹/L (CTCAE v5).
- Hand-foot syndrome (palmar-plantar erythrodysesthesia), the dose-limiting toxicity of long-circulating
  liposomal doxorubicin, rises with dose intensity of the circulating carrier (Lyass et al., Cancer
  2000;89:1037; Doxil label: grade 3-4 PPE in ~23 % at 50 mg/m² q4w).
- Infusion/complement reactions of cationic carriers (Szebeni, Mol Immunol 2014;61:163; Fröhlich, Int J
  Nanomedicine 2012;7:5577).
- Congestive heart failure from cumulative anthracycline: P(CHF) = 1 − exp(−(D/748)^4.6), D in mg/m², a
  Weibull fit to Swain et al. (Cancer 2003;97:2869: 5 % at 400, 26 % at 550, 48 % at 700 mg/m²).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import ndtr

from shared.cardiotoxicity import (  # noqa: F401  (re-exported: simulation.oracle and the tests use effect.*)
    CHF_SCALE_MG_M2,
    CHF_SHAPE,
    chf_cumulative_probability,
    chf_cycle_probability,
)
from simulation.patients import OMEGA_EFFICACY, OMEGA_MARROW

# --- response ------------------------------------------------------------------------------------------
RESPONSE_SHRINKAGE = 0.30  # RECIST partial response
# Emax exposure-response of log-kill per cycle; EC50 in mg/m² equivalents of bioavailable tumour drug.
# Set so that per-cycle response is ~25-35 % for conventional doxorubicin 60 mg/m² q3w and PEGylated
# liposomal doxorubicin 50 mg/m² q4w in ovarian cancer (measured by tests/test_simulator_reference.py).
# O'Brien et al. (Ann Oncol 2004;15:440) found PLD non-inferior to doxorubicin; here PLD comes out
# somewhat better (0.36 vs 0.28), a simulator choice that keeps the formulation relevant to the policy.
EMAX_LOG_KILL = 1.0
EC50_TUMOUR_EXPOSURE = 0.15
# Log-kill is lower in large and in frail patients' tumours (assumed, modest): burden^-0.2, ×0.85 per ECOG.
BURDEN_REFERENCE_MM = 60.0
BURDEN_EXPONENT = -0.2
ECOG_KILL_FACTOR = 0.85
# Cycle-to-cycle variability added to the patient's own effect (sd on the log scale).
OMEGA_EFFICACY_CYCLE = 0.25

# --- neutropenia (Friberg 2002) ------------------------------------------------------------------------
# Mean transit time ~ 4-5 days and γ ≈ 0.16 as in Friberg 2002's fits; free-drug plasma profile as a
# mono-exponential pulse with t½ 24 h. Drug effect E = 1 − exp(−slope·C), linear (Friberg's form) at low
# concentration and bounded below 1. SLOPE is set so that conventional doxorubicin 60 mg/m² gives grade
# ≥ 3 neutropenia in roughly half of patients (doxorubicin label: grade 4 neutropenia is common), and
# PEGylated liposomal doxorubicin 50 mg/m² in ~10 % (Gordon et al., J Clin Oncol 2001;19:3312: 12 %).
# PLD is myelosuppressive although little of it is ever free in plasma; we attribute that to uptake of
# carriers by marrow macrophages (mononuclear phagocyte system) and model it as a small weight on the
# carried drug's plasma AUC, set to reproduce the PLD rate above (an assumption, not a measured value).
FRIBERG_MTT_H = 110.0
FRIBERG_GAMMA = 0.16
FREE_DRUG_HALF_LIFE_H = 24.0
NEUTROPENIA_SLOPE_L_MG = 30.0
MARROW_CARRIER_WEIGHT = 0.0008
GRADE3_ANC_E9_L = 1.0
NADIR_DAY = 12.0
# Marrow sensitivity rises with age and frailty (assumed modest: +2 %/year over 60, +15 % per ECOG point).
MARROW_AGE_PER_YEAR = 0.02
MARROW_ECOG = 0.15

# --- hand-foot syndrome --------------------------------------------------------------------------------
# Intensity = dose retained in long-circulating carriers per week, weighted by circulation time relative
# to PLD (mean residence ~80 h). Median-toxic intensity and spread chosen so that PLD 50 mg/m² q4w gives
# ~20 % and 40 mg/m² q4w ~10 % grade 3 (label; Lyass 2000).
PPE_TD50_MG_M2_WEEK = 12.8
PPE_OMEGA = 0.5
PPE_REFERENCE_RESIDENCE_H = 80.0

# --- cationic carriers ---------------------------------------------------------------------------------
CHARGE_REACTION_MAX = 0.2
CHARGE_REACTION_ZETA_MV = 20.0
CHARGE_REACTION_WIDTH_MV = 6.0
CHARGE_REACTION_HALF_DOSE = 40.0

# --- heart: the public curve of shared.cardiotoxicity (Swain 2003), which the policy uses too -----------


def kill_rate(tumour_exposure, sensitivity, tumour_burden_mm, ecog):
    """Typical log-kill of one cycle (the patient's random effect multiplies it by e^η)."""
    exposure = np.asarray(tumour_exposure)
    burden = np.nan_to_num(np.asarray(tumour_burden_mm, dtype=float), nan=BURDEN_REFERENCE_MM)
    return (EMAX_LOG_KILL * exposure / (EC50_TUMOUR_EXPOSURE + exposure) * np.asarray(sensitivity)
            * (burden / BURDEN_REFERENCE_MM) ** BURDEN_EXPONENT * ECOG_KILL_FACTOR ** np.asarray(ecog))


def shrinkage(log_kill, growth_rate_per_day, interval_days, eta):
    """Fractional shrinkage over a cycle: 1 − exp(g·I − K·e^η) (negative when the tumour grows)."""
    return 1.0 - np.exp(np.asarray(growth_rate_per_day) * interval_days - np.asarray(log_kill) * np.exp(eta))


def response_probability(log_kill, growth_rate_per_day, interval_days):
    """P(shrinkage ≥ 30 %) over patients with these covariates: η ~ N(0, ω²) with both variance parts.

    shrinkage ≥ s  ⇔  K e^η ≥ g·I − ln(1 − s)  ⇔  η ≥ ln((g·I − ln(1 − s)) / K).
    """
    omega = np.hypot(OMEGA_EFFICACY, OMEGA_EFFICACY_CYCLE)
    needed = np.asarray(growth_rate_per_day) * interval_days - np.log1p(-RESPONSE_SHRINKAGE)
    with np.errstate(divide="ignore"):
        threshold = np.log(needed / np.asarray(log_kill))
    return ndtr(-threshold / omega)


@lru_cache(maxsize=1)
def nadir_ratio_table() -> tuple[np.ndarray, np.ndarray]:
    """Nadir ANC / baseline ANC against drug-effect exposure X = slope × AUC, from the Friberg model.

    Solved once (RK4, 0.5 h steps, 35 days) for a log-spaced grid of X in one vectorised pass; the result
    is strictly decreasing in X, so it can be inverted by interpolation.
    """
    x_grid = np.logspace(-3, 2.5, 400)
    ktr = 4.0 / FRIBERG_MTT_H  # (n transit + 1) / MTT with n = 3
    k_drug = np.log(2.0) / FREE_DRUG_HALF_LIFE_H
    dt, steps = 0.5, int(35 * 24 / 0.5)

    def derivative(t, y):
        prol, t1, t2, t3, circ = y
        effect = 1.0 - np.exp(-x_grid * k_drug * np.exp(-k_drug * t))  # slope·C(t) with AUC = X / slope
        feedback = np.maximum(circ, 1e-6) ** -FRIBERG_GAMMA
        return np.stack([
            ktr * prol * (1 - effect) * feedback - ktr * prol,
            ktr * (prol - t1), ktr * (t1 - t2), ktr * (t2 - t3), ktr * (t3 - circ),
        ])

    y = np.ones((5, x_grid.size))
    nadir = np.ones_like(x_grid)
    t = 0.0
    for _ in range(steps):
        k1 = derivative(t, y)
        k2 = derivative(t + dt / 2, y + dt / 2 * k1)
        k3 = derivative(t + dt / 2, y + dt / 2 * k2)
        k4 = derivative(t + dt, y + dt * k3)
        y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += dt
        nadir = np.minimum(nadir, y[4])
    return x_grid, nadir


def nadir_ratio(drug_effect_exposure):
    """Nadir / baseline ANC for drug-effect exposure X (interpolated in log X)."""
    x_grid, ratio = nadir_ratio_table()
    x = np.clip(np.asarray(drug_effect_exposure, dtype=float), x_grid[0], x_grid[-1])
    return np.interp(np.log(x), np.log(x_grid), ratio)


def marrow_exposure(free_auc_mg_h_l, carried_auc_mg_h_l, age_years, ecog):
    """Typical drug-effect exposure X = slope × (free AUC + w · carried AUC) × covariate effects
    (the patient's e^η multiplies it)."""
    covariates = np.exp(MARROW_AGE_PER_YEAR * np.maximum(np.asarray(age_years) - 60.0, 0.0)
                        + MARROW_ECOG * np.asarray(ecog))
    auc = np.asarray(free_auc_mg_h_l) + MARROW_CARRIER_WEIGHT * np.asarray(carried_auc_mg_h_l)
    return NEUTROPENIA_SLOPE_L_MG * auc * covariates


def neutropenia_probability(marrow_x, anc_baseline_e9_l):
    """P(nadir < 1.0 × 10⁹/L): nadir = ANC0 · R(X e^η), R decreasing, so it happens iff
    X e^η > R⁻¹(1/ANC0)."""
    x_grid, ratio = nadir_ratio_table()
    anc0 = np.nan_to_num(np.asarray(anc_baseline_e9_l, dtype=float), nan=4.2)
    needed_ratio = GRADE3_ANC_E9_L / np.maximum(anc0, 1e-6)
    # ratio is decreasing: interpolate log X against ratio reversed (increasing).
    log_x_needed = np.interp(needed_ratio, ratio[::-1], np.log(x_grid)[::-1])
    with np.errstate(divide="ignore"):
        z = (np.log(np.asarray(marrow_x)) - log_x_needed) / OMEGA_MARROW
    p = ndtr(z)
    p = np.where(needed_ratio >= 1.0, 1.0, p)  # already below the grade-3 threshold before dosing
    return np.where(needed_ratio <= ratio[-1], 0.0, p)  # beyond the table: the marrow cannot fall so far


def ppe_intensity(dose_mg_m2, encapsulation_pct, released_fraction, carrier_cl_l_h_m2, interval_days,
                  carrier_volume_l_m2):
    """Dose retained in long-circulating carriers per week, weighted by circulation time relative to PLD."""
    retained = np.asarray(dose_mg_m2) * np.asarray(encapsulation_pct) / 100.0 * (1.0 - np.asarray(released_fraction))
    residence = carrier_volume_l_m2 / np.asarray(carrier_cl_l_h_m2)
    return retained * np.minimum(residence / PPE_REFERENCE_RESIDENCE_H, 1.5) / (np.asarray(interval_days) / 7.0)


def ppe_probability(intensity):
    """P(grade ≥ 3 hand-foot syndrome): log-normal tolerance around PPE_TD50."""
    with np.errstate(divide="ignore"):
        return ndtr(np.log(np.asarray(intensity) / PPE_TD50_MG_M2_WEEK) / PPE_OMEGA)


def charge_reaction_probability(zeta_mv, dose_mg_m2):
    """P(grade ≥ 3 infusion/complement reaction): logistic in positive surface charge, saturating in dose."""
    z = (np.asarray(zeta_mv) - CHARGE_REACTION_ZETA_MV) / CHARGE_REACTION_WIDTH_MV
    dose = np.asarray(dose_mg_m2)
    return CHARGE_REACTION_MAX / (1.0 + np.exp(-z)) * dose / (dose + CHARGE_REACTION_HALF_DOSE)



def any_of(*probabilities):
    """P(at least one) of independent events."""
    none = np.ones(())
    for p in probabilities:
        none = none * (1.0 - np.asarray(p))
    return 1.0 - none
