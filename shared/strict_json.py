"""Strict JSON parsing for documents whose meaning must be unambiguous (policy manifests, patient records).

Python's ``json`` keeps the last of repeated keys and accepts ``NaN``/``Infinity``; both can hide a mistake
(or an attack on a signed manifest: RFC 8259 §4 leaves repeated names undefined). :func:`loads` refuses them.
"""

from __future__ import annotations

import json
from typing import Any


class StrictJsonError(ValueError):
    """A JSON object with a repeated key, or a NaN/Infinity constant."""


def loads(text: str) -> Any:
    """``json.loads`` that raises :class:`StrictJsonError` for a repeated key or a NaN/Infinity constant
    (``json.JSONDecodeError`` for invalid JSON, as usual)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise StrictJsonError(f"key {repeated[0]!r} appears more than once in one object; give it once")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise StrictJsonError(f"{name} is not a JSON number; give a finite number or null")
