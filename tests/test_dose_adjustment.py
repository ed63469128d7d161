"""Dose adjustment across cycles: record frames from site files, fitted-Q iteration, federated == pooled."""

import json

import numpy as np
import pandas as pd
import pytest

from shared.dose_adjustment import (
    DOSE_GRID_MG_M2,
    MISSABLE,
    STATE_COLUMNS,
    W_CHF,
    W_TOXICITY,
    DoseAdjuster,
    Transitions,
    cycle_frames,
    fitted_q_iteration,
    scaling_sums,
    site_transitions,
    summarise_cycles,
)
from shared.patient_record import PatientRecord, records_frame
from shared.wearables import summarise_cycle
from simulation import oracle
from simulation.clinics import make_world, simulate_clinic
from simulation.example_patient import example_record


@pytest.fixture(scope="module")
def clinics():
    world = make_world(3, seed=5, patients_per_clinic=150)
    return [simulate_clinic(world, clinic) for clinic in world.clinics]


def test_reward_weights_are_the_oracles_utility_weights():
    assert (W_TOXICITY, W_CHF) == (oracle.W_TOXICITY, oracle.W_CHF)


def test_vectorised_wearable_summary_equals_summarise_cycle_for_every_episode(clinics):
    episodes, vitals = clinics[0]
    fast = summarise_cycles(vitals)
    for episode_id in episodes["episode_id"]:
        expected = summarise_cycle(vitals[vitals["episode_id"] == episode_id])
        if expected["days_recorded"] == 0:
            assert episode_id not in fast.index
            continue
        got = fast.loc[episode_id]
        for name, value in expected.items():
            if value is None:
                assert np.isnan(got[name]), (episode_id, name)
            else:
                assert got[name] == value, (episode_id, name, got[name], value)


def test_cycle_frame_of_a_logged_episode_is_the_record_frame_of_the_example_patient():
    """The example patient (examples/patient.json's recipe) at cycle 3, built as a PatientRecord and flattened by
    records_frame, is the row cycle_frames makes from the same site files."""
    world = make_world(3, seed=3)
    clinic = max(world.clinics, key=lambda c: c.n_patients)
    episodes, vitals = simulate_clinic(world, clinic)
    record = example_record()
    expected = records_frame([PatientRecord.model_validate(record)]).iloc[0]
    complete = episodes.dropna()
    counts = complete.groupby("patient_id")["cycle"].max()
    patient = counts[counts >= 3].index[0]
    frames = cycle_frames(episodes, vitals)
    row = frames[(episodes["patient_id"] == patient).to_numpy() & (episodes["cycle"] == 3).to_numpy()].iloc[0]
    for name, value in expected.items():
        if name == "patient_id":
            continue
        if isinstance(value, float) and np.isnan(value):
            assert np.isnan(row[name]), name
        elif isinstance(value, float):
            assert row[name] == pytest.approx(value, abs=1e-12), name
        else:
            assert row[name] == value, name


def test_transitions_link_each_cycle_to_the_next_and_end_where_the_patient_stopped(clinics):
    episodes, vitals = clinics[1]
    t = site_transitions(episodes, vitals)
    recorded = episodes["response"].notna().to_numpy() & (episodes["cycle"] >= 2).to_numpy()
    assert len(t) == recorded.sum()
    assert (t.state["cycle"] >= 2).all()
    last_cycle = episodes.groupby("patient_id")["cycle"].max()
    is_last = t.state["cycle"].to_numpy() == last_cycle.reindex(t.state["patient_id"]).to_numpy()
    np.testing.assert_array_equal(t.terminal, is_last)
    go_on = ~t.terminal
    np.testing.assert_array_equal(t.next_state["cycle"][go_on], t.state["cycle"][go_on] + 1)
    np.testing.assert_array_equal(t.next_state["patient_id"][go_on], t.state["patient_id"][go_on])
    np.testing.assert_array_equal(t.next_state["previous_dose_mg_m2"][go_on], t.dose[go_on])
    first = episodes[recorded].iloc[0]
    assert t.reward[0] == first["response"] - 0.5 * first["toxicity_grade3"] - 3.0 * first["chf"]
    assert set(np.unique(t.reward)) <= {1.0, 0.5, 0.0, -0.5, -2.0, -2.5, -3.0, -3.5}


