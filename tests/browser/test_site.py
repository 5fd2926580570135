"""The built book (book/_build/html) as a reader sees it in headless Chromium, offline.

Each page is loaded once (see conftest.SiteVisits); the tests below read its report. Screenshots
(light and dark theme) are saved in test-output/browser/.
"""

from __future__ import annotations

import json

import pytest
import yaml

import browser_harness as harness
from browser_harness import CHAPTERS, EXERCISE_CHAPTERS, OTHER_PAGES, SITE_DIR, BOOK_DIR

pytestmark = pytest.mark.browser


def _appendix_pages() -> list[str]:
    """Rendered solution notebooks, if the book has been built (generated at build time)."""
    return sorted(f"appendix/{p.stem}" for p in (SITE_DIR / "appendix").glob("*.html"))


PAGES = CHAPTERS + OTHER_PAGES + _appendix_pages()


def _expected_plotly_outputs(page_name: str) -> int | None:
    """How many plotly figures the executed notebook of this page holds (None when it has no notebook)."""
    notebook_path = BOOK_DIR / "_build" / "jupyter_execute" / f"{page_name}.ipynb"
    if not notebook_path.exists():
        return None
    notebook = json.loads(notebook_path.read_text())
    count = 0
    for cell in notebook.get("cells", []):
        if {"remove-output", "remove-cell"} & set(cell.get("metadata", {}).get("tags", [])):
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            html = data.get("text/html", "")
            html = "".join(html) if isinstance(html, list) else html
            if "application/vnd.plotly.v1+json" in data or "plotly-graph-div" in html:
                count += 1
    return count


@pytest.fixture(scope="session")
def course_title() -> str:
    config = yaml.safe_load((BOOK_DIR / "_config.yml").read_text())
    title = (config or {}).get("title")
    assert title, "book/_config.yml has no title"
    return title


@pytest.fixture(scope="session")
def repository_url() -> str:
    """The repository URL the book was built with ('' when unset: no launch or repository links)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("repository_links", BOOK_DIR / "_ext" / "repository_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.book_repository_url(BOOK_DIR / "_config.yml")


def _assert_none(problems: list[str]):
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- every page


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_without_console_errors(site, page):
    _assert_none(harness.load_problems(site.report(page)))


@pytest.mark.parametrize("page", PAGES)
def test_page_makes_no_request_off_localhost(site, page):
    _assert_none(harness.offline_problems(site.report(page)))


@pytest.mark.parametrize("page", PAGES)
def test_every_plotly_figure_renders_with_visible_data(site, page):
    report = site.report(page)
    problems = harness.figure_problems(report, expected_count=_expected_plotly_outputs(page))
    notebook = BOOK_DIR / "_build" / "jupyter_execute" / f"{page}.ipynb"
    if problems and notebook.exists() and notebook.stat().st_mtime > (SITE_DIR / f"{page}.html").stat().st_mtime:
        problems.append(f"{page}: note: {notebook} is newer than the page (a build running or failed?)")
    _assert_none(problems)


@pytest.mark.parametrize("page", PAGES)
def test_math_is_typeset(site, page):
    _assert_none(harness.math_problems(site.report(page)))


@pytest.mark.parametrize("page", PAGES)
def test_figures_readable_in_light_and_dark_theme(site, page):
    report = site.report(page)
    _assert_none(
        harness.dark_figure_problems(report)
        + harness.text_contrast_problems(report, "light")
        + harness.text_contrast_problems(report, "dark")
    )


@pytest.mark.parametrize("page", PAGES)
def test_title_favicon_and_logo(site, page, course_title):
    report = site.report(page)
    logos_loaded = [logo for logo in report.facts["logos"] if logo["naturalWidth"] > 0]
    _assert_none(
        harness.title_problems(report, course_title)
        + harness.favicon_problems(report)
        + ([] if logos_loaded else [f"{page}: no logo image loaded in the navbar: {report.facts['logos']}"])
    )


@pytest.mark.parametrize("page", PAGES)
def test_screenshots_saved(site, page):
    report = site.report(page)
    for shot in report.screenshots:
        assert shot.exists() and shot.stat().st_size > 10_000, f"screenshot {shot} missing or tiny"


# ---------------------------------------------------------------- chapters


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_is_numbered_in_sidebar(site, chapter):
    _assert_none(harness.sidebar_number_problems(site.report(chapter), chapter))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_previous_and_next_links(site, chapter):
    position = CHAPTERS.index(chapter)
    previous = CHAPTERS[position - 1] if position > 0 else None
    following = CHAPTERS[position + 1] if position + 1 < len(CHAPTERS) else None
    _assert_none(harness.previous_next_problems(site.report(chapter), chapter, previous, following))


@pytest.mark.parametrize("chapter", EXERCISE_CHAPTERS)
def test_exercises_notebook_downloads(site, chapter):
    """The {download} link at the end of the chapter saves the learner's notebook when clicked."""
    source = BOOK_DIR / "downloads" / f"{chapter}.ipynb"
    _assert_none(harness.exercise_download_problems(site.report(chapter), chapter, source))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_download_and_launch_buttons(site, chapter, repository_url):
    """The header offers the page as .ipynb and .md (both fetchable); launch links only with a repository URL."""
    _assert_none(harness.header_button_problems(site.report(chapter), chapter, expect_launch=bool(repository_url)))


