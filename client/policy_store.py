"""The site's policy store: the verified dosing-policy bundles a hospital has installed, and which one is current.

A site accepts a policy bundle only if it verifies against the coordinator key from the site's own
provisioning kit (``policy_signing.pub``) and its version is newer than every version of that key it has
installed: no rollback, and no replay of the current version. Versions are the coordinator's counter, so
they are compared only between bundles of the same signing key: version 1 of another federation says
nothing about this one. Layout of ``root`` (``<site>/.fednano/policy``, :func:`site_store_root`)::

    current                 {"version": N, "bundle": "versions/<key>/N", "signing_key_id": ..., "manifest_sha256": ...,
                             "installed_utc": ...}
    versions/<key>/<N>/     the installed bundles of the signing key whose fingerprint starts with <key> (16 hex
                            digits), each as received (manifest.json, manifest.sig, files)
    versions/<key>/<N>.verdict.json
                            the release gate's verdict on this site's own logs that came with version N, if one
                            did (:meth:`PolicyStore.site_gate`): {"version": N, "manifest_sha256": ..., "verdict":
                            {worse, estimate, lower, upper, n}, "usual_formulations": ..., "received_utc": ...}

(Stores written before keys were recorded hold ``versions/<N>``; they are read as they are.) A bundle is
copied into a staging folder inside ``versions/``, verified again there (so what is installed is what was
verified, even if the source changes meanwhile), renamed into place and only then is ``current`` replaced
atomically. A rejection or a crash at any point leaves ``current`` and the bundle it points at as they
were. Installs are serialised by an advisory lock on ``root`` (POSIX ``flock``). Older versions are kept,
as an audit trail and as the store's memory of the newest version it has held: deleting or editing
``current`` cannot make an older version current or installable (:meth:`PolicyStore.current` refuses a
``current`` that is not the newest installed version; :meth:`PolicyStore.install` refuses anything older).

The recommender serves what the store holds (:meth:`PolicyStore.check_serving` refuses any other bundle), or
its standard of care when the verdict stored with that version is ``worse`` (:mod:`client.site_gate`). A
verdict belongs to one bundle: it is a file of that version, written atomically before ``current`` names the
bundle (an install without a verdict removes any left there), and one whose manifest is not ``current``'s is
refused. A new version without a verdict has none: the previous version's does not carry over.

Example
-------
>>> store = PolicyStore(Path("policy"), Path("kit/policy_signing.pub"))   # doctest: +SKIP
>>> store.install(Path("received/policy-v3")).version                     # doctest: +SKIP
3
>>> store.current().metrics                                               # doctest: +SKIP
{'auroc': 0.81}
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from client.site_gate import SiteGate, UsualFormulations
from shared.durable import fsync_folder, write_json_atomically
from shared.policy_bundle import (
    MANIFEST_FILE,
    SHA256_HEX,
    SIGNATURE_FILE,
    BundleRejected,
    Manifest,
    key_fingerprint,
    load_trust_key,
    verify_bundle_with_key,
)
from shared.protocol.policy import SiteVerdict

CURRENT_FILE, VERSIONS_FOLDER, VERDICT_SUFFIX = "current", "versions", ".verdict.json"
STAGING_PREFIX = ".staging-"
CURRENT_KEYS = ("version", "bundle", "signing_key_id", "manifest_sha256", "installed_utc")
VERDICT_KEYS = ("manifest_sha256", "received_utc", "usual_formulations", "verdict", "version")
KEY_FOLDER_CHARS = 16
"""Hex digits of the signing key's fingerprint naming its folder (64 bits: no two federations' keys collide)."""
STORE_FOLDER = Path(".fednano") / "policy"
"""Where a site keeps its installed policies, relative to its data folder (beside its privacy ledger)."""


def site_store_root(site_path: Path) -> Path:
    """The policy store of the site whose data are at ``site_path`` (a folder, or a file in it)."""
    site_path = Path(site_path)
    folder = site_path if site_path.is_dir() else site_path.parent
    return folder / STORE_FOLDER


class PolicyStoreError(RuntimeError):
    """The store's own files cannot be trusted (a damaged ``current`` file or installed bundle)."""


