"""Benchmark of the web screens' page load time (issue 15's measure): server time and browser time.

    python benchmarks/web_pages.py --clinician [--policy BUNDLE --trust KEY] [--repeats 20]
                                   [--out benchmarks/results/web_pages_clinician.json]

``--clinician``: the clinician's page of ``fednano serve`` (:mod:`client.clinician_page`), on a signed policy
bundle verified and loaded as ``fednano serve`` loads it — ``--policy/--trust`` (e.g. a finished 10-clinic
run's ``results.json`` ``policy.bundle`` and ``policy.trust_key``), else the tests' real bundle
(``tests.test_recommender.real_bundle``: the ANN + XGBoost + fitted-Q policy of a 3-clinic simulated world,
trained pooled in seconds). Two pages: the empty form (``GET /``) and the answer for ``examples/patient.json``
typed into the form (``POST /``).

- **server time**: FastAPI's TestClient (in process, no network), wall time per request, median and p95 of
  ``--repeats`` after 3 warm-up requests; the answer's time includes the recommendation itself, which
  ``POST /recommend`` (the JSON API, same patient) measures alone;
- **browser time**: Debian's headless Chromium (Selenium; it can reach 127.0.0.1 only, as in
  ``tests/browser.py``) loading the page from a uvicorn server on 127.0.0.1, read from the Navigation Timing
  API (``performance.getEntriesByType("navigation")[0]``): time to first byte (``responseStart``), response
  end, DOM content loaded and load event end, in ms from the navigation's start; median of ``--repeats``
  (each a fresh navigation; the answer page by submitting the filled form again).

Prints a table and writes the JSON (``benchmarks/record.py``'s form). Wall times depend on the machine's load;
the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from record import machine, write_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.patient_form import form_values, patient_form_fields  # noqa: E402
from client.recommender import load_policy  # noqa: E402
from client.service import make_app  # noqa: E402

EXAMPLE = ROOT / "examples" / "patient.json"
WARM_UP = 3
NAVIGATION_MARKS = ("responseStart", "responseEnd", "domContentLoadedEventEnd", "loadEventEnd")
"""Navigation Timing Level 2 marks read per page load (ms from the navigation's ``startTime``, which is 0)."""


def summary(values: list[float]) -> dict[str, float]:
    """Median, p95 (nearest rank) and count."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p95": p95, "n": len(ordered)}


def server_times(app, form: dict[str, str], repeats: int) -> dict[str, dict[str, float]]:
    """Median and p95 wall time (ms) of ``GET /`` and of ``POST /`` with the example patient, in process; and of
    the JSON API's ``POST /recommend`` for the same patient (the recommendation alone, without the page)."""
    from fastapi.testclient import TestClient

    client = TestClient(app)
    record = json.loads(EXAMPLE.read_text())
    requests = {"GET / (form)": lambda: client.get("/"), "POST / (answer)": lambda: client.post("/", data=form),
                "POST /recommend": lambda: client.post("/recommend", json=record)}
    results = {}
    for name, send in requests.items():
        times = []
        for i in range(WARM_UP + repeats):
            start = time.perf_counter()
            response = send()
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{name}: status {response.status_code}")
            if i >= WARM_UP:
                times.append(elapsed)
        results[name] = summary(times) | {"bytes": len(response.content)}
    return results


def navigation(driver) -> dict[str, float]:
    entry = driver.execute_script("const e = performance.getEntriesByType('navigation')[0]; return e.toJSON();")
    return {mark: float(entry[mark]) for mark in NAVIGATION_MARKS} | {"bytes": float(entry["decodedBodySize"])}


def browser_times(app, form: dict[str, str], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """Navigation Timing of the form page and of the answer page in Chromium, median and p95 per mark."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.browser import chromium, served

    fields = {f.name: f for f in patient_form_fields()}
    loads: dict[str, list[dict[str, float]]] = {"GET / (form)": [], "POST / (answer)": []}
    with tempfile.TemporaryDirectory(prefix="fednano-bench-chromium-") as profile, served(app) as base, \
            chromium(Path(profile)) as driver:
        for i in range(WARM_UP + repeats):
            driver.get(base + "/")
            form_load = navigation(driver)
            for name, text in form.items():
                element = driver.find_element(By.ID, fields[name].input_id)
                if fields[name].kind == "choice":
                    Select(element).select_by_value(text)
                elif text:
                    element.send_keys(text)
            button = driver.find_element(By.ID, "submit")
            button.click()
            WebDriverWait(driver, 60).until(expected_conditions.staleness_of(button))
            WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
            answer_load = navigation(driver)
            if not driver.find_elements(By.ID, "answer"):
                raise RuntimeError("the answer page shows no answer")
            if i >= WARM_UP:
                loads["GET / (form)"].append(form_load)
                loads["POST / (answer)"].append(answer_load)
    return {page: {mark: summary([load[mark] for load in runs]) for mark in (*NAVIGATION_MARKS, "bytes")}
            for page, runs in loads.items()}


def clinician(args) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fednano-bench-policy-") as folder:
        if args.policy is not None:
            bundle, trust, source = args.policy, args.trust, str(args.policy)
        else:
            from tests.test_recommender import real_bundle

            bundle, trust = real_bundle(Path(folder) / "v1", 1)
            source = "tests.test_recommender.real_bundle (3 simulated clinics, world seed 3)"
        policy = load_policy(bundle, trust)
        app = make_app(policy)
        form = form_values(json.loads(EXAMPLE.read_text()))
        server = server_times(app, form, args.repeats)
        browser = browser_times(app, form, args.repeats)
    load_after = os.getloadavg()
    print(f"clinician page, policy version {policy.version} ({source}); {args.repeats} loads each after "
          f"{WARM_UP} warm-up; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'page':18s} {'server ms':>10s} {'(p95)':>7s} {'TTFB ms':>8s} {'resp. end':>9s} {'DOM ready':>9s} "
          f"{'load ms':>8s} {'(p95)':>7s} {'kB':>6s}")
    for page in browser:
        s, b = server[page], browser[page]
        print(f"{page:18s} {s['median']:10.1f} {s['p95']:7.1f} {b['responseStart']['median']:8.1f} "
              f"{b['responseEnd']['median']:9.1f} {b['domContentLoadedEventEnd']['median']:9.1f} "
              f"{b['loadEventEnd']['median']:8.1f} {b['loadEventEnd']['p95']:7.1f} {s['bytes'] / 1024:6.1f}")
    api = server["POST /recommend"]
    print(f"{'POST /recommend':18s} {api['median']:10.1f} {api['p95']:7.1f}   (the JSON API, same patient: the "
          "recommendation without the page)")
    write_record(args.out, f"python benchmarks/web_pages.py --clinician --repeats {args.repeats}",
                 {"server_ms": server, "browser_ms": browser}, page="clinician", policy_version=policy.version,
                 policy_source=source, load_average={"before": load_before, "after": load_after}, machine=machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinician", action="store_true", help="The clinician's page of fednano serve.")
    parser.add_argument("--policy", type=Path, help="Signed policy bundle (default: the tests' real bundle).")
    parser.add_argument("--trust", type=Path, help="Trust key of the bundle.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "web_pages_clinician.json")
    args = parser.parse_args()
    if not args.clinician:
        parser.error("say which page: --clinician")
    if (args.policy is None) != (args.trust is None):
        parser.error("give both --policy and --trust, or neither")
    clinician(args)


if __name__ == "__main__":
    main()
