"""Policy bundles: signed by the coordinator's kit key, verified by a site's kit key, never altered or rolled back."""

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from client.policy_store import PolicyStore, PolicyStoreError
from server.provision import provision
from shared.policy_bundle import (
    FORMAT,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleRejected,
    build_bundle,
    bundle_contents,
    canonical_json,
    key_fingerprint,
    load_signing_key,
    load_trust_key,
    unpack_bundle,
    verify_bundle,
)

CREATED = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
PRIVACY = {"alpha": {"epsilon": 2.1, "delta": 1e-5, "budget": 3.0},
           "beta": {"epsilon": 1.4, "delta": 1e-5, "budget": 3.0}}
METRICS = {"auroc": 0.81, "toxicity_ece": 0.04, "sites": ["alpha", "beta"]}
SAFETY = {"max_cumulative_anthracycline_mg_m2": 550.0, "hepatic_bilirubin_reduction": {"1.2-3.0": 0.5}}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit")
    provision("hospitals", ["alpha"], out)
    return out


@pytest.fixture(scope="module")
def signing_key(kit) -> Path:
    return kit / "coordinator" / "policy_signing.key"


@pytest.fixture(scope="module")
def site_key(kit) -> Path:
    return kit / "sites" / "alpha" / "policy_signing.pub"


