"""Strict JSON parsing for documents whose meaning must be unambiguous (policy manifests, patient records).

Python's ``json`` keeps the last of repeated keys, accepts ``NaN``/``Infinity``, turns ``1e400`` into
infinity, raises ``ValueError`` (not a JSON error) for an integer of more than 4,300 digits and
``RecursionError`` for a document nested a thousand levels deep. Each can hide a mistake (or an attack on
a signed manifest: RFC 8259 §4 leaves repeated names undefined, §6 leaves numbers beyond IEEE 754 doubles
to the implementation). :func:`loads` refuses them all with :class:`StrictJsonError`, naming the key where
the parser can tell it, in time linear in the size of the text.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_NUMBER_CHARS = 40
"""Longest number literal accepted: a double has 17 significant digits, so 40 characters hold any number
a record or manifest means (with sign, point and exponent); longer ones are someone's mistake or a probe."""

MAX_DEPTH = 64
"""Deepest nesting accepted. Patient records and manifests are 3-4 levels deep; Python's parser recurses
once per level and fails with RecursionError near 1,000, so anything deeper is refused up front."""


class StrictJsonError(ValueError):
    """A JSON document that is valid JSON but not acceptable: a repeated key, a non-finite or overlong
    number, or nesting deeper than ``MAX_DEPTH``."""


class _Refused:
    """Stands for a number the parser refused, until the object holding it can name its key."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def loads(text: str) -> Any:
    """``json.loads`` that raises :class:`StrictJsonError` for a repeated key, ``NaN``/``Infinity``, a number
    that is not finite as a double (``1e400``) or longer than ``MAX_NUMBER_CHARS``, or nesting deeper than
    ``MAX_DEPTH`` (``json.JSONDecodeError`` for invalid JSON, as usual)."""
    _check_depth(text)
    refused: list[_Refused] = []  # numbers refused so far; objects are searched for them only if any

    def mark(reason: str) -> _Refused:
        refused.append(_Refused(reason))
        return refused[-1]

    def checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = _unique_keys(pairs)
        if refused:
            for key, value in pairs:
                _refuse_marked(value, key)
        return result

    try:
        value = json.loads(text, object_pairs_hook=checked_object,
                           parse_constant=lambda name: mark(f"{name} is not a JSON number; give a finite number "
                                                            "or null"),
                           parse_float=lambda literal: _float(literal, mark),
                           parse_int=lambda literal: _int(literal, mark))
    except RecursionError:  # not reachable after _check_depth; kept so no traceback can escape
        raise StrictJsonError(f"nested deeper than {MAX_DEPTH} levels") from None
    _refuse_marked(value, None)
    return value


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` before parsing, in linear time: if the text has more opening
    brackets than that at all, strings are blanked out (brackets inside them do not count) and the rest
    counted."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise StrictJsonError(f"nested deeper than {MAX_DEPTH} levels")


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A JSON string literal (Friedl's unrolled loop: no backtracking between alternatives)."""
_BRACKET = re.compile(r"[\[\]{}]")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object from its key/value pairs; a repeated key is named (linear time: a set, not list.count)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJsonError(f"key {_short(key)} appears more than once in one object; give it once")
            seen.add(key)
    return result


def _refuse_marked(value: Any, key: str | None) -> None:
    """Raise for a refused number at ``value`` or anywhere in the lists at ``value`` (objects inside them
    were checked by their own hook)."""
    if isinstance(value, _Refused):
        where = f"key {_short(key)}: " if key is not None else ""
        raise StrictJsonError(f"{where}{value.reason}")
    if isinstance(value, list):
        for item in value:
            _refuse_marked(item, key)


def _float(literal: str, mark) -> float | _Refused:
    if len(literal) > MAX_NUMBER_CHARS:
        return mark(f"a number of {len(literal)} characters; at most {MAX_NUMBER_CHARS} are accepted")
    value = float(literal)
    if math.isinf(value):
        return mark("a number too large for a double (it would become infinity); give a finite number")
    return value


def _int(literal: str, mark) -> int | _Refused:
    if len(literal) > MAX_NUMBER_CHARS:
        return mark(f"a number of {len(literal)} digits; at most {MAX_NUMBER_CHARS} are accepted")
    return int(literal)


def _short(key: str | None, limit: int = 40) -> str:
    """A key as shown in a message: quoted, cut at ``limit`` characters (keys may be anything)."""
    text = repr(key)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
