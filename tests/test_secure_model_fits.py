"""The model fits through the one secure-sum protocol: the dose adjuster's fitted-Q iteration
(``server.adjustment_phase``) and the structured dose–response Newton steps (``server.dose_response_phase``).

The federation runs in-process (``tests.handler_grid``): each request goes to the real site handlers
(``client.adjustment_handlers``, ``client.dose_response_handlers``, ``client.secure_aggregation``) with one Flower
Context per node. The masked fits are compared with the same fits asked in the clear (``secure-sum off``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context

from client import adjustment_handlers as ah
from client import dose_response_handlers as dh
from client.dp import SiteDP
from client.ledger import PrivacyLedger
from server import adjustment_phase as ap
from server import dose_response_phase as dp
from shared.dose_adjustment import DoseAdjuster, combine_scaling, fitted_q_iteration, scaling_sums
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.structured_policy import catalogue_of
from shared.sum_vector import VALUES, SumsLayout
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic
from tests.handler_grid import HandlerGrid

NODES = (21, 22, 23)
FQI = {"split-seed": 3, "fqi-gamma": 0.9, "fqi-iterations": 4}


@dataclass
class Site:
    """``shared.validation.SiteData`` as the handlers read it: episodes, vitals, task."""

    episodes: pd.DataFrame
    vitals: pd.DataFrame
    task: object = NANOPARTICLE_TASK


@dataclass
class Request:
    """``client.site.SiteRequest`` as the fit handlers use it."""

    site: Site
    config: ConfigRecord
    context: Context
    dp: SiteDP | None = None
    name: str = field(default="clinic")


class Grid(HandlerGrid):
    answers = {messages.FQI_SCALING.type: ah.answer_sums(messages.FQI_SCALING.action),
               messages.FQI_RIDGE.type: ah.answer_sums(messages.FQI_RIDGE.action),
               messages.DOSE_RESPONSE_SUMS.type: dh.model_sums,
               messages.DOSE_RESPONSE_SUPPORT.type: dh.support_counts}

    def __init__(self, sites: dict[int, Site], dp_sites: dict[int, SiteDP] | None = None) -> None:
        super().__init__(sites)
        self.sites, self.dp_sites = sites, dp_sites or {}

    def request(self, node, msg, context):
        return Request(self.sites[node], msg.content[r.CONFIG], context, self.dp_sites.get(node))


@pytest.fixture(autouse=True)
def as_server_app(task_identity):
    """Every test here runs server code: Flower's task identity set (conftest's ``task_identity``)."""


@pytest.fixture(scope="module")
def sites() -> dict[int, Site]:
    """Three simulated clinics (episodes and wearables)."""
    world = make_world(3, seed=5, patients_per_clinic=70)
    return {node: Site(*simulate_clinic(world, clinic)) for node, clinic in zip(NODES, world.clinics, strict=True)}


def clear_replies(grid: Grid, kinds: tuple[str, ...]) -> list:
    """The replies to ``kinds`` that carry anything but the one masked vector (and DP facts)."""
    return [c for kind, _, c in grid.replies if kind in kinds and c is not None
            and (set(c.keys()) - {r.ARRAYS, r.PRIVACY} or set(c[r.ARRAYS].keys()) != {VALUES})]


# -- fitted-Q iteration ----------------------------------------------------------------------------------


def fit(sites, mode, nodes=NODES, lost_at=None, dp_sites=None) -> tuple[DoseAdjuster, Grid]:
    grid = Grid({n: sites[n] for n in nodes}, dp_sites)
    grid.lost_at = lost_at or {}
    return ap.fit_adjuster(grid, list(nodes), FQI, secure_sum=mode), grid


def assert_same_q_function(fitted: DoseAdjuster, expected: DoseAdjuster) -> None:
    """Equal within the fixed-point rounding (3 sites × 2^-41 per summed entry), amplified by the ridge solves."""
    np.testing.assert_allclose(fitted.mean_, expected.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fitted.scale_, expected.scale_, rtol=1e-9)
    np.testing.assert_allclose(fitted.coef_, expected.coef_, rtol=1e-9, atol=1e-9 * np.max(np.abs(expected.coef_)))
    assert fitted.n_transitions_ == expected.n_transitions_


@pytest.mark.parametrize("mode", ["pairwise", "recovering"])
def test_masked_fitted_q_equals_the_plain_fit_and_no_site_sends_its_sums_in_the_clear(sites, mode):
    plain, plain_grid = fit(sites, "off")
    masked, grid = fit(sites, mode)
    assert plain.n_transitions_ > 100 and plain.secure_sum_ == {"mode": "off"}
    assert_same_q_function(masked, plain)
    assert masked.nodes_ == list(NODES) and masked.secure_sum_["mode"] == mode
    assert masked.secure_sum_["releases"] == 1 + FQI["fqi-iterations"] and masked.secure_sum_["lost"] == {}
    assert not clear_replies(grid, (messages.FQI_SCALING.type, messages.FQI_RIDGE.type))
    rounds = {"pairwise": 1, "recovering": 4}[mode]
    per_release = [messages.FQI_SCALING.type] + [messages.FQI_RIDGE.type] * FQI["fqi-iterations"]
    assert sum(grid.calls.count(m) for m in set(per_release)) == len(per_release)
    assert len(grid.calls) == (1 if mode == "pairwise" else 0) + rounds * len(per_release)
    assert plain_grid.calls == per_release  # off: unchanged, one plain exchange per release


def test_one_site_alone_fits_in_the_clear(sites):
    alone, grid = fit(sites, "recovering", nodes=(21,))
    assert alone.secure_sum_ == {"mode": "off"} and messages.SECURE_KEYS.type not in grid.calls


def test_a_dp_site_noises_before_masking_and_its_ledger_is_charged_as_in_the_clear(sites, tmp_path):
    def dp_site(folder):
        return {23: SiteDP(PrivacyLedger.open(tmp_path / folder / "ledger.json", epsilon_budget=3.0, delta=1e-5),
                           {"adjuster": 0.2})}

    plain_dp, masked_dp = dp_site("plain"), dp_site("masked")
    plain, _ = fit(sites, "off", dp_sites=plain_dp)
    masked, grid = fit(sites, "recovering", dp_sites=masked_dp)
    releases = 1 + FQI["fqi-iterations"]
    plain_ledger, masked_ledger = plain_dp[23].ledger, masked_dp[23].ledger
    assert masked_ledger.history == plain_ledger.history  # (σ, sampling rate, releases at that σ)
    assert sum(steps for _, _, steps in masked_ledger.history) == releases
    assert masked_ledger.spent() == pytest.approx(plain_ledger.spent(), rel=1e-12) and masked_ledger.spent() > 0
    # the DP facts reach the server, one per release, as without the secure sum
    assert [n for n, _ in masked.releases_] == [23] * releases and set(masked.privacy_) == {23}
    assert masked.privacy_[23]["epsilon-spent"] == pytest.approx(masked_ledger.spent())
    assert not clear_replies(grid, (messages.FQI_SCALING.type, messages.FQI_RIDGE.type))
    # the noise is in the sum: the masked fit is not the exact one
    exact, _ = fit(sites, "recovering")
    assert np.max(np.abs(masked.coef_ - exact.coef_)) > 1e-3


def test_recovering_a_dp_site_lost_mid_fit_is_charged_for_its_releases_until_then_only(sites, tmp_path):
    dp_sites = {23: SiteDP(PrivacyLedger.open(tmp_path / "ledger.json", epsilon_budget=3.0, delta=1e-5),
                           {"adjuster": 0.2})}
    fitted, _ = fit(sites, "recovering", lost_at={23: (messages.FQI_RIDGE.type, 2, False)}, dp_sites=dp_sites)
    ledger = dp_sites[23].ledger
    assert sum(steps for _, _, steps in ledger.history) == 2  # the scaling and the first iteration, nothing after
    assert [n for n, _ in fitted.releases_] == [23, 23] and fitted.privacy_ == {}  # not in the final sums
    assert fitted.nodes_ == [21, 22] and fitted.secure_sum_["lost-at-iteration"] == {"23": 1}


def plain_trajectory(sites, before: tuple[int, ...], after: tuple[int, ...], lost_at_iteration: int) -> DoseAdjuster:
    """Fitted-Q iteration computed here: the scaling of ``before``, iterations before ``lost_at_iteration`` over
    ``before``'s transitions and the rest over ``after``'s."""
    transitions = {n: ah.training_transitions(sites[n], FQI["split-seed"]) for n in NODES}
    adjuster = ap.adjuster_from_config(FQI)

    def ridge(current):
        nodes = before if len(current.history_) < lost_at_iteration else after
        return [current.ridge_sums(transitions[n]) for n in nodes]

    return fitted_q_iteration(adjuster, lambda: [combine_scaling([scaling_sums(transitions[n]) for n in before])],
                              ridge)


def test_recovering_a_site_lost_mid_fit_continues_with_consistent_sums_over_the_survivors(sites):
    # 23 is lost before answering the second ridge request (iteration 1)
    fitted, _ = fit(sites, "recovering", lost_at={23: (messages.FQI_RIDGE.type, 2, False)})
    assert_same_q_function(fitted, plain_trajectory(sites, NODES, (21, 22), lost_at_iteration=1))
    assert fitted.nodes_ == [21, 22] and fitted.secure_sum_["lost-at-iteration"] == {"23": 1}
    assert fitted.secure_sum_["lost"] == {"23": "no reply"}
    # not the fit over all three, nor the fit over the two survivors from the start
    all_three, _ = fit(sites, "off")
    survivors, _ = fit(sites, "off", nodes=(21, 22))
    assert np.max(np.abs(fitted.coef_ - all_three.coef_)) > 1e-6
    assert np.max(np.abs(fitted.coef_ - survivors.coef_)) > 1e-6


def test_recovering_a_site_lost_after_sending_its_masked_sums_is_in_that_iteration_and_not_after(sites):
    # 23 answers the second ridge request masked, then is lost in its unmask round (the 3rd: scaling, ridge 0, 1)
    fitted, _ = fit(sites, "recovering", lost_at={23: (messages.SECURE_UNMASK.type, 3, False)})
    assert_same_q_function(fitted, plain_trajectory(sites, NODES, (21, 22), lost_at_iteration=2))
    assert fitted.secure_sum_["lost-at-iteration"] == {"23": 2}


def test_pairwise_a_site_lost_mid_fit_stops_the_fit_as_without_the_secure_sum(sites):
    with pytest.raises(ap.AdjustmentFailed, match=r"node 23: no reply.*pairwise masks.*recovering survives it"):
        fit(sites, "pairwise", lost_at={23: (messages.FQI_RIDGE.type, 2, False)})
    with pytest.raises(ap.AdjustmentFailed, match=r"failed during fitted-Q iteration"):
        fit(sites, "off", lost_at={23: (messages.FQI_RIDGE.type, 2, False)})


def test_pairwise_a_site_failing_the_scaling_is_left_out_as_in_the_clear(sites):
    fitted, grid = fit(sites, "pairwise", lost_at={21: (messages.FQI_SCALING.type, 1, False)})
    plain, _ = fit(sites, "off", nodes=(22, 23))
    assert_same_q_function(fitted, plain)
    assert fitted.nodes_ == [22, 23] and fitted.secure_sum_["lost"] == {"21": "no reply"}
    assert grid.calls.count(messages.SECURE_KEYS.type) == 2  # keys exchanged anew without it


def test_a_release_whose_sums_do_not_fit_the_layout_is_refused_naming_the_array(sites):
    layout = SumsLayout.of({"gram": (3, 3), "moment": (3,), "n": (1,)}, symmetric=("gram",))
    with pytest.raises(ValueError, match=r"moment: expected shape \(3,\), got \(4,\)"):
        layout.vector({"gram": np.eye(3), "moment": np.zeros(4), "n": np.ones(1)})
    request = Request(sites[21], ConfigRecord({"secure-sum": False, "secure-scale-bits": 40}), None)
    with pytest.raises(ShareableError, match="the sums have no 'n'"):
        ah.masked_sums({"gram": np.eye(3), "moment": np.zeros(3)}, layout, request)
    # a symmetric matrix goes as its upper triangle and comes back whole
    gram = np.array([[2.0, 1.0, 0.5], [1.0, 3.0, -1.0], [0.5, -1.0, 4.0]])
    vector = layout.vector({"gram": gram, "moment": [1.0, 2.0, 3.0], "n": 7.0})
    assert vector.size == 6 + 3 + 1 == layout.size
    back = layout.sums(vector)
    np.testing.assert_array_equal(back["gram"], gram)
    np.testing.assert_array_equal(back["n"], [7.0])
    with pytest.raises(ValueError, match="a vector of 9 sums for a layout of 10"):
        layout.sums(vector[:-1])


# -- structured dose–response ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clinics() -> dict[int, Site]:
    world = make_world(3, seed=7, patients_per_clinic=120)
    return {node: Site(*simulate_clinic(world, clinic)) for node, clinic in zip(NODES, world.clinics, strict=True)}


def structured(clinics, mode, nodes=NODES, lost_at=None):
    grid = Grid({n: clinics[n] for n in nodes})
    grid.lost_at = lost_at or {}
    catalogue = catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True))
    policy, info = dp.fit_structured_policy_federated(grid, list(nodes), catalogue, 0, secure_sum=mode)
    return policy, info, grid


def assert_same_models(policy, expected) -> None:
    for key in ("response", "neutropenia", "other_toxicity"):
        got, want = getattr(policy, key), getattr(expected, key)
        np.testing.assert_allclose(got.coef_, want.coef_, rtol=1e-9, atol=1e-9, err_msg=key)
        np.testing.assert_allclose(got.covariance_, want.covariance_, rtol=1e-7, atol=1e-12, err_msg=key)
        assert got.n_ == want.n_ and got.loglik_ == pytest.approx(want.loglik_, rel=1e-12), key
    np.testing.assert_array_equal(policy.support.counts, expected.support.counts)
    assert policy.support.formulations == expected.support.formulations


@pytest.mark.parametrize("mode", ["pairwise", "recovering"])
def test_masked_dose_response_fit_equals_the_plain_fit(clinics, mode):
    plain, plain_info, _ = structured(clinics, "off")
    masked, info, grid = structured(clinics, mode)
    assert_same_models(masked, plain)
    assert info["nodes"] == list(NODES) and info["iterations"] == plain_info["iterations"]
    assert info["secure_sum"]["mode"] == mode and info["secure_sum"]["restarts"] == 0
    assert plain.support.counts.sum() > 100
    assert not clear_replies(grid, (messages.DOSE_RESPONSE_SUMS.type, messages.DOSE_RESPONSE_SUPPORT.type))
    evaluations = grid.calls.count(messages.DOSE_RESPONSE_SUMS.type)
    assert evaluations == sum(c == messages.DOSE_RESPONSE_SUMS.type for c in structured(clinics, "off")[2].calls)


def test_recovering_a_site_lost_mid_newton_starts_the_model_again_over_the_survivors(clinics):
    # 23 is lost before answering the 3rd evaluation of the first model (tumour response)
    lost, info, _ = structured(clinics, "recovering", lost_at={23: (messages.DOSE_RESPONSE_SUMS.type, 3, False)})
    survivors, _, _ = structured(clinics, "off", nodes=(21, 22))
    assert_same_models(lost, survivors)
    assert info["nodes"] == [21, 22] and info["secure_sum"]["restarts"] == 1
    assert info["secure_sum"]["lost"] == {"23": "no reply"}


def test_pairwise_a_site_lost_mid_newton_stops_the_fit(clinics):
    with pytest.raises(dp.DoseResponseFailed, match=r"node 22: no reply.*recovering survives it"):
        structured(clinics, "pairwise", lost_at={22: (messages.DOSE_RESPONSE_SUMS.type, 3, False)})


def test_pairwise_a_site_failing_a_models_first_evaluation_is_left_out_as_in_the_clear(clinics):
    left_out, info, grid = structured(clinics, "pairwise", lost_at={23: (messages.DOSE_RESPONSE_SUMS.type, 1, False)})
    survivors, _, _ = structured(clinics, "off", nodes=(21, 22))
    assert_same_models(left_out, survivors)
    assert info["nodes"] == [21, 22] and info["secure_sum"]["lost"] == {"23": "no reply"}
    assert grid.calls.count(messages.SECURE_KEYS.type) == 2  # keys exchanged anew without it


# -- a pairwise key exchange that leaves one site: nothing is summed ---------------------------------------

KEYS_LOST = {22: (messages.SECURE_KEYS.type, 1, False), 23: (messages.SECURE_KEYS.type, 1, False)}
"""22 and 23 fail the pairwise key exchange: 21 alone is left, whose "sum" would be its own values."""


@pytest.fixture
def lax_sites(monkeypatch):
    """Sites whose client masks even with no peer (an old or modified client: ``shared.secure_sum.mask`` refuses
    a one-site exchange at an honest site): the server alone must keep a lone site's values from being asked."""
    from shared import secure_sum
    monkeypatch.setattr(secure_sum, "MIN_SITES", 1)


