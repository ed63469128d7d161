"""What both screens share: server-drawn SVG charts, the access rules off 127.0.0.1, and the browser harness."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient

from shared.web import STATIC_DIR
from shared.web.access import TLSFiles, WebAccessError, check_binding, is_loopback, protect
from shared.web.svg import Series, line_chart, nice_ticks
from tests.browser import served

TOKEN = "s3cret-token-for-tests-0123"


def polylines(svg: str) -> list[str]:
    return re.findall(r'<polyline points="([^"]*)"', svg)


def test_chart_is_well_formed_xml_with_escaped_text_and_a_title():
    svg = line_chart([Series("<b>a & b</b>", [1, 2, 3], [0.1, 0.5, 0.2])], title="P(x < 1) & more",
                     x_label="dose (mg/m²)", y_label="p", marker_x=2, marker_label="chosen <dose>")
    root = ET.fromstring(svg)  # raises if the markup is not well-formed (unescaped text would break it)
    assert root.get("role") == "img"
    assert root.find("{http://www.w3.org/2000/svg}title").text == "P(x < 1) & more"
    assert "<b>" not in svg and "&lt;b&gt;a &amp; b&lt;/b&gt;" in svg
    assert "chosen &lt;dose&gt;" in svg and 'stroke-dasharray="4 3"' in svg


def test_missing_values_break_the_line_instead_of_drawing_zero():
    svg = line_chart([Series("auc", [1, 2, 3, 4, 5], [0.6, 0.7, None, math.nan, 0.8])], title="t", x_label="round",
                     y_label="auc", y_range=(0, 1))
    lines = polylines(svg)
    assert len(lines) == 1 and len(lines[0].split()) == 2  # rounds 1-2 joined; round 5 alone is a dot
    assert svg.count("<circle") == 1


def test_points_are_placed_by_value_and_the_y_range_is_honoured():
    svg = line_chart([Series("s", [0, 10], [0.0, 1.0])], title="t", x_label="x", y_label="y", y_range=(0, 1),
                     width=500, height=300)
    (points,) = polylines(svg)
    (x0, y0), (x1, y1) = [tuple(map(float, p.split(","))) for p in points.split()]
    assert x0 < x1 and y0 > y1  # SVG y grows downwards: the higher value is drawn higher
    assert x1 - x0 == pytest.approx(500 - 64 - 16)


def test_band_is_drawn_under_the_line_and_empty_chart_says_no_data():
    band = line_chart([Series("p", [1, 2, 3], [0.2, 0.3, 0.4], lower=[0.1, 0.2, 0.3], upper=[0.3, 0.4, 0.5])],
                      title="t", x_label="x", y_label="y")
    assert band.index("<polygon") < band.index("<polyline")
    empty = line_chart([Series("p", [1, 2], [None, math.inf])], title="t", x_label="x", y_label="y")
    assert "no data yet" in empty and "<polyline" not in empty
    with pytest.raises(ValueError, match="y has 1 values for 2"):
        Series("p", [1, 2], [0.1])


@pytest.mark.parametrize("low,high", [(0, 1), (0.37, 0.91), (10, 60), (-3, 250), (5, 5), (1e-4, 3e-4)])
def test_nice_ticks_cover_the_range_with_round_steps(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 2 <= len(ticks) <= 11
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m, rel_tol=1e-9) for m in (1, 2, 5, 10))


def test_whole_number_axes_get_whole_ticks():
    assert nice_ticks(1, 2, integer=True) == [1, 2]
    assert nice_ticks(1, 2) == [1, 1.5, 2]
    svg = line_chart([Series("auc", [1, 2], [0.6, 0.7])], title="t", x_label="round", y_label="auc")
    assert ">1.5<" not in svg and ">1<" in svg and ">2<" in svg


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
                                       ("0.0.0.0", False), ("10.0.0.5", False), ("example.org", False)])
def test_loopback(host, loop):
    assert is_loopback(host) is loop


def test_off_loopback_needs_a_token_and_tls(tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("pem"), key.write_text("key")
    check_binding("127.0.0.1", None, None)
    with pytest.raises(WebAccessError, match="access token .* and TLS"):
        check_binding("0.0.0.0", None, None)
    with pytest.raises(WebAccessError, match="needs TLS"):
        check_binding("0.0.0.0", TOKEN, None)
    with pytest.raises(WebAccessError, match="at least 16 characters"):
        check_binding("127.0.0.1", "short", None)
    check_binding("0.0.0.0", TOKEN, TLSFiles(cert, key))
    with pytest.raises(WebAccessError, match="no such file"):
        TLSFiles(tmp_path / "absent.pem", key)


def test_token_is_asked_for_on_every_request_and_a_link_token_becomes_a_cookie():
    app = FastAPI()
    app.get("/page")(lambda: {"ok": True})
    protect(app, TOKEN)
    client = TestClient(app)
    denied = client.get("/page")
    assert denied.status_code == 401 and "access token required" in denied.text
    assert client.get("/page", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert client.get("/page", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {"ok": True}
    link = client.get(f"/page?a=1&token={TOKEN}", follow_redirects=False)
    assert link.status_code == 303 and link.headers["location"] == "/page?a=1"
    assert "httponly" in link.headers["set-cookie"].lower() and "samesite=strict" in link.headers["set-cookie"].lower()
    assert client.get("/page").json() == {"ok": True}  # the cookie carries it from now on
    unprotected = FastAPI()
    protect(unprotected, None)
    assert not unprotected.user_middleware


@pytest.mark.slow
def test_browser_loads_the_shared_stylesheet_and_reaches_nothing_off_this_machine(chrome, tmp_path):
    page = ('<html><head><link rel="stylesheet" href="/static/fednano.css"></head><body><main>'
            '<h1 id="h">fednano</h1><img id="far" src="http://cdn.example.org/x.png"></main></body></html>')
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.get("/", response_class=HTMLResponse)(lambda: page)
    with served(app) as base:
        chrome.get(base + "/")
        assert chrome.find_element("id", "h").text == "fednano"
        # the stylesheet arrived: main is centred with the stylesheet's max width
        assert chrome.execute_script("return getComputedStyle(document.querySelector('main')).maxWidth") == "1180px"
        # an asset on the network never loads (the harness maps every other host to "not found")
        assert chrome.execute_script("return document.getElementById('far').naturalWidth") == 0
        chrome.save_screenshot(str(tmp_path / "shared.png"))
    assert (tmp_path / "shared.png").stat().st_size > 1000
