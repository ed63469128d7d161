"""Daily wearable readings over a cycle, driven by the latent toxicity state.

Per episode and day of the cycle: maximum temperature, mean resting heart rate, mean SpO2 and step count.
Drivers:
- febrile neutropenia around the neutrophil nadir (day ~10-14 after doxorubicin): fever occurs in a
  minority of grade 4 and few grade 3 nadirs (Kuderer et al., Cancer 2006;106:2258; Crawford et al., Cancer
  2004;100:228); temperature 38.3-39.5 °C on those days;
- heart rate rises ~10 beats/min per °C of fever (Liebermeister's rule; Karjalainen & Viitasalo, Acta Med
  Scand 1986;220:481);
- SpO2 falls slightly with fever/sepsis; activity falls with fever and with hand-foot syndrome (from the
  second week), and with performance status (ECOG);
- device noise, a per-clinic temperature bias, and missing stretches (device not worn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

BASE_TEMPERATURE_C = 36.6
FEVER_RISE_C = 2.0
HR_PER_DEGREE = 10.0
BASE_STEPS = 6500.0
STEPS_ECOG_FACTOR = 0.7  # each ECOG point ~30 % fewer steps (assumed)
MAX_DAYS_RECORDED = 28
# P(fever | nadir band): nadir < 0.5 (grade 4), < 1.0 (grade 3), otherwise background infections.
FEVER_PROBABILITY = ((0.5, 0.35), (1.0, 0.12), (np.inf, 0.02))


@dataclass(frozen=True)
class DeviceHabits:
    """How a clinic's patients wear their devices."""

    temperature_bias_c: float = 0.0
    gap_probability: float = 0.15  # chance an episode has a stretch without readings
    missing_reading_probability: float = 0.03


def fever_probability(nadir_anc: np.ndarray) -> np.ndarray:
    p = np.empty_like(nadir_anc, dtype=float)
    lower = -np.inf
    for upper, prob in FEVER_PROBABILITY:
        p[(nadir_anc >= lower) & (nadir_anc < upper)] = prob
        lower = upper
    return p


def simulate_vitals(rng: np.random.Generator, episode_id: np.ndarray, patient_id: np.ndarray,
                    interval_days: np.ndarray, nadir_anc: np.ndarray, ppe: np.ndarray, ecog: np.ndarray,
                    resting_hr: np.ndarray, habits: DeviceHabits) -> tuple[pd.DataFrame, np.ndarray]:
    """Readings for every episode and day; returns the table and the per-episode fever flag."""
    n = len(episode_id)
    days_per_episode = np.minimum(np.asarray(interval_days, dtype=int), MAX_DAYS_RECORDED)
    row_episode = np.repeat(np.arange(n), days_per_episode)
    starts = np.cumsum(days_per_episode) - days_per_episode
    day = np.arange(row_episode.size) - starts[row_episode]

    febrile = rng.random(n) < fever_probability(nadir_anc)
    nadir_day = np.rint(rng.uniform(10, 14, n)).astype(int)
    fever_days = febrile[row_episode] & (day >= nadir_day[row_episode] - 1) & (day <= nadir_day[row_episode] + 2)
    m = row_episode.size

    temperature = (BASE_TEMPERATURE_C + habits.temperature_bias_c + rng.normal(0, 0.25, m)
                   + fever_days * rng.uniform(0.6, 1.0, m) * FEVER_RISE_C)
    heart_rate = resting_hr[row_episode] + HR_PER_DEGREE * np.maximum(temperature - 37.0, 0) + rng.normal(0, 4, m)
    spo2 = np.minimum(97.5 - 1.5 * fever_days + rng.normal(0, 1.0, m), 100.0)
    ppe_days = ppe[row_episode] & (day >= 14)
    activity = np.exp(-1.0 * fever_days - 0.5 * ppe_days + rng.normal(0, 0.3, m))
    steps = BASE_STEPS * STEPS_ECOG_FACTOR ** ecog[row_episode] * activity

    # Missing stretches: one gap per affected episode, start uniform in the cycle, length 1-7 days.
    has_gap = rng.random(n) < habits.gap_probability
    gap_start = (rng.random(n) * days_per_episode).astype(int)
    gap_len = rng.integers(1, 8, n)
    gap_day = day - gap_start[row_episode]
    in_gap = has_gap[row_episode] & (gap_day >= 0) & (gap_day < gap_len[row_episode])
    values = {"temperature_c": temperature, "heart_rate_bpm": heart_rate, "spo2_pct": spo2, "steps": steps}
    for name, v in values.items():
        v[in_gap | (rng.random(m) < habits.missing_reading_probability)] = np.nan
        values[name] = v
    # Ids repeat on every day of an episode: categoricals avoid building millions of strings.
    patients, patient_of_episode = np.unique(patient_id, return_inverse=True)
    table = pd.DataFrame({
        "patient_id": pd.Categorical.from_codes(patient_of_episode[row_episode], categories=patients),
        "episode_id": pd.Categorical.from_codes(row_episode, categories=episode_id),
        "day": day,
        "temperature_c": np.round(values["temperature_c"], 2),
        "heart_rate_bpm": np.round(values["heart_rate_bpm"], 1),
        "spo2_pct": np.round(values["spo2_pct"], 1),
        "steps": pd.array(np.round(values["steps"]), dtype="Int64"),
    })
    return table, febrile
