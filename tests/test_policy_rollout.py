"""Multi-cycle rollouts: the clinics' dynamics carried cycle to cycle, the records a policy sees, the oracle."""

import numpy as np
import pandas as pd
import pytest

from shared.dose_adjustment import DoseAdjuster, site_transitions
from simulation.clinics import make_world, simulate_clinic
from simulation.policy_rollout import (
    MyopicOracle,
    compare_policies,
    rollout_clinic,
    standard_of_care,
    summarise,
    with_adjustment,
)


@pytest.fixture(scope="module")
def world():
    return make_world(3, seed=0)


class Recording:
    """A policy wrapper keeping every record frame it was shown."""

    def __init__(self, policy):
        self.policy, self.frames = policy, []

    def __call__(self, frame):
        self.frames.append(frame.copy())
        return self.policy(frame)


def test_each_record_carries_the_previous_cycle_and_the_cumulative_dose(world):
    clinic = world.clinics[0]
    policy = Recording(standard_of_care(world, clinic))
    log = rollout_clinic(world, clinic, policy, n_patients=120, seed=1)
    first, second = (f.set_index("patient_id") for f in policy.frames[:2])
    cycle1 = log[log["cycle"] == 1].set_index("patient")
    both = second.index
    np.testing.assert_allclose(second["cumulative_dose_mg_m2"], first.loc[both, "cumulative_dose_mg_m2"]
                               + cycle1.loc[both, "dose_mg_m2"], atol=0.11)
    np.testing.assert_array_equal(second["previous_dose_mg_m2"], cycle1.loc[both, "dose_mg_m2"])
    np.testing.assert_array_equal(second["previous_toxicity_grade3"], cycle1.loc[both, "toxicity"].astype(float))
    assert first["previous_dose_mg_m2"].isna().all() and first["wearable_fever_days"].isna().all()
    assert (second["wearable_days_recorded"] > 0).mean() > 0.8
    assert set(second["catalogue"].iloc[0]) == set(world.catalogue(clinic).formulation_id)


def test_treatment_stops_on_heart_failure_at_the_clinics_cycle_limit_and_when_the_policy_says_so(world):
    clinic = world.clinics[1]
    log = rollout_clinic(world, clinic, MyopicOracle(), n_patients=150, seed=2)
    assert log["cycle"].max() <= clinic.max_cycles
    last = log.groupby("patient")["cycle"].max()
    failed = log[log["chf"]]
    assert (last.loc[failed["patient"]].to_numpy() == failed["cycle"].to_numpy()).all()
    soc = standard_of_care(world, clinic)

    def stop_at_cycle_two(frame):
        actions = soc(frame)
        actions.loc[frame["cycle"].to_numpy() >= 2, "action"] = "stop"
        return actions

    stopped = rollout_clinic(world, clinic, stop_at_cycle_two, n_patients=50, seed=2)
    assert set(stopped["cycle"]) == {1}


def test_realised_outcomes_are_drawn_from_the_oracles_probabilities(world):
    log = pd.concat([rollout_clinic(world, c, standard_of_care(world, c), 300, seed=3) for c in world.clinics])
    assert abs(log["toxicity"].mean() - log["p_toxicity"].mean()) < 0.03
    assert abs(log["response"].mean() - log["p_response"].mean()) < 0.06  # measured with read-out noise


def test_standard_of_care_reduces_a_quarter_after_toxicity_like_the_clinics(world):
    clinic = world.clinics[2]
    log = rollout_clinic(world, clinic, standard_of_care(world, clinic), 200, seed=4).set_index(["patient", "cycle"])
    episodes, _ = simulate_clinic(world, clinic)
    for (patient, cycle), row in log.iterrows():
        if cycle == 1 or (patient, cycle - 1) not in log.index:
            continue
        before = log.loc[(patient, cycle - 1)]
        expected = max(5 * round(before["dose_mg_m2"] * 0.75 / 5), 10) if before["toxicity"] else before["dose_mg_m2"]
        assert row["dose_mg_m2"] == expected
    reduced = episodes.sort_values(["patient_id", "cycle"]).groupby("patient_id")["dose_mg_m2"].diff()
    assert (reduced.dropna() <= 0).all()  # the clinics' logs follow the same habit


def test_myopic_oracle_beats_standard_of_care_and_same_seed_gives_same_patients(world):
    result = compare_policies(world, {"standard_of_care": lambda c: standard_of_care(world, c)}, 150, seed=5)
    oracle, soc = result["overall"]["myopic_oracle"], result["overall"]["standard_of_care"]
    assert oracle["value"] > soc["value"] + 0.1
    assert oracle["myopic_regret_per_cycle"] == 0.0 and soc["myopic_regret_per_cycle"] > 0.02
    assert soc["regret"] == pytest.approx(oracle["value"] - soc["value"])
    assert set(result["per_site"]) == {c.name for c in world.clinics}
    again = rollout_clinic(world, world.clinics[0], standard_of_care(world, world.clinics[0]), 150, seed=5)
    assert summarise(again)["value"] == result["per_site"]["clinic_00"]["standard_of_care"]["value"]


def test_fitted_q_adjustment_changes_doses_only_from_cycle_two_within_its_band(world):
    transitions = site_transitions(*simulate_clinic(world, world.clinics[0]))
    adjuster = DoseAdjuster(iterations=5).fit(transitions)
    clinic = world.clinics[0]
    plain = rollout_clinic(world, clinic, standard_of_care(world, clinic), 100, seed=6)
    adjusted = rollout_clinic(world, clinic, with_adjustment(standard_of_care(world, clinic), adjuster), 100, seed=6)
    first = plain["cycle"] == 1
    np.testing.assert_array_equal(adjusted.loc[adjusted["cycle"] == 1, "dose_mg_m2"], plain.loc[first, "dose_mg_m2"])
    later = adjusted.set_index(["patient", "cycle"])
    ratios = [later.loc[(p, c), "dose_mg_m2"] / later.loc[(p, c - 1), "dose_mg_m2"]
              for p, c in later.index if c > 1]
    assert min(ratios) >= 0.75 - 1e-9 and max(ratios) <= 1.25 + 1e-9
    assert not np.allclose(ratios, 1.0)
