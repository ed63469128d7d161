"""The app package (FAB) that ``flwr run`` builds from this folder and uploads holds the apps' code only and stays
well under Flower's size limit.

A 33 MB benchmark JSON committed by mistake once made every deployed run fail before it started: ``flwr run``
packed every ``*.json`` of the project (Flower 1.42's built-in include patterns, minus what .gitignore leaves out)
and the SuperLink refuses a FAB over ``FAB_MAX_SIZE`` (10 MB). Since then ``[tool.flwr.app] fab-include`` lists
the four packages the ServerApp and ClientApp run (and README.md): a deployed SuperNode unpacks the FAB for every
message, and a hospital has no use for the tests, benchmarks or simulator.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

ROOT = Path(__file__).resolve().parents[1]
LARGEST_FILE = 1024 * 1024
"""No one file in the FAB above 1 MB (the largest today, a test corpus file, is 0.2 MB)."""


def test_the_app_package_is_under_half_of_flowers_limit_and_holds_no_large_file():
    fab = build_fab_from_disk(ROOT)
    assert len(fab) < FAB_MAX_SIZE // 2, f"FAB is {len(fab):,} bytes"
    members = zipfile.ZipFile(io.BytesIO(fab)).infolist()
    assert any(m.filename == "server/app.py" for m in members)  # it is the app
    large = [(m.filename, m.file_size) for m in members if m.file_size > LARGEST_FILE]
    assert not large, f"files over {LARGEST_FILE:,} bytes would ship with every run: {large}"


def test_the_app_package_holds_the_apps_packages_and_nothing_else():
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    assert {n.split("/")[0] for n in names} == {".info", "pyproject.toml", "README.md", "client", "server", "shared",
                                                "strategies"}
    for module in ("server/app.py", "client/app.py", "client/deployed.py", "client/site_worker.py",
                   "strategies/pairwise_masked_mean.py", "shared/protocol/messages.py"):
        assert module in names, module
    shipped = {n for n in names if n.endswith(".py")}
    tracked = {str(p.relative_to(ROOT)) for package in ("client", "server", "shared", "strategies")
               for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert shipped == tracked  # every module of the four packages, none left behind
