"""The structured policy relative to standard of care measures against *each site's own* standard of care: the
site's usual formulation travels with every record it decides (served, gated, valued at the gate)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from client.ope import first_cycles, site_value_sums
from client.site_gate import GatedPolicy, SiteGate, UsualFormulations
from server.settings import DEFAULTS, RunSettings
from shared.dosing_policy import graded_frame, label_actions
from shared.protocol.policy import SiteVerdict
from shared.structured_policy import USUAL_FORMULATION, StructuredObjective, catalogue_of, fit_structured_policy
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic
from simulation.policy_evaluation import fresh_patients

NOT_WORSE = SiteVerdict(worse=False, estimate=0.031, lower=-0.010, upper=0.072, n=120.0)


@pytest.fixture(scope="module")
def world_and_sites():
    world = make_world(3, seed=7, patients_per_clinic=150)
    sites = [simulate_clinic(world, clinic)[0] for clinic in world.clinics]
    return world, sites


def fitted(sites, z: float):
    objective = dataclasses.replace(StructuredObjective.for_reference("standard_of_care"), z=z)
    return fit_structured_policy(sites, catalogue_of(pd.concat(sites, ignore_index=True)), objective)


def not_most_logged(policy, catalogue) -> str:
    """A formulation of the catalogue other than the one the federation logged most (the policy's fallback)."""
    most = policy._most_logged(catalogue)
    return next(f for f in sorted(catalogue) if f != most)


def test_the_reference_is_a_checked_setting_and_a_bad_one_is_refused():
    assert DEFAULTS.policy_reference == "absolute"  # by measurement (BENCHMARKS.md, attempt 5)
    assert StructuredObjective.for_reference("standard_of_care").z == 0.5
    assert StructuredObjective.for_reference("absolute") == StructuredObjective()
    with pytest.raises(ValueError, match="policy-reference"):
        dataclasses.replace(DEFAULTS, policy_reference="best")
    assert RunSettings.from_run_config({"policy-reference": "standard_of_care"}).policy_reference == "standard_of_care"


def test_a_gated_policy_falls_back_to_the_site_s_own_usual_formulation_not_the_federation_s(world_and_sites):
    world, sites = world_and_sites
    policy = fitted(sites, z=50.0)  # no candidate's lower bound is positive: standard of care everywhere
    _, frame = fresh_patients(world, world.clinics[0], 40, seed=3)
    catalogue = frame["catalogue"].iloc[0]
    site_usual = not_most_logged(policy, catalogue)
    usual = UsualFormulations({}, site_usual)

    bare = policy.recommend_frame(frame)
    served = GatedPolicy(policy, SiteGate(policy.version, NOT_WORSE, usual)).recommend_frame(frame)
    giving = (served["action"] == "give").to_numpy()
    assert giving.sum() > 30
    assert set(bare.loc[giving, "formulation_id"]) == {policy._most_logged(catalogue)}
    assert set(served.loc[giving, "formulation_id"]) == {site_usual}
    expected = label_actions(policy, frame, np.full(len(frame), site_usual, dtype=object))
    assert np.allclose(served.loc[giving, "dose_mg_m2"], expected.loc[giving, "dose_mg_m2"])
    assert all("standard-of-care" in [r.rule for r in rules] for rules in served.loc[giving, "rules"])
    # a column the caller already gives is the caller's
    given = frame.assign(**{USUAL_FORMULATION: policy._most_logged(catalogue)})
    assert UsualFormulations({}, site_usual).annotate(given) is given


def test_the_policy_leaves_the_site_s_standard_of_care_only_where_its_lower_bound_is_positive(world_and_sites):
    world, sites = world_and_sites
    policy = fitted(sites, z=0.5)
    _, frame = fresh_patients(world, world.clinics[1], 200, seed=4)
    usual = UsualFormulations({}, not_most_logged(policy, frame["catalogue"].iloc[0]))
    annotated = usual.annotate(frame)
    served = policy.recommend_frame(annotated)
    soc = label_actions(policy, annotated, usual.for_records(frame["tumour_type"]))
    giving = (served["action"] == "give").to_numpy()
    left = giving & ((served["formulation_id"] != soc["formulation_id"]).to_numpy()
                     | ~np.isclose(served["dose_mg_m2"], soc["dose_mg_m2"]))
    guarded = np.array([any(r.rule == "monotone-guard" for r in rules) for rules in served["rules"]])
    assert 0 < left.sum() < giving.sum()  # some patients moved, some kept their standard of care
    graded = graded_frame(annotated, policy.tolerance_grades())  # what the models see of the patient
    bound = policy.improvement_lower_bound(graded, served, label_actions(policy, graded, soc["formulation_id"]), 0.5)
    assert np.all(bound[left & ~guarded] > 0)


def test_a_policy_that_never_leaves_standard_of_care_is_valued_exactly_as_the_site_s_standard_of_care(
        world_and_sites):
    """The gate's records carry the site's usual formulation: a candidate identical to the site's standard of
    care has a doubly-robust difference of exactly zero (against the federation's most-logged formulation it
    would not, at a site whose usual one differs)."""
    _, sites = world_and_sites
    policy = fitted(sites, z=50.0)
    checked = 0
    for episodes in sites:
        usual = UsualFormulations.of(first_cycles(episodes)).overall
        sums = site_value_sums(policy, episodes, NANOPARTICLE_TASK, split_seed=0)
        assert sums.n > 10
        assert sums.difference == pytest.approx(0.0, abs=1e-9) and sums.difference_sq == pytest.approx(0.0, abs=1e-9)
        checked += usual != policy._most_logged(tuple(policy.formulations))
    assert checked >= 1  # at least one site's standard of care is not the federation's fallback


def test_a_simulated_clinic_serves_the_policy_against_the_usual_formulations_its_store_holds(world_and_sites):
    """The closed loop's clinic (``simulation.deployment.Recommender``) gives its records the usual formulations
    the site stored with the installed version, as the site's service does."""
    from simulation.deployment import Recommender

    world, sites = world_and_sites
    policy = fitted(sites, z=50.0)
    _, frame = fresh_patients(world, world.clinics[2], 30, seed=5)
    site_usual = not_most_logged(policy, frame["catalogue"].iloc[0])
    never = lambda f: pytest.fail("standard of care as practised is not asked for while the policy is served")  # noqa: E731
    clinic = Recommender(policy, never, None, None, np.random.default_rng(0), usual=UsualFormulations({}, site_usual))
    given = clinic(frame)
    giving = (given["action"] == "give").to_numpy()
    assert giving.sum() > 20 and set(given.loc[giving, "formulation_id"]) == {site_usual}
    assert set(clinic.decisions()["formulation_id"]) == {site_usual}


def test_the_evaluation_names_each_policy_s_value_and_value_over_oracle(world_and_sites):
    """Issue 12's interface: ``policy.evaluation.<policy>.{value, value_oracle}`` beside overall and per site."""
    from shared.dosing_policy import ActionSpace, DosingPolicy, SafetyRules
    from simulation.policy_evaluation import evaluate_policies, policy_decider, random_decider

    world, sites = world_and_sites
    policy = fitted(sites, z=1.0)
    limits = DosingPolicy(encoder=None, members={}, formulations={}, action_space=ActionSpace(), safety=SafetyRules())
    evaluation = evaluate_policies(world, {"federated": lambda site: policy_decider(policy),
                                           "random": lambda site: random_decider(limits, seed=1)},
                                   limits, n_per_site=60, seed=2)
    for name in ("oracle", "standard_of_care", "federated", "random"):
        overall = evaluation["overall"][name]
        assert evaluation[name] == {"value": overall["value"], "value_oracle": overall["value_oracle"]}
        assert overall["value_oracle"] == pytest.approx(overall["value"] / evaluation["overall"]["oracle"]["value"])
    assert evaluation["oracle"]["value_oracle"] == pytest.approx(1.0)
    assert evaluation["random"]["value_oracle"] < evaluation["federated"]["value_oracle"] < 1.0


def test_only_the_relative_policy_falls_back_to_the_site_s_usual_formulation(world_and_sites):
    """Absolute, the fallback stays the formulation the federation logged most (measured better in the closed
    loop); relative to standard of care, it is the site's own, the one the improvement is measured against."""
    world, sites = world_and_sites
    relative = fitted(sites, z=0.5)
    absolute = dataclasses.replace(relative, objective=StructuredObjective.for_reference("absolute"))
    _, frame = fresh_patients(world, world.clinics[0], 20, seed=8)
    catalogue = frame["catalogue"].iloc[0]
    annotated = UsualFormulations({}, not_most_logged(relative, catalogue)).annotate(frame)
    assert set(relative.standard_of_care(annotated)["formulation_id"]) == {not_most_logged(relative, catalogue)}
    assert set(absolute.standard_of_care(annotated)["formulation_id"]) == {absolute._most_logged(catalogue)}
