"""site.toml: the site's name, schema version and privacy budget, read and checked.

Every privacy key is checked here, so a site that passes ``fednano validate`` cannot fail a round later on
its own settings::

    [privacy]
    dp = true
    epsilon = 3.0              # (0, MAX_EPSILON]
    delta = 1e-5               # (0, MAX_DELTA]
    epsilon_per_run = 0.6      # optional, (0, epsilon]: the most one run may spend (default: all that is left)
    [privacy.shares]           # optional: fraction of epsilon per phase; training gets the rest
    statistics = 0.05          # phases: PRIVACY_PHASES; each in [0, 1]; their sum at most 1
    boosting = 0.2

``privacy_shares(config)`` hands the declared shares to the client, checked. The older ``[privacy]
adjuster_share`` (in [0, 1)) is still read, as the ``adjuster`` share, with a deprecation warning.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from shared.protocol.privacy import PHASES
from shared.schema import SCHEMA_VERSION, SITE_FILE
from shared.validation.problems import Problem, Severity, echo, listed, public_problem
from shared.validation.reading import unreadable_problem

SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION,)

MAX_SITE_TOML_BYTES = 64 * 1024
"""Largest site.toml read: it holds a handful of settings (well under 1 KB); anything near this is not one."""


MAX_EPSILON = 20.0
"""Largest ε budget a site may declare. ε bounds how much one patient's record can change what a release
says, by a factor e^ε: at 20 that is 5 × 10^8, which protects no one. The largest budgets of deployed
releases sit just below it (US Census 2020 redistricting data: ε = 17.14 for persons, 19.61 in all); a
site that wants no DP says ``dp = false`` rather than declaring an ε that means it."""

MAX_DELTA = 1e-3
"""Largest δ a site may declare. δ is the chance the ε guarantee fails outright, and should be well below
1/n for n records: 1e-3 is 1/n for 1,000 episodes, the small end of a site that trains; the usual 1e-5
suits sites up to ~10^5 episodes."""

PRIVACY_PHASES = PHASES
"""The phases that release something derived from a site's rows, each of which may take a share of ε (the wire
protocol's list, ``shared.protocol.privacy.PHASES``)."""

SHARES_ROUNDING = 1e-9
"""Slack on "the shares add up to at most 1", for decimal fractions that do not add exactly in binary."""

SITE_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "site": {"name": "text", "schema_version": "text"},
    "privacy": {"dp": "true or false", "epsilon": "a number", "delta": "a number",
                "epsilon_per_run": "a number: the most ε one run may spend",
                "shares": "a table [privacy.shares] of phase = share",
                "adjuster_share": "a number in [0, 1): share of ε the dose adjuster may spend (deprecated)"},
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
    """Unknown sections, and unknown keys of each section, are one warning each; mistyped values errors."""
    expected = ", ".join(f"[{s}]" for s in SITE_CONFIG_KEYS)
    unknown = [f"[{echo(section)}]" for section in config if section not in SITE_CONFIG_KEYS]
    problems = [_unknown_names("section", unknown, f"expected {expected}")] if unknown else []
    for section, body in config.items():
        if section not in SITE_CONFIG_KEYS:
            continue
        if not isinstance(body, dict):
            problems.append(_config_problem("error", f"{section}: expected a [{section}] table, "
                                                     f"got {_shown(body)}",
                                            f"{section}: expected a [{section}] table"))
            continue
        declared = SITE_CONFIG_KEYS[section]
        unknown = [f"{section}.{echo(key)}" for key in body if key not in declared]
        if unknown:
            problems.append(_unknown_names(f"key in [{section}]", unknown, f"expected {', '.join(declared)}"))
        for key, value in body.items():
            if key in declared and not _is_kind(value, declared[key]):
                problems.append(_config_problem("error", f"{section}.{key}: expected {declared[key]}, "
                                                         f"got {_shown(value)}",
                                                f"{section}.{key}: expected {declared[key]}"))
    return problems


