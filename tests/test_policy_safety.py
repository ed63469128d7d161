"""Safety inputs with gaps, decided as a clinician would (issue 14.7), and the dose in mg from a checked BSA (14.2).

The outcome models are the known functions of ``tests.test_dosing_policy`` (response and toxicity rise with
dose): the example patient (cycle 3, 40 mg/m² last cycle) gets 50 mg/m² (+25 %) when nothing else limits it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from client.fhir import fhir_resource
from shared.patient_record import records_frame
from tests.test_dosing_policy import encoder, policy, record  # noqa: F401  (encoder is a fixture)


def rule(recommendation, name: str):
    return next(r for r in recommendation.rules if r.rule == name)


# ---------------------------------------------------------------------------------------------------------
# A missing pre-cycle ANC


@pytest.mark.parametrize("wearable", [None, "calm"])
def test_no_anc_before_the_cycle_withholds_the_dose_with_the_reason(encoder, wearable):  # noqa: F811
    changes = {"anc_baseline_e9_l": None}
    if wearable is None:
        changes["wearable_summary"] = None
    held = policy(encoder).recommend([record(**changes)])[0]
    assert held.action == "withhold" and held.dose_mg_m2 == 0.0 and held.dose_mg == 0.0
    assert held.interval_days == 7
    assert rule(held, "neutropenia-hold").reason.startswith("ANC not measured before this cycle: no anthracycline "
                                                            "without a pre-cycle blood count")
    resource = fhir_resource(held)
    assert resource["status"] == "on-hold" and "doseAndRate" not in resource["dosageInstruction"][0]
    assert "ANC not measured" in resource["statusReason"]["text"]


def test_first_cycle_without_anc_is_withheld_too(encoder):  # noqa: F811
    held = policy(encoder).recommend([record(cycle=1, previous_cycle=None, wearable_summary=None,
                                             anc_baseline_e9_l=None)])[0]
    assert held.action == "withhold"


# ---------------------------------------------------------------------------------------------------------
# A low nadir last cycle


def test_grade4_nadir_last_cycle_reduces_the_dose_by_a_quarter(encoder):  # noqa: F811
    reduced = policy(encoder).recommend([record(**{"previous_cycle.anc_nadir_e9_l": 0.1,
                                                   "previous_cycle.toxicity_grade3": 1})])[0]
    assert reduced.dose_mg_m2 == 30.0  # 75 % of 40
    assert rule(reduced, "dose-change-limit").reason == ("ANC nadir 0.1 × 10⁹/L after 40 mg/m² in the previous "
                                                         "cycle: grade 4 neutropenia (label: resume 25% lower)")


def test_grade4_nadir_is_not_ignored_even_where_no_toxicity_was_flagged(encoder):  # noqa: F811
    # A record refuses this contradiction; a frame (the simulator's, a site's table) is still dosed safely.
    frame = records_frame([record()])
    frame.loc[0, "previous_anc_nadir_e9_l"] = 0.1
    out = policy(encoder).recommend_frame(frame)
    assert out.loc[0, "dose_mg_m2"] == 30.0
    grade3_nadir = records_frame([record()])
    grade3_nadir.loc[0, "previous_anc_nadir_e9_l"] = 0.7  # grade 3: the label redoses without reduction
    assert policy(encoder).recommend_frame(grade3_nadir).loc[0, "dose_mg_m2"] == 50.0


# ---------------------------------------------------------------------------------------------------------
# The absolute dose: from the checked BSA, capped at 2.0 m²


def test_dose_in_mg_is_dose_per_m2_times_the_checked_bsa(encoder):  # noqa: F811
    small = record(weight_kg=25.0, height_cm=100.0, bsa_m2=0.833)  # issue 14.2's patient, with their true BSA
    rec = policy(encoder).recommend([small])[0]
    assert rec.bsa_m2 == 0.833 and rec.dose_mg == pytest.approx(round(rec.dose_mg_m2 * 0.833, 1))
    dosage = fhir_resource(rec)["dosageInstruction"][0]
    assert dosage["doseAndRate"][0]["doseQuantity"]["value"] == rec.dose_mg
    assert dosage["text"].startswith(f"{rec.dose_mg_m2:g} mg/m² × 0.83 m² BSA = {rec.dose_mg:g} mg")


def test_bsa_above_two_square_metres_is_capped_with_the_rule_shown(encoder):  # noqa: F811
    large = record(weight_kg=130.0, height_cm=190.0, bsa_m2=round(math.sqrt(190 * 130 / 3600), 3))  # 2.619 m²
    rec = policy(encoder).recommend([large])[0]
    assert rec.action == "give" and rec.bsa_m2 == 2.0
    assert rec.dose_mg == pytest.approx(rec.dose_mg_m2 * 2.0)
    assert rule(rec, "bsa-cap").effect == "absolute dose computed on 2 m², not 2.619 m²"
    assert "× 2.00 m² capped BSA" in fhir_resource(rec)["dosageInstruction"][0]["text"]
    held = policy(encoder).recommend([record(weight_kg=130.0, height_cm=190.0, bsa_m2=2.619,
                                             anc_baseline_e9_l=0.5)])[0]
    assert held.action == "withhold" and "bsa-cap" not in {r.rule for r in held.rules}


def test_every_record_gets_a_rule_or_a_normal_value_for_each_safety_input(encoder):  # noqa: F811
    # Any gap in what the safety rules read is either refused by the record or named by a rule here.
    gaps = [record(bilirubin_umol_l=None), record(anc_baseline_e9_l=None), record(wearable_summary=None),
            record(**{"previous_cycle.anc_nadir_e9_l": None})]
    results = policy(encoder).recommend(gaps)
    assert "hepatic-reduction" in {r.rule for r in results[0].rules}
    assert results[1].action == "withhold"
    assert results[2].action == "give" and results[3].action == "give"  # fever unknown: ANC 3.95 is not low
    assert np.all([r.dose_mg_m2 <= 50.0 for r in results])
