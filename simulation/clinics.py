"""Simulated clinics: who they treat, what they stock, how they dose, and the site files they keep.

Clinics are non-IID by construction, as real ones are:
- population (age, frailty, tumour mix, prior anthracycline) — :class:`simulation.patients.Population`;
- formulation catalogue: a subset of the world's library;
- dosing habits: a confounded logging policy. Frail, older or cardiac-risk patients get lower doses and the
  formulation the clinic believes safest, so naive outcome-vs-dose associations are biased, as in
  observational data;
- measurement: efficacy read-out noise, lab missingness, wearable habits (gaps, temperature bias);
- size: from tens to thousands of episodes.

Each patient is followed over cycles: tumour burden, cumulative dose and neutrophil recovery carry over;
treatment stops on progression (RECIST: ≥ 20 % growth), heart failure, a clinic's cycle limit or dropout;
after a grade ≥ 3 toxicity the clinic reduces the next dose and may delay it (label practice).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.dosing_policy import HEPATIC_BANDS_UMOL_L, HEPATIC_FACTORS, LABEL_DOSE_MG_M2, LABEL_INTERVAL_DAYS
from shared.schema import EPISODE_COLUMNS, EPISODES_FILE, SCHEMA_VERSION, SITE_FILE, TUMOUR_TYPES, VITALS_FILE
from simulation.effect import OMEGA_EFFICACY_CYCLE, nadir_ratio, shrinkage
from simulation.formulations import Formulations, formulation_library
from simulation.oracle import CycleOutcomes, PatientState, cycle_outcomes, growth_rate_per_day, pharmacology
from simulation.patients import Patients, Population, sample_patients
from simulation.wearables import DeviceHabits, simulate_vitals

# Label starting doses, schedules and hepatic reductions: the label's (shared.dosing_policy), public knowledge
# the clinics and the policy share.
LABEL_INTERVAL_D = LABEL_INTERVAL_DAYS
# RECIST 1.1 progression: ≥ 20 % growth of the sum of diameters (Eisenhauer et al., Eur J Cancer 2009).
PROGRESSION_GROWTH = 0.20
TOXICITY_DOSE_REDUCTION = 0.75
DROPOUT_PER_CYCLE = 0.05
# Neutrophils recover after the nadir with a half-time of about a week (Friberg 2002 transit time).
ANC_RECOVERY_HALF_TIME_D = 7.0
LAB_CV = 0.08  # analytical + biological variation of a lab value (coefficient of variation)


@dataclass(frozen=True)
class ClinicProfile:
    """Everything that makes one simulated clinic differ from another."""

    name: str
    n_patients: int
    population: Population
    catalogue: tuple[int, ...]  # indices into the world's formulation library
    formulation_preference: tuple[float, ...]  # logit per catalogue entry
    dose_aggressiveness: float = 1.0  # multiplies label doses
    hepatic_compliance: float = 0.9  # probability the label hepatic reduction is applied
    frailty_dose_reduction: float = 0.8  # dose factor for ECOG ≥ 2 or age ≥ 75
    cardiac_caution: float = 2.0  # how strongly cardiac risk steers choice to low-free-drug carriers
    max_cycles: int = 6
    efficacy_noise_sd: float = 0.1  # sd of log burden ratio measurement
    lab_missing: float = 0.05
    habits: DeviceHabits = field(default_factory=DeviceHabits)
    seed: int = 0


@dataclass
class World:
    """The simulated world: its formulation library and its clinics."""

    seed: int
    library: Formulations
    clinics: list[ClinicProfile]

    def catalogue(self, clinic: ClinicProfile) -> Formulations:
        return self.library.take(np.asarray(clinic.catalogue))


def clinic_sizes(n_clinics: int, smallest: int = 12, largest: int = 800) -> np.ndarray:
    """Patients per clinic, geometrically spaced from ``smallest`` to ``largest`` (≈ 4 cycles each)."""
    if n_clinics == 1:
        return np.array([largest])
    return np.rint(np.geomspace(smallest, largest, n_clinics)).astype(int)


def make_world(n_clinics: int, seed: int, patients_per_clinic: int | None = None) -> World:
    """A world of ``n_clinics`` clinics, fully determined by ``seed``. Names are ``clinic_00`` … with as many
    digits as the largest index needs (at least two), so they sort in order."""
    width = max(2, len(str(n_clinics - 1)))
    rng = np.random.default_rng([seed, 0])
    library = formulation_library(rng)
    sizes = clinic_sizes(n_clinics) if patients_per_clinic is None else np.full(n_clinics, patients_per_clinic)
    sizes = rng.permutation(sizes)
    clinics = []
    for i in range(n_clinics):
        mix = rng.dirichlet(np.full(len(TUMOUR_TYPES), 1.5))
        n_cat = int(rng.integers(3, 6))
        catalogue = tuple(int(j) for j in np.sort(rng.choice(len(library), size=n_cat, replace=False)))
        clinics.append(ClinicProfile(
            name=f"clinic_{i:0{width}d}",
            n_patients=int(sizes[i]),
            population=Population(
                tumour_mix=tuple(float(x) for x in mix),
                age_mean=float(rng.uniform(52, 68)),
                age_sd=float(rng.uniform(8, 13)),
                frailty=float(rng.uniform(0, 1)),
                prior_anthracycline_share=float(rng.uniform(0.1, 0.5)),
            ),
            catalogue=catalogue,
            formulation_preference=tuple(float(x) for x in rng.normal(0, 1.0, n_cat)),
            dose_aggressiveness=float(rng.uniform(0.8, 1.15)),
            hepatic_compliance=float(rng.uniform(0.6, 1.0)),
            frailty_dose_reduction=float(rng.uniform(0.7, 0.95)),
            cardiac_caution=float(rng.uniform(0.5, 4.0)),
            max_cycles=int(rng.integers(4, 9)),
            efficacy_noise_sd=float(rng.uniform(0.04, 0.2)),
            lab_missing=float(rng.uniform(0.0, 0.15)),
            habits=DeviceHabits(
                temperature_bias_c=float(rng.uniform(-0.3, 0.3)),
                gap_probability=float(rng.uniform(0.05, 0.35)),
                missing_reading_probability=float(rng.uniform(0.0, 0.06)),
            ),
            seed=int(rng.integers(2**31)),
        ))
    return World(seed=seed, library=library, clinics=clinics)


def logging_policy_formulation(rng: np.random.Generator, clinic: ClinicProfile, catalogue: Formulations,
                               free_fraction: np.ndarray, state: PatientState) -> np.ndarray:
    """The clinic's choice of formulation: its own preference, steered towards carriers that release
    little free drug when cardiac risk is high (older, prior anthracycline). Returns catalogue indices.

    ``free_fraction`` has shape (patients, catalogue)."""
    cardiac_risk = state.cumulative_dose_mg_m2 / 400.0 + np.maximum(state.age_years - 65.0, 0) / 20.0
    steer = clinic.cardiac_caution * cardiac_risk[:, None] * free_fraction
    logits = np.asarray(clinic.formulation_preference)[None, :] - steer
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random(len(p))[:, None]
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def label_hepatic_factor(bilirubin_umol_l: np.ndarray) -> np.ndarray:
    """The label's dose factor for a measured bilirubin (1 when normal or not measured)."""
    bili = np.nan_to_num(np.asarray(bilirubin_umol_l, dtype=float), nan=0.0)
    return np.where(bili > HEPATIC_BANDS_UMOL_L[1], HEPATIC_FACTORS[1],
                    np.where(bili > HEPATIC_BANDS_UMOL_L[0], HEPATIC_FACTORS[0], 1.0))


