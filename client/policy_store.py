"""The site's policy store: the verified dosing-policy bundles a hospital has installed, and which one is current.

A site accepts a policy bundle only if it verifies against the coordinator key from the site's own
provisioning kit (``policy_signing.pub``) and its version is newer than the installed one: no rollback, and no
replay of the current version. Layout of ``root``::

    current                 {"version": N, "bundle": "versions/N", "manifest_sha256": ..., "installed_utc": ...}
    versions/<N>/           the installed bundles, each as received (manifest.json, manifest.sig, files)

A bundle is copied into a staging folder inside ``versions/``, verified again there (so what is installed is
what was verified, even if the source changes meanwhile), renamed to ``versions/<N>`` and only then is
``current`` replaced atomically. A rejection or a crash at any point leaves ``current`` and the bundle it
points at as they were. Installs are serialised by an advisory lock on ``root`` (POSIX ``flock``). Older
versions are kept as an audit trail.

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

from shared.durable import fsync_folder, write_json_atomically
from shared.policy_bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleRejected,
    Manifest,
    load_trust_key,
    verify_bundle_with_key,
)

CURRENT_FILE, VERSIONS_FOLDER = "current", "versions"
STAGING_PREFIX = ".staging-"
CURRENT_KEYS = ("version", "bundle", "manifest_sha256", "installed_utc")


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
            If the installed bundle no longer verifies or is not the one ``current`` records.
        """
        state = self._read_current()
        if state is None:
            return None
        folder = self.root / state["bundle"]
        try:
            manifest = verify_bundle_with_key(folder, self._trusted_key)
        except BundleRejected as err:
            raise PolicyStoreError(f"installed policy version {state['version']} is damaged: {err}") from None
        actual = _sha256(folder / MANIFEST_FILE)
        if manifest.version != state["version"] or actual != state["manifest_sha256"]:
            raise PolicyStoreError(f"{folder} is not the bundle {self.root / CURRENT_FILE} records "
                                   f"(version {manifest.version}, manifest SHA-256 {actual})")
        return manifest

    def install(self, bundle_dir: Path) -> Manifest:
        """Verify ``bundle_dir``, copy it into the store and make it current; return its manifest.

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
                target = versions / str(manifest.version)
                if target.exists():  # left by an install interrupted before `current` was replaced
                    shutil.rmtree(target)
                os.rename(staging, target)
                fsync_folder(versions)
                self._write_current(manifest, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return staged

    # -----------------------------------------------------------------------------------------------------

    def _check_newer(self, bundle_dir: Path, manifest: Manifest) -> None:
        installed = self.current_version()
        if installed is not None and manifest.version <= installed:
            raise BundleRejected(f"policy bundle {bundle_dir} rejected: rollback: bundle version "
                                 f"{manifest.version} is not newer than installed version {installed}")

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
        path = self.root / CURRENT_FILE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PolicyStoreError(f"{path}: cannot read it: {err}") from None
        version = state.get("version") if isinstance(state, dict) else None
        if (not isinstance(version, int) or isinstance(version, bool) or version < 1
                or state.get("bundle") != f"{VERSIONS_FOLDER}/{version}"
                or not isinstance(state.get("manifest_sha256"), str)):
            raise PolicyStoreError(f"{path}: expected {{{', '.join(CURRENT_KEYS)}}} with bundle "
                                   f"'{VERSIONS_FOLDER}/<version>', got {state!r}")
        return state

    def _write_current(self, manifest: Manifest, target: Path) -> None:
        state = {"version": manifest.version, "bundle": f"{VERSIONS_FOLDER}/{manifest.version}",
                 "manifest_sha256": _sha256(target / MANIFEST_FILE),
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


def _remove_stale_staging(versions: Path) -> None:
    """Staging folders of installs that crashed (only called under the store's lock)."""
    for path in versions.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

