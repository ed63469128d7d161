"""The feasibility checks of the model fits' sums (``shared.fit_bounds``): honest fits pass, with DP sites too; a
site inflating its sums is dropped in the clear and refuses the fit under masks.

The federation runs in-process over the real site handlers (``tests.test_secure_model_fits``' grid): the
structured dose–response Newton steps (``server.dose_response_phase``) and the dose adjuster's fitted-Q iteration
(``server.adjustment_phase``), each site's declared row count its episode table's (the site check's).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from client.dp import SiteDP
from client.ledger import PrivacyLedger
from server import adjustment_phase as ap
from server import dose_response_phase as dp
from shared.dose_adjustment import DoseAdjuster, centred_scaling_sums, scaling_sums
from shared.fit_bounds import (
    check_dose_response,
    check_ridge,
    check_scaling,
    dose_response_bounds,
    feature_bounds,
    ridge_bounds,
)
from shared.structured_policy import catalogue_of
from shared.sum_bounds import Contributors, InfeasibleSum
from shared.toxicity_model import NeutropeniaModel
from simulation.attacks import Attack, inflated_fit
from simulation.clinics import make_world, simulate_clinic
from tests.test_secure_model_fits import FQI, NODES, Grid, Site

FACTORS = (1.02, 1.1, 2.0, 10.0)
ATTACKER = 23


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Server code runs here: Flower's task identity set (conftest's ``task_identity``)."""


@pytest.fixture(scope="module")
def clinics() -> dict[int, Site]:
    world = make_world(3, seed=7, patients_per_clinic=120)
    return {node: Site(*simulate_clinic(world, clinic)) for node, clinic in zip(NODES, world.clinics, strict=True)}


class AttackedGrid(Grid):
    """The in-process grid with ``attackers`` answering every model-fit request through :func:`inflated_fit`."""

    def __init__(self, sites, dp_sites=None, attackers=(), factor=1.0):
        super().__init__(sites, dp_sites)
        self.attackers, self.factor = set(attackers), factor

    def answer(self, msg, node, kind):
        if node in self.attackers and kind not in self.rounds:
            with inflated_fit(self.factor):
                return super().answer(msg, node, kind)
        return super().answer(msg, node, kind)


def declared(sites) -> dict[int, float]:
    return {n: float(len(site.episodes)) for n, site in sites.items()}


def structured(clinics, mode, attackers=(), factor=1.0):
    grid = AttackedGrid(clinics, attackers=attackers, factor=factor)
    catalogue = catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True))
    return dp.fit_structured_policy_federated(grid, list(NODES), catalogue, 0, secure_sum=mode,
                                              declared=declared(clinics))


def fitted_q(clinics, mode, attackers=(), factor=1.0, dp_sites=None):
    grid = AttackedGrid(clinics, dp_sites, attackers, factor)
    count = {n: (None if n in (dp_sites or {}) else d) for n, d in declared(clinics).items()}
    return ap.fit_adjuster(grid, list(NODES), FQI, secure_sum=mode, declared=count)


def dp_sites(tmp_path, nodes=(ATTACKER,), share=0.2) -> dict[int, SiteDP]:
    return {n: SiteDP(PrivacyLedger.open(tmp_path / str(n) / "ledger.json", epsilon_budget=3.0, delta=1e-5),
                      {"adjuster": share}) for n in nodes}


# -- honest fits pass ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["off", "pairwise"])
def test_honest_dose_response_fits_pass_every_check(clinics, mode):
    policy, info = structured(clinics, mode)
    assert info["infeasible"] == {} and info["nodes"] == list(NODES)
    assert policy.neutropenia.n_ > 100
    if mode != "off":
        assert info["secure_sum"]["infeasible"] == {}


@pytest.mark.parametrize("mode", ["off", "recovering"])
def test_honest_fitted_q_passes_every_check_with_and_without_dp_sites(clinics, mode, tmp_path):
    exact = fitted_q(clinics, mode)
    assert exact.infeasible_ == {} and exact.nodes_ == list(NODES)
    for draw in range(3):  # two of three sites under DP, fresh ledgers (and noise) each draw
        noised = fitted_q(clinics, mode, dp_sites=dp_sites(tmp_path / str(draw), nodes=(22, 23)))
        assert noised.infeasible_ == {} and noised.nodes_ == list(NODES) and set(noised.privacy_) == {22, 23}


