"""The site's privacy ledger: the ε a hospital has spent, kept on its own disk across rounds, runs and restarts.

A hospital sets its own differential-privacy budget (ε, δ) in ``site.toml``. Every round of DP-SGD
(Abadi et al. 2016, https://arxiv.org/abs/1607.00133) spends some of it. Privacy loss composes over the
whole life of the data, not per round or per run, so the ledger keeps the accountant's *history* of
``(noise_multiplier, sample_rate, steps)`` and recomputes ε of all of it with Rényi-DP composition
(Mironov 2017, https://arxiv.org/abs/1702.07476) via Opacus' ``RDPAccountant``. A fresh Opacus
``PrivacyEngine`` per round would count that round only and under-report ε.

The file, its hash chain and the copy of its head kept apart (so a deleted, emptied or edited ledger is an
error, and a new budget an explicit act) are :mod:`client.ledger_file`.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.ledger_file import (
    FILE_MODE,
    LEGACY_SCHEMA_VERSION,
    RELEASE_KEY,
    SITE_ID_BYTES,
    SITE_LEDGER_FILE,
    STATE_DIR_ENV,
    Chain,
    HistoryStep,
    LedgerError,
    LedgerHead,
    LedgerHeadStore,
    appended,
    archive,
    check_against_head,
    check_step,
    default_state_dir,
    folder_lock,
    is_legacy,
    new_header,
    now,
    parse_legacy,
    read_ledger_file,
    refused,
    site_hint,
    verify_chain,
    who,
)
from shared.durable import write_json_atomically

if TYPE_CHECKING:
    from opacus.accountants import IAccountant, RDPAccountant

# ε above the budget by less than this is float noise, not overspending.
BUDGET_TOLERANCE = 1e-9
# No noise multiplier above this is tried: by then the model learns nothing anyway.
MAX_NOISE_MULTIPLIER = 1e3
# calibrate_noise stops when σ (or ε for Opacus' own search) is known to this relative precision.
CALIBRATION_RELATIVE_TOLERANCE = 1e-3

# Rényi orders of the accounting: Opacus' defaults (1.1 … 63), exact for every step, and larger integer orders.
# A single Gaussian release at a small ε (a phase's share, e.g. 0.05 of 1.5) is only provable at large orders:
# with orders up to 63 no σ gets ε below ~0.19 at δ = 1e-5 (log(1/δ)/(α − 1)); with 4096, ~0.003. At the
# large orders a subsampled step (q < 1) is charged the unsubsampled Gaussian's RDP α/(2σ²), an upper bound
# (subsampling never increases RDP; Wang, Balle & Kasiviswanathan, AISTATS 2019), so composing stays sound and
# cheap; DP-SGD's ε, whose best order lies far below 63, is unchanged.
LARGE_ORDERS = (80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


@lru_cache(maxsize=1)
def orders() -> tuple[float, ...]:
    """The Rényi orders of the accounting: Opacus' default orders, then :data:`LARGE_ORDERS`.

    Opacus (and with it torch, ~2-5 s) is imported here, on the first ε computed, not with this module: a
    site without DP, or a DP site with an empty ledger, answers the messages that need no accounting without
    it (Flower 1.42's SuperNode starts a fresh ClientApp process per message)."""
    from opacus.accountants import RDPAccountant

    return (*RDPAccountant.DEFAULT_ALPHAS, *LARGE_ORDERS)

__all__ = ["SITE_LEDGER_FILE", "STATE_DIR_ENV", "BudgetExhausted", "LedgerError", "LedgerHeadStore", "PrivacyLedger",
           "calibrate_noise", "default_state_dir"]


class BudgetExhausted(RuntimeError):
    """Training would take the site past its privacy budget."""


class PrivacyLedger:
    """ε spent by this site, kept on its disk: refuses training that would exceed the site's (ε, δ) budget.

    One ledger per site and δ. It keeps the history Opacus' ``RDPAccountant`` keeps: a list of
    ``(noise_multiplier, sample_rate, steps)`` tuples, consecutive steps with the same noise and rate
    merged. ε is that of the whole history at the ledger's δ by Rényi-DP composition (Mironov 2017,
    https://arxiv.org/abs/1702.07476) of subsampled Gaussian DP-SGD steps (Abadi et al. 2016,
    https://arxiv.org/abs/1607.00133). Use the sample rate Opacus uses, ``1 / len(data_loader)``
    (batch size over rows only when it divides them). Every read (:meth:`spent`, :meth:`epsilon_after`,
    :meth:`check_affordable`) and every :meth:`record` checks the file against its chain and its head
    (module docstring) and raises :class:`LedgerError` if they disagree.

    Example
    -------
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path, state = folder / "site" / "privacy_ledger.json", folder / "state"
    >>> ledger = PrivacyLedger.open(path, epsilon_budget=4.0, delta=1e-5, state_dir=state)
    >>> ledger.check_affordable(noise_multiplier=1.0, sample_rate=1 / 13, steps=13)
    >>> entry = ledger.record(1.0, 1 / 13, 13, run_id=7, server_round=1, phase="training")
    >>> round(ledger.spent(), 2)
    3.05
    >>> round(PrivacyLedger.open(path, 4.0, 1e-5, state_dir=state).epsilon_after(1.0, 1 / 13, 13), 2)
    3.71
    >>> path.unlink()
    >>> PrivacyLedger.open(path, 4.0, 1e-5, state_dir=state)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    client.ledger_file.LedgerError: privacy ledger .../privacy_ledger.json is missing, but ...

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
          "schema_version": 2,
          "site_id": "5f0c...",            # 32 hex digits, random, kept across budgets
          "budget_number": 1,               # 2, 3, ... after each explicit new budget
          "delta": 1e-05,
          "started_utc": "2025-01-01T12:00:00+00:00",
          "reset": null,                    # or who/when/why of the new budget, and what the old one held
          "migrated_from": null,            # 1 for a version-1 ledger chained when opened
          "entries": [{"run_id": 7, "round": 1, "steps": 13, "noise_multiplier": 1.0,
                       "sample_rate": 0.0769..., "epsilon_after": 3.05..., "epsilon_budget": 4.0,
                       "utc": "2025-01-01T12:00:00+00:00", "phase": "training",
                       "prev": "<SHA-256 of the header, or of the previous entry>"}],
          "history": [[1.0, 0.0769..., 13]],
          "head": "<SHA-256 of the last entry>"
        }

    ``entries`` is the audit log, one per recorded (noise, rate) stretch, with the budget in force then
    (a site may raise or lower its budget between runs: ε spent is unchanged by it, and :meth:`entries`
    shows when it changed) and the phase that spent it; ``history`` is what the accountant composes and
    must equal the entries' steps merged as Opacus merges them. Hashes are over
    :func:`shared.policy_bundle.canonical_json` (the header is every key but ``entries``, ``history`` and
    ``head``).

    Parameters
    ----------
    path : str or Path
        The ledger file on the site's disk.
    epsilon_budget : float
        The site's ε budget (today's; it is not read from the file).
    delta : float
        The site's δ. Fixed for the life of a budget: ε at one δ cannot be carried over to another.
    state_dir : str or Path, optional
        fednano's state folder holding the head store; default :func:`default_state_dir`.
    """

    def __init__(self, path: str | os.PathLike[str], epsilon_budget: float, delta: float, *,
                 state_dir: str | os.PathLike[str] | None = None):
        if isinstance(epsilon_budget, bool) or not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
        if isinstance(delta, bool) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.path = Path(path).absolute()  # one file for the object's life, whatever the working folder later
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.heads = LedgerHeadStore(state_dir)
        self.history: list[HistoryStep] = []
        self.entries: list[dict[str, Any]] = []
        self._chain: Chain | None = None  # what was last read from or written to disk

    @classmethod
    def open(cls, path: str | os.PathLike[str], epsilon_budget: float, delta: float, *,
             state_dir: str | os.PathLike[str] | None = None) -> PrivacyLedger:
        """The ledger at ``path``, verified against its chain and its head; empty if the site has none yet.

        Raises :class:`LedgerError` if the file is missing, behind, edited or another ledger while the head
        store knows this path, or if it is unreadable. Writes only to register a ledger the head store did
        not know, to move a head that lags its ledger on, or to migrate a version-1 file (as every read does).
        """
        ledger = cls(path, epsilon_budget, delta, state_dir=state_dir)
        ledger._refresh()
        return ledger

    @classmethod
    def start_new_budget(cls, path: str | os.PathLike[str], epsilon_budget: float, delta: float, reason: str, *,
                         by: str | None = None, state_dir: str | os.PathLike[str] | None = None) -> PrivacyLedger:
        """Start this site's privacy budget afresh, on purpose: ε spent starts again from 0.

        The old ledger, whatever its state (missing, edited, a folder), is moved to ``ledger-archive/`` next to
        it, never deleted. A new ledger (same ``site_id``, next ``budget_number``, the given δ) is written
        whose header holds the reset record — UTC time, ``by`` (default ``user@host``), ``reason``, where
        the old ledger went and what it and its head said — and the record is appended to the head store's
        log of resets for this path.
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("a new privacy budget needs a reason (who asked for it and why): got none")
        ledger = cls(path, epsilon_budget, delta, state_dir=state_dir)
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(ledger.path.parent):
            ledger._adopt(ledger._reset(reason.strip(), by or who()))
        return ledger

    def spent(self) -> float:
        """ε of the whole history at the ledger's δ (the file re-checked first)."""
        self._refresh()
        return _epsilon(tuple(self.history), self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """What :meth:`spent` would be after ``steps`` more DP-SGD steps at this noise and rate."""
        check_step(noise_multiplier, sample_rate, steps)
        self._refresh()
        return self._epsilon_with(noise_multiplier, sample_rate, steps)

    def remaining(self) -> float:
        """ε left in the budget (0 when spent or over)."""
        return max(0.0, self.epsilon_budget - self.spent())

    def check_affordable(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Raise :class:`BudgetExhausted` if such training would take ε past the budget."""
        self.check_affordable_steps([(noise_multiplier, sample_rate, steps)])

    def check_affordable_steps(self, new_steps: Sequence[HistoryStep]) -> None:
        """Raise :class:`BudgetExhausted` if these steps, (noise_multiplier, sample_rate, steps) each, composed
        after the history would take ε past the budget (releases at different noise, e.g. ``client.dp``'s
        weighted releases)."""
        for noise_multiplier, sample_rate, steps in new_steps:
            check_step(noise_multiplier, sample_rate, steps)
        spent = self.spent()
        after = self.epsilon_after_steps(new_steps)
        if after > self.epsilon_budget + BUDGET_TOLERANCE:
            what = (f"(noise_multiplier={new_steps[0][0]:g}, sample_rate={new_steps[0][1]:g}, steps={new_steps[0][2]})"
                    if len(new_steps) == 1 else f"({len(new_steps)} steps at noise multipliers "
                    f"{min(s[0] for s in new_steps):.4g}-{max(s[0] for s in new_steps):.4g})")
            raise BudgetExhausted(
                f"privacy budget of this site exhausted ({self.path}): budget ε={self.epsilon_budget:g} at "
                f"δ={self.delta:g}, spent so far ε={spent:.4f}, this training {what} would take ε to {after:.4f} "
                f"(+{after - spent:.4f})"
            )

    def epsilon_after_steps(self, new_steps: Sequence[HistoryStep]) -> float:
        """ε of the history (as last read) followed by ``new_steps``, Rényi composition."""
        return _epsilon(tuple(appended(self.history, [(float(s), float(q), int(n)) for s, q, n in new_steps])),
                        self.delta)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, run_id: int | str,
               server_round: int, phase: str = "", release: str | None = None) -> dict[str, Any] | None:
        """Add training that has happened to the ledger and save it; returns the new entry.

        Never refuses for the budget: privacy already spent is always recorded (check before training).
        ``phase`` labels what spent it (e.g. ``"training"``, ``"statistics"``), kept in the entry. ``release``,
        the keyed digest of what was released (``client.dp.release_tag``), makes the charge idempotent: if the
        ledger already holds an entry of this run, phase and round with the same digest, the very same output
        was released before (a resumed run asking a round again), which tells nothing new: nothing is
        recorded and None is returned.
        """
        check_step(noise_multiplier, sample_rate, steps)
        step = (float(noise_multiplier), float(sample_rate), int(steps))
        entries = self._append([step], run_id, server_round, phase, release)
        return entries[0] if entries else None

    def released(self, run_id: int | str, phase: str, server_round: int, release: str) -> bool:
        """Whether this exact release (same run, phase, round and digest) is already charged."""
        self._refresh()
        return any(_same_charge(entry, run_id, phase, server_round) and entry.get(RELEASE_KEY) == release
                   for entry in self.entries)

    def charged_rounds(self, run_id: int | str, phase: str) -> set[int]:
        """The rounds (release indices) of ``phase`` this ledger has charged to run ``run_id``."""
        self._refresh()
        return {int(entry["round"]) for entry in self.entries
                if str(entry["run_id"]) == str(run_id) and entry["phase"] == phase}

    def accountant(self) -> RDPAccountant:
        """An Opacus ``RDPAccountant`` holding this ledger's history, to continue from."""
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return accountant

    def record_from_accountant(self, accountant: IAccountant, run_id: int | str, server_round: int,
                               phase: str = "", release: str | None = None) -> list[dict[str, Any]]:
        """Record the steps the accountant has taken beyond this ledger's history; returns the new entries
        (none when ``release`` is already charged: :meth:`record`).

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
        return self._append(new_steps, run_id, server_round, phase, release)

    @property
    def site_id(self) -> str | None:
        """The site's random id (None until the ledger has a file)."""
        return self._chain.header["site_id"] if self._chain else None

    @property
    def budget_number(self) -> int:
        """1 for the site's first budget, then one more for each :meth:`start_new_budget`."""
        return self._chain.header["budget_number"] if self._chain else 1

    @property
    def reset(self) -> dict[str, Any] | None:
        """Who started this budget, when and why (None for a site's first budget)."""
        return self._chain.header["reset"] if self._chain else None

    def head(self) -> LedgerHead | None:
        """The head kept for this ledger in the head store (its log of resets included), or None."""
        return self.heads.read(self._key)

    @property
    def head_file(self) -> Path:
        """Where the head store keeps this ledger's head."""
        return self.heads.file_for(self._key)

    # --- disk -----------------------------------------------------------------------------------------------

    @property
    def _key(self) -> Path:
        """The ledger's path as the head store knows it: folders resolved (the file itself is never a link)."""
        return self.path.parent.resolve() / self.path.name

    def _epsilon_with(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return _epsilon(tuple(appended(self.history, [(noise_multiplier, sample_rate, steps)])), self.delta)

    def _adopt(self, chain: Chain) -> None:
        self._chain, self.entries, self.history = chain, list(chain.entries), list(chain.history)

    def _refresh(self) -> None:
        """Re-read the file: it must still hold what this object has seen (it may hold more)."""
        with folder_lock(self.path.parent):
            chain = self._disk()
        self._check_continues(chain)
        if chain is not None:
            self._adopt(chain)

    def _check_continues(self, chain: Chain | None, unrecorded: str = "") -> None:
        ours = self._chain
        same = (chain is None and not self.entries) or (
            chain is not None and (ours is None or chain.genesis == ours.genesis)
            and chain.entries[: len(self.entries)] == self.entries)
        if not same:
            raise LedgerError(
                f"{self.path} changed on disk and no longer contains the entries this process read; not "
                f"overwriting a privacy ledger{unrecorded}. Open the ledger again to see what it holds now")

    def _disk(self) -> Chain | None:
        """The ledger on disk checked against its head; None for a site without ledger or head.

        A head that is new or lags the ledger is written, and a version-1 file migrated (caller holds the lock).
        """
        key = self._key
        head = self.heads.read(key)  # before the ledger: a writer writes the ledger first, then the head
        state = read_ledger_file(self.path, key)
        if state is None:
            if head is not None:
                raise refused(
                    f"privacy ledger {self.path} is missing, but this site has recorded DP training: its head "
                    f"kept in {self.heads.file_for(key)} says {head.describe()}; training now would start again "
                    f"from ε=0", key, head.entries)
            return None
        if is_legacy(state) and head is not None:
            raise refused(
                f"privacy ledger {self.path} is a version-1 file, but its head kept in {self.heads.file_for(key)} "
                f"says a version-2 ledger was there ({head.describe()}): an old copy or a replacement",
                key, head.entries)
        chain = self._migrated_chain(state) if is_legacy(state) else verify_chain(state, self.path)
        if chain.header["delta"] != self.delta:
            raise LedgerError(
                f"privacy ledger {self.path} accounts at delta={chain.header['delta']!r} but the site's delta is "
                f"{self.delta!r}: epsilon at one delta does not carry over to another (a new δ needs a new "
                f"budget: fednano ledger new-budget {site_hint(key)} --reason ...)")
        if is_legacy(state):  # the version-1 file is kept, then replaced by its chained copy
            archive(self.path, f"v{LEGACY_SCHEMA_VERSION}", copy=True)
            write_json_atomically(self.path, chain.to_file(), mode=FILE_MODE)
        if head is not None:
            check_against_head(chain, head, self.path, self.heads.file_for(key))
        if head is None or len(chain.entries) > head.entries:  # a new head, or one a crash left behind
            self.heads.write(self._head_of(chain, key, head.resets if head else ()))
        return chain

    def _head_of(self, chain: Chain, key: Path, resets: Sequence[dict[str, Any]]) -> LedgerHead:
        return LedgerHead(ledger=str(key), site_id=chain.header["site_id"],
                          budget_number=chain.header["budget_number"], delta=chain.header["delta"],
                          entries=len(chain.entries), head=chain.head,
                          steps=sum(entry["steps"] for entry in chain.entries),
                          epsilon=_epsilon(tuple(chain.history), chain.header["delta"]), updated_utc=now(),
                          resets=tuple(resets))

    def _append(self, new_steps: Sequence[HistoryStep], run_id: int | str, server_round: int,
                phase: str, release: str | None = None) -> list[dict[str, Any]]:
        """Append to what is on disk now (another process may have recorded meanwhile), then save ledger and head;
        nothing when ``release`` is already charged for this run, phase and round (:meth:`record`)."""
        if isinstance(run_id, bool) or not isinstance(run_id, int | str):
            raise ValueError(f"run_id must be an integer or a string, got {run_id!r}")
        if not isinstance(phase, str):
            raise ValueError(f"phase must be a string, got {phase!r}")
        unrecorded = (f". Unrecorded training (noise_multiplier, sample_rate, steps): {list(new_steps)} in run "
                      f"{run_id} round {server_round}: record it once the ledger is restored")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.path.parent):
            try:
                chain = self._disk()
            except LedgerError as e:
                raise LedgerError(f"{e}{unrecorded}", e.problem) from e
            self._check_continues(chain, unrecorded)
            if release is not None and chain is not None and any(
                    _same_charge(entry, run_id, phase, server_round) and entry.get(RELEASE_KEY) == release
                    for entry in chain.entries):
                self._adopt(chain)
                return []
            key = self._key
            head = self.heads.read(key)
            if chain is None:
                chain = Chain(new_header(self.delta, secrets.token_hex(SITE_ID_BYTES), 1, None), [], [])
            chain = Chain(chain.header, list(chain.entries), list(chain.history), list(chain.hashes))
            new_entries = []
            for noise_multiplier, sample_rate, steps in new_steps:
                history = appended(chain.history, [(noise_multiplier, sample_rate, steps)])
                new_entries.append({
                    "run_id": run_id, "round": int(server_round), "steps": steps,
                    "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                    "epsilon_after": _epsilon(tuple(history), self.delta), "epsilon_budget": self.epsilon_budget,
                    "utc": now(), "phase": phase,
                } | ({RELEASE_KEY: release} if release is not None else {}))
                chain.append(new_entries[-1])
            write_json_atomically(self.path, chain.to_file(), mode=FILE_MODE)
            self.heads.write(self._head_of(chain, key, head.resets if head else ()))
        self._adopt(chain)
        return new_entries

    def _reset(self, reason: str, by: str) -> Chain:
        """Archive whatever is at the ledger's path, write budget n + 1 and log the reset (caller holds the lock)."""
        key = self._key
        try:
            head, head_problem = self.heads.read(key), None
        except LedgerError as e:
            head, head_problem = None, str(e)
        kept = {k: v for k, v in asdict(head).items() if k != "resets"} if head else head_problem
        previous: dict[str, Any] = {"head": kept}
        site_id, budget = (head.site_id, head.budget_number) if head else (None, 0)
        try:
            state = read_ledger_file(self.path, key)
            if is_legacy(state):
                chain = self._migrated_chain(state)
            else:
                chain = verify_chain(state, self.path) if state is not None else None
            if chain is not None and head is not None:
                check_against_head(chain, head, self.path, self.heads.file_for(key))
            previous["ledger"] = "missing" if chain is None else "consistent with its head" if head else "no head"
            if chain is not None:
                site_id = site_id or chain.header["site_id"]
                budget = max(budget, chain.header["budget_number"])
                previous |= {"entries": len(chain.entries), "steps": sum(e["steps"] for e in chain.entries),
                             "epsilon": _epsilon(tuple(chain.history), chain.header["delta"]),
                             "delta": chain.header["delta"]}
        except LedgerError as e:
            previous["ledger"] = f"refused: {e.problem}"
        archived = archive(self.path, f"budget-{budget or 'unknown'}") if os.path.lexists(self.path) else None
        reset = {"utc": now(), "by": by, "reason": reason, "archived": str(archived.absolute()) if archived else None,
                 "previous": previous}
        chain = Chain(new_header(self.delta, site_id or secrets.token_hex(SITE_ID_BYTES), budget + 1, reset),
                       [], [])
        write_json_atomically(self.path, chain.to_file(), mode=FILE_MODE)
        self.heads.write(self._head_of(chain, key, (*(head.resets if head else ()), reset)))
        return chain

    def _migrated_chain(self, state: dict[str, Any]) -> Chain:
        """A version-1 ledger's entries, checked as before, chained under a new header (budget 1, a new site id)."""
        history, entries = parse_legacy(state, self.path)
        started = entries[0]["utc"] if entries else now()
        chain = Chain(new_header(state["delta"], secrets.token_hex(SITE_ID_BYTES), 1, None, started=started,
                                   migrated_from=LEGACY_SCHEMA_VERSION), [], [])
        for entry in entries:
            chain.append({**entry, "phase": ""})
        if chain.history != history:  # parse_legacy checked it; a chain never changes the history
            raise LedgerError(f"privacy ledger {self.path}: migrated history {chain.history} != {history}")
        return chain


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, history: Iterable[Sequence] = ()
) -> float:
    """Smallest noise multiplier σ such that ``history`` + ``steps`` at (σ, ``sample_rate``) stays within ε.

    Returns σ within a relative 1e-3 above the smallest; raises :class:`BudgetExhausted` if even
    σ = ``MAX_NOISE_MULTIPLIER`` does not fit (e.g. the history alone has spent ``target_epsilon``).
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    check_step(1.0, sample_rate, steps)
    base = [(float(s), float(q), int(n)) for s, q, n in history]
    # Compose as :func:`_epsilon` does, with the history's RDP computed once.
    base_rdp = sum((rdp_curve(s, q, n) for s, q, n in base), np.zeros(len(orders())))

    def epsilon_with(sigma: float) -> float:
        return epsilon_of(base_rdp + rdp_curve(sigma, sample_rate, steps), delta)

    if _quietly(epsilon_with, MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise BudgetExhausted(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within {target_epsilon:g} at "
            f"delta={delta:g} for {steps} steps at sample_rate={sample_rate:g} "
            f"(already spent: {_epsilon(tuple(base), delta):.4f})"
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


@lru_cache(maxsize=1024)
def rdp_curve(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    """RDP of ``steps`` subsampled Gaussian steps at every order of :func:`orders` (Opacus' ``compute_rdp`` at
    its default orders; at :data:`LARGE_ORDERS` exact for ``sample_rate`` 1, else the unsubsampled bound)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    default = orders()[: -len(LARGE_ORDERS)]
    exact = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=default)
    large = np.array(LARGE_ORDERS, dtype=float) * steps / (2.0 * noise_multiplier ** 2)
    return np.concatenate([np.asarray(exact, dtype=float), large])


def epsilon_of(rdp: np.ndarray, delta: float) -> float:
    """ε at δ of an RDP curve over :func:`orders` (Opacus' conversion, Balle et al. 2020)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    return float(rdp_analysis.get_privacy_spent(orders=list(orders()), rdp=rdp, delta=delta)[0])


@lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryStep, ...], delta: float) -> float:
    """ε of a history at δ, Rényi-DP composition (Mironov 2017) over :func:`orders`; cached."""
    if not history:
        return 0.0
    return _quietly(epsilon_of, sum((rdp_curve(float(s), float(q), int(n)) for s, q, n in history),
                                    np.zeros(len(orders()))), delta)


def _same_charge(entry: dict[str, Any], run_id: int | str, phase: str, server_round: int) -> bool:
    """Whether a ledger entry charged ``phase`` round ``server_round`` of run ``run_id``."""
    return str(entry["run_id"]) == str(run_id) and entry["phase"] == phase and int(entry["round"]) == int(server_round)


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