def sent_values(grid: Grid, kinds: tuple[str, ...]) -> list:
    """Every site's reply to ``kinds`` that carries values (masked or not)."""
    return [(node, c) for kind, node, c in grid.replies if kind in kinds and c is not None]


def test_fitted_q_whose_key_exchange_leaves_one_site_asks_no_sum_and_says_why(sites, lax_sites):
    grid = Grid(sites)
    grid.lost_at = dict(KEYS_LOST)
    with pytest.raises(ap.AdjustmentFailed, match=r"fitted-Q: 1 site\(s\) left after the pairwise key exchange "
                                                  r"\(lost: node 22: no reply; node 23: no reply\), fewer than 2"):
        ap.fit_adjuster(grid, list(NODES), FQI, secure_sum="pairwise")
    assert grid.calls == [messages.SECURE_KEYS.type]  # no release asked of the lone site
    assert not sent_values(grid, (messages.FQI_SCALING.type, messages.FQI_RIDGE.type))


def test_policy_phase_ships_no_adjuster_when_its_key_exchange_leaves_one_site_and_records_why(sites):
    from types import SimpleNamespace

    from server.policy_phase import fit_adjuster_if_asked
    from server.site_check import SiteCheck

    grid = Grid(sites)
    grid.lost_at = dict(KEYS_LOST)
    check = SiteCheck(usable={n: f"site-{n}" for n in NODES})
    settings = SimpleNamespace(fqi_iterations=2, split_seed=3, secure_sum="pairwise")
    adjuster, entry = fit_adjuster_if_asked(grid, check, None, settings)
    assert adjuster is None and entry["fitted"] is False
    assert "fitted-Q: 1 site(s) left after the pairwise key exchange" in entry["reason"]
    assert "node 22: no reply; node 23: no reply" in entry["reason"]
    assert not sent_values(grid, (messages.FQI_SCALING.type, messages.FQI_RIDGE.type))


