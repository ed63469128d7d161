"""Findings about site files and the report gathering them: ``Problem``, ``ValidationReport``, ``SiteDataError``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning"]


MAX_LISTED = 5
"""How many row numbers or values a message lists before saying "and N more"."""

MAX_ECHO_CHARS = 40
"""Longest piece of file text (a cell, a column name) quoted whole in a message; longer ones are cut."""


@dataclass(frozen=True)
class Problem:
    """One finding about a site file.

    Parameters
    ----------
    severity : {"error", "warning"}
        Errors stop the site from being used; warnings do not.
    file : str
        File name as given (``"episodes.csv"``, or the CSV's path for a single-file task site).
    column : str or None
        Column the finding is about, if any.
    rows : tuple of int
        1-based data-row numbers (header excluded).
    message : str
        What is wrong and what was expected.
    lines : tuple of int, default ()
        1-based physical line numbers in the file (of ``rows``, or on their own for file-level findings).
    """

    severity: Severity
    file: str
    column: str | None
    rows: tuple[int, ...]
    message: str
    lines: tuple[int, ...] = ()

    def __str__(self) -> str:
        where = [self.file]
        if self.column is not None:
            where.append(f"column {self.column!r}")
        if self.rows:
            text = f"{_plural('row', self.rows)} {listed(self.rows)}"
            if self.lines:
                text += f" ({_plural('line', self.lines)} {listed(self.lines, more='…')})"
            where.append(text)
        elif self.lines:
            where.append(f"{_plural('line', self.lines)} {listed(self.lines)}")
        return ", ".join(where) + ": " + self.message


def _plural(word: str, items: tuple[int, ...]) -> str:
    return word if len(items) == 1 else word + "s"


def listed(items: tuple[Any, ...] | list[Any], more: str | None = None, sep: str = ", ",
           total: int | None = None) -> str:
    """The first ``MAX_LISTED`` items joined by ``sep``, then "and N more" (or ``more``).

    ``total`` is the number of items in all when ``items`` holds only the first ones (so a long list need
    not be built to say how many there are).
    """
    shown = sep.join(str(i) for i in items[:MAX_LISTED])
    hidden = (len(items) if total is None else total) - MAX_LISTED
    if hidden <= 0:
        return shown
    return f"{shown}{sep}{more}" if more else f"{shown} and {hidden} more"


def echo(text: str) -> str:
    """A piece of file text as quoted in a message: cut to ``MAX_ECHO_CHARS`` characters."""
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 1] + "…"


@dataclass
class ValidationReport:
    """Everything found while validating one site, and a summary of what the site holds."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        """Human-readable report: verdict, summary, then every problem on its own line."""
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        verdict = "OK" if self.ok else "NOT USABLE"
        lines = [f"Site data at {self.path}: {verdict} ({counts})"]
        lines += [f"  {key}: {_format_value(value)}" for key, value in self.summary.items()]
        lines += [f"  {p.severity}: {p}" for p in self.errors + self.warnings]
        return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


class SiteDataError(ValueError):
    """A site whose data cannot be used; ``report`` holds every problem found."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.format())
        self.report = report
