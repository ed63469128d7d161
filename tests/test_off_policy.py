"""Off-policy evaluation and the release gate (shared.off_policy, client.ope): the arithmetic, and a deliberately
bad candidate stopped by the sites' own logs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from client.ope import LoggingPolicy, first_cycles, site_value_sums
from shared.dosing_policy import DosingPolicy
from shared.off_policy import G_MAX, W_MAX, ValueSums, box_kernel, chf_cycle_probability, dr_terms, gate
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic


def test_dr_terms_clip_weights_and_terms_and_give_nothing_where_the_policy_withholds():
    gamma = dr_terms(q_target=[0.2, 0.2, 0.2, 0.9], q_logged=[0.1, 0.1, 0.1, 0.1], reward=[1.0, 1.0, 1.0, -3.5],
                     weight=[0.0, 2.0, 1e6, 1e6], gives=[True, True, True, False])
    assert gamma[0] == pytest.approx(0.2)  # no logged cycle like π's action: the model's value
    assert gamma[1] == pytest.approx(0.2 + 2.0 * 0.9)
    assert gamma[2] == G_MAX  # weight clipped at W_MAX, then the term at G_MAX
    assert gamma[3] == 0.0  # withheld: nothing given, nothing gained or risked
    assert W_MAX * 0.9 + 0.2 > G_MAX


def test_box_kernel_matches_doses_within_half_a_step():
    assert list(box_kernel([40.0, 42.5, 43.0], [40.0, 40.0, 40.0], 5.0)) == [0.2, 0.2, 0.0]


def test_heart_failure_risk_of_a_cycle_grows_with_the_cumulative_dose():
    early, late = chf_cycle_probability([0.0, 450.0], [50.0, 50.0])
    assert 0 <= early < 1e-4 < late < 0.1


def test_the_gate_passes_only_when_the_lower_bound_is_above_zero():
    rng = np.random.default_rng(0)
    better = {f"s{i}": ValueSums.of(rng.normal(0.3, 0.5, 200), rng.normal(0.2, 0.5, 200)) for i in range(3)}
    result = gate(better)
    assert result.passed and result.lower > 0 and result.estimate == pytest.approx(0.1, abs=0.06)
    same = {f"s{i}": ValueSums.of(rng.normal(0.2, 0.5, 200), rng.normal(0.2, 0.5, 200)) for i in range(3)}
    assert not gate(same).passed
    assert "too few" in gate({"s0": ValueSums.of(np.ones(5), np.zeros(5))}).reason


def test_dp_noise_on_the_sums_widens_the_interval():
    rng = np.random.default_rng(1)
    exact = ValueSums.of(rng.normal(0.3, 0.5, 300), rng.normal(0.2, 0.5, 300))
    noised = dataclasses.replace(exact, noise_sd=20.0)
    assert gate({"a": noised}).upper - gate({"a": noised}).lower > gate({"a": exact}).upper - gate({"a": exact}).lower


def test_the_logging_policy_model_gives_the_site_s_usual_actions_high_propensity():
    world = make_world(1, seed=5, patients_per_clinic=300)
    cycles = first_cycles(simulate_clinic(world, world.clinics[0])[0])
    model = LoggingPolicy().fit(cycles)
    usual = cycles["formulation_id"].astype(str).mode().iloc[0]
    p_usual = model.formulation_probability(cycles, np.full(len(cycles), usual)).mean()
    assert p_usual > 1.0 / max(len(model.formulations_), 1)
    density = model.dose_density(cycles, cycles["formulation_id"].astype(str).to_numpy(),
                                 cycles["dose_mg_m2"].to_numpy(dtype=float))
    assert np.all(density > 0) and np.all(np.isfinite(density))


@pytest.mark.slow
def test_a_deliberately_bad_candidate_is_stopped_by_the_gate():
    """The top dose of the least-used formulation for everyone: no site's logs support it, so the estimate gives
    it no credit over standard of care (without the support rule the outcome models' extrapolation scored it
    +0.16 here), and the gate refuses it."""
    from tests.test_recommender import real_policy_files

    files, _, _ = real_policy_files(seed=3)
    policy = DosingPolicy.from_folder(files["policy.json"].parent)
    world = make_world(3, seed=3)
    episodes = {c.name: simulate_clinic(world, c)[0] for c in world.clinics}
    counts = pd.concat(episodes.values())["formulation_id"].astype(str).value_counts()
    rarest = counts.index[-1]

    class TopDoseOfTheRarest(DosingPolicy):
        def recommend_frame(self, frame: pd.DataFrame, adjust: bool = True) -> pd.DataFrame:
            cap, verdict = self.safety_limits(frame)
            return pd.DataFrame({"action": verdict, "formulation_id": rarest,
                                 "dose_mg_m2": self.action_space.dose_max_mg_m2,
                                 "interval_days": self.action_space.intervals(frame["tumour_type"])[:, 0]})

    bad = TopDoseOfTheRarest(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(DosingPolicy)})
    sums = {name: site_value_sums(bad, frame, NANOPARTICLE_TASK, split_seed=0) for name, frame in episodes.items()}
    result = gate(sums)
    assert not result.passed and result.estimate <= 0, result.reason
    assert "not shown better than standard of care" in result.reason


def test_off_the_support_a_cycle_earns_the_models_lower_bound_never_more_than_the_plain_difference():
    from client.ope import as_records, off_support_credit, standard_of_care
    from shared.off_policy import Z_95
    from shared.structured_policy import catalogue_of, fit_structured_policy

    world = make_world(2, seed=5, patients_per_clinic=150)
    frames = [simulate_clinic(world, c)[0] for c in world.clinics]
    policy = fit_structured_policy(frames, catalogue_of(pd.concat(frames)))
    cycles = first_cycles(frames[0])
    records = as_records(cycles, tuple(sorted(set(cycles["formulation_id"].astype(str)))))
    chosen = policy.recommend_frame(records)
    soc = standard_of_care(policy, cycles, records, cycles)
    lower = policy.improvement_lower_bound(records, chosen, soc, Z_95)
    plain = np.full(len(records), 0.05)
    credit = off_support_credit(policy, records, chosen, soc, plain)
    gives = (chosen["action"] == "give").to_numpy()
    assert np.all(credit <= plain) and np.all(credit[~gives] == 0.0)
    assert credit[gives] == pytest.approx(np.minimum(lower[gives], 0.05))
    assert (lower[gives] < 0).any() and (lower[gives] > 0).any()  # pessimism both ways, not a constant
    # the same bound the policy's own choice uses, at the gate's z
    cand = policy._predict(records, chosen[["formulation_id", "dose_mg_m2", "interval_days"]].assign(
        row=np.arange(len(records)))[gives].reset_index(drop=True))
    wider = policy.improvement_bound(records, cand, soc.assign(row=np.arange(len(records)))[gives][
        ["row", "formulation_id", "dose_mg_m2", "interval_days"]], z=Z_95 + 1)
    assert np.all(wider <= lower[gives] + 1e-12) and (wider < lower[gives] - 1e-3).mean() > 0.5

    class NoBounds:  # the ensemble policy: its models carry no confidence bounds on an improvement
        pass

    assert np.all(off_support_credit(NoBounds(), records, chosen, soc, plain) == 0.0)
