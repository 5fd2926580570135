"""The browser checks themselves, on small synthetic pages: each must pass a good page and fail its defect.

The pages are written to a temporary folder and served on localhost like the book; plotly.js comes
from the plotly Python package, so these tests need no book build.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import plotly
import pytest

import browser_harness as harness

pytestmark = pytest.mark.browser

COURSE = "Synthetic Course"

HEAD = """<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>{extra_head}
{plotly_tag}
<style>html[data-theme=dark] body {{ background: #121212; color: #eeeeee; }} body {{ background: #ffffff; margin: 0; }}</style>
</head><body><article class="bd-article">{body}</article></body></html>"""


def _figure(div_id: str, data: list, layout: dict | None = None, config: dict | None = None, script_type: str = "") -> str:
    layout = {"width": 500, "height": 320, "margin": {"t": 30}, **(layout or {})}
    script_tag = f'<script type="{script_type}">' if script_type else "<script>"
    return (
        f'<div id="{div_id}" class="plotly-graph-div" style="height:320px; width:500px;"></div>'
        f"{script_tag}Plotly.newPlot('{div_id}', {json.dumps(data)}, {json.dumps(layout)}, {json.dumps(config or {})});</script>"
    )


def _navigation(sidebar_text: str, previous: str, notebook_button: str, launch: bool) -> str:
    """The theme's sidebar, header buttons and previous/next links, as on chapter 3 of the book."""
    launch_link = (
        '<div class="dropdown dropdown-launch-buttons"><a href="https://mybinder.org/v2/gh/someone/course/main?'
        'urlpath=lab/tree/book/03_exact_ablation.md">Binder</a></div>' if launch else ""
    )
    return (
        f'<div class="bd-sidebar-primary"><nav><a class="reference internal" href="03_exact_ablation.html">'
        f"{sidebar_text}</a></nav></div>"
        f'<a class="btn-download-notebook-button" href="{notebook_button}">.ipynb</a>'
        '<a class="btn-download-source-button" href="03_exact_ablation.md">.md</a>'
        f"{launch_link}"
        f'<div class="prev-next-area"><a class="left-prev" href="{previous}">previous</a>'
        '<a class="right-next" href="04_activation_patching.html">next</a></div>'
    )


# Narrow-screen navigation as the book theme does it: ☰ and contents buttons open <dialog>s of links.
PHONE_NAVIGATION = """
<div class="bd-header-article"><button class="primary-toggle" onclick="document.getElementById('nav').showModal()">☰</button>
<button class="secondary-toggle" onclick="document.getElementById('toc').showModal()">≡</button></div>
<dialog id="nav" class="bd-sidebar-primary"><nav><a href="01_introduction.html">1. Introduction</a></nav></dialog>
<dialog id="toc" class="bd-sidebar-secondary"><nav><a href="#s">Section</a></nav></dialog>"""
# The defects of issue 12: buttons that only show a tooltip, a second search box in a top bar, a long word.
PHONE_NAVIGATION_BROKEN = """
<header id="pst-header" class="bd-header" style="height:40px"><button class="search-button-field">Search Ctrl+K</button></header>
<div class="bd-header-article"><button class="primary-toggle" title="Toggle primary sidebar">☰</button>
<button class="secondary-toggle" title="Toggle secondary sidebar">≡</button>
<button class="search-button-field">Search Ctrl+K</button></div>
<div class="bd-sidebar-primary" style="display:none"><nav><a href="01_introduction.html">1. Introduction</a></nav></div>
<p><code style="white-space:nowrap">blocks.0.attn.hook_z_a_very_long_hook_name_that_does_not_wrap_on_a_phone_screen</code></p>
<div style="overflow-x:auto"><table><tr><th style="min-width:600px">tiny and wide <code style="font-size:9px">hook_z</code></th></tr></table></div>"""
# Desktop: the ☰ button collapses the sidebar in place and brings it back.
DESKTOP_NAVIGATION = """
<div class="bd-header-article"><button class="primary-toggle"
  onclick="const s = document.getElementById('side'); s.hidden = !s.hidden">☰</button></div>
<div id="side" class="bd-sidebar-primary"><nav><a href="01_introduction.html">1. Introduction</a></nav></div>"""

HEATMAP = {"type": "heatmap", "z": [[1, 2, 3], [3, 1, 2], [2, 3, 1]]}
SCATTER = {"type": "scatter", "mode": "markers", "x": list(range(20)), "y": [i % 7 for i in range(20)], "marker": {"size": 8}}

def _course_figures() -> str:
    """Figures as the book shows them (plots' layout for narrow screens), one of each crowded kind."""
    import numpy as np

    from attribution_course import plots

    plots.use_course_renderer()  # the course's template, as every chapter sets it
    values = np.linspace(-2, 2, 4 * 15).reshape(4, 15)
    series = {name: np.linspace(0, 1, 6) * (k + 1) for k, name in enumerate(["a long series name, first", "a long series name, second", "third"])}
    figures = [
        plots.heatmap(values, x_labels=[f"p{i}" for i in range(15)], y_labels=[f"L{i}" for i in range(4)],
                      title="A heatmap with fifteen columns and a title long enough to wrap", x_title="position", y_title="layer"),
        plots.exact_vs_estimate(np.linspace(-1, 1, 12), {"right sign": np.linspace(-1, 1, 12), "wrong sign": -np.linspace(-1, 1, 12)},
                                labels=[f"c{i}" for i in range(12)], title="Exact against estimate, two series, a long title"),
        plots.lines({name: list(range(6)) for name in series}, series, title="Lines", x_title="x", y_title="y"),
    ]
    return "".join(f'<div style="margin: 1em 0">{plots.figure_html(plots.fit_narrow_screens(f.to_dict()))}</div>' for f in figures)


# plotly's defaults on a phone: a long centred title under the toolbar, a legend at the side, values that overlap
CROWDED_FIGURES = "".join(
    f'<div id="{div_id}" class="plotly-graph-div" style="height:360px; width:100%;"></div>'
    f"<script>Plotly.newPlot('{div_id}', {json.dumps(data)}, {json.dumps(layout)}, {{responsive: true}});</script>"
    for div_id, data, layout in [
        ("crowded-heatmap", [{"type": "heatmap", "z": [[i * 1.234 - 9 for i in range(15)]] * 4, "texttemplate": "%{z:.2f}"}],
         {"title": {"text": "Restored by patching the residual stream at each position"}}),
        ("fixed-font-heatmap", [{"type": "heatmap", "z": [[i * 1.234 - 9 for i in range(15)]] * 4, "texttemplate": "%{z:.2f}",
                                 "textfont": {"size": 10}}], {"title": {"text": "Values in a fixed font"}}),
        ("side-legend", [{**SCATTER, "name": "a long series name, first"}, {**SCATTER, "name": "a long series name, second"}],
         {"title": {"text": "Exact against estimate, with a legend at the side"}}),
        ("title-at-top-right", [SCATTER], {"title": {"text": "Effect by layer", "x": 0.98, "xanchor": "right", "y": 0.99, "yanchor": "top"}}),
    ]
)

PAGES = {
    "figures_course": dict(title=f"Figures — {COURSE}", extra_head="", body=_course_figures(),
                           plotly_tag='<script src="plotly.min.js"></script><script src="course-figures.js"></script>'),
    "figures_crowded": dict(title=f"Crowded — {COURSE}", extra_head="", body=CROWDED_FIGURES),
    "good": dict(
        title=f"Good page — {COURSE}",
        extra_head='<link rel="icon" href="icon.png">',
        body="<h1>Good</h1>" + _figure("heat", [HEATMAP]) + _figure("dots", [SCATTER])
        + '<p><a class="reference download internal" download href="03_exact_ablation.ipynb">exercises notebook</a></p>'
        + _navigation(sidebar_text="3. Exact ablation", previous="02_task_and_metric.html",
                      notebook_button="03_exact_ablation.ipynb", launch=True),
    ),
    "navigation_bad": dict(
        title=f"Navigation — {COURSE}",
        extra_head="",
        body='<p><a class="reference download internal" download href="not_a_notebook/03_exact_ablation.ipynb">x</a></p>'
        + _navigation(sidebar_text="Exact ablation", previous="01_introduction.html",
                      notebook_button="missing.ipynb", launch=False),
    ),
    "blank": dict(
        title=f"Blank — {COURSE}",
        extra_head="",
        body=(
            # a plot div that plotly never draws into
            '<div id="never-drawn" class="plotly-graph-div" style="height:320px; width:500px;"></div>'
            # a heatmap with no data: axes, no cells
            + _figure("no-data", [{"type": "heatmap", "z": []}])
            # markers drawn in the background colour: present in the DOM, invisible on screen
            + _figure("white-on-white", [{**SCATTER, "marker": {"size": 8, "color": "#ffffff"}}],
                      {"xaxis": {"showgrid": False}, "yaxis": {"showgrid": False}})
        ),
    ),
    "raw_math": dict(
        title="untitled",
        extra_head="",
        body=r'<p>The estimate $a \cdot g$ is first order and \(x\) is raw.</p>'
        r'<p><span class="math notranslate nohighlight">\(M(a) - M(a\prime)\)</span></p>'
        r'<p><a class="reference download internal" download href="missing.ipynb">missing notebook</a></p>',
    ),
    "network": dict(
        title=f"CDN — {COURSE}",
        extra_head='<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">'
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>',
        body="<p>loads from a CDN</p>",
    ),
    "errors": dict(
        title=f"Errors — {COURSE}",
        extra_head="",
        body='<script>console.error("synthetic console error");</script>'
        "<script>window.undefinedFunctionCall();</script><img src=\"missing.png\">",
    ),
    "phone_ok": dict(title=f"Phone — {COURSE}", extra_head="",
                     body=PHONE_NAVIGATION + "<p>Short text.</p><div><table><tr><th>head</th><td>+0.1</td></tr></table></div>"),
    "phone_broken": dict(title=f"Phone broken — {COURSE}", extra_head="", body=PHONE_NAVIGATION_BROKEN),
    "desktop_ok": dict(title=f"Desktop — {COURSE}", extra_head="", body=DESKTOP_NAVIGATION),
    "cloud": dict(
        title=f"Cloud — {COURSE}",
        extra_head="",
        body=_figure("shared", [SCATTER], config={"showSendToCloud": True, "displaylogo": True})
        + '<p><a href="https://github.com/OWNER/attribution-course">repository</a></p>',
    ),
    "light": dict(
        title=f"Light — {COURSE}",
        # as the book does it: plotly deferred and cache-busted, the figure's script a module (runs after it)
        extra_head="",
        plotly_tag='<script defer src="plotly.min.js?v=1"></script><script defer src="course-figures.js?v=1"></script>',
        body=_figure("deferred", [SCATTER], script_type="module"),
    ),
    "dark_unreadable": dict(
        title=f"Dark — {COURSE}",
        extra_head="",
        # transparent figure with near-black text: fine on white, invisible on the dark page background
        body=_figure("dark-text", [SCATTER], {"paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)",
                                             "font": {"color": "#121212"}, "title": {"text": "Effect by layer"}}),
    ),
    "dark_readable": dict(
        title=f"Dark ok — {COURSE}",
        extra_head="",
        # an opaque white figure keeps its dark text readable on a dark page
        body=_figure("white-card", [SCATTER], {"paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
                                              "font": {"color": "#121212"}, "title": {"text": "Effect by layer"}}),
    ),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, serve, browser, blocked_requests):
    from PIL import Image

    root = tmp_path_factory.mktemp("synthetic-site")
    (root / "plotly.min.js").write_bytes((Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes())
    (root / "course-figures.js").write_bytes((harness.BOOK_DIR / "_static" / "course-figures.js").read_bytes())
    icon = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(icon, format="PNG")
    (root / "icon.png").write_bytes(icon.getvalue())
    notebook = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                "cells": [{"cell_type": "markdown", "metadata": {}, "source": "x"}]}
    (root / "03_exact_ablation.ipynb").write_text(json.dumps(notebook))
    (root / "03_exact_ablation.md").write_text("# Exact ablation\n")
    (root / "not_a_notebook").mkdir()
    (root / "not_a_notebook" / "03_exact_ablation.ipynb").write_text("<html>not found</html>")
    for neighbour in ("01_introduction", "02_task_and_metric", "04_activation_patching"):
        (root / f"{neighbour}.html").write_text(f"<title>{neighbour}</title>")
    for name, parts in PAGES.items():
        (root / f"{name}.html").write_text(HEAD.format(**{"plotly_tag": '<script src="plotly.min.js"></script>', **parts}))
    server = serve(root)
    output = harness.OUTPUT_DIR / "self-test"
    reports = {}

    def navigation(name: str, viewport: dict) -> harness.NavigationReport:
        key = f"{name}@{viewport['width']}"
        if key not in reports:
            reports[key] = harness.navigation_visit(browser, server.url(f"{name}.html"), name, blocked_requests, viewport,
                                                    output, render_timeout_ms=3_000)
        return reports[key]

    def report(name: str) -> harness.PageReport:
        if name not in reports:
            reports[name] = harness.visit_page(
                browser, server.url(f"{name}.html"), name, blocked_requests, output, render_timeout_ms=3_000,
                check_dark=name in ("good", "dark_unreadable", "dark_readable"),
            )
        return reports[name]

    report.navigation = navigation
    return report


def test_good_page_passes_every_check(synthetic):
    report = synthetic("good")
    problems = (
        harness.load_problems(report) + harness.offline_problems(report) + harness.figure_problems(report, 2)
        + harness.math_problems(report) + harness.title_problems(report, COURSE) + harness.favicon_problems(report)
        + harness.text_contrast_problems(report, "light") + harness.text_contrast_problems(report, "dark")
        + harness.dark_figure_problems(report)
    )
    assert problems == []
    heatmap, scatter = report.figures
    assert heatmap.drawn_fraction >= harness.MIN_HEATMAP_FRACTION
    assert harness.MIN_DRAWN_FRACTION <= scatter.drawn_fraction < harness.MIN_HEATMAP_FRACTION
    [download] = report.downloads
    assert download["failure"] is None and download["notebook"] == {"nbformat": 4, "cells": 1}
    chapter = "03_exact_ablation"
    assert harness.sidebar_number_problems(report, chapter) == []
    assert harness.previous_next_problems(report, chapter, "02_task_and_metric", "04_activation_patching") == []
    assert harness.exercise_download_problems(report, chapter) == []
    assert harness.header_button_problems(report, chapter) == []


def test_navigation_checks_fail(synthetic):
    report, chapter = synthetic("navigation_bad"), "03_exact_ablation"
    assert "not numbered" in " ".join(harness.sidebar_number_problems(report, chapter))
    problems = harness.previous_next_problems(report, chapter, "02_task_and_metric", "04_activation_patching")
    assert len(problems) == 1 and "'previous' link goes to" in problems[0], problems
    assert "not a notebook" in " ".join(harness.exercise_download_problems(report, chapter))
    problems = " ".join(harness.header_button_problems(report, chapter))
    assert "download .ipynb button points to" in problems and "HTTP 404" in problems, problems
    assert "no launch button" in problems, problems
    assert harness.sidebar_number_problems(synthetic("errors"), chapter)  # no sidebar at all


def test_blank_figures_fail(synthetic):
    problems = harness.figure_problems(synthetic("blank"))
    for figure_id, defect in (("never-drawn", "not rendered"), ("no-data", "blank"), ("white-on-white", "blank")):
        assert any(figure_id in p and defect in p for p in problems), (figure_id, problems)


def test_missing_figures_fail(synthetic):
    assert harness.figure_problems(synthetic("good"), expected_count=3)


def test_raw_math_fails(synthetic):
    problems = harness.math_problems(synthetic("raw_math"))
    assert any("not typeset" in p for p in problems), problems
    assert any("raw TeX" in p and "$a \\cdot g$" in p for p in problems), problems
    assert any("raw TeX" in p and "\\(x\\)" in p for p in problems), problems


def test_title_and_favicon_checks_fail(synthetic):
    report = synthetic("raw_math")
    assert harness.title_problems(report, COURSE)
    assert harness.favicon_problems(report)


def test_failed_download_is_reported(synthetic):
    [download] = synthetic("raw_math").downloads
    assert download["failure"], download


def test_requests_off_localhost_are_blocked_and_reported(synthetic):
    problems = harness.offline_problems(synthetic("network"))
    assert any("fonts.googleapis.com" in p for p in problems), problems
    assert any("cdn.jsdelivr.net" in p for p in problems), problems


def test_console_and_javascript_errors_fail(synthetic):
    problems = harness.load_problems(synthetic("errors"))
    assert any("synthetic console error" in p for p in problems), problems
    assert any("undefinedFunctionCall" in p for p in problems), problems
    assert any("404" in p and "missing.png" in p for p in problems), problems


def test_figure_text_invisible_in_dark_theme_fails(synthetic):
    report = synthetic("dark_unreadable")
    assert harness.text_contrast_problems(report, "light") == []
    assert harness.text_contrast_problems(report, "dark"), report.figures
    readable = synthetic("dark_readable")
    assert harness.text_contrast_problems(readable, "dark") == [], readable.figures


def test_phone_navigation_checks(synthetic):
    working = synthetic.navigation("phone_ok", harness.PHONE_VIEWPORT)
    assert harness.toggle_opens_problems(working, "primary", "☰") == []
    assert harness.toggle_opens_problems(working, "secondary", "contents") == []
    assert harness.overflow_problems(working) == [] and harness.top_bar_problems(working) == []
    broken = synthetic.navigation("phone_broken", harness.PHONE_VIEWPORT)
    assert "shows none of its links" in " ".join(harness.toggle_opens_problems(broken, "primary", "☰"))
    assert "shows none of its links" in " ".join(harness.toggle_opens_problems(broken, "secondary", "contents"))
    problems = " ".join(harness.top_bar_problems(broken))
    assert "2 search fields" in problems and "top bar" in problems, problems
    problems = harness.overflow_problems(broken)
    assert problems and "scrolls sideways" in problems[0] and "hook_z" in problems[0], problems
    assert harness.table_problems(working) == [] and harness.scrolling_tables(working) == [], working.layout["tables"]
    # the table's own type is the page's; its inline code is 9 px
    assert "\"tiny and wide hook_z\" is set in 9.0 px type" in " ".join(harness.table_problems(broken)), broken.layout["tables"]
    assert [table["head"] for table in harness.scrolling_tables(broken)] == ["tiny and wide hook_z"]


def test_figure_layout_checks(synthetic):
    """The course's figures pass at 390 and 1366 px; plotly's defaults on a phone fail each check."""
    for viewport in (harness.PHONE_VIEWPORT, harness.VIEWPORT):
        report = synthetic.navigation("figures_course", viewport)
        assert len(report.figure_layout) == 3
        assert harness.figure_layout_problems(report.figure_layout, "course", viewport["width"]) == []
    crowded = synthetic.navigation("figures_crowded", harness.PHONE_VIEWPORT)
    problems = " ".join(harness.figure_layout_problems(crowded.figure_layout, "crowded", harness.PHONE_VIEWPORT["width"]))
    for defect in ("under the plotly toolbar", "cut off at the figure's edge", "heatmap values overlap",
                   "in a font under 9 px", "of the figure's width"):
        assert defect in problems, (defect, problems)


def test_desktop_collapse_check(synthetic):
    assert harness.toggle_collapses_problems(synthetic.navigation("desktop_ok", harness.VIEWPORT), "primary", "☰") == []
    # a button that opens a dialog is not a collapse of the visible sidebar
    problems = harness.toggle_collapses_problems(synthetic.navigation("phone_ok", harness.VIEWPORT), "primary", "☰")
    assert "no link of its panel is on screen before clicking" in " ".join(problems), problems


def test_weight_budget_check(synthetic):
    """The gzip test server sends plotly.js at about 1.5 MB: over the text-page budget, within the figure budget."""
    report = synthetic("good")
    assert 1_000_000 < report.transferred_bytes < harness.FIGURE_PAGE_BUDGET, report.transferred_bytes
    assert harness.weight_problems(report, harness.FIGURE_PAGE_BUDGET) == []
    assert "over the 1.0 MB budget" in " ".join(harness.weight_problems(report, 1_000_000))


def test_heavy_script_check(synthetic):
    assert harness.heavy_script_problems(synthetic("light")) == []
    assert harness.figure_problems(synthetic("light"), 1) == []  # a deferred plotly still draws the module-script figure
    problems = " ".join(harness.heavy_script_problems(synthetic("good")))
    assert "blocks the page" in problems and "no cache-busting" in problems, problems
    assert "loads plotly.js but shows no figure" in " ".join(harness.heavy_script_problems(synthetic("raw_math")))


def test_cloud_and_placeholder_link_checks(synthetic):
    # plotly.js 4 shows "Share chart..." (upload to Plotly Cloud) by default; the book's course-figures.js removes it
    assert harness.cloud_link_problems(synthetic("light")) == []
    default = " ".join(harness.cloud_link_problems(synthetic("good")))
    assert "Share chart" in default and "showSendToCloud" in default, default
    problems = " ".join(harness.cloud_link_problems(synthetic("cloud")))
    assert "Share chart" in problems and "showSendToCloud, displaylogo" in problems, problems
    assert harness.placeholder_link_problems(synthetic("good")) == []
    assert "github.com/OWNER" in " ".join(harness.placeholder_link_problems(synthetic("cloud")))
