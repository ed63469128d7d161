"""Provisioning kits for a federation: TLS for the SuperLink, a key per SuperNode, the policy-signing key.

One call makes everything a coordinator and its sites need to start a Flower 1.42 deployment with TLS and
SuperNode authentication, with the ``cryptography`` package only:

- a certificate authority (EC P-384, self-signed) and the SuperLink's server certificate signed by it, with
  the subject alternative names the SuperLink is reached by (default ``localhost`` and ``127.0.0.1``);
- one EC P-384 key pair per site, in the formats Flower reads: the private key in OpenSSH format for
  ``flower-supernode --auth-supernode-private-key``, the public key as one ``ecdsa-sha2-nistp384 ...`` line
  for ``flwr supernode register``;
- the coordinator's Ed25519 key that signs policy bundles; every site gets the public half;
- a filled-in ``site.toml`` per site and a ``config.toml`` for the coordinator's ``FLWR_HOME``.

Layout of ``OUT``::

    coordinator/    ca.pem ca.key server.pem server.key policy_signing.key policy_signing.pub
                    supernodes/<site>.pub  config.toml  README.txt
    sites/<site>/   supernode.key supernode.pub ca.pem policy_signing.pub site.toml

Private keys are written 0600 in folders 0700; certificates and public keys 0644; every other folder this
call creates (``OUT`` itself included) 0750, whatever the caller's umask. Nothing is ever
overwritten: a second run raises :class:`ProvisionError` naming the files that exist, unless ``add_sites``
asks to keep the existing CA, server and coordinator material and only add kits for new sites.

Example
-------
>>> result = provision("hospitals", ["alpha", "beta"], Path("kit"))      # doctest: +SKIP
>>> print("\\n".join(result.next_commands()))                           # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.schema import SCHEMA_VERSION, SITE_FILE

CURVE = ec.SECP384R1
"""EC curve of the CA, the server and the SuperNode keys (Flower accepts NIST curves; P-384 as in its docs)."""

SIGNATURE_HASH = hashes.SHA384
"""Digest of certificate signatures, matched to P-384's strength."""

CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from slightly before now, so a site whose clock lags a little accepts them."""

SUPERLINK_HOST = "127.0.0.1"
SUPERLINK_PORT = 9093
"""Where the SuperLink listens: Fleet, Control and ServerAppIo APIs share one host and port in Flower 1.42."""

FIRST_SUPERNODE_PORT = 9094
"""Runtime-API port of the first SuperNode (Flower's default); the next sites count up, so kits on one host
do not collide."""

DEFAULT_SANS = ("localhost", "127.0.0.1")

ALWAYS_SAN = SUPERLINK_HOST
"""Always in the server certificate, whatever SANs are asked: the SuperLink's own SuperExec, the ``flwr`` CLI
(``config.toml``) and the commands here reach the SuperLink at ``--host`` 127.0.0.1; without this SAN the
SuperExec's TLS handshake fails ("IP address mismatch, certificate is not valid for '127.0.0.1'")."""

DEFAULT_PRIVACY = {"dp": True, "epsilon": 3.0, "delta": 1e-5}
"""Budget written into every new site.toml; each site may change its own before joining."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""Site and federation names: safe as folder names, TOML keys and shell words."""

DNS_NAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                      r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")

PRIVATE_FILE, PUBLIC_FILE, PRIVATE_FOLDER = 0o600, 0o644, 0o700
SHARED_FOLDER = 0o750
"""Folders without secrets: the owner's group (an operations team) may read them, nobody else; only the owner
writes. Set explicitly, as every mode here: ``mkdir`` masks its mode with the umask, and under ``umask 000``
the kit would be world-writable (anyone could swap a site's ``ca.pem`` or ``policy_signing.pub``)."""

MAX_VALIDITY_DAYS = 3650
"""Longest validity of the CA and server certificates: ten years. The CA key signs nothing after provisioning
but the server key is online for the certificate's life, and NIST SP 800-57 Part 1 (rev. 5, §5.3.6) puts
the cryptoperiod of a private signature key at 1-3 years: ten years already assumes rotation by
re-provisioning. Far below Python's year-9999 datetime limit (``--days 3000000`` overflowed it)."""

COORDINATOR, SITES, SUPERNODES = "coordinator", "sites", "supernodes"
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
POLICY_KEY, POLICY_PUB = "policy_signing.key", "policy_signing.pub"
NODE_KEY, NODE_PUB = "supernode.key", "supernode.pub"
FLOWER_CONFIG, README = "config.toml", "README.txt"
DATABASE = "superlink.db"


class ProvisionError(Exception):
    """Provisioning refused: a bad name or SAN, or files that exist and would be overwritten."""


@dataclass(frozen=True)
class ProvisionResult:
    """What :func:`provision` wrote, and the commands that bring the federation up.

    Parameters
    ----------
    federation : str
        Name of the federation: the SuperLink connection in the coordinator's ``config.toml``.
    out : Path
        The kit's root folder (absolute).
    sites : dict of str to int
        Sites given kits by this call, each with the Runtime-API port its SuperNode is started with.
    skipped : tuple of str
        Sites already in the kit (only with ``add_sites``); their files were left as they were.
    written : tuple of Path
        Every file written, in writing order.
    """

    federation: str
    out: Path
    sites: dict[str, int]
    skipped: tuple[str, ...] = ()
    written: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def coordinator(self) -> Path:
        return self.out / COORDINATOR

    def site_folder(self, site: str) -> Path:
        return self.out / SITES / site

    def next_commands(self) -> list[str]:
        """Shell lines for what comes next: ``#`` lines say who runs the command below them.

        The SuperLink and ``flwr`` run on the coordinator's machine with ``FLWR_HOME`` set to the coordinator
        folder (its ``config.toml`` names this federation); each site runs its SuperNode from its own kit
        folder, with ``data-path`` pointing at the folder holding its ``episodes.csv``.
        """
        c = self.coordinator
        home = f"FLWR_HOME={_q(c)}"
        lines = [
            "# coordinator: start the SuperLink unless it runs (TLS; only registered SuperNodes may connect)",
            f"flower-superlink --host {SUPERLINK_HOST} --port {SUPERLINK_PORT}"
            f" --ssl-ca-certfile {_q(c / CA_CERT)} --ssl-certfile {_q(c / SERVER_CERT)}"
            f" --ssl-keyfile {_q(c / SERVER_KEY)} --enable-supernode-auth"
            f" --disable-runtime-dependency-installation --database {_q(c / DATABASE)}",
        ]
        if self.sites:
            lines.append("# coordinator: register each site's SuperNode key (the SuperLink must be running)")
        lines += [f"{home} flwr supernode register {_q(c / SUPERNODES / f'{site}.pub')} {self.federation}"
                  f" --name {site}" for site in self.sites]
        for site, port in self.sites.items():
            worker = f"/path/to/{site}/worker/site.sock"
            node_config = f'data-path="/path/to/{site}/data" site-name="{site}" site-worker="{worker}"'
            lines += [
                f"# site {site}: its warm worker keeps the ClientApp loaded between messages (client/site_worker.py;"
                " the socket's folder is made private to this user)",
                f"fednano site-worker --socket {_q(worker)} &",
                f"# site {site}: in its kit folder (sites/{site}/, sent to the site); put site.toml next to"
                " episodes.csv",
                f"cd {_q(self.site_folder(site))} && flower-supernode --superlink {SUPERLINK_HOST}:{SUPERLINK_PORT}"
                f" --root-certificates {CA_CERT} --auth-supernode-private-key {NODE_KEY} --port {port}"
                f" --node-config {shlex.quote(node_config)}",
            ]
        lines += [
            "# coordinator: check the SuperNodes, then start a run from the fednano project folder",
            f"{home} flwr supernode list {self.federation}",
            f"{home} flwr run . {self.federation} --stream",
        ]
        return lines


def provision(federation: str, sites: list[str], out: Path,
              server_sans: Iterable[str] = DEFAULT_SANS, days: int = 365, *,
              add_sites: bool = False) -> ProvisionResult:
    """Write a federation's provisioning kit into ``out`` (see the module docstring for the layout).

    Parameters
    ----------
    federation : str
        Federation name (letters, digits, ``-``, ``_``): the SuperLink connection name for ``flwr``.
    sites : list of str
        Site names, each a folder name under ``out/sites`` (letters, digits, ``-``, ``_``), no duplicates.
    out : Path
        The kit's root folder; created if missing.
    server_sans : iterable of str, default ("localhost", "127.0.0.1")
        Names the SuperLink is reached by: IP addresses become IP SANs, anything else DNS SANs.
        127.0.0.1 is always added (see ``ALWAYS_SAN``).
    days : int, default 365
        Validity of the CA and server certificates, 1 to ``MAX_VALIDITY_DAYS`` (3650).
    add_sites : bool, default False
        Keep the existing CA, server and coordinator material in ``out`` and only add kits for sites not
        yet in it; sites already present are left untouched and reported as skipped. Nothing is signed.

    Returns
    -------
    ProvisionResult

    Raises
    ------
    ProvisionError
        For a bad name, SAN or validity; for files that exist (naming them) when ``add_sites`` is False;
        with ``add_sites``, when ``out`` holds no federation of that name.
    """
    _check_name(federation, "federation")
    _check_sites(sites)
    _check_days(days)
    out = Path(out).expanduser().absolute()
    coordinator = out / COORDINATOR
    files: list[_File] = []
    if add_sites:
        ca_pem, policy_pub, existing = _existing_federation(coordinator, federation)
        existing |= {d.name for d in (out / SITES).glob("*") if d.is_dir()}
        skipped = tuple(s for s in sites if s in existing)
        new = [s for s in sites if s not in existing]
        folded = {e.casefold(): e for e in existing}
        for site in new:
            if site.casefold() in folded:
                raise ProvisionError(f"site name {site!r} clashes with existing site"
                                     + _case_note(folded[site.casefold()], site))
        first_port = FIRST_SUPERNODE_PORT + len(existing)
    else:
        ca_pem, policy_pub, files = _coordinator_files(federation, coordinator, _sans(server_sans), days)
        skipped, new, first_port = (), list(sites), FIRST_SUPERNODE_PORT
    for site in new:
        files += _site_files(site, out, coordinator, ca_pem, policy_pub)
    ports = {site: first_port + i for i, site in enumerate(new)}
    result = ProvisionResult(federation, out, ports, skipped)
    if not add_sites:
        readme = "\n".join([*_README_HEAD, *result.next_commands(), ""]).encode()
        files.append(_File(coordinator / README, readme, PUBLIC_FILE))
    _refuse_existing(files)
    written = _write_all(files)
    return ProvisionResult(federation, out, ports, skipped, tuple(written))


# ---------------------------------------------------------------------------------------------------------
# Names


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ProvisionError(f"{what} name {name!r}: expected 1-64 letters, digits, '-' or '_', "
                             "starting with a letter or digit")


def _check_sites(sites: list[str]) -> None:
    if isinstance(sites, str):
        raise ProvisionError(f"sites: expected a list of names, got the string {sites!r}")
    if not sites:
        raise ProvisionError("sites: expected at least one site name")
    seen: dict[str, str] = {}
    for site in sites:
        _check_name(site, "site")
        if site.casefold() in seen:
            raise ProvisionError(f"site name {site!r} given twice" + _case_note(seen[site.casefold()], site))
        seen[site.casefold()] = site


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_VALIDITY_DAYS:
        raise ProvisionError(f"days: expected a whole number from 1 to {MAX_VALIDITY_DAYS} "
                             f"({MAX_VALIDITY_DAYS // 365} years), got {days!r}: a longer validity outlives "
                             "key-rotation guidance (NIST SP 800-57; see server.provision.MAX_VALIDITY_DAYS)")


def _case_note(a: str, b: str) -> str:
    return "" if a == b else f" (as {a!r}: names differing only in case clash on some file systems)"


def _sans(names: Iterable[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs, host names as DNS SANs, plus 127.0.0.1; a URL or a port is refused."""
    if isinstance(names, str):
        names = [names]
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not DNS_NAME.fullmatch(name) or len(name) > 253:
                raise ProvisionError(f"server SAN {name!r}: expected a host name or an IP address "
                                     "(no scheme, no port)") from None
            sans.append(x509.DNSName(name.lower()))
    sans.append(x509.IPAddress(ipaddress.ip_address(ALWAYS_SAN)))
    return list(dict.fromkeys(sans))


# ---------------------------------------------------------------------------------------------------------
# Key material


@dataclass(frozen=True)
class _File:
    path: Path
    data: bytes
    mode: int


def _coordinator_files(federation: str, coordinator: Path, sans: list[x509.GeneralName],
                       days: int) -> tuple[bytes, bytes, list[_File]]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(CURVE())
    ca_cert = _ca_certificate(federation, ca_key, now, days)
    server_key = ec.generate_private_key(CURVE())
    server_cert = _server_certificate(federation, server_key, ca_cert, ca_key, sans, now, days)
    policy_key = ed25519.Ed25519PrivateKey.generate()
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    policy_pub = policy_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    files = [
        _File(coordinator / CA_KEY, _pkcs8(ca_key), PRIVATE_FILE),
        _File(coordinator / CA_CERT, ca_pem, PUBLIC_FILE),
        _File(coordinator / SERVER_KEY, _pkcs8(server_key), PRIVATE_FILE),
        _File(coordinator / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE),
        _File(coordinator / POLICY_KEY, _pkcs8(policy_key), PRIVATE_FILE),
        _File(coordinator / POLICY_PUB, policy_pub, PUBLIC_FILE),
        _File(coordinator / FLOWER_CONFIG, _flower_config(federation, coordinator / CA_CERT), PUBLIC_FILE),
    ]
    return ca_pem, policy_pub, files


def _ca_certificate(federation: str, key: ec.EllipticCurvePrivateKey, now: dt.datetime,
                    days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, SIGNATURE_HASH()))


def _server_certificate(federation: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName], now: dt.datetime,
                        days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} SuperLink")])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, SIGNATURE_HASH()))


def _key_usage(**usages: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: usages.get(n, False) for n in names})


def _pkcs8(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _site_files(site: str, out: Path, coordinator: Path, ca_pem: bytes, policy_pub: bytes) -> list[_File]:
    """A site's kit, and the copy of its public key the coordinator registers."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public += f" fednano-{site}\n".encode()
    folder = out / SITES / site
    return [
        _File(folder / NODE_KEY, private, PRIVATE_FILE),
        _File(folder / NODE_PUB, public, PUBLIC_FILE),
        _File(folder / CA_CERT, ca_pem, PUBLIC_FILE),
        _File(folder / POLICY_PUB, policy_pub, PUBLIC_FILE),
        _File(folder / SITE_FILE, _site_config(site), PUBLIC_FILE),
        _File(coordinator / SUPERNODES / f"{site}.pub", public, PUBLIC_FILE),
    ]


def _site_config(site: str) -> bytes:
    p = DEFAULT_PRIVACY
    return (f'[site]\nname = "{site}"\nschema_version = "{SCHEMA_VERSION}"\n\n'
            "[privacy]  # this site's own differential-privacy budget for all training it takes part in\n"
            f"dp = {str(p['dp']).lower()}\nepsilon = {_toml_number(p['epsilon'])}\n"
            f"delta = {_toml_number(p['delta'])}\n").encode()


def _toml_number(x: float) -> str:
    """1e-05 as ``1e-5``: a TOML float as a person writes it."""
    return re.sub(r"e([+-]?)0*(\d)", r"e\1\2", repr(float(x)))


def _flower_config(federation: str, ca_cert: Path) -> bytes:
    """``$FLWR_HOME/config.toml`` of the coordinator: the SuperLink connection named after the federation."""
    return (f'[superlink]\ndefault = "{federation}"\n\n'
            f"[superlink.{federation}]\n"
            f'address = "{SUPERLINK_HOST}:{SUPERLINK_PORT}"\n'
            f"root-certificates = {json.dumps(str(ca_cert))}\n").encode()


def _existing_federation(coordinator: Path, federation: str) -> tuple[bytes, bytes, set[str]]:
    """CA certificate, policy public key and registered sites of the federation already in ``coordinator``."""
    needed = [coordinator / CA_CERT, coordinator / POLICY_PUB, coordinator / FLOWER_CONFIG]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ProvisionError(f"no federation to add sites to: missing {', '.join(missing)}; "
                             "provision it first (without add_sites)")
    try:
        connections = tomllib.loads((coordinator / FLOWER_CONFIG).read_text()).get("superlink", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ProvisionError(f"{coordinator / FLOWER_CONFIG}: cannot read it: {err}") from err
    if not isinstance(connections.get(federation), dict):
        raise ProvisionError(f"{coordinator / FLOWER_CONFIG} has no federation {federation!r} "
                             f"(it has {', '.join(k for k, v in connections.items() if isinstance(v, dict))})")
    registered = {p.stem for p in (coordinator / SUPERNODES).glob("*.pub")}
    return (coordinator / CA_CERT).read_bytes(), (coordinator / POLICY_PUB).read_bytes(), registered


# ---------------------------------------------------------------------------------------------------------
# Writing


def _refuse_existing(files: list[_File]) -> None:
    existing = [str(f.path) for f in files if os.path.lexists(f.path)]
    if existing:
        raise ProvisionError(f"refusing to overwrite {len(existing)} existing file(s): {', '.join(existing)}; "
                             "move them away, or add new sites to this federation with add_sites "
                             "(fednano provision --add-sites)")


def _write_all(files: list[_File]) -> list[Path]:
    """Create every file (never replacing one); on failure remove those this call created."""
    written: list[Path] = []
    try:
        for f in files:
            _make_folder(f.path.parent, private=any(g.mode == PRIVATE_FILE and g.path.parent == f.path.parent
                                                    for g in files))
            _create(f)
            written.append(f.path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _make_folder(folder: Path, private: bool) -> None:
    """Create ``folder`` (0700 if it holds private keys, else 0750) and its missing parents (0750) with those
    exact modes whatever the umask; a folder that holds private keys is made 0700 even if it existed, other
    existing folders keep their mode (``OUT`` may be the user's own)."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.is_dir():
            break
        missing.append(parent)
    for created in reversed(missing):
        created.mkdir(mode=PRIVATE_FOLDER)  # never wider than the final mode, even for an instant
        created.chmod(SHARED_FOLDER)
    if private:
        folder.chmod(PRIVATE_FOLDER)


def _create(f: _File) -> None:
    """Write a new file with its mode set from the start; O_EXCL refuses an existing file or symlink."""
    try:
        fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode)
    except FileExistsError as err:
        raise ProvisionError(f"refusing to overwrite existing file {f.path}") from err
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), f.mode)  # exact mode whatever the umask
        handle.write(f.data)


def _q(path: Path) -> str:
    return shlex.quote(str(path))


_README_HEAD = [
    "Provisioning kit of this federation (written by `fednano provision`).",
    "",
    "coordinator/ stays with the coordinator: ca.key, server.key and policy_signing.key are secrets (0600).",
    "  ca.key signs nothing after provisioning: keep it offline. server.pem/server.key are the SuperLink's TLS.",
    "  supernodes/<site>.pub are the keys to register; config.toml is for FLWR_HOME (the SuperLink connection).",
    "sites/<site>/ goes to that site only, over a trusted channel: supernode.key is its secret (0600);",
    "  ca.pem verifies the SuperLink, policy_signing.pub verifies policy bundles, site.toml is its budget.",
    "A site on another host uses --superlink <one of the server certificate's names>:9093 instead of 127.0.0.1.",
    "Set FLWR_DISABLE_UPDATE_CHECK=1 and FLWR_TELEMETRY_ENABLED=0 for every Flower process to stay offline.",
    "flower-supernode and flower-superlink start `flower-superexec` from PATH: run them with Flower's",
    "  environment activated (its bin/ on PATH).",
    "",
    "Next commands:",
    "",
]