# -- one site inflating its sums ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", FACTORS)
def test_an_inflating_site_is_dropped_from_the_dose_response_fit_in_the_clear(clinics, factor):
    policy, info = structured(clinics, "off", attackers=(ATTACKER,), factor=factor)
    assert set(info["infeasible"]) == {ATTACKER} and info["nodes"] == [21, 22]
    assert re.match(r"dropped: dose-response: \w+Model: the summed [\w -]+ is infeasible: it must satisfy",
                    info["infeasible"][ATTACKER])
    honest_two, _ = dp.fit_structured_policy_federated(
        Grid({n: clinics[n] for n in (21, 22)}), [21, 22],
        catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True)), 0, secure_sum="off")
    for key in ("response", "neutropenia", "other_toxicity"):  # every model without it, those before its drop too
        np.testing.assert_allclose(getattr(policy, key).coef_, getattr(honest_two, key).coef_, rtol=1e-9,
                                   atol=1e-12, err_msg=key)


@pytest.mark.parametrize("factor", FACTORS)
def test_an_inflating_site_refuses_the_masked_dose_response_fit_naming_model_entry_and_bound(clinics, factor):
    # ×10 passes the response model's first evaluations (its per-row bounds are loose there), whose Newton steps
    # then leave every site's sums beyond the fixed-point range: the fit stops at the secure sum's overflow guard
    refused = (r"refused: dose-response: \w+Model: the summed [\w -]+ is infeasible: it must satisfy" if factor < 10
               else r"refused: dose-response|the secure sum would overflow")
    with pytest.raises(dp.DoseResponseFailed, match=refused):
        structured(clinics, "pairwise", attackers=(ATTACKER,), factor=factor)


@pytest.mark.parametrize("factor", FACTORS)
def test_an_inflating_site_is_dropped_from_fitted_q_in_the_clear(clinics, factor):
    fitted = fitted_q(clinics, "off", attackers=(ATTACKER,), factor=factor)
    assert set(fitted.infeasible_) == {str(ATTACKER)} and fitted.nodes_ == [21, 22]
    assert "fitted-Q: fqi_" in fitted.infeasible_[str(ATTACKER)]


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("mode", ["pairwise", "recovering"])
def test_an_inflating_site_refuses_the_masked_fitted_q(clinics, factor, mode):
    with pytest.raises(ap.AdjustmentFailed, match=r"refused: fitted-Q: fqi_\w+: the summed .* is infeasible"):
        fitted_q(clinics, mode, attackers=(ATTACKER,), factor=factor)


def test_a_dp_site_inflating_tenfold_refuses_the_masked_fitted_q(clinics, tmp_path):
    with pytest.raises(ap.AdjustmentFailed, match="refused"):
        fitted_q(clinics, "recovering", attackers=(ATTACKER,), factor=10.0, dp_sites=dp_sites(tmp_path))


def test_the_attack_kind_parses():
    assert Attack.parse("clinic_03:inflate-fit") == Attack("clinic_03", "inflate-fit", 2.0)
    assert Attack.parse("clinic_03:inflate-fit=1.05").factor == 1.05


# -- the bounds themselves ----------------------------------------------------------------------------------


def test_the_toxicity_information_sits_at_its_cap_at_the_start_so_any_scaling_breaks_it(clinics):
    catalogue = catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True))
    model = NeutropeniaModel(catalogue)
    sums = model.site_sums(clinics[21].episodes, model.start())
    assert sums["hessian"][0, 0] == pytest.approx(sums["n"] / 4, rel=1e-15)  # p(1 − p) = 1/4 at θ = 0
    who = Contributors(1, float(len(clinics[21].episodes)))
    check_dose_response("dose-response", model, model.start(), sums, who)
    for bound in dose_response_bounds(model, model.start(), sums, who):
        assert bound.text and "n" in bound.text or "PSD" in bound.text
    inflated = {**sums, "hessian": sums["hessian"] * 1.001}
    with pytest.raises(InfeasibleSum, match="information") as caught:
        check_dose_response("dose-response", model, model.start(), inflated, who)
    assert str(round(float(inflated["hessian"][0, 0]), 3)) not in str(caught.value)  # never a value
    with pytest.raises(InfeasibleSum, match="row count n"):  # more rows than declared
        check_dose_response("dose-response", model, model.start(), sums, Contributors(1, sums["n"] - 1))


