"""The report in a real browser: Debian's Chromium driven by playwright (`playwright install` cannot download a
browser here). The page of a tiny real run loads with no console error and no request but itself, every plot
renders with a non-zero box, and a phone-width viewport has no horizontal overflow. Screenshots are kept:
under pytest's tmp dir and as ``test-artifacts/report.png`` (git-ignored)."""

import shutil
from pathlib import Path

import pytest

from tests.report_support import tiny_report_run

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                                            "(pip install 'kdistill[report]')")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# 3 stages' curves, quality against bytes and latency, reliability, per class, disagreements; the audit's confidence
# histogram, teacher reliability, STRIP entropies and trigger sizes
PLOTS = 12


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return tiny_report_run(tmp_path_factory.mktemp("browser")) / "report.html"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, report: Path, width: int):
    """The report at `width` px: (page, console errors, requests made, failed requests). Every request but the
    page itself is aborted and recorded."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors, requests, failed = [], [], []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: failed.append(req.url))
    url = report.as_uri()

    def route(r):
        requests.append(r.request.url)
        if r.request.url == url:
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    return page, errors, requests, failed


def test_the_report_loads_offline_and_every_plot_renders(browser, report, tmp_path):
    page, errors, requests, failed = open_page(browser, report, 1280)
    assert errors == []
    assert requests == [report.as_uri()] and failed == []
    plots = page.locator("svg.plot")
    assert plots.count() == PLOTS
    for i in range(PLOTS):
        box = plots.nth(i).bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 100, (plots.nth(i).get_attribute(
            "data-plot"), box)
    assert page.locator("section[data-has-data=true]").count() == 7
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report.png")
    page.close()


def test_phone_width_has_no_horizontal_overflow(browser, report, tmp_path):
    page, errors, requests, _ = open_page(browser, report, 390)
    assert errors == [] and requests == [report.as_uri()]
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, "
                           "document.documentElement.clientWidth]")
    assert max(widths[:2]) <= widths[2] <= 390, widths
    # wide tables scroll inside their own box; plots shrink to the column
    for i in range(page.locator("svg.plot").count()):
        box = page.locator("svg.plot").nth(i).bounding_box()
        assert 0 < box["width"] <= 390 and box["height"] > 0
    page.screenshot(path=str(tmp_path / "report-phone.png"), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "report-phone.png", ARTIFACTS / "report-phone.png")
    page.close()
