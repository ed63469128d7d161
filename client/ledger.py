"""The site's privacy ledger: the ε a hospital has spent, kept on its own disk across rounds, runs and restarts.

A hospital sets its own differential-privacy budget (ε, δ) in ``site.toml``. Every round of DP-SGD
(Abadi et al. 2016, https://arxiv.org/abs/1607.00133) spends some of it. Privacy loss composes over the
whole life of the data, not per round or per run, so the ledger keeps the accountant's *history* of
``(noise_multiplier, sample_rate, steps)`` and recomputes ε of all of it with Rényi-DP composition
(Mironov 2017, https://arxiv.org/abs/1702.07476) via Opacus' ``RDPAccountant``. A fresh Opacus
``PrivacyEngine`` per round would count that round only and under-report ε.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from shared.durable import write_json_atomically

SCHEMA_VERSION = 1
FILE_MODE = 0o600
# ε above the budget by less than this is float noise, not overspending.
BUDGET_TOLERANCE = 1e-9
# No noise multiplier above this is tried: by then the model learns nothing anyway.
MAX_NOISE_MULTIPLIER = 1e3
# calibrate_noise stops when σ (or ε for Opacus' own search) is known to this relative precision.
CALIBRATION_RELATIVE_TOLERANCE = 1e-3

ENTRY_KEYS = ("run_id", "round", "steps", "noise_multiplier", "sample_rate", "epsilon_after", "epsilon_budget", "utc")

HistoryStep = tuple[float, float, int]


class LedgerError(Exception):
    """The ledger file cannot be trusted or does not match: privacy accounting would be wrong."""


class BudgetExhausted(RuntimeError):
    """Training would take the site past its privacy budget."""


class PrivacyLedger:
    """ε spent by this site, kept on its disk: refuses training that would exceed the site's (ε, δ) budget.

    One ledger per site and δ. It keeps the history Opacus' ``RDPAccountant`` keeps: a list of
    ``(noise_multiplier, sample_rate, steps)`` tuples, consecutive steps with the same noise and rate
    merged. ε is that of the whole history at the ledger's δ by Rényi-DP composition (Mironov 2017,
    https://arxiv.org/abs/1702.07476) of subsampled Gaussian DP-SGD steps (Abadi et al. 2016,
    https://arxiv.org/abs/1607.00133). Use the sample rate Opacus uses, ``1 / len(data_loader)``
    (batch size over rows only when it divides them).

    Example
    -------
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "privacy_ledger.json"
    >>> ledger = PrivacyLedger.open(path, epsilon_budget=4.0, delta=1e-5)
    >>> ledger.check_affordable(noise_multiplier=1.0, sample_rate=1 / 13, steps=13)
    >>> entry = ledger.record(noise_multiplier=1.0, sample_rate=1 / 13, steps=13, run_id=7, server_round=1)
    >>> round(ledger.spent(), 2)
    3.05
    >>> round(PrivacyLedger.open(path, epsilon_budget=4.0, delta=1e-5).epsilon_after(1.0, 1 / 13, 13), 2)
    3.71

    With Opacus (``accountant="rdp"``), hand the engine the ledger's accountant *before* ``make_private``
    (the optimizer's step hook is bound to the accountant present then), and record after training::

        ledger.check_affordable(noise_multiplier, 1 / len(loader), epochs * len(loader))
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = ledger.accountant()
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=noise_multiplier, max_grad_norm=1.0)
        ...  # train
        ledger.record_from_accountant(engine.accountant, run_id=context.run_id, server_round=server_round)

    File format (JSON, mode 0600, replaced atomically on every record)::

        {
          "schema_version": 1,
          "delta": 1e-05,
          "entries": [{"run_id": 7, "round": 1, "steps": 13, "noise_multiplier": 1.0,
                       "sample_rate": 0.0769..., "epsilon_after": 3.05..., "epsilon_budget": 4.0,
                       "utc": "2025-01-01T12:00:00+00:00"}],
          "history": [[1.0, 0.0769..., 13]]
        }

    ``entries`` is the audit log, one per recorded (noise, rate) stretch, with the budget in force then
    (a site may raise or lower its budget between runs); ``history`` is what the accountant composes.

    Parameters
    ----------
    path : str or Path
        The ledger file on the site's disk.
    epsilon_budget : float
        The site's ε budget (today's; it is not read from the file).
    delta : float
        The site's δ. Fixed for the life of the ledger: ε at one δ cannot be carried over to another.
    """

    def __init__(self, path: str | os.PathLike[str], epsilon_budget: float, delta: float):
        if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.path = Path(path)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.history: list[HistoryStep] = []
        self.entries: list[dict[str, Any]] = []

    @classmethod
    def open(cls, path: str | os.PathLike[str], epsilon_budget: float, delta: float) -> PrivacyLedger:
        """The ledger at ``path``, empty if the file does not exist yet."""
        ledger = cls(path, epsilon_budget, delta)
        if ledger.path.exists():
            ledger.history, ledger.entries = ledger._read()
        return ledger

    def spent(self) -> float:
        """ε of the whole history at the ledger's δ."""
        return _epsilon(tuple(self.history), self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """What :meth:`spent` would be after ``steps`` more DP-SGD steps at this noise and rate."""
        _check_step(noise_multiplier, sample_rate, steps)
        return _epsilon(tuple(_appended(self.history, [(noise_multiplier, sample_rate, steps)])), self.delta)

    def remaining(self) -> float:
        """ε left in the budget (0 when spent or over)."""
        return max(0.0, self.epsilon_budget - self.spent())

    def check_affordable(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Raise :class:`BudgetExhausted` if such training would take ε past the budget."""
        spent = self.spent()
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if after > self.epsilon_budget + BUDGET_TOLERANCE:
            raise BudgetExhausted(
                f"privacy budget of this site exhausted ({self.path}): budget ε={self.epsilon_budget:g} at "
                f"δ={self.delta:g}, spent so far ε={spent:.4f}, this training (noise_multiplier={noise_multiplier:g}, "
                f"sample_rate={sample_rate:g}, steps={steps}) would take ε to {after:.4f} (+{after - spent:.4f})"
            )

    def record(
        self, noise_multiplier: float, sample_rate: float, steps: int, run_id: int | str, server_round: int,
        phase: str = "",
    ) -> dict[str, Any]:
        """Add training that has happened to the ledger and save it; returns the new entry.

        Never refuses: privacy already spent is always recorded (check before training).
        """
        _check_step(noise_multiplier, sample_rate, steps)
        return self._append([(float(noise_multiplier), float(sample_rate), int(steps))], run_id, server_round,
                            phase)[0]

    def accountant(self) -> RDPAccountant:
        """An Opacus ``RDPAccountant`` holding this ledger's history, to continue from."""
        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return accountant

    def record_from_accountant(
        self, accountant: IAccountant, run_id: int | str, server_round: int, phase: str = ""
    ) -> list[dict[str, Any]]:
        """Record the steps the accountant has taken beyond this ledger's history; returns the new entries.

        The accountant must have started from :meth:`accountant` (its history extends the ledger's),
        else :class:`LedgerError`: which of its steps are new could not be told.
        """
        if accountant.mechanism() != "rdp":
            raise ValueError(f"the ledger composes RDP histories; got a {accountant.mechanism()!r} accountant")
        theirs = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
        new_steps = _steps_beyond(self.history, theirs)
        if new_steps is None:
            raise LedgerError(
                f"the accountant's history {theirs} does not continue the ledger's {self.history} ({self.path}): "
                "give the PrivacyEngine ledger.accountant() before make_private"
            )
        if not new_steps:
            return []
        return self._append(new_steps, run_id, server_round, phase)

    def _append(self, new_steps: Sequence[HistoryStep], run_id: int | str, server_round: int,
                phase: str = "") -> list[dict[str, Any]]:
        """Append to what is on disk now (another process may have recorded meanwhile), then save."""
        history, entries = self._read() if self.path.exists() else (self.history, self.entries)
        if entries[: len(self.entries)] != self.entries:
            raise LedgerError(
                f"{self.path} changed on disk and no longer contains the entries this process read; not "
                f"overwriting a privacy ledger. Unrecorded training (noise_multiplier, sample_rate, steps): "
                f"{list(new_steps)} in run {run_id} round {server_round}"
            )
        new_entries = []
        for noise_multiplier, sample_rate, steps in new_steps:
            history = _appended(history, [(noise_multiplier, sample_rate, steps)])
            new_entries.append({
                "run_id": run_id,
                "round": int(server_round),
                "steps": steps,
                "noise_multiplier": noise_multiplier,
                "sample_rate": sample_rate,
                "epsilon_after": _epsilon(tuple(history), self.delta),
                "epsilon_budget": self.epsilon_budget,
                "utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "phase": phase,
            })
        entries = entries + new_entries
        self._write({"schema_version": SCHEMA_VERSION, "delta": self.delta, "entries": entries,
                     "history": [list(step) for step in history]})
        self.history, self.entries = history, entries
        return new_entries

    def _read(self) -> tuple[list[HistoryStep], list[dict[str, Any]]]:
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LedgerError(f"privacy ledger {self.path} is unreadable: {e}") from e
        history, entries = _parse_state(state, self.path)
        if state["delta"] != self.delta:
            raise LedgerError(
                f"privacy ledger {self.path} accounts at delta={state['delta']!r} but the site's delta is "
                f"{self.delta!r}: epsilon at one delta does not carry over to another"
            )
        return history, entries

    def _write(self, state: dict[str, Any]) -> None:
        write_json_atomically(self.path, state, mode=FILE_MODE)


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, history: Iterable[Sequence] = ()
) -> float:
    """Smallest noise multiplier σ such that ``history`` + ``steps`` at (σ, ``sample_rate``) stays within ε.

    Returns σ within a relative 1e-3 above the smallest; raises :class:`BudgetExhausted` if even
    σ = ``MAX_NOISE_MULTIPLIER`` does not fit (e.g. the history alone has spent ``target_epsilon``).
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    _check_step(1.0, sample_rate, steps)
    base = [(float(s), float(q), int(n)) for s, q, n in history]
    # Compose as RDPAccountant.get_privacy_spent does, with the history's RDP computed once.
    orders = RDPAccountant.DEFAULT_ALPHAS
    base_rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in base)

    def epsilon_with(sigma: float) -> float:
        rdp = base_rdp + rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
        return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])

    if _quietly(epsilon_with, MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise BudgetExhausted(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within {target_epsilon:g} at "
            f"delta={delta:g} for {steps} steps at sample_rate={sample_rate:g} "
            f"(already spent: {_epsilon(tuple(base), delta):.4f})"
        )
    if not base:
        return _quietly(
            get_noise_multiplier, target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant="rdp", epsilon_tolerance=CALIBRATION_RELATIVE_TOLERANCE * target_epsilon,
        )
    high = 1.0
    while epsilon_with(high) > target_epsilon:
        high = min(2 * high, MAX_NOISE_MULTIPLIER)
    low = high / 2
    while epsilon_with(low) <= target_epsilon:
        high, low = low, low / 2
    while high - low > CALIBRATION_RELATIVE_TOLERANCE * high:
        middle = (low + high) / 2
        if epsilon_with(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def _quietly(function, *args, **kwargs):
    """Call without Opacus' "optimal order is the largest alpha" warning: while searching, probes at large σ
    hit it (the bound there is loose but still an upper bound, so the search stays conservative)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return function(*args, **kwargs)


@lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryStep, ...], delta: float) -> float:
    """ε of a history at δ, by Opacus' RDP accountant (Mironov 2017); cached, each costs ~50 ms per step tuple."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def _appended(history: Sequence[HistoryStep], new_steps: Iterable[HistoryStep]) -> list[HistoryStep]:
    """History with new steps, merged into the last tuple when noise and rate match (as Opacus does)."""
    merged = list(history)
    for noise_multiplier, sample_rate, steps in new_steps:
        if merged and merged[-1][:2] == (noise_multiplier, sample_rate):
            merged[-1] = (noise_multiplier, sample_rate, merged[-1][2] + steps)
        else:
            merged.append((noise_multiplier, sample_rate, steps))
    return merged


def _steps_beyond(ours: Sequence[HistoryStep], theirs: Sequence[HistoryStep]) -> list[HistoryStep] | None:
    """The steps ``theirs`` adds to ``ours``, or None if ``theirs`` does not start with ``ours``."""
    if not ours:
        return list(theirs)
    k = len(ours)
    if len(theirs) < k or list(theirs[: k - 1]) != list(ours[: k - 1]):
        return None
    (noise_multiplier, sample_rate, had), (their_noise, their_rate, has) = ours[-1], theirs[k - 1]
    if (their_noise, their_rate) != (noise_multiplier, sample_rate) or has < had:
        return None
    tail = [(noise_multiplier, sample_rate, has - had)] if has > had else []
    return tail + list(theirs[k:])


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _parse_state(state: Any, path: Path) -> tuple[list[HistoryStep], list[dict[str, Any]]]:
    """History and entries of a ledger file's JSON, or LedgerError naming the file and what is wrong."""

    def corrupt(what: str) -> LedgerError:
        return LedgerError(f"privacy ledger {path} is corrupt: {what}; not resetting it (repair or restore it)")

    if not isinstance(state, dict):
        raise corrupt("not a JSON object")
    if state.get("schema_version") != SCHEMA_VERSION:
        raise corrupt(f"schema_version {state.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    delta = state.get("delta")
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise corrupt(f"delta {delta!r}")
    if not isinstance(state.get("history"), list) or not isinstance(state.get("entries"), list):
        raise corrupt("history and entries must be lists")
    history = []
    for step in state["history"]:
        try:
            noise_multiplier, sample_rate, steps = step
            _check_step(noise_multiplier, sample_rate, steps)
        except (TypeError, ValueError) as e:
            raise corrupt(f"history step {step!r}") from e
        history.append((float(noise_multiplier), float(sample_rate), steps))
    entries = state["entries"]
    for entry in entries:
        if not (isinstance(entry, dict) and set(ENTRY_KEYS) <= entry.keys() and isinstance(entry["steps"], int)):
            raise corrupt(f"entry {entry!r}")
    if sum(entry["steps"] for entry in entries) != sum(steps for _, _, steps in history):
        raise corrupt("entries and history count different numbers of steps")
    return history, entries
