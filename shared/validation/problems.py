"""Findings about site files and the report gathering them: ``Problem``, ``ValidationReport``, ``SiteDataError``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

Severity = Literal["error", "warning"]


MAX_LISTED = 5
"""How many row numbers or values a message lists before saying "and N more"."""

MAX_ECHO_CHARS = 40
"""Longest piece of file text (a cell, a column name) quoted whole in a message; longer ones are cut."""


WITHHELD = "details are in the site's own validation log"
"""The shareable text of a problem built without one (e.g. by code outside this package)."""


@dataclass(frozen=True)
class Problem:
    """One finding about a site file, in two renderings: ``str(problem)`` and ``problem.shareable``.

    ``str(problem)`` is the full text, with the cell values and identifiers that broke the rule: for the
    site's own console and log. ``problem.shareable`` may leave the site: it names the file, the column,
    the row and line numbers and the rule with its public expectation (range, unit, dtype, categories) but
    holds no cell value, no identifier and no other text read from the file.

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
        What is wrong and what was expected, with the offending values (site only).
    lines : tuple of int, default ()
        1-based physical line numbers in the file (of ``rows``, or on their own for file-level findings).
    shareable_message : str or None, default None
        ``message`` without values or identifiers; None withholds everything but the location (``WITHHELD``).
    column_in_contract : bool, default True
        False when ``column`` is a header name the contract does not declare (it is text read from the
        file, e.g. a patient id when the header row is missing): the shareable text then leaves it out.
    """

    severity: Severity
    file: str
    column: str | None
    rows: tuple[int, ...]
    message: str
    lines: tuple[int, ...] = ()
    shareable_message: str | None = None
    column_in_contract: bool = True

    def __str__(self) -> str:
        return self._where(self.file, self.column) + ": " + self.message

    @property
    def shareable(self) -> str:
        """The text that may leave the site: location and rule, no values, no identifiers, no local path."""
        column = self.column if self.column_in_contract else None
        return self._where(PurePath(self.file).name or self.file, column) + ": " + (
            self.shareable_message or WITHHELD)

    def _where(self, file: str, column: str | None) -> str:
        where = [file]
        if column is not None:
            where.append(f"column {column!r}")
        if self.rows:
            text = f"{_plural('row', self.rows)} {listed(self.rows)}"
            if self.lines:
                text += f" ({_plural('line', self.lines)} {listed(self.lines, more='…')})"
            where.append(text)
        elif self.lines:
            where.append(f"{_plural('line', self.lines)} {listed(self.lines)}")
        return ", ".join(where)


def public_problem(severity: Severity, file: str, message: str, lines: tuple[int, ...] = (),
                   column: str | None = None) -> Problem:
    """A problem whose message holds no file content (only the contract's words and counts): shared as is."""
    return Problem(severity, file, column, (), message, lines, shareable_message=message)


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
        """Human-readable report for the site itself: verdict, summary, then every problem in full."""
        lines = [f"Site data at {self.path}: {self._verdict()}"]
        lines += [f"  {key}: {_format_value(value)}" for key, value in self.summary.items()]
        lines += [f"  {p.severity}: {p}" for p in self.errors + self.warnings]
        return "\n".join(lines)

    def shareable_errors(self) -> list[str]:
        """Each error's shareable text (``Problem.shareable``): what may be sent to the coordinator."""
        return [p.shareable for p in self.errors]

    def shareable_warnings(self) -> list[str]:
        """Each warning's shareable text."""
        return [p.shareable for p in self.warnings]

    def format_shareable(self) -> str:
        """The report as it may leave the site: verdict, then every problem's shareable text.

        No local path, no summary, no cell value or identifier.
        """
        lines = [f"Site data: {self._verdict()}"]
        lines += [f"  {p.severity}: {p.shareable}" for p in self.errors + self.warnings]
        return "\n".join(lines)

    def _verdict(self) -> str:
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return f"{'OK' if self.ok else 'NOT USABLE'} ({counts})"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


class SiteDataError(ValueError):
    """A site whose data cannot be used; ``report`` holds every problem found.

    ``str(err)`` is the full report, for the site's own log; ``err.shareable`` is the text that may be sent
    to the coordinator (``ValidationReport.format_shareable``), ``err.shareable_errors`` its error lines.
    """

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.format())
        self.report = report

    @property
    def shareable(self) -> str:
        return self.report.format_shareable()

    @property
    def shareable_errors(self) -> list[str]:
        return self.report.shareable_errors()