def _frame(cycle, toxicity, n=None) -> pd.DataFrame:
    """Record-frame rows that differ only in cycle and previous toxicity (everything else constant)."""
    cycle, toxicity = np.broadcast_arrays(np.asarray(cycle, dtype=float), np.asarray(toxicity, dtype=float))
    size = len(cycle)
    frame = pd.DataFrame({name: np.full(size, 1.0) for name in STATE_COLUMNS[:19]})
    frame["cycle"] = cycle
    frame["previous_toxicity_grade3"] = toxicity
    frame["previous_dose_mg_m2"] = 40.0
    frame["sex"] = "F"
    frame["tumour_type"] = "ovarian"
    return frame


def _synthetic_mdp(c: float = 7.0) -> Transitions:
    """Two cycles (2 then 3, then the end). Reward −((d − m)/10)² + c·(1 − toxicity before the cycle), with
    m = 50 − 20·toxicity; the next cycle's toxicity happens with probability (d − 10)/70, realised in exact
    proportion (70 copies of each state-dose pair, d − 10 of them toxic). So Q₃ = r and
    Q₂ = r + γ c (1 − (d − 10)/70): the best dose is m at cycle 3 and m − 50γc/70 at cycle 2."""
    states, doses, nexts, terminal = [], [], [], []
    for tox in (0, 1):
        for d in DOSE_GRID_MG_M2:
            for copy in range(70):
                states.append((2, tox))
                doses.append(d)
                nexts.append((3, int(copy < d - 10)))
                terminal.append(False)
            for _ in range(10):
                states.append((3, tox))
                doses.append(d)
                nexts.append((3, tox))
                terminal.append(True)
    s, s1 = np.array(states), np.array(nexts)
    dose = np.array(doses)
    m = 50.0 - 20.0 * s[:, 1]
    reward = -(((dose - m) / 10.0) ** 2) + c * (1 - s[:, 1])
    return Transitions(state=_frame(s[:, 0], s[:, 1]), dose=dose, reward=reward,
                       next_state=_frame(s1[:, 0], s1[:, 1]), terminal=np.array(terminal))


def test_fitted_q_finds_the_known_optimum_of_a_synthetic_two_cycle_problem():
    adjuster = DoseAdjuster(alpha=1e-8, gamma=1.0, iterations=4, max_change=10.0).fit(_synthetic_mdp())
    probe = _frame([2, 2, 3, 3], [0, 1, 0, 1])
    np.testing.assert_array_equal(adjuster.best_dose(probe, DOSE_GRID_MG_M2, 80.0), [45.0, 25.0, 50.0, 30.0])
    # Q is exact: Q₂(tox 0, d 45) = −0.25 + 7 + 7·(1 − 35/70) = 10.25
    assert adjuster.q_values(probe.iloc[[0]], [45.0])[0, 0] == pytest.approx(10.25, abs=1e-6)
    assert adjuster.history_[-1] < 1e-8  # a two-cycle horizon converges in two iterations


def test_without_discount_the_adjuster_is_myopic():
    adjuster = DoseAdjuster(alpha=1e-8, gamma=0.0, iterations=2, max_change=10.0).fit(_synthetic_mdp())
    probe = _frame([2, 2], [0, 1])
    np.testing.assert_array_equal(adjuster.best_dose(probe, DOSE_GRID_MG_M2, 80.0), [50.0, 30.0])


