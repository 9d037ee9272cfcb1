"""Rendered reports open in headless Chromium with no console error, no network, and every chart drawn.

Needs Debian's ``chromium`` (or $HARNESS_CHROMIUM) and the ``playwright`` package, which drives that
browser directly (no browser download); skipped when either is missing. Screenshots go to the test's
tmp dir and, when $HARNESS_SCREENSHOT_DIR is set, there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import make_run

from harness.report import render_index, render_many, render_run

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HARNESS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
UNDRAWN = "() => [...document.querySelectorAll('.chart')].filter(c => !c.querySelector('.main-svg'))" \
          ".map(c => c.dataset.suite + '/' + c.dataset.chart)"


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium with a fresh profile (playwright makes a temporary one per launch)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HARNESS_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to drive Chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """A run page (with a baseline), the index, and a two-run comparison, rendered from fake runs."""
    root = tmp_path_factory.mktemp("browser")
    results, reports = root / "results", root / "reports"
    base = make_run(results, "20261120T120000Z-4090", gpu="NVIDIA GeForce RTX 4090", scale=1.2)
    run = make_run(results, "20261122T120000Z-h100")
    return {
        "run": render_run(run, reports, baseline=base),
        "index": render_index(results, reports),
        "many": render_many([run, base], reports / "compare.html"),
    }


@pytest.mark.parametrize("name", ["run", "index", "many"])
def test_report_renders_in_chromium(browser, pages, name, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))

    def route(r):  # a report must not reach the network
        if r.request.url.startswith(("http:", "https:", "ws:", "wss:")):
            requests.append(r.request.url)
            return r.abort()
        return r.continue_()

    page.route("**/*", route)
    page.goto(pages[name].as_uri(), wait_until="load")
    n = page.locator(".chart").count()
    if n:
        page.wait_for_function(f"() => ({UNDRAWN})().length === 0", timeout=30_000)
    assert page.evaluate(UNDRAWN) == []
    assert page.locator(".chart .main-svg").count() >= n
    shot = tmp_path / f"report-{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("HARNESS_SCREENSHOT_DIR"):
        out = Path(os.environ["HARNESS_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)
    page.close()
    assert shot.stat().st_size > 10_000
    assert errors == [] and requests == []
    if name != "index":
        assert n >= 3
