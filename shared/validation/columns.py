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
        rows = chunk.index.to_numpy()
        for column in present:
            values = _parse_cells(chunk[column.name].to_numpy(), rows, column, found.of(column))
            arrays[column.name][filled:end] = values[: end - filled]
        filled = end
    values = pd.DataFrame({name: array[:filled] for name, array in arrays.items()}, index=index[:filled],
                          copy=False)  # one block per column: no consolidating copy
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

    def add(self, mask: np.ndarray, rows: np.ndarray, text: np.ndarray | None = None) -> None:
        """Record the cells where the boolean ``mask`` is true (``rows`` and ``text`` aligned with it)."""
        if not mask.any():
            return
        self.rows.append(rows[mask])
        if text is not None and len(self.texts) <= MAX_LISTED:
            for cell in pd.unique(text[mask])[: MAX_LISTED + 1]:
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
        return f"{expected}; {cells} below zero — this cannot be negative"
    if rule == "unknown":
        case_hint = " — categories are case-sensitive" if breaches.case_only else ""
        return f"{expected}; {cells} not among them{case_hint}"
    hint = column.hint_below if rule == "below" else column.hint_above
    side = "below" if rule == "below" else "above"
    return f"{expected}; {cells} {side} the range" + (f" — {hint}" if hint else "")


def _parse_cells(raw: np.ndarray, rows: np.ndarray, column: Column,
                 breaches: dict[str, _Breaches]) -> np.ndarray:
    """One chunk of one column: typed values (NaN where missing or rejected); breaches are recorded.

    Plain numpy and pandas' vectorised calls on each chunk; Python runs per cell only where a cell needs
    a second look (a number that did not parse, a category not found as written).
    """
    if column.is_numeric:
        return _parse_numbers(column, raw, rows, breaches)
    text = np.array([cell.strip() for cell in raw], dtype=object)
    missing = _isin(text, MISSING_TOKENS)
    _require(column, missing, rows, breaches)
    if column.dtype == "category":
        return _parse_category(column, text, missing, rows, breaches)
    return _one_object_per_distinct_text(np.where(missing, np.nan, text))


def _one_object_per_distinct_text(cells: np.ndarray) -> np.ndarray:
    """The cells with equal texts sharing one str object: a formulation id repeated on 10^5 rows is stored once."""
    codes, distinct = pd.factorize(cells)
    shared = np.full(len(cells), np.nan, dtype=object)
    present = codes >= 0
    shared[present] = np.asarray(distinct, dtype=object)[codes[present]]
    return shared


def _isin(cells: np.ndarray, values: frozenset[str] | tuple[str, ...]) -> np.ndarray:
    """Whether each cell is one of ``values`` (a hash lookup per cell, in C)."""
    return pd.Series(cells, dtype=object, copy=False).isin(list(values)).to_numpy()


def _require(column: Column, missing: np.ndarray, rows: np.ndarray, breaches: dict[str, _Breaches]) -> None:
    if not column.nullable:
        breaches["required"].add(missing, rows)


def _parse_numbers(column: Column, raw: np.ndarray, rows: np.ndarray,
                   breaches: dict[str, _Breaches]) -> np.ndarray:
    """Numbers (``pandas.to_numeric`` ignores surrounding spaces); cells that do not parse are looked at again.

    A cell that is not a number is either missing (``MISSING_TOKENS`` once stripped) or invalid; the texts
    quoted in messages are the stripped cells.
    """
    numbers = np.asarray(pd.to_numeric(raw, errors="coerce"), dtype=float)
    unparsed = np.isnan(numbers)
    text = raw.copy()
    text[unparsed] = [cell.strip() for cell in raw[unparsed]]
    missing = np.zeros(len(raw), dtype=bool)
    missing[unparsed] = _isin(text[unparsed], MISSING_TOKENS)
    _require(column, missing, rows, breaches)
    with np.errstate(invalid="ignore"):
        invalid = ~missing & ~np.isfinite(numbers)
        if column.dtype == "int":
            invalid |= ~missing & (numbers % 1 != 0)
        if column.dtype == "bool":
            invalid |= ~missing & (numbers != 0) & (numbers != 1)
        breaches["invalid"].add(invalid, rows, _stripped(text, invalid))
        valid = ~missing & ~invalid
        below = valid & (numbers < column.low) if column.low is not None else np.zeros_like(valid)
        above = valid & (numbers > column.high) if column.high is not None else np.zeros_like(valid)
    impossible_sign = below & (numbers < 0) & (column.low is not None and column.low >= 0)
    breaches["negative"].add(impossible_sign, rows, _stripped(text, impossible_sign))
    breaches["below"].add(below & ~impossible_sign, rows, _stripped(text, below & ~impossible_sign))
    breaches["above"].add(above, rows, _stripped(text, above))
    return np.where(valid & ~below & ~above, numbers, np.nan)


def _stripped(text: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``text`` with the cells under ``where`` stripped of spaces (only those are quoted)."""
    if not where.any():
        return text
    out = text.copy()
    out[where] = [cell.strip() for cell in text[where]]
    return out


def _parse_category(column: Column, text: np.ndarray, missing: np.ndarray, rows: np.ndarray,
                    breaches: dict[str, _Breaches]) -> np.ndarray:
    known = _isin(text, column.categories)
    unknown = ~missing & ~known
    breaches["unknown"].add(unknown, rows, text)
    if unknown.any() and not breaches["unknown"].case_only:
        lowered = {c.lower() for c in column.categories}
        breaches["unknown"].case_only = any(cell.lower() in lowered for cell in text[unknown])
    # the allowed values' own str objects, not one copy per cell
    return np.asarray(pd.Categorical(np.where(known, text, None), categories=column.categories), dtype=object)


def sample(texts: pd.Series, quote: bool = False) -> str:
    """Distinct cell texts in row order, as listed in a message."""
    distinct = list(dict.fromkeys(texts))
    return listed([repr(echo(t)) if quote else echo(t) for t in distinct])
