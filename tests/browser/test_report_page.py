"""The run report as a person sees it, in a real headless browser: Debian's chromium driven by
Playwright (scripts/browser_setup.sh installs chromium for `make test`; never `playwright install`).
The page is built from the hand-written run folder tests/data/report_run (no training), opened from
disk, and must load with no console error and no network request; the drift view shows the known
sample's sentences coloured by language; a filter click changes what is shown. The screenshot is kept
in .test-artifacts/ (gitignored)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import DATA, ROOT
from lowvram_ft.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("LOWVRAM_FT_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / ".test-artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/browser_setup.sh installs Debian's chromium as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.lock)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=FLAGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@pytest.fixture(scope="module")
def report_page(browser, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(DATA / "report_run", run)
    path = write_report([run])
    page = browser.new_page()
    console, requests = [], []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    yield page, console, requests, path
    page.close()


def test_page_loads_from_disk_with_no_console_error_and_no_network_request(report_page):
    page, console, requests, path = report_page
    assert page.title() == "lowvram_ft run runs/fixture"
    assert [line for line in console if not line.startswith(("log:", "debug:", "info:"))] == []
    assert requests == [path.resolve().as_uri()]


def test_drift_view_colours_the_known_samples_sentences_by_language(report_page):
    page, *_ = report_page
    sample = page.locator('.sample[data-key="math-sum|fr|0"]')
    assert "asked: French (fr)" in sample.locator(".asked").inner_text()
    base, tuned = sample.locator(".cell").nth(0), sample.locator(".cell").nth(1)
    assert base.locator(".seg.lang-en").first.inner_text() == "We need to add twelve and thirty together."
    assert tuned.locator(".seg.lang-fr").first.inner_text() == "Nous devons additionner douze et trente."
    assert tuned.locator(".seg.lang-en").count() == 0
    colours = {base.locator(".seg.lang-en").first.evaluate("e => getComputedStyle(e).backgroundColor"),
               tuned.locator(".seg.lang-fr").first.evaluate("e => getComputedStyle(e).backgroundColor")}
    assert len(colours) == 2 and "rgba(0, 0, 0, 0)" not in colours  # two languages, two visible colours
    grey = base.locator(".seg.unjudged", has_text="12 + 30 = 42")
    assert grey.count() == 1  # code is shown, as a fragment the scorer did not judge


def test_a_completion_holding_markup_shows_as_text(report_page):
    page, *_ = report_page
    answer = page.locator('.sample[data-key="everyday-sleep|fr|0"] .cell').nth(0).locator(".answer")
    assert "<script>alert('x')</script>" in answer.inner_text()
    assert page.locator("main script, main img").count() == 0


def test_filter_clicks_change_what_is_shown(report_page):
    page, *_ = report_page
    visible = page.locator(".sample:visible")
    assert visible.count() == 4
    page.click("#f-changed")
    assert visible.count() == 2
    assert page.locator("#f-count").inner_text() == "2 of 4 samples shown"
    assert sorted(visible.evaluate_all("els => els.map(e => e.dataset.key)")) == ["math-sum|fr|0", "math-sum|ja|0"]
    page.select_option("#f-lang", "ja")
    assert visible.evaluate_all("els => els.map(e => e.dataset.key)") == ["math-sum|ja|0"]
    page.click("#f-changed")
    page.select_option("#f-lang", "all")
    assert visible.count() == 4
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-page.png"), full_page=True)
    assert (ARTIFACTS / "report-page.png").stat().st_size > 10_000