class PolicyStore:
    """The dosing-policy bundles this site has installed: installs only verified, newer versions.

    Parameters
    ----------
    root : Path
        The store's folder on the site's disk; created on the first install.
    trusted_public_key_path : Path
        The coordinator's ``policy_signing.pub`` from this site's provisioning kit. Read once, here: a
        key that cannot be read fails at start-up rather than at the first bundle.
    """

    def __init__(self, root: Path, trusted_public_key_path: Path):
        self.root = Path(root)
        self.trusted_public_key_path = Path(trusted_public_key_path)
        self._trusted_key = load_trust_key(self.trusted_public_key_path)
        self._key_id = key_fingerprint(self._trusted_key)

    def current_version(self) -> int | None:
        """The installed version as ``current`` records it, or None if nothing is installed."""
        state = self._read_current()
        return None if state is None else state["version"]

    def installed_path(self) -> Path | None:
        """The folder of the current bundle, or None if nothing is installed."""
        state = self._read_current()
        return None if state is None else self.root / state["bundle"]

    def current(self) -> Manifest | None:
        """The current bundle's manifest, verified again on disk; None if nothing is installed.

        Raises
        ------
        PolicyStoreError
            If the installed bundle no longer verifies or is not the one ``current`` records; if it was
            signed by another key than this site's trust key; if ``current`` is missing or names an older
            version while a newer one of this key is installed (``current`` deleted or edited: serving it
            would be a rollback).
        """
        state = self._read_current()
        newest = self._newest_installed()
        if state is None:
            if newest is not None:
                raise PolicyStoreError(f"{self.root / CURRENT_FILE} is missing, but version {newest[0]} of this "
                                       "site's coordinator key is installed: the file was deleted; install the "
                                       f"newest policy again (version {newest[0]} or later)")
            return None
        if state["signing_key_id"] not in (None, self._key_id):
            raise PolicyStoreError(f"the current policy (version {state['version']}) was signed by another key "
                                   f"({state['signing_key_id'][:KEY_FOLDER_CHARS]}...) than this site's trust key "
                                   f"{self.trusted_public_key_path} ({self._key_id[:KEY_FOLDER_CHARS]}...): it "
                                   "belongs to another federation; install this federation's policy")
        folder = self.root / state["bundle"]
        try:
            manifest = verify_bundle_with_key(folder, self._trusted_key)
        except BundleRejected as err:
            raise PolicyStoreError(f"installed policy version {state['version']} is damaged: {err}") from None
        actual = _sha256(folder / MANIFEST_FILE)
        if manifest.version != state["version"] or actual != state["manifest_sha256"]:
            raise PolicyStoreError(f"{folder} is not the bundle {self.root / CURRENT_FILE} records "
                                   f"(version {manifest.version}, manifest SHA-256 {actual})")
        if newest is not None and newest[0] > manifest.version:
            raise PolicyStoreError(f"{self.root / CURRENT_FILE} names version {manifest.version}, but version "
                                   f"{newest[0]} is installed: the file was edited or an install was "
                                   f"interrupted; install version {newest[0]} again")
        return manifest

    def site_gate(self) -> SiteGate | None:
        """The release gate's verdict on this site's own logs stored with the current version, or None (no
        policy installed, or it came without a verdict). Does not verify the bundle (:meth:`current` does).

        Raises
        ------
        PolicyStoreError
            If ``verdict`` (or ``current``) is not what an install writes, naming the file.
        """
        path = self.verdict_path()
        if path is None or not path.exists():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PolicyStoreError(f"{path}: cannot read it: {err}") from None
        try:
            if not isinstance(stored, dict) or set(stored) != set(VERDICT_KEYS):
                raise ValueError(f"expected the keys {', '.join(VERDICT_KEYS)}")
            version, sha256 = stored["version"], stored["manifest_sha256"]
            if not isinstance(version, int) or isinstance(version, bool) or not isinstance(sha256, str):
                raise ValueError("expected an integer version and the manifest's SHA-256")
            verdict = SiteVerdict.from_dict(stored["verdict"])
            usual = stored["usual_formulations"]
            usual = None if usual is None else UsualFormulations.from_dict(usual)
        except (ValueError, TypeError) as err:
            raise PolicyStoreError(f"{path}: not what an install writes ({err}); install the policy again to "
                                   "receive its verdict") from None
        state = self._read_current()
        if version != state["version"] or sha256 != state["manifest_sha256"]:
            raise PolicyStoreError(f"{path}: a verdict for another bundle (version {version}) than the one "
                                   f"{self.root / CURRENT_FILE} records; install the policy again")
        return SiteGate(version, verdict, usual)

    def verdict_path(self) -> Path | None:
        """Where the current version's verdict is (or would be); None if nothing is installed."""
        installed = self.installed_path()
        return None if installed is None else verdict_path(installed)

    def check_serving(self, bundle_dir: Path, manifest: Manifest) -> None:
        """Refuse to serve a verified bundle that is not the store's current policy.

        Raises
        ------
        BundleRejected
            If the store holds a policy and ``manifest`` (of ``bundle_dir``) is older ("rollback"), newer
            (not installed: install it first) or another bundle of the same version.
        PolicyStoreError
            If the store's own current policy cannot be trusted (see :meth:`current`).
        """
        current = self.current()
        if current is None:
            return
        where = f"policy bundle {bundle_dir} refused: the site's store {self.root} holds version {current.version}"
        if manifest.version < current.version:
            raise BundleRejected(f"{where}; this bundle is version {manifest.version}, older (rollback): serve "
                                 "the installed policy (--site without --policy)")
        if manifest.version > current.version:
            raise BundleRejected(f"{where}; this bundle is version {manifest.version}, not installed: the "
                                 "recommender serves what the site installed, so install it first")
        if manifest != current:
            raise BundleRejected(f"{where}, and this bundle is another version {manifest.version} (its manifest "
                                 "differs from the installed one)")

    def install(self, bundle_dir: Path, verdict: SiteVerdict | None = None,
                usual: UsualFormulations | None = None) -> Manifest:
        """Verify ``bundle_dir``, copy it into the store and make it current; return its manifest.

        ``verdict`` (the release gate's figures on this site's logs) and ``usual`` (the site's usual
        formulations, from its logs) are stored with this version (:meth:`site_gate`); without a verdict the
        previous version's is removed.

        Raises
        ------
        BundleRejected
            If the bundle does not verify (see :func:`shared.policy_bundle.verify_bundle`), or its version
            is not newer than the installed one ("rollback: ..."). The current policy is left untouched.
        PolicyStoreError
            If the store's ``current`` file is damaged (nothing is installed then: the installed version,
            and so what would be a rollback, is unknown).
        """
        bundle_dir = Path(bundle_dir)
        manifest = verify_bundle_with_key(bundle_dir, self._trusted_key)
        self._check_newer(bundle_dir, manifest)  # early, without touching the disk
        versions = self.root / VERSIONS_FOLDER
        versions.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._check_newer(bundle_dir, manifest)  # again: another install may have run meanwhile
            _remove_stale_staging(versions)
            staging = Path(tempfile.mkdtemp(dir=versions, prefix=STAGING_PREFIX))
            try:
                staged = self._stage(bundle_dir, manifest, staging)
                target = self._bundle_folder(manifest.version)
                target.parent.mkdir(exist_ok=True)
                if target.exists():  # left by an interrupted install, or the same bundle installed again
                    shutil.rmtree(target)
                os.rename(staging, target)
                fsync_folder(target.parent)
                if verdict is None:
                    verdict_path(target).unlink(missing_ok=True)  # an interrupted install's
                else:
                    self._write_verdict(manifest, target, verdict, usual)
                self._write_current(manifest, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return staged

    # -----------------------------------------------------------------------------------------------------

    def _bundle_folder(self, version: int) -> Path:
        return self.root / VERSIONS_FOLDER / self._key_id[:KEY_FOLDER_CHARS] / str(version)

    def _check_newer(self, bundle_dir: Path, manifest: Manifest) -> None:
        """A bundle must be newer than this key's current version and not older than any version of this key
        the store holds. The newest held version may be installed again only when ``current`` does not point
        at it (``current`` lost, or an install interrupted after the rename) and only as the same bundle."""
        state = self._read_current()
        same_key = state is not None and state["signing_key_id"] in (None, self._key_id)
        installed = state["version"] if same_key else None
        newest = self._newest_installed()
        if installed is not None and manifest.version <= installed:
            raise BundleRejected(f"policy bundle {bundle_dir} rejected: rollback: bundle version "
                                 f"{manifest.version} is not newer than installed version {installed}")
        if newest is None or manifest.version > newest[0]:
            return
        if manifest.version < newest[0]:
            raise BundleRejected(f"policy bundle {bundle_dir} rejected: rollback: bundle version "
                                 f"{manifest.version} is older than version {newest[0]}, which this store has "
                                 "installed before")
        if manifest != newest[1]:
            raise BundleRejected(f"policy bundle {bundle_dir} rejected: the store holds another bundle of version "
                                 f"{manifest.version} from the same key")

    def _newest_installed(self) -> tuple[int, Manifest] | None:
        """The newest bundle of this site's trust key anywhere in ``versions/`` that still verifies."""
        newest = None
        for folder in self._installed_folders():
            try:
                manifest = verify_bundle_with_key(folder, self._trusted_key)
            except (BundleRejected, OSError):
                continue  # damaged or another key's: it cannot vouch for a version
            if newest is None or manifest.version > newest[0]:
                newest = (manifest.version, manifest)
        return newest

    def _installed_folders(self) -> list[Path]:
        """This key's bundle folders, and the bundles of the older flat layout (``versions/<N>``)."""
        versions = self.root / VERSIONS_FOLDER
        if not versions.is_dir():
            return []
        mine = versions / self._key_id[:KEY_FOLDER_CHARS]
        flat = [p for p in versions.iterdir() if p.name.isdigit() and len(p.name) < KEY_FOLDER_CHARS]
        return flat + (sorted(p for p in mine.iterdir() if p.name.isdigit()) if mine.is_dir() else [])

    def _stage(self, bundle_dir: Path, manifest: Manifest, staging: Path) -> Manifest:
        """Copy the verified files into ``staging`` and verify the copy: it must be the bundle verified."""
        for name in (MANIFEST_FILE, SIGNATURE_FILE, *manifest.files):
            shutil.copyfile(bundle_dir / name, staging / name)
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        try:
            staged = verify_bundle_with_key(staging, self._trusted_key)
        except BundleRejected as err:
            raise BundleRejected(f"policy bundle {bundle_dir} rejected: it changed while being installed "
                                 f"({err})") from None
        if staged != manifest:
            raise BundleRejected(f"policy bundle {bundle_dir} rejected: it changed while being installed "
                                 f"(now version {staged.version})")
        return staged

    def _read_current(self) -> dict | None:
        """``current`` as a dict with every key of ``CURRENT_KEYS`` (``signing_key_id`` None in the older
        layout), or None if there is none; ``PolicyStoreError`` if it is not what an install writes."""
        path = self.root / CURRENT_FILE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PolicyStoreError(f"{path}: cannot read it: {err}") from None
        version = state.get("version") if isinstance(state, dict) else None
        key_id = state.get("signing_key_id") if isinstance(version, int) else None
        expected = (f"{VERSIONS_FOLDER}/{version}" if key_id is None else
                    f"{VERSIONS_FOLDER}/{str(key_id)[:KEY_FOLDER_CHARS]}/{version}")
        if (not isinstance(version, int) or isinstance(version, bool) or version < 1
                or not (key_id is None or (isinstance(key_id, str) and SHA256_HEX.fullmatch(key_id)))
                or state.get("bundle") != expected or not isinstance(state.get("manifest_sha256"), str)):
            raise PolicyStoreError(f"{path}: expected {{{', '.join(CURRENT_KEYS)}}} with bundle "
                                   f"'{VERSIONS_FOLDER}/<key>/<version>'; it is not what an install writes")
        return state | {"signing_key_id": key_id}

    def _write_verdict(self, manifest: Manifest, target: Path, verdict: SiteVerdict,
                       usual: UsualFormulations | None) -> None:
        state = {"version": manifest.version, "manifest_sha256": _sha256(target / MANIFEST_FILE),
                 "verdict": verdict.to_dict(), "usual_formulations": None if usual is None else usual.to_dict(),
                 "received_utc": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_atomically(verdict_path(target), state, sort_keys=True)

    def _write_current(self, manifest: Manifest, target: Path) -> None:
        state = {"version": manifest.version, "bundle": target.relative_to(self.root).as_posix(),
                 "signing_key_id": manifest.signing_key_id, "manifest_sha256": _sha256(target / MANIFEST_FILE),
                 "installed_utc": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_atomically(self.root / CURRENT_FILE, state, sort_keys=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def verdict_path(bundle_folder: Path) -> Path:
    """The verdict file of the installed bundle in ``bundle_folder`` (beside it: a bundle holds its files only)."""
    return bundle_folder.with_name(bundle_folder.name + VERDICT_SUFFIX)


def _remove_stale_staging(versions: Path) -> None:
    """Staging folders of installs that crashed (only called under the store's lock)."""
    for path in versions.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
