"""Writes ``examples/patient.json``: one simulated patient as the recommender takes it.

    python -m simulation.example_patient > examples/patient.json

The record is a patient at the start of a later cycle: covariates, cycle number, cumulative dose, the
previous cycle's treatment and outcome, the summary of that cycle's wearable readings and the site's
formulation catalogue. ``tests/test_simulator.py`` checks that the committed file is what this writes.
"""

from __future__ import annotations

import json

from shared.wearables import summarise_cycle
from simulation.clinics import make_world, simulate_clinic

COVARIATES = ("age_years", "sex", "weight_kg", "height_cm", "bsa_m2", "bilirubin_umol_l",
              "creatinine_clearance_ml_min", "anc_baseline_e9_l", "ecog", "tumour_type", "tumour_burden_mm",
              "cumulative_dose_mg_m2")


def example_record(seed: int = 3) -> dict:
    """The first patient of the largest clinic with three recorded cycles, at the start of cycle 3."""
    world = make_world(3, seed)
    clinic = max(world.clinics, key=lambda c: c.n_patients)
    episodes, vitals = simulate_clinic(world, clinic)
    complete = episodes.dropna()
    counts = complete.groupby("patient_id")["cycle"].max()
    patient = counts[counts >= 3].index[0]
    rows = complete[complete["patient_id"] == patient].set_index("cycle")
    now, before = rows.loc[3], rows.loc[2]
    record = {"patient_id": "example-001", "cycle": 3}
    record.update({k: (now[k].item() if hasattr(now[k], "item") else now[k]) for k in COVARIATES})
    record["previous_cycle"] = {
        "formulation_id": before["formulation_id"],
        "dose_mg_m2": float(before["dose_mg_m2"]),
        "interval_days": int(before["interval_days"]),
        "efficacy_pct": float(before["efficacy_pct"]),
        "toxicity_grade3": int(before["toxicity_grade3"]),
        "anc_nadir_e9_l": float(before["anc_nadir_e9_l"]),
    }
    record["wearable_summary"] = summarise_cycle(vitals[vitals["episode_id"] == before["episode_id"]])
    record["catalogue"] = sorted(episodes["formulation_id"].unique().tolist())
    record["source"] = f"simulated: world seed {seed}, {clinic.name}; python -m simulation.example_patient"
    return record


if __name__ == "__main__":
    print(json.dumps(example_record(), indent=2))
