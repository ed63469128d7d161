"""Column checks: the header against the declared columns (stage 2) and text cells → typed values (stage 3)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shared.schema import Column
from shared.validation.problems import MAX_LISTED, Problem, echo, listed, public_problem
from shared.validation.reading import CsvTable

MISSING_TOKENS = frozenset({"", "NA", "NaN", "nan"})
"""Cell texts (after stripping spaces) that mean "not measured"."""


def check_header(table: CsvTable, declared: tuple[Column, ...]) -> list[Problem]:
    """Every declared column must be present; undeclared columns are ignored, with one warning for all.

    Undeclared header names are file content (a data row, when the header line is missing): the shareable
    texts give their positions, never their names.
    """
    names = {c.name for c in declared}
    header = set(table.header)
    position = {name: i + 1 for i, name in enumerate(table.header)}
    extra = [h for h in table.header if h not in names]
    problems = []
    for column in declared:
        if column.name not in header:
            problems.append(_missing_column(table, column, extra, position))
    if len(extra) == 1:
        what = "unknown column" if extra[0] else "unnamed column"
        problems.append(Problem("warning", table.file, extra[0], (), f"{what}, ignored", (1,),
                                shareable_message=f"{what} at position {position[extra[0]]}, ignored",
                                column_in_contract=False))
    elif extra:
        names_listed = listed([repr(echo(name)) for name in extra])
        positions = listed([position[name] for name in extra])
        problems.append(Problem("warning", table.file, None, (),
                                f"{len(extra)} unknown columns, ignored: {names_listed}", (1,),
                                shareable_message=f"{len(extra)} unknown columns at positions {positions}, ignored"))
    return problems


def _missing_column(table: CsvTable, column: Column, extra: list[str], position: dict[str, int]) -> Problem:
    """A required column is absent; say which header name looks like it (by name here, by position shared)."""
    rule = f"required column is missing ({column.description}; {column.expectation()})"
    lowered = {c.lower(): c for c in extra}
    close = difflib.get_close_matches(column.name, extra, n=1, cutoff=0.8)
    if column.name.lower() in lowered:
        found = lowered[column.name.lower()]
        full = f" — found {echo(found)!r}; column names are case-sensitive"
        shared = f" — a column differing only in letter case is at position {position[found]}"
    elif close:
        full = f" — did you mean {echo(close[0])!r}?"
        shared = f" — a column with a similar name is at position {position[close[0]]}"
    else:
        full = shared = ""
    return Problem("error", table.file, column.name, (), rule + full, (1,), shareable_message=rule + shared)


def parse_column(table: CsvTable, column: Column) -> tuple[pd.Series, list[Problem]]:
    """Convert one column's text cells; failed, missing and out-of-range cells become NaN and problems."""
    values, problems = parse_table(table, (column,))
    return values[column.name], problems


def parse_table(table: CsvTable, declared: tuple[Column, ...]) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse every declared column present in the table, chunk by chunk; index = data-row numbers.

    Each column's values go straight into one preallocated array (float, or object for text), so memory is
    the typed table plus one chunk of text; findings are gathered over the chunks into one problem per
    column and rule.
    """
    header = set(table.header)
    present = [c for c in declared if c.name in header]
    n_rows = table.n_rows - len(table.dropped_rows)
    arrays = {c.name: np.empty(n_rows, dtype=float if c.is_numeric else object) for c in present}
    index = np.empty(n_rows, dtype=np.int64)
    found = _Findings(present)
    filled = 0
    for chunk in table.chunks([c.name for c in present]):
        end = min(filled + len(chunk), n_rows)
        index[filled:end] = chunk.index[: end - filled]
        for column in present:
            values = _parse_cells(chunk[column.name], column, found.of(column))
            arrays[column.name][filled:end] = values[: end - filled]
        filled = end
    values = pd.DataFrame({name: array[:filled] for name, array in arrays.items()}, index=index[:filled])
    problems = found.problems(table)
    if table.changed():
        problems.append(public_problem("error", table.file, "the file changed while it was being validated; "
                                                            "validate it again once it is complete"))
    return values, problems


_RULES = ("required", "invalid", "negative", "below", "above", "unknown")
"""The cell rules, in the order their problems are listed for a column."""


@dataclass
class _Breaches:
    """The cells of one column that broke one rule, gathered over a file's chunks."""

    rows: list[np.ndarray] = field(default_factory=list)
    texts: dict[str, None] = field(default_factory=dict)
    """The first distinct cell texts in row order, at most ``MAX_LISTED + 1`` (enough to say "and more")."""
    case_only: bool = False
    """For categories: some cell differs from an allowed value only in upper/lower case."""

    def add(self, where: pd.Series, text: pd.Series | None = None) -> None:
        mask = where.to_numpy(dtype=bool)
        if not mask.any():
            return
        self.rows.append(where.index.to_numpy()[mask])
        if text is not None and len(self.texts) <= MAX_LISTED:
            for cell in pd.unique(text.to_numpy()[mask])[: MAX_LISTED + 1]:
                self.texts.setdefault(cell, None)

    def got(self, quote: bool) -> str:
        shown = [repr(echo(t)) if quote else echo(t) for t in list(self.texts)[:MAX_LISTED]]
        return ", ".join(shown) + (" and more" if len(self.texts) > MAX_LISTED else "")


