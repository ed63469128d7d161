"""Policy bundles: the signed folder in which the coordinator ships the global dosing policy to the sites.

A bundle is a folder holding exactly::

    manifest.json   what the bundle is (see :class:`Manifest`), canonical JSON: sorted keys, 2-space indent,
                    UTF-8 (not ASCII-escaped), no NaN or Infinity, one trailing newline
    manifest.sig    the coordinator's Ed25519 signature over the exact bytes of manifest.json, as one line of
                    standard base64 (RFC 4648, with padding) and a newline: 64 signature bytes, 89 file bytes
    <files>         the files the manifest lists by SHA-256 (``encoder.json``, ``ann_federated.pt``,
                    ``xgb_*.json``, ``policy.json``, ...), plain names only, no sub-folders

Only signed content may sit in a bundle: a file the manifest does not list is a reason to reject it, as is
a missing or altered one. The signing key is the coordinator's ``policy_signing.key`` (PKCS8 PEM) from the
provisioning kit (:mod:`server.provision`); every site trusts the ``policy_signing.pub`` (SubjectPublicKeyInfo
PEM) in its own kit, never a key that arrives with a bundle. Ed25519 signatures are deterministic (RFC 8032),
so the same inputs and ``created_utc`` give byte-identical manifest.json and manifest.sig.

This module knows nothing of rollback: :class:`client.policy_store.PolicyStore` keeps a site's installed
version and refuses any bundle that is not newer.

Example
-------
>>> path = build_bundle(Path("out/policy-v3"), {"policy.json": Path("policy.json")}, version=3,
...                     run_id="4211", privacy={"alpha": {"epsilon": 2.1, "delta": 1e-5, "budget": 3.0}},
...                     metrics={"auroc": 0.81}, safety_bounds={"max_dose_mg_m2": 50.0},
...                     signing_key_path=Path("kit/coordinator/policy_signing.key"))  # doctest: +SKIP
>>> verify_bundle(path, Path("kit/sites/alpha/policy_signing.pub")).version               # doctest: +SKIP
3
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared import strict_json

FORMAT = "fednano-policy-bundle/1"
"""Format string every manifest carries; a site rejects any other."""

MANIFEST_FILE, SIGNATURE_FILE = "manifest.json", "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_FILE, SIGNATURE_FILE})

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Names of the files in a bundle: plain, portable, never hidden; ``..`` is refused on top of this."""

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature (RFC 8032, section 5.1.6)."""

HASH_CHUNK = 1 << 20
MANIFEST_KEYS = ("format", "version", "created_utc", "run_id", "files", "privacy", "metrics", "safety_bounds",
                 "signing_key_id")
PRIVACY_KEYS = ("epsilon", "delta", "budget")


class BundleRejected(ValueError):
    """A policy bundle that must not be used: unsigned, altered, signed by another key, malformed or too old."""


@dataclass(frozen=True)
class Manifest:
    """What a policy bundle holds and where it comes from: the signed part of the bundle.

    Every field is checked on construction; a bad one raises ``ValueError`` naming it.

    Parameters
    ----------
    version : int
        Policy version, >= 1; a site installs only a version newer than the one it has.
    created_utc : str
        When the bundle was built: ISO 8601 with a zero UTC offset, e.g. ``2025-05-01T12:00:00Z``.
    run_id : str
        The Flower run that trained the models (``str(context.run_id)``).
    files : dict of str to str
        Every file of the bundle besides manifest.json and manifest.sig, name to SHA-256 (lower-case hex).
    privacy : dict of str to dict
        Per site, ``{"epsilon": spent, "delta": δ, "budget": ε budget}``; each a finite number >= 0, or
        ``None`` for a site that trains without differential privacy.
    metrics : dict
        Validation metrics, JSON-safe (str keys; str, int, float (finite), bool, None, lists, dicts).
    safety_bounds : dict
        The hard safety rules the policy is bound by, JSON-safe.
    signing_key_id : str
        :func:`key_fingerprint` of the public key whose private half signs the manifest.
    format : str, default FORMAT
        ``"fednano-policy-bundle/1"``.
    """

    version: int
    created_utc: str
    run_id: str
    files: dict[str, str]
    privacy: dict[str, dict[str, float | None]]
    metrics: dict[str, Any]
    safety_bounds: dict[str, Any]
    signing_key_id: str
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {self.format!r}")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise ValueError(f"version: expected an integer >= 1, got {self.version!r}")
        _check_utc(self.created_utc)
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id: expected a non-empty string, got {self.run_id!r}")
        _check_files(self.files)
        _check_privacy(self.privacy)
        _check_json_object(self.metrics, "metrics")
        _check_json_object(self.safety_bounds, "safety_bounds")
        if not isinstance(self.signing_key_id, str) or not SHA256_HEX.fullmatch(self.signing_key_id):
            raise ValueError(f"signing_key_id: expected 64 lower-case hex digits, got {self.signing_key_id!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in MANIFEST_KEYS}

    def to_json_bytes(self) -> bytes:
        """The manifest as signed: :func:`canonical_json` of :meth:`to_dict`."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest.json; ``ValueError`` for bad UTF-8 or JSON, duplicate or missing keys, bad fields."""
        try:
            state = strict_json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8: {err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON: {err}") from err
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r} is not {FORMAT!r}")
        missing = [k for k in MANIFEST_KEYS if k not in state]
        unknown = sorted(set(state) - set(MANIFEST_KEYS))
        if missing or unknown:
            raise ValueError(f"expected the keys {', '.join(MANIFEST_KEYS)}; missing {missing or 'none'}, "
                             f"unknown {unknown or 'none'}")
        return cls(**state)