# ---------------------------------------------------------------- phones, navigation, weight


@pytest.mark.parametrize("page", PAGES + ["search"])
def test_no_horizontal_scrolling_on_a_phone(site, page):
    _assert_none(harness.overflow_problems(site.navigation(page, harness.PHONE_VIEWPORT)))


@pytest.mark.parametrize("page", PAGES)
def test_tables_legible_on_a_phone(site, page):
    """At 390 px tables take smaller type, so that more of them fit, but never below 12 px."""
    _assert_none(harness.table_problems(site.navigation(page, harness.PHONE_VIEWPORT)))


@pytest.mark.parametrize("page", [p for p in PAGES if p not in OTHER_PAGES])
def test_figures_legible_on_a_phone(site, page):
    """At 390 px: titles clear of the toolbar, legends in the figure and off the plot, the plot at
    least 60% of the figure's width, no heatmap values running into each other."""
    report = site.navigation(page, harness.PHONE_VIEWPORT)
    _assert_none(harness.figure_layout_problems(report.figure_layout, page, harness.PHONE_VIEWPORT["width"]))


@pytest.mark.parametrize("page", [p for p in PAGES if p not in OTHER_PAGES])
def test_figures_legible_on_a_desktop(site, page):
    """The same at 1366 px (chapter 9's legend was cut off at the figure's right edge)."""
    _assert_none(harness.figure_layout_problems(site.report(page).figure_layout, page, harness.VIEWPORT["width"]))


@pytest.mark.parametrize("page", CHAPTERS + ["bibliography"])
def test_phone_navigation_and_page_contents_open(site, page):
    """At 390 px the ☰ button shows the book's navigation and the contents button the page's sections."""
    report = site.navigation(page, harness.PHONE_VIEWPORT)
    _assert_none(
        harness.toggle_opens_problems(report, "primary", "☰ navigation")
        + (harness.toggle_opens_problems(report, "secondary", "page contents") if page in CHAPTERS else [])
        + harness.top_bar_problems(report)
    )


@pytest.mark.parametrize("page", ["01_introduction", "05_first_order_approximation", "bibliography"])
def test_desktop_menu_collapses_and_one_search_field(site, page):
    report = site.navigation(page, harness.VIEWPORT)
    _assert_none(harness.toggle_collapses_problems(report, "primary", "☰ navigation") + harness.top_bar_problems(report))


@pytest.mark.parametrize("page", PAGES + ["search"])
def test_page_weight_within_budget(site, page):
    """Bytes over the wire (the test server gzips like GitHub Pages): 1.5 MB for text, 2.5 MB with figures."""
    report = site.report(page) if page != "search" else site.report(
        "search", query="?q=attribution", wait_for_selector="ul.search li", check_dark=False, click_downloads=False)
    budget = harness.FIGURE_PAGE_BUDGET if report.figures else harness.TEXT_PAGE_BUDGET
    _assert_none(harness.weight_problems(report, budget))


@pytest.mark.parametrize("page", PAGES)
def test_plotly_and_mathjax_only_where_used_deferred_and_cache_busted(site, page):
    _assert_none(harness.heavy_script_problems(site.report(page)))


@pytest.mark.parametrize("page", [p for p in PAGES if p not in OTHER_PAGES])
def test_figures_offer_no_link_to_plotly_cloud(site, page):
    _assert_none(harness.cloud_link_problems(site.report(page)))


@pytest.mark.parametrize("page", PAGES)
def test_no_placeholder_repository_links(site, page):
    _assert_none(harness.placeholder_link_problems(site.report(page)))


# ---------------------------------------------------------------- the whole book


def test_search_finds_attribution(site):
    report = site.report(
        "search", query="?q=attribution", wait_for_selector="ul.search li", check_dark=False, click_downloads=False
    )
    found_pages = {harness.page_url_name(link["href"]) for link in report.facts["searchResults"]} - {""}
    problems = harness.load_problems(report) + harness.offline_problems(report)
    if not found_pages & set(CHAPTERS):
        problems.append(
            f"search for 'attribution' lists no chapter: results {sorted(found_pages)}, "
            f"summary {report.facts['searchSummary']!r}"
        )
    _assert_none(problems)


def test_a_heatmap_and_a_scatter_plot_are_visibly_drawn(site):
    figures = [f for chapter in CHAPTERS for f in site.report(chapter).figures]
    heatmaps = [f for f in figures if "heatmap" in f.trace_types]
    scatters = [f for f in figures if "scatter" in f.trace_types or "scattergl" in f.trace_types]
    assert any((f.drawn_fraction or 0) >= harness.MIN_HEATMAP_FRACTION for f in heatmaps), (
        f"no heatmap fills >= {harness.MIN_HEATMAP_FRACTION:.0%} of its axes: {[f.drawn_fraction for f in heatmaps]}"
    )
    assert any((f.drawn_fraction or 0) >= harness.MIN_DRAWN_FRACTION for f in scatters), (
        f"no scatter plot has visible points or lines: {[f.drawn_fraction for f in scatters]}"
    )
