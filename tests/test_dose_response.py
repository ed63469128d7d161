"""The dose-decision outcome models: sums that add up, a Newton fit on sums equal to the pooled fit, per-row
bounds that hold, and fits that agree with independent references (scikit-learn; a likelihood written here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.linear_model import LogisticRegression

from shared.dose_response import (
    PATIENT_TERMS,
    PROPERTY_TERMS,
    add_sums,
    fit_by_sums,
    log_dose,
)
from shared.schema import EPISODE_COLUMNS, TUMOUR_TYPES, columns_by_name
from shared.structured_policy import catalogue_of
from shared.toxicity_model import NeutropeniaModel, OtherToxicityModel, ToxicityModel
from shared.tumour_response import TumourResponseModel, threshold_score_bound
from simulation.clinics import make_world, simulate_clinic

MODELS = (TumourResponseModel, NeutropeniaModel, OtherToxicityModel)


@pytest.fixture(scope="module")
def sites() -> list[pd.DataFrame]:
    """Three small simulated clinics' episodes (all cycles; the models keep the first)."""
    world = make_world(3, seed=7, patients_per_clinic=160)
    return [simulate_clinic(world, clinic)[0] for clinic in world.clinics]


@pytest.fixture(scope="module")
def catalogue(sites) -> dict[str, dict[str, float]]:
    return catalogue_of(pd.concat(sites, ignore_index=True))


def _some_coefficients(model, seed: int) -> np.ndarray:
    """A point away from the start (valid: ordered thresholds)."""
    rng = np.random.default_rng(seed)
    coef = model.start() + rng.normal(0, 0.3, len(model.start()))
    if isinstance(model, TumourResponseModel):
        layout = model._layout()
        coef[layout["thresholds"]] = np.sort(coef[layout["thresholds"]]) + np.arange(len(model.cuts_pct)) * 0.5
    return coef


# ---------------------------------------------------------------------------------------------------------
# Sums