# ---------------------------------------------------------------------------------------------------------
# Building and verifying


def build_bundle(out_dir: Path, files: Mapping[str, Path], version: int, run_id: str,
                 privacy: Mapping[str, Mapping[str, float | None]], metrics: Mapping[str, Any],
                 safety_bounds: Mapping[str, Any], signing_key_path: Path, *,
                 created_utc: datetime | None = None) -> Path:
    """Write a signed policy bundle into the new folder ``out_dir`` and return it.

    Parameters
    ----------
    out_dir : Path
        The bundle folder; must not exist (a bundle is never overwritten). Its parents are created.
    files : mapping of str to Path
        Name in the bundle (plain: letters, digits, ``.``, ``_``, ``-``; no ``..``) to the file to copy.
    version, run_id, privacy, metrics, safety_bounds
        As in :class:`Manifest`.
    signing_key_path : Path
        The coordinator's ``policy_signing.key`` (PKCS8 PEM, unencrypted, Ed25519).
    created_utc : datetime, optional
        Creation time (timezone-aware; stored in UTC to the second); now if not given.

    Returns
    -------
    Path
        ``out_dir``, verified against the signing key's public half before returning.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists.
    ValueError
        For a bad file name, a missing source file, or a bad manifest field (naming it).
    """
    out_dir = Path(out_dir)
    key = load_signing_key(signing_key_path)
    public_key = key.public_key()
    for name, source in files.items():
        check_file_name(name)
        if not Path(source).is_file():
            raise ValueError(f"files[{name!r}]: {source} is not a file")
    placeholder = {name: "0" * 64 for name in files}
    manifest = Manifest(version=version, created_utc=_format_utc(created_utc or datetime.now(UTC)),
                        run_id=run_id, files=placeholder, privacy=_plain(privacy), metrics=_plain(metrics),
                        safety_bounds=_plain(safety_bounds), signing_key_id=key_fingerprint(public_key))
    try:
        out_dir.mkdir(parents=True)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing policy bundle folder {out_dir}") from None
    try:
        hashes = {}
        for name, source in files.items():
            shutil.copyfile(source, out_dir / name)
            hashes[name] = file_sha256(out_dir / name)  # the copy, as the sites will hash it
        manifest = dataclasses.replace(manifest, files=hashes)
        data = manifest.to_json_bytes()
        (out_dir / MANIFEST_FILE).write_bytes(data)
        (out_dir / SIGNATURE_FILE).write_bytes(base64.b64encode(key.sign(data)) + b"\n")
        verify_bundle_with_key(out_dir, public_key)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def verify_bundle(bundle_dir: Path, trusted_public_key_path: Path) -> Manifest:
    """The manifest of ``bundle_dir`` if the bundle is intact and signed by the key at ``trusted_public_key_path``.

    ``trusted_public_key_path`` is the site's own ``policy_signing.pub`` (from its provisioning kit).
    Raises :class:`BundleRejected`, naming the bundle and the reason, for anything else; ``ValueError`` if the
    trusted key file itself cannot be read as an Ed25519 public key.
    """
    return verify_bundle_with_key(bundle_dir, load_trust_key(trusted_public_key_path))


