"""Error codes a site puts in an error reply, one table for both sides.

A site answers a message it cannot or will not answer with Flower's ``Error(code, reason)``; the reason
names the site, the file, column and row numbers and the rule (never a patient value), and the server
keeps it in the run record. Codes from 4000 up are ours (Flower's own are below).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why a site did not answer."""

    SITE_DATA = 4001
    """The site's files fail validation."""
    PRIVACY = 4002
    """The site's privacy ledger refuses (budget exhausted, no share for this phase, ledger unreadable), or
    the release has no DP form and the site is under DP."""
    ANALYTICS_REQUEST = 4003
    """An analytics request the site cannot answer (unknown column, a column without a range under DP)."""
    HIST_REQUEST = 4004
    """A histogram-boosting request the site cannot answer (a reused mask label, a lone site asked to mask)."""
    ADJUSTMENT_REQUEST = 4012
    """A dose-adjuster request the site cannot answer."""
    REQUEST = 4013
    """Any other malformed request (a missing or wrong key)."""
    NO_TRUST_KEY = 4101
    """The site holds no coordinator key to verify a policy with."""
    BUNDLE_REJECTED = 4102
    """The policy bundle did not verify or is not newer than the installed one."""
    SITE = 4103
    """The site cannot report its catalogue."""


class ShareableError(ValueError):
    """A site's refusal of a request in words that name keys, shapes, columns and rules only — never a cell
    value or an identifier — so the site may send its text to the coordinator (``client.site``). Any other
    exception's text stays in the site's own log."""
