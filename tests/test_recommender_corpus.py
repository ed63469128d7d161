"""The recommender's bad-input corpus (tests/corpus/recommender): every case gets exactly its error, and none
echoes the patient's values, crashes with a traceback or answers HTTP 500.

Patient records, HTTP bodies and vitals go to the toy policy of ``tests.test_recommender`` (they are refused
before any policy decides); trust keys and bundles to a real signed bundle (``real_bundle``).
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from client.policy_store import PolicyStore, site_store_root
from client.service import make_app
from fednano.cli import app
from tests.test_recommender import EXAMPLE, _key_pair, make_toy_policy, real_bundle

CORPUS = Path(__file__).parent / "corpus" / "recommender"
CASES = tomllib.loads((CORPUS / "expectations.toml").read_text(encoding="utf-8"))["case"]
CANARY = "CANARY-0047113"


def test_every_file_of_the_corpus_has_an_expectation_and_the_corpus_is_large_enough():
    files = {p.name for p in CORPUS.iterdir()} - {"expectations.toml"}
    assert files == {case["file"] for case in CASES}
    assert len(CASES) >= 30 and len(CASES) == len(files)
    assert {case["door"] for case in CASES} == {"cli", "vitals", "http", "trust", "bundle"}


@pytest.fixture(scope="module")
def toy():
    return make_toy_policy(version=7)


@pytest.fixture(scope="module")
def http(toy):
    with TestClient(make_app(toy), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def toy_cli(toy, monkeypatch):
    import client.recommender

    monkeypatch.setattr(client.recommender, "load_policy", lambda bundle, trust: toy)


def first_error(result, **names: Path) -> str:
    """The first stderr line without its ``error: `` prefix, with the case's paths as their placeholders."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and CANARY not in result.output
    line = result.stderr.splitlines()[0].removeprefix("error: ")
    for placeholder, path in names.items():
        line = line.replace(str(path), placeholder)
    return line


def check(line: str, case: dict) -> None:
    if "error" in case:
        assert line == case["error"]
    else:
        assert line.startswith(case["starts"]), line


def recommend(*args: str):
    return CliRunner().invoke(app, ["recommend", *args])


@pytest.mark.parametrize("case", [c for c in CASES if c["door"] == "cli"], ids=lambda c: c["file"])
def test_patient_file(case, toy_cli):
    path = CORPUS / case["file"]
    check(first_error(recommend("--policy", "b", "--trust", "k", "--patient", str(path)), FILE=path), case)


@pytest.mark.parametrize("case", [c for c in CASES if c["door"] == "vitals"], ids=lambda c: c["file"])
def test_vitals_file(case, toy_cli):
    path = CORPUS / case["file"]
    result = recommend("--policy", "b", "--trust", "k", "--patient", str(EXAMPLE), "--vitals", str(path))
    check(first_error(result, FILE=path), case)


@pytest.mark.parametrize("case", [c for c in CASES if c["door"] == "http"], ids=lambda c: c["file"])
def test_http_body(case, http):
    response = http.post(case["path"], content=(CORPUS / case["file"]).read_bytes(),
                         headers={"content-type": "application/json"})
    assert response.status_code == case["status"]
    body = response.json()
    check(body["errors"][0], case)
    assert len(body["errors"]) == len(body["detail"]) and CANARY not in response.text
    assert len(response.content) < 4096  # never the input back


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """v1 and v2 of the real policy, signed by the coordinator key, and that key's public half."""
    folder = tmp_path_factory.mktemp("corpus-bundles")
    v1, trust = real_bundle(folder / "v1", 1)
    v2, _ = real_bundle(folder / "v2", 2)
    return {"v1": v1, "v2": v2, "trust": trust}


@pytest.mark.parametrize("case", [c for c in CASES if c["door"] == "trust"], ids=lambda c: c["file"])
def test_trust_key(case, signed):
    path = CORPUS / case["file"]
    result = recommend("--policy", str(signed["v2"]), "--trust", str(path), "--patient", str(EXAMPLE))
    check(first_error(result, FILE=path), case)


@pytest.mark.parametrize("case", [c for c in CASES if c["door"] == "bundle"], ids=lambda c: c["file"])
def test_bundle(case, signed, tmp_path):
    recipe = json.loads((CORPUS / case["file"]).read_text())
    bundle, trust, site = tmp_path / "bundle", signed["trust"], tmp_path / "site"
    args = []
    match recipe["damage"]:
        case "edit":
            shutil.copytree(signed["v1"], bundle)
            (bundle / recipe["file"]).write_text((bundle / recipe["file"]).read_text().replace("0.35", "0.95"))
        case "add":
            shutil.copytree(signed["v1"], bundle)
            (bundle / recipe["file"]).write_text("unsigned")
        case "remove":
            shutil.copytree(signed["v1"], bundle)
            (bundle / recipe["file"]).unlink()
        case "other-key":
            private, _ = _key_pair(tmp_path, "stranger")
            bundle, _ = real_bundle(bundle, 1, signing_key=private)
        case "installed-newer" | "installed-older":
            newer = recipe["damage"] == "installed-newer"
            site.mkdir()
            PolicyStore(site_store_root(site), trust).install(signed["v2" if newer else "v1"])
            shutil.copytree(signed["v1" if newer else "v2"], bundle)
            args = ["--site", str(site)]
    result = recommend("--policy", str(bundle), "--trust", str(trust), "--patient", str(EXAMPLE), *args)
    check(first_error(result, BUNDLE=bundle, TRUST=trust, STORE=site_store_root(site)), case)
