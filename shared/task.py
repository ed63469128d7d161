"""Task specs: which columns a site's table holds, what to predict, and how rows split into train/val/test.

The built-in nanoparticle task (``NANOPARTICLE_TASK``) is declared here from ``shared.schema``; any other
tabular task enters through a small TOML file read by ``TaskSpec.from_toml``::

    [task]
    kind = "binary"          # binary | multiclass | regression
    target = "target"
    split = "split"          # optional column holding train / val / test; else 80:10:10 per site, seeded
    group = "patient_id"     # optional column whose values never straddle splits
    [features]
    numeric = ["age", "chol"]
    categorical = ["sex", "cp"]
    [ranges]                 # optional bounds checked at validation
    age = [0, 120]

Example
-------
>>> spec = TaskSpec.from_toml("heart.toml")            # doctest: +SKIP
>>> splits = assign_split(table, spec, seed=0)         # doctest: +SKIP
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from shared.schema import EPISODE_COLUMNS, OUTCOMES, columns_by_name

OutcomeKind = Literal["binary", "multiclass", "regression"]
OUTCOME_KINDS: tuple[str, ...] = get_args(OutcomeKind)

SPLITS = ("train", "val", "test")
"""The values a split column may hold, and the labels ``assign_split`` returns."""

VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
"""Share of groups (or rows) held out for validation and test when the site gives no split column."""

_ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "task": ("kind", "target", "split", "group"),
    "features": ("numeric", "categorical"),
}
_ALLOWED_SECTIONS = ("task", "features", "ranges")


class TaskSpecError(ValueError):
    """A task-spec file that cannot be used; the message names the file, the key and what was expected."""


@dataclass(frozen=True)
class Outcome:
    """One column to predict, and whether it is a binary, multiclass or regression target."""

    name: str
    kind: OutcomeKind

    def __post_init__(self) -> None:
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"Outcome kind must be one of {', '.join(OUTCOME_KINDS)}; got {self.kind!r}")


@dataclass(frozen=True)
class TaskSpec:
    """The columns of one tabular task.

    Parameters
    ----------
    outcomes : tuple of Outcome
        Columns to predict.
    numeric : tuple of str
        Numeric feature columns (missing cells are imputed later).
    categorical : tuple of str
        Categorical feature columns.
    split : str or None, default None
        Column holding ``train`` / ``val`` / ``test``; when None, ``assign_split`` draws a seeded 80:10:10.
    ranges : dict of str to (float, float), default {}
        Inclusive bounds checked at validation, for numeric features or a regression target.
    group : str or None, default None
        Column whose values must not straddle splits (e.g. ``patient_id``).
    """

    outcomes: tuple[Outcome, ...]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    split: str | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    group: str | None = None

    @property
    def features(self) -> tuple[str, ...]:
        """Numeric then categorical feature columns."""
        return self.numeric + self.categorical

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Every column a site table of this task must hold, without repeats, in a stable order."""
        names = [o.name for o in self.outcomes] + list(self.features)
        names += [c for c in (self.split, self.group) if c is not None]
        return tuple(dict.fromkeys(names))

    @classmethod
    def from_toml(cls, path: str | Path) -> TaskSpec:
        """Read a task spec file; every malformed spec raises ``TaskSpecError`` naming file and key."""
        return _TaskSpecReader(Path(path)).read()