def verify_bundle_with_key(bundle_dir: Path, trusted_key: ed25519.Ed25519PublicKey) -> Manifest:
    """:func:`verify_bundle` with the trusted key already loaded.

    Checks, in order: manifest.json and manifest.sig present; the signature verifies against the trusted
    key over the exact manifest bytes (before any JSON is parsed); the manifest is well formed with the
    right format string; it names the trusted key; every listed file is present, a regular file, and has
    its SHA-256; nothing else is in the folder.
    """
    bundle_dir = Path(bundle_dir)
    fingerprint = key_fingerprint(trusted_key)

    def reject(reason: str) -> BundleRejected:
        return BundleRejected(f"policy bundle {bundle_dir} rejected: {reason}")

    if not bundle_dir.is_dir():
        raise reject("it is not a folder")
    entries = {p.name: p for p in bundle_dir.iterdir()}
    for name, path in entries.items():
        if path.is_symlink() or not path.is_file():
            raise reject(f"{name} is not a regular file (bundles hold plain files only, no links or folders)")
    if MANIFEST_FILE not in entries:
        raise reject(f"it has no {MANIFEST_FILE} (unsigned or incomplete bundle)")
    if SIGNATURE_FILE not in entries:
        raise reject(f"it has no {SIGNATURE_FILE}: unsigned bundles are never accepted")
    data = entries[MANIFEST_FILE].read_bytes()
    signature = _read_signature(entries[SIGNATURE_FILE], reject)
    try:
        trusted_key.verify(signature, data)
    except InvalidSignature:
        raise reject(f"the signature of {MANIFEST_FILE} does not verify against the trusted key {fingerprint} "
                     "(the manifest was altered after signing, or another key signed it)") from None
    try:
        manifest = Manifest.from_json_bytes(data)
    except (TypeError, ValueError) as err:
        raise reject(f"{MANIFEST_FILE} is malformed: {err}") from None
    if manifest.signing_key_id != fingerprint:
        raise reject(f"the manifest names signing key {manifest.signing_key_id} but the trusted key is "
                     f"{fingerprint}")
    missing = sorted(set(manifest.files) - set(entries))
    if missing:
        raise reject(f"listed file(s) missing: {', '.join(missing)}")
    extra = sorted(set(entries) - set(manifest.files) - RESERVED_NAMES)
    if extra:
        raise reject(f"it holds file(s) the manifest does not list: {', '.join(extra)} "
                     "(only signed content may sit in a bundle)")
    for name, expected in sorted(manifest.files.items()):
        actual = file_sha256(entries[name])
        if actual != expected:
            raise reject(f"file {name} does not match its SHA-256 in the manifest "
                         f"(expected {expected}, got {actual})")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Bundles as bytes, to send them in a Flower message (e.g. a ConfigRecord of name -> bytes)


def bundle_contents(bundle_dir: Path) -> dict[str, bytes]:
    """Every file of ``bundle_dir`` by name, manifest and signature included; nothing is verified here."""
    contents = {}
    for path in sorted(Path(bundle_dir).iterdir()):
        if path.name not in RESERVED_NAMES:
            check_file_name(path.name)
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"policy bundle {bundle_dir}: {path.name} is not a regular file")
        contents[path.name] = path.read_bytes()
    return contents


def unpack_bundle(contents: Mapping[str, bytes], out_dir: Path) -> Path:
    """Write received bundle ``contents`` (as from :func:`bundle_contents`) into the new folder ``out_dir``.

    Only checks the names (so nothing lands outside ``out_dir``); verify or install the folder next.
    """
    for name, data in contents.items():
        if name not in RESERVED_NAMES:
            check_file_name(name)
        if not isinstance(data, bytes):
            raise ValueError(f"bundle file {name!r}: expected bytes, got {type(data).__name__}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing policy bundle folder {out_dir}") from None
    for name, data in contents.items():
        (out_dir / name).write_bytes(data)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Keys (formats of server.provision)


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The coordinator's Ed25519 signing key from an unencrypted PKCS8 PEM file (``policy_signing.key``)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path}: not an unencrypted PKCS8 PEM private key: {err}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


MAX_KEY_FILE_BYTES = 64 * 1024
"""Largest key file read: a PEM public key is about 100 bytes, a certificate chain a few kB."""