@pytest.fixture
def model_files(tmp_path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    contents = {"encoder.json": b'{"columns": ["age", "bsa"]}\n', "ann_federated.pt": bytes(range(256)) * 4,
                "xgb_toxicity.json": b'{"trees": []}\n', "policy.json": b'{"ceiling": 0.2}\n'}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    return {name: src / name for name in contents}


@pytest.fixture
def make_bundle(tmp_path, model_files, signing_key):
    def make(version: int = 1, name: str | None = None, key: Path | None = None) -> Path:
        return build_bundle(tmp_path / (name or f"bundle-v{version}"), model_files, version=version,
                            run_id="4211", privacy=PRIVACY, metrics=METRICS, safety_bounds=SAFETY,
                            signing_key_path=key or signing_key, created_utc=CREATED)
    return make


def write_other_key(folder: Path) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair in the formats server.provision writes."""
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / "other.key", folder / "other.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def resign(bundle: Path, key_path: Path, manifest_bytes: bytes) -> None:
    """Replace the manifest with ``manifest_bytes`` signed by ``key_path``: a validly signed bad manifest."""
    (bundle / MANIFEST_FILE).write_bytes(manifest_bytes)
    signature = load_signing_key(key_path).sign(manifest_bytes)
    (bundle / SIGNATURE_FILE).write_bytes(base64.b64encode(signature) + b"\n")


def edited_manifest(bundle: Path, **changes) -> bytes:
    state = json.loads((bundle / MANIFEST_FILE).read_bytes())
    state.update(changes)
    return canonical_json(state)


def store_digest(root: Path) -> str:
    """Everything in the store: names and contents of every file and folder."""
    digest = hashlib.sha256()
    if root.exists():
        for path in sorted(root.rglob("*")):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_file():
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Building and verifying


def test_bundle_signed_with_the_coordinator_kit_key_verifies_with_a_site_kit_key(make_bundle, site_key,
                                                                                  model_files):
    bundle = make_bundle(version=3)
    manifest = verify_bundle(bundle, site_key)
    assert manifest.format == FORMAT
    assert (manifest.version, manifest.run_id, manifest.created_utc) == (3, "4211", "2025-05-01T12:00:00Z")
    assert manifest.privacy == PRIVACY and manifest.metrics == METRICS and manifest.safety_bounds == SAFETY
    assert manifest.signing_key_id == key_fingerprint(load_trust_key(site_key))
    assert manifest.files == {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in model_files.items()}
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*model_files, MANIFEST_FILE, SIGNATURE_FILE])


def test_manifest_bytes_are_canonical_and_identical_when_built_twice(make_bundle):
    first, second = make_bundle(name="first"), make_bundle(name="second")
    data = (first / MANIFEST_FILE).read_bytes()
    assert data == (second / MANIFEST_FILE).read_bytes()
    assert (first / SIGNATURE_FILE).read_bytes() == (second / SIGNATURE_FILE).read_bytes()  # Ed25519: deterministic
    assert data == canonical_json(json.loads(data)) and data.endswith(b"}\n")
    assert list(json.loads(data)) == sorted(json.loads(data))


def test_unsigned_bundle_is_rejected(make_bundle, site_key):
    bundle = make_bundle()
    (bundle / SIGNATURE_FILE).unlink()
    with pytest.raises(BundleRejected, match=rf"{bundle}.*no manifest.sig: unsigned"):
        verify_bundle(bundle, site_key)


def test_bundle_without_manifest_is_rejected(make_bundle, site_key):
    bundle = make_bundle()
    (bundle / MANIFEST_FILE).unlink()
    with pytest.raises(BundleRejected, match="no manifest.json"):
        verify_bundle(bundle, site_key)


def test_manifest_changed_by_one_byte_does_not_verify_against_the_trusted_key(make_bundle, site_key):
    bundle = make_bundle()
    data = (bundle / MANIFEST_FILE).read_bytes()
    assert b'"auroc": 0.81' in data
    (bundle / MANIFEST_FILE).write_bytes(data.replace(b'"auroc": 0.81', b'"auroc": 0.91'))
    fingerprint = key_fingerprint(load_trust_key(site_key))
    with pytest.raises(BundleRejected, match=f"does not verify against the trusted key {fingerprint}"):
        verify_bundle(bundle, site_key)


def test_altered_model_file_is_rejected_naming_the_file(make_bundle, site_key):
    bundle = make_bundle()
    data = bytearray((bundle / "ann_federated.pt").read_bytes())
    data[100] ^= 1
    (bundle / "ann_federated.pt").write_bytes(bytes(data))
    with pytest.raises(BundleRejected, match="file ann_federated.pt does not match its SHA-256"):
        verify_bundle(bundle, site_key)


def test_bundle_signed_by_another_key_is_rejected(make_bundle, site_key, tmp_path):
    other_private, other_public = write_other_key(tmp_path)
    bundle = make_bundle(key=other_private)
    assert verify_bundle(bundle, other_public).version == 1
    with pytest.raises(BundleRejected, match="does not verify against the trusted key"):
        verify_bundle(bundle, site_key)


def test_manifest_naming_another_signing_key_is_rejected(make_bundle, site_key, signing_key):
    bundle = make_bundle()
    resign(bundle, signing_key, edited_manifest(bundle, signing_key_id="ab" * 32))
    with pytest.raises(BundleRejected, match=f"names signing key {'ab' * 32} but the trusted key is"):
        verify_bundle(bundle, site_key)


def test_file_the_manifest_does_not_list_is_rejected(make_bundle, site_key):
    bundle = make_bundle()
    (bundle / "xgb_extra.json").write_text("{}")
    with pytest.raises(BundleRejected, match="does not list: xgb_extra.json"):
        verify_bundle(bundle, site_key)


def test_missing_listed_file_is_rejected(make_bundle, site_key):
    bundle = make_bundle()
    (bundle / "policy.json").unlink()
    with pytest.raises(BundleRejected, match="missing: policy.json"):
        verify_bundle(bundle, site_key)


def test_signed_malformed_json_is_rejected(make_bundle, site_key, signing_key):
    bundle = make_bundle()
    resign(bundle, signing_key, (bundle / MANIFEST_FILE).read_bytes()[:-5])
    with pytest.raises(BundleRejected, match="manifest.json is malformed: not valid JSON"):
        verify_bundle(bundle, site_key)


def test_signed_manifest_of_another_format_is_rejected(make_bundle, site_key, signing_key):
    bundle = make_bundle()
    resign(bundle, signing_key, edited_manifest(bundle, format="fednano-policy-bundle/2"))
    with pytest.raises(BundleRejected, match="format 'fednano-policy-bundle/2' is not"):
        verify_bundle(bundle, site_key)


def test_signature_that_is_not_base64_is_rejected(make_bundle, site_key):
    bundle = make_bundle()
    (bundle / SIGNATURE_FILE).write_text("not a signature!\n")
    with pytest.raises(BundleRejected, match="manifest.sig is not base64"):
        verify_bundle(bundle, site_key)


@pytest.mark.parametrize("name", ["../policy.json", "sub/policy.json", "..", ".hidden", "a..b", "manifest.json"])
def test_build_refuses_file_names_that_are_not_plain(tmp_path, model_files, signing_key, name):
    with pytest.raises(ValueError, match="bundle file name"):
        build_bundle(tmp_path / "b", {name: model_files["policy.json"]}, version=1, run_id="1", privacy={},
                     metrics={}, safety_bounds={}, signing_key_path=signing_key)
    assert not (tmp_path / "b").exists()


def test_build_refuses_to_overwrite_a_bundle(make_bundle):
    bundle = make_bundle()
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_bundle()
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


def test_build_refuses_metrics_that_are_not_json_safe_naming_the_field(tmp_path, model_files, signing_key):
    with pytest.raises(ValueError, match=r"metrics\['auroc'\]: nan"):
        build_bundle(tmp_path / "b", model_files, version=1, run_id="1", privacy={}, metrics={"auroc": float("nan")},
                     safety_bounds={}, signing_key_path=signing_key)
    assert not (tmp_path / "b").exists()


def test_bundle_survives_the_trip_as_bytes_and_unsafe_names_are_refused(make_bundle, site_key, tmp_path):
    contents = bundle_contents(make_bundle())
    assert verify_bundle(unpack_bundle(contents, tmp_path / "received"), site_key).version == 1
    with pytest.raises(ValueError, match="bundle file name"):
        unpack_bundle({**contents, "../escape.json": b"{}"}, tmp_path / "evil")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "escape.json").exists()


# ---------------------------------------------------------------------------------------------------------
# The site's store


def test_store_installs_a_bundle_and_then_only_newer_ones(make_bundle, site_key, tmp_path):
    store = PolicyStore(tmp_path / "store", site_key)
    assert store.current() is None and store.installed_path() is None
    assert store.install(make_bundle(version=1)).version == 1
    assert store.current().version == 1
    key_folder = tmp_path / "store" / "versions" / key_fingerprint(load_trust_key(site_key))[:16]
    assert store.installed_path() == key_folder / "1"
    assert store.install(make_bundle(version=5)).version == 5
    assert store.current().version == 5 and store.installed_path() == key_folder / "5"
    assert verify_bundle(store.installed_path(), site_key).version == 5
    assert (key_folder / "1").is_dir()  # kept as the audit trail


def _unsigned(bundle: Path) -> None:
    (bundle / SIGNATURE_FILE).unlink()


def _tampered_manifest(bundle: Path) -> None:
    data = (bundle / MANIFEST_FILE).read_bytes()
    (bundle / MANIFEST_FILE).write_bytes(data.replace(b'"auroc": 0.81', b'"auroc": 0.99'))


def _tampered_model(bundle: Path) -> None:
    (bundle / "policy.json").write_bytes(b'{"ceiling": 0.9}\n')


def _extra_file(bundle: Path) -> None:
    (bundle / "notes.txt").write_text("unsigned")


def _missing_file(bundle: Path) -> None:
    (bundle / "encoder.json").unlink()


@pytest.mark.parametrize("damage, reason", [
    (_unsigned, "unsigned"), (_tampered_manifest, "does not verify"), (_tampered_model, "policy.json does not match"),
    (_extra_file, "does not list: notes.txt"), (_missing_file, "missing: encoder.json"),
])
def test_store_keeps_its_current_policy_when_a_damaged_bundle_is_rejected(make_bundle, site_key, tmp_path,
                                                                          damage, reason):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle(version=1))
    before = store_digest(tmp_path / "store")
    bundle = make_bundle(version=2)
    damage(bundle)
    with pytest.raises(BundleRejected, match=reason):
        store.install(bundle)
    assert store_digest(tmp_path / "store") == before
    assert store.current().version == 1


def test_store_keeps_its_current_policy_when_a_bundle_from_another_key_or_malformed_is_rejected(
        make_bundle, site_key, signing_key, tmp_path):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle(version=1))
    before = store_digest(tmp_path / "store")
    other_private, _ = write_other_key(tmp_path)
    with pytest.raises(BundleRejected, match="does not verify against the trusted key"):
        store.install(make_bundle(version=2, key=other_private))
    malformed = make_bundle(version=3)
    resign(malformed, signing_key, b'{"format": "fednano-policy-bundle/1", "version": 3,')
    with pytest.raises(BundleRejected, match="malformed"):
        store.install(malformed)
    assert store_digest(tmp_path / "store") == before


@pytest.mark.parametrize("old_version", [1, 4])
def test_store_rejects_rollback_to_an_older_or_equal_version(make_bundle, site_key, tmp_path, old_version):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle(version=4, name="installed"))
    before = store_digest(tmp_path / "store")
    with pytest.raises(BundleRejected, match=f"rollback: bundle version {old_version} is not newer than "
                                             "installed version 4"):
        store.install(make_bundle(version=old_version))
    assert store_digest(tmp_path / "store") == before


def test_empty_store_stays_empty_when_a_bundle_is_rejected(make_bundle, site_key, tmp_path):
    bundle = make_bundle()
    _tampered_model(bundle)
    with pytest.raises(BundleRejected):
        PolicyStore(tmp_path / "store", site_key).install(bundle)
    assert not (tmp_path / "store").exists()


def test_store_notices_an_installed_bundle_altered_on_disk(make_bundle, site_key, tmp_path):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle())
    (store.installed_path() / "policy.json").write_bytes(b'{"ceiling": 1.0}\n')
    with pytest.raises(PolicyStoreError, match="installed policy version 1 is damaged.*policy.json"):
        store.current()


# ---------------------------------------------------------------------------------------------------------
# The store's memory of versions: per signing key, and not in `current` alone


def test_store_holding_another_federations_v1_installs_this_federations_v1(make_bundle, site_key, tmp_path):
    other_private, other_public = write_other_key(tmp_path)
    root = tmp_path / "store"
    PolicyStore(root, other_public).install(make_bundle(version=1, name="other-v1", key=other_private))
    store = PolicyStore(root, site_key)
    with pytest.raises(PolicyStoreError, match="signed by another key .* belongs to another federation"):
        store.current()
    assert store.install(make_bundle(version=1)).version == 1  # versions of another key are not comparable
    assert store.current().version == 1
    assert verify_bundle(store.installed_path(), site_key).version == 1
    assert len(list((root / "versions").iterdir())) == 2  # the other federation's bundle is kept, apart


def test_deleting_current_does_not_let_an_older_version_install(make_bundle, site_key, tmp_path):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle(version=1))
    store.install(make_bundle(version=3))
    (tmp_path / "store" / "current").unlink()
    with pytest.raises(PolicyStoreError, match="current is missing, but version 3 .* is installed"):
        store.current()
    with pytest.raises(BundleRejected, match="rollback: bundle version 2 is older than version 3"):
        store.install(make_bundle(version=2))
    assert store.install(make_bundle(version=3, name="again")).version == 3  # the newest, as it was
    assert store.current().version == 3


def test_current_edited_to_point_at_an_older_installed_version_is_refused(make_bundle, site_key, tmp_path):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle(version=1))
    first = json.loads((tmp_path / "store" / "current").read_text())
    store.install(make_bundle(version=2))
    (tmp_path / "store" / "current").write_text(json.dumps(first))
    with pytest.raises(PolicyStoreError, match="names version 1, but version 2 is installed"):
        store.current()


def test_a_different_bundle_with_the_installed_version_number_is_refused(make_bundle, site_key, tmp_path,
                                                                         model_files, signing_key):
    store = PolicyStore(tmp_path / "store", site_key)
    store.install(make_bundle(version=2))
    (tmp_path / "store" / "current").unlink()
    twin = build_bundle(tmp_path / "twin", model_files, version=2, run_id="other run", privacy=PRIVACY,
                        metrics=METRICS, safety_bounds=SAFETY, signing_key_path=signing_key, created_utc=CREATED)
    with pytest.raises(BundleRejected, match="holds another bundle of version 2"):
        store.install(twin)


def test_store_of_the_older_flat_layout_is_still_read_and_protected(make_bundle, site_key, tmp_path):
    root = tmp_path / "store"
    store = PolicyStore(root, site_key)
    store.install(make_bundle(version=2))
    state = json.loads((root / "current").read_text())
    (root / "versions" / state["bundle"].split("/")[1] / "2").rename(root / "versions" / "2")
    del state["signing_key_id"]
    (root / "current").write_text(json.dumps(state | {"bundle": "versions/2"}))
    assert store.current().version == 2
    with pytest.raises(BundleRejected, match="rollback"):
        store.install(make_bundle(version=1))
    assert store.install(make_bundle(version=3)).version == 3
