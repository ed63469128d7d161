"""The telemedicine service's decision log, ``decisions.csv`` in the site folder: what it could have recommended.

Each decision (a patient's cycle) is written as every option the service drew from with its probability and
which one it recommended (:data:`shared.schema.DECISION_COLUMNS`; the options from
:meth:`shared.exploration.Exploration.options`). A service that explores nothing logs one option with
probability 1. The log never leaves the site: the site's off-policy estimate reads it
(:func:`client.ope.site_value_sums`) to divide by the exact probability of what was given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared.schema import DECISION_COLUMNS, DECISIONS_FILE

COLUMNS = [c.name for c in DECISION_COLUMNS]


def decision_rows(records: pd.DataFrame, options: pd.DataFrame, version: int | None) -> pd.DataFrame:
    """The log rows of ``options`` (``shared.exploration.OPTION_COLUMNS`` with ``chosen``; ``row`` indexes
    ``records``, which hold patient_id and cycle) for the policy ``version`` served (None: standard of care)."""
    records = records.reset_index(drop=True)
    rows = options["row"].to_numpy(dtype=int)
    return pd.DataFrame({
        "patient_id": records["patient_id"].to_numpy()[rows],
        "cycle": records["cycle"].to_numpy(dtype=int)[rows],
        "policy_version": pd.array([version] * len(options), dtype="Int64"),
        "formulation_id": options["formulation_id"].astype(str).to_numpy(),
        "dose_mg_m2": options["dose_mg_m2"].to_numpy(dtype=float),
        "interval_days": np.rint(options["interval_days"].to_numpy(dtype=float)).astype(int),
        "probability": np.round(options["probability"].to_numpy(dtype=float), 9),
        "chosen": options["chosen"].to_numpy(dtype=bool).astype(int)})[COLUMNS]


def append_decisions(site: Path, rows: pd.DataFrame) -> None:
    """Append ``rows`` to the site's ``decisions.csv`` (created with its header when absent)."""
    path = Path(site) / DECISIONS_FILE
    rows[COLUMNS].to_csv(path, mode="a", header=not path.exists(), index=False, float_format="%.9g")


def logged_probability(decisions: pd.DataFrame | None, cycles: pd.DataFrame, formulation: np.ndarray,
                       dose: np.ndarray, width: float) -> np.ndarray:
    """For each of ``cycles`` (rows with patient_id and cycle): the logged probability that the service
    recommended ``formulation`` at a dose within ``width``/2 of ``dose`` (the off-policy kernel's match); NaN
    where the log holds no decision for that patient's cycle."""
    out = np.full(len(cycles), np.nan)
    if decisions is None or decisions.empty or not len(cycles):
        return out
    key = pd.MultiIndex.from_arrays([cycles["patient_id"].astype(str).to_numpy(),
                                     cycles["cycle"].to_numpy(dtype=int)])
    logged = decisions.assign(patient_id=decisions["patient_id"].astype(str),
                              cycle=decisions["cycle"].astype(int))
    position = pd.Series(np.arange(len(cycles)), index=key)
    position = position[~position.index.duplicated()]
    at = position.reindex(pd.MultiIndex.from_frame(logged[["patient_id", "cycle"]])).to_numpy()
    known = ~np.isnan(at)
    logged, at = logged[known], at[known].astype(int)
    out[np.unique(at)] = 0.0
    match = (logged["formulation_id"].astype(str).to_numpy() == np.asarray(formulation, dtype=str)[at]) \
        & (np.abs(logged["dose_mg_m2"].to_numpy(dtype=float) - np.asarray(dose, dtype=float)[at])
           <= width / 2 + 1e-9)
    np.add.at(out, at[match], logged["probability"].to_numpy(dtype=float)[match])
    return out


def own_practice(cycles: pd.DataFrame, decisions: pd.DataFrame | None) -> pd.DataFrame:
    """The ``cycles`` (rows with patient_id and cycle) the site decided by its own practice: those with no
    logged decision, and those whose logged decision was standard of care without randomisation (one option,
    no policy version). A cycle a served policy or an exploration draw decided is not the site's practice, so
    its standard of care (``client.site_gate.UsualFormulations``) is learned without it; all of ``cycles``
    when none is left."""
    if decisions is None or decisions.empty or cycles.empty:
        return cycles
    key = ["patient_id", "cycle"]
    logged = decisions.assign(patient_id=decisions["patient_id"].astype(str), cycle=decisions["cycle"].astype(int))
    per = logged.groupby(key).agg(options=("probability", "size"), policy=("policy_version", "count"))
    own = per[(per["options"] == 1) & (per["policy"] == 0)].index
    index = pd.MultiIndex.from_arrays([cycles["patient_id"].astype(str).to_numpy(),
                                       cycles["cycle"].to_numpy(dtype=int)], names=key)
    kept = cycles[~index.isin(per.index) | index.isin(own)]
    return kept if len(kept) else cycles
