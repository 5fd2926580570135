"""Drive Debian's headless Chromium over the built book and report what a reader would see.

Each page is visited once (`visit_page`): the visit loads it from a localhost server, waits for
MathJax and plotly, saves screenshots, gathers the page's facts in one JavaScript round trip
(page_facts.js), measures every plotly figure in pixels (light and dark theme), clicks the
download-role links, and fetches the favicon and download buttons. The tests then only read the
`PageReport`. The `*_problems` functions turn a report into human-readable defects (an empty
list means the check passed); the same functions are run on small synthetic pages in
test_checks_can_fail.py to show that each check fails on the defect it is meant to catch.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from attribution_course.exercises import NOTEBOOK_STEMS

REPO_ROOT = Path(__file__).resolve().parents[2]
# BROWSER_TEST_BOOK points the tests at another book folder (its _build/html), e.g. a scratch build.
BOOK_DIR = Path(os.environ.get("BROWSER_TEST_BOOK", REPO_ROOT / "book"))
SITE_DIR = BOOK_DIR / "_build" / "html"
OUTPUT_DIR = REPO_ROOT / "test-output" / "browser"

CHROMIUM = Path("/usr/bin/chromium")
# The flags the project's browser tests always use (Playwright adds its own automation flags).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Second line of defence behind request interception: no host name but localhost resolves.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
# Generous: on a busy 2-core machine a figure page (plotly.js parsed and run) can take half a minute.
PAGE_LOAD_TIMEOUT_MS = 90_000
VIEWPORT = {"width": 1366, "height": 900}  # wide enough for the theme to show the primary sidebar
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

# Chapters 02..08 end with a download link to their exercises notebook, and share its stem.
EXERCISE_CHAPTERS = list(NOTEBOOK_STEMS)
CHAPTERS = ["01_introduction", *EXERCISE_CHAPTERS, "09_cost"]
OTHER_PAGES = ["reference", "bibliography"]

# Pixel thresholds. A channel must move by more than this to count as a changed pixel
# (anti-aliasing noise between two screenshots of the same pixels is 0; this only ignores faint blending).
PIXEL_CHANGE_THRESHOLD = 24
MIN_DRAWN_FRACTION = 0.001  # every figure: at least 0.1% of its data area is drawn by its traces
MIN_HEATMAP_FRACTION = 0.30  # a heatmap covers a large part of its axes
MIN_TEXT_CONTRAST = 3.0  # WCAG 2 minimum for large text and graphics; 1.0 = invisible

FACTS_JS = (Path(__file__).with_name("page_facts.js")).read_text()
FIGURE_LAYOUT_JS = (Path(__file__).with_name("figure_layout_facts.js")).read_text()

# In-page fetch, so the browser's own view of a URL is tested (status, type, and notebook shape).
FETCH_JS = """async (url) => {
  try {
    const r = await fetch(url, {cache: "no-store"});
    const body = await r.text();
    let notebook = null;
    try { const nb = JSON.parse(body); if (nb && Array.isArray(nb.cells)) notebook = {nbformat: nb.nbformat, cells: nb.cells.length}; } catch (e) {}
    return {url, status: r.status, contentType: r.headers.get("content-type") || "", length: body.length, head: body.slice(0, 200), notebook};
  } catch (e) { return {url, status: 0, contentType: "", length: 0, head: String(e), notebook: null}; }
}"""

WAIT_FOR_MATHJAX_JS = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
}"""
ALL_FIGURES_DRAWN_JS = """() => [...document.querySelectorAll('.plotly-graph-div')]
    .every(d => d.querySelector('svg.main-svg, canvas'))"""
# The theme's own switch sets these two attributes; a reader in dark mode sees exactly this.
DARK_THEME_JS = """() => { const d = document.documentElement; d.dataset.mode = 'dark'; d.dataset.theme = 'dark'; }"""
SETTLE_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
# Clicking download links leaves focus on them (and shows the theme's skip link): undo before screenshots.
RESET_VIEW_JS = "() => { if (document.activeElement) document.activeElement.blur(); window.scrollTo(0, 0); }"

# Bytes over the wire (headers + compressed bodies) for the page and everything it loaded so far.
TRANSFERRED_JS = """() => [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
    .map(e => ({url: e.name, bytes: e.transferSize, decoded: e.decodedBodySize}))"""

# Opacity on a group cannot be overridden by its children, unlike visibility.
HIDE_FIGURE_DATA_CSS = """
.js-plotly-plot .cartesianlayer .plot, .js-plotly-plot .cartesianlayer .overplot, .js-plotly-plot .polarlayer .plot, .js-plotly-plot .ternarylayer .plot,
.js-plotly-plot .pielayer, .js-plotly-plot .funnelarealayer, .js-plotly-plot .gl-container,
.js-plotly-plot .geolayer, .js-plotly-plot .barlayer { opacity: 0 !important; }"""
HIDE_FIGURE_TEXT_CSS = ".js-plotly-plot svg text { opacity: 0 !important; }"


