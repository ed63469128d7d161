"""The site's privacy ledger: the ε a hospital has spent, kept on its own disk across rounds, runs and restarts.

A hospital sets its own differential-privacy budget (ε, δ) in ``site.toml``. Every round of DP-SGD
(Abadi et al. 2016, https://arxiv.org/abs/1607.00133) spends some of it. Privacy loss composes over the
whole life of the data, not per round or per run, so the ledger keeps the accountant's *history* of
``(noise_multiplier, sample_rate, steps)`` and recomputes ε of all of it with Rényi-DP composition
(Mironov 2017, https://arxiv.org/abs/1702.07476) via Opacus' ``RDPAccountant``. A fresh Opacus
``PrivacyEngine`` per round would count that round only and under-report ε.

Tamper evidence
---------------
A site that has trained must never start again from ε = 0 by accident: a deleted ``.fednano`` folder, a
ledger replaced by an empty one, an edited step count, an old backup put back. Two copies make that an error:

- **a hash chain** in the ledger: each entry carries the SHA-256 of the previous entry (of the file's header
  for the first) over canonical JSON, and the file ends with the last entry's hash, so an edited, removed
  or reordered entry, or an edited header (δ, site id, budget number), breaks the chain;
- **the chain's head** (entries, head hash, steps, ε, budget number, site id, the log of budget resets) in a
  *head store* outside the site's folder: ``$FEDNANO_STATE_DIR/ledger-heads/``, by default
  ``$XDG_STATE_HOME/fednano`` (``~/.local/state/fednano``), or the ``state_dir`` given to
  :meth:`PrivacyLedger.open`. A head kept in the site's own ``.fednano/`` would go with ``rm -r .fednano``.

The head store knows a site by its ledger's absolute path: one small file per path, named by the path's
SHA-256, so runs on the same folders never add files. Ledger and head also carry a random ``site_id``, so
another site's ledger copied into place is told apart. A path the store knows whose ledger is missing,
behind its head, edited or another ledger is refused with a :class:`LedgerError` naming the file, what
disagrees and the two ways on: restore the file from a backup, or start a new budget explicitly with
``fednano ledger new-budget`` (:meth:`PrivacyLedger.start_new_budget`), which archives the old ledger and
logs who reset it, when and why, in the new ledger and in the head store. A ledger *ahead* of its head (a
crash between the two writes) is accepted and the head moved on: that never under-counts.

Why the path and not an id kept in the site's folder: after ``rm -r .fednano`` nothing in the folder tells
it from a folder made anew (inode numbers are reused at once), and here the error must win. A tool that
makes *new* sites at an old path, as ``fednano simulate`` does with ``OUT/sites`` on every run, gives them
a head store of their own that goes with them (e.g. ``OUT/sites/.ledger-heads``): fresh sites start fresh
and leave nothing in the user's home. Tests point ``FEDNANO_STATE_DIR`` at a temporary folder.

The chain and the head make accidents and careless edits evident; they do not stop a determined owner of
the machine, who controls both copies (and whose data it is). Writers of one ledger take turns (an
exclusive ``flock`` on its folder), so concurrent processes lose no entry. A version-1 ledger (no chain)
is migrated when opened, unless the head store already knows its path: its entries are chained as they are
and the version-1 file is kept in ``ledger-archive/``. Refusing it instead would leave a new budget — ε back
at 0 — as the only way on, the very under-count this guards against.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import math
import os
import re
import secrets
import socket
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from shared import strict_json
from shared.durable import write_json_atomically
from shared.policy_bundle import canonical_json

SCHEMA_VERSION = 2
LEGACY_SCHEMA_VERSION = 1
HEAD_SCHEMA_VERSION = 1
FILE_MODE = 0o600
FOLDER_MODE = 0o700
"""The head store and the ledger archive: private to the user the site's SuperNode runs as."""
SITE_LEDGER_FILE = Path(".fednano") / "privacy_ledger.json"
"""Where a site's ledger lives inside its data folder."""
STATE_DIR_ENV = "FEDNANO_STATE_DIR"
"""Environment variable naming fednano's state folder (the head store is its ``ledger-heads/``)."""
HEADS_FOLDER, ARCHIVE_FOLDER = "ledger-heads", "ledger-archive"
SITE_ID_BYTES = 16
"""128 random bits: two sites' ids never collide."""
# ε above the budget by less than this is float noise, not overspending.
BUDGET_TOLERANCE = 1e-9
# No noise multiplier above this is tried: by then the model learns nothing anyway.
MAX_NOISE_MULTIPLIER = 1e3
# calibrate_noise stops when σ (or ε for Opacus' own search) is known to this relative precision.
CALIBRATION_RELATIVE_TOLERANCE = 1e-3

