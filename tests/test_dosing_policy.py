"""The dosing policy's decisions: hard safety rules, the toxicity ceiling, pessimism under disagreement.

The outcome models here are known functions of the encoded dose (and, for toxicity, the formulation's
zeta potential), so the right answer of every case can be worked out by hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from shared.dosing_policy import ActionSpace, DosingPolicy, Objective
from shared.encoding import FeatureEncoder, SiteStatistics
from shared.patient_record import PatientRecord, records_frame
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic

EXAMPLE = Path(__file__).parent.parent / "examples" / "patient.json"
FORMULATIONS = {
    "NP00": {"particle_size_nm": 90.0, "zeta_mv": -10.0, "encapsulation_pct": 95.0, "pegylated": 1.0,
             "drug_loading_pct": 12.0, "release_tau_h": 60.0, "release_beta": 0.7},
    "NP04": {"particle_size_nm": 120.0, "zeta_mv": 20.0, "encapsulation_pct": 90.0, "pegylated": 0.0,
             "drug_loading_pct": 9.0, "release_tau_h": 10.0, "release_beta": 1.0},
    "NW00": {"particle_size_nm": 150.0, "zeta_mv": -30.0, "encapsulation_pct": 85.0, "pegylated": 1.0,
             "drug_loading_pct": 7.0, "release_tau_h": 30.0, "release_beta": 0.6},
}


@pytest.fixture(scope="module")
def encoder() -> FeatureEncoder:
    world = make_world(1, 0, patients_per_clinic=80)
    episodes, _ = simulate_clinic(world, world.clinics[0])
    return FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(SiteStatistics.from_frame(episodes, NANOPARTICLE_TASK))


def dose_and_zeta(encoder: FeatureEncoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dose (mg/m²) and zeta (mV) back from encoded rows."""
    names = encoder.feature_names_out_
    dose = x[:, names.index("dose_mg_m2")] * encoder.scales_["dose_mg_m2"] + encoder.means_["dose_mg_m2"]
    zeta = x[:, names.index("zeta_mv")] * encoder.scales_["zeta_mv"] + encoder.means_["zeta_mv"]
    return dose, zeta


def member(encoder: FeatureEncoder, response_slope: float = 0.01, toxicity_base: float = 0.0):
    """Response rises with dose; toxicity rises with dose and with positive charge (zeta)."""

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        dose, zeta = dose_and_zeta(encoder, x)
        return {"response": np.clip(response_slope * dose, 0, 1),
                "toxicity_grade3": np.clip(toxicity_base + 0.004 * dose + 0.01 * np.maximum(zeta, 0), 0, 1)}

    return predict


def policy(encoder, members=None, **objective) -> DosingPolicy:
    return DosingPolicy(encoder=encoder, members=members or {"a": member(encoder)}, formulations=FORMULATIONS,
                        objective=Objective(**objective) if objective else Objective())


def record(**changes) -> PatientRecord:
    data = json.loads(EXAMPLE.read_text())
    for key, value in changes.items():
        if "." in key:
            part, name = key.split(".")
            data[part][name] = value
        else:
            data[key] = value
    return PatientRecord.model_validate(data)


def rules_of(rec) -> set[str]:
    return {r.rule for r in rec.rules}


def test_without_limits_the_highest_scoring_action_is_chosen(encoder):
    # score = 0.01 d − 0.5 (0.004 d + 0.01 max(ζ, 0)): increasing in dose, best with ζ ≤ 0 → the top dose
    # (60 mg/m²) with a negatively charged carrier; tox at 60 = 0.24 is below the 0.35 ceiling.
    rec = policy(encoder).recommend([record(cycle=1, previous_cycle=None, wearable_summary=None)])[0]
    assert rec.action == "give" and rec.formulation_id in ("NP00", "NW00")
    assert rec.dose_mg_m2 == 60.0 and rec.dose_mg == pytest.approx(60.0 * 1.731, abs=0.05)
    assert rec.interval_days == 28  # ovarian: label q4w
    assert rec.response.mean == pytest.approx(0.6)
    assert rec.toxicity.mean == pytest.approx(0.24)
    assert rules_of(rec) == set()


