"""Provisioning kits: certificates, SuperNode keys in Flower's formats, file modes, no silent overwrite."""

import argparse
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.flower_config import parse_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode, _try_setup_client_authentication

from server.provision import MAX_VALIDITY_DAYS, ProvisionError, provision
from shared.validation import read_site_config

SITES = ["alpha", "beta", "clinic_03"]
FEDERATION = "hospitals"


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit")
    provision(FEDERATION, SITES, out)
    return out


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def digests(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mode of every file under ``root``."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------------------
# Certificates


def test_ca_is_a_self_signed_ca_that_may_only_sign_certificates_and_crls(kit):
    ca = cert(kit / "coordinator" / "ca.pem")
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.subject.rfc4514_string() == f"CN={FEDERATION} CA"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"


def test_server_certificate_is_issued_by_the_ca_for_localhost_and_127_0_0_1_as_a_tls_server(kit):
    ca, server = cert(kit / "coordinator" / "ca.pem"), cert(kit / "coordinator" / "server.pem")
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_key_is_the_key_of_the_server_certificate(kit):
    key = serialization.load_pem_private_key((kit / "coordinator" / "server.key").read_bytes(), None)
    assert public_key_to_bytes(key.public_key()) == public_key_to_bytes(cert(kit / "coordinator" / "server.pem")
                                                                        .public_key())


def test_custom_sans_tell_dns_names_from_ip_addresses_and_days_set_the_validity(tmp_path):
    provision("fed", ["a"], tmp_path, server_sans=["superlink.hospital.example", "10.0.0.7", "::1"], days=30)
    server = cert(tmp_path / "coordinator" / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.hospital.example"]
    ips = ["10.0.0.7", "::1", "127.0.0.1"]  # 127.0.0.1 always: the SuperLink's own SuperExec connects there
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip) for ip in ips]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 3600


@pytest.mark.parametrize("san", ["https://localhost", "localhost:9093", "bad name", ""])
def test_a_san_that_is_no_host_name_or_ip_address_is_refused(tmp_path, san):
    with pytest.raises(ProvisionError, match="SAN"):
        provision("fed", ["a"], tmp_path, server_sans=[san])
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# SuperNode keys, policy-signing key


@pytest.mark.parametrize("site", SITES)
def test_site_key_loads_with_flowers_supernode_loader_and_matches_its_registered_public_key(kit, site):
    folder = kit / "sites" / site
    args = argparse.Namespace(auth_supernode_private_key=str(folder / "supernode.key"),
                              auth_supernode_public_key=None)
    private, public = _try_setup_client_authentication(args)  # what flower-supernode runs on the flag
    assert private.curve.name == "secp384r1"
    registered = kit / "coordinator" / "supernodes" / f"{site}.pub"
    assert try_load_public_key(registered) == public_key_to_bytes(public)  # what `flwr supernode register` runs
    assert registered.read_bytes() == (folder / "supernode.pub").read_bytes()
    line = (folder / "supernode.pub").read_text()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.count("\n") == 1


def test_every_site_has_its_own_key(kit):
    keys = {(kit / "sites" / s / "supernode.pub").read_text().split()[1] for s in SITES}
    assert len(keys) == len(SITES)