# ---------------------------------------------------------------- local web server


# Served gzip-compressed when the browser accepts it, as GitHub Pages does, so page weights are
# what a reader downloads. Downloads (.ipynb, .md) are sent as they are.
GZIP_SUFFIXES = {".html", ".js", ".css", ".svg", ".json", ".txt", ".map"}


@functools.lru_cache(maxsize=256)
def _gzipped(path: Path, mtime_ns: int) -> bytes:  # mtime_ns: a rebuilt file is compressed again
    return gzip.compress(path.read_bytes(), compresslevel=6)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        accepts_gzip = "gzip" in self.headers.get("Accept-Encoding", "")
        if not (accepts_gzip and path.suffix in GZIP_SUFFIXES and path.is_file()):
            return super().send_head()
        body = _gzipped(path, path.stat().st_mtime_ns)
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


class StaticServer:
    """Serves one directory on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base_url + path.lstrip("/")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- browser


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return parts.hostname in LOCAL_HOSTS


def launch_browser(playwright):
    """Debian's Chromium, headless, with a fresh temporary profile (Playwright makes one per launch)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)


def new_reader_context(browser, blocked_requests: list[str], viewport: dict = VIEWPORT):
    """A first-time reader: empty storage and cache; every request not to localhost is aborted and logged."""
    context = browser.new_context(
        viewport=viewport,
        device_scale_factor=1,
        color_scheme="light",
        accept_downloads=True,
        service_workers="block",
    )

    def guard(route):
        url = route.request.url
        if is_local(url):
            route.continue_()
        else:
            blocked_requests.append(url)
            route.abort("blockedbyclient")

    context.route("**/*", guard)
    return context


# ---------------------------------------------------------------- pixels


def _rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _crop(image: np.ndarray, area: dict | None) -> np.ndarray:
    if not area:
        return image
    top, left = max(0, int(round(area["y"]))), max(0, int(round(area["x"])))
    bottom, right = top + int(area["height"]), left + int(area["width"])
    return image[top:bottom, left:right]


def changed_pixels(with_png: bytes, without_png: bytes, area: dict | None = None):
    """Pixels that differ between two screenshots of the same box: (mask, with_rgb, without_rgb)."""
    shown, hidden = _crop(_rgb(with_png), area), _crop(_rgb(without_png), area)
    if shown.shape != hidden.shape:  # the page moved between the two shots: treat as unmeasurable
        raise AssertionError(f"screenshots differ in size: {shown.shape} vs {hidden.shape}")
    mask = np.abs(shown - hidden).max(axis=-1) > PIXEL_CHANGE_THRESHOLD
    return mask, shown, hidden


