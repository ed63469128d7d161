"""Column checks: the header against the declared columns (stage 2) and text cells → typed values (stage 3)."""

from __future__ import annotations

import difflib

import numpy as np
import pandas as pd

from shared.schema import Column
from shared.validation.problems import Problem, listed
from shared.validation.reading import CsvTable

MISSING_TOKENS = frozenset({"", "NA", "NaN", "nan"})
"""Cell texts (after stripping spaces) that mean "not measured"."""


def check_header(table: CsvTable, declared: tuple[Column, ...]) -> list[Problem]:
    """Every declared column must be present; undeclared columns are reported as warnings and ignored."""
    names = {c.name for c in declared}
    extra = [h for h in table.header if h not in names]
    problems = []
    for column in declared:
        if column.name not in table.header:
            problems.append(Problem("error", table.file, column.name, (),
                                    f"required column is missing ({column.description}; "
                                    f"{column.expectation()}){_did_you_mean(column.name, extra)}", (1,)))
    for name in extra:
        what = "unknown column" if name else "unnamed column"
        problems.append(Problem("warning", table.file, name, (), f"{what}, ignored", (1,)))
    return problems


def _did_you_mean(name: str, candidates: list[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    if name.lower() in lowered:
        return f" — found {lowered[name.lower()]!r}; column names are case-sensitive"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
    return f" — did you mean {close[0]!r}?" if close else ""


def parse_column(table: CsvTable, column: Column) -> tuple[pd.Series, list[Problem]]:
    """Convert one column's text cells; failed, missing and out-of-range cells become NaN and problems."""
    text = table.cells[column.name].str.strip()
    missing = text.isin(MISSING_TOKENS)
    problems = []
    if not column.nullable and missing.any():
        problems.append(table.problem(column.name, missing,
                                      f"a value is required (the cell is empty or NA); "
                                      f"expected {column.expectation()}"))
    if column.is_numeric:
        values, found = _parse_numbers(table, column, text, missing)
    elif column.dtype == "category":
        values, found = _parse_category(table, column, text, missing)
    else:
        values, found = text.where(~missing), []
    return values, problems + found


def _parse_numbers(table: CsvTable, column: Column, text: pd.Series,
                   missing: pd.Series) -> tuple[pd.Series, list[Problem]]:
    numbers = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
    invalid = ~missing & ~np.isfinite(numbers)
    if column.dtype == "int":
        invalid |= ~missing & (numbers % 1 != 0)
    if column.dtype == "bool":
        invalid |= ~missing & ~numbers.isin([0.0, 1.0])
    problems = []
    if invalid.any():
        problems.append(table.problem(column.name, invalid, f"expected {column.expectation()}, "
                                                            f"got {sample(text[invalid], quote=True)}"))
    valid = ~missing & ~invalid
    out_of_range = valid & _outside(numbers, column.low, column.high)
    impossible_sign = out_of_range & (numbers < 0) & (column.low is not None and column.low >= 0)
    if impossible_sign.any():
        got = sample(text[impossible_sign])
        problems.append(table.problem(column.name, impossible_sign, f"expected {column.expectation()}, "
                                                                    f"got {got} — this cannot be negative"))
    for side, hint in ((numbers < (column.low if column.low is not None else -np.inf), column.hint_below),
                       (numbers > (column.high if column.high is not None else np.inf), column.hint_above)):
        suspect = out_of_range & ~impossible_sign & side
        if suspect.any():
            suffix = f" — {hint}" if hint else ""
            problems.append(table.problem(column.name, suspect,
                                          f"expected {column.expectation()}, got {sample(text[suspect])}{suffix}"))
    return numbers.where(valid & ~out_of_range), problems


def _outside(numbers: pd.Series, low: float | None, high: float | None) -> pd.Series:
    below = numbers < low if low is not None else pd.Series(False, index=numbers.index)
    above = numbers > high if high is not None else pd.Series(False, index=numbers.index)
    return below | above


def _parse_category(table: CsvTable, column: Column, text: pd.Series,
                    missing: pd.Series) -> tuple[pd.Series, list[Problem]]:
    unknown = ~missing & ~text.isin(column.categories)
    problems = []
    if unknown.any():
        lowered = {c.lower() for c in column.categories}
        case_hint = (" — categories are case-sensitive"
                     if text[unknown].str.lower().isin(lowered).any() else "")
        got = sample(text[unknown], quote=True)
        problems.append(table.problem(column.name, unknown,
                                      f"expected {column.expectation()}, got {got}{case_hint}"))
    return text.where(~missing & ~unknown), problems


def sample(texts: pd.Series, quote: bool = False) -> str:
    """Distinct cell texts in row order, as listed in a message."""
    distinct = list(dict.fromkeys(texts))
    return listed([repr(t) if quote else t for t in distinct])


def parse_table(table: CsvTable, declared: tuple[Column, ...]) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse every declared column present in the table; index = data-row numbers."""
    values: dict[str, pd.Series] = {}
    problems: list[Problem] = []
    for column in declared:
        if column.name in table.header:
            values[column.name], found = parse_column(table, column)
            problems += found
    return pd.DataFrame(values, index=table.cells.index), problems