def test_policy_signature_verifies_with_every_sites_copy_of_the_coordinators_public_key(kit):
    key = serialization.load_pem_private_key((kit / "coordinator" / "policy_signing.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    manifest = b'{"version": 1}'
    signature = key.sign(manifest)
    for site in SITES:
        public = serialization.load_pem_public_key((kit / "sites" / site / "policy_signing.pub").read_bytes())
        public.verify(signature, manifest)  # raises InvalidSignature on mismatch
    assert (kit / "sites" / SITES[0] / "policy_signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert (kit / "coordinator" / "policy_signing.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_private_keys_are_0600_in_0700_folders_and_public_files_0644(kit):
    private = [kit / "coordinator" / n for n in ("ca.key", "server.key", "policy_signing.key")]
    private += [kit / "sites" / s / "supernode.key" for s in SITES]
    for path in private:
        assert mode(path) == 0o600, path
        assert mode(path.parent) == 0o700, path.parent
    for path in kit.rglob("*"):
        if path.is_file() and path not in private:
            assert mode(path) == 0o644, path


# ---------------------------------------------------------------------------------------------------------
# Site and Flower configuration, next commands


@pytest.mark.parametrize("site", SITES)
def test_site_toml_is_filled_in_and_passes_site_config_validation(kit, site):
    config, problems = read_site_config(kit / "sites" / site / "site.toml")
    assert problems == []
    assert config == {"site": {"name": site, "schema_version": "1.0"},
                      "privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5}}


def test_config_toml_is_a_flower_superlink_connection_trusting_the_ca(kit):
    config = tomllib.loads((kit / "coordinator" / "config.toml").read_text())
    connection = parse_superlink_connection(config["superlink"][FEDERATION], FEDERATION)
    assert connection.address == "127.0.0.1:9093"
    assert Path(connection.root_certificates) == kit / "coordinator" / "ca.pem"
    assert Path(connection.root_certificates).is_absolute()


def test_next_commands_parse_with_the_installed_flowers_own_argument_parsers(tmp_path):
    kit = tmp_path
    result = provision(FEDERATION, ["delta"], kit)
    commands = [shlex.split(line) for line in result.next_commands() if not line.startswith("#")]
    link = next(c for c in commands if c[0] == "flower-superlink")
    args = _parse_args_run_superlink().parse_args(link[1:])
    assert (args.host, args.port, args.enable_supernode_auth) == ("127.0.0.1", 9093, True)
    assert Path(args.ssl_keyfile) == kit / "coordinator" / "server.key"
    node = next(c for c in commands if "flower-supernode" in c)
    node = node[node.index("flower-supernode") + 1:]
    args = _parse_args_run_supernode().parse_args(node)
    assert args.superlink == "127.0.0.1:9093" and args.auth_supernode_private_key == "supernode.key"
    socket_path = "/path/to/delta/worker/site.sock"
    assert parse_config_args([args.node_config]) == {"data-path": "/path/to/delta/data", "site-name": "delta",
                                                     "site-worker": socket_path}
    worker = next(c for c in commands if "site-worker" in c[:2])
    assert worker[:4] == ["fednano", "site-worker", "--socket", socket_path] and worker[-1] == "&"
    register = next(c for c in commands if "register" in c)
    assert register[-4:] == [str(kit / "coordinator" / "supernodes" / "delta.pub"), FEDERATION, "--name", "delta"]
    assert commands[-1][-5:] == ["flwr", "run", ".", FEDERATION, "--stream"]


def test_each_new_site_gets_its_own_supernode_port(tmp_path):
    first = provision("fed", ["a", "b"], tmp_path)
    later = provision("fed", ["c"], tmp_path, add_sites=True)
    ports = [*first.sites.values(), *later.sites.values()]
    assert len(set(ports)) == 3 and 9093 not in ports


# ---------------------------------------------------------------------------------------------------------
# No silent overwrite; adding sites


def test_running_again_refuses_naming_an_existing_file_and_modifies_nothing(tmp_path):
    provision("fed", ["a", "b"], tmp_path)
    before = digests(tmp_path)
    with pytest.raises(ProvisionError, match=r"refusing to overwrite .*coordinator/ca\.key"):
        provision("fed", ["a", "b"], tmp_path)
    with pytest.raises(ProvisionError, match=r"sites/a/supernode\.key"):
        provision("fed", ["a", "z"], tmp_path)
    assert digests(tmp_path) == before
    assert not (tmp_path / "sites" / "z").exists()


def test_one_existing_site_key_is_enough_to_refuse_a_fresh_run(tmp_path):
    (tmp_path / "sites" / "b").mkdir(parents=True)
    (tmp_path / "sites" / "b" / "supernode.key").write_text("precious")
    with pytest.raises(ProvisionError, match=r"sites/b/supernode\.key"):
        provision("fed", ["a", "b"], tmp_path)
    assert (tmp_path / "sites" / "b" / "supernode.key").read_text() == "precious"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["supernode.key"]


def test_add_sites_adds_only_new_kits_signing_nothing_and_leaving_old_files_untouched(tmp_path):
    provision("fed", ["a", "b"], tmp_path)
    before = digests(tmp_path)
    result = provision("fed", ["b", "c"], tmp_path, add_sites=True)
    after = digests(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted(
        ["coordinator/supernodes/c.pub", *(f"sites/c/{n}" for n in
                                           ("ca.pem", "policy_signing.pub", "site.toml", "supernode.key",
                                            "supernode.pub"))])
    assert result.skipped == ("b",) and list(result.sites) == ["c"]
    assert sorted(str(p.relative_to(tmp_path)) for p in result.written) == sorted(set(after) - set(before))
    assert (tmp_path / "sites" / "c" / "ca.pem").read_bytes() == (tmp_path / "coordinator" / "ca.pem").read_bytes()
    assert mode(tmp_path / "sites" / "c" / "supernode.key") == 0o600
    assert mode(tmp_path / "sites" / "c") == 0o700


def test_add_sites_with_only_known_sites_writes_nothing(tmp_path):
    provision("fed", ["a"], tmp_path)
    before = digests(tmp_path)
    result = provision("fed", ["a"], tmp_path, add_sites=True)
    assert result.written == () and result.skipped == ("a",) and result.sites == {}
    assert digests(tmp_path) == before


def test_add_sites_needs_an_existing_federation_of_that_name(tmp_path):
    with pytest.raises(ProvisionError, match="no federation to add sites to"):
        provision("fed", ["a"], tmp_path, add_sites=True)
    provision("fed", ["a"], tmp_path)
    with pytest.raises(ProvisionError, match="has no federation 'other'"):
        provision("other", ["b"], tmp_path, add_sites=True)


def test_add_sites_refuses_a_name_differing_from_an_existing_site_only_in_case(tmp_path):
    provision("fed", ["Alpha"], tmp_path)
    with pytest.raises(ProvisionError, match="'alpha' clashes with existing site"):
        provision("fed", ["alpha"], tmp_path, add_sites=True)


# ---------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "a b", "-rf", "sité", "a.b", "x" * 65, "a\n"])
def test_a_site_name_that_is_no_safe_folder_name_is_refused(tmp_path, name):
    with pytest.raises(ProvisionError, match="site name"):
        provision("fed", ["ok", name], tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("sites", [["a", "b", "a"], ["Clinic", "clinic"]])
def test_duplicate_site_names_are_refused(tmp_path, sites):
    with pytest.raises(ProvisionError, match="given twice"):
        provision("fed", sites, tmp_path)
    assert not any(tmp_path.iterdir())


def test_no_sites_or_a_bad_federation_name_is_refused(tmp_path):
    with pytest.raises(ProvisionError, match="at least one site"):
        provision("fed", [], tmp_path)
    with pytest.raises(ProvisionError, match="federation name"):
        provision("fed.eu", ["a"], tmp_path)
    with pytest.raises(ProvisionError, match="expected a list"):
        provision("fed", "a,b", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# A real SuperLink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower-superlink exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout} s")


def flower_command(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed")
    return found


@pytest.mark.slow
def test_a_real_superlink_serves_tls_with_the_kit_and_registers_a_site_key(tmp_path):
    """flower-superlink with the kit's TLS material and SuperNode auth; `flwr supernode register` then `list`."""
    kit = tmp_path / "kit"
    provision(FEDERATION, ["alpha"], kit)
    home, port = tmp_path / "flwr_home", free_port()
    home.mkdir()
    config = tomllib.loads((kit / "coordinator" / "config.toml").read_text())["superlink"][FEDERATION]
    (home / "config.toml").write_text(f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n'
                                      f"root-certificates = {json.dumps(config['root-certificates'])}\n")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    c = kit / "coordinator"
    log = (tmp_path / "superlink.log").open("wb")
    link = subprocess.Popen(
        [flower_command("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
         "--ssl-ca-certfile", str(c / "ca.pem"), "--ssl-certfile", str(c / "server.pem"),
         "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
         "--disable-runtime-dependency-installation", "--database", str(tmp_path / "link.db"),
         "--isolation", "process"],  # no SuperExec child: the SuperLink is the only process to stop
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, link, timeout=30)
        flwr = flower_command("flwr")
        register = subprocess.run(
            [flwr, "supernode", "register", str(c / "supernodes" / "alpha.pub"), FEDERATION, "--name", "alpha",
             "--format", "json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        registered = json.loads(register.stdout)  # --format json exits 0 even on failure: read "success"
        assert registered["success"], register.stdout + register.stderr
        listing = subprocess.run([flwr, "supernode", "list", FEDERATION, "--format", "json"], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=30)
        nodes = json.loads(listing.stdout)
        assert nodes["success"], listing.stdout + listing.stderr
        assert [(n["node-id"], n["status"]) for n in nodes["nodes"]] == [(str(registered["node-id"]), "registered")]
    finally:
        link.send_signal(signal.SIGTERM)
        try:
            link.wait(timeout=10)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------------------------------------------------
# Validity and file modes whatever the caller's umask


def test_a_validity_beyond_the_stated_maximum_is_refused_naming_the_limit_and_nothing_is_written(tmp_path):
    with pytest.raises(ProvisionError, match=r"days: expected a whole number from 1 to 3650 \(10 years\), got 3000000"):
        provision("fed", ["a"], tmp_path, days=3_000_000)
    assert not any(tmp_path.iterdir())
    result = provision("fed", ["a"], tmp_path, days=MAX_VALIDITY_DAYS)
    ca = cert(result.coordinator / "ca.pem")
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == MAX_VALIDITY_DAYS  # plus the clock skew


@pytest.mark.parametrize("days", [0, -1, True, 2.5, "30", MAX_VALIDITY_DAYS + 1])
def test_a_validity_that_is_no_whole_number_of_days_from_1_is_refused(tmp_path, days):
    with pytest.raises(ProvisionError, match="days: expected"):
        provision("fed", ["a"], tmp_path, days=days)


def test_the_cli_refuses_a_huge_validity_with_a_clean_error_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from fednano.cli import app

    result = CliRunner().invoke(app, ["provision", "--federation", "fed", "--sites", "a", "--out", str(tmp_path),
                                      "--days", "3000000"])
    assert result.exit_code == 1, result.output
    assert "error: days: expected a whole number from 1 to 3650 (10 years), got 3000000" in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an OverflowError
    assert not any(tmp_path.iterdir())


@pytest.fixture(params=[0o000, 0o077, 0o022], ids=["umask-000", "umask-077", "umask-022"])
def umask(request):
    """Provision under this umask, restored afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_every_folder_and_file_has_its_explicit_mode_whatever_the_umask(tmp_path, umask):
    kit = tmp_path / "new" / "kit"  # "new" is created too
    provision("fed", ["a"], kit)
    provision("fed", ["b"], kit, add_sites=True)
    modes = {str(p.relative_to(tmp_path)): mode(p) for p in [tmp_path / "new", *sorted((tmp_path / "new").rglob("*"))]}
    private_folder, shared_folder, private_file, public_file = 0o700, 0o750, 0o600, 0o644
    site = {"ca.pem": public_file, "policy_signing.pub": public_file, "site.toml": public_file,
            "supernode.key": private_file, "supernode.pub": public_file}
    assert modes == {
        "new": shared_folder, "new/kit": shared_folder,
        "new/kit/coordinator": private_folder,
        **{f"new/kit/coordinator/{n}": private_file for n in ("ca.key", "server.key", "policy_signing.key")},
        **{f"new/kit/coordinator/{n}": public_file
           for n in ("ca.pem", "server.pem", "policy_signing.pub", "config.toml", "README.txt")},
        "new/kit/coordinator/supernodes": shared_folder,
        "new/kit/coordinator/supernodes/a.pub": public_file, "new/kit/coordinator/supernodes/b.pub": public_file,
        "new/kit/sites": shared_folder,
        "new/kit/sites/a": private_folder, "new/kit/sites/b": private_folder,
        **{f"new/kit/sites/{s}/{n}": m for s in "ab" for n, m in site.items()},
    }


def test_an_existing_output_folder_keeps_its_own_mode(tmp_path, umask):
    tmp_path.chmod(0o755)
    provision("fed", ["a"], tmp_path)
    assert mode(tmp_path) == 0o755
