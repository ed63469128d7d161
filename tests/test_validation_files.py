"""Site files are regular files inside the site folder: links out of it, FIFOs and oversized site.toml refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.validation import MAX_SITE_TOML_BYTES, validate_site
from tests.sitefactory import file_hashes, write_site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path)


def test_episodes_linked_to_a_system_file_is_refused_without_reading_it(site, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("secret-first-line:x:0:0:/root:/bin/bash\n")
    (site / "episodes.csv").unlink()
    (site / "episodes.csv").symlink_to(secret)
    report = validate_site(site)
    [error] = report.errors
    assert error.file == "episodes.csv"
    assert "symbolic link to a place outside the site folder; refused" in error.message
    assert str(secret) in error.message and str(secret) not in error.shareable
    assert "secret-first-line" not in report.format()


@pytest.mark.parametrize("name", ["vitals.csv", "site.toml"])
def test_other_site_files_linked_outside_the_folder_are_refused(site, tmp_path, name):
    outside = tmp_path / f"outside_{name}"
    (site / name).rename(outside)
    (site / name).symlink_to(outside)
    [error] = validate_site(site).errors
    assert error.file == name and "symbolic link" in error.message


def test_a_broken_link_is_refused_rather_than_called_missing(site):
    (site / "vitals.csv").unlink()
    (site / "vitals.csv").symlink_to("/nonexistent/vitals.csv")
    [error] = validate_site(site).errors
    assert error.file == "vitals.csv" and "symbolic link" in error.message


def test_a_link_within_the_site_folder_is_accepted(site):
    (site / "episodes.csv").rename(site / "episodes_2024.csv")
    (site / "episodes.csv").symlink_to(site / "episodes_2024.csv")
    assert validate_site(site).ok


@pytest.mark.timeout(30)
def test_a_fifo_named_episodes_csv_is_refused_without_blocking(site):
    (site / "episodes.csv").unlink()
    os.mkfifo(site / "episodes.csv")
    [error] = validate_site(site).errors
    assert error.file == "episodes.csv" and "not a regular file" in error.message


def test_an_oversized_site_toml_is_refused_before_it_is_parsed(site):
    (site / "site.toml").write_text("# padding\n" * (MAX_SITE_TOML_BYTES // 10 + 1))
    [error] = validate_site(site).errors
    assert error.file == "site.toml" and f"at most {MAX_SITE_TOML_BYTES:,} bytes" in error.message


def test_validation_changes_no_file_and_follows_no_link_out(site, tmp_path):
    before = file_hashes(site)
    validate_site(site)
    assert file_hashes(site) == before
