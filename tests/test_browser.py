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
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference" / "cpu-amd-epyc-2core" / "20261123T193556Z-ref"  # committed records
# Every text a chart draws (titles, subplot titles, axis titles, tick labels, legend entries), as boxes on the page;
# tick labels of one axis are not compared with each other (rotated labels' boxes overlap by construction).
OVERLAPS = """() => {
  const out = [];
  for (const chart of document.querySelectorAll('.chart')) {
    const boxes = [];
    const add = (el, group) => {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && r.height > 0 && el.textContent.trim()) boxes.push({group, text: el.textContent.trim(), r});
    };
    chart.querySelectorAll('.gtitle, .annotation-text, .legendtext').forEach(el => add(el, 'text'));
    chart.querySelectorAll('[class*="title"] > text, text[class$="title"]').forEach(el => add(el, 'text'));
    chart.querySelectorAll('.xaxislayer-above, .yaxislayer-above').forEach((layer, i) =>
      layer.querySelectorAll('text').forEach(el => add(el, 'ticks' + i)));
    const seen = new Set();
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i], b = boxes[j];
      if (a.group === b.group && a.group !== 'text') continue;
      if (a.r === b.r || (a.text === b.text && Math.abs(a.r.x - b.r.x) < 1 && Math.abs(a.r.y - b.r.y) < 1)) continue;
      const w = Math.min(a.r.right, b.r.right) - Math.max(a.r.left, b.r.left);
      const h = Math.min(a.r.bottom, b.r.bottom) - Math.max(a.r.top, b.r.top);
      const key = chart.dataset.suite + '/' + chart.dataset.chart + ': ' + a.text + ' / ' + b.text;
      if (w > 2 && h > 2 && !seen.has(key)) { seen.add(key); out.push(key); }
    }
  }
  return out;
}"""
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


@pytest.fixture(scope="module")
def reference_pages(tmp_path_factory) -> dict[str, Path]:
    """The committed reference run's page and an index holding it, rendered by this code from its records."""
    if not (REFERENCE / "run.json").is_file():
        pytest.skip(f"no committed reference run at {REFERENCE}")
    root = tmp_path_factory.mktemp("reference")
    (root / "results").mkdir()
    (root / "results" / REFERENCE.name).symlink_to(REFERENCE, target_is_directory=True)
    reports = root / "reports"
    return {"run": render_run(REFERENCE, reports), "index": render_index(root / "results", reports)}


def _open(browser, path: Path, width: int):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(path.as_uri(), wait_until="load", timeout=120_000)
    if page.locator(".chart").count():
        page.wait_for_function(f"() => ({UNDRAWN})().length === 0", timeout=60_000)
    return page


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("HARNESS_SCREENSHOT_DIR"):
        out = Path(os.environ["HARNESS_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)


@pytest.mark.parametrize("width", [1280, 1920])
@pytest.mark.parametrize("name", ["run", "index"])
def test_the_answer_comes_first(browser, reference_pages, name, width, tmp_path):
    """At a laptop's and a desktop's width the summary (per method memory, speed, primary quality difference and
    verdict) starts within the first screen, before any suite's details, and its table is not cut off at the
    right. Screenshots of both widths go to $HARNESS_SCREENSHOT_DIR when set."""
    page = _open(browser, reference_pages[name], width)
    _screenshot(page, tmp_path / f"reference-{name}-{width}.png")
    summary = page.locator("#summary")
    assert summary.count() == 1, "no summary section"
    assert summary.bounding_box()["y"] < 450, f"the summary starts {summary.bounding_box()['y']:.0f} px down"
    table = page.locator("table.summary").first
    assert table.bounding_box()["y"] < 900, "the summary's first table is below the first screen"
    assert page.locator("table.summary[data-suite=smoke] tbody tr").count() == 6  # a row per method
    wrap = page.locator("table.summary").first.locator("xpath=..")
    assert page.evaluate("(el) => el.scrollWidth <= el.clientWidth + 1", wrap.element_handle()), "summary cut off"
    if name == "run":
        assert page.locator(".chart[data-suite=smoke][data-chart=differences]").count() == 1
        assert page.locator(".chart[data-suite=smoke][data-chart=base_differences]").count() == 1
        assert summary.bounding_box()["y"] < page.locator("section.suite").first.bounding_box()["y"]
    page.close()


@pytest.mark.parametrize("width", [1280, 1920])
def test_no_chart_draws_text_over_text(browser, reference_pages, width, tmp_path):
    """No chart of the reference page draws a title, subplot title, axis title, tick label or legend entry over
    another, at either width: the old differences chart put 15 metrics side by side and drew every subplot
    title over its neighbours'."""
    page = _open(browser, reference_pages["run"], width)
    overlaps = page.evaluate(OVERLAPS)
    page.close()
    assert overlaps == [], f"{len(overlaps)} overlapping chart texts, e.g. {overlaps[:5]}"