def test_dose_response_whose_key_exchange_leaves_one_site_asks_no_sum_and_says_why(clinics, lax_sites):
    with pytest.raises(dp.DoseResponseFailed, match=r"dose-response: 1 site\(s\) left after the pairwise key "
                                                    r"exchange \(lost: node 22: no reply; node 23: no reply\)"):
        structured(clinics, "pairwise", lost_at=dict(KEYS_LOST))
    grid = Grid(clinics)
    grid.lost_at = dict(KEYS_LOST)
    catalogue = catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True))
    with pytest.raises(dp.DoseResponseFailed, match="nothing is summed"):
        dp.fit_structured_policy_federated(grid, list(NODES), catalogue, 0, secure_sum="pairwise")
    assert grid.calls == [messages.SECURE_KEYS.type]
    assert not sent_values(grid, (messages.DOSE_RESPONSE_SUMS.type, messages.DOSE_RESPONSE_SUPPORT.type))


def test_dose_response_left_out_sites_leaving_one_under_new_keys_stop_the_fit_before_asking_it(clinics):
    # 23 fails the key exchange, 22 the first evaluation: 21 alone would be asked under new keys
    lost_at = {23: (messages.SECURE_KEYS.type, 1, False), 22: (messages.DOSE_RESPONSE_SUMS.type, 1, False)}
    grid = Grid(clinics)
    grid.lost_at = lost_at
    catalogue = catalogue_of(pd.concat([c.episodes for c in clinics.values()], ignore_index=True))
    with pytest.raises(dp.DoseResponseFailed, match=r"dose-response: 1 site\(s\) left to ask \(lost: node 23: no "
                                                    r"reply; node 22: no reply\)"):
        dp.fit_structured_policy_federated(grid, list(NODES), catalogue, 0, secure_sum="pairwise")
    assert grid.calls.count(messages.SECURE_KEYS.type) == 1  # no key exchange with the lone site
