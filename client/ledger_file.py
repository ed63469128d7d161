"""The privacy ledger's file and the copy of its head kept apart: the tamper-evident storage of
:mod:`client.ledger`.

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
import socket
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

LEGACY_ENTRY_KEYS = ("run_id", "round", "steps", "noise_multiplier", "sample_rate", "epsilon_after",
                     "epsilon_budget", "utc")
ENTRY_KEYS = (*LEGACY_ENTRY_KEYS, "phase", "prev")
RELEASE_KEY = "release"
"""Optional entry key: the site's keyed digest of what the charged release sent (``client.dp.release_tag``), so
the same release asked again in the same run (a resumed run redoing a round) is not charged twice."""
RELEASE_HEX = re.compile(r"[0-9a-f]{32,64}")
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
        return (f"{entries_text(self.entries)}, {self.steps} steps, ε={self.epsilon:.4f} spent at δ={self.delta:g} in "
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
            raise refused(f"ledger head {file} (the second copy of {ledger}'s chain head) is unreadable: {e}",
                           ledger, restore=file) from e
        try:
            head = _parse_head(state)
        except (KeyError, TypeError, ValueError) as e:
            raise refused(f"ledger head {file} (the second copy of {ledger}'s chain head) is corrupt: {e}",
                           ledger, restore=file) from e
        if head.ledger != str(ledger):
            raise refused(f"ledger head {file} belongs to {head.ledger}, not {ledger}", ledger, restore=file)
        return head

    def write(self, head: LedgerHead) -> None:
        _private_folder(self.folder)
        state = {"schema_version": HEAD_SCHEMA_VERSION, **asdict(head), "resets": list(head.resets)}
        write_json_atomically(self.file_for(Path(head.ledger)), state, mode=FILE_MODE)


@dataclass
class Chain:
    """A ledger's header, entries and history, with the hash of every entry (verified when read from a file)."""

    header: dict[str, Any]
    entries: list[dict[str, Any]]
    history: list[HistoryStep]
    hashes: list[str] = field(default_factory=list)

    @property
    def genesis(self) -> str:
        return digest(self.header)

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
        self.hashes.append(digest(entry))
        self.history = appended(self.history, [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])

    def to_file(self) -> dict[str, Any]:
        return {**self.header, "entries": self.entries, "history": [list(step) for step in self.history],
                "head": self.head}


def appended(history: Sequence[HistoryStep], new_steps: Iterable[HistoryStep]) -> list[HistoryStep]:
    """History with new steps, merged into the last tuple when noise and rate match (as Opacus does)."""
    merged = list(history)
    for noise_multiplier, sample_rate, steps in new_steps:
        if merged and merged[-1][:2] == (noise_multiplier, sample_rate):
            merged[-1] = (noise_multiplier, sample_rate, merged[-1][2] + steps)
        else:
            merged.append((noise_multiplier, sample_rate, steps))
    return merged


