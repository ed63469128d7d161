"""Run settings from a Flower run config: hyphenated keys, typed by the settings dataclass's defaults."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_run_config(cls: type[T], run_config: dict[str, Any]) -> T:
    """An instance of the dataclass ``cls`` from ``run_config`` (key ``num-server-rounds`` sets field
    ``num_server_rounds``, converted to the default's type); fields absent from the config keep defaults."""
    values = {}
    for f in fields(cls):
        key = f.name.replace("_", "-")
        if key in run_config:
            values[f.name] = _typed(type(f.default), run_config[key], key)
    return cls(**values)


def _typed(kind: type, value: Any, key: str) -> Any:
    """``value`` as ``kind``; a boolean only from a boolean or the words true/false (``bool("false")`` is True)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "false"):
            return str(value).strip().lower() == "true"
        raise ValueError(f"run config {key}: expected true or false, got {value!r}")
    return kind(value)
