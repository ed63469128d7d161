"""site.toml privacy settings: every key checked at validation, so no round fails later on a site's budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.validation import (
    MAX_DELTA,
    MAX_EPSILON,
    PRIVACY_PHASES,
    SiteConfigError,
    load_site,
    privacy_shares,
    validate_site,
)
from tests.sitefactory import write_site

BUDGET = '[site]\nschema_version = "1.0"\n[privacy]\ndp = true\nepsilon = 3.0\ndelta = 1e-5\n'

SHARES = """
[privacy.shares]
statistics = 0.05
evaluation = 0.05
boosting = 0.2
importance = 0.0
adjuster = 0.0
policy = 0.1
analytics = 0.0
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path)


def with_toml(site: Path, text: str) -> Path:
    (site / "site.toml").write_text(text, encoding="utf-8")
    return site


def errors(site: Path) -> list[str]:
    return [p.message for p in validate_site(site).errors]


def test_epsilon_of_1e308_is_refused_pointing_to_dp_false(site):
    with_toml(site, BUDGET.replace("epsilon = 3.0", "epsilon = 1e308"))
    [error] = validate_site(site).errors
    assert error.file == "site.toml"
    assert f"expected a number > 0 and at most {MAX_EPSILON:g}" in error.message
    assert "use dp = false" in error.message and "1e+308" in error.message
    assert "1e+308" not in error.shareable and "use dp = false" in error.shareable


@pytest.mark.parametrize(("epsilon", "ok"), [("20", True), ("20.001", False), ("0.01", True), ("0", False)])
def test_epsilon_is_accepted_up_to_max_epsilon(site, epsilon, ok):
    with_toml(site, BUDGET.replace("epsilon = 3.0", f"epsilon = {epsilon}"))
    assert validate_site(site).ok is ok
    assert MAX_EPSILON == 20.0


@pytest.mark.parametrize(("delta", "ok"), [("1e-3", True), ("2e-3", False), ("1e-12", True)])
def test_delta_is_accepted_up_to_max_delta(site, delta, ok):
    with_toml(site, BUDGET.replace("delta = 1e-5", f"delta = {delta}"))
    assert validate_site(site).ok is ok
    assert MAX_DELTA == 1e-3


def test_legacy_adjuster_share_of_5_is_refused_at_validation(site):
    with_toml(site, BUDGET + "adjuster_share = 5.0\n")
    assert errors(site) == ["privacy.adjuster_share: expected a number in [0, 1), got 5.0"]


def test_legacy_adjuster_share_is_accepted_with_a_deprecation_warning_and_read_as_the_adjuster_share(site):
    with_toml(site, BUDGET + "adjuster_share = 0.3\n")
    report = validate_site(site)
    assert report.ok
    assert [w.message for w in report.warnings] == [
        "privacy.adjuster_share is deprecated: use [privacy.shares] adjuster"]
    assert privacy_shares(load_site(site).config) == {"adjuster": 0.3}


def test_the_per_phase_shares_of_the_lead_example_are_accepted_and_handed_out_as_declared(site):
    with_toml(site, BUDGET + SHARES)
    report = validate_site(site)
    assert report.ok and report.warnings == []
    assert privacy_shares(load_site(site).config) == {
        "statistics": 0.05, "evaluation": 0.05, "boosting": 0.2, "importance": 0.0, "adjuster": 0.0,
        "policy": 0.1, "analytics": 0.0}


def test_a_site_without_shares_declares_none():
    assert privacy_shares({"privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5}}) == {}
    assert privacy_shares({}) == {}


def test_an_unknown_phase_is_an_error_naming_it_here_but_not_in_the_shared_text(site):
    with_toml(site, BUDGET + "[privacy.shares]\nbosting = 0.2\n")
    [error] = validate_site(site).errors
    assert error.message == f"privacy.shares.bosting: unknown phase; expected one of {', '.join(PRIVACY_PHASES)}"
    assert "bosting" not in error.shareable


@pytest.mark.parametrize("value", ["1.5", "-0.1", '"0.2"', "true", "nan", "inf"])
def test_a_share_outside_zero_one_or_not_a_number_is_an_error(site, value):
    with_toml(site, BUDGET + f"[privacy.shares]\nboosting = {value}\n")
    [error] = errors(site)
    assert error.startswith("privacy.shares.boosting: expected a number in [0, 1]")


def test_shares_adding_up_to_more_than_one_are_an_error(site):
    with_toml(site, BUDGET + "[privacy.shares]\nboosting = 0.6\npolicy = 0.3\nstatistics = 0.2\n")
    assert errors(site) == ["privacy.shares: the shares add up to more than 1; training gets what they leave of "
                            "privacy.epsilon (they add up to 1.1)"]


def test_shares_adding_up_to_exactly_one_in_decimals_are_accepted(site):
    with_toml(site, BUDGET + "[privacy.shares]\nstatistics = 0.1\nboosting = 0.2\ntraining = 0.7\n")
    assert validate_site(site).ok


def test_the_legacy_share_counts_towards_the_sum(site):
    with_toml(site, BUDGET + "adjuster_share = 0.5\n[privacy.shares]\nboosting = 0.6\n")
    assert "privacy.shares: the shares add up to more than 1" in errors(site)[0]


def test_legacy_and_new_adjuster_share_together_are_an_error(site):
    with_toml(site, BUDGET + "adjuster_share = 0.1\n[privacy.shares]\nadjuster = 0.1\n")
    assert errors(site) == ["privacy.adjuster_share and privacy.shares.adjuster both set; keep only "
                            "[privacy.shares] adjuster"]


def test_shares_that_are_not_a_table_are_an_error(site):
    with_toml(site, BUDGET + "shares = 0.5\n")
    assert errors(site) == ["privacy.shares: expected a table [privacy.shares] of phase = share, got 0.5"]


def test_privacy_shares_refuses_settings_that_validation_refuses_with_a_shareable_reason():
    with pytest.raises(SiteConfigError, match=r"site.toml: privacy.adjuster_share: expected a number in \[0, 1\)$"):
        privacy_shares({"privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5, "adjuster_share": 5.0}})
    with pytest.raises(SiteConfigError, match="unknown phase"):
        privacy_shares({"privacy": {"shares": {"MRN-0047113": 0.1}}})


@pytest.mark.parametrize(("per_run", "ok"), [("0.6", True), ("3.0", True), ("3.5", False), ("0", False),
                                             ('"a lot"', False)])
def test_epsilon_per_run_is_a_number_above_zero_and_at_most_the_budget(site, per_run, ok):
    with_toml(site, BUDGET + f"epsilon_per_run = {per_run}\n")
    assert validate_site(site).ok is ok
