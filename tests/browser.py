"""A real browser for the screens' tests: headless Chromium driven by Selenium, and an app served on 127.0.0.1.

Chromium and ChromeDriver are Debian's (``apt-get install chromium chromium-driver``; ``.ci/run`` installs them
like the docker engine). Selenium is given both paths, so its driver manager never downloads anything, and
Chromium's host resolver maps every name except 127.0.0.1 to "not found": a page that asked for anything on
the network (a CDN, a font) would fail to load it, and its test would see the gap. Without Chromium the tests
are skipped with a reason, unless ``FEDNANO_REQUIRE_BROWSER=1`` (CI sets it), where they fail.

The ``chrome`` fixture is registered for every test by ``tests/conftest.py``. Use in a test module::

    from tests.browser import served

    def test_page(chrome, tmp_path):
        with served(make_app(...)) as base:
            chrome.get(base + "/")
            chrome.save_screenshot(str(tmp_path / "page.png"))
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FEDNANO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FEDNANO_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_ENV = "FEDNANO_REQUIRE_BROWSER"
WINDOW = (1280, 1600)


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium(folder) -> Iterator:
    """A headless Chromium (Selenium WebDriver) that can reach 127.0.0.1 only, with its profile and driver log in
    ``folder``; quit, and its driver's process stopped by PID, when the block ends. For tests (the ``chrome``
    fixture) and the page-load benchmarks alike."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--metrics-recording-only", "--no-pings",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={Path(folder) / 'chromium-profile'}",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(Path(folder) / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    pid = service.process.pid if service.process is not None else None
    try:
        yield driver
    finally:
        driver.quit()
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def chrome(tmp_path):
    """:func:`chromium` for one test, its files under the test's temporary folder."""
    missing = _missing()
    if missing is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"browser tests required ({REQUIRE_ENV}=1) but {missing}")
        pytest.skip(missing)
    with chromium(tmp_path) as driver:
        yield driver


@contextmanager
def served(app, **uvicorn_options) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1 and a free port; yields its base URL ("http://…")
    and stops the server when the block ends."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app did not start within 20 s")
        time.sleep(0.02)
    scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
