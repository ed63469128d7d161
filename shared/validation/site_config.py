"""site.toml: the site's name, schema version and privacy budget, read and checked."""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from shared.schema import SCHEMA_VERSION, SITE_FILE
from shared.validation.problems import Problem, Severity, echo, public_problem
from shared.validation.reading import unreadable_problem

SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION,)

MAX_SITE_TOML_BYTES = 64 * 1024
"""Largest site.toml read: it holds a handful of settings (well under 1 KB); anything near this is not one."""


SITE_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "site": {"name": "text", "schema_version": "text"},
    "privacy": {"dp": "true or false", "epsilon": "a number", "delta": "a number",
                "adjuster_share": "a number in [0, 1): share of ε the dose adjuster may spend (default 0)"},
}
"""Sections and keys of site.toml, with the kind of value each holds."""


def read_site_config(path: Path) -> tuple[dict[str, Any], list[Problem]]:
    """Parse site.toml; unknown sections and keys are warnings, wrong values errors.

    Shareable texts name sections and keys of the contract (``SITE_CONFIG_KEYS``) and what they expect,
    never a value from the file nor a key the contract does not declare.
    """
    try:
        problem = _not_a_small_regular_file(path)
        if problem is not None:
            return {}, [problem]
        config = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        return {}, [unreadable_problem(SITE_FILE, exc)]
    except UnicodeDecodeError as exc:
        return {}, [_public("error", f"not valid UTF-8 text (byte offset {exc.start})")]
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        lines = (int(where.group(1)),) if where else ()
        return {}, [Problem("error", SITE_FILE, None, (), f"invalid TOML: {exc}", lines,
                            shareable_message=f"invalid TOML {where.group(0)}" if where else "invalid TOML")]
    return config, _site_config_problems(config)


def _not_a_small_regular_file(path: Path) -> Problem | None:
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        return _public("error", "not a regular file; expected a TOML text file")
    if status.st_size > MAX_SITE_TOML_BYTES:
        return _public("error", f"the file is {status.st_size:,} bytes; a site.toml has a few settings and at "
                                f"most {MAX_SITE_TOML_BYTES:,} bytes are read")
    return None


def _site_config_problems(config: dict[str, Any]) -> list[Problem]:
    problems = _unknown_or_mistyped_keys(config)
    if any(p.severity == "error" for p in problems):
        return problems  # the value checks below assume well-typed values
    version = section(config, "site").get("schema_version")
    if version is None:
        problems.append(_public("warning", f"site.schema_version not set; assuming {SCHEMA_VERSION}"))
    elif version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = " or ".join(repr(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        problems.append(_config_problem("error", f"site.schema_version {_shown(version)} is not supported; "
                                                 f"expected {supported}",
                                        f"site.schema_version is not supported; expected {supported}"))
    return problems + _privacy_problems(section(config, "privacy"))


def _unknown_or_mistyped_keys(config: dict[str, Any]) -> list[Problem]:
    problems = []
    for section, body in config.items():
        if section not in SITE_CONFIG_KEYS:
            expected = ", ".join(f"[{s}]" for s in SITE_CONFIG_KEYS)
            problems.append(_config_problem("warning", f"unknown section [{echo(section)}], ignored; expected "
                                                       f"{expected}",
                                            f"an unknown section, ignored; expected {expected}"))
            continue
        if not isinstance(body, dict):
            problems.append(_config_problem("error", f"{section}: expected a [{section}] table, "
                                                     f"got {_shown(body)}",
                                            f"{section}: expected a [{section}] table"))
            continue
        for key, value in body.items():
            kind = SITE_CONFIG_KEYS[section].get(key)
            if kind is None:
                keys = ", ".join(SITE_CONFIG_KEYS[section])
                problems.append(_config_problem("warning", f"unknown key {section}.{echo(key)}, ignored",
                                                f"an unknown key in [{section}], ignored; expected {keys}"))
            elif not _is_kind(value, kind):
                problems.append(_config_problem("error", f"{section}.{key}: expected {kind}, got {_shown(value)}",
                                                f"{section}.{key}: expected {kind}"))
    return problems


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str) and bool(value.strip())
    if kind == "true or false":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _privacy_problems(privacy: dict[str, Any]) -> list[Problem]:
    problems = []
    epsilon, delta = privacy.get("epsilon"), privacy.get("delta")
    if epsilon is not None and epsilon <= 0:
        rule = "privacy.epsilon: expected a number > 0"
        problems.append(_config_problem("error", f"{rule}, got {epsilon!r}", rule))
    if delta is not None and not 0 < delta < 1:
        rule = "privacy.delta: expected a number in (0, 1)"
        problems.append(_config_problem("error", f"{rule}, got {delta!r}", rule))
    if privacy.get("dp"):
        for key, value in (("epsilon", epsilon), ("delta", delta)):
            if value is None:
                problems.append(_public("error", f"privacy.{key}: required when privacy.dp = true"))
    return problems


def section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A site.toml section as a dict ({} when absent or not a table)."""
    body = config.get(name, {})
    return body if isinstance(body, dict) else {}


def _config_problem(severity: Severity, message: str, shareable: str) -> Problem:
    """A finding about site.toml: ``message`` may quote the file, ``shareable`` must not."""
    return Problem(severity, SITE_FILE, None, (), message, shareable_message=shareable)


def _public(severity: Severity, message: str) -> Problem:
    return public_problem(severity, SITE_FILE, message)


def _shown(value: Any) -> str:
    """A value from site.toml as quoted in the site's own message, cut to ``MAX_ECHO_CHARS``."""
    return echo(repr(value))