KEY_FILE_KINDS = (
    (b"-----BEGIN CERTIFICATE-----", "an X.509 certificate (such as the kit's ca.pem), not a public key"),
    (b"PRIVATE KEY-----", "a private key. A site never needs a private key to verify policies; if this is the "
                          "coordinator's policy_signing.key, it must not be at a site"),
    (b"ecdsa-sha2-", "an OpenSSH public key (such as the kit's supernode.pub), not a PEM public key"),
    (b"ssh-", "an OpenSSH public key (such as the kit's supernode.pub), not a PEM public key"),
)
"""What a wrong trust-key file usually is, recognised by its text, so the error can say so."""


def load_trust_key(path: Path) -> ed25519.Ed25519PublicKey:
    """The public key a site trusts, from a SubjectPublicKeyInfo PEM file (its kit's ``policy_signing.pub``).

    Raises ``ValueError`` saying what the file is instead (a folder, a certificate, a private key, an OpenSSH
    key, another algorithm's key, not PEM at all), and ``OSError`` if it cannot be read.
    """
    path = Path(path)
    expected = "expected the coordinator's Ed25519 public key (policy_signing.pub from this site's kit)"
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; {expected}")
    with open(path, "rb") as f:
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_KEY_FILE_BYTES // 1024} kB, not a key file; {expected}")
    for marker, kind in KEY_FILE_KINDS:
        if marker in data:
            raise ValueError(f"{path}: is {kind}; {expected}")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not a SubjectPublicKeyInfo PEM public key; {expected}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: is a public key of another algorithm ({type(key).__name__}), not Ed25519; "
                         f"{expected}")
    return key


def key_fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the key's 32 raw bytes: the ``signing_key_id`` of the manifests it verifies."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Small pure helpers


def canonical_json(value: Any) -> bytes:
    """JSON as signed: sorted keys, 2-space indent, UTF-8, NaN and Infinity refused, one trailing newline."""
    return (json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=2) + "\n").encode()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file_name(name: str) -> None:
    """``ValueError`` unless ``name`` is a plain bundle file name (no separators, no ``..``, not reserved)."""
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"bundle file name {name!r}: expected 1-128 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit, with no path separators and no '..'")
    if name in RESERVED_NAMES:
        raise ValueError(f"bundle file name {name!r} is reserved for the bundle's own manifest and signature")


def _check_utc(value: Any) -> None:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"created_utc: expected an ISO 8601 time, got {value!r}") from None
    if moment.utcoffset() is None or moment.utcoffset().total_seconds() != 0:
        raise ValueError(f"created_utc: expected a UTC time (offset Z or +00:00), got {value!r}")


def _format_utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"created_utc: expected a timezone-aware datetime, got {moment!r}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_files(files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise ValueError(f"files: expected a non-empty mapping of file name to SHA-256, got {files!r}")
    for name, digest in files.items():
        check_file_name(name)
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise ValueError(f"files[{name!r}]: expected a SHA-256 as 64 lower-case hex digits, got {digest!r}")


def _check_privacy(privacy: Any) -> None:
    if not isinstance(privacy, dict):
        raise ValueError(f"privacy: expected a mapping of site to {{epsilon, delta, budget}}, got {privacy!r}")
    for site, spent in privacy.items():
        if not isinstance(site, str) or not site:
            raise ValueError(f"privacy: site names must be non-empty strings, got {site!r}")
        if not isinstance(spent, dict) or set(spent) != set(PRIVACY_KEYS):
            raise ValueError(f"privacy[{site!r}]: expected exactly the keys {', '.join(PRIVACY_KEYS)}, got {spent!r}")
        for key, value in spent.items():
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"privacy[{site!r}][{key!r}]: expected a finite number >= 0 or None, got {value!r}")


def _check_json_object(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    _check_json_value(value, where)


def _check_json_value(value: Any, where: str) -> None:
    """Only what survives a JSON round trip unchanged: no tuples, int keys, NaN, or numpy scalars."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            _check_json_value(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not allowed in JSON")
    elif value is not None and not isinstance(value, str | int | bool):
        raise ValueError(f"{where}: {type(value).__name__} is not JSON-safe (convert it to str, int, float, "
                         "bool, None, list or dict)")


def _plain(value: Any) -> Any:
    """A mapping given by the caller as plain dicts (a deep copy), so the manifest does not share its state."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_signature(path: Path, reject: Callable[[str], BundleRejected]) -> bytes:
    text = path.read_bytes().strip()
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise reject(f"{SIGNATURE_FILE} is not base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise reject(f"{SIGNATURE_FILE} holds {len(signature)} bytes, not a {SIGNATURE_BYTES}-byte Ed25519 "
                     "signature")
    return signature