def check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (_is_number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def read_ledger_file(path: Path, key: Path) -> dict[str, Any] | None:
    """The ledger's JSON (strict: no repeated key, no NaN), None if there is no file; LedgerError for a link,
    a folder, anything but a regular file, or unreadable JSON."""
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise refused(f"privacy ledger {path} cannot be examined: {e}", key) from e
    if stat.S_ISLNK(kind):
        raise refused(f"privacy ledger {path} is a symbolic link (to {os.readlink(path)}), not a file: a link can "
                       "point at another site's ledger or at nothing, and a write would replace the link", key)
    if not stat.S_ISREG(kind):
        what = "a folder" if stat.S_ISDIR(kind) else "not a regular file"
        raise refused(f"privacy ledger {path} is {what}, not a ledger file", key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, encoding="utf-8") as f:
            return strict_json.loads(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise refused(f"privacy ledger {path} is unreadable: {e}", key) from e


def is_legacy(state: Any) -> bool:
    return isinstance(state, dict) and state.get("schema_version") == LEGACY_SCHEMA_VERSION


def verify_chain(state: Any, path: Path) -> Chain:
    """A version-2 ledger's content with every field checked and its chain verified, or LedgerError."""

    def corrupt(what: str) -> LedgerError:
        return refused(f"privacy ledger {path} is corrupt: {what}", path)

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
    chain = Chain(header, [], [])
    for i, entry in enumerate(state["entries"]):
        if not isinstance(entry, dict) or set(entry) - {RELEASE_KEY} != set(ENTRY_KEYS):
            raise corrupt(f"entry {i} {entry!r}: expected the keys {list(ENTRY_KEYS)} (and optionally "
                          f"{RELEASE_KEY!r})")
        if problem := next(_entry_problems(entry), None):
            raise corrupt(f"entry {i}: {problem}")
        if entry["prev"] != chain.head:
            raise corrupt("entry 0 does not follow the header: the header (δ, site id, budget number) was edited, "
                          "or entries were removed or reordered" if i == 0
                          else f"entry {i - 1} was edited, or entries were removed or reordered: entry {i} does not "
                               f"follow entry {i - 1} (hash chain broken)")
        chain.entries.append(entry)
        chain.hashes.append(digest(entry))
        chain.history = appended(chain.history, [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])
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
        check_step(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
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
    if RELEASE_KEY in entry and not (isinstance(entry[RELEASE_KEY], str) and RELEASE_HEX.fullmatch(entry[RELEASE_KEY])):
        yield f"{RELEASE_KEY} {entry[RELEASE_KEY]!r}: expected 32 to 64 hex digits"


def _history(steps: list[Any], corrupt) -> list[HistoryStep]:
    history = []
    for step in steps:
        try:
            noise_multiplier, sample_rate, count = step
            check_step(noise_multiplier, sample_rate, count)
        except (TypeError, ValueError) as e:
            raise corrupt(f"history step {step!r}: {e}") from e
        history.append((float(noise_multiplier), float(sample_rate), count))
    return history


def parse_legacy(state: dict[str, Any], path: Path) -> tuple[list[HistoryStep], list[dict[str, Any]]]:
    """History and entries of a version-1 file (no chain), or LedgerError naming the file and what is wrong."""

    def corrupt(what: str) -> LedgerError:
        return refused(f"privacy ledger {path} (version 1) is corrupt: {what}", path)

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
        replayed = appended(replayed, [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])
    if replayed != history:
        raise corrupt(f"history {state['history']} is not the entries' steps merged ({replayed})")
    return history, state["entries"]


def new_header(delta: float, site_id: str, budget_number: int, reset: dict[str, Any] | None,
                started: str | None = None, migrated_from: int | None = None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "site_id": site_id, "budget_number": budget_number, "delta": delta,
            "started_utc": started or now(), "reset": reset, "migrated_from": migrated_from}


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def check_against_head(chain: Chain, head: LedgerHead, path: Path, head_file: Path) -> None:
    """LedgerError unless the ledger is the one the head was written for, at or beyond the head."""
    key = Path(head.ledger)
    kept = f"its head kept in {head_file} says {head.describe()}"
    if chain.header["site_id"] != head.site_id or chain.header["budget_number"] != head.budget_number:
        raise refused(
            f"privacy ledger {path} is another ledger than the one this site keeps (site id "
            f"{chain.header['site_id'][:8]}…, budget {chain.header['budget_number']}; {kept}, site id "
            f"{head.site_id[:8]}…)", key, head.entries)
    if len(chain.entries) < head.entries:
        raise refused(
            f"privacy ledger {path} is behind: it holds {entries_text(len(chain.entries))} but {kept}: entries were "
            f"removed, or an older copy put back", key, head.entries)
    if chain.hash_at(head.entries) != head.head:
        raise refused(
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


def refused(problem: str, key: Path, entries: int | None = None, restore: Path | None = None) -> LedgerError:
    """The error for a ledger that cannot be trusted: what is wrong, then the two ways on (restore ``restore``,
    by default the ledger, or start a new budget)."""
    held = f"at least {entries_text(entries)}" if entries else "this site's entries"
    return LedgerError(f"{problem}; not resetting it. Restore {restore or key} from a backup holding {held}; or, if "
                       f"this site is to start a new privacy budget, do so explicitly (the old ledger is archived "
                       f"and the reset logged): fednano ledger new-budget {site_hint(key)} --reason '...'", problem)


def entries_text(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def site_hint(key: Path) -> str:
    """What to give ``fednano ledger``: the site folder for a ledger at its usual place, else the ledger itself."""
    usual = key.parent.parent / SITE_LEDGER_FILE
    return str(key.parent.parent) if usual == key else str(key)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
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
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True, mode=FOLDER_MODE)
    except FileExistsError:
        if folder.is_dir():  # another process of the site (e.g. a second ClientApp actor) made it meanwhile
            return
        raise
    folder.chmod(FOLDER_MODE)  # mkdir's mode is masked by the umask


def archive(path: Path, label: str, copy: bool = False) -> Path:
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


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
