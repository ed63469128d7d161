"""The structured policy's monotone guard: no input that means the patient tolerates the drug worse raises its dose.

The same generated patients and worse copies as the ensemble's test (:mod:`tests.test_policy_safety_monotone`),
against a structured policy fitted on simulated clinics' logs. The fitted models are not monotone themselves
(measured on the make-run world, seed 0: 26 of 1,364 worse copies got a higher dose without the guard), so the
test also checks that the unguarded policy does violate it here — a guard test that cannot fail proves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.patient_record import PatientRecord, records_frame
from shared.structured_policy import GRADED_INPUTS, StructuredDosingPolicy, catalogue_of, fit_structured_policy
from shared.task import NANOPARTICLE_TASK, assign_split
from simulation.clinics import make_world, simulate_clinic
from tests.test_policy_safety_monotone import violations

EXAMPLE = Path(__file__).parents[1] / "examples" / "patient.json"


@pytest.fixture(scope="module")
def policy() -> StructuredDosingPolicy:
    """Fitted on the training split of the make-run world's 5 clinics (seed 0)."""
    world = make_world(5, 0)
    frames = []
    for clinic in world.clinics:
        episodes, _ = simulate_clinic(world, clinic)
        frames.append(episodes[assign_split(episodes, NANOPARTICLE_TASK, 42) == "train"])
    return fit_structured_policy(frames, catalogue_of(pd.concat(frames)))


def test_worse_organ_function_never_raises_the_structured_dose(policy):
    compared, found = violations(policy, n=60, seed=5)
    assert compared > 400
    assert found == [], f"{len(found)} of {compared}: {found[:5]}"


def test_without_the_guard_these_models_would_raise_the_dose_of_worse_patients(policy, monkeypatch):
    monkeypatch.setattr(StructuredDosingPolicy, "_monotone_guard",
                        lambda self, graded, grades, verdict, candidates, chosen, rules: chosen)
    _, found = violations(policy, n=150, seed=5)
    assert len(found) >= 3


@pytest.mark.slow
def test_worse_organ_function_never_raises_the_structured_dose_many_patients(policy):
    compared, found = violations(policy, n=400, seed=11)
    assert found == [], f"{len(found)} of {compared}: {found[:5]}"


def test_a_capped_dose_says_which_better_patient_set_the_cap(policy):
    from tests.test_policy_safety_monotone import generated_patient, worse_copies

    rng = np.random.default_rng(5)
    known = sorted(policy.formulations)
    records = []
    for i in range(60):
        base = generated_patient(rng, i, known)
        records += [PatientRecord.model_validate(base | change) for change in worse_copies(rng, base).values()]
    capped = [(rec, rule) for rec in policy.recommend(records) for rule in rec.rules if rule.rule == "monotone-guard"]
    assert capped, "no generated patient had its dose capped by the guard"
    for rec, rule in capped:
        assert rule.effect == f"dose capped at {rec.dose_mg_m2:g} mg/m²"
        assert rule.reason.startswith("the same patient with ")
        assert rule.reason.endswith("worse organ function or tolerance never raises the dose")


def test_inputs_the_policy_does_not_grade_change_nothing(policy):
    """Creatinine clearance is read by neither the models nor the hard rules (GRADED_INPUTS' claim)."""
    assert "creatinine_clearance_ml_min" not in GRADED_INPUTS
    example = json.loads(EXAMPLE.read_text()) | {"catalogue": sorted(policy.formulations)[:3]}
    records = [PatientRecord.model_validate(example | {"creatinine_clearance_ml_min": c}) for c in (130, 60, 20, 8)]
    table = policy.recommend_frame(records_frame(records))
    assert table["dose_mg_m2"].nunique() == 1 and table["formulation_id"].nunique() == 1