def test_best_dose_stays_within_the_band_around_the_previous_dose_and_under_the_cap():
    adjuster = DoseAdjuster(alpha=1e-8, gamma=1.0, iterations=3, max_change=0.25).fit(_synthetic_mdp())
    probe = _frame([3, 3, 3], [0, 0, 0])
    probe["previous_dose_mg_m2"] = [20.0, 60.0, 60.0]
    doses = adjuster.best_dose(probe, DOSE_GRID_MG_M2, np.array([80.0, 80.0, 42.0]))
    # optimum 50: from 20 the band allows at most 25; from 60 down to 45 allowed → 50; cap 42 → 40
    np.testing.assert_array_equal(doses, [25.0, 50.0, 40.0])
    assert adjuster.best_dose(probe.iloc[[0]], DOSE_GRID_MG_M2, 5.0)[0] == 5.0


def test_features_impute_missing_values_at_the_mean_with_an_indicator(clinics):
    episodes, vitals = clinics[0]
    t = site_transitions(episodes, vitals)
    adjuster = DoseAdjuster().set_scaling(scaling_sums(t))
    frame = t.state.iloc[:2].copy()
    frame.loc[frame.index[0], "bilirubin_umol_l"] = np.nan
    phi = adjuster.features(frame, np.array([30.0, 50.0]))
    m = len(STATE_COLUMNS)
    assert phi.shape == (2, adjuster.n_features_) == (2, 1 + m + len(MISSABLE) + 2 + m)
    column = STATE_COLUMNS.index("bilirubin_umol_l")
    assert phi[0, 1 + column] == 0.0 and phi[0, 1 + m + MISSABLE.index("bilirubin_umol_l")] == 1.0
    assert phi[1, 1 + m + MISSABLE.index("bilirubin_umol_l")] == 0.0
    expected = (frame["bilirubin_umol_l"].iloc[1] - adjuster.mean_[column]) / adjuster.scale_[column]
    assert phi[1, 1 + column] == pytest.approx(expected)
    d = (np.array([30.0, 50.0]) - adjuster.mean_[-1]) / adjuster.scale_[-1]
    k = 1 + m + len(MISSABLE)
    np.testing.assert_allclose(phi[:, k], d)
    np.testing.assert_allclose(phi[:, k + 1], d**2)
    np.testing.assert_allclose(phi[:, k + 2:], d[:, None] * phi[:, 1:1 + m])


