"""Simulated patients: covariates at first cycle and the hidden per-patient sensitivities.

Every draw is vectorised and takes a ``numpy.random.Generator`` so the same seed gives the same cohort.
Marginals are chosen to resemble adults treated with liposomal doxorubicin (ovarian, breast, Kaposi
sarcoma, myeloma, soft-tissue sarcoma); each clinic shifts them (see :mod:`simulation.clinics`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from shared.bsa import mosteller_bsa_m2
from shared.schema import TUMOUR_TYPES

# Body size by sex: adult anthropometry, US NHANES 2015-2018 (Fryar et al., National Health Statistics
# Reports 2021): mean height 161.3 cm (women) / 175.3 cm (men), weight 77.5 / 90.6 kg; sds ~7 cm, ~18 kg.
HEIGHT_CM = {"F": (161.3, 7.0), "M": (175.3, 7.5)}
WEIGHT_KG = {"F": (77.5, 18.0), "M": (90.6, 18.0)}
# Share of women by tumour type: ovarian and (almost all) breast patients are women; Kaposi sarcoma in
# the HIV setting is mostly men; myeloma and sarcoma slightly more men (SEER registry proportions).
FEMALE_SHARE = {"ovarian": 1.0, "breast": 0.99, "kaposi": 0.1, "myeloma": 0.45, "sarcoma": 0.45}
# Tumour doubling time in days, of the order reported for these cancers (Friberg & Mattson, J Surg Oncol
# 1997;65:284, review of tumour doubling times); used as net regrowth between cycles.
DOUBLING_TIME_D = {"ovarian": 40.0, "breast": 60.0, "kaposi": 30.0, "myeloma": 50.0, "sarcoma": 35.0}
# Relative EPR permeability by tumour type: Kaposi lesions are highly vascular (best liposome uptake,
# Northfelt 1996), ovarian/breast intermediate, sarcoma and myeloma lower (Harrington et al., Clin Cancer
# Res 2001;7:243: 111In-PEG-liposome uptake varies ~3-fold between tumour types).
EPR_PERMEABILITY = {"ovarian": 1.2, "breast": 1.0, "kaposi": 2.0, "myeloma": 0.7, "sarcoma": 0.8}
# Intrinsic anthracycline sensitivity (log-kill multiplier), assumed: Kaposi responds best to liposomal
# doxorubicin (ORR ~45-60 %, Northfelt 1998), ovarian and breast ~10-30 %, sarcoma lower (Judson 2001).
SENSITIVITY = {"ovarian": 1.0, "breast": 1.1, "kaposi": 1.6, "myeloma": 0.9, "sarcoma": 0.7}

# Inter-individual variability (sd on the log scale) of tumour sensitivity and of marrow sensitivity.
# Values of this size are typical of population PK/PD fits (e.g. Friberg 2002 reports 30-50 % CV).
OMEGA_EFFICACY = 0.6
OMEGA_MARROW = 0.35


def cockcroft_gault(age: np.ndarray, weight_kg: np.ndarray, creatinine_mg_dl: np.ndarray,
                    female: np.ndarray) -> np.ndarray:
    """Creatinine clearance in mL/min: (140 − age) × weight / (72 × Scr), × 0.85 for women
    (Cockcroft & Gault, Nephron 1976;16:31)."""
    crcl = (140.0 - age) * weight_kg / (72.0 * creatinine_mg_dl)
    return np.where(female, 0.85 * crcl, crcl)


@dataclass
class Patients:
    """Arrays of patient covariates (one entry per patient) plus hidden per-patient random effects.

    The ``eta_*`` fields are the truth a site never sees: they persist across a patient's cycles, so
    what happened in one cycle (and what the wearables showed) carries information about the next.
    """

    age_years: np.ndarray
    female: np.ndarray
    weight_kg: np.ndarray
    height_cm: np.ndarray
    bilirubin_umol_l: np.ndarray
    creatinine_clearance_ml_min: np.ndarray
    anc_baseline_e9_l: np.ndarray
    ecog: np.ndarray
    tumour_type: np.ndarray  # index into TUMOUR_TYPES
    tumour_burden_mm: np.ndarray
    prior_dose_mg_m2: np.ndarray
    resting_hr_bpm: np.ndarray
    eta_efficacy: np.ndarray
    eta_marrow: np.ndarray

    def __len__(self) -> int:
        return len(self.age_years)

    @property
    def bsa_m2(self) -> np.ndarray:
        return mosteller_bsa_m2(self.height_cm, self.weight_kg)

    def take(self, index: np.ndarray) -> Patients:
        """The patients at ``index`` (numpy fancy indexing on every field)."""
        return Patients(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass(frozen=True)
class Population:
    """Where a clinic's patients come from: the knobs that make clinics differ (non-IID)."""

    tumour_mix: tuple[float, ...] = (0.35, 0.3, 0.1, 0.1, 0.15)
    age_mean: float = 60.0
    age_sd: float = 11.0
    frailty: float = 0.0  # shifts ECOG upwards and bilirubin / creatinine upwards
    prior_anthracycline_share: float = 0.3


