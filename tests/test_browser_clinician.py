"""The clinician's page in a real browser (issue 15.4): headless Chromium fills the form with examples/patient.json,
submits, and sees what ``fednano recommend`` prints for the same patient; a bad value shows its message next to
its field; the FHIR link holds the MedicationRequest. The app is served on 127.0.0.1 and the browser can reach
nothing else (tests/browser.py).

The policy is the tests' real signed bundle (``tests.test_recommender.real_bundle``: ANN + XGBoost + fitted-Q
trained pooled in seconds, signed with a throwaway coordinator key), loaded as ``fednano serve`` loads it.
With ``FEDNANO_SCREENSHOTS=DIR`` the answer page is also saved as ``DIR/clinician.png`` (the README's picture:
``FEDNANO_SCREENSHOTS=docs/screenshots pytest tests/test_browser_clinician.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from client.patient_form import form_values, patient_form_fields
from client.recommender import load_policy
from client.service import make_app
from fednano.cli import app as cli
from tests.browser import served
from tests.test_recommender import EXAMPLE, example_dict, real_bundle

pytestmark = pytest.mark.slow  # the real bundle's training and Chromium's start: ~15-25 s here

SCREENSHOTS_ENV = "FEDNANO_SCREENSHOTS"


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """The real policy's bundle (version 3), its trust key, and the policy loaded and verified from them."""
    bundle, trust = real_bundle(tmp_path_factory.mktemp("clinician") / "v3", 3)
    return bundle, trust, load_policy(bundle, trust)


def fill(chrome, values: dict[str, str]) -> None:
    """Type each value into its field (choose it in a select), leaving the others as they are."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    kinds = {f.name: f for f in patient_form_fields()}
    for name, text in values.items():
        element = chrome.find_element(By.ID, kinds[name].input_id)
        if kinds[name].kind == "choice":
            Select(element).select_by_value(text)
        else:
            element.clear()
            if text:
                element.send_keys(text)


def submit(chrome) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    button = chrome.find_element(By.ID, "submit")
    button.click()
    WebDriverWait(chrome, 30).until(expected_conditions.staleness_of(button))


def shown(chrome, name: str) -> str:
    from selenium.webdriver.common.by import By

    return chrome.find_element(By.ID, f"answer-{name}").get_attribute("data-value")


def test_the_page_shows_what_fednano_recommend_prints_for_the_example_patient(chrome, signed, tmp_path):
    from selenium.webdriver.common.by import By

    bundle, trust, policy = signed
    printed = CliRunner().invoke(cli, ["recommend", "--patient", str(EXAMPLE), "--policy", str(bundle),
                                       "--trust", str(trust)])
    assert printed.exit_code == 0, printed.output
    expected = json.loads(printed.stdout)
    with served(make_app(policy)) as base:
        chrome.get(base + "/")
        assert chrome.title.startswith("fednano")
        fill(chrome, form_values(example_dict()))
        submit(chrome)
        assert shown(chrome, "formulation") == expected["formulation_id"]
        assert float(shown(chrome, "dose-mg-m2")) == expected["dose_mg_m2"]
        assert float(shown(chrome, "dose-mg")) == expected["dose_mg"]
        assert int(shown(chrome, "interval")) == expected["interval_days"]
        assert shown(chrome, "action") == expected["action"]
        page = chrome.find_element(By.ID, "answer").text
        assert all(rule["rule"] in page for rule in expected["rules"])
        assert chrome.find_element(By.CSS_SELECTOR, "#dose-chart svg[role=img]").is_displayed()
        if any(rule["rule"] == "fitted-q-adjustment" for rule in expected["rules"]):
            assert "chosen by the fitted-Q adjuster" in page  # the chart's note: not the chart's best point
        assert "verified" in chrome.find_element(By.ID, "policy-signature").text
        assert "policy version 3" in chrome.find_element(By.ID, "policy-version").text
        chrome.save_screenshot(str(tmp_path / "clinician.png"))
        if os.environ.get(SCREENSHOTS_ENV):
            folder = Path(os.environ[SCREENSHOTS_ENV])
            folder.mkdir(parents=True, exist_ok=True)
            chrome.save_screenshot(str(folder / "clinician.png"))

        link = chrome.find_element(By.ID, "fhir-download")
        assert link.get_attribute("download").endswith(".fhir.json")
        linked = chrome.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.json()).then(done, e => done({error: String(e)}));",
            link.get_attribute("href"))
        fhir = TestClient(make_app(policy)).post("/recommend/fhir", json=example_dict()).json()
        for resource in (linked, fhir):
            resource.pop("authoredOn", None)
        assert linked == fhir and linked["resourceType"] == "MedicationRequest"

        fetched = chrome.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith((base, "data:")) for name in fetched), fetched  # nothing off 127.0.0.1
    assert (tmp_path / "clinician.png").stat().st_size > 10_000


def test_a_bad_value_shows_its_message_next_to_the_field(chrome, signed, tmp_path):
    from selenium.webdriver.common.by import By

    _, _, policy = signed
    with served(make_app(policy)) as base:
        chrome.get(base + "/")
        fill(chrome, form_values(example_dict()) | {"age_years": "1000", "weight_kg": "heavy"})
        submit(chrome)
        age = chrome.find_element(By.ID, "error-f-age_years")
        weight = chrome.find_element(By.ID, "error-f-weight_kg")
        assert "less than or equal to 110" in age.text and age.is_displayed()
        assert "not a number; expected 25 – 250 kg" in weight.text
        assert chrome.find_element(By.ID, "f-age_years").get_attribute("aria-invalid") == "true"
        assert not chrome.find_elements(By.ID, "answer")
        chrome.save_screenshot(str(tmp_path / "clinician-bad-value.png"))
