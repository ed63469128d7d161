"""The entry points: ``validate_site`` and ``load_site`` for a site folder (or a task CSV), and ``SiteData``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from shared.schema import (
    DECISION_COLUMNS,
    DECISIONS_FILE,
    EPISODE_COLUMNS,
    EPISODES_FILE,
    SCHEMA_VERSION,
    VITALS_COLUMNS,
    VITALS_FILE,
    Column,
)
from shared.task import NANOPARTICLE_TASK, TaskSpec
from shared.validation.decisions import decision_checks
from shared.validation.episodes import episode_cross_checks
from shared.validation.inspection import Inspection, read_declared, site_config, site_name
from shared.validation.problems import SiteDataError, ValidationReport, public_problem
from shared.validation.site_config import section
from shared.validation.task_site import inspect_task_site
from shared.validation.vitals import vitals_cross_checks


@dataclass
class SiteData:
    """A validated site: typed tables plus its site.toml settings.

    ``episodes`` holds the task table for a generic task. Numeric columns are float (int for integer and
    0/1 columns that may not be missing) with NaN for missing cells; text and category columns are str.
    ``decisions`` is the telemedicine service's log of its randomised recommendations (None: no log kept).
    ``report`` is the validation that passed (its summary and warnings), so a caller that needs both the
    tables and the report validates once.
    """

    name: str
    path: Path
    episodes: pd.DataFrame
    vitals: pd.DataFrame | None
    config: dict[str, Any]
    task: TaskSpec
    decisions: pd.DataFrame | None = None  # decisions.csv (``shared.schema.DECISION_COLUMNS``), where kept
    report: ValidationReport | None = None


def validate_site(path: str | Path, task: TaskSpec | None = None) -> ValidationReport:
    """Validate a site without changing it; never raises on bad data.

    Parameters
    ----------
    path : str or Path
        Site folder (episodes.csv, optional vitals.csv, decisions.csv and site.toml) for the built-in task;
        for a generic task, one CSV file or a folder holding exactly one CSV file (and optionally site.toml).
    task : TaskSpec or None, default None
        None (or ``NANOPARTICLE_TASK``) for the built-in contract of ``shared.schema``.
    """
    return _inspect(Path(path), task).report


def load_site(path: str | Path, task: TaskSpec | None = None) -> SiteData:
    """Validate a site, then return its typed tables; raises ``SiteDataError`` (with the report) on errors."""
    inspection = _inspect(Path(path), task)
    if not inspection.report.ok or inspection.episodes is None:
        raise SiteDataError(inspection.report)
    episodes = _numeric_class_labels(_typed(inspection.episodes, inspection.episode_columns), inspection.task)
    vitals = None if inspection.vitals is None else _typed(inspection.vitals, inspection.vitals_columns)
    decisions = None if inspection.decisions is None else _typed(inspection.decisions, DECISION_COLUMNS)
    return SiteData(inspection.name, Path(path), episodes, vitals, inspection.config, inspection.task, decisions,
                    inspection.report)


def _inspect(path: Path, task: TaskSpec | None) -> Inspection:
    if task is None or task == NANOPARTICLE_TASK:
        return _inspect_nanoparticle_site(path)
    return inspect_task_site(path, task)


def _inspect_nanoparticle_site(folder: Path) -> Inspection:
    inspection = Inspection(ValidationReport(folder), folder.name, {}, NANOPARTICLE_TASK)
    problems = inspection.report.problems
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        problems.append(public_problem("error", str(folder),
                                       f"the site path {what}; expected a folder holding {EPISODES_FILE}"))
        return inspection
    inspection.config, found = site_config(folder)
    problems += found
    inspection.name = site_name(inspection.config, folder)
    episodes_table = read_declared(folder / EPISODES_FILE, EPISODES_FILE, EPISODE_COLUMNS, folder, problems)
    vitals_table = None
    if (folder / VITALS_FILE).exists() or (folder / VITALS_FILE).is_symlink():
        vitals_table = read_declared(folder / VITALS_FILE, VITALS_FILE, VITALS_COLUMNS, folder, problems)
    if episodes_table is not None:
        inspection.episodes, inspection.episode_columns = episodes_table[1], EPISODE_COLUMNS
        problems += episode_cross_checks(*episodes_table)
    if vitals_table is not None:
        inspection.vitals, inspection.vitals_columns = vitals_table[1], VITALS_COLUMNS
        problems += vitals_cross_checks(vitals_table, episodes_table)
    if (folder / DECISIONS_FILE).exists() or (folder / DECISIONS_FILE).is_symlink():
        decisions_table = read_declared(folder / DECISIONS_FILE, DECISIONS_FILE, DECISION_COLUMNS, folder, problems)
        if decisions_table is not None:
            inspection.decisions = decisions_table[1]
            problems += decision_checks(*decisions_table)
    inspection.report.summary = _nanoparticle_summary(inspection)
    return inspection


def _nanoparticle_summary(inspection: Inspection) -> dict[str, Any]:
    version = section(inspection.config, "site").get("schema_version", SCHEMA_VERSION)
    summary: dict[str, Any] = {"site": inspection.name, "schema_version": version}
    episodes = inspection.episodes
    if episodes is not None:
        summary["n_episodes"] = len(episodes)
        for key, column in (("n_patients", "patient_id"), ("n_formulations", "formulation_id")):
            if column in episodes:
                summary[key] = int(episodes[column].nunique())
        for outcome in ("response", "toxicity_grade3"):
            if outcome in episodes and episodes[outcome].notna().any():
                summary[f"{outcome}_rate"] = float(episodes[outcome].mean())
        if "efficacy_pct" in episodes and episodes["efficacy_pct"].notna().any():
            summary["efficacy_pct_mean"] = float(episodes["efficacy_pct"].mean())
    if inspection.vitals is not None:
        summary["n_vitals"] = len(inspection.vitals)
    privacy = section(inspection.config, "privacy")
    if privacy.get("dp"):
        summary["privacy"] = f"DP, epsilon {privacy.get('epsilon')}, delta {privacy.get('delta')}"
    return summary


def _typed(values: pd.DataFrame, declared: tuple[Column, ...]) -> pd.DataFrame:
    """Columns in declared order: float with NaN, int where no cell may be missing, str for text.

    The parsed arrays are reused, not copied (text cells are already str or NaN), so loading a site costs
    little more memory than validating it.
    """
    typed = {}
    for column in declared:
        cells = values[column.name].to_numpy()
        if column.dtype in ("int", "bool") and not column.nullable:
            typed[column.name] = cells.astype("int64")
        elif column.is_numeric:
            typed[column.name] = cells.astype(float, copy=False)
        else:
            typed[column.name] = cells
    return pd.DataFrame(typed, index=pd.RangeIndex(len(values)), copy=False)


def _numeric_class_labels(table: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """A classifier target whose labels are all numbers (0/1, 1/2/3) becomes numeric; text labels stay str."""
    for outcome in task.outcomes:
        if outcome.kind == "regression" or outcome.name not in table or table.empty:
            continue
        if pd.api.types.is_numeric_dtype(table[outcome.name]):  # declared numeric already
            continue
        numbers = pd.to_numeric(table[outcome.name], errors="coerce")
        if numbers.notna().all():
            table[outcome.name] = numbers.astype("int64") if (numbers % 1 == 0).all() else numbers
    return table