def logging_policy_dose(rng: np.random.Generator, clinic: ClinicProfile, state: PatientState,
                        bilirubin_seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-cycle dose (mg/m²) and interval (days) by the clinic's habits: label dose by tumour type ×
    aggressiveness, reduced for frailty and (usually) for raised bilirubin; rounded to 5 mg/m²."""
    tumours = np.asarray(TUMOUR_TYPES)[state.tumour_type]
    dose = np.array([LABEL_DOSE_MG_M2[t] for t in tumours]) * clinic.dose_aggressiveness
    frail = (state.ecog >= 2) | (state.age_years >= 75)
    dose = dose * np.where(frail, clinic.frailty_dose_reduction, 1.0)
    hepatic = label_hepatic_factor(bilirubin_seen)
    comply = rng.random(len(dose)) < clinic.hepatic_compliance
    dose = dose * np.where(comply, hepatic, 1.0) * np.exp(rng.normal(0, 0.08, len(dose)))
    dose = np.clip(5.0 * np.rint(dose / 5.0), 10.0, 80.0)
    interval = np.array([LABEL_INTERVAL_D[t] for t in tumours]) + 7 * (rng.random(len(dose)) < 0.1)
    return dose, interval


def measure_lab(rng: np.random.Generator, value: np.ndarray, missing: float) -> np.ndarray:
    """A lab value as the clinic records it: multiplicative noise, missing at random."""
    seen = value * np.exp(rng.normal(0, LAB_CV, len(value)))
    return np.where(rng.random(len(value)) < missing, np.nan, seen)


@dataclass
class Cohort:
    """The true state of a clinic's patients between cycles: what carries over from one cycle to the next.

    ``simulate_clinic`` (the clinics' logged data) and ``simulation.policy_rollout`` (any policy's value) both
    step patients through :func:`realise_cycle`, :meth:`carry_over` and :meth:`stops`, so a policy is scored
    on the very dynamics its training data came from.
    """

    patients: Patients
    burden: np.ndarray
    cumulative: np.ndarray
    anc_now: np.ndarray
    age: np.ndarray
    start_day: np.ndarray
    active: np.ndarray

    @classmethod
    def start(cls, patients: Patients) -> Cohort:
        n = len(patients)
        return cls(patients=patients, burden=patients.tumour_burden_mm.copy(),
                   cumulative=patients.prior_dose_mg_m2.copy(), anc_now=patients.anc_baseline_e9_l.copy(),
                   age=patients.age_years.copy(), start_day=np.zeros(n, dtype=int), active=np.ones(n, dtype=bool))

    def state(self, idx: np.ndarray) -> PatientState:
        """The true state of patients ``idx`` at the start of their current cycle."""
        p = self.patients
        return PatientState(
            age_years=self.age[idx], female=p.female[idx], bsa_m2=p.bsa_m2[idx],
            bilirubin_umol_l=p.bilirubin_umol_l[idx], creatinine_clearance_ml_min=p.creatinine_clearance_ml_min[idx],
            anc_baseline_e9_l=self.anc_now[idx], ecog=p.ecog[idx], tumour_type=p.tumour_type[idx],
            tumour_burden_mm=self.burden[idx], cumulative_dose_mg_m2=self.cumulative[idx],
        )

    def carry_over(self, idx: np.ndarray, outcome: RealisedCycle, dose: np.ndarray, interval: np.ndarray) -> None:
        """Carry patients ``idx`` to their next cycle: the tumour shrinks (or grows) by the realised ratio,
        the cumulative dose grows by the dose given, neutrophils recover from the nadir with half-time
        ``ANC_RECOVERY_HALF_TIME_D`` after day 12 (Friberg 2002 transit time), the patient ages."""
        self.burden[idx] = np.clip(self.burden[idx] * outcome.ratio, 5.0, 500.0)
        self.cumulative[idx] += dose
        days_after_nadir = np.maximum(interval - 12.0, 0.0)
        half_lives = days_after_nadir / ANC_RECOVERY_HALF_TIME_D
        recovered = 1.0 - (1.0 - outcome.nadir / self.anc_now[idx]) * 0.5 ** half_lives
        self.anc_now[idx] = np.maximum(self.patients.anc_baseline_e9_l[idx] * recovered, 0.3)
        self.age[idx] += interval / 365.25
        self.start_day[idx] += interval

    def stops(self, rng: np.random.Generator, idx: np.ndarray, outcome: RealisedCycle) -> np.ndarray:
        """Which of ``idx`` stop treatment after this cycle (progression by RECIST, heart failure, dropout);
        they are marked inactive. Returns the stop flags."""
        stop = (outcome.true_shrink <= -PROGRESSION_GROWTH) | outcome.chf | (rng.random(idx.size) < DROPOUT_PER_CYCLE)
        self.active[idx[stop]] = False
        return stop


@dataclass
class RealisedCycle:
    """What one cycle did to patients: expected outcomes (the oracle's) and the realised draws."""

    expected: CycleOutcomes
    true_shrink: np.ndarray
    ratio: np.ndarray  # burden after / before
    efficacy_seen: np.ndarray  # measured shrinkage in %
    nadir: np.ndarray  # true ANC nadir, 10^9/L
    ppe: np.ndarray
    toxicity: np.ndarray
    chf: np.ndarray
    lost: np.ndarray  # outcome not recorded


def realise_cycle(rng: np.random.Generator, clinic: ClinicProfile, cohort: Cohort, idx: np.ndarray,
                  state: PatientState, f: Formulations, dose: np.ndarray, interval: np.ndarray) -> RealisedCycle:
    """Realised outcomes of giving ``dose`` of ``f`` to patients ``idx``: the oracle's equations
    (:func:`simulation.oracle.cycle_outcomes`) with each patient's random effects (``eta_*``) and this
    cycle's variability (``OMEGA_EFFICACY_CYCLE``), measured with the clinic's read-out noise."""
    pk = pharmacology(state, f)
    expected = cycle_outcomes(state, f, pk, dose, interval)
    eta = cohort.patients.eta_efficacy[idx] + rng.normal(0, OMEGA_EFFICACY_CYCLE, idx.size)
    true_shrink = shrinkage(expected.log_kill, growth_rate_per_day(state.tumour_type), interval, eta)
    ratio = 1.0 - true_shrink
    seen_ratio = ratio * np.exp(rng.normal(0, clinic.efficacy_noise_sd, idx.size))
    nadir = cohort.anc_now[idx] * nadir_ratio(expected.marrow_x * np.exp(cohort.patients.eta_marrow[idx]))
    neutropenia = nadir < 1.0
    ppe = rng.random(idx.size) < expected.p_ppe
    charge = rng.random(idx.size) < expected.p_charge_reaction
    chf = rng.random(idx.size) < expected.p_chf
    lost = rng.random(idx.size) < 0.02  # outcome not recorded (lost to follow-up)
    return RealisedCycle(expected=expected, true_shrink=true_shrink, ratio=ratio,
                         efficacy_seen=100.0 * (1.0 - seen_ratio), nadir=nadir, ppe=ppe,
                         toxicity=neutropenia | ppe | charge, chf=chf, lost=lost)


def observed_covariates(rng: np.random.Generator, clinic: ClinicProfile, cohort: Cohort, idx: np.ndarray,
                        state: PatientState, bilirubin_seen: np.ndarray) -> dict[str, np.ndarray]:
    """The patient columns of ``episodes.csv`` at the start of a cycle as the clinic records them (labs with
    noise and missingness, burden with imaging noise); ``bilirubin_seen`` was measured before dosing."""
    p = cohort.patients
    return {
        "age_years": np.round(cohort.age[idx], 1),
        "sex": np.where(p.female[idx], "F", "M"),
        "weight_kg": np.round(p.weight_kg[idx], 1),
        "height_cm": np.round(p.height_cm[idx], 1),
        "bsa_m2": np.round(state.bsa_m2, 3),
        "bilirubin_umol_l": np.round(bilirubin_seen, 1),
        "creatinine_clearance_ml_min": np.round(
            measure_lab(rng, state.creatinine_clearance_ml_min, clinic.lab_missing), 1),
        "anc_baseline_e9_l": np.round(measure_lab(rng, cohort.anc_now[idx], clinic.lab_missing), 2),
        "ecog": p.ecog[idx],
        "tumour_type": np.asarray(TUMOUR_TYPES)[state.tumour_type],
        "tumour_burden_mm": np.round(np.clip(cohort.burden[idx] * np.exp(rng.normal(0, 0.05, idx.size)), 5, 500), 1),
        "cumulative_dose_mg_m2": np.round(cohort.cumulative[idx], 1),
    }


def treatment_columns(f: Formulations, dose: np.ndarray, interval: np.ndarray,
                      bsa: np.ndarray) -> dict[str, np.ndarray]:
    """The formulation and dosing columns of ``episodes.csv``."""
    return {
        "formulation_id": f.formulation_id,
        "particle_size_nm": np.round(f.particle_size_nm, 1),
        "zeta_mv": np.round(f.zeta_mv, 1),
        "encapsulation_pct": np.round(f.encapsulation_pct, 1),
        "pegylated": f.pegylated.astype(int),
        "drug_loading_pct": np.round(f.drug_loading_pct, 2),
        "release_tau_h": np.round(f.release_tau_h, 2),
        "release_beta": np.round(f.release_beta, 3),
        "dose_mg_m2": dose,
        "dose_mg": np.round(dose * np.round(bsa, 3), 1),
        "interval_days": interval,
    }


def observed_outcomes(rng: np.random.Generator, outcome: RealisedCycle) -> dict[str, np.ndarray]:
    """The outcome columns of ``episodes.csv``: measured efficacy and response (missing when lost), the
    measured ANC nadir, grade ≥ 3 toxicity and heart failure."""
    lost = outcome.lost
    return {
        "efficacy_pct": np.where(lost, np.nan, np.round(np.maximum(outcome.efficacy_seen, -300.0), 1)),
        "response": pd.array(np.where(lost, np.nan, outcome.efficacy_seen >= 30.0), dtype="Int64"),
        "anc_nadir_e9_l": np.round(measure_lab(rng, outcome.nadir, 0.0), 2),
        "toxicity_grade3": outcome.toxicity.astype(int),
        "chf": outcome.chf.astype(int),
    }


def simulate_clinic(world: World, clinic: ClinicProfile) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Episodes and vitals of one clinic, as its site files hold them (schema of ``shared.schema``)."""
    rng = np.random.default_rng(clinic.seed)
    catalogue = world.catalogue(clinic)
    patients = sample_patients(rng, clinic.n_patients, clinic.population)
    n = len(patients)
    pid = np.array([f"{clinic.name}-P{i:05d}" for i in range(n)])
    cohort = Cohort.start(patients)
    dose = np.zeros(n)
    interval = np.zeros(n, dtype=int)
    formulation = np.zeros(n, dtype=int)
    episodes, vitals_inputs = [], []

    for cycle in range(1, clinic.max_cycles + 1):
        idx = np.flatnonzero(cohort.active)
        if idx.size == 0:
            break
        state = cohort.state(idx)
        bilirubin_seen = measure_lab(rng, state.bilirubin_umol_l, clinic.lab_missing)
        if cycle == 1:
            grid = pharmacology(_column(state), _row(catalogue))
            formulation[idx] = logging_policy_formulation(rng, clinic, catalogue, grid.free_fraction, state)
            dose[idx], interval[idx] = logging_policy_dose(rng, clinic, state, bilirubin_seen)
        f = catalogue.take(formulation[idx])
        outcome = realise_cycle(rng, clinic, cohort, idx, state, f, dose[idx], interval[idx])
        covariates = observed_covariates(rng, clinic, cohort, idx, state, bilirubin_seen)
        episodes.append(pd.DataFrame({
            "episode_id": [f"{clinic.name}-E{cycle:02d}{i:05d}" for i in idx],
            "patient_id": pid[idx],
            "cycle": cycle,
            "start_day": cohort.start_day[idx],
            **covariates,
            **treatment_columns(f, dose[idx], interval[idx], state.bsa_m2),
            **observed_outcomes(rng, outcome),
        }))
        vitals_inputs.append((idx, outcome.nadir, outcome.ppe))

        # Carry the state to the next cycle; the clinic reduces (and may delay) after a toxicity.
        cohort.carry_over(idx, outcome, dose[idx], interval[idx])
        toxicity = outcome.toxicity
        dose[idx] = np.where(toxicity, np.maximum(5.0 * np.rint(dose[idx] * TOXICITY_DOSE_REDUCTION / 5.0), 10.0),
                             dose[idx])
        interval[idx] = np.where(toxicity & (rng.random(idx.size) < 0.5), interval[idx] + 7, interval[idx])
        interval[idx] = np.minimum(interval[idx], 42)
        cohort.stops(rng, idx, outcome)

    table = pd.concat(episodes, ignore_index=True)
    vitals = cycle_vitals(rng, clinic, patients, pid, table, vitals_inputs)
    return table[[c.name for c in EPISODE_COLUMNS]], vitals


def cycle_vitals(rng: np.random.Generator, clinic: ClinicProfile, patients: Patients, pid: np.ndarray,
                 table: pd.DataFrame, vitals_inputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Wearable readings (``simulation.wearables``) of the episodes in ``table``; ``vitals_inputs`` holds per
    cycle the patient indices, true ANC nadirs and hand-foot-syndrome flags, in the table's row order."""
    idx = np.concatenate([v[0] for v in vitals_inputs])
    nadir = np.concatenate([v[1] for v in vitals_inputs])
    ppe = np.concatenate([v[2] for v in vitals_inputs])
    vitals, _ = simulate_vitals(
        rng, table["episode_id"].to_numpy(), pid[idx], table["interval_days"].to_numpy(), nadir, ppe,
        patients.ecog[idx], patients.resting_hr_bpm[idx], clinic.habits)
    return vitals


def _column(state: PatientState) -> PatientState:
    return PatientState(**{k: np.asarray(v)[:, None] for k, v in vars(state).items()})


def _row(f: Formulations) -> Formulations:
    return Formulations(**{k: np.asarray(v)[None, :] for k, v in vars(f).items()})


SIMULATED_STATE_DIR = ".ledger-heads"
"""Where simulated clinics keep their privacy ledgers' head copies (``client.ledger``): a folder beside the site
folders, made anew with them, so fresh clinics start fresh budgets and nothing lands in the user's home."""


@dataclass(frozen=True)
class SitePrivacy:
    """The privacy budget a simulated site writes in its site.toml (a hospital decides its own): DP on or off,
    (ε, δ), optionally the most one run may spend (``epsilon_per_run``; default all that is left) and shares of
    ε per phase (``[privacy.shares]``; ``client.dp`` defaults otherwise)."""

    dp: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    epsilon_per_run: float | None = None
    shares: tuple[tuple[str, float], ...] = ()


def site_toml(clinic: ClinicProfile, privacy: SitePrivacy = SitePrivacy()) -> str:
    """The site's configuration file: name, schema version and its privacy budget."""
    text = (f'[site]\nname = "{clinic.name}"\nschema_version = "{SCHEMA_VERSION}"\n\n'
            f"[privacy]\ndp = {str(privacy.dp).lower()}\nepsilon = {privacy.epsilon!r}\ndelta = {privacy.delta!r}\n")
    if privacy.epsilon_per_run is not None:
        text += f"epsilon_per_run = {privacy.epsilon_per_run!r}\n"
    if privacy.shares:
        text += "\n[privacy.shares]\n" + "".join(f"{phase} = {share!r}\n" for phase, share in privacy.shares)
    return text


def write_site(folder: Path, episodes: pd.DataFrame, vitals: pd.DataFrame, clinic: ClinicProfile,
               privacy: SitePrivacy = SitePrivacy()) -> None:
    """Write one site folder; the bytes depend only on the data (fixed rounding, "\\n" line ends)."""
    folder.mkdir(parents=True, exist_ok=True)
    episodes.to_csv(folder / EPISODES_FILE, index=False, lineterminator="\n")
    vitals.to_csv(folder / VITALS_FILE, index=False, lineterminator="\n")
    (folder / SITE_FILE).write_text(site_toml(clinic, privacy))


def world_description(world: World) -> dict:
    """What the world was made of (library and clinic profiles), for ``world.json``."""
    lib = {k: np.asarray(v).tolist() for k, v in vars(world.library).items()}
    return {"seed": world.seed, "schema_version": SCHEMA_VERSION, "formulation_library": lib,
            "clinics": [asdict(c) for c in world.clinics]}


def generate_sites(n_clinics: int, seed: int, out: Path, patients_per_clinic: int | None = None,
                   privacy: SitePrivacy = SitePrivacy()) -> World:
    """Simulate ``n_clinics`` clinics and write one site folder each under ``out`` plus ``world.json``."""
    world = make_world(n_clinics, seed, patients_per_clinic)
    out = Path(out)
    for clinic in world.clinics:
        episodes, vitals = simulate_clinic(world, clinic)
        write_site(out / clinic.name, episodes, vitals, clinic, privacy)
    (out / "world.json").write_text(json.dumps(world_description(world), indent=1, sort_keys=True) + "\n")
    return world