def drawn_fraction(with_png: bytes, without_png: bytes, area: dict | None) -> float:
    """Fraction of the data area whose pixels change when the figure's traces are hidden."""
    mask, _, _ = changed_pixels(with_png, without_png, area)
    return float(mask.mean()) if mask.size else 0.0


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG 2 relative luminance of sRGB colours, shape [..., 3] -> [...]."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def contrast_ratio(rgb_a: np.ndarray, rgb_b: np.ndarray) -> np.ndarray:
    la, lb = _luminance(rgb_a), _luminance(rgb_b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def text_contrast(with_png: bytes, without_png: bytes) -> float:
    """Contrast of a figure's text against what is behind it, as drawn on screen.

    Text pixels are those that change when the SVG text is hidden; the contrast of each is its
    colour against the same pixel without text. The 90th percentile keeps the solid strokes and
    drops anti-aliased edges. Text drawn in the background colour changes no pixel: contrast 1.
    """
    mask, shown, hidden = changed_pixels(with_png, without_png)
    if not mask.any():
        return 1.0
    return float(np.percentile(contrast_ratio(shown[mask], hidden[mask]), 90))


# ---------------------------------------------------------------- one visit per page


@dataclass
class FigureReport:
    index: int
    id: str
    trace_types: list[str]
    rendered: bool
    has_drawing: bool
    width: float
    height: float
    text_count: int
    drawn_fraction: float | None = None  # light theme, data area
    text_contrast: dict[str, float | None] = field(default_factory=dict)  # theme -> ratio
    dark_has_drawing: bool | None = None

    def label(self, page: str) -> str:
        kinds = ",".join(sorted(set(self.trace_types))) or "no traces"
        return f"{page} figure #{self.index + 1} ({kinds}, id {self.id or '?'})"


@dataclass
class PageReport:
    name: str
    url: str
    status: int
    facts: dict
    dark_facts: dict | None = None
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    figures: list[FigureReport] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    fetched: dict[str, dict] = field(default_factory=dict)  # url -> FETCH_JS result
    downloads: list[dict] = field(default_factory=list)  # clicked download-role links
    transfers: list[dict] = field(default_factory=list)  # {url, bytes, decoded} per loaded resource
    figure_layout: list[dict] = field(default_factory=list)  # figure_layout_facts.js, as loaded
    seconds: float = 0.0

    @property
    def transferred_bytes(self) -> int:
        return sum(t["bytes"] for t in self.transfers)


def _element_shots(page, selector: str, indices: list[int]) -> dict[int, bytes]:
    handles = page.query_selector_all(selector)
    return {i: handles[i].screenshot(animations="disabled") for i in indices}


def _shots_with_css(page, css: str, indices: list[int]) -> dict[int, bytes]:
    style = page.add_style_tag(content=css)
    page.evaluate(SETTLE_JS)
    try:
        return _element_shots(page, ".plotly-graph-div", indices)
    finally:
        style.evaluate("node => node.remove()")
        page.evaluate(SETTLE_JS)


def _measure_text_contrast(page, figures: list[FigureReport], theme: str):
    with_text_indices = [f.index for f in figures if f.has_drawing and f.text_count and f.width and f.height]
    if not with_text_indices:
        return
    shown = _element_shots(page, ".plotly-graph-div", with_text_indices)
    hidden = _shots_with_css(page, HIDE_FIGURE_TEXT_CSS, with_text_indices)
    for i in with_text_indices:
        figures[i].text_contrast[theme] = text_contrast(shown[i], hidden[i])


def visit_page(
    browser,
    url: str,
    name: str,
    blocked_log: list[str],
    output_dir: Path = OUTPUT_DIR,
    *,
    wait_for_selector: str | None = None,
    check_dark: bool = True,
    fetch_urls=None,
    click_downloads: bool = True,
    render_timeout_ms: int = 15_000,
) -> PageReport:
    """Load `url` once and record everything the tests check about it (see module docstring)."""
    started = time.monotonic()
    output_dir.mkdir(parents=True, exist_ok=True)
    blocked_before = len(blocked_log)
    context = new_reader_context(browser, blocked_log)
    page = context.new_page()
    console_errors, page_errors, http_errors = [], [], []

    def on_console(message):
        if message.type == "error":
            where = message.location or {}
            console_errors.append(f"{message.text} [{where.get('url', '')}:{where.get('lineNumber', '')}]")

    page.on("console", on_console)
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.on("response", lambda response: response.status >= 400 and http_errors.append(f"{response.status} {response.url}"))
    try:
        response = page.goto(url, wait_until="load", timeout=PAGE_LOAD_TIMEOUT_MS)
        status = response.status if response else 0
        _wait_for_rendering(page, wait_for_selector, render_timeout_ms)
        facts = page.evaluate(FACTS_JS)
        report = PageReport(name=name, url=url, status=status, facts=facts, transfers=page.evaluate(TRANSFERRED_JS),
                            figure_layout=page.evaluate(FIGURE_LAYOUT_JS))
        shot = output_dir / f"{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        report.screenshots.append(shot)

        report.figures = [
            FigureReport(
                index=f["index"],
                id=f["id"],
                trace_types=f["traceTypes"],
                rendered=f["rendered"],
                has_drawing=f["hasSvg"] or f["canvasCount"] > 0,
                width=f["drawingWidth"],
                height=f["drawingHeight"],
                text_count=f["textCount"],
            )
            for f in facts["figures"]
        ]
        drawable = [f.index for f in report.figures if f.has_drawing and f.width > 0 and f.height > 0]
        if drawable:
            shown = _element_shots(page, ".plotly-graph-div", drawable)
            hidden = _shots_with_css(page, HIDE_FIGURE_DATA_CSS, drawable)
            for i in drawable:
                area = facts["figures"][i]["plotArea"]
                report.figures[i].drawn_fraction = drawn_fraction(shown[i], hidden[i], area)
        _measure_text_contrast(page, report.figures, "light")

        for target in (fetch_urls or urls_to_fetch)(facts):
            report.fetched[target] = page.evaluate(FETCH_JS, target)
        if click_downloads:
            report.downloads = _click_download_links(page)

        if check_dark:
            page.emulate_media(color_scheme="dark")
            page.evaluate(DARK_THEME_JS)
            page.evaluate(RESET_VIEW_JS)
            page.wait_for_timeout(300)  # let theme-change listeners restyle figures
            page.evaluate(SETTLE_JS)
            report.dark_facts = page.evaluate(FACTS_JS)
            dark_shot = output_dir / f"{name}-dark.png"
            page.screenshot(path=str(dark_shot), full_page=True)
            report.screenshots.append(dark_shot)
            for f, dark in zip(report.figures, report.dark_facts["figures"]):
                f.dark_has_drawing = (dark["hasSvg"] or dark["canvasCount"] > 0) and dark["drawingWidth"] > 0
            _measure_text_contrast(page, report.figures, "dark")
    finally:
        context.close()
    report.console_errors, report.page_errors, report.http_errors = console_errors, page_errors, http_errors
    report.blocked_requests = blocked_log[blocked_before:]
    report.seconds = time.monotonic() - started
    return report


def _wait_for_rendering(page, wait_for_selector: str | None, timeout_ms: int):
    """Wait for MathJax and plotly to finish; on time-out go on, and let the checks report it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for wait in (
        lambda: page.wait_for_load_state("networkidle", timeout=timeout_ms),
        lambda: page.evaluate(WAIT_FOR_MATHJAX_JS),
        lambda: page.wait_for_function(ALL_FIGURES_DRAWN_JS, timeout=timeout_ms),
        lambda: wait_for_selector and page.wait_for_selector(wait_for_selector, timeout=timeout_ms),
    ):
        try:
            wait()
        except PlaywrightTimeout:
            pass
    page.evaluate(SETTLE_JS)


def _click_download_links(page) -> list[dict]:
    """Click every {download} link as a reader would and inspect the file the browser saves."""
    results = []
    for link in page.query_selector_all("a.reference.download"):
        href = link.evaluate("a => a.href")
        entry = {"href": href, "filename": "", "failure": None, "notebook": None, "bytes": b""}
        try:
            with page.expect_download(timeout=10_000) as info:
                link.click()
            download = info.value
            entry["filename"] = download.suggested_filename
            entry["failure"] = download.failure()
            if not entry["failure"]:
                entry["bytes"] = Path(download.path()).read_bytes()
                try:
                    notebook = json.loads(entry["bytes"])
                    entry["notebook"] = {"nbformat": notebook.get("nbformat"), "cells": len(notebook.get("cells", []))}
                except (ValueError, AttributeError):
                    pass
        except Exception as error:  # noqa: BLE001 - any failure to download is the finding
            entry["failure"] = f"clicking did not download: {error}".splitlines()[0]
        results.append(entry)
    return results


# ---------------------------------------------------------------- checks: report -> list of defects


def load_problems(report: PageReport) -> list[str]:
    problems = []
    if report.status != 200:
        problems.append(f"{report.name}: HTTP status {report.status} for {report.url}")
    problems += [f"{report.name}: console error: {e}" for e in report.console_errors]
    problems += [f"{report.name}: uncaught JavaScript error: {e}" for e in report.page_errors]
    problems += [f"{report.name}: failed request: {e}" for e in report.http_errors]
    return problems


def offline_problems(report: PageReport) -> list[str]:
    return [f"{report.name}: request to the network (blocked): {url}" for url in report.blocked_requests]


def figure_problems(report: PageReport, expected_count: int | None = None) -> list[str]:
    """Every plotly output div rendered, has a non-empty drawing, and its traces put pixels on screen."""
    problems = []
    if expected_count is not None and len(report.figures) < expected_count:
        problems.append(
            f"{report.name}: the executed notebook has {expected_count} plotly figure output(s) "
            f"but the page shows {len(report.figures)} plotly div(s)"
        )
    if report.figures and not report.facts["plotlyLoaded"]:
        problems.append(f"{report.name}: window.Plotly is not defined (plotly.js did not load)")
    for f in report.figures:
        label = f.label(report.name)
        if not f.rendered or not f.has_drawing:
            problems.append(f"{label}: not rendered (no SVG or canvas inside the plotly div)")
        elif f.width <= 0 or f.height <= 0:
            problems.append(f"{label}: drawing has zero size ({f.width}x{f.height})")
        elif f.drawn_fraction is None or f.drawn_fraction < MIN_DRAWN_FRACTION:
            problems.append(f"{label}: blank: its traces change {100 * (f.drawn_fraction or 0):.3f}% of the data area")
    return problems


def dark_figure_problems(report: PageReport) -> list[str]:
    problems = []
    if report.dark_facts is None:
        return [f"{report.name}: dark theme not checked"]
    if report.dark_facts["theme"] != "dark":
        problems.append(f"{report.name}: data-theme is {report.dark_facts['theme']!r} after switching to dark")
    for f in report.figures:
        if f.rendered and f.has_drawing and not f.dark_has_drawing:
            problems.append(f"{f.label(report.name)}: disappears in dark theme")
    return problems


def text_contrast_problems(report: PageReport, theme: str) -> list[str]:
    problems = []
    for f in report.figures:
        ratio = f.text_contrast.get(theme)
        if ratio is not None and ratio < MIN_TEXT_CONTRAST:
            problems.append(
                f"{f.label(report.name)}: text contrast {ratio:.2f}:1 in {theme} theme "
                f"(needs >= {MIN_TEXT_CONTRAST}:1; 1.0 means text in the background colour)"
            )
    return problems


def math_problems(report: PageReport) -> list[str]:
    facts, name = report.facts, report.name
    problems = []
    if facts["mathCount"] and not facts["mathJaxVersion"]:
        problems.append(f"{name}: {facts['mathCount']} formula(s) but MathJax did not load")
    problems += [f"{name}: formula not typeset: '{text}'" for text in facts["untypesetMath"]]
    problems += [f"{name}: MathJax error: '{text}'" for text in facts["mathErrors"]]
    problems += [f"{name}: raw TeX in the text: '{text}'" for text in facts["rawMath"]]
    return problems


def title_problems(report: PageReport, course_title: str) -> list[str]:
    title = report.facts["title"]
    if course_title not in title:
        return [f"{report.name}: <title> is {title!r}, without the course title {course_title!r}"]
    if not title.replace(course_title, "").strip(" -—|·"):
        return [f"{report.name}: <title> {title!r} does not name the page"]
    return []


def fetch_problems(report: PageReport, url: str, what: str, *, notebook: bool = False, content_type: str = "") -> list[str]:
    result = report.fetched.get(url)
    if result is None:
        return [f"{report.name}: {what} {url} was not fetched"]
    if result["status"] != 200:
        return [f"{report.name}: {what} {url} answered HTTP {result['status']}"]
    if result["length"] == 0:
        return [f"{report.name}: {what} {url} is empty"]
    if content_type and content_type not in result["contentType"]:
        return [f"{report.name}: {what} {url} has content type {result['contentType']!r}, expected {content_type}"]
    if notebook and not (result["notebook"] and result["notebook"]["nbformat"] == 4 and result["notebook"]["cells"] > 0):
        return [f"{report.name}: {what} {url} is not a notebook with cells: {result['head'][:80]!r}"]
    return []


def favicon_problems(report: PageReport) -> list[str]:
    icons = report.facts["favicons"]
    if not icons:
        return [f"{report.name}: no <link rel=icon>"]
    return [p for url in icons for p in fetch_problems(report, url, "favicon", content_type="image/")]


def sidebar_number_problems(report: PageReport, chapter: str) -> list[str]:
    """The chapter's own sidebar entry reads 'N. Title', N being the chapter's file number."""
    sidebar = report.facts["sidebar"]
    number = int(chapter[:2])
    entries = [link["text"] for link in sidebar if page_url_name(link["href"]) == chapter]
    if not entries:
        return [f"{report.name}: no sidebar link to {chapter}; sidebar has {[e['text'] for e in sidebar]}"]
    if not any(re.match(rf"{number}\.\s", text) for text in entries):
        return [f"{report.name}: sidebar entry {entries} for {chapter} is not numbered '{number}. '"]
    return []


def previous_next_problems(report: PageReport, chapter: str, previous: str | None, following: str | None) -> list[str]:
    """The page's previous/next links go to the neighbouring chapters, and those pages load."""
    problems = []
    for direction, target in (("previous", previous), ("next", following)):
        link = report.facts[direction]
        if target is None:
            continue
        if link is None:
            problems.append(f"{chapter}: no '{direction}' link (expected {target})")
        elif page_url_name(link["href"]) != target:
            problems.append(f"{chapter}: '{direction}' link goes to {link['href']}, expected {target}")
        else:
            problems += fetch_problems(report, link["href"], f"'{direction}' page")
    return problems


def exercise_download_problems(report: PageReport, chapter: str, source: Path | None = None) -> list[str]:
    """Clicking the chapter's {download} link saves <chapter>.ipynb, a notebook (equal to `source` if given)."""
    wanted = f"{chapter}.ipynb"
    downloads = [d for d in report.downloads if d["href"].endswith("/" + wanted)]
    if not downloads:
        return [f"{chapter}: no download link to {wanted}; download links: {[d['href'] for d in report.downloads]}"]
    problems = []
    for download in downloads:
        notebook = download["notebook"]
        if download["failure"]:
            problems.append(f"{chapter}: clicking {download['href']} did not download: {download['failure']}")
        elif download["filename"] != wanted:
            problems.append(f"{chapter}: the browser saved {download['filename']!r}, expected {wanted}")
        elif not (notebook and notebook["nbformat"] == 4 and notebook["cells"] > 0):
            problems.append(f"{chapter}: {download['href']} is not a notebook with cells")
        elif source is not None and source.exists() and download["bytes"] != source.read_bytes():
            problems.append(f"{chapter}: the downloaded notebook differs from {source}")
    return problems


def header_button_problems(report: PageReport, chapter: str, expect_launch: bool = True) -> list[str]:
    """Download buttons for <chapter>.ipynb (a notebook) and <chapter>.md, both served; a launch link for the
    page if `expect_launch` (the book's repository URL is set), else none."""
    facts = report.facts
    problems = []
    for kind, buttons, notebook in (
        (".ipynb", facts["downloadNotebookButtons"], True),
        (".md", facts["downloadSourceButtons"], False),
    ):
        if not buttons:
            problems.append(f"{chapter}: no download {kind} button in the header")
        for button in buttons:
            if not button["href"].endswith(f"{chapter}{kind}"):
                problems.append(f"{chapter}: download {kind} button points to {button['href']}")
            problems += fetch_problems(report, button["href"], f"download {kind} button", notebook=notebook)
    if expect_launch and not [b for b in facts["launchButtons"] if chapter in b["href"]]:
        problems.append(f"{chapter}: no launch button (Binder/Colab/JupyterHub) for this page: {facts['launchButtons']}")
    if not expect_launch and facts["launchButtons"]:
        problems.append(f"{chapter}: launch buttons with no repository set: {facts['launchButtons']}")
    return problems


def urls_to_fetch(facts: dict) -> list[str]:
    """The favicon, the download buttons and the previous/next pages: each fetched by the browser."""
    urls = list(facts["favicons"])
    urls += [b["href"] for b in facts["downloadNotebookButtons"] + facts["downloadSourceButtons"]]
    urls += [link["href"] for link in (facts["previous"], facts["next"]) if link]
    return list(dict.fromkeys(u for u in urls if is_local(u)))


def page_url_name(url: str) -> str:
    """'http://127.0.0.1:5/03_exact_ablation.html#x' -> '03_exact_ablation'."""
    path = urlsplit(url).path
    return path.rsplit("/", 1)[-1].removesuffix(".html")


# ---------------------------------------------------------------- navigation and narrow screens

PHONE_VIEWPORT = {"width": 390, "height": 844}  # a common phone, in CSS pixels
LAYOUT_JS = (Path(__file__).with_name("layout_facts.js")).read_text()
# The theme's ☰ (site navigation) and page-contents buttons, and the links each should reveal.
PRIMARY_TOGGLE = "button.primary-toggle"
SECONDARY_TOGGLE = "button.secondary-toggle"
LINK_SELECTORS = {"primaryLinks": ".bd-sidebar-primary nav a[href]", "secondaryLinks": ".bd-sidebar-secondary nav a[href]"}
MAX_PAGE_OVERFLOW_PX = 0


@dataclass
class NavigationReport:
    name: str
    viewport: dict
    layout: dict  # layout_facts.js on the page as loaded
    toggles: dict[str, dict] = field(default_factory=dict)  # "primary"/"secondary" -> what clicking did
    screenshot: Path | None = None
    figure_layout: list[dict] = field(default_factory=list)  # figure_layout_facts.js, as loaded


def _click_toggle(page, selector: str, links_key: str) -> dict:
    """Click the first visible `selector` button; count the sidebar links on screen before and after."""
    result = {"visibleButtons": 0, "linksBefore": None, "linksAfter": None, "linksAfterSecondClick": None, "error": ""}
    buttons = [b for b in page.query_selector_all(selector) if b.is_visible()]
    result["visibleButtons"] = len(buttons)
    if not buttons:
        return result
    result["linksBefore"] = page.evaluate(LAYOUT_JS, LINK_SELECTORS)[links_key]
    try:
        buttons[0].click(timeout=5_000)
        page.wait_for_timeout(400)  # the theme's transitions
        result["linksAfter"] = page.evaluate(LAYOUT_JS, LINK_SELECTORS)[links_key]
        # Close a dialog (Escape), or click the button again where it toggles a panel in place.
        if page.evaluate("() => !!document.querySelector('dialog[open]')"):
            page.keyboard.press("Escape")
        else:
            buttons[0].click(timeout=5_000)
        page.wait_for_timeout(400)
        result["linksAfterSecondClick"] = page.evaluate(LAYOUT_JS, LINK_SELECTORS)[links_key]
    except Exception as error:  # noqa: BLE001 - a button that cannot be clicked is the finding
        result["error"] = str(error).splitlines()[0]
    return result


def navigation_visit(browser, url: str, name: str, blocked_log: list[str], viewport: dict,
                     output_dir: Path = OUTPUT_DIR, render_timeout_ms: int = 15_000) -> NavigationReport:
    """Load `url` at `viewport`, record its layout, then try the ☰ and page-contents buttons."""
    output_dir.mkdir(parents=True, exist_ok=True)
    context = new_reader_context(browser, blocked_log, viewport)
    page = context.new_page()
    try:
        page.goto(url, wait_until="load", timeout=PAGE_LOAD_TIMEOUT_MS)
        _wait_for_rendering(page, None, render_timeout_ms)
        report = NavigationReport(name=name, viewport=viewport, layout=page.evaluate(LAYOUT_JS, LINK_SELECTORS),
                                  figure_layout=page.evaluate(FIGURE_LAYOUT_JS))
        shot = output_dir / f"{name}-{viewport['width']}px.png"
        page.screenshot(path=str(shot))
        report.screenshot = shot
        report.toggles["primary"] = _click_toggle(page, PRIMARY_TOGGLE, "primaryLinksOnTop")
        report.toggles["secondary"] = _click_toggle(page, SECONDARY_TOGGLE, "secondaryLinksOnTop")
    finally:
        context.close()
    return report


def overflow_problems(report: NavigationReport) -> list[str]:
    """The page is no wider than the viewport (no sideways scrolling)."""
    layout = report.layout
    excess = layout["scrollWidth"] - layout["viewportWidth"]
    if excess <= MAX_PAGE_OVERFLOW_PX:
        return []
    return [f"{report.name}: at {report.viewport['width']} px the page is {layout['scrollWidth']} px wide "
            f"(scrolls sideways by {excess} px); widest: {'; '.join(layout['widestElements']) or '?'}"]


#: The smallest type a table may take on a phone (course.css shrinks tables there, so that more of them fit).
MIN_TABLE_FONT_PX = 12


def table_problems(report: NavigationReport) -> list[str]:
    """The smallest text in every table (inline code included) is at least MIN_TABLE_FONT_PX, whatever the screen."""
    return [f"{report.name} at {report.viewport['width']} px: the table starting \"{table['head']}\" is set in "
            f"{table['fontPx']:.1f} px type (at least {MIN_TABLE_FONT_PX} px)"
            for table in report.layout.get("tables", []) if table["fontPx"] < MIN_TABLE_FONT_PX]


def scrolling_tables(report: NavigationReport) -> list[dict]:
    """The tables wider than the box they sit in (they scroll inside it; the page does not)."""
    return [table for table in report.layout.get("tables", []) if table["width"] > table["box"] + 1]


def _clickable_toggle(report: NavigationReport, which: str, what: str) -> tuple[dict, str, list[str]]:
    """The toggle's facts, its label for messages, and the problems that stop any further check."""
    toggle = report.toggles.get(which, {})
    label = f"{report.name} at {report.viewport['width']} px: {what} button"
    if not toggle.get("visibleButtons"):
        return toggle, label, [f"{label}: not visible"]
    if toggle.get("error"):
        return toggle, label, [f"{label}: cannot be clicked: {toggle['error']}"]
    return toggle, label, []


def toggle_opens_problems(report: NavigationReport, which: str, what: str) -> list[str]:
    """On a narrow screen the button is visible, its links are hidden, and clicking shows them on top."""
    toggle, label, problems = _clickable_toggle(report, which, what)
    if problems:
        return problems
    if toggle["linksBefore"]:
        return [f"{label}: its {toggle['linksBefore']} links are already on screen before clicking"]
    if not toggle["linksAfter"]:
        return [f"{label}: clicking it shows none of its links"]
    if toggle["linksAfterSecondClick"]:
        return [f"{label}: its links stay on screen after closing (Escape)"]
    return []


def toggle_collapses_problems(report: NavigationReport, which: str, what: str) -> list[str]:
    """On a wide screen the panel starts open; clicking the button hides it and clicking again shows it."""
    toggle, label, problems = _clickable_toggle(report, which, what)
    if problems:
        return problems
    if not toggle["linksBefore"]:
        return [f"{label}: no link of its panel is on screen before clicking"]
    if toggle["linksAfter"]:
        return [f"{label}: clicking it leaves {toggle['linksAfter']} links on screen (nothing collapsed)"]
    if not toggle["linksAfterSecondClick"]:
        return [f"{label}: clicking it again does not bring the panel back"]
    return []


def top_bar_problems(report: NavigationReport) -> list[str]:
    layout, problems = report.layout, []
    if layout["visibleSearchFields"] > 1:
        problems.append(f"{report.name}: {layout['visibleSearchFields']} search fields visible (one expected)")
    if layout["topBarVisible"]:
        problems.append(f"{report.name}: the theme's separate top bar (#pst-header) is shown")
    return problems


# ---------------------------------------------------------------- page weight and heavy scripts

TEXT_PAGE_BUDGET = 1_500_000  # bytes over the wire (gzip), a page without figures
FIGURE_PAGE_BUDGET = 2_500_000  # a page with plotly figures
PLOTLY_SCRIPT = re.compile(r"/plotly[\w.-]*\.js(\?|$)")
MATHJAX_SCRIPT = re.compile(r"/mathjax/[\w.-]+\.js(\?|$)")


def weight_problems(report: PageReport, budget: int) -> list[str]:
    total = report.transferred_bytes
    if total <= budget:
        return []
    heaviest = sorted(report.transfers, key=lambda t: -t["bytes"])[:4]
    listing = ", ".join(f"{urlsplit(t['url']).path.rsplit('/', 1)[-1]} {t['bytes'] / 1e3:.0f} kB" for t in heaviest)
    return [f"{report.name}: {total / 1e6:.2f} MB transferred, over the {budget / 1e6:.1f} MB budget ({listing})"]


def heavy_script_problems(report: PageReport) -> list[str]:
    """plotly.js only with figures, MathJax only with maths; each deferred/async and cache-busted (?v=)."""
    facts, problems = report.facts, []
    requested = [t["url"] for t in report.transfers]
    for what, pattern, needed in (
        ("plotly.js", PLOTLY_SCRIPT, bool(facts["figures"])),
        ("MathJax", MATHJAX_SCRIPT, bool(facts["mathCount"])),
    ):
        loaded = [url for url in requested if pattern.search(url)]
        if loaded and not needed:
            problems.append(f"{report.name}: loads {what} but shows no {'figure' if what == 'plotly.js' else 'formula'}")
        for script in (s for s in facts["scripts"] if pattern.search(s["src"])):
            if not (script["defer"] or script["async"] or script["type"] == "module"):
                problems.append(f"{report.name}: {what} blocks the page ({script['src']} has neither defer nor async)")
            if "?" not in script["src"]:
                problems.append(f"{report.name}: {what} URL has no cache-busting query string: {script['src']}")
    return problems


# plotly modebar buttons and config flags that lead to plotly's cloud service or website.
CLOUD_BUTTONS = re.compile(r"sendDataToCloud|editInChartStudio|chart studio|plotly\.com|plot\.ly|share", re.I)


def cloud_link_problems(report: PageReport) -> list[str]:
    problems = [f"{report.name}: plotly modebar button leads to plotly's cloud: {button}"
                for button in report.facts["modebarButtons"] if CLOUD_BUTTONS.search(button)]
    for index, context in enumerate(report.facts["plotlyContexts"]):
        flags = [name for name, on in context.items() if on]
        if flags:
            problems.append(f"{report.name} figure #{index + 1}: plotly config has {', '.join(flags)} switched on")
    return problems


def placeholder_link_problems(report: PageReport) -> list[str]:
    return [f"{report.name}: link to a placeholder repository: {href}" for href in report.facts["placeholderLinks"]]


# ---------------------------------------------------------------- figures legible at every width

#: On a phone the plotting area keeps at least this share of a figure's width (a legend or colour
#: bar at the side took 40%).
MIN_PHONE_PLOT_FRACTION = 0.6
#: Printed values (heatmap cells) are never smaller than this (CSS pixels).
MIN_VALUE_FONT_PX = 9
PHONE_MAX_WIDTH = 600


def _overlap(a: dict, b: dict, tolerance: float = 0.5) -> bool:
    return (min(a["right"], b["right"]) - max(a["left"], b["left"]) > tolerance
            and min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) > tolerance)