class _TaskSpecReader:
    """Turns one task-spec TOML file into a ``TaskSpec``, failing with a message that names the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, got: Any = None) -> TaskSpecError:
        got_text = "" if got is None else f"; got {got!r}"
        return TaskSpecError(f"{self.path}: {key}: expected {expected}{got_text}")

    def read(self) -> TaskSpec:
        doc = self.load()
        self.reject_unknown_keys(doc)
        task = doc.get("task")
        if not isinstance(task, dict):
            raise self.fail("[task]", "a [task] section with kind and target")
        kind = self.kind(task)
        target = self.column_name("task.target", task.get("target"))
        split = self.optional_column_name(task, "split")
        group = self.optional_column_name(task, "group")
        numeric, categorical = self.features(doc.get("features", {}))
        self.check_column_roles(target, split, group, numeric, categorical)
        ranges = self.ranges(doc.get("ranges", {}), numeric, target if kind == "regression" else None)
        return TaskSpec(outcomes=(Outcome(target, kind),), numeric=numeric, categorical=categorical,
                        split=split, ranges=ranges, group=group)

    def load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise TaskSpecError(f"{self.path}: cannot read the task spec: {exc.strerror or exc}") from exc
        try:
            return tomllib.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise TaskSpecError(f"{self.path}: not UTF-8 text (byte offset {exc.start})") from exc
        except tomllib.TOMLDecodeError as exc:  # the message carries "(at line L, column C)"
            raise TaskSpecError(f"{self.path}: invalid TOML: {exc}") from exc

    def reject_unknown_keys(self, doc: dict[str, Any]) -> None:
        for section in doc:
            if section not in _ALLOWED_SECTIONS:
                sections = ", ".join(f"[{s}]" for s in _ALLOWED_SECTIONS)
                raise self.fail(f"[{section}]", f"only the sections {sections} (unknown section)")
        for section, allowed in _ALLOWED_KEYS.items():
            body = doc.get(section, {})
            if not isinstance(body, dict):
                raise self.fail(section, f"a [{section}] table", body)
            for key in body:
                if key not in allowed:
                    keys = ", ".join(allowed)
                    raise self.fail(f"{section}.{key}", f"one of the keys {keys} (unknown key)")

    def kind(self, task: dict[str, Any]) -> OutcomeKind:
        kind = task.get("kind")
        if kind not in OUTCOME_KINDS:
            raise self.fail("task.kind", "one of " + ", ".join(OUTCOME_KINDS), kind)
        return kind

    def column_name(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "a column name (non-empty string)", value)
        return value

    def optional_column_name(self, task: dict[str, Any], key: str) -> str | None:
        value = task.get(key)
        return None if value is None else self.column_name(f"task.{key}", value)

    def features(self, body: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        lists = {}
        for key in ("numeric", "categorical"):
            value = body.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise self.fail(f"features.{key}", "a list of column names", value)
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise self.fail(f"features.{key}", "each column listed once", ", ".join(repeated))
            lists[key] = tuple(value)
        both = sorted(set(lists["numeric"]) & set(lists["categorical"]))
        if both:
            raise self.fail("features", "a column to be either numeric or categorical, not both",
                            ", ".join(both))
        if not lists["numeric"] and not lists["categorical"]:
            raise self.fail("features", "at least one column in features.numeric or features.categorical")
        return lists["numeric"], lists["categorical"]

    def check_column_roles(self, target: str, split: str | None, group: str | None,
                           numeric: tuple[str, ...], categorical: tuple[str, ...]) -> None:
        features = set(numeric) | set(categorical)
        if target in features:
            raise self.fail("task.target", "the target not to be listed as a feature", target)
        for key, column in (("task.split", split), ("task.group", group)):
            if column is not None and (column in features or column == target):
                raise self.fail(key, "a column that is neither the target nor a feature", column)

    def ranges(self, body: dict[str, Any], numeric: tuple[str, ...],
               regression_target: str | None) -> dict[str, tuple[float, float]]:
        bounded = set(numeric) | ({regression_target} if regression_target else set())
        ranges = {}
        for column, bounds in body.items():
            key = f"ranges.{column}"
            if column not in bounded:
                raise self.fail(key, "a numeric feature or a regression target", column)
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)):
                raise self.fail(key, "[low, high], two numbers", bounds)
            low, high = float(bounds[0]), float(bounds[1])
            if not low < high:
                raise self.fail(key, "[low, high] with low < high", bounds)
            ranges[column] = (low, high)
        return ranges


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


NANOPARTICLE_TASK = TaskSpec(
    outcomes=tuple(
        Outcome(name, "regression" if columns_by_name(EPISODE_COLUMNS)[name].dtype == "float" else "binary")
        for name in OUTCOMES
    ),
    numeric=(
        "age_years", "weight_kg", "height_cm", "bsa_m2", "bilirubin_umol_l", "creatinine_clearance_ml_min",
        "anc_baseline_e9_l", "ecog", "tumour_burden_mm", "cumulative_dose_mg_m2", "cycle",
        "particle_size_nm", "zeta_mv", "encapsulation_pct", "pegylated", "drug_loading_pct",
        "release_tau_h", "release_beta", "dose_mg_m2", "interval_days",
    ),
    categorical=("sex", "tumour_type"),
    group="patient_id",
)
"""The built-in task: predict response and grade-3 toxicity (binary) and efficacy (regression) per cycle.

Its column types, ranges and units live in ``shared.schema``; ``ranges`` stays empty here.
"""


def assign_split(df: pd.DataFrame, task: TaskSpec, seed: int) -> np.ndarray:
    """Label every row of ``df`` ``"train"``, ``"val"`` or ``"test"``.

    With ``task.split`` set, the labels are that column's values. Otherwise 80:10:10 is drawn with
    ``numpy.random.default_rng(seed)`` over the distinct values of ``task.group`` (so all rows of a patient
    share one split) or over rows when there is no group. The same frame and seed give the same labels;
    with at least 3 groups (rows) every split is non-empty.
    """
    if task.split is not None:
        labels = df[task.split].astype(str).str.strip().to_numpy(dtype=object)
        unknown = sorted(set(labels) - set(SPLITS))
        if unknown:
            raise ValueError(f"split column {task.split!r} holds {unknown}; validate the site first")
        return labels.astype(str)
    if task.group is None:
        unit_of_row = np.arange(len(df))
        n_units = len(df)
    else:
        keys = df[task.group].astype(str).to_numpy()
        units, unit_of_row = np.unique(keys, return_inverse=True)  # sorted: independent of row order
        n_units = len(units)
    unit_labels = _shuffled_labels(n_units, np.random.default_rng(seed))
    return unit_labels[unit_of_row]


def _shuffled_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` split labels in random order, about 80:10:10, each split non-empty once ``n >= 3``."""
    n_test = max(1, round(TEST_FRACTION * n)) if n >= 3 else 0
    n_val = max(1, round(VAL_FRACTION * n)) if n >= 2 else 0
    labels = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test, dtype="<U5")
    return labels[rng.permutation(n)]
