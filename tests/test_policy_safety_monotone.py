"""No input that means the patient tolerates the drug worse may raise the recommended dose (issue 14.12).

Generated patients (seeded, within the site-data contract, consistent records) are each compared with copies
that are worse in one tolerance input — higher bilirubin, lower creatinine clearance, lower ANC, older, worse
ECOG, a grade ≥ 3 toxicity or a lower ANC nadir last cycle — and with a copy worse in all of them at once.
The policy is a real signed bundle (ANN + XGBoost trained on a simulated world, fitted-Q adjuster:
``tests.test_recommender.real_bundle``), whose models, like any learned from confounded logs, are not
monotone themselves: the guard in the policy must make the decision so.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.dosing_policy import DosingPolicy
from shared.patient_record import PatientRecord, records_frame
from shared.schema import TUMOUR_TYPES
from tests.test_dosing_policy import encoder, record  # noqa: F401  (encoder is a fixture)
from tests.test_recommender import example_dict, real_bundle


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> DosingPolicy:
    bundle, trust = real_bundle(tmp_path_factory.mktemp("monotone") / "v1")
    return DosingPolicy.from_bundle(bundle, trust)


def generated_patient(rng: np.random.Generator, i: int, known: list[str]) -> dict:
    """A consistent record: a first cycle, or a later one whose previous formulation is in the catalogue."""
    height, weight = rng.uniform(150, 190), rng.uniform(45, 110)
    catalogue = sorted(rng.choice(known, size=3, replace=False).tolist())
    record = example_dict() | {
        "patient_id": f"gen-{i:04d}", "age_years": round(float(rng.uniform(25, 85)), 1),
        "sex": str(rng.choice(["F", "M"])), "height_cm": round(height, 1), "weight_kg": round(weight, 1),
        "bsa_m2": round(math.sqrt(round(height, 1) * round(weight, 1) / 3600), 3),
        "bilirubin_umol_l": round(float(min(rng.lognormal(2.3, 0.6), 90.0)), 1),
        "creatinine_clearance_ml_min": round(float(rng.uniform(30, 140)), 1),
        "anc_baseline_e9_l": round(float(rng.uniform(1.1, 6.0)), 2), "ecog": int(rng.integers(0, 4)),
        "tumour_type": str(rng.choice(TUMOUR_TYPES)), "tumour_burden_mm": round(float(rng.uniform(10, 150)), 1),
        "catalogue": catalogue,
    }
    if rng.random() < 0.5:
        return record | {"cycle": 1, "previous_cycle": None, "wearable_summary": None,
                         "cumulative_dose_mg_m2": float(rng.choice([0.0, 0.0, 100.0]))}
    cycle, dose = int(rng.integers(2, 7)), float(rng.choice(np.arange(20.0, 55.0, 5.0)))
    toxic = int(rng.random() < 0.3)
    nadir = rng.uniform(0.3, 1.4) if toxic else rng.uniform(1.0, 3.0)
    record["previous_cycle"] = record["previous_cycle"] | {
        "formulation_id": catalogue[int(rng.integers(0, 3))], "dose_mg_m2": dose, "toxicity_grade3": toxic,
        "anc_nadir_e9_l": round(float(nadir), 2)}
    return record | {"cycle": cycle, "cumulative_dose_mg_m2": dose * (cycle - 1)}


def worse_copies(rng: np.random.Generator, record: dict) -> dict[str, dict]:
    """The record made worse in each tolerance input (where it can be), and in all of them at once."""
    worse = {
        "bilirubin": {"bilirubin_umol_l": round(min(record["bilirubin_umol_l"] * rng.uniform(1.2, 8.0), 600.0), 1)},
        "creatinine clearance": {"creatinine_clearance_ml_min":
                                 round(max(record["creatinine_clearance_ml_min"] * rng.uniform(0.2, 0.9), 5.0), 1)},
        "ANC": {"anc_baseline_e9_l": round(record["anc_baseline_e9_l"] * rng.uniform(0.3, 0.95), 2)},
        "age": {"age_years": round(min(record["age_years"] + rng.uniform(1, 25), 110.0), 1)},
        "ECOG": {"ecog": min(record["ecog"] + int(rng.integers(1, 3)), 4)},
    }
    previous = record["previous_cycle"]
    if previous is not None:
        worse["toxicity last cycle"] = {"previous_cycle": previous | {"toxicity_grade3": 1}}
        nadir = round(previous["anc_nadir_e9_l"] * rng.uniform(0.1, 0.9), 2)
        worse["nadir last cycle"] = {"previous_cycle": previous | {"anc_nadir_e9_l": nadir,
                                                                   "toxicity_grade3": int(nadir < 1.0) or
                                                                   previous["toxicity_grade3"]}}
    everything = {}
    for change in worse.values():
        everything |= change
    if previous is not None:
        everything["previous_cycle"] = worse["nadir last cycle"]["previous_cycle"] | {"toxicity_grade3": 1}
    return worse | {"all at once": everything}


def violations(policy: DosingPolicy, n: int, seed: int) -> tuple[int, list[str]]:
    """(pairs compared, one line per pair where the worse patient got a higher dose)."""
    rng = np.random.default_rng(seed)
    known = sorted(policy.formulations)
    bases, pairs = [], []
    for i in range(n):
        base = generated_patient(rng, i, known)
        bases.append(base)
        pairs += [(i, what, base | change) for what, change in worse_copies(rng, base).items()]
    records = [PatientRecord.model_validate(r) for r in [*bases, *(p[2] for p in pairs)]]
    results = policy.recommend(records)
    dose = [r.dose_mg_m2 if r.action == "give" else 0.0 for r in results]
    found = [f"{bases[i]['patient_id']}: worse {what} raised the dose from {dose[i]:g} to {dose[n + k]:g} mg/m²"
             for k, (i, what, _) in enumerate(pairs) if dose[n + k] > dose[i] + 1e-9]
    return len(pairs), found


def test_worse_organ_function_never_raises_the_dose_of_generated_patients(policy):
    compared, found = violations(policy, n=100, seed=14)
    assert compared > 700
    assert found == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_worse_organ_function_never_raises_the_dose_many_seeds(policy, seed):
    compared, found = violations(policy, n=400, seed=seed)
    assert found == [], f"{len(found)} of {compared}: {found[:5]}"


def test_the_issue_patient_with_raised_bilirubin_gets_no_more_than_with_normal_bilirubin(policy):
    normal = PatientRecord.model_validate(example_dict() | {"catalogue": sorted(policy.formulations)[:3]})
    raised = normal.model_copy(update={"bilirubin_umol_l": 68.4})
    base, worse = policy.recommend([normal, raised])
    assert worse.dose_mg_m2 <= base.dose_mg_m2
    assert worse.dose_mg_m2 <= 30.0  # the label's 50 % hepatic reduction of the 60 mg/m² grid top


# ---------------------------------------------------------------------------------------------------------
# The guard itself, on a model built to be wrong: it predicts less toxicity for worse liver and kidneys


def confounded_member(enc):
    """Toxicity rises with dose but falls with bilirubin and creatinine-clearance loss (as a model fitted on
    logs where frail patients were given less would learn); response rises with dose."""
    from tests.test_dosing_policy import dose_and_zeta

    names = enc.feature_names_out_

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        dose, _ = dose_and_zeta(enc, x)
        bilirubin = x[:, names.index("bilirubin_umol_l")]  # standardised
        clearance = x[:, names.index("creatinine_clearance_ml_min")]
        toxicity = np.clip(0.004 * dose - 0.05 * bilirubin + 0.05 * clearance, 0, 1)
        return {"response": np.clip(0.01 * dose, 0, 1), "toxicity_grade3": toxicity}

    return predict


@pytest.fixture
def confounded(encoder):  # noqa: F811
    from tests.test_dosing_policy import policy as toy_policy

    return toy_policy(encoder, {"a": confounded_member(encoder)}, toxicity_ceiling=0.15)


def test_the_guard_caps_a_dose_the_model_would_raise_for_worse_bilirubin(confounded):
    fit = {"cycle": 1, "previous_cycle": None, "wearable_summary": None, "age_years": 45.0, "ecog": 0,
           "creatinine_clearance_ml_min": 100.0}  # best grades but for bilirubin
    normal, worse = record(**fit), record(**fit, bilirubin_umol_l=45.0)
    unguarded = [confounded._ranked(f, confounded._candidates(f, confounded.safety_limits(f)[0], [[]]), False)
                 for f in (records_frame([normal]), records_frame([worse]))]
    raw = [u.loc[u["rank"].idxmax(), "dose_mg_m2"] for u in unguarded]
    assert raw[1] > raw[0]  # the model alone would give the worse liver more
    base, guarded = confounded.recommend([normal, worse])
    assert guarded.dose_mg_m2 <= base.dose_mg_m2
    rule = next(r for r in guarded.rules if r.rule == "monotone-guard")
    assert rule.effect == f"dose capped at {base.dose_mg_m2:g} mg/m²"
    assert rule.reason.startswith(f"the same patient with bilirubin ≤ 20.5 µmol/L would be offered "
                                  f"{base.dose_mg_m2:g} mg/m²")


def test_a_missing_value_is_not_a_grade_the_hard_rule_decides_it(confounded):
    from shared.dosing_policy import better_versions, graded_frame

    unmeasured = record(bilirubin_umol_l=None)
    grades = confounded.tolerance_grades()
    versions = better_versions(graded_frame(records_frame([unmeasured]), grades), np.array([0]), grades, True,
                               np.array([33]))
    assert len(versions.frame) > 0 and versions.frame["bilirubin_umol_l"].isna().all()
    rec = confounded.recommend([unmeasured])[0]
    assert rec.dose_mg_m2 <= 45.0  # the label's 75 % for an unmeasured bilirubin, not the 50 % of the worst grade
    assert any(r.rule == "hepatic-reduction" and "not measured" in r.reason for r in rec.rules)


def test_versions_are_encoded_as_the_encoder_would_encode_them(confounded):
    from shared.dosing_policy import FORMULATION_FEATURES, _standardised_into, better_versions, graded_frame

    grades = confounded.tolerance_grades()
    frame = graded_frame(records_frame([record(bilirubin_umol_l=60.0, ecog=3, creatinine_clearance_ml_min=40.0)]),
                         grades)
    versions = better_versions(frame, np.array([0]), grades, True, np.array([33]))
    # grades at or better than the patient's: bilirubin 3 (60 → ≤ 102.5), ECOG 4, clearance 3 (40 → ≥ 30), age 3
    # (66 → ≤ 75), ANC 1, no toxicity 1, nadir 2 (1.18 → ≥ 1.0); the patient itself excluded
    assert len(versions.frame) == 3 * 4 * 3 * 3 * 2 - 1
    placeholders = {name: 0.0 for name in (*FORMULATION_FEATURES, "dose_mg_m2", "interval_days")}
    expected = confounded.encoder.transform(versions.frame.assign(**placeholders))
    columns = [g.column for g in versions.grades if g.column in confounded.encoder.means_]
    fast = _standardised_into(confounded.encoder, confounded._patients_x(frame)[versions.owner],
                              {c: versions.frame[c].to_numpy(dtype=float) for c in columns})
    np.testing.assert_allclose(fast, expected, atol=1e-6)


def test_a_patient_with_too_many_versions_to_check_gets_the_smallest_dose(confounded, monkeypatch):
    import shared.dosing_policy

    monkeypatch.setattr(shared.dosing_policy, "MAX_GUARD_CANDIDATES", 10)
    rec = confounded.recommend([record(ecog=3)])[0]
    assert rec.action == "give" and rec.dose_mg_m2 == 10.0
    assert "the smallest dose is offered and a clinician decides" in next(
        r.reason for r in rec.rules if r.rule == "monotone-guard")


def test_every_hard_rule_threshold_is_a_grade_limit_so_a_grade_meets_the_rules_alike(confounded):
    import dataclasses

    from shared.dosing_policy import SafetyRules

    limits = {g.column: g.limits for g in confounded.tolerance_grades()}
    assert {20.5, 51.0} <= set(limits["bilirubin_umol_l"]) and {1.0, 1.5} <= set(limits["anc_baseline_e9_l"])
    assert 0.5 in limits["previous_anc_nadir_e9_l"]
    moved = dataclasses.replace(confounded, safety=SafetyRules(hepatic_bands_umol_l=(25.0, 60.0)))
    assert {25.0, 60.0} <= set(next(g for g in moved.tolerance_grades() if g.column == "bilirubin_umol_l").limits)


def test_grades_are_represented_by_normal_values_and_midpoints():
    from shared.dosing_policy import TOLERANCE_GRADES

    bilirubin, clearance = TOLERANCE_GRADES[0], TOLERANCE_GRADES[1]
    assert list(bilirubin.values(bilirubin.levels(np.array([7.7, 20.5, 20.6, 68.4, np.nan])))) == pytest.approx(
        [10.0, 10.0, 35.75, 76.75, np.nan], nan_ok=True)
    assert list(clearance.values(clearance.levels(np.array([140.0, 82.8, 25.0])))) == [110.0, 75.0, 22.5]
