"""Summary of a patient's wearable readings over the last cycle: what the recommender reads.

The same summary is computed at the site from ``vitals.csv`` and carried in a patient record (see
``examples/patient.json``); only these few numbers, never the daily rows, enter a recommendation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# A temperature of 38.0 °C or more is fever in neutropenic patients (IDSA guideline, Freifeld et al.,
# Clin Infect Dis 2011;52:e56: single 38.3 °C, or 38.0 °C sustained over an hour).
FEVER_THRESHOLD_C = 38.0
SUMMARY_FIELDS = ("days_recorded", "fever_days", "max_temperature_c", "mean_heart_rate_bpm", "min_spo2_pct",
                  "mean_steps", "steps_change_pct")


def summarise_cycle(readings: pd.DataFrame) -> dict[str, float | int | None]:
    """Summary of one cycle's daily readings (columns of ``shared.schema.VITALS_COLUMNS``).

    ``steps_change_pct`` compares the second half of the cycle with the first (negative = less active).
    Missing readings are skipped; a summary of a cycle without readings holds ``None`` values.
    """
    days = readings.dropna(subset=["temperature_c", "heart_rate_bpm", "spo2_pct", "steps"], how="all")
    if days.empty:
        return {k: (0 if k in ("days_recorded", "fever_days") else None) for k in SUMMARY_FIELDS}
    steps = days["steps"].astype(float)
    half = days["day"].max() / 2
    first, second = steps[days["day"] <= half].mean(), steps[days["day"] > half].mean()
    change = 100.0 * (second - first) / first if first and np.isfinite(first) and np.isfinite(second) else None

    def value(x, digits):
        return None if pd.isna(x) else round(float(x), digits)

    return {
        "days_recorded": int(len(days)),
        "fever_days": int((days["temperature_c"] >= FEVER_THRESHOLD_C).sum()),
        "max_temperature_c": value(days["temperature_c"].max(), 2),
        "mean_heart_rate_bpm": value(days["heart_rate_bpm"].mean(), 1),
        "min_spo2_pct": value(days["spo2_pct"].min(), 1),
        "mean_steps": value(steps.mean(), 0),
        "steps_change_pct": value(change, 1),
    }
