"""Task specs: reading task.toml, the built-in nanoparticle task, and seeded train/val/test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.schema import EPISODE_COLUMNS, OUTCOMES, columns_by_name
from shared.task import NANOPARTICLE_TASK, Outcome, TaskSpec, TaskSpecError, assign_split
from tests.sitefactory import TASK_TOML, write_task_toml


def spec_error(tmp_path: Path, text: str) -> str:
    path = write_task_toml(tmp_path / "task.toml", text)
    with pytest.raises(TaskSpecError) as caught:
        TaskSpec.from_toml(path)
    message = str(caught.value)
    assert str(path) in message
    return message


# --- from_toml -------------------------------------------------------------------------------------------


def test_task_spec_is_read_from_toml(tmp_path):
    spec = TaskSpec.from_toml(write_task_toml(tmp_path / "task.toml"))
    assert spec.outcomes == (Outcome("target", "binary"),)
    assert spec.numeric == ("age", "chol") and spec.categorical == ("sex", "cp")
    assert spec.split == "split" and spec.group is None
    assert spec.ranges == {"age": (0.0, 120.0)}
    assert spec.required_columns == ("target", "age", "chol", "sex", "cp", "split")


def test_task_spec_without_optional_sections_uses_defaults(tmp_path):
    text = '[task]\nkind = "regression"\ntarget = "y"\ngroup = "patient"\n[features]\nnumeric = ["x"]\n'
    spec = TaskSpec.from_toml(write_task_toml(tmp_path / "t.toml", text))
    assert spec.split is None and spec.ranges == {} and spec.categorical == () and spec.group == "patient"


def test_task_spec_file_that_does_not_exist_is_rejected(tmp_path):
    with pytest.raises(TaskSpecError, match="cannot read"):
        TaskSpec.from_toml(tmp_path / "absent.toml")


def test_task_spec_without_task_section_is_rejected(tmp_path):
    message = spec_error(tmp_path, '[features]\nnumeric = ["x"]\n')
    assert "[task]" in message


def test_task_spec_with_bad_kind_is_rejected(tmp_path):
    message = spec_error(tmp_path, TASK_TOML.replace('kind = "binary"', 'kind = "classification"'))
    assert "task.kind" in message and "binary, multiclass, regression" in message
    assert "'classification'" in message


def test_task_spec_without_target_is_rejected(tmp_path):
    assert "task.target" in spec_error(tmp_path, TASK_TOML.replace('target = "target"\n', ""))


def test_task_spec_with_target_listed_as_feature_is_rejected(tmp_path):
    text = TASK_TOML.replace('numeric = ["age", "chol"]', 'numeric = ["age", "target"]')
    message = spec_error(tmp_path, text)
    assert "task.target" in message and "not to be listed as a feature" in message


def test_task_spec_with_range_not_low_high_is_rejected(tmp_path):
    message = spec_error(tmp_path, TASK_TOML.replace("age = [0, 120]", "age = [0, 60, 120]"))
    assert "ranges.age" in message and "[low, high]" in message


def test_task_spec_with_range_low_not_below_high_is_rejected(tmp_path):
    message = spec_error(tmp_path, TASK_TOML.replace("age = [0, 120]", "age = [120, 0]"))
    assert "ranges.age" in message and "low < high" in message


def test_task_spec_with_range_on_a_categorical_column_is_rejected(tmp_path):
    message = spec_error(tmp_path, TASK_TOML + 'sex = [0, 1]\n')
    assert "ranges.sex" in message and "numeric feature" in message


def test_unreadable_task_toml_is_rejected_with_the_line_number(tmp_path):
    message = spec_error(tmp_path, '[task]\nkind = "binary"\ntarget = target\n')
    assert "invalid TOML" in message and "line 3" in message


def test_task_spec_with_unknown_key_is_rejected(tmp_path):
    message = spec_error(tmp_path, TASK_TOML.replace('kind = "binary"', 'kind = "binary"\nweights = "w"'))
    assert "task.weights" in message and "unknown key" in message


def test_task_spec_with_unknown_section_is_rejected(tmp_path):
    assert "[model]" in spec_error(tmp_path, TASK_TOML + '[model]\nlayers = 3\n')


def test_task_spec_with_column_both_numeric_and_categorical_is_rejected(tmp_path):
    text = TASK_TOML.replace('categorical = ["sex", "cp"]', 'categorical = ["sex", "age"]')
    message = spec_error(tmp_path, text)
    assert "features" in message and "age" in message


# --- the built-in task -----------------------------------------------------------------------------------


def test_nanoparticle_task_uses_declared_schema_columns():
    declared = columns_by_name(EPISODE_COLUMNS)
    assert [o.name for o in NANOPARTICLE_TASK.outcomes] == list(OUTCOMES)
    assert [o.kind for o in NANOPARTICLE_TASK.outcomes] == ["binary", "binary", "regression"]
    assert all(declared[name].is_numeric for name in NANOPARTICLE_TASK.numeric)
    assert all(declared[name].dtype == "category" for name in NANOPARTICLE_TASK.categorical)
    assert NANOPARTICLE_TASK.group == "patient_id" and NANOPARTICLE_TASK.split is None
    assert len(NANOPARTICLE_TASK.numeric) == 20


def test_outcome_with_unknown_kind_is_a_programmer_error():
    with pytest.raises(ValueError):
        Outcome("y", "ordinal")  # type: ignore[arg-type]


# --- assign_split ----------------------------------------------------------------------------------------


def rows_of_patients(n_patients: int, cycles: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [f"P{p:04d}" for p in range(n_patients) for _ in range(cycles)],
                         "x": np.arange(n_patients * cycles, dtype=float)})


def test_assign_split_is_deterministic_for_a_seed():
    df = rows_of_patients(50)
    first = assign_split(df, NANOPARTICLE_TASK, seed=7)
    assert np.array_equal(first, assign_split(df, NANOPARTICLE_TASK, seed=7))
    assert not np.array_equal(first, assign_split(df, NANOPARTICLE_TASK, seed=8))


def test_assign_split_never_lets_a_patient_straddle_splits():
    df = rows_of_patients(200)
    df["split"] = assign_split(df, NANOPARTICLE_TASK, seed=0)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()


def test_assign_split_is_roughly_80_10_10_on_1000_rows():
    task = TaskSpec(outcomes=(Outcome("y", "regression"),), numeric=("x",), categorical=())
    labels = assign_split(pd.DataFrame({"x": np.zeros(1000)}), task, seed=1)
    counts = {s: int((labels == s).sum()) for s in ("train", "val", "test")}
    assert counts == {"train": 800, "val": 100, "test": 100}


def test_assign_split_gives_every_split_a_group_from_three_groups():
    labels = assign_split(rows_of_patients(3), NANOPARTICLE_TASK, seed=3)
    assert set(labels) == {"train", "val", "test"}


def test_assign_split_uses_the_split_column_when_the_task_names_one():
    task = TaskSpec(outcomes=(Outcome("y", "binary"),), numeric=("x",), categorical=(), split="split")
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0], "split": ["test", "train", "val"]})
    assert list(assign_split(df, task, seed=0)) == ["test", "train", "val"]