def test_adjuster_survives_a_json_round_trip(clinics):
    t = site_transitions(*clinics[2])
    adjuster = DoseAdjuster(gamma=0.8, iterations=5).fit(t)
    copy = DoseAdjuster.from_dict(json.loads(json.dumps(adjuster.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(copy.q_values(t.state, DOSE_GRID_MG_M2), adjuster.q_values(t.state, DOSE_GRID_MG_M2))
    assert copy.get_params() == adjuster.get_params() and copy.n_transitions_ == len(t)
    broken = adjuster.to_dict()
    broken["coef"] = broken["coef"][:-1]
    with pytest.raises(ValueError, match="coefficients"):
        DoseAdjuster.from_dict(broken)


def test_federated_fitted_q_from_site_sums_equals_pooled_fitted_q(clinics):
    sites = [site_transitions(e, v) for e, v in clinics]
    pooled = DoseAdjuster(gamma=0.9, iterations=8).fit(Transitions.concat(sites))
    federated = fitted_q_iteration(DoseAdjuster(gamma=0.9, iterations=8), lambda: [scaling_sums(t) for t in sites],
                                   lambda adjuster: [adjuster.ridge_sums(t) for t in sites])
    np.testing.assert_allclose(federated.coef_, pooled.coef_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(federated.scale_, pooled.scale_, rtol=1e-12)
    assert federated.n_transitions_ == sum(len(t) for t in sites)
    # and it is not the fit of any one site
    alone = DoseAdjuster(gamma=0.9, iterations=8).fit(sites[0])
    assert np.max(np.abs(alone.coef_ - pooled.coef_)) > 1e-3


def test_a_site_uses_its_training_split_and_reads_the_servers_adjuster(tmp_path):
    from client.adjustment_handlers import training_transitions
    from shared.protocol.adjustment import adjuster_from_request, request_records
    from shared.task import assign_split
    from shared.validation import load_site
    from simulation.clinics import SitePrivacy, generate_sites

    generate_sites(1, seed=1, out=tmp_path, patients_per_clinic=60, privacy=SitePrivacy(dp=False))
    site = load_site(tmp_path / "clinic_00")
    transitions = training_transitions(site, split_seed=0)
    train_patients = set(site.episodes["patient_id"][assign_split(site.episodes, site.task, 0) == "train"])
    assert set(transitions.state["patient_id"]) <= train_patients and len(transitions) > 0
    assert training_transitions(site, split_seed=0) is transitions  # cached
    sent = DoseAdjuster(gamma=0.5, iterations=3).set_scaling(scaling_sums(transitions))
    back, seed = adjuster_from_request(request_records(sent, split_seed=7))
    assert seed == 7 and back.get_params() == sent.get_params() and back.coef_ is None
    np.testing.assert_array_equal(back.scale_, sent.scale_)


def _flower_fit(tmp_path, dp: bool, secure_sum: str = "off") -> tuple[list, dict]:
    """Three simulated sites (40 patients each; DP ones opt in with ``[privacy.shares] adjuster = 0.2``) in Flower's
    simulation runtime; the ServerApp fits the adjuster (γ 0.9, 3 iterations, split seed 3) with its sums summed
    as ``secure_sum`` says. Returns the site folders and ``{"adjuster": ..., "privacy": [...], "secure_sum": ...}``."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from client.site import SiteSource
    from server.adjustment_phase import fit_adjuster
    from server.site_check import wait_for_nodes
    from simulation.clinics import SitePrivacy, generate_sites

    privacy = SitePrivacy(dp=dp, shares=(("adjuster", 0.2),))  # DP sites opt in (the default share is 0)
    world = generate_sites(3, seed=2, out=tmp_path / "sites", patients_per_clinic=40, privacy=privacy)
    folders = [tmp_path / "sites" / c.name for c in world.clinics]
    out = tmp_path / "adjuster.json"
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context) -> None:
        nodes = sorted(wait_for_nodes(grid, 3))
        fitted = fit_adjuster(grid, nodes, {"split-seed": 3, "fqi-gamma": 0.9, "fqi-iterations": 3},
                              secure_sum=secure_sum)
        out.write_text(json.dumps({"adjuster": fitted.to_dict(), "privacy": list(fitted.privacy_.values()),
                                   "secure_sum": fitted.secure_sum_}))

    run_simulation(server_app=server, client_app=make_client_app([SiteSource(f) for f in folders]),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                     "init_args": {"num_cpus": 2}})
    return folders, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("secure_sum", ["off", "pairwise"])
def test_flower_federated_fitted_q_equals_pooled_fitted_q(tmp_path, shared_ray, secure_sum):
    """Three simulated sites in Flower's simulation runtime: the ServerApp's fitted-Q from summed site
    statistics (in the clear, or pairwise-masked) has the pooled fit's coefficients (the same training rows in one
    place) to 1e-9."""
    from client.adjustment_handlers import training_transitions
    from shared.validation import load_site

    folders, result = _flower_fit(tmp_path, dp=False, secure_sum=secure_sum)
    assert result["secure_sum"]["mode"] == secure_sum
    federated = DoseAdjuster.from_dict(result["adjuster"])
    pooled = DoseAdjuster(gamma=0.9, iterations=3).fit(
        Transitions.concat([training_transitions(load_site(f), split_seed=3) for f in folders]))
    assert federated.n_transitions_ == pooled.n_transitions_ > 50 and result["privacy"] == []
    np.testing.assert_allclose(federated.coef_, pooled.coef_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(federated.mean_, pooled.mean_, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Differential privacy of the released sums (client.adjustment_handlers)


def _context(run_id: int = 11):
    from flwr.app import Context, RecordDict

    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _dp_site(path, epsilon: float = 3.0, share: float = 0.2):
    from client.dp import SiteDP
    from client.ledger import PrivacyLedger

    return SiteDP(PrivacyLedger.open(path, epsilon_budget=epsilon, delta=1e-5), {"adjuster": share})


def test_gaussian_release_adds_noise_of_sd_sigma_times_sqrt_blocks_times_scale_and_symmetric_noise_to_a():
    from client.dp import Block, gaussian_release

    rng = np.random.default_rng(0)
    zeros = np.zeros((200, 200))
    noised = gaussian_release({"gram": Block(zeros, 4.0, symmetric=True), "moment": Block(np.zeros(40_000), 0.5),
                               "n": Block(np.zeros(1), 1.0)}, sigma=2.0, rng=rng)
    sd = 2.0 * np.sqrt(3)
    np.testing.assert_array_equal(noised["gram"], noised["gram"].T)
    upper = noised["gram"][np.triu_indices(200)]
    assert np.std(upper) == pytest.approx(sd * 4.0, rel=0.02)
    assert np.std(noised["moment"]) == pytest.approx(sd * 0.5, rel=0.02)
    assert abs(np.mean(noised["moment"])) < 4 * sd * 0.5 / np.sqrt(40_000)


def test_clipped_ridge_sums_bound_each_transitions_contribution(clinics):
    from shared.dose_adjustment import FEATURE_NORM_CLIP, target_bound

    t = site_transitions(*clinics[0])
    adjuster = DoseAdjuster(gamma=0.9, iterations=2).fit(t)
    adjuster.coef_ = adjuster.coef_ * 50  # targets far beyond the bound
    for i in range(0, len(t), max(1, len(t) // 20)):  # one transition's sums are its contribution
        row = Transitions(t.state.iloc[[i]], t.dose[[i]], t.reward[[i]], t.next_state.iloc[[i]], t.terminal[[i]])
        sums = adjuster.clipped_ridge_sums(row)
        assert np.linalg.norm(sums["gram"]) <= FEATURE_NORM_CLIP**2 * (1 + 1e-12)
        assert np.linalg.norm(sums["moment"]) <= FEATURE_NORM_CLIP * target_bound(0.9) * (1 + 1e-12)
    assert target_bound(0.9) == pytest.approx(35.0)
    with pytest.raises(ValueError, match="gamma"):
        target_bound(1.0)
    # with bounds no row reaches, the clipped sums are the exact ones
    adjuster.coef_ = adjuster.coef_ / 50
    exact, loose = adjuster.ridge_sums(t), adjuster.clipped_ridge_sums(t, feature_clip=1e9)
    for key in exact:
        np.testing.assert_allclose(loose[key], exact[key], rtol=1e-12, atol=1e-9)


def test_bounded_scaling_sums_without_noise_give_the_exact_scaling(clinics):
    from shared.dose_adjustment import bounded_scaling_sums, scaling_from_bounded

    t = site_transitions(*clinics[1])
    exact, recovered = scaling_sums(t), scaling_from_bounded(bounded_scaling_sums(t))
    np.testing.assert_array_equal(recovered["count"], exact["count"])
    np.testing.assert_allclose(recovered["sum"], exact["sum"], rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(recovered["m2"], exact["m2"], rtol=1e-9, atol=1e-6)


def test_a_dp_site_charges_one_release_per_query_reuses_its_noisy_a_and_stays_within_its_share(clinics, tmp_path):
    from client.adjustment_handlers import adjuster_release, private_ridge_sums, private_scaling_sums

    t = site_transitions(*clinics[0])
    site = _dp_site(tmp_path / "ledger.json")
    ledger = site.ledger
    context = _context()
    grams = []

    def ridge(adjuster):
        release = adjuster_release(context, site, adjuster.iterations)
        sums, facts = private_ridge_sums(adjuster, t, len(adjuster.history_), 0, release, context)
        assert facts.phase == "adjuster" and facts.index == 1 + len(adjuster.history_)
        grams.append(sums["gram"])
        return [sums]

    scaling = lambda: [private_scaling_sums(t, adjuster_release(context, site, 4))[0]]  # noqa: E731
    fitted = fitted_q_iteration(DoseAdjuster(gamma=0.9, iterations=4), scaling, ridge)
    release = adjuster_release(context, site, 4)
    assert release.releases == 5
    assert ledger.history == [(release.sigma, 1.0, 5)]
    assert [e["round"] for e in ledger.entries] == [0, 1, 2, 3, 4]
    assert {e["phase"] for e in ledger.entries} == {"adjuster"}
    assert 0.55 < ledger.spent() <= 0.6 + 1e-9  # its share, 0.2 of ε = 3; σ calibrated within 1e-3
    for gram in grams[1:]:
        np.testing.assert_array_equal(gram, grams[0])  # A noised once, then reused
    assert np.linalg.eigvalsh(grams[0]).min() >= -1e-6 * np.abs(grams[0]).max()  # projected onto PSD
    assert np.all(np.isfinite(fitted.coef_))
    # noise is there: the DP fit is not the exact one
    exact = DoseAdjuster(gamma=0.9, iterations=4).fit(t)
    assert np.max(np.abs(fitted.coef_ - exact.coef_)) > 1e-3


def test_a_dp_site_refuses_the_adjuster_without_a_share_or_budget_and_records_nothing(clinics, tmp_path):
    from client.adjustment_handlers import adjuster_release
    from client.dp import PrivacyRefused

    site = _dp_site(tmp_path / "ledger.json")
    site.ledger.record(noise_multiplier=0.5, sample_rate=1.0, steps=4, run_id="ann", server_round=1)
    before = site.ledger.spent()
    assert before > 2.97  # less than 1 % of the budget left: exhausted
    with pytest.raises(PrivacyRefused, match="exhausted"):
        adjuster_release(_context(), site, iterations=25)
    assert site.ledger.spent() == before and len(site.ledger.entries) == 1
    with pytest.raises(PrivacyRefused, match="no share"):
        adjuster_release(_context(), _dp_site(tmp_path / "other.json", share=0.0), iterations=25)


@pytest.mark.slow
@pytest.mark.parametrize("secure_sum", ["off", "recovering"])
def test_flower_federated_fitted_q_runs_with_dp_sites_and_charges_their_ledgers(tmp_path, shared_ray, secure_sum):
    """Three simulated DP sites (site.toml dp = true, ε = 3, the simulator's default) in Flower's simulation
    runtime: the fit completes, every site reports its ε, and every ledger holds 1 + iterations releases
    within the adjuster's share (0.2 × 3) — the same with the releases masked after the noise (recovering)."""
    from client.ledger import SITE_LEDGER_FILE as LEDGER_FILE
    from client.ledger import PrivacyLedger

    folders, result = _flower_fit(tmp_path, dp=True, secure_sum=secure_sum)
    assert result["secure_sum"]["mode"] == secure_sum
    fitted = DoseAdjuster.from_dict(result["adjuster"])
    assert np.all(np.isfinite(fitted.coef_)) and len(result["privacy"]) == 3
    for folder in folders:
        ledger = PrivacyLedger.open(folder / LEDGER_FILE, epsilon_budget=3.0, delta=1e-5)
        assert len(ledger.history) == 1 and ledger.history[0][1:] == (1.0, 4)
        assert 0.55 < ledger.spent() <= 0.6 + 1e-9
    assert all(p["phase"] == "adjuster" and p["epsilon-spent"] <= 0.6 + 1e-9 for p in result["privacy"])
