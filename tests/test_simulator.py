"""The simulated world: seeded, valid, non-IID, and its closed-form probabilities agree with its draws."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import ndtr

from shared.validation import validate_site
from simulation import effect
from simulation.clinics import generate_sites, make_world, simulate_clinic
from simulation.example_patient import example_record
from simulation.oracle import best_action, outcome_grid
from simulation.patients import OMEGA_EFFICACY, OMEGA_MARROW

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_sites_and_another_seed_does_not(tmp_path):
    generate_sites(3, seed=4, out=tmp_path / "a")
    generate_sites(3, seed=4, out=tmp_path / "b")
    generate_sites(3, seed=5, out=tmp_path / "c")
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a["clinic_00/episodes.csv"] != c["clinic_00/episodes.csv"]


def test_every_simulated_site_passes_validation(tmp_path):
    world = generate_sites(4, seed=2, out=tmp_path)
    for clinic in world.clinics:
        report = validate_site(tmp_path / clinic.name)
        assert report.ok, report.format()
        assert report.summary["n_episodes"] > 0


def test_clinic_sizes_span_tens_to_thousands_of_episodes():
    world = make_world(10, seed=0)
    counts = sorted(len(simulate_clinic(world, c)[0]) for c in world.clinics)
    assert counts[0] < 100 and counts[-1] > 1000


def test_clinic_names_have_the_digits_the_largest_index_needs_and_sort_in_order():
    assert [c.name for c in make_world(3, 0).clinics] == ["clinic_00", "clinic_01", "clinic_02"]
    names = [c.name for c in make_world(101, 0, patients_per_clinic=5).clinics]
    assert names[0] == "clinic_000" and names[-1] == "clinic_100" and sorted(names) == names


def test_clinics_differ_in_tumour_mix_catalogue_and_dosing():
    world = make_world(6, seed=1)
    tables = [simulate_clinic(world, c)[0] for c in world.clinics]
    catalogues = {frozenset(t["formulation_id"]) for t in tables}
    assert len(catalogues) >= 4
    first_doses = [t.loc[t["cycle"] == 1, "dose_mg_m2"].mean() for t in tables]
    assert max(first_doses) - min(first_doses) > 5.0


def test_a_model_fit_at_one_clinic_does_worse_at_another_than_at_home():
    """Non-IID: a toxicity model learned at a clinic ranks its own held-out patients better than others'."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = ["age_years", "ecog", "anc_baseline_e9_l", "dose_mg_m2", "cumulative_dose_mg_m2", "particle_size_nm",
                "zeta_mv", "encapsulation_pct", "pegylated", "release_tau_h", "interval_days"]
    world = make_world(4, seed=0, patients_per_clinic=700)
    tables = [simulate_clinic(world, c)[0].dropna(subset=features + ["toxicity_grade3"]) for c in world.clinics]
    gaps = []
    for i, home in enumerate(tables):
        train = home.sample(frac=0.7, random_state=0)
        test = home.drop(train.index)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
            train[features], train["toxicity_grade3"])
        home_auc = roc_auc_score(test["toxicity_grade3"], model.predict_proba(test[features])[:, 1])
        away = [roc_auc_score(t["toxicity_grade3"], model.predict_proba(t[features])[:, 1])
                for j, t in enumerate(tables) if j != i]
        gaps.append(home_auc - np.mean(away))
    assert np.mean(gaps) > 0.02
    assert sum(g > 0 for g in gaps) >= 3


def test_response_probability_matches_monte_carlo_over_the_random_effect():
    rng = np.random.default_rng(0)
    log_kill, growth, interval = 0.5, np.log(2) / 40, 28
    eta = rng.normal(0, OMEGA_EFFICACY, 400_000) + rng.normal(0, effect.OMEGA_EFFICACY_CYCLE, 400_000)
    empirical = np.mean(effect.shrinkage(log_kill, growth, interval, eta) >= effect.RESPONSE_SHRINKAGE)
    assert effect.response_probability(log_kill, growth, interval) == pytest.approx(empirical, abs=0.005)


def test_neutropenia_probability_matches_monte_carlo_over_the_random_effect():
    rng = np.random.default_rng(1)
    x, anc0 = 60.0, 4.0
    nadir = anc0 * effect.nadir_ratio(x * np.exp(rng.normal(0, OMEGA_MARROW, 400_000)))
    assert effect.neutropenia_probability(x, anc0) == pytest.approx(np.mean(nadir < 1.0), abs=0.005)


def test_cycle_probability_of_heart_failure_compounds_to_the_cumulative_curve():
    survive, total = 1.0, 0.0
    for _ in range(10):
        survive *= 1 - effect.chf_cycle_probability(total, 60.0)
        total += 60.0
    assert 1 - survive == pytest.approx(effect.chf_cumulative_probability(600.0), rel=1e-9)


def test_oracle_grid_has_the_expected_shape_and_its_best_action_dominates():
    world = make_world(2, seed=0)
    from simulation.oracle import PatientState
    rng = np.random.default_rng(2)
    n = 50
    state = PatientState(
        age_years=rng.uniform(40, 80, n), female=rng.random(n) < 0.5, bsa_m2=np.full(n, 1.8),
        bilirubin_umol_l=np.full(n, 10.0), creatinine_clearance_ml_min=np.full(n, 90.0),
        anc_baseline_e9_l=np.full(n, 4.0), ecog=rng.integers(0, 3, n), tumour_type=rng.integers(0, 5, n),
        tumour_burden_mm=np.full(n, 60.0), cumulative_dose_mg_m2=rng.uniform(0, 500, n))
    doses, intervals = np.linspace(10, 80, 15), np.array([14, 21, 28])
    grid = outcome_grid(state, world.library, doses, intervals)
    assert grid.utility.shape == (n, len(world.library), 15, 3)
    assert np.all((grid.p_toxicity >= 0) & (grid.p_toxicity <= 1))
    choice = best_action(state, world.library, doses, intervals)
    assert np.allclose(choice.utility, grid.utility.reshape(n, -1).max(axis=1))
    # More drug never lowers the toxicity risk.
    assert np.all(np.diff(grid.p_toxicity, axis=2) >= -1e-12)


def test_response_probability_is_a_normal_tail():
    k = np.array([0.2, 0.5, 1.0])
    needed = np.log(2) / 40 * 28 - np.log(0.7)
    omega = np.hypot(OMEGA_EFFICACY, effect.OMEGA_EFFICACY_CYCLE)
    assert np.allclose(effect.response_probability(k, np.log(2) / 40, 28), ndtr(np.log(k / needed) / omega))


def test_committed_example_patient_is_what_the_simulator_writes():
    committed = json.loads((ROOT / "examples" / "patient.json").read_text())
    assert committed == json.loads(json.dumps(example_record()))
