"""The simulator reproduces the reference numbers DESIGN.md names, each from its source."""

import numpy as np
import pytest
from scipy.integrate import quad

from shared.bsa import mosteller_bsa_m2 as mosteller_bsa
from simulation import disposition, effect
from simulation.formulations import (
    SEED_EE_PCT,
    SEED_RELEASE_H,
    SEED_SIZE_NM,
    SEED_ZETA_MV,
    formulation_library,
    reference_products,
    sample_formulations,
)
from simulation.oracle import PatientState, cycle_outcomes, pharmacology
from simulation.release import weibull_released_fraction


def test_pegylated_liposomal_doxorubicin_clearance_and_half_life_match_the_label():
    pld = reference_products().take(np.array([0]))
    cl = disposition.carrier_clearance(pld.particle_size_nm, pld.zeta_mv, pld.pegylated)[0]
    assert 0.04 <= cl <= 0.06  # L/h/m², Gabizon 1994 / Doxil label
    assert 45 <= disposition.half_life_h(cl) <= 65  # label: 55 h


def test_free_doxorubicin_clearance_lies_in_the_label_range():
    cl = disposition.free_drug_clearance(np.array([9.0, 9.0]), np.array([True, False]))
    assert np.all((cl >= 19) & (cl <= 49))


def test_raised_bilirubin_halves_free_drug_clearance_near_the_label_threshold():
    normal, cholestatic = disposition.free_drug_clearance(np.array([9.0, 51.0]), np.array([False, False]))
    assert 0.4 <= cholestatic / normal <= 0.6


def test_carrier_clearance_rises_with_size_above_150_nm_and_with_charge():
    cl = disposition.carrier_clearance(np.array([100.0, 150.0, 200.0, 300.0]), -7.5, True)
    assert cl[0] == pytest.approx(cl[1])
    assert cl[2] > 2 * cl[1] and cl[3] > 5 * cl[2]
    neutral, cationic, anionic = disposition.carrier_clearance(100.0, np.array([-7.5, 25.0, -40.0]), True)
    assert cationic > 2 * neutral and anionic > 2 * neutral


def test_renal_clearance_only_below_five_and_a_half_nanometres():
    tiny, small = disposition.carrier_clearance(np.array([3.0, 10.0]), -7.5, True, 100.0, 1.8)
    assert tiny > 50 * small
    assert small == pytest.approx(disposition.carrier_clearance(100.0, -7.5, True, 100.0, 1.8), rel=1e-3)


@pytest.mark.parametrize(("cl", "tau", "beta"), [(0.045, 600.0, 0.67), (1.2, 3.0, 0.8), (0.2, 12.0, 0.3),
                                                 (0.05, 12.0, 1.5)])
def test_released_fraction_quadrature_matches_numerical_integration(cl, tau, beta):
    k = cl / disposition.CARRIER_VOLUME_L_M2

    def integrand(t):
        return k * np.exp(-k * t) * weibull_released_fraction(t, tau, beta)

    exact, _ = quad(integrand, 0, np.inf, limit=400)
    assert disposition.released_in_plasma_fraction(cl, tau, beta) == pytest.approx(exact, abs=2e-3)


def test_median_tumour_delivery_over_the_formulation_library_is_near_seven_tenths_of_a_percent():
    f = formulation_library(np.random.default_rng(0), n_seed=4000, n_wide=4000)
    cl = disposition.carrier_clearance(f.particle_size_nm, f.zeta_mv, f.pegylated)
    median = np.median(disposition.tumour_delivery_fraction(f.particle_size_nm, cl, 1.0))
    assert 0.005 <= median <= 0.009  # Wilhelm 2016: median 0.7 % of the injected dose


def test_tumour_delivery_peaks_near_100_nm():
    sizes = np.array([30.0, 60.0, 100.0, 140.0, 250.0])
    cl = disposition.carrier_clearance(sizes, -7.5, True)
    delivery = disposition.tumour_delivery_fraction(sizes, cl, 1.0)
    assert delivery.argmax() == 2