@pytest.mark.parametrize(("bilirubin", "cap", "why"), [(30.0, 45.0, "above 20.5"), (60.0, 30.0, "above 20.5"),
                                                       (None, 45.0, "not measured")])
def test_hepatic_reduction_caps_the_dose_whatever_the_models_say(encoder, bilirubin, cap, why):
    rec = policy(encoder).recommend([record(bilirubin_umol_l=bilirubin)])[0]
    assert rec.dose_mg_m2 == cap
    rule = next(r for r in rec.rules if r.rule == "hepatic-reduction")
    assert why in rule.reason and f"{cap:g} mg/m²" in rule.effect


def test_cumulative_limit_caps_then_stops(encoder):
    capped = policy(encoder).recommend([record(cumulative_dose_mg_m2=520.0)])[0]
    assert capped.dose_mg_m2 == 30.0 and "cumulative-limit" in rules_of(capped)
    stopped = policy(encoder).recommend([record(cumulative_dose_mg_m2=545.0)])[0]
    assert stopped.action == "stop" and stopped.dose_mg_m2 == 0.0 and stopped.formulation_id is None
    assert stopped.response is None


def test_dose_changes_between_cycles_are_limited_and_reduced_after_toxicity(encoder):
    # The example's previous cycle: 40 mg/m², no toxicity → at most +25 % = 50 (the models would give 60).
    rec = policy(encoder).recommend([record()])[0]
    assert rec.dose_mg_m2 == 50.0
    assert "previous dose 40 mg/m²" in next(r.reason for r in rec.rules if r.rule == "dose-change-limit")
    toxic = policy(encoder).recommend([record(**{"previous_cycle.toxicity_grade3": 1})])[0]
    assert toxic.dose_mg_m2 == 30.0 and "grade ≥ 3 toxicity" in next(
        r.reason for r in toxic.rules if r.rule == "dose-change-limit")
    floor = policy(encoder).recommend([record(**{"previous_cycle.toxicity_grade3": 1,
                                                 "previous_cycle.dose_mg_m2": 10.0})])[0]
    assert floor.dose_mg_m2 == 10.0  # never below the smallest dose


def test_fever_with_low_neutrophils_withholds_the_dose(encoder):
    held = policy(encoder).recommend([record(anc_baseline_e9_l=1.2, **{"wearable_summary.fever_days": 2,
                                                                         "wearable_summary.max_temperature_c": 38.6})])
    assert held[0].action == "withhold" and held[0].dose_mg_m2 == 0.0 and held[0].interval_days == 7
    assert "fever on 2 day(s)" in next(r.reason for r in held[0].rules if r.rule == "neutropenia-hold")
    fever_only = policy(encoder).recommend([record(anc_baseline_e9_l=3.0, **{"wearable_summary.fever_days": 2})])
    assert fever_only[0].action == "give"
    grade3 = policy(encoder).recommend([record(anc_baseline_e9_l=0.8)])
    assert grade3[0].action == "withhold"


def test_toxicity_ceiling_limits_the_dose_and_says_so_when_nothing_is_below_it(encoder):
    # ceiling 0.15: 0.004 d ≤ 0.15 → d ≤ 37.5 → 35 mg/m² for the uncharged carriers
    rec = policy(encoder, toxicity_ceiling=0.15).recommend([record()])[0]
    assert rec.dose_mg_m2 == 35.0 and rec.toxicity.high <= 0.15
    # every action above the ceiling: the lowest-risk action (smallest dose, ζ ≤ 0), with the rule
    risky = policy(encoder, {"a": member(encoder, toxicity_base=0.5)}, toxicity_ceiling=0.3)
    rec = risky.recommend([record()])[0]
    assert rec.dose_mg_m2 == 10.0 and rec.formulation_id in ("NP00", "NW00") and "toxicity-ceiling" in rules_of(rec)


def test_disagreeing_models_make_the_policy_more_cautious(encoder):
    # Two members whose response slopes differ: the pessimistic response (mean − SD) grows more slowly with
    # dose, and the pessimistic toxicity (mean + SD) faster, so under a ceiling the chosen dose drops.
    one = policy(encoder, {"a": member(encoder, 0.006)}, toxicity_ceiling=0.2).recommend([record()])[0]
    two = policy(encoder, {"a": member(encoder, 0.006), "b": member(encoder, 0.006, toxicity_base=0.08)},
                 toxicity_ceiling=0.2).recommend([record()])[0]
    assert one.toxicity.low == one.toxicity.high  # a single model: no spread
    assert two.toxicity.high - two.toxicity.low == pytest.approx(0.08)  # mean ± SD of (t, t + 0.08)
    assert two.dose_mg_m2 < one.dose_mg_m2