class _Findings:
    """Every column's breaches, by rule; turned into problems once the whole file is read."""

    def __init__(self, columns: list[Column]) -> None:
        self._by_column = {c.name: (c, {rule: _Breaches() for rule in _RULES}) for c in columns}

    def of(self, column: Column) -> dict[str, _Breaches]:
        return self._by_column[column.name][1]

    def problems(self, table: CsvTable) -> list[Problem]:
        problems = []
        for column, by_rule in self._by_column.values():
            for rule, breaches in by_rule.items():
                if breaches.rows:
                    rows = np.concatenate(breaches.rows)
                    problems.append(table.problem_at(column.name, rows, _message(rule, column, breaches),
                                                     shareable=_shareable_message(rule, column, breaches,
                                                                                  len(rows))))
        return problems


def _message(rule: str, column: Column, breaches: _Breaches) -> str:
    """What a rule's breach says, with the cell texts that broke it."""
    expected = f"expected {column.expectation()}"
    if rule == "required":
        return f"a value is required (the cell is empty or NA); {expected}"
    if rule == "invalid":
        return f"{expected}, got {breaches.got(quote=True)}"
    if rule == "negative":
        return f"{expected}, got {breaches.got(quote=False)} — this cannot be negative"
    if rule == "unknown":
        case_hint = " — categories are case-sensitive" if breaches.case_only else ""
        return f"{expected}, got {breaches.got(quote=True)}{case_hint}"
    hint = column.hint_below if rule == "below" else column.hint_above
    return f"{expected}, got {breaches.got(quote=False)}" + (f" — {hint}" if hint else "")


_NOT_OF_DTYPE = {"int": "not an integer", "float": "not a number", "bool": "neither 0 nor 1"}


def _shareable_message(rule: str, column: Column, breaches: _Breaches, n: int) -> str:
    """What a rule's breach says, with how many cells broke it but none of their texts."""
    expected = f"expected {column.expectation()}"
    cells = f"{n} cell{'' if n == 1 else 's'}"
    if rule == "required":
        return f"a value is required (the cell is empty or NA); {expected}"
    if rule == "invalid":
        return f"{expected}; {cells} {_NOT_OF_DTYPE[column.dtype]}"
    if rule == "negative":
        return f"{expected}; {cells} negative — this cannot be negative"
    if rule == "unknown":
        case_hint = " — categories are case-sensitive" if breaches.case_only else ""
        return f"{expected}; {cells} not among them{case_hint}"
    hint = column.hint_below if rule == "below" else column.hint_above
    side = "below" if rule == "below" else "above"
    return f"{expected}; {cells} {side} the range" + (f" — {hint}" if hint else "")


def _parse_cells(raw: pd.Series, column: Column, breaches: dict[str, _Breaches]) -> np.ndarray:
    """One chunk of one column: typed values (NaN where missing or rejected); breaches are recorded."""
    text = raw.str.strip()
    missing = text.isin(MISSING_TOKENS)
    if not column.nullable:
        breaches["required"].add(missing)
    if column.is_numeric:
        return _parse_numbers(column, text, missing, breaches)
    if column.dtype == "category":
        return _parse_category(column, text, missing, breaches)
    return text.where(~missing).to_numpy(dtype=object)


def _parse_numbers(column: Column, text: pd.Series, missing: pd.Series,
                   breaches: dict[str, _Breaches]) -> np.ndarray:
    numbers = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
    invalid = ~missing & ~np.isfinite(numbers)
    if column.dtype == "int":
        invalid |= ~missing & (numbers % 1 != 0)
    if column.dtype == "bool":
        invalid |= ~missing & ~numbers.isin([0.0, 1.0])
    breaches["invalid"].add(invalid, text)
    valid = ~missing & ~invalid
    below = valid & (numbers < column.low) if column.low is not None else valid & False
    above = valid & (numbers > column.high) if column.high is not None else valid & False
    impossible_sign = below & (numbers < 0) & (column.low is not None and column.low >= 0)
    breaches["negative"].add(impossible_sign, text)
    breaches["below"].add(below & ~impossible_sign, text)
    breaches["above"].add(above, text)
    return numbers.where(valid & ~below & ~above).to_numpy(dtype=float)


def _parse_category(column: Column, text: pd.Series, missing: pd.Series,
                    breaches: dict[str, _Breaches]) -> np.ndarray:
    known = text.isin(column.categories)
    unknown = ~missing & ~known
    breaches["unknown"].add(unknown, text)
    if unknown.any() and not breaches["unknown"].case_only:
        lowered = {c.lower() for c in column.categories}
        breaches["unknown"].case_only = bool(text[unknown].str.lower().isin(lowered).any())
    # the allowed values' own str objects, not one copy per cell
    return np.asarray(pd.Categorical(text.where(known), categories=column.categories), dtype=object)


def sample(texts: pd.Series, quote: bool = False) -> str:
    """Distinct cell texts in row order, as listed in a message."""
    distinct = list(dict.fromkeys(texts))
    return listed([repr(echo(t)) if quote else echo(t) for t in distinct])