LEGACY_ENTRY_KEYS = ("run_id", "round", "steps", "noise_multiplier", "sample_rate", "epsilon_after",
                     "epsilon_budget", "utc")
ENTRY_KEYS = (*LEGACY_ENTRY_KEYS, "phase", "prev")
HEADER_KEYS = ("schema_version", "site_id", "budget_number", "delta", "started_utc", "reset", "migrated_from")
FILE_KEYS = (*HEADER_KEYS, "entries", "history", "head")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SITE_ID_HEX = re.compile(rf"[0-9a-f]{{{2 * SITE_ID_BYTES}}}")

HistoryStep = tuple[float, float, int]


class LedgerError(Exception):
    """The ledger file cannot be trusted or does not match: privacy accounting would be wrong.

    ``problem`` is what is wrong, without the advice on what to do that the message adds.
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class BudgetExhausted(RuntimeError):
    """Training would take the site past its privacy budget."""


def default_state_dir() -> Path:
    """``$FEDNANO_STATE_DIR``, else ``$XDG_STATE_HOME/fednano``, else ``~/.local/state/fednano`` (the XDG Base
    Directory spec's place for state that persists between restarts), apart from any site's data folder."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".local" / "state"  # the spec ignores relative
    return base / "fednano"


@dataclass(frozen=True)
class LedgerHead:
    """The second copy of a ledger's chain head, kept in the head store apart from the site's folder.

    Parameters
    ----------
    ledger : str
        The ledger's absolute path.
    site_id, budget_number, delta
        As in the ledger's header.
    entries : int
        Number of entries; ``head`` is the SHA-256 of the last (of the header when there are none).
    steps : int
        DP-SGD steps over all entries.
    epsilon : float
        ε spent after the last entry.
    updated_utc : str
        When the head was written.
    resets : tuple of dict
        Every explicit new budget at this path: who, when, why, what the old ledger held, where it went.
    """

    ledger: str
    site_id: str
    budget_number: int
    delta: float
    entries: int
    head: str
    steps: int
    epsilon: float
    updated_utc: str
    resets: tuple[dict[str, Any], ...] = ()

    def describe(self) -> str:
        return (f"{_entries(self.entries)}, {self.steps} steps, ε={self.epsilon:.4f} spent at δ={self.delta:g} in "
                f"budget {self.budget_number} (head written {self.updated_utc})")


class LedgerHeadStore:
    """Where the heads of this machine's site ledgers are kept: ``STATE_DIR/ledger-heads/<key>.json``, one file
    per ledger path, ``key`` the first 32 hex digits of the SHA-256 of the path.

    Parameters
    ----------
    state_dir : str or Path, optional
        fednano's state folder; default :func:`default_state_dir`.
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None):
        self.folder = Path(state_dir if state_dir is not None else default_state_dir()).expanduser() / HEADS_FOLDER

    def file_for(self, ledger: Path) -> Path:
        return self.folder / f"{hashlib.sha256(str(ledger).encode()).hexdigest()[:32]}.json"

    def read(self, ledger: Path) -> LedgerHead | None:
        """The head kept for ``ledger``, or None if this store has never seen it; LedgerError if unreadable."""
        file = self.file_for(ledger)
        try:
            state = strict_json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise _refused(f"ledger head {file} (the second copy of {ledger}'s chain head) is unreadable: {e}",
                           ledger, restore=file) from e
        try:
            head = _parse_head(state)
        except (KeyError, TypeError, ValueError) as e:
            raise _refused(f"ledger head {file} (the second copy of {ledger}'s chain head) is corrupt: {e}",
                           ledger, restore=file) from e
        if head.ledger != str(ledger):
            raise _refused(f"ledger head {file} belongs to {head.ledger}, not {ledger}", ledger, restore=file)
        return head

    def write(self, head: LedgerHead) -> None:
        _private_folder(self.folder)
        state = {"schema_version": HEAD_SCHEMA_VERSION, **asdict(head), "resets": list(head.resets)}
        write_json_atomically(self.file_for(Path(head.ledger)), state, mode=FILE_MODE)


@dataclass
class _Chain:
    """A ledger's header, entries and history, with the hash of every entry (verified when read from a file)."""

    header: dict[str, Any]
    entries: list[dict[str, Any]]
    history: list[HistoryStep]
    hashes: list[str] = field(default_factory=list)

    @property
    def genesis(self) -> str:
        return _digest(self.header)

    def hash_at(self, count: int) -> str:
        """The chain's head after ``count`` entries."""
        return self.hashes[count - 1] if count else self.genesis

    @property
    def head(self) -> str:
        return self.hash_at(len(self.entries))

    def append(self, entry: dict[str, Any]) -> None:
        """Chain ``entry`` (its ``prev`` set here) onto the ledger."""
        entry["prev"] = self.head
        self.entries.append(entry)
        self.hashes.append(_digest(entry))
        self.history = _appended(self.history, [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])

    def to_file(self) -> dict[str, Any]:
        return {**self.header, "entries": self.entries, "history": [list(step) for step in self.history],
                "head": self.head}


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
    client.ledger.LedgerError: privacy ledger .../privacy_ledger.json is missing, but ...

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
        self._chain: _Chain | None = None  # what was last read from or written to disk

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
        with _folder_lock(ledger.path.parent):
            ledger._adopt(ledger._reset(reason.strip(), by or _who()))
        return ledger

    def spent(self) -> float:
        """ε of the whole history at the ledger's δ (the file re-checked first)."""
        self._refresh()
        return _epsilon(tuple(self.history), self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """What :meth:`spent` would be after ``steps`` more DP-SGD steps at this noise and rate."""
        _check_step(noise_multiplier, sample_rate, steps)
        self._refresh()
        return self._epsilon_with(noise_multiplier, sample_rate, steps)

    def remaining(self) -> float:
        """ε left in the budget (0 when spent or over)."""
        return max(0.0, self.epsilon_budget - self.spent())

    def check_affordable(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Raise :class:`BudgetExhausted` if such training would take ε past the budget."""
        _check_step(noise_multiplier, sample_rate, steps)
        spent = self.spent()
        after = self._epsilon_with(noise_multiplier, sample_rate, steps)
        if after > self.epsilon_budget + BUDGET_TOLERANCE:
            raise BudgetExhausted(
                f"privacy budget of this site exhausted ({self.path}): budget ε={self.epsilon_budget:g} at "
                f"δ={self.delta:g}, spent so far ε={spent:.4f}, this training (noise_multiplier={noise_multiplier:g}, "
                f"sample_rate={sample_rate:g}, steps={steps}) would take ε to {after:.4f} (+{after - spent:.4f})"
            )

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, run_id: int | str,
               server_round: int, phase: str = "") -> dict[str, Any]:
        """Add training that has happened to the ledger and save it; returns the new entry.

        Never refuses for the budget: privacy already spent is always recorded (check before training).
        ``phase`` labels what spent it (e.g. ``"training"``, ``"statistics"``), kept in the entry.
        """
        _check_step(noise_multiplier, sample_rate, steps)
        step = (float(noise_multiplier), float(sample_rate), int(steps))
        return self._append([step], run_id, server_round, phase)[0]

    def accountant(self) -> RDPAccountant:
        """An Opacus ``RDPAccountant`` holding this ledger's history, to continue from."""
        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return accountant

    def record_from_accountant(self, accountant: IAccountant, run_id: int | str, server_round: int,
                               phase: str = "") -> list[dict[str, Any]]:
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
        return _epsilon(tuple(_appended(self.history, [(noise_multiplier, sample_rate, steps)])), self.delta)

    def _adopt(self, chain: _Chain) -> None:
        self._chain, self.entries, self.history = chain, list(chain.entries), list(chain.history)

    def _refresh(self) -> None:
        """Re-read the file: it must still hold what this object has seen (it may hold more)."""
        with _folder_lock(self.path.parent):
            chain = self._disk()
        self._check_continues(chain)
        if chain is not None:
            self._adopt(chain)

    def _check_continues(self, chain: _Chain | None, unrecorded: str = "") -> None:
        ours = self._chain
        same = (chain is None and not self.entries) or (
            chain is not None and (ours is None or chain.genesis == ours.genesis)
            and chain.entries[: len(self.entries)] == self.entries)
        if not same:
            raise LedgerError(
                f"{self.path} changed on disk and no longer contains the entries this process read; not "
                f"overwriting a privacy ledger{unrecorded}. Open the ledger again to see what it holds now")

    def _disk(self) -> _Chain | None:
        """The ledger on disk checked against its head; None for a site without ledger or head.

        A head that is new or lags the ledger is written, and a version-1 file migrated (caller holds the lock).
        """
        key = self._key
        head = self.heads.read(key)  # before the ledger: a writer writes the ledger first, then the head
        state = _read_ledger_file(self.path, key)
        if state is None:
            if head is not None:
                raise _refused(
                    f"privacy ledger {self.path} is missing, but this site has recorded DP training: its head "
                    f"kept in {self.heads.file_for(key)} says {head.describe()}; training now would start again "
                    f"from ε=0", key, head.entries)
            return None
        if _is_legacy(state) and head is not None:
            raise _refused(
                f"privacy ledger {self.path} is a version-1 file, but its head kept in {self.heads.file_for(key)} "
                f"says a version-2 ledger was there ({head.describe()}): an old copy or a replacement",
                key, head.entries)
        chain = self._migrated_chain(state) if _is_legacy(state) else _verify_chain(state, self.path)
        if chain.header["delta"] != self.delta:
            raise LedgerError(
                f"privacy ledger {self.path} accounts at delta={chain.header['delta']!r} but the site's delta is "
                f"{self.delta!r}: epsilon at one delta does not carry over to another (a new δ needs a new "
                f"budget: fednano ledger new-budget {_site_hint(key)} --reason ...)")
        if _is_legacy(state):  # the version-1 file is kept, then replaced by its chained copy
            _archive(self.path, f"v{LEGACY_SCHEMA_VERSION}", copy=True)
            write_json_atomically(self.path, chain.to_file(), mode=FILE_MODE)
        if head is not None:
            _check_against_head(chain, head, self.path, self.heads.file_for(key))
        if head is None or len(chain.entries) > head.entries:  # a new head, or one a crash left behind
            self.heads.write(self._head_of(chain, key, head.resets if head else ()))
        return chain

    def _head_of(self, chain: _Chain, key: Path, resets: Sequence[dict[str, Any]]) -> LedgerHead:
        return LedgerHead(ledger=str(key), site_id=chain.header["site_id"],
                          budget_number=chain.header["budget_number"], delta=chain.header["delta"],
                          entries=len(chain.entries), head=chain.head,
                          steps=sum(entry["steps"] for entry in chain.entries),
                          epsilon=_epsilon(tuple(chain.history), chain.header["delta"]), updated_utc=_now(),
                          resets=tuple(resets))

    def _append(self, new_steps: Sequence[HistoryStep], run_id: int | str, server_round: int,
                phase: str) -> list[dict[str, Any]]:
        """Append to what is on disk now (another process may have recorded meanwhile), then save ledger and head."""
        if isinstance(run_id, bool) or not isinstance(run_id, int | str):
            raise ValueError(f"run_id must be an integer or a string, got {run_id!r}")
        if not isinstance(phase, str):
            raise ValueError(f"phase must be a string, got {phase!r}")
        unrecorded = (f". Unrecorded training (noise_multiplier, sample_rate, steps): {list(new_steps)} in run "
                      f"{run_id} round {server_round}: record it once the ledger is restored")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(self.path.parent):
            try:
                chain = self._disk()
            except LedgerError as e:
                raise LedgerError(f"{e}{unrecorded}", e.problem) from e
            self._check_continues(chain, unrecorded)
            key = self._key
            head = self.heads.read(key)
            if chain is None:
                chain = _Chain(_new_header(self.delta, secrets.token_hex(SITE_ID_BYTES), 1, None), [], [])
            chain = _Chain(chain.header, list(chain.entries), list(chain.history), list(chain.hashes))
            new_entries = []
            for noise_multiplier, sample_rate, steps in new_steps:
                history = _appended(chain.history, [(noise_multiplier, sample_rate, steps)])
                new_entries.append({
                    "run_id": run_id, "round": int(server_round), "steps": steps,
                    "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                    "epsilon_after": _epsilon(tuple(history), self.delta), "epsilon_budget": self.epsilon_budget,
                    "utc": _now(), "phase": phase,
                })
                chain.append(new_entries[-1])
            write_json_atomically(self.path, chain.to_file(), mode=FILE_MODE)
            self.heads.write(self._head_of(chain, key, head.resets if head else ()))
        self._adopt(chain)
        return new_entries

    def _reset(self, reason: str, by: str) -> _Chain:
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
            state = _read_ledger_file(self.path, key)
            if _is_legacy(state):
                chain = self._migrated_chain(state)
            else:
                chain = _verify_chain(state, self.path) if state is not None else None
            if chain is not None and head is not None:
                _check_against_head(chain, head, self.path, self.heads.file_for(key))
            previous["ledger"] = "missing" if chain is None else "consistent with its head" if head else "no head"
            if chain is not None:
                site_id = site_id or chain.header["site_id"]
                budget = max(budget, chain.header["budget_number"])
                previous |= {"entries": len(chain.entries), "steps": sum(e["steps"] for e in chain.entries),
                             "epsilon": _epsilon(tuple(chain.history), chain.header["delta"]),
                             "delta": chain.header["delta"]}
        except LedgerError as e:
            previous["ledger"] = f"refused: {e.problem}"
        archived = _archive(self.path, f"budget-{budget or 'unknown'}") if os.path.lexists(self.path) else None
        reset = {"utc": _now(), "by": by, "reason": reason, "archived": str(archived.absolute()) if archived else None,
                 "previous": previous}
        chain = _Chain(_new_header(self.delta, site_id or secrets.token_hex(SITE_ID_BYTES), budget + 1, reset),
                       [], [])
        write_json_atomically(self.path, chain.to_file(), mode=FILE_MODE)
        self.heads.write(self._head_of(chain, key, (*(head.resets if head else ()), reset)))
        return chain

    def _migrated_chain(self, state: dict[str, Any]) -> _Chain:
        """A version-1 ledger's entries, checked as before, chained under a new header (budget 1, a new site id)."""
        history, entries = _parse_legacy(state, self.path)
        started = entries[0]["utc"] if entries else _now()
        chain = _Chain(_new_header(state["delta"], secrets.token_hex(SITE_ID_BYTES), 1, None, started=started,
                                   migrated_from=LEGACY_SCHEMA_VERSION), [], [])
        for entry in entries:
            chain.append({**entry, "phase": ""})
        if chain.history != history:  # _parse_legacy checked it; a chain never changes the history
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
    if not (_is_number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# --- the ledger file ----------------------------------------------------------------------------------------


def _read_ledger_file(path: Path, key: Path) -> dict[str, Any] | None:
    """The ledger's JSON (strict: no repeated key, no NaN), None if there is no file; LedgerError for a link,
    a folder, anything but a regular file, or unreadable JSON."""
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _refused(f"privacy ledger {path} cannot be examined: {e}", key) from e
    if stat.S_ISLNK(kind):
        raise _refused(f"privacy ledger {path} is a symbolic link (to {os.readlink(path)}), not a file: a link can "
                       "point at another site's ledger or at nothing, and a write would replace the link", key)
    if not stat.S_ISREG(kind):
        what = "a folder" if stat.S_ISDIR(kind) else "not a regular file"
        raise _refused(f"privacy ledger {path} is {what}, not a ledger file", key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, encoding="utf-8") as f:
            return strict_json.loads(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _refused(f"privacy ledger {path} is unreadable: {e}", key) from e


def _is_legacy(state: Any) -> bool:
    return isinstance(state, dict) and state.get("schema_version") == LEGACY_SCHEMA_VERSION


def _verify_chain(state: Any, path: Path) -> _Chain:
    """A version-2 ledger's content with every field checked and its chain verified, or LedgerError."""

    def corrupt(what: str) -> LedgerError:
        return _refused(f"privacy ledger {path} is corrupt: {what}", path)

    if not isinstance(state, dict):
        raise corrupt("not a JSON object")
    if state.get("schema_version") != SCHEMA_VERSION:
        raise corrupt(f"schema_version {state.get('schema_version')!r}, expected {SCHEMA_VERSION} "
                      f"(or {LEGACY_SCHEMA_VERSION}, migrated when opened)")
    if set(state) != set(FILE_KEYS):
        missing, extra = sorted(set(FILE_KEYS) - set(state)), sorted(set(state) - set(FILE_KEYS))
        raise corrupt(f"keys missing {missing}, unexpected {extra}")
    header = {key: state[key] for key in HEADER_KEYS}
    if problem := next(_header_problems(header), None):
        raise corrupt(problem)
    if not isinstance(state["entries"], list) or not isinstance(state["history"], list):
        raise corrupt("history and entries must be lists")
    chain = _Chain(header, [], [])
    for i, entry in enumerate(state["entries"]):
        if not isinstance(entry, dict) or set(entry) != set(ENTRY_KEYS):
            raise corrupt(f"entry {i} {entry!r}: expected the keys {list(ENTRY_KEYS)}")
        if problem := next(_entry_problems(entry), None):
            raise corrupt(f"entry {i}: {problem}")
        if entry["prev"] != chain.head:
            raise corrupt("entry 0 does not follow the header: the header (δ, site id, budget number) was edited, "
                          "or entries were removed or reordered" if i == 0
                          else f"entry {i - 1} was edited, or entries were removed or reordered: entry {i} does not "
                               f"follow entry {i - 1} (hash chain broken)")
        chain.entries.append(entry)
        chain.hashes.append(_digest(entry))
        chain.history = _appended(chain.history, [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])
    if state["head"] != chain.head:
        last = len(chain.entries) - 1
        raise corrupt(f"entry {last} was edited: its hash no longer matches the file's head" if last >= 0
                      else "the header was edited: it no longer matches the file's head")
    if _history(state["history"], corrupt) != chain.history:
        raise corrupt(f"history {state['history']} is not the entries' steps merged ({chain.history})")
    return chain


def _header_problems(header: dict[str, Any]) -> Iterator[str]:
    if not (isinstance(header["site_id"], str) and SITE_ID_HEX.fullmatch(header["site_id"])):
        yield f"site_id {header['site_id']!r}: expected {2 * SITE_ID_BYTES} hex digits"
    number = header["budget_number"]
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        yield f"budget_number {number!r}: expected an integer >= 1"
    delta = header["delta"]
    if not (_is_number(delta) and 0 < delta < 1):
        yield f"delta {delta!r}"
    if not isinstance(header["started_utc"], str):
        yield f"started_utc {header['started_utc']!r}"
    if header["reset"] is not None and not isinstance(header["reset"], dict):
        yield f"reset {header['reset']!r}: expected an object or null"
    if header["migrated_from"] not in (None, LEGACY_SCHEMA_VERSION):
        yield f"migrated_from {header['migrated_from']!r}"


def _entry_problems(entry: dict[str, Any]) -> Iterator[str]:
    try:
        _check_step(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
    except ValueError as e:
        yield str(e)
    for key, low in (("epsilon_after", 0.0), ("epsilon_budget", 0.0)):
        value = entry[key]
        if not (_is_number(value) and math.isfinite(value) and value >= low):
            yield f"{key} must be a finite number >= {low:g}, got {value!r}"
    if isinstance(entry["round"], bool) or not isinstance(entry["round"], int) or entry["round"] < 0:
        yield f"round must be an integer >= 0, got {entry['round']!r}"
    if isinstance(entry["run_id"], bool) or not isinstance(entry["run_id"], int | str):
        yield f"run_id must be an integer or a string, got {entry['run_id']!r}"
    for key in ("utc", "phase"):
        if not isinstance(entry[key], str):
            yield f"{key} must be a string, got {entry[key]!r}"
    if not (isinstance(entry["prev"], str) and SHA256_HEX.fullmatch(entry["prev"])):
        yield f"prev {entry['prev']!r}: expected a SHA-256 in hex"


def _history(steps: list[Any], corrupt) -> list[HistoryStep]:
    history = []
    for step in steps:
        try:
            noise_multiplier, sample_rate, count = step
            _check_step(noise_multiplier, sample_rate, count)
        except (TypeError, ValueError) as e:
            raise corrupt(f"history step {step!r}: {e}") from e
        history.append((float(noise_multiplier), float(sample_rate), count))
    return history


def _parse_legacy(state: dict[str, Any], path: Path) -> tuple[list[HistoryStep], list[dict[str, Any]]]:
    """History and entries of a version-1 file (no chain), or LedgerError naming the file and what is wrong."""

    def corrupt(what: str) -> LedgerError:
        return _refused(f"privacy ledger {path} (version 1) is corrupt: {what}", path)

    delta = state.get("delta")
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise corrupt(f"delta {delta!r}")
    if not isinstance(state.get("history"), list) or not isinstance(state.get("entries"), list):
        raise corrupt("history and entries must be lists")
    history = _history(state["history"], corrupt)
    replayed: list[HistoryStep] = []
    for i, entry in enumerate(state["entries"]):
        if not (isinstance(entry, dict) and set(entry) == set(LEGACY_ENTRY_KEYS)):
            raise corrupt(f"entry {i} {entry!r}")
        if problem := next(_entry_problems({**entry, "phase": "", "prev": "0" * 64}), None):
            raise corrupt(f"entry {i}: {problem}")
        replayed = _appended(replayed, [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])
    if replayed != history:
        raise corrupt(f"history {state['history']} is not the entries' steps merged ({replayed})")
    return history, state["entries"]


def _new_header(delta: float, site_id: str, budget_number: int, reset: dict[str, Any] | None,
                started: str | None = None, migrated_from: int | None = None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "site_id": site_id, "budget_number": budget_number, "delta": delta,
            "started_utc": started or _now(), "reset": reset, "migrated_from": migrated_from}


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


# --- the head -----------------------------------------------------------------------------------------------


def _check_against_head(chain: _Chain, head: LedgerHead, path: Path, head_file: Path) -> None:
    """LedgerError unless the ledger is the one the head was written for, at or beyond the head."""
    key = Path(head.ledger)
    kept = f"its head kept in {head_file} says {head.describe()}"
    if chain.header["site_id"] != head.site_id or chain.header["budget_number"] != head.budget_number:
        raise _refused(
            f"privacy ledger {path} is another ledger than the one this site keeps (site id "
            f"{chain.header['site_id'][:8]}…, budget {chain.header['budget_number']}; {kept}, site id "
            f"{head.site_id[:8]}…)", key, head.entries)
    if len(chain.entries) < head.entries:
        raise _refused(
            f"privacy ledger {path} is behind: it holds {_entries(len(chain.entries))} but {kept}: entries were "
            f"removed, or an older copy put back", key, head.entries)
    if chain.hash_at(head.entries) != head.head:
        raise _refused(
            f"privacy ledger {path} was rewritten: its first {head.entries} entries no longer hash to the head "
            f"kept in {head_file} ({head.describe()}): an entry was edited and the chain recomputed",
            key, head.entries)


def _parse_head(state: Any) -> LedgerHead:
    if not isinstance(state, dict) or state.get("schema_version") != HEAD_SCHEMA_VERSION:
        raise ValueError(f"expected a version-{HEAD_SCHEMA_VERSION} head object")
    fields = {k: v for k, v in state.items() if k != "schema_version"}
    head = LedgerHead(**{**fields, "resets": tuple(fields["resets"])})
    if not (SHA256_HEX.fullmatch(str(head.head)) and isinstance(head.entries, int) and head.entries >= 0
            and isinstance(head.budget_number, int) and isinstance(head.site_id, str)):
        raise ValueError("head, entries, budget_number or site_id malformed")
    return head


def _refused(problem: str, key: Path, entries: int | None = None, restore: Path | None = None) -> LedgerError:
    """The error for a ledger that cannot be trusted: what is wrong, then the two ways on (restore ``restore``,
    by default the ledger, or start a new budget)."""
    held = f"at least {_entries(entries)}" if entries else "this site's entries"
    return LedgerError(f"{problem}; not resetting it. Restore {restore or key} from a backup holding {held}; or, if "
                       f"this site is to start a new privacy budget, do so explicitly (the old ledger is archived "
                       f"and the reset logged): fednano ledger new-budget {_site_hint(key)} --reason '...'", problem)


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _site_hint(key: Path) -> str:
    """What to give ``fednano ledger``: the site folder for a ledger at its usual place, else the ledger itself."""
    usual = key.parent.parent / SITE_LEDGER_FILE
    return str(key.parent.parent) if usual == key else str(key)


# --- files, locks, who and when -----------------------------------------------------------------------------


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Readers and writers of one ledger (and its head) take turns: an exclusive ``flock`` on the ledger's
    folder (no lock file left behind; a read may write the head). Nothing to lock if there is no folder yet."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        fd = None
    if fd is None:  # not inside the except: an error of the caller's must not read as "folder not found"
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _private_folder(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=FOLDER_MODE)
        folder.chmod(FOLDER_MODE)  # mkdir's mode is masked by the umask


def _archive(path: Path, label: str, copy: bool = False) -> Path:
    """Move (or copy) whatever is at ``path`` into ``ledger-archive/`` next to it, under a new name; never
    overwrites an archived file."""
    folder = path.parent / ARCHIVE_FOLDER
    _private_folder(folder)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{path.stem}.{label}.{stamp}{path.suffix}"
    for n in range(2, 1000):
        if not os.path.lexists(target):
            break
        target = folder / f"{path.stem}.{label}.{stamp}-{n}{path.suffix}"
    if copy:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(path.read_bytes())
    else:
        os.rename(path, target)
    return target


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