def sample_patients(rng: np.random.Generator, n: int, population: Population = Population()) -> Patients:
    """Draw ``n`` patients from ``population``."""
    tumour = rng.choice(len(TUMOUR_TYPES), size=n, p=np.asarray(population.tumour_mix) / sum(population.tumour_mix))
    female_share = np.array([FEMALE_SHARE[t] for t in TUMOUR_TYPES])[tumour]
    female = rng.random(n) < female_share
    age = np.clip(rng.normal(population.age_mean, population.age_sd, n), 18, 95)
    h_mean = np.where(female, HEIGHT_CM["F"][0], HEIGHT_CM["M"][0])
    w_mean = np.where(female, WEIGHT_KG["F"][0], WEIGHT_KG["M"][0])
    height = np.clip(rng.normal(h_mean, 7.2, n), 135, 210)
    # Weight is right-skewed: log-normal with the NHANES mean and sd.
    w_sigma = np.sqrt(np.log1p((18.0 / w_mean) ** 2))
    weight = np.clip(w_mean * np.exp(rng.normal(-0.5 * w_sigma**2, w_sigma, n)), 38, 200)
    # Total bilirubin: log-normal, median ~9 µmol/L in the normal range (ULN ~21); a share of patients
    # with liver involvement have cholestasis (x 2-6), more so in frailer populations.
    hepatic = rng.random(n) < 0.08 + 0.1 * population.frailty
    bilirubin = 9.0 * np.exp(rng.normal(0, 0.35, n)) * np.where(hepatic, rng.uniform(2, 6, n), 1.0)
    creatinine = 0.85 * np.exp(rng.normal(0.1 * population.frailty, 0.22, n))  # mg/dL
    crcl = np.clip(cockcroft_gault(age, weight, creatinine, female), 10, 200)
    anc = np.clip(4.2 * np.exp(rng.normal(0, 0.32, n)), 0.8, 20)  # 10^9/L, normal range ~1.8-7.7
    ecog_p = np.array([0.45, 0.4, 0.13, 0.02]) + population.frailty * np.array([-0.2, 0.05, 0.1, 0.05])
    ecog = rng.choice(4, size=n, p=ecog_p / ecog_p.sum())
    burden = np.clip(60.0 * np.exp(rng.normal(0, 0.55, n)), 10, 400)
    prior = np.where(rng.random(n) < population.prior_anthracycline_share, rng.uniform(60, 360, n), 0.0)
    resting_hr = rng.normal(74, 8, n) + 3 * ecog
    return Patients(
        age_years=age, female=female, weight_kg=weight, height_cm=height, bilirubin_umol_l=bilirubin,
        creatinine_clearance_ml_min=crcl, anc_baseline_e9_l=anc, ecog=ecog, tumour_type=tumour,
        tumour_burden_mm=burden, prior_dose_mg_m2=prior, resting_hr_bpm=resting_hr,
        eta_efficacy=rng.normal(0, OMEGA_EFFICACY, n), eta_marrow=rng.normal(0, OMEGA_MARROW, n),
    )


def tumour_table(mapping: dict[str, float]) -> np.ndarray:
    """A per-tumour-type constant as an array indexed like ``Patients.tumour_type``."""
    return np.array([mapping[t] for t in TUMOUR_TYPES])
