"""What validating one site produces, and the steps every kind of site shares (site.toml, one declared file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from shared.schema import SITE_FILE, Column
from shared.task import TaskSpec
from shared.validation.columns import check_header, parse_table
from shared.validation.problems import Problem, ValidationReport, listed
from shared.validation.reading import CsvTable, read_csv_table
from shared.validation.site_config import read_site_config, section


@dataclass
class Inspection:
    """What validating a site produced: the report plus the parsed tables ``load_site`` hands out."""

    report: ValidationReport
    name: str
    config: dict[str, Any]
    task: TaskSpec
    episodes: pd.DataFrame | None = None
    vitals: pd.DataFrame | None = None
    episode_columns: tuple[Column, ...] = ()
    vitals_columns: tuple[Column, ...] = ()


def site_config(folder: Path) -> tuple[dict[str, Any], list[Problem]]:
    site_file = folder / SITE_FILE
    return read_site_config(site_file) if site_file.is_file() else ({}, [])


def site_name(config: dict[str, Any], folder: Path) -> str:
    name = section(config, "site").get("name")
    return name if isinstance(name, str) and name.strip() else folder.resolve().name


def read_declared(path: Path, label: str, declared: tuple[Column, ...],
                   problems: list[Problem]) -> tuple[CsvTable, pd.DataFrame] | None:
    """Read and parse one declared file, adding its problems; None if the file is absent or unreadable."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*") if p.suffix.lower() == ".csv")
        found = f"; found {listed(others)}" if others else ""
        counted = f"; found {len(others)} other .csv file{'' if len(others) == 1 else 's'}" if others else ""
        problems.append(Problem("error", label, None, (), f"the file is missing from {path.parent}{found}",
                                shareable_message=f"the file is missing from the site folder{counted}"))
        return None
    table, found = read_csv_table(path, label)
    problems += found
    if table is None:
        return None
    problems += check_header(table, declared)
    values, found = parse_table(table, declared)
    problems += found
    return table, values