def _unknown_names(what: str, names: list[str], expected: str) -> Problem:
    """One warning for every unknown section (or key of a section): named here, counted when shared."""
    kind = what.split()[0]
    if len(names) == 1:
        full = f"unknown {kind} {names[0]}, ignored; {expected}"
        shared = f"an unknown {what}, ignored; {expected}"
    else:
        full = f"{len(names)} unknown {kind}s, ignored: {listed(names)}; {expected}"
        shared = f"{len(names)} unknown {kind}s{what[len(kind):]}, ignored; {expected}"
    return _config_problem("warning", full, shared)


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str) and bool(value.strip())
    if kind == "true or false":
        return isinstance(value, bool)
    if kind.startswith("a table"):
        return isinstance(value, dict)
    return _is_number(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _privacy_problems(privacy: dict[str, Any]) -> list[Problem]:
    """The budget (ε, δ) in range and present when DP is on, and the shares of it per phase."""
    problems = []
    epsilon, delta = privacy.get("epsilon"), privacy.get("delta")
    if epsilon is not None and not 0 < epsilon <= MAX_EPSILON:
        rule = (f"privacy.epsilon: expected a number > 0 and at most {MAX_EPSILON:g} (MAX_EPSILON) — a larger ε "
                f"protects no one; for no DP, use dp = false")
        problems.append(_config_problem("error", f"{rule}; got {epsilon!r}", rule))
    if delta is not None and not 0 < delta <= MAX_DELTA:
        rule = f"privacy.delta: expected a number in (0, {MAX_DELTA:g}] (MAX_DELTA)"
        problems.append(_config_problem("error", f"{rule}, got {delta!r}", rule))
    per_run = privacy.get("epsilon_per_run")
    if per_run is not None and not (per_run > 0 and (epsilon is None or per_run <= epsilon)):
        rule = "privacy.epsilon_per_run: expected a number > 0 and at most privacy.epsilon"
        problems.append(_config_problem("error", f"{rule}; got {per_run!r}", rule))
    if privacy.get("dp"):
        for key, value in (("epsilon", epsilon), ("delta", delta)):
            if value is None:
                problems.append(_public("error", f"privacy.{key}: required when privacy.dp = true"))
    return problems + _share_problems(privacy)


def _share_problems(privacy: dict[str, Any]) -> list[Problem]:
    """``[privacy.shares]``: known phases, each a number in [0, 1], adding up to at most 1; and the legacy key."""
    shares = privacy.get("shares", {})
    problems = _legacy_adjuster_share_problems(privacy)
    phases = ", ".join(PRIVACY_PHASES)
    for phase, share in shares.items():
        if phase not in PRIVACY_PHASES:
            problems.append(_config_problem("error", f"privacy.shares.{echo(phase)}: unknown phase; expected one of "
                                                     f"{phases}",
                                            f"privacy.shares: an unknown phase; expected one of {phases}"))
        elif not (_is_number(share) and 0 <= share <= 1):
            rule = f"privacy.shares.{phase}: expected a number in [0, 1] (a fraction of privacy.epsilon)"
            problems.append(_config_problem("error", f"{rule}, got {_shown(share)}", rule))
    if any(p.severity == "error" for p in problems):
        return problems
    total = sum(_declared_shares(privacy).values())
    if total > 1 + SHARES_ROUNDING:
        rule = "privacy.shares: the shares add up to more than 1; training gets what they leave of privacy.epsilon"
        problems.append(_config_problem("error", f"{rule} (they add up to {total:g})", rule))
    return problems


def _legacy_adjuster_share_problems(privacy: dict[str, Any]) -> list[Problem]:
    if "adjuster_share" not in privacy:
        return []
    share = privacy["adjuster_share"]
    if not 0 <= share < 1:
        rule = "privacy.adjuster_share: expected a number in [0, 1)"
        return [_config_problem("error", f"{rule}, got {_shown(share)}", rule)]
    if "adjuster" in privacy.get("shares", {}):
        return [_public("error", "privacy.adjuster_share and privacy.shares.adjuster both set; keep only "
                                 "[privacy.shares] adjuster")]
    return [_public("warning", "privacy.adjuster_share is deprecated: use [privacy.shares] adjuster")]


def _declared_shares(privacy: dict[str, Any]) -> dict[str, float]:
    shares = {phase: float(share) for phase, share in privacy.get("shares", {}).items()}
    if "adjuster_share" in privacy:
        shares.setdefault("adjuster", float(privacy["adjuster_share"]))
    return shares


class SiteConfigError(ValueError):
    """site.toml settings that cannot be used; the message is shareable (no value from the file)."""


def privacy_shares(site_config: dict[str, Any]) -> dict[str, float]:
    """The shares of ε the site declared, by phase, checked; training gets ``1 - sum`` of them.

    Only the phases the site names in ``[privacy.shares]`` (and ``adjuster`` from the deprecated
    ``[privacy] adjuster_share``); {} when it names none. The site's ``dp`` setting is not consulted.

    Raises
    ------
    SiteConfigError
        If the privacy settings break a rule of ``validate_site`` (so a caller need not validate first).

    Example
    -------
    >>> privacy_shares({"privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5, "shares": {"boosting": 0.2}}})
    {'boosting': 0.2}
    """
    privacy = section(site_config, "privacy")
    errors = [p for p in _site_config_problems({"privacy": privacy}) if p.severity == "error"]
    if errors:
        raise SiteConfigError("; ".join(p.shareable for p in errors))
    return _declared_shares(privacy)


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
