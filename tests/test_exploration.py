"""Safe exploration (shared.exploration), its decision log (client.decision_log, decisions.csv) and the exact
propensities the site's off-policy estimate takes from it (client.ope)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client.decision_log import append_decisions, decision_rows, logged_probability
from client.ope import first_cycles
from shared.dosing_policy import ActionSpace, RuleApplied
from shared.exploration import Exploration, draw
from shared.validation import SiteDataError, load_site, validate_site

GRID = ActionSpace().doses()  # 10, 15, ..., 60 mg/m²
GUARD = RuleApplied("monotone-guard", "dose capped at 40 mg/m²", "a better-graded version would get 40")


def actions(doses, formulations=None, action="give", rules=None) -> pd.DataFrame:
    n = len(doses)
    frame = pd.DataFrame({"action": [action] * n if isinstance(action, str) else action,
                          "formulation_id": formulations or ["PLD"] * n, "dose_mg_m2": np.asarray(doses, float),
                          "interval_days": [21.0] * n})
    if rules is not None:
        frame["rules"] = rules
    return frame


def by_row(options: pd.DataFrame, row: int) -> dict[tuple[str, float], float]:
    part = options[options["row"] == row]
    return {(f, d): p for f, d, p in zip(part["formulation_id"], part["dose_mg_m2"], part["probability"], strict=True)}


def test_the_dose_spread_stays_within_25_percent_and_the_hard_cap_and_keeps_the_arm_s_dose_most_likely():
    wide = Exploration(spread_share=0.3, spread_steps=3)
    options = wide.options([(1.0, actions([40.0, 40.0, 10.0]))], np.array([60.0, 45.0, 60.0]), GRID)
    free, capped, lowest = by_row(options, 0), by_row(options, 1), by_row(options, 2)
    assert free == pytest.approx({("PLD", 30.0): 0.075, ("PLD", 35.0): 0.075, ("PLD", 40.0): 0.7,
                                  ("PLD", 45.0): 0.075, ("PLD", 50.0): 0.075})  # ±25 % bounds 3 steps
    assert capped == pytest.approx({("PLD", 30.0): 0.1, ("PLD", 35.0): 0.1, ("PLD", 40.0): 0.7,
                                    ("PLD", 45.0): 0.1})  # the hepatic/cumulative cap of 45 mg/m² holds
    assert lowest == {("PLD", 10.0): 1.0}  # 15 mg/m² is +50 %: no spread
    assert options.groupby("row")["probability"].sum().to_numpy() == pytest.approx([1.0, 1.0, 1.0])
    default = Exploration().options([(1.0, actions([40.0]))], np.array([60.0]), GRID)
    assert by_row(default, 0) == pytest.approx({("PLD", 35.0): 0.2, ("PLD", 40.0): 0.6, ("PLD", 45.0): 0.2})


def test_a_dose_a_safety_rule_lowered_is_never_explored_upwards():
    options = Exploration().options([(1.0, actions([40.0], rules=[[GUARD]]))], np.array([60.0]), GRID)
    assert max(d for _, d in by_row(options, 0)) == 40.0
    assert min(d for _, d in by_row(options, 0)) == 35.0


def test_a_trial_arm_gets_its_share_and_a_withholding_arm_stops_all_exploration():
    served = actions([50.0, 50.0])
    trial = actions([20.0, 20.0], ["NW02", "NW02"], action=["give", "withhold"])
    options = Exploration(trial_share=0.5, spread_share=0.0).options([(0.5, served), (0.5, trial)],
                                                                     np.array([60.0, 60.0]), GRID)
    assert by_row(options, 0) == {("PLD", 50.0): 0.5, ("NW02", 20.0): 0.5}
    assert by_row(options, 1) == {("PLD", 50.0): 1.0}  # the trial arm withholds: nothing explored
    merged = Exploration(spread_share=0.0).options([(0.5, served), (0.5, served)], np.array([60.0, 60.0]), GRID)
    assert by_row(merged, 0) == {("PLD", 50.0): 1.0}


@pytest.mark.parametrize(("lower", "upper", "allowed"), [
    (-0.05, 0.08, True),  # equipoise, loss bounded within the margin
    (0.01, 0.08, False),  # shown better: ship it, no trial
    (-0.09, -0.01, False),  # shown worse
    (-1.4, 1.3, False),  # too noisy to bound the loss (DP): no trial
    (None, None, False),
])
def test_a_trial_needs_equipoise_and_a_bounded_loss(lower, upper, allowed):
    assert Exploration().allows_trial({"lower": lower, "upper": upper}) is allowed
    assert not Exploration(trial_share=0.0).allows_trial({"lower": -0.05, "upper": 0.08})


def test_formulations_in_equipoise_share_a_fifth_of_the_served_arm_and_keep_a_guarded_dose_ceiling():
    served = actions([40.0, 40.0], rules=[[], [GUARD]])
    alternatives = pd.DataFrame({"row": [0, 0, 1], "formulation_id": ["NW02", "NP03", "NW02"],
                                 "dose_mg_m2": [30.0, 50.0, 40.0], "interval_days": [21.0, 21.0, 21.0]})
    options = Exploration(spread_share=0.0).options([(1.0, served)], np.array([60.0, 60.0]), GRID, alternatives)
    assert by_row(options, 0) == pytest.approx({("PLD", 40.0): 0.8, ("NW02", 30.0): 0.1, ("NP03", 50.0): 0.1})
    assert by_row(options, 1) == pytest.approx({("PLD", 40.0): 0.8, ("NW02", 40.0): 0.2})
    spread = Exploration().options([(1.0, served)], np.array([60.0, 60.0]), GRID, alternatives)
    assert max(d for f, d in by_row(spread, 1) if f == "NW02") == 40.0  # the guard's ceiling holds for them too
    assert spread.groupby("row")["probability"].sum().to_numpy() == pytest.approx([1.0, 1.0])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"trial_share = 1\.0: expected a number in \[0, 1\)"):
        Exploration(trial_share=1.0)
    with pytest.raises(ValueError, match="must be non-negative and sum to 1"):
        Exploration().options([(0.7, actions([40.0]))], np.array([60.0]), GRID)


def test_draws_follow_the_logged_probabilities():
    wide = Exploration(spread_share=0.3, spread_steps=2)
    options = wide.options([(1.0, actions([40.0] * 20_000))], np.full(20_000, 60.0), GRID)
    chosen = draw(options, np.random.default_rng(1))
    assert len(chosen) == 20_000 and chosen["row"].tolist() == list(range(20_000))
    assert options.groupby("row")["chosen"].sum().eq(1).all()
    share = chosen["dose_mg_m2"].value_counts(normalize=True)
    assert share[40.0] == pytest.approx(0.7, abs=0.015)
    assert share[[30.0, 35.0, 45.0, 50.0]].to_numpy() == pytest.approx([0.075] * 4, abs=0.01)


# --- the log ------------------------------------------------------------------------------------------------


def write_log(site, rows: list[tuple]) -> None:
    header = "patient_id,cycle,policy_version,formulation_id,dose_mg_m2,interval_days,probability,chosen\n"
    (site / "decisions.csv").write_text(header + "".join(",".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture()
def site(tmp_path):
    from tests.sitefactory import write_site

    return write_site(tmp_path)


def test_a_valid_log_is_loaded_with_the_site(site):
    write_log(site, [("P001", 1, "", "PLD", 40, 21, 0.7, 1), ("P001", 1, "", "PLD", 45, 21, 0.3, 0),
                     ("P002", 2, 3, "PLD", 50, 21, 1, 1)])
    decisions = load_site(site).decisions
    assert decisions is not None and len(decisions) == 3
    assert decisions["probability"].tolist() == [0.7, 0.3, 1.0] and decisions["policy_version"].isna().sum() == 2


@pytest.mark.parametrize(("rows", "column", "expected"), [
    ([("P001", 1, "", "PLD", 40, 21, 0.7, 1), ("P001", 1, "", "PLD", 45, 21, 0.2, 0)], "probability",
     "to sum to 1; 1 decision sum to 0.9"),
    ([("P001", 1, "", "PLD", 40, 21, 0.5, 1), ("P001", 1, "", "PLD", 45, 21, 0.5, 1)], "chosen",
     "exactly one chosen option (1) per decision (patient_id, cycle); 1 decision have 2"),
    ([("P001", 1, "", "PLD", 40, 21, 1.5, 1)], "probability", "in [0, 1]"),
    ([("P001", 1, "", "PLD", 40, 21, "", 1)], "probability", "a value is required"),
])
def test_a_broken_log_is_refused_naming_the_file_column_and_rows(site, rows, column, expected):
    write_log(site, rows)
    report = validate_site(site)
    errors = [p for p in report.errors if p.file == "decisions.csv"]
    assert len(errors) == 1 and errors[0].column == column and errors[0].rows[0] == 1, report.format()
    assert expected in str(errors[0])
    with pytest.raises(SiteDataError):
        load_site(site)


def test_logged_probability_sums_the_options_matching_an_action_and_is_nan_where_nothing_was_logged(tmp_path):
    records = pd.DataFrame({"patient_id": ["a", "a", "b"], "cycle": [1, 2, 1]})
    options = Exploration(spread_steps=2).options([(1.0, actions([40.0, 40.0, 40.0]))], np.full(3, 60.0), GRID)
    draw(options, np.random.default_rng(0))
    rows = decision_rows(records, options[options["row"] != 1], version=None)  # cycle 2 of "a" not logged
    append_decisions(tmp_path, rows)
    append_decisions(tmp_path, rows.iloc[:0])  # appending nothing keeps one header
    logged = pd.read_csv(tmp_path / "decisions.csv")
    assert len(logged) == len(rows) == 10
    p = logged_probability(logged, records, np.array(["PLD", "PLD", "NW02"]), np.array([41.0, 40.0, 40.0]), 5.0)
    assert p[0] == pytest.approx(0.6) and np.isnan(p[1]) and p[2] == 0.0


# --- in the closed loop -------------------------------------------------------------------------------------


@pytest.fixture()
def clinics(tmp_path):
    from tests.sitefactory import provisioned_clinics

    return provisioned_clinics(tmp_path, patients_per_clinic=60)


def structured_trial(world, sites):
    from shared.structured_policy import catalogue_of, fit_structured_policy

    frames = [load_site(path).episodes for path, _ in sites.values()]
    return fit_structured_policy(frames, catalogue_of(pd.concat(frames)))


def test_the_structured_policy_offers_the_best_formulation_its_bounds_cannot_rank_below_the_recommended_one():
    from client.ope import as_records
    from shared.dosing_policy import RESPONSE, TOXICITY, graded_frame
    from shared.structured_policy import catalogue_of, fit_structured_policy
    from simulation.clinics import make_world, simulate_clinic

    world = make_world(3, seed=0)
    frames = [simulate_clinic(world, c)[0] for c in world.clinics]
    policy = fit_structured_policy(frames, catalogue_of(pd.concat(frames)))
    cycles = first_cycles(frames[0]).head(200)
    records = as_records(cycles, tuple(sorted(policy.formulations)))
    table, alternatives = policy.recommend_with_alternatives(records)
    pd.testing.assert_frame_equal(table.drop(columns="rules"), policy.recommend_frame(records).drop(columns="rules"))
    assert len(alternatives) and alternatives["row"].isin(np.flatnonzero(table["action"] == "give")).all()
    picked = table.loc[alternatives["row"]]
    assert (alternatives["formulation_id"].to_numpy() != picked["formulation_id"].to_numpy()).all()
    o = policy.objective
    graded = graded_frame(records, policy.tolerance_grades())  # what the models see of the patient
    theirs = policy._predict(graded, alternatives)
    optimistic = theirs[f"{RESPONSE}_high"] - o.toxicity_weight * theirs[f"{TOXICITY}_low"] \
        - o.heart_failure_weight * theirs["chf"]
    mine = policy._predict(graded, picked[["formulation_id", "dose_mg_m2", "interval_days"]].assign(
        row=alternatives["row"].to_numpy()).reset_index(drop=True))
    assert np.all(optimistic.to_numpy() >= mine["score"].to_numpy() - 1e-12)
    assert alternatives["row"].is_unique  # one per patient: 0.2 × 0.6 of the decision stays above MIN_SUPPORT
    assert np.all(theirs["score"].to_numpy() <= mine["score"].to_numpy() + 1e-12)  # the recommended is the best
    # the one kept is the best-scoring of the formulations in equipoise: none of the others scores higher
    cap, _ = policy.safety_limits(records)
    every = policy.candidates(graded, cap, [[] for _ in range(len(records))])
    every = every[every["row"].isin(alternatives["row"])
                  & (every["formulation_id"].to_numpy() != table.loc[every["row"], "formulation_id"].to_numpy())]
    best_other = every.groupby("row")["score"].max()
    assert np.all(theirs["score"].to_numpy() <= best_other.loc[alternatives["row"]].to_numpy() + 1e-12)
    assert (alternatives["ceiling"] >= alternatives["dose_mg_m2"]).all()


def test_while_standard_of_care_is_served_a_stopped_candidate_s_models_judge_equipoise_with_it(clinics):
    """The seed-2 lock-out of the closed loop (BENCHMARKS.md): a candidate the gate stopped never reached the
    logs' support while its sites served standard of care. Now its models say which other formulation they
    cannot rank below standard of care's, and that one gets a fifth of each first cycle, on the support."""
    from client.ope import as_records
    from shared.dosing_policy import graded_frame
    from shared.off_policy import MIN_SUPPORT
    from simulation.deployment import Recommender, treat_period
    from simulation.policy_rollout import standard_of_care

    world, sites = clinics
    candidate = structured_trial(world, sites)
    catalogue = tuple(sorted(candidate.formulations))
    # a clinic whose usual formulation is not the one the candidate chooses (here the only one it supports)
    clinic = next(c for c in world.clinics
                  if set(standard_of_care(world, c)(as_records(first_cycles(load_site(sites[c.name][0]).episodes)
                                                                .head(1), catalogue))["formulation_id"])
                  != set(candidate.recommend_frame(as_records(first_cycles(load_site(sites[c.name][0]).episodes)
                                                              .head(1), catalogue))["formulation_id"]))
    soc = standard_of_care(world, clinic)
    records = as_records(first_cycles(load_site(sites[clinic.name][0]).episodes).head(80), catalogue)
    served = soc(records)
    alternatives = candidate.equipoise_with(records, served)
    assert len(alternatives) and alternatives["row"].is_unique
    assert (alternatives["formulation_id"].to_numpy() != served.loc[alternatives["row"], "formulation_id"]).all()
    graded = graded_frame(records, candidate.tolerance_grades())
    theirs = candidate._predict(graded, alternatives)
    soc_scored = candidate._predict(graded, served.assign(row=np.arange(len(served))).loc[alternatives["row"]])
    o = candidate.objective
    optimistic = theirs["response_high"] - o.toxicity_weight * theirs["toxicity_grade3_low"] - o.heart_failure_weight \
        * theirs["chf"]
    assert np.all(optimistic.to_numpy() >= soc_scored["score"].to_numpy() - 1e-12)

    recommender = Recommender(None, soc, Exploration(), None, np.random.default_rng(0), judge=candidate)
    recommender(records)
    log = recommender.decisions()
    offered = log.merge(records[["patient_id"]].assign(row=np.arange(len(records))), on="patient_id")
    other = offered[offered["formulation_id"].to_numpy() != served.loc[offered["row"], "formulation_id"].to_numpy()]
    at_own_dose = other.merge(alternatives, on=["row", "formulation_id", "dose_mg_m2"])
    assert len(at_own_dose) == len(alternatives)
    # a fifth of the decision, 0.6 of it at the alternative's own dose (all of it where no other dose is allowed)
    share = at_own_dose["probability"].to_numpy()
    assert np.all(np.isclose(share, 0.12) | np.isclose(share, 0.2)) and np.median(share) == pytest.approx(0.12)
    assert (share >= MIN_SUPPORT).all()  # on the support: at least 1 / W_MAX
    assert recommender.equipoise > 0

    periods = treat_period(world, sites, period=1, patients=40, seed=0, exploration=Exploration(),
                           candidate=candidate)
    assert all(p["exploration"]["equipoise_judged_by"] == "the stopped candidate" for p in periods.values())
    assert sum(p["exploration"]["equipoise"] for p in periods.values()) > 5


