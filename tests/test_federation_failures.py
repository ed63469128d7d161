"""Flower simulation: a site with invalid data and a site whose privacy budget is spent contribute nothing,
say why, and the rounds go on with the others."""

import pytest

from client.ledger import SITE_LEDGER_FILE as LEDGER_FILE
from client.ledger import PrivacyLedger
from client.site import SiteSource
from simulation.clinics import generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def record(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("failures")
    flower_environment(out)
    quiet_flower()
    generate_sites(4, seed=1, out=out / "sites")
    broken = out / "sites" / "clinic_02" / "episodes.csv"
    lines = broken.read_text().splitlines()
    broken.write_text("\n".join(lines[:-1] + [lines[-1].split(",", 3)[0]]) + "\n")  # truncated last row
    spent = PrivacyLedger.open(out / "sites" / "clinic_01" / LEDGER_FILE, epsilon_budget=3.0, delta=1e-5)
    spent.record(noise_multiplier=0.8, sample_rate=0.5, steps=400, run_id="earlier", server_round=1)
    assert spent.spent() > 3.0
    trained = PrivacyLedger.open(out / "sites" / "clinic_03" / LEDGER_FILE, epsilon_budget=3.0, delta=1e-5)
    trained.record(noise_multiplier=2.0, sample_rate=0.5, steps=4, run_id="earlier", server_round=1)
    trained.path.write_text(trained.path.read_text()[:-40])  # a truncated ledger
    sources = [SiteSource(out / "sites" / f"clinic_{i:02d}") for i in range(4)]
    return run_federation(ExperimentConfig(out=out, rounds=2, seed=1, models="ann"), sources), spent


def test_site_with_invalid_data_is_rejected_naming_file_and_row(record):
    run, _ = record
    assert "clinic_02" not in run.sites
    (errors,) = [e for site, e in run.rejected.items() if site == "clinic_02"]
    assert "episodes.csv" in errors[0] and "row" in errors[0]


def test_site_past_its_budget_refuses_every_phase_at_the_site_check_and_says_so(record):
    run, spent = record
    privacy = run.privacy["clinic_01"]
    assert privacy.dp and not privacy.granted and set(privacy.refused) >= {"statistics", "training", "evaluation"}
    reason = privacy.refused["training"]
    assert "exhausted" in reason and str(spent.path) in reason
    assert "exhausted" in run.models["ann"].refused["clinic_01"]
    for r in run.models["ann"].rounds:
        assert "train" not in r["per_site"]["clinic_01"] and "clinic_01" not in r["failures"]
    reopened = PrivacyLedger.open(spent.path, 3.0, 1e-5)
    assert reopened.history == spent.history  # nothing was released, nothing recorded


def test_the_other_site_trains_every_round_within_its_budget(record):
    run, _ = record
    epsilons = [r["per_site"]["clinic_00"]["train"]["epsilon"] for r in run.models["ann"].rounds]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1] <= 3.0 + 1e-6
    privacy = run.privacy["clinic_00"]
    assert privacy.epsilon_spent >= epsilons[-1] and privacy.epsilon_spent <= 3.0 + 1e-6
    assert privacy.releases["statistics"] == 1 and privacy.releases["training"] == 2
    assert privacy.releases["evaluation"] == 1  # a DP site is evaluated at the final round only
    # its final summaries arrive through the release: counts noised, rounded and floored at 0 (client.evaluation),
    # so a small test split's released n may be 0; that it is a whole count >= 0 is what holds every time
    final = run.models["ann"].final
    assert list(final["per_site"]) == ["clinic_00"]
    released = final["overall"]["response"]["n"]
    assert released >= 0 and released == int(released)


def test_a_site_whose_ledger_cannot_be_read_is_left_out_at_the_site_check_and_named_with_why(record):
    run, _ = record
    assert "clinic_03" not in run.sites
    (problems,) = [p for site, p in run.rejected.items() if site == "clinic_03"]
    assert "privacy terms unusable" in problems[0] and "ledger" in problems[0]
    assert not any("Traceback" in p for p in problems)
