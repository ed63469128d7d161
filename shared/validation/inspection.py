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
    decisions: pd.DataFrame | None = None


def site_config(folder: Path) -> tuple[dict[str, Any], list[Problem]]:
    """The folder's site.toml, read and checked ({} and no problem when there is none)."""
    site_file = folder / SITE_FILE
    if not _present(site_file):
        return {}, []
    outside = link_outside_folder(site_file, folder, SITE_FILE)
    return ({}, [outside]) if outside is not None else read_site_config(site_file)


def _present(path: Path) -> bool:
    """Whether a file (or a symbolic link, even a broken one) of that name is there."""
    return path.exists() or path.is_symlink()


def link_outside_folder(path: Path, folder: Path, label: str) -> Problem | None:
    """A problem if ``path`` is a symbolic link leading out of ``folder``.

    A site's files are what its folder holds: a link to a system file would have validation read (and,
    before the full texts were kept at the site, echo) a file nobody put there. Links within the folder
    are fine.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.is_relative_to(folder.resolve()):
        return None
    rule = "the file is a symbolic link to a place outside the site folder; refused — copy the file into it"
    return Problem("error", label, None, (), f"{rule} (the link leads to {target})", shareable_message=rule)


def site_name(config: dict[str, Any], folder: Path) -> str:
    name = section(config, "site").get("name")
    return name if isinstance(name, str) and name.strip() else folder.resolve().name


def read_declared(path: Path, label: str, declared: tuple[Column, ...], folder: Path | None,
                  problems: list[Problem]) -> tuple[CsvTable, pd.DataFrame] | None:
    """Read and parse one declared file, adding its problems; None if the file is absent or unreadable.

    ``folder`` is the site folder the file must not lead out of (``link_outside_folder``); None for a
    CSV file named directly.
    """
    outside = None if folder is None else link_outside_folder(path, folder, label)
    if outside is not None:
        problems.append(outside)
        return None
    if not _present(path):
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