@pytest.mark.parametrize(("dose", "swain"), [(400, 0.05), (550, 0.26), (700, 0.48)])
def test_heart_failure_probability_follows_swain_2003(dose, swain):
    assert effect.chf_cumulative_probability(dose) == pytest.approx(swain, abs=0.06)


def test_nadir_table_is_strictly_decreasing_and_reaches_grade_four():
    _, ratio = effect.nadir_ratio_table()
    assert np.all(np.diff(ratio) < 0)
    assert ratio[0] > 0.99 and ratio[-1] < 0.1


def _ovarian_cohort(n=4000):
    rng = np.random.default_rng(5)
    return PatientState(
        age_years=rng.normal(60, 10, n), female=np.ones(n, bool), bsa_m2=np.full(n, 1.8),
        bilirubin_umol_l=np.full(n, 9.0), creatinine_clearance_ml_min=np.full(n, 90.0),
        anc_baseline_e9_l=4.2 * np.exp(rng.normal(0, 0.3, n)), ecog=rng.integers(0, 2, n),
        tumour_type=np.zeros(n, int), tumour_burden_mm=np.full(n, 60.0), cumulative_dose_mg_m2=np.zeros(n))


def _rates(formulation, dose, interval):
    state = _ovarian_cohort()
    f = formulation.take(np.zeros(len(state.age_years), int))
    o = cycle_outcomes(state, f, pharmacology(state, f), dose, interval)
    return o


def test_per_cycle_response_of_standard_regimens_is_in_the_calibrated_range():
    pld = reference_products().take(np.array([0]))
    free = reference_products().take(np.array([0]))
    free.encapsulation_pct = np.array([0.0])
    assert 0.2 <= _rates(free, 60.0, 21).p_response.mean() <= 0.35
    assert 0.25 <= _rates(pld, 50.0, 28).p_response.mean() <= 0.45


def test_pld_50_q4w_gives_label_rates_of_hand_foot_syndrome_and_neutropenia():
    pld = reference_products().take(np.array([0]))
    full, reduced = _rates(pld, 50.0, 28), _rates(pld, 40.0, 28)
    assert 0.15 <= full.p_ppe.mean() <= 0.30  # label: grade 3-4 PPE ~23 % at 50 mg/m² q4w
    assert reduced.p_ppe.mean() < 0.6 * full.p_ppe.mean()  # Lyass 2000: dose intensity drives PPE
    assert 0.05 <= full.p_neutropenia.mean() <= 0.20  # Gordon 2001: 12 % grade 3-4


def test_encapsulation_spares_the_marrow_and_the_heart_relative_to_free_drug():
    pld = reference_products().take(np.array([0]))
    free = reference_products().take(np.array([0]))
    free.encapsulation_pct = np.array([0.0])
    liposomal, conventional = _rates(pld, 50.0, 21), _rates(free, 50.0, 21)
    assert conventional.p_neutropenia.mean() > 2 * liposomal.p_neutropenia.mean()
    state = _ovarian_cohort()
    state.cumulative_dose_mg_m2 = np.full(len(state.age_years), 450.0)
    f_lip, f_free = (x.take(np.zeros(len(state.age_years), int)) for x in (pld, free))
    chf_lip = cycle_outcomes(state, f_lip, pharmacology(state, f_lip), 50.0, 21).p_chf.mean()
    chf_free = cycle_outcomes(state, f_free, pharmacology(state, f_free), 50.0, 21).p_chf.mean()
    assert chf_free > 2 * chf_lip  # O'Brien 2004: cardiotoxicity HR 3.16 for conventional vs PLD


def test_default_formulation_marginals_match_the_seed_papers_table_1():
    f = sample_formulations(np.random.default_rng(0), 20000)
    for values, (mean, sd) in [(f.particle_size_nm, SEED_SIZE_NM), (f.zeta_mv, SEED_ZETA_MV),
                               (f.encapsulation_pct, SEED_EE_PCT), (f.release_tau_h, SEED_RELEASE_H)]:
        assert values.mean() == pytest.approx(mean, rel=0.02)
        assert values.std() == pytest.approx(sd, rel=0.05)


def test_mosteller_bsa_of_a_reference_adult():
    assert mosteller_bsa(170.0, 70.0) == pytest.approx(1.818, abs=1e-3)
