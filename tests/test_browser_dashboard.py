"""The coordinator's dashboard in a real browser (issue 15 item 4): a finished small simulation's page shows every
site, every round and each site's ε as its run record says, and a corrupt record beside it shows its message.

One Flower simulation (3 clinics under DP, 2 rounds, ANN only, no comparison, the policy shipped without the
gate so every site's install shows) in a folder with a half-written record next to it; headless Chromium
(``tests/browser.py``) reaches nothing but the dashboard on 127.0.0.1. Screenshots go to the test's temporary
folder; with ``FEDNANO_SCREENSHOTS=DIR`` the run page is also saved as ``DIR/dashboard.png`` (the README's picture:
``FEDNANO_SCREENSHOTS=docs/screenshots pytest tests/test_browser_dashboard.py``, as the clinician's test does).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from server.dashboard import make_dashboard
from server.run_record import RunRecord
from tests.browser import chrome, served  # noqa: F401

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow
SCREENSHOTS_ENV = "FEDNANO_SCREENSHOTS"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_ray) -> tuple[Path, RunRecord]:
    from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

    flower_environment(ROOT)
    quiet_flower()
    folder = tmp_path_factory.mktemp("dashboard-runs")
    cfg = ExperimentConfig(out=folder / "small", clinics=3, rounds=2, seed=4, models="ann", patients_per_clinic=120,
                           compare=False, fqi_iterations=0, release_gate=False)
    run_experiment(cfg)
    (folder / "broken").mkdir()
    (folder / "broken" / "federation.json").write_text('{"format": "fednano/run-record", "version": 2, "sites": [')
    return folder, RunRecord.read(folder / "small" / "federated" / "federation.json")


def screenshot(driver, tmp_path: Path, name: str, publish: bool = False) -> Path:
    """The whole page (window grown to it) into ``tmp_path``; with ``publish``, also into ``$FEDNANO_SCREENSHOTS``."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 600), 4000))
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if publish and os.environ.get(SCREENSHOTS_ENV):
        folder = Path(os.environ[SCREENSHOTS_ENV])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def only_local_resources(driver, base: str) -> None:
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(base) for name in names), names


def test_index_shows_each_run_and_the_corrupt_records_message(chrome, runs, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    folder, record = runs
    with served(make_dashboard(folder)) as base:
        chrome.get(base + "/")
        cards = {card.get_attribute("data-run"): card for card in chrome.find_elements(By.CSS_SELECTOR, ".run-card")}
        assert set(cards) == {"small", "broken"}
        broken = cards["broken"].find_element(By.CSS_SELECTOR, ".record-message").text
        assert "the run record could not be shown" in broken and "not JSON" in broken
        small = cards["small"].text
        assert "finished" in small and "2 of 2 rounds" in small and f"{len(record.sites)}" in small
        only_local_resources(chrome, base)
        assert screenshot(chrome, tmp_path, "dashboard-index.png").stat().st_size > 10_000


def test_run_page_shows_every_site_every_round_and_each_sites_epsilon_of_the_record(chrome, runs, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    folder, record = runs
    with served(make_dashboard(folder)) as base:
        chrome.get(base + "/")
        chrome.find_element(By.LINK_TEXT, "small").click()
        assert chrome.current_url == base + "/runs/small"
        sites = {row.get_attribute("data-site"): row.text
                 for row in chrome.find_elements(By.CSS_SELECTOR, "#sites tr[data-site]")}
        assert list(sites) == record.sites
        for site in record.sites:
            privacy = record.privacy[site]
            assert privacy.dp and f"{privacy.epsilon_spent:.2f}" in sites[site], (site, sites[site])
            assert f"{privacy.epsilon_budget:g}" in sites[site] and "2/2" in sites[site]
            assert f"installed v{record.policy['version']}" in sites[site]
        rounds = chrome.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round]")
        assert [r.get_attribute("data-round") for r in rounds] == ["1", "2"]
        for row in rounds:
            cells = row.find_elements(By.TAG_NAME, "td")
            assert [c.text for c in cells[2:2 + len(record.sites)]] == ["✓"] * len(record.sites)
        charts = chrome.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert len(charts) >= 2 and charts[0].find_element(By.TAG_NAME, "title").get_attribute("textContent") \
            .startswith("ε spent")
        assert "gate" in chrome.find_element(By.CSS_SELECTOR, "section.policy").text
        assert not chrome.find_elements(By.TAG_NAME, "script")  # a finished run is not polled
        only_local_resources(chrome, base)
        assert screenshot(chrome, tmp_path, "dashboard.png", publish=True).stat().st_size > 10_000
