"""Fixtures for the real-browser tests: a localhost server, one headless Chromium, one visit per page.

Every test in this folder is marked `browser`. Without /usr/bin/chromium (or the Python driver)
they are skipped with the reason; with REQUIRE_BROWSER_TESTS=1 (set by `make browser-test` and
.ci/run) a missing browser is an error instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import browser_harness as harness

HERE = Path(__file__).parent
VISITED: list[harness.PageReport] = []  # every page visit of the session, for the summary line
PHONE_VISITS: list[harness.NavigationReport] = []  # every visit at a phone's width, for the tables' line


def _missing_requirement() -> str | None:
    if not harness.CHROMIUM.exists():
        return f"{harness.CHROMIUM} not found (install Debian's chromium: `make browser-test` does it)"
    try:
        import playwright.sync_api  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as error:
        return f"Python driver missing ({error.name}); `make browser-test` or `make venv` installs it"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    missing = _missing_requirement()
    required = os.environ.get("REQUIRE_BROWSER_TESTS") == "1"
    for item in items:
        if HERE not in Path(item.fspath).parents:
            continue
        item.add_marker(pytest.mark.browser)
        if missing and not required:
            item.add_marker(pytest.mark.skip(reason=f"browser tests skipped: {missing}"))


def summary_lines() -> list[str]:
    """What this process's page visits found: pages, figures, how much of each plot's axes holds data, and
    which tables scroll on a phone."""
    return figure_summary_lines() + phone_table_summary_lines()


def figure_summary_lines() -> list[str]:
    if not VISITED:
        return []
    seconds = sum(r.seconds for r in VISITED)
    figures = sum(len(r.figures) for r in VISITED)
    lines = [f"browser: {len(VISITED)} pages, {figures} plotly figures visited in {seconds:.0f} s; "
             f"screenshots in {harness.OUTPUT_DIR.relative_to(harness.REPO_ROOT)}/"]
    measured = [f for r in VISITED for f in r.figures]
    for kind in sorted({t for f in measured for t in f.trace_types}):
        of_kind = [f for f in measured if kind in f.trace_types]
        drawn = [f.drawn_fraction for f in of_kind if f.drawn_fraction is not None]
        contrast = [c for f in of_kind for c in f.text_contrast.values() if c is not None]
        lines.append(
            f"browser:   {kind}: {len(of_kind)} figure(s), data drawn over "
            f"{100 * min(drawn, default=0):.1f}-{100 * max(drawn, default=0):.1f}% of the axes, "
            f"lowest text contrast {min(contrast, default=float('nan')):.1f}:1"
        )
    return lines


def phone_table_summary_lines() -> list[str]:
    tables = sum(len(r.layout.get("tables", [])) for r in PHONE_VISITS)
    if not tables:
        return []
    scrolling = [(r.name, t) for r in PHONE_VISITS for t in harness.scrolling_tables(r)]
    return [f"browser: at {harness.PHONE_VIEWPORT['width']} px, {len(scrolling)} of {tables} tables scroll inside "
            "their box: " + ", ".join(f"{name} \"{t['head']}\" ({t['width']} px in {t['box']})" for name, t in scrolling)]


def pytest_sessionfinish(session):
    # Under pytest-xdist the pages are visited in a worker, whose terminal nobody sees: hand the lines to
    # the controller, which prints them (tests/conftest.py).
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["browser_summary"] = summary_lines()


def pytest_terminal_summary(terminalreporter):
    for line in summary_lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def blocked_requests() -> list[str]:
    """Every request the browser tried to make to anything but localhost (all were aborted)."""
    return []


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole session; each page visit gets a fresh context."""
    missing = _missing_requirement()
    if missing:
        pytest.fail(f"REQUIRE_BROWSER_TESTS=1 but {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = harness.launch_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def serve():
    """serve(directory) -> StaticServer on 127.0.0.1 at a free port; all are shut down at the end."""
    servers = []

    def start(directory: Path) -> harness.StaticServer:
        servers.append(harness.StaticServer(directory))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def site_server(serve):
    index = harness.SITE_DIR / "index.html"
    if not index.exists():
        pytest.fail(f"{index} does not exist: build the book first (`make book`)")
    return serve(harness.SITE_DIR)


@pytest.fixture(scope="session")
def site(browser, site_server, blocked_requests):
    """site.report(page_name) visits book/_build/html/<page_name>.html once and caches the report."""
    return SiteVisits(browser, site_server, blocked_requests)


class SiteVisits:
    def __init__(self, browser, server, blocked_log):
        self.browser, self.server, self.blocked_log = browser, server, blocked_log
        self.reports: dict[str, harness.PageReport] = {}
        self.navigation_reports: dict[str, harness.NavigationReport] = {}

    def report(self, page_name: str, query: str = "", **options) -> harness.PageReport:
        key = page_name + query
        if key not in self.reports:
            path = harness.SITE_DIR / f"{page_name}.html"
            if not path.exists():
                pytest.fail(f"{path} was not built")
            self.reports[key] = report = harness.visit_page(
                self.browser,
                self.server.url(f"{page_name}.html{query}"),
                page_name.replace("/", "__"),
                self.blocked_log,
                **options,
            )
            VISITED.append(report)
        return self.reports[key]

    def navigation(self, page_name: str, viewport: dict) -> harness.NavigationReport:
        """The page at `viewport` (phone or desktop): its layout, and what its ☰/contents buttons do."""
        key = f"{page_name}@{viewport['width']}"
        if key not in self.navigation_reports:
            if not (harness.SITE_DIR / f"{page_name}.html").exists():
                pytest.fail(f"{harness.SITE_DIR / page_name}.html was not built")
            self.navigation_reports[key] = harness.navigation_visit(
                self.browser, self.server.url(f"{page_name}.html"), page_name.replace("/", "__"), self.blocked_log, viewport
            )
            if viewport == harness.PHONE_VIEWPORT:
                PHONE_VISITS.append(self.navigation_reports[key])
        return self.navigation_reports[key]