def test_fitted_q_ridge_bounds_hold_honest_sums_and_catch_an_intercept_off_by_one_row(clinics):
    from client.adjustment_handlers import training_transitions

    transitions = training_transitions(clinics[21], 3)
    adjuster = DoseAdjuster(gamma=0.9).set_scaling(scaling_sums(transitions))
    adjuster.coef_ = np.random.default_rng(0).normal(0, 0.1, adjuster.n_features_)
    sums = adjuster.ridge_sums(transitions)
    who = Contributors(1, float(len(clinics[21].episodes)))
    phi = adjuster.features(transitions.state, transitions.dose)
    assert np.all(np.abs(phi) <= feature_bounds(adjuster) * (1 + 1e-12))  # Φ bounds every honest row
    check_ridge("fitted-Q", adjuster, sums, who)
    check_scaling("fitted-Q", centred_scaling_sums(scaling_sums(transitions)), who)
    assert any("Cauchy" in b.text for b in ridge_bounds(adjuster, sums, who))
    with pytest.raises(InfeasibleSum, match=re.escape("A_00 = n")):
        check_ridge("fitted-Q", adjuster, {**sums, "n": sums["n"] + 1}, who)
    not_psd = sums["gram"].copy()
    not_psd[1, 2] = not_psd[2, 1] = 1.01 * np.sqrt(not_psd[1, 1] * not_psd[2, 2])
    with pytest.raises(InfeasibleSum, match="PSD"):
        check_ridge("fitted-Q", adjuster, {**sums, "gram": not_psd}, who)


class RidgeOnlyGrid(AttackedGrid):
    """The attacker answers the scaling honestly and inflates only its ridge sums ``A`` and ``b``."""

    def answer(self, msg, node, kind):
        from unittest import mock

        from simulation.attacks import _inflating

        if node in self.attackers and kind not in self.rounds:
            with mock.patch.object(DoseAdjuster, "ridge_sums", _inflating(DoseAdjuster.ridge_sums, self.factor)):
                return Grid.answer(self, msg, node, kind)
        return Grid.answer(self, msg, node, kind)


@pytest.mark.parametrize("mode", ["off", "recovering"])
def test_inflating_only_the_ridge_sums_breaks_a00_equals_n(clinics, mode):
    grid = RidgeOnlyGrid(clinics, None, (ATTACKER,), 1.02)
    if mode == "off":
        fitted = ap.fit_adjuster(grid, list(NODES), FQI, secure_sum=mode, declared=declared(clinics))
        assert "fqi_ridge: the summed intercept entry A_00 is infeasible: it must satisfy A_00 = n" in \
            fitted.infeasible_[str(ATTACKER)]
        assert fitted.nodes_ == [21, 22]
    else:
        with pytest.raises(ap.AdjustmentFailed, match="fqi_ridge: the summed intercept entry A_00 is infeasible"):
            ap.fit_adjuster(grid, list(NODES), FQI, secure_sum=mode, declared=declared(clinics))


class SupportGrid(AttackedGrid):
    """The attacker claims ``factor`` times its support counts (``client.dose_response_handlers``)."""

    def answer(self, msg, node, kind):
        from unittest import mock

        from client import dose_response_handlers as dh

        if node in self.attackers and kind not in self.rounds:
            honest = dh.site_support_counts
            with mock.patch.object(dh, "site_support_counts", lambda *a: honest(*a) * self.factor):
                return Grid.answer(self, msg, node, kind)
        return Grid.answer(self, msg, node, kind)


def test_support_counts_beyond_the_declared_rows_drop_the_site_in_the_clear_and_refuse_the_masked_fit(clinics):
    catalogue = catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True))
    grid = SupportGrid(clinics, attackers=(ATTACKER,), factor=1000.0)
    policy, info = dp.fit_structured_policy_federated(grid, list(NODES), catalogue, 0, secure_sum="off",
                                                      declared=declared(clinics))
    assert set(info["infeasible"]) == {ATTACKER} and info["nodes"] == [21, 22]
    assert "dose-response: support: the summed support counts is infeasible" in info["infeasible"][ATTACKER]
    honest, _ = dp.fit_structured_policy_federated(Grid({n: clinics[n] for n in (21, 22)}), [21, 22], catalogue, 0,
                                                   secure_sum="off")
    np.testing.assert_array_equal(policy.support.counts, honest.support.counts)  # without the dropped site
    np.testing.assert_allclose(policy.neutropenia.coef_, honest.neutropenia.coef_, rtol=1e-9, atol=1e-12)
    with pytest.raises(dp.DoseResponseFailed, match="refused: dose-response: support: the summed support counts"):
        dp.fit_structured_policy_federated(SupportGrid(clinics, attackers=(ATTACKER,), factor=1000.0), list(NODES),
                                           catalogue, 0, secure_sum="pairwise", declared=declared(clinics))
