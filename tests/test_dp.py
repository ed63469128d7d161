"""The one DP release of a site (client.dp): the site splits its budget, sets noise once per phase, and
charges every release to its ledger with the phase's name."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.dp import (
    DEFAULT_SHARES,
    Block,
    PhaseRelease,
    PrivacyRefused,
    RunBudget,
    SiteDP,
    declared_shares,
    gaussian_release,
    phase_epsilon,
    sensitivity,
    start_run,
    training_noise,
)
from client.ledger import PrivacyLedger, calibrate_noise
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RunPlan

PLAN = RunPlan(("statistics", "training", "evaluation", "boosting", "importance", "adjuster"))


def site(tmp_path, budget: float = 3.0, **shares: float) -> SiteDP:
    """A DP site with the default shares, boosting opted in at 0.2, and ``shares`` on top."""
    return SiteDP(PrivacyLedger.open(tmp_path / "ledger.json", budget, 1e-5),
                  {**DEFAULT_SHARES, "boosting": 0.2, **shares})


def context(run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_training_gets_what_the_other_phases_of_the_plan_leave():
    budget = RunBudget.plan("7", SiteDP(_ledger_stub(3.0), dict(DEFAULT_SHARES, adjuster=0.1, boosting=0.2)), PLAN)
    assert budget.epsilon["statistics"] == pytest.approx(0.05 * 3.0)
    assert budget.epsilon["evaluation"] == pytest.approx(0.05 * 3.0)
    assert budget.epsilon["boosting"] == pytest.approx(0.2 * 3.0)
    assert budget.epsilon["adjuster"] == pytest.approx(0.1 * 3.0)
    assert budget.epsilon["training"] == pytest.approx((1 - 0.05 - 0.05 - 0.2 - 0.1) * 3.0)
    assert sum(budget.epsilon.values()) == pytest.approx(3.0)
    assert "importance" in budget.refused and "no DP form" in budget.refused["importance"]


def test_a_phase_without_a_share_is_refused_with_the_site_toml_key_that_says_so(tmp_path):
    terms = site(tmp_path, adjuster=0.0)
    budget = RunBudget.plan("7", terms, PLAN)
    assert "adjuster" not in budget.epsilon and "[privacy.shares] adjuster = 0" in budget.refused["adjuster"]


def test_a_run_splits_what_is_left_and_an_exhausted_site_refuses_everything(tmp_path):
    terms = site(tmp_path)
    terms.ledger.record(noise_multiplier=8.0, sample_rate=1.0, steps=5, run_id="earlier", server_round=0)
    left = terms.ledger.remaining()
    assert 0 < left < 3.0
    budget = RunBudget.plan("7", terms, PLAN)
    assert sum(budget.epsilon.values()) == pytest.approx(left)
    terms.ledger.record(noise_multiplier=0.3, sample_rate=1.0, steps=10, run_id="earlier", server_round=1)
    exhausted = RunBudget.plan("8", terms, PLAN)
    assert not exhausted.epsilon and all("exhausted" in why or "no DP form" in why
                                         for why in exhausted.refused.values())


def test_a_run_spends_at_most_the_sites_epsilon_per_run_so_a_budget_lasts_several_runs(tmp_path):
    terms = site(tmp_path)
    terms.per_run = 0.6
    budget = RunBudget.plan("7", terms, PLAN)
    assert sum(budget.epsilon.values()) == pytest.approx(0.6)
    assert budget.epsilon["statistics"] == pytest.approx(0.05 * 0.6)
    terms.ledger.record(noise_multiplier=8.0, sample_rate=1.0, steps=5, run_id="earlier", server_round=0)
    left = terms.ledger.remaining()
    terms.per_run = left + 1.0  # less is left than a run may spend: the run gets what is left
    assert sum(RunBudget.plan("8", terms, PLAN).epsilon.values()) == pytest.approx(left)


def test_epsilon_per_run_is_read_from_site_toml(tmp_path):
    config = {"privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5, "epsilon_per_run": 0.75}}
    assert SiteDP.of(tmp_path, config, state_dir=tmp_path / "heads").per_run == 0.75
    del config["privacy"]["epsilon_per_run"]
    assert SiteDP.of(tmp_path, config, state_dir=tmp_path / "heads").per_run is None


def test_a_phase_adds_at_most_its_epsilon_whatever_was_spent_before(tmp_path):
    terms = site(tmp_path)
    ctx = context()
    start_run(ctx, terms, PLAN)
    terms.ledger.record(noise_multiplier=5.0, sample_rate=1.0, steps=1, run_id="7", server_round=0,
                        phase="statistics")
    before = terms.ledger.spent()
    release = PhaseRelease.for_phase(ctx, terms, "boosting", releases=20)
    for index in range(20):
        release.charge(index)
    added = terms.ledger.spent() - before
    assert 0.95 * 0.6 < added <= 0.6 + 1e-9  # boosting's 20 % of ε = 3, calibrated within 0.1 %


def test_a_phases_noise_is_set_once_and_kept_for_the_run(tmp_path):
    terms, ctx = site(tmp_path), context()
    start_run(ctx, terms, PLAN)
    first = PhaseRelease.for_phase(ctx, terms, "evaluation", releases=2)
    first.charge(0)
    again = PhaseRelease.for_phase(ctx, terms, "evaluation", releases=2)
    assert again.sigma == first.sigma and again.releases == 2
    again.charge(1)
    with pytest.raises(PrivacyRefused, match="beyond the 2 announced"):
        again.charge(2)
    assert [e["phase"] for e in terms.ledger.entries] == ["evaluation", "evaluation"]


def test_a_new_run_plans_again(tmp_path):
    terms = site(tmp_path)
    first_ctx = context(run_id=1)
    start_run(first_ctx, terms, PLAN)
    sigma = PhaseRelease.for_phase(first_ctx, terms, "statistics", releases=1).sigma
    second_ctx = context(run_id=2)
    second_ctx.state = first_ctx.state  # the same node, a later run
    start_run(second_ctx, terms, RunPlan(("statistics",)))
    assert phase_epsilon(second_ctx, terms, "statistics") == pytest.approx(0.05 * 3.0)
    assert PhaseRelease.for_phase(second_ctx, terms, "statistics", releases=1).sigma == pytest.approx(sigma)


def test_a_phase_not_in_the_runs_plan_has_no_share(tmp_path):
    terms, ctx = site(tmp_path), context()
    start_run(ctx, terms, RunPlan(("statistics", "training")))
    with pytest.raises(PrivacyRefused, match="not in this run's plan"):
        PhaseRelease.for_phase(ctx, terms, "boosting", releases=3)


def test_training_noise_is_set_for_the_whole_run_at_the_first_round(tmp_path):
    terms, ctx = site(tmp_path), context()
    start_run(ctx, terms, RunPlan(("statistics", "training", "evaluation")))
    sigma = training_noise(ctx, terms, sample_rate=0.05, steps=200)
    assert training_noise(ctx, terms, sample_rate=0.05, steps=10) == sigma  # later rounds: the same σ
    assert terms.ledger.epsilon_after(sigma, 0.05, 200) == pytest.approx(0.9 * 3.0, rel=2e-3)


def test_gaussian_release_noise_is_sigma_times_sqrt_of_touched_entries_times_scale():
    rng = np.random.default_rng(0)
    blocks = {"a": Block(np.zeros(50_000), 3.0, touched=2), "b": Block(np.zeros(50_000), 0.5, touched=2)}
    noised = gaussian_release(blocks, sigma=1.5, rng=rng)
    assert sensitivity(blocks) == 2.0
    assert np.std(noised["a"]) == pytest.approx(1.5 * 2.0 * 3.0, rel=0.02)
    assert np.std(noised["b"]) == pytest.approx(1.5 * 2.0 * 0.5, rel=0.02)
    with pytest.raises(ValueError, match="no finite bound"):
        gaussian_release({"c": Block(np.zeros(2), np.inf)}, sigma=1.0, rng=rng)


def test_site_toml_shares_are_read_checked_and_the_legacy_adjuster_share_still_counts():
    config = {"privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5, "adjuster_share": 0.2,
                          "shares": {"boosting": 0.1}}}
    shares = declared_shares(config)
    assert shares["adjuster"] == 0.2 and shares["boosting"] == 0.1 and shares["statistics"] == 0.05
    with pytest.raises(ValueError, match="unknown phase"):
        declared_shares({"privacy": {"shares": {"trainin": 0.5}}})
    with pytest.raises(ValueError, match=r"expected a number in \[0, 1\]"):
        declared_shares({"privacy": {"shares": {"evaluation": 5.0}}})


def test_a_site_without_dp_has_no_terms(tmp_path):
    assert SiteDP.of(tmp_path, {"privacy": {"dp": False, "epsilon": 3.0, "delta": 1e-5}}) is None
    assert SiteDP.of(tmp_path, {}) is None


def _ledger_stub(budget: float):
    class Stub:
        epsilon_budget, delta, path = budget, 1e-5, "stub"

        @staticmethod
        def remaining() -> float:
            return budget

        @staticmethod
        def spent() -> float:
            return 0.0

    return Stub()


def test_weighted_releases_compose_to_the_phases_epsilon_each_charged_with_its_own_sigma(tmp_path):
    """Weights 2:1:1 give release 0 half the phase's Rényi loss: σ₀ = σ₁/√0.5, the others σ₁/√0.25, σ₁ the noise
    of one release spending the whole ε; the three compose to the phase's ε (calibrated within 0.1 %)."""
    terms, ctx = site(tmp_path), context()
    start_run(ctx, terms, PLAN)
    epsilon = phase_epsilon(ctx, terms, "boosting")
    one = calibrate_noise(epsilon, 1e-5, 1.0, 1)
    release = PhaseRelease.for_phase(ctx, terms, "boosting", releases=3, weights=[2.0, 1.0, 1.0])
    assert release.sigmas == pytest.approx((one * 2 ** 0.5, 2 * one, 2 * one))
    again = PhaseRelease.for_phase(ctx, terms, "boosting", releases=3)  # a later message: the run's noise, kept
    assert again.sigmas == release.sigmas
    for index in range(3):
        again.charge(index)
    assert terms.ledger.history == [(release.sigmas[0], 1.0, 1), (release.sigmas[1], 1.0, 2)]
    assert epsilon * 0.999 <= terms.ledger.spent() <= epsilon + 1e-9


def test_weighted_releases_are_refused_when_the_ledger_no_longer_has_room_for_them(tmp_path):
    """Something else spent part of the budget after the noise was set: the next release is refused and nothing
    is charged, so the ledger never goes past its budget."""
    terms, ctx = site(tmp_path, budget=1.0, boosting=1.0, statistics=0.0, evaluation=0.0, policy=0.0), context()
    start_run(ctx, terms, RunPlan(("boosting",)))
    release = PhaseRelease.for_phase(ctx, terms, "boosting", releases=2, weights=[0.9, 0.1])
    release.charge(0)
    terms.ledger.record(release.sigmas[1] / 2, 1.0, 1, run_id="other", server_round=0)
    entries = len(terms.ledger.entries)
    with pytest.raises(PrivacyRefused, match="boosting refused: privacy budget of this site exhausted"):
        release.charge(1)
    assert len(terms.ledger.entries) == entries


def test_weights_that_are_not_one_positive_number_per_release_are_refused(tmp_path):
    terms, ctx = site(tmp_path), context()
    start_run(ctx, terms, PLAN)
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ShareableError, match="release weights must be 2 positive numbers"):
            PhaseRelease.for_phase(ctx, terms, "boosting", releases=2, weights=bad)