def figure_layout_problems(figures: list[dict], page: str, viewport_width: int) -> list[str]:
    """Titles clear of the toolbar, legends inside the figure and off the plot, heatmap values that fit.

    `figures` is figure_layout_facts.js's list for one page at one viewport width.
    """
    problems = []
    for f in figures:
        where = f"{page} at {viewport_width} px, figure #{f['index'] + 1} ({f['id']})"
        box = f["figure"]
        if f["modebar"]:
            covered = [t["text"] for t in f["texts"] if _overlap(t, f["modebar"])]
            if covered:
                problems.append(f"{where}: text under the plotly toolbar: {covered[:3]}")
        cut = [t["text"] for t in f["titles"] + f["legendTexts"] if t["left"] < box["left"] - 1 or t["right"] > box["right"] + 1]
        if cut:
            problems.append(f"{where}: title or legend text cut off at the figure's edge: {cut[:3]}")
        legend = f["legend"]
        if legend:
            if legend["left"] < box["left"] - 1 or legend["right"] > box["right"] + 1 or legend["bottom"] > box["bottom"] + 1 or legend["top"] < box["top"] - 1:
                problems.append(f"{where}: the legend reaches outside the figure ({legend} vs {box})")
            if any(_overlap(legend, area, 2) for area in f["plotAreas"]):
                problems.append(f"{where}: the legend covers the plot")
        widest_plot = max((area["width"] for area in f["plotAreas"]), default=0)
        if viewport_width <= PHONE_MAX_WIDTH and f["plotAreas"] and widest_plot < MIN_PHONE_PLOT_FRACTION * box["width"]:
            problems.append(f"{where}: the plot is only {widest_plot / box['width']:.0%} of the figure's width "
                            f"(at least {MIN_PHONE_PLOT_FRACTION:.0%} on a phone)")
        values = f["heatmapValues"]
        smeared = sum(_overlap(a, b) for i, a in enumerate(values) for b in values[i + 1:])
        if smeared:
            problems.append(f"{where}: {smeared} pair(s) of heatmap values overlap (text smeared)")
        tiny = [v["text"] for v in values if v["fontSize"] < MIN_VALUE_FONT_PX]
        if tiny:
            problems.append(f"{where}: {len(tiny)} heatmap value(s) in a font under {MIN_VALUE_FONT_PX} px")
    return problems
