"""Checks of vitals.csv against episodes.csv: every reading belongs to a known patient and one of their episodes."""

from __future__ import annotations

from typing import Any

import pandas as pd

from shared.schema import EPISODES_FILE
from shared.validation.columns import sample
from shared.validation.problems import MAX_LISTED, Problem, echo, listed
from shared.validation.reading import CsvTable


def vitals_without_episodes(table: CsvTable, vitals: pd.DataFrame, episodes: pd.DataFrame) -> list[Problem]:
    """Every vitals row must belong to a patient in episodes.csv, and to one of that patient's episodes."""
    patients = set(episodes["patient_id"].dropna())
    owner = episodes[["episode_id", "patient_id"]].dropna(subset=["episode_id"]).drop_duplicates("episode_id")
    owner = owner.set_index("episode_id")
    owner_of = owner["patient_id"]
    problems = []
    unknown_patient = vitals["patient_id"].notna() & ~vitals["patient_id"].isin(patients)
    if unknown_patient.any():
        unknown_ids = vitals["patient_id"][unknown_patient]
        n = unknown_ids.nunique()
        problems.append(table.problem("patient_id", unknown_patient,
                                      f"patient not found in {EPISODES_FILE}: {sample(unknown_ids, quote=True)}",
                                      shareable=f"patient not found in {EPISODES_FILE} "
                                                f"({n} patient id{'' if n == 1 else 's'})"))
    known = vitals["patient_id"].notna() & ~unknown_patient & vitals["episode_id"].notna()
    episode_owner = vitals["episode_id"].map(owner_of)
    wrong_episode = known & (episode_owner != vitals["patient_id"])
    if wrong_episode.any():
        pairs = vitals.loc[wrong_episode, ["episode_id", "patient_id"]].drop_duplicates()
        detail = [_episode_mismatch(episode, patient, episode_owner[r])
                  for r, episode, patient in pairs.head(MAX_LISTED).itertuples()]
        rule = f"expected an episode of the row's patient in {EPISODES_FILE}"
        absent = int((wrong_episode & episode_owner.isna()).sum())
        counts = {"another patient's episode": int(wrong_episode.sum()) - absent,
                  f"an episode absent from {EPISODES_FILE}": absent}
        shared = ", ".join(f"{n} row{'' if n == 1 else 's'} with {what}" for what, n in counts.items() if n)
        problems.append(table.problem("episode_id", wrong_episode,
                                      f"{rule}; got " + listed(detail, sep="; ", total=len(pairs)),
                                      shareable=f"{rule}; {shared}"))
    return problems


def _episode_mismatch(episode: str, patient: str, owner: Any) -> str:
    if isinstance(owner, str):
        return f"{echo(episode)!r} for patient {echo(patient)!r} (it belongs to {echo(owner)!r})"
    return f"{echo(episode)!r} for patient {echo(patient)!r} (no such episode)"


def vitals_cross_checks(vitals: tuple[CsvTable, pd.DataFrame],
                         episodes: tuple[CsvTable, pd.DataFrame] | None) -> list[Problem]:
    """Vitals references, checked only when both id columns of both files were read completely."""
    ids = ("patient_id", "episode_id")
    if episodes is None or episodes[0].dropped_rows:  # ids on dropped rows are unread, not absent
        return []
    if not all(c in frame for c in ids for frame in (vitals[1], episodes[1])):
        return []
    return vitals_without_episodes(vitals[0], vitals[1], episodes[1])