@pytest.mark.parametrize("cls", MODELS)
def test_sums_of_two_halves_equal_the_sums_of_the_whole(cls, sites, catalogue):
    model = cls(catalogue)
    whole = pd.concat(sites, ignore_index=True)
    first, second = whole.iloc[: len(whole) // 2], whole.iloc[len(whole) // 2:]
    coef = _some_coefficients(model, 1)
    added = add_sums([model.site_sums(first, coef), model.site_sums(second, coef)])
    direct = model.site_sums(whole, coef)
    for key in direct:
        np.testing.assert_allclose(added[key], direct[key], rtol=1e-9, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("cls", MODELS)
def test_newton_fit_on_summed_site_sums_equals_the_fit_on_one_pooled_frame(cls, sites, catalogue):
    federated = fit_by_sums(cls(catalogue), sites)
    pooled = cls(catalogue).fit(pd.concat(sites, ignore_index=True))
    assert federated.converged_ and pooled.converged_
    assert federated.n_iter_ == pooled.n_iter_
    np.testing.assert_allclose(federated.coef_, pooled.coef_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(federated.covariance_, pooled.covariance_, rtol=1e-7, atol=1e-10)
    assert federated.n_ == pooled.n_ > 0


# ---------------------------------------------------------------------------------------------------------
# Per-row bounds


def _extreme_rows(catalogue: dict) -> pd.DataFrame:
    """Rows at the schema's limits (and missing values), with known and unknown formulations."""
    schema = columns_by_name(EPISODE_COLUMNS)
    rows = []
    for corner in range(16):

        def pick(name, c=corner, i=0):
            return schema[name].low if (c >> i) & 1 else schema[name].high

        row = {"cycle": 1, "age_years": pick("age_years", i=0), "sex": "F" if corner % 2 else "M",
               "ecog": pick("ecog", i=1), "tumour_type": TUMOUR_TYPES[corner % len(TUMOUR_TYPES)],
               "tumour_burden_mm": np.nan if corner == 3 else pick("tumour_burden_mm", i=2),
               "bilirubin_umol_l": np.nan if corner == 5 else pick("bilirubin_umol_l", i=3),
               "anc_baseline_e9_l": np.nan if corner == 6 else (0.0 if corner % 3 == 0 else 50.0),
               "interval_days": pick("interval_days", i=1), "dose_mg_m2": pick("dose_mg_m2", i=2),
               "formulation_id": list(catalogue)[corner % len(catalogue)] if corner % 4 else "unknown",
               "particle_size_nm": pick("particle_size_nm", i=0), "encapsulation_pct": pick("encapsulation_pct", i=1),
               "pegylated": corner % 2, "release_tau_h": pick("release_tau_h", i=3),
               "efficacy_pct": [-300.0, -35.0, 0.0, 29.9, 30.0, 100.0][corner % 6],
               "anc_nadir_e9_l": [0.0, 0.99, 1.0, 50.0][corner % 4], "toxicity_grade3": corner % 2}
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("cls", MODELS)
def test_each_rows_contribution_is_within_the_declared_bounds(cls, sites, catalogue):
    model = cls(catalogue)
    fitted = cls(catalogue).fit(pd.concat(sites, ignore_index=True))
    rows = pd.concat([pd.concat(sites).iloc[::37], _extreme_rows(catalogue)], ignore_index=True)
    for coef in (fitted.coef_, _some_coefficients(model, 2), _some_coefficients(model, 3) * 3):
        if not model.valid_coefficients(coef):
            continue
        bounds = model.sum_bounds(coef)
        empty = model.site_sums(rows.iloc[:0], coef)
        for i in range(len(rows)):
            one = model.site_sums(rows.iloc[[i]], coef)
            for key, bound in bounds.items():
                change = np.abs(np.asarray(one[key], dtype=float) - np.asarray(empty[key], dtype=float))
                scale = np.broadcast_to(np.asarray(bound.scale, dtype=float), change.shape)
                assert np.all(change <= scale * (1 + 1e-9) + 1e-12), (key, i, (change - scale).max())
                entries = change[np.triu_indices(change.shape[0])] if bound.symmetric else change.ravel()
                assert np.count_nonzero(entries > 1e-15) <= bound.touched, (key, i)


def test_threshold_score_bound_is_the_supremum_over_the_linear_predictor():
    eta = np.linspace(-40, 40, 20001)
    for gap in (0.05, 0.5, 2.0, 6.0):
        upper, lower = 0.0, -gap  # thresholds θ_j and θ_{j−1}
        a, b = eta - lower, eta - upper
        # F(a) − F(b) = F(−b) − F(−a): for large η difference the small upper tails, else the two 1s cancel
        mass = np.where(eta < 0, expit(a) - expit(b), expit(-b) - expit(-a))
        score = expit(b) * expit(-b) / mass
        assert np.all(np.isfinite(score)) and np.all(mass > 0)
        assert score.max() <= threshold_score_bound(gap) * (1 + 1e-9)
        assert score.max() >= threshold_score_bound(gap) * (1 - 1e-3)


def test_every_design_term_stays_within_its_bound_at_the_schema_extremes(catalogue):
    frame = _extreme_rows(catalogue)
    for term in (*PATIENT_TERMS.values(), *PROPERTY_TERMS):
        values = term.compute(frame)
        assert np.all(np.isfinite(values)), term.name
        assert np.abs(values).max() <= term.bound + 1e-12, term.name
    # doses are clipped to 5–150 mg/m² around 40: the largest |log| is at the low end, log(40 / 5)
    assert np.abs(log_dose(frame)).max() <= max(np.log(40 / 5), np.log(150 / 40)) + 1e-12


# ---------------------------------------------------------------------------------------------------------
# Against independent references


def test_toxicity_fit_equals_scikit_learns_penalised_logistic_regression(sites, catalogue):
    """Per-coefficient ridge ½Σλβ² is scikit-learn's ½‖w‖² on columns divided by √λ (lbfgs, no intercept)."""
    model = NeutropeniaModel(catalogue).fit(pd.concat(sites, ignore_index=True))
    rows, y = model.rows_and_target(pd.concat(sites, ignore_index=True))
    x = model.design_matrix(rows)
    precision, _ = model.penalty()
    reference = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-12, max_iter=10000)
    reference.fit(x / np.sqrt(precision), y)
    np.testing.assert_allclose(model.coef_, reference.coef_.ravel() / np.sqrt(precision), atol=2e-4)


def _ordinal_negloglik(model: TumourResponseModel, frame: pd.DataFrame, coef: np.ndarray) -> float:
    """The penalised negative log-likelihood written out directly (category probabilities as differences of
    cumulative ones), for comparison with the model's Newton fit."""
    layout = model._layout()
    rows = frame[frame["cycle"] == 1]
    rows = rows[rows["efficacy_pct"].notna()]
    x = np.column_stack([PATIENT_TERMS[name].compute(rows) for name in model.covariates])
    props = np.column_stack([t.compute(rows) for t in PROPERTY_TERMS])
    ids = model._ids()
    u = np.array([coef[layout["formulations"]][ids.index(f)] if f in ids else 0.0 for f in rows["formulation_id"]])
    s = log_dose(rows) + coef[layout["potency"]][0] + props @ coef[layout["properties"]] + u
    eta = x @ coef[layout["covariates"]] + coef[layout["emax_scale"]][0] * log_expit(s)
    cumulative = np.column_stack([np.ones(len(rows)), expit(eta[:, None] - coef[layout["thresholds"]][None, :]),
                                  np.zeros(len(rows))])  # P(Y ≥ cut_k), k = 0..K+1
    category = np.searchsorted(np.asarray(model.cuts_pct), rows["efficacy_pct"].to_numpy(), side="right")
    p = cumulative[np.arange(len(rows)), category] - cumulative[np.arange(len(rows)), category + 1]
    precision, mean = model.penalty()
    return float(-np.log(p).sum() + 0.5 * np.sum(precision * (coef - mean) ** 2))


def test_tumour_response_fit_is_the_optimum_of_an_independently_written_likelihood(sites, catalogue):
    frame = pd.concat(sites, ignore_index=True)
    model = TumourResponseModel(catalogue).fit(frame)
    thresholds = model._layout()["thresholds"]

    def ordered(free: np.ndarray) -> np.ndarray:
        """Unconstrained → coefficients: the thresholds are the first one plus cumulated exp(log gaps), so
        BFGS never steps to unordered thresholds (negative category probabilities)."""
        coef = free.copy()
        coef[thresholds] = free[thresholds.start] + np.concatenate([[0.0], np.cumsum(np.exp(free[thresholds][1:]))])
        return coef

    def unordered(coef: np.ndarray) -> np.ndarray:
        free = coef.copy()
        free[thresholds] = np.concatenate([[coef[thresholds.start]], np.log(np.diff(coef[thresholds]))])
        return free

    objective = lambda free: _ordinal_negloglik(model, frame, ordered(free))  # noqa: E731
    reference = minimize(objective, unordered(model.start()), method="BFGS", options={"gtol": 1e-7, "maxiter": 5000})
    assert np.isfinite(reference.fun)
    assert _ordinal_negloglik(model, frame, model.coef_) <= reference.fun + 1e-6
    np.testing.assert_allclose(model.coef_, ordered(reference.x), atol=5e-3)


def test_tumour_response_gradient_sum_is_the_derivative_of_its_loglik_sum(sites, catalogue):
    frame = pd.concat(sites, ignore_index=True)
    model = TumourResponseModel(catalogue)
    coef = _some_coefficients(model, 4)
    sums = model.site_sums(frame, coef)
    numeric = np.empty_like(coef)
    for j in range(coef.size):
        step = np.zeros_like(coef)
        step[j] = 1e-6
        numeric[j] = (model.site_sums(frame, coef + step)["loglik"]
                      - model.site_sums(frame, coef - step)["loglik"]) / 2e-6
    np.testing.assert_allclose(sums["gradient"], numeric, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cls", MODELS)
def test_prediction_standard_error_is_the_delta_method_with_the_inverse_information(cls, sites, catalogue):
    frame = pd.concat(sites, ignore_index=True)
    model = cls(catalogue).fit(frame)
    rows = frame.iloc[::50]
    logit, gradient = model.logit_and_gradient(rows, model.coef_)
    numeric = np.empty_like(gradient)
    for j in range(model.coef_.size):
        step = np.zeros_like(model.coef_)
        step[j] = 1e-6
        numeric[:, j] = (model.logit_and_gradient(rows, model.coef_ + step)[0]
                         - model.logit_and_gradient(rows, model.coef_ - step)[0]) / 2e-6
    np.testing.assert_allclose(gradient, numeric, atol=1e-6)
    predicted = model.predict(rows)
    np.testing.assert_allclose(predicted["logit"], logit)
    np.testing.assert_allclose(predicted["se"], np.sqrt(np.einsum("ij,jk,ik->i", numeric, model.covariance_, numeric)),
                               rtol=1e-5)
    bounds = model.predict_proba(rows, z=1.0)
    assert np.all(bounds.low <= bounds.mean) and np.all(bounds.mean <= bounds.high)


# ---------------------------------------------------------------------------------------------------------
# Recovering a known truth


def _synthetic_episodes(rng: np.random.Generator, n: int) -> pd.DataFrame:
    formulations = {"A": (90.0, 95.0, 1, 600.0), "B": (120.0, 85.0, 0, 12.0), "C": (60.0, 70.0, 1, 50.0)}
    ids = rng.choice(list(formulations), n)
    props = np.array([formulations[f] for f in ids])
    return pd.DataFrame({
        "cycle": 1, "age_years": rng.uniform(30, 85, n), "sex": rng.choice(["F", "M"], n),
        "ecog": rng.integers(0, 3, n), "tumour_type": rng.choice(TUMOUR_TYPES, n),
        "tumour_burden_mm": np.exp(rng.normal(np.log(60), 0.5, n)),
        "bilirubin_umol_l": np.exp(rng.normal(np.log(10), 0.5, n)),
        "anc_baseline_e9_l": np.exp(rng.normal(1.4, 0.3, n)),
        "interval_days": 28, "dose_mg_m2": 5.0 * rng.integers(2, 13, n), "formulation_id": ids,
        "particle_size_nm": props[:, 0], "zeta_mv": -5.0, "encapsulation_pct": props[:, 1], "pegylated": props[:, 2],
        "drug_loading_pct": 10.0, "release_tau_h": props[:, 3], "release_beta": 0.7,
    })


def test_toxicity_model_recovers_the_dose_slope_and_host_effects_it_was_simulated_from():
    rng = np.random.default_rng(11)
    frame = _synthetic_episodes(rng, 6000)
    catalogue = catalogue_of(frame)
    truth = NeutropeniaModel(catalogue)
    names = truth.parameter_names()
    coef = np.zeros(len(names))
    coef[names.index("intercept")] = -2.0
    coef[names.index("log_dose")] = 3.0
    coef[names.index("log_anc")] = -2.0
    coef[names.index("ecog")] = 0.5
    coef[names.index("formulation:B")] = 0.8
    p = expit(truth.design_matrix(frame) @ coef)
    frame["anc_nadir_e9_l"] = np.where(rng.random(len(frame)) < p, 0.5, 2.0)
    fitted = NeutropeniaModel(catalogue, formulation_precision=1e-4, property_precision=1e-4).fit(frame)
    se = np.sqrt(np.diag(fitted.covariance_))
    for name in ("log_dose", "log_anc", "ecog"):
        j = names.index(name)
        assert abs(fitted.coef_[j] - coef[j]) < 4 * se[j], name
    # formulation effects are identified only up to the property regression: compare their predictions
    probs = fitted.predict_proba(frame).mean
    assert np.abs(probs - p).mean() < 0.02


def test_tumour_response_recovers_an_emax_dose_response_it_was_simulated_from():
    rng = np.random.default_rng(12)
    frame = _synthetic_episodes(rng, 6000)
    model = TumourResponseModel(catalogue_of(frame), formulation_precision=1e-2, property_precision=1e-2)
    layout = model._layout()
    coef = model.start() * 0
    coef[layout["emax_scale"]] = 3.0
    coef[layout["potency"]] = 0.5
    coef[layout["covariates"]][model.covariates.index("tumour_kaposi")] = 1.5
    coef[layout["thresholds"]] = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0]
    eta, _ = model.eta_and_jacobian(frame, coef)
    latent = eta + rng.logistic(size=len(frame))  # P(latent ≥ θ_k) = expit(η − θ_k)
    category = np.searchsorted(coef[layout["thresholds"]], latent, side="right")
    frame["efficacy_pct"] = np.asarray([-50.0, -10.0, 10.0, 20.0, 40.0, 60.0, 80.0])[category]
    fitted = TumourResponseModel(catalogue_of(frame), formulation_precision=1e-2, property_precision=1e-2).fit(frame)
    se = np.sqrt(np.diag(fitted.covariance_))
    for block in ("emax_scale", "potency", "thresholds"):
        j = layout[block]
        assert np.all(np.abs(fitted.coef_[j] - coef[j]) < 4 * se[j]), block
    truth = expit(eta - coef[layout["thresholds"]][model.response_index()])
    assert np.abs(fitted.predict_proba(frame).mean - truth).mean() < 0.02


@pytest.mark.parametrize("cls", MODELS)
def test_a_fitted_model_round_trips_through_its_dict(cls, sites, catalogue):
    frame = pd.concat(sites, ignore_index=True)
    model = cls(catalogue).fit(frame)
    restored = (TumourResponseModel if cls is TumourResponseModel else ToxicityModel).from_dict(model.to_dict())
    assert type(restored) is cls
    np.testing.assert_array_equal(restored.predict(frame)["logit"], model.predict(frame)["logit"])
    np.testing.assert_array_equal(restored.predict(frame)["se"], model.predict(frame)["se"])


# ---------------------------------------------------------------------------------------------------------
# On the wire


@pytest.mark.parametrize("cls", MODELS)
def test_a_models_request_and_a_sites_sums_survive_the_records_unchanged(cls, sites, catalogue):
    from shared.protocol.dose_response import sums_from_request, sums_of, sums_reply, sums_request

    model = cls(catalogue)
    coef = _some_coefficients(model, 5)
    received, received_coef, split_seed = sums_from_request(sums_request(model, coef, 3))
    assert type(received) is cls and received.parameter_names() == model.parameter_names() and split_seed == 3
    assert received.penalty()[0].tolist() == model.penalty()[0].tolist()
    np.testing.assert_array_equal(received_coef, coef)
    sums = model.site_sums(sites[0], coef)
    back = sums_of(sums_reply(sums))
    assert set(back) == set(sums)
    for key in sums:
        np.testing.assert_array_equal(back[key], sums[key], err_msg=key)


def test_the_structured_policy_computes_the_absolute_dose_on_the_capped_bsa_and_says_so(sites, catalogue):
    import json
    from pathlib import Path

    from shared.patient_record import PatientRecord
    from shared.structured_policy import fit_structured_policy

    policy = fit_structured_policy(sites, catalogue)
    example = json.loads((Path(__file__).parents[1] / "examples" / "patient.json").read_text())
    example["catalogue"] = sorted(catalogue)
    large = {**example, "weight_kg": 150.0, "height_cm": 195.0, "bsa_m2": 2.85}  # Mosteller √(195·150/3600)
    usual, big = policy.recommend([PatientRecord.model_validate(example), PatientRecord.model_validate(large)])
    assert usual.action == big.action == "give"
    assert big.bsa_m2 == 2.0 and big.dose_mg == pytest.approx(round(big.dose_mg_m2 * 2.0, 1))
    assert [r.rule for r in big.rules].count("bsa-cap") == 1 and "bsa-cap" not in [r.rule for r in usual.rules]
