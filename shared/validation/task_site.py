"""A generic tabular task's site: one CSV file described by a task spec, with its target checks and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from shared.schema import Column
from shared.task import SPLITS, TaskSpec
from shared.validation.inspection import Inspection, read_declared, site_config, site_name
from shared.validation.problems import MAX_LISTED, Problem, ValidationReport, echo, listed, public_problem
from shared.validation.reading import CsvTable


def task_columns(task: TaskSpec) -> tuple[Column, ...]:
    """The columns a generic task's table must hold, declared like the nanoparticle schema."""
    columns: list[Column] = []
    for outcome in task.outcomes:
        if outcome.kind == "regression":
            columns.append(Column(outcome.name, "float", "-", "regression target",
                                  *task.ranges.get(outcome.name, (None, None))))
        else:
            columns.append(Column(outcome.name, "str", "-", f"{outcome.kind} target"))
    columns += [Column(name, "float", "-", "numeric feature", *task.ranges.get(name, (None, None)),
                       nullable=True) for name in task.numeric]
    columns += [Column(name, "str", "-", "categorical feature", nullable=True) for name in task.categorical]
    if task.split is not None:
        columns.append(Column(task.split, "category", "-", "train / val / test split", categories=SPLITS))
    if task.group is not None:
        columns.append(Column(task.group, "str", "-", "group id (never straddles splits)"))
    first_of_each_name: dict[str, Column] = {}
    for column in columns:
        first_of_each_name.setdefault(column.name, column)
    return tuple(first_of_each_name.values())


def _task_csv(path: Path) -> tuple[Path | None, str, list[Problem]]:
    """The one CSV file of a generic task site, its label for messages, and why none could be chosen."""
    if path.is_file():
        return path, str(path), []
    if not path.exists():
        return None, str(path), [public_problem("error", str(path), "the site path does not exist; expected a "
                                                                   "CSV file or a folder holding one")]
    csvs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if len(csvs) == 1:
        return csvs[0], csvs[0].name, []
    found = "none" if not csvs else listed([p.name for p in csvs])
    rule = "expected exactly one .csv file in the folder"
    return None, str(path), [Problem("error", str(path), None, (), f"{rule}; found {found}",
                                     shareable_message=f"{rule}; found {len(csvs)}")]


def inspect_task_site(path: Path, task: TaskSpec) -> Inspection:
    inspection = Inspection(ValidationReport(path), path.stem, {}, task)
    problems = inspection.report.problems
    csv_path, label, found = _task_csv(path)
    problems += found
    if path.is_dir():
        inspection.config, found = site_config(path)
        problems += found
        inspection.name = site_name(inspection.config, path)
    if csv_path is not None:
        declared = task_columns(task)
        parsed = read_declared(csv_path, label, declared, path if path.is_dir() else None, problems)
        if parsed is not None:
            table, values = parsed
            problems += _target_problems(table, values, task)
            inspection.episodes, inspection.episode_columns = values, declared
    inspection.report.summary = _task_summary(inspection)
    return inspection


def _target_problems(table: CsvTable, values: pd.DataFrame, task: TaskSpec) -> list[Problem]:
    """A binary target has at most 2 classes; any classifier target needs 2 classes to learn from."""
    problems = []
    for outcome in task.outcomes:
        if outcome.kind == "regression" or outcome.name not in values:
            continue
        counts = values[outcome.name].value_counts(sort=True)
        if outcome.kind == "binary" and len(counts) > 2:
            extra = values[outcome.name].isin(counts.index[2:])
            listing = listed([f"{echo(v)!r} ({n} row{'' if n == 1 else 's'})"
                              for v, n in counts.head(MAX_LISTED).items()], total=len(counts))
            rule = f"a binary target holds at most 2 distinct values; got {len(counts)}"
            problems.append(table.problem(outcome.name, extra, f"{rule}: {listing}", shareable=rule))
        elif len(counts) == 1:
            consequence = "this site alone cannot train a classifier"
            problems.append(Problem("warning", table.file, outcome.name, (),
                                    f"only one class present ({echo(counts.index[0])!r}); {consequence}",
                                    shareable_message=f"only one class present; {consequence}"))
    return problems


def _task_summary(inspection: Inspection) -> dict[str, Any]:
    task, table = inspection.task, inspection.episodes
    summary: dict[str, Any] = {"site": inspection.name}
    if table is None:
        return summary
    summary["n_rows"] = len(table)
    for outcome in task.outcomes:
        if outcome.name not in table:
            continue
        if outcome.kind == "regression":
            summary[f"{outcome.name}_mean"] = float(table[outcome.name].mean())
        else:
            summary[f"{outcome.name}_counts"] = {str(k): int(v) for k, v in
                                                 table[outcome.name].value_counts().sort_index().items()}
    if task.split is not None and task.split in table:
        summary["split_counts"] = {s: int((table[task.split] == s).sum()) for s in SPLITS}
    return summary