def test_formulations_the_policy_does_not_know_are_named_and_skipped(encoder):
    rec = policy(encoder).recommend([record(catalogue=["NP04", "XYZ"])])[0]
    assert rec.formulation_id == "NP04"
    assert "XYZ" in next(r.effect for r in rec.rules if r.rule == "unknown-formulation")
    with pytest.raises(ValueError, match="no formulation of the catalogue is known"):
        policy(encoder).recommend([record(catalogue=["XYZ"])])


def test_batch_answers_equal_one_by_one(encoder):
    records = [record(), record(bilirubin_umol_l=30.0), record(cumulative_dose_mg_m2=545.0),
               record(anc_baseline_e9_l=0.8), record(catalogue=["NP04"])]
    p = policy(encoder)
    assert p.recommend(records) == [p.recommend([r])[0] for r in records]
    assert len(records_frame(records)) == 5


def test_fast_candidate_encoding_equals_the_encoder_on_full_rows(encoder):
    p = policy(encoder)
    frame = records_frame([record(), record(bilirubin_umol_l=None, tumour_type="kaposi")])
    cap, _ = p.safety_limits(frame)
    captured = {}
    p.members = {"spy": lambda x: captured.setdefault("x", x) is not None and member(encoder)(x)}
    cand = p._candidates(frame, cap, [[], []])
    full = frame.iloc[cand["row"]].reset_index(drop=True).drop(columns=["catalogue"])
    full["formulation_id"] = cand["formulation_id"].to_numpy()
    full["dose_mg_m2"], full["interval_days"] = cand["dose_mg_m2"].to_numpy(), cand["interval_days"].to_numpy()
    for name in FORMULATIONS["NP00"]:
        full[name] = [FORMULATIONS[f][name] for f in full["formulation_id"]]
    np.testing.assert_allclose(captured["x"], encoder.transform(full), atol=1e-6)
    assert set(cand.loc[cand["row"] == 1, "interval_days"]) == {21}  # kaposi: label q3w
    two = dataclasses.replace(p, action_space=ActionSpace(delays_days=(0, 7)))
    cand = two._candidates(frame, cap, [[], []])
    assert set(cand.loc[cand["row"] == 1, "interval_days"]) == {21, 28}  # or one week later


def test_from_cycle_two_the_adjuster_picks_the_dose_within_its_band_and_keeps_the_formulation(encoder):
    from shared.dose_adjustment import DoseAdjuster, site_transitions

    world = make_world(1, 1, patients_per_clinic=150)
    episodes, vitals = simulate_clinic(world, world.clinics[0])
    adjuster = DoseAdjuster(iterations=3).fit(site_transitions(episodes, vitals))
    p = policy(encoder)
    p.adjuster = adjuster
    example = record()  # cycle 3, previous cycle NP00 at 40 mg/m²
    adjusted = p.recommend([example])[0]
    assert adjusted.formulation_id == "NP00" and "fitted-q-adjustment" in rules_of(adjusted)
    band = (40 * (1 - adjuster.max_change), 40 * (1 + adjuster.max_change))
    assert band[0] <= adjusted.dose_mg_m2 <= band[1]
    q = adjuster.q_values(records_frame([example]), p.action_space.doses())[0]
    allowed = adjuster.allowed(records_frame([example]), p.action_space.doses(), np.inf)[0]
    assert adjusted.dose_mg_m2 == p.action_space.doses()[np.where(allowed, q, -np.inf).argmax()]
    one_shot = p.recommend([example], adjust=False)[0]
    assert one_shot.dose_mg_m2 == 50.0 and "fitted-q-adjustment" not in rules_of(one_shot)  # 40 + 25 %
    first_cycle = record(cycle=1, previous_cycle=None, wearable_summary=None)
    assert "fitted-q-adjustment" not in rules_of(p.recommend([first_cycle])[0])
