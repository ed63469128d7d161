"""The recommender serves what the site installed (issue 13.6 / 14.3), verified with a key that is a trust key.

A real signed policy (``tests.test_recommender.real_bundle``) is installed, v1 then v2, in a site's store the way
the SuperNode installs it (``client.policy_store.PolicyStore`` at ``<site>/.fednano/policy``).
"""

from __future__ import annotations

import datetime
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from client.policy_store import PolicyStore, site_store_root
from fednano.cli import app
from tests.test_recommender import EXAMPLE, _key_pair, real_bundle


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A site whose store holds v1 then v2 of the real policy; the bundles as received; the trust key."""
    folder = tmp_path_factory.mktemp("site-policy")
    v1, trust = real_bundle(folder / "received-v1", 1)
    v2, _ = real_bundle(folder / "received-v2", 2)
    v3, _ = real_bundle(folder / "received-v3", 3)
    site = folder / "alpha"
    site.mkdir()
    store = PolicyStore(site_store_root(site), trust)
    store.install(v1)
    store.install(v2)
    return {"site": site, "v1": v1, "v2": v2, "v3": v3, "trust": trust, "store": store}


def run(*args: str):
    return CliRunner().invoke(app, [*args])


def recommend(*args: str):
    return run("recommend", "--patient", str(EXAMPLE), *args)


def test_recommend_with_site_serves_the_installed_version(installed):
    result = recommend("--site", str(installed["site"]), "--trust", str(installed["trust"]))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["policy_version"] == 2


def test_an_explicit_older_bundle_is_refused_when_the_site_holds_a_newer_one(installed):
    result = recommend("--site", str(installed["site"]), "--policy", str(installed["v1"]),
                       "--trust", str(installed["trust"]))
    assert result.exit_code == 1 and result.stdout == ""
    assert (f"error: policy bundle {installed['v1']} refused: the site's store {site_store_root(installed['site'])} "
            "holds version 2; this bundle is version 1, older (rollback)") in result.stderr


def test_the_installed_version_given_explicitly_is_served(installed):
    result = recommend("--site", str(installed["site"]), "--policy", str(installed["v2"]),
                       "--trust", str(installed["trust"]))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["policy_version"] == 2


def test_a_newer_bundle_the_site_has_not_installed_is_refused(installed):
    result = recommend("--site", str(installed["site"]), "--policy", str(installed["v3"]),
                       "--trust", str(installed["trust"]))
    assert result.exit_code == 1
    assert "this bundle is version 3, not installed: the recommender serves what the site installed" in result.stderr


def test_a_store_in_the_working_directory_is_found_without_site(installed, monkeypatch):
    monkeypatch.chdir(installed["site"])
    result = recommend("--policy", str(installed["v1"]), "--trust", str(installed["trust"]))
    assert result.exit_code == 1 and "older (rollback)" in result.stderr


def test_an_old_version_kept_in_the_store_is_not_served_by_its_path(installed):
    kept = installed["store"].installed_path().parent / "1"
    assert kept.is_dir()  # the audit trail
    result = recommend("--policy", str(kept), "--trust", str(installed["trust"]))
    assert result.exit_code == 1 and "older (rollback)" in result.stderr


def test_serve_with_site_serves_the_installed_version_and_refuses_an_older_one(installed, monkeypatch):
    import client.service

    served = []
    logs = []
    monkeypatch.setattr(client.service, "serve", lambda source, host, port, log, token=None, tls=None: (
        served.append(source.current().version), logs.append(log)))
    ok = run("serve", "--site", str(installed["site"]), "--trust", str(installed["trust"]))
    assert ok.exit_code == 0, ok.output
    assert served == [2] and logs[0].path == installed["site"] / "decisions.csv"  # the site's decision log
    assert (f"policy version 2 verified; following the site's store {site_store_root(installed['site'])}"
            in ok.stdout)
    old = run("serve", "--site", str(installed["site"]), "--policy", str(installed["v1"]),
              "--trust", str(installed["trust"]))
    assert old.exit_code == 1 and served == [2]
    assert "older (rollback)" in old.stderr and "error: not starting the recommender service" in old.stderr


def test_a_site_without_an_installed_policy_says_so(installed, tmp_path):
    result = recommend("--site", str(tmp_path), "--trust", str(installed["trust"]))
    assert result.exit_code == 1
    assert f"error: {site_store_root(tmp_path)}: no policy installed at this site" in result.stderr
    assert "give --site SITE_DIR" in recommend("--trust", str(installed["trust"])).stderr


def test_a_store_whose_current_was_deleted_is_not_served(installed, tmp_path):
    import shutil

    site = tmp_path / "beta"
    shutil.copytree(installed["site"], site)
    (site_store_root(site) / "current").unlink()
    result = recommend("--site", str(site), "--trust", str(installed["trust"]))
    assert result.exit_code == 1 and "current is missing, but version 2" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# A wrong --trust file says what it is, not "verified but could not be loaded"


def _certificate(path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fednano CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _openssh_public(path):
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path


def _ec_public_pem(path):
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize(("make", "what"), [
    (lambda d: _certificate(d / "ca.pem"), "is an X.509 certificate (such as the kit's ca.pem), not a public key"),
    (lambda d: _key_pair(d, "policy_signing")[0], "is a private key. A site never needs a private key"),
    (lambda d: d, "is a folder"),
    (lambda d: _openssh_public(d / "supernode.pub"), "is an OpenSSH public key (such as the kit's supernode.pub)"),
    (lambda d: _ec_public_pem(d / "ec.pub"), "is a public key of another algorithm (ECPublicKey), not Ed25519"),
    (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "not a SubjectPublicKeyInfo PEM public key"),
])
@pytest.mark.parametrize("command", ["recommend", "serve"])
def test_a_wrong_trust_file_says_what_is_wrong_with_the_trust_key(installed, tmp_path, make, what, command):
    trust = make(tmp_path)
    args = ["--policy", str(installed["v2"]), "--trust", str(trust)]
    result = recommend(*args) if command == "recommend" else run("serve", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: trust key {trust}: {what}")
    assert "expected the coordinator's Ed25519 public key (policy_signing.pub from this site's kit)" in result.stderr
    assert "verified but could not be loaded" not in result.stderr and "Traceback" not in result.output


def test_a_running_service_follows_the_sites_store_and_fails_closed(installed, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from client.recommender import InstalledPolicy, followed_policy
    from client.service import make_app

    site = tmp_path / "gamma"
    site.mkdir()
    store = PolicyStore(site_store_root(site), installed["trust"])
    store.install(installed["v1"])
    served = followed_policy(None, installed["trust"], site)
    assert isinstance(served, InstalledPolicy)
    record = json.loads(EXAMPLE.read_text())
    with TestClient(make_app(served), raise_server_exceptions=False) as http:
        assert http.get("/health").json()["policy_version"] == 1
        store.install(installed["v2"])  # the site installs a newer version while the service runs
        assert http.get("/health").json()["policy_version"] == 2
        assert http.post("/recommend", json=record).json()["policy_version"] == 2
        saved = site_store_root(site) / "current.saved"
        shutil.copy(site_store_root(site) / "current", saved)
        (site_store_root(site) / "current").unlink()  # deleted: the store cannot vouch for a version
        response = http.post("/recommend", json=record)
        assert response.status_code == 503
        assert response.json()["errors"][0].startswith("no policy can be served: ")
        assert "current is missing, but version 2" in response.json()["errors"][0]
        assert http.get("/health").status_code == 503
        shutil.copy(saved, site_store_root(site) / "current")  # restored: served again
        assert http.post("/recommend", json=record).json()["policy_version"] == 2