def test_an_explored_period_gives_what_it_logged_inside_the_hard_rules_and_values_the_trial_exactly(clinics):
    from client.ope import LoggingPolicy, as_records, dr_gamma
    from shared.off_policy import utility
    from simulation.deployment import treat_period

    world, sites = clinics
    trial = structured_trial(world, sites)
    periods = treat_period(world, sites, period=1, patients=40, seed=0, exploration=Exploration(),
                           trials={name: trial for name in sites})
    assert sum(p["exploration"]["trial_arm"] for p in periods.values()) > 5  # another formulation, the trial's
    for name, (path, _) in sites.items():
        site = load_site(path)  # the log validates with the site
        explored = periods[name]["exploration"]
        assert explored["first_cycles"] == 40 and explored["trial_arm"] + explored["dose_spread"] > 5
        assert explored["equipoise"] == 0  # standard of care served: no model to tell equipoise
        new = site.episodes[site.episodes["patient_id"].str.contains("-D1P")]
        decisions = site.decisions
        chosen = decisions[decisions["chosen"] == 1].merge(new, on=["patient_id", "cycle"], suffixes=("", "_given"))
        assert len(chosen) == (new["dose_mg_m2"] > 0).sum()  # every given cycle was logged, once
        assert (chosen["formulation_id"] == chosen["formulation_id_given"]).all()
        assert np.allclose(chosen["dose_mg_m2"], chosen["dose_mg_m2_given"])
        later = decisions[decisions["cycle"] > 1]
        assert (later["probability"] == 1.0).all()  # only first cycles are randomised
        first = decisions[decisions["cycle"] == 1]
        assert first.groupby("patient_id").size().max() > 1 and first["dose_mg_m2"].max() <= 60.0

        # the site's estimate divides by the logged probability of what was given, not by a model of habits
        cycles = first_cycles(new).reset_index(drop=True)
        records = as_records(cycles, tuple(sorted(trial.formulations)))
        logged = cycles[["formulation_id", "dose_mg_m2", "interval_days"]].astype({"formulation_id": str})
        reward = utility(cycles["response"], cycles["toxicity_grade3"], cycles["chf"])
        habits = LoggingPolicy().fit(first_cycles(site.episodes))
        target = logged.assign(action="give")  # a target that did what was given: weight 1 / p exactly
        with_log, supported = dr_gamma(trial, habits, records, logged, reward, target, decisions)
        p = logged_probability(decisions, cycles, logged["formulation_id"].to_numpy(), logged["dose_mg_m2"], 5.0)
        assert supported.all() and np.all(p >= 0.1 - 1e-9)  # every option at least 1 / W_MAX
        q = trial.predicted_outcomes(records, logged)
        from shared.off_policy import G_MAX, W_MAX, chf_cycle_probability

        q_u = utility(q["response"], q["toxicity_grade3"],
                      chf_cycle_probability(records["cumulative_dose_mg_m2"], logged["dose_mg_m2"]))
        expected = np.clip(q_u + np.minimum(1.0 / p, W_MAX) * (reward - q_u), -G_MAX, G_MAX)
        assert with_log == pytest.approx(expected)


def test_the_sites_own_practice_leaves_out_cycles_a_policy_or_a_draw_decided():
    from client.decision_log import own_practice

    cycles = pd.DataFrame({"patient_id": ["old", "soc", "policy", "drawn"], "cycle": [1, 1, 1, 1]})
    logged = pd.DataFrame({"patient_id": ["soc", "policy", "drawn", "drawn"], "cycle": [1, 1, 1, 1],
                           "policy_version": pd.array([None, 2, None, None], dtype="Int64"),
                           "probability": [1.0, 1.0, 0.6, 0.4]})
    assert own_practice(cycles, logged)["patient_id"].tolist() == ["old", "soc"]
    assert own_practice(cycles, None).equals(cycles)
    everything_decided = cycles[cycles["patient_id"] == "policy"]
    assert own_practice(everything_decided, logged).equals(everything_decided)  # nothing left: all of them
