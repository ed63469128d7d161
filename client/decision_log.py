"""The telemedicine service's decision log, ``decisions.csv`` in the site folder: what it could have recommended.

Each decision (a patient's cycle) is written as every option the service drew from with its probability and
which one it recommended (:data:`shared.schema.DECISION_COLUMNS`; the options from
:meth:`shared.exploration.Exploration.options`). A service that explores nothing logs one option with
probability 1. The log never leaves the site: the site's off-policy estimate reads it
(:func:`client.ope.site_value_sums`) to divide by the exact probability of what was given.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from client.site_gate import SITE_GATE_RULE
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


class DecisionLog:
    """The decision log of a deployed telemedicine service (``fednano serve --site``, ``fednano recommend
    --site``): each dose it recommends, one option with probability 1 (it explores nothing), under the served
    policy's version, or none where the site gate made it serve standard of care (``client.site_gate``: that
    is the site's own practice, :func:`own_practice`). With it the site's next off-policy estimate values a
    candidate that agrees with the served policy on exact weights (:func:`client.ope.dr_gamma`), and its
    standard of care is learned from its own practice only. A withheld or stopped cycle is not a dose and is
    not logged (as in the simulated clinics).

    A patient's cycle asked about again (a corrected record, another look) replaces its earlier decision:
    the log keeps one decision per (patient_id, cycle), as the data contract requires, and the file is
    rewritten atomically. A log the service cannot read or write is left untouched and the recommendation is
    still answered: logging never stands between a clinician and an answer; ``problem`` says what went wrong
    (``/health`` reports it), naming the file, never a patient."""

    def __init__(self, site: Path) -> None:
        self.path = Path(site) / DECISIONS_FILE
        self.problem: str | None = None
        self._lock = threading.Lock()

    def record(self, records: Sequence, recommendations: Sequence) -> int:
        """Log the dose decisions among ``recommendations`` (aligned with the ``records``,
        :class:`shared.patient_record.PatientRecord`s); returns how many were written (0 on a problem)."""
        rows = [{"patient_id": str(record.patient_id), "cycle": int(record.cycle),
                 "policy_version": None if any(r.rule == SITE_GATE_RULE for r in rec.rules) else rec.policy_version,
                 "formulation_id": rec.formulation_id, "dose_mg_m2": float(rec.dose_mg_m2),
                 "interval_days": int(rec.interval_days), "probability": 1.0, "chosen": 1}
                for record, rec in zip(records, recommendations, strict=True)
                if rec.action == "give" and rec.formulation_id is not None]
        if not rows:
            return 0
        new = pd.DataFrame(rows, columns=COLUMNS).drop_duplicates(["patient_id", "cycle"], keep="last")
        new["policy_version"] = pd.array(new["policy_version"], dtype="Int64")
        with self._lock:
            try:
                self._write(new)
            except (OSError, ValueError, pd.errors.ParserError) as err:
                self.problem = (f"{self.path}: the decision log could not be updated ({type(err).__name__}); "
                                "recommendations are answered but not logged until it is fixed (`fednano "
                                f"validate {self.path.parent}` names the column and rows of a damaged file)")
                logging.getLogger(__name__).warning(self.problem)
                return 0
        self.problem = None
        return len(new)

    def _write(self, new: pd.DataFrame) -> None:
        if self.path.exists():
            old = pd.read_csv(self.path, dtype={"patient_id": str})
            if list(old.columns) != COLUMNS:
                raise ValueError("unexpected columns")
            old["policy_version"] = pd.array(old["policy_version"], dtype="Int64")
            key = pd.MultiIndex.from_frame(old[["patient_id", "cycle"]].astype({"cycle": int}))
            replaced = key.isin(pd.MultiIndex.from_frame(new[["patient_id", "cycle"]]))
            new = pd.concat([old[~replaced], new], ignore_index=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".decisions-", suffix=".csv")
        try:
            with os.fdopen(handle, "w", newline="") as out:
                new[COLUMNS].to_csv(out, index=False, float_format="%.9g")
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


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
