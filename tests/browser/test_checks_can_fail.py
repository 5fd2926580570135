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

HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>{extra_head}
<script src="plotly.min.js"></script>
<style>html[data-theme=dark] body {{ background: #121212; color: #eeeeee; }} body {{ background: #ffffff; margin: 0; }}</style>
</head><body><article class="bd-article">{body}</article></body></html>"""


def _figure(div_id: str, data: list, layout: dict | None = None) -> str:
    layout = {"width": 500, "height": 320, "margin": {"t": 30}, **(layout or {})}
    return (
        f'<div id="{div_id}" class="plotly-graph-div" style="height:320px; width:500px;"></div>'
        f"<script>Plotly.newPlot('{div_id}', {json.dumps(data)}, {json.dumps(layout)});</script>"
    )


def _navigation(sidebar_text: str, previous: str, notebook_button: str, launch: bool) -> str:
    """The theme's sidebar, header buttons and previous/next links, as on chapter 3 of the book."""
    launch_link = (
        '<div class="dropdown dropdown-launch-buttons"><a href="https://mybinder.org/v2/gh/OWNER/repo/main?'
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


HEATMAP = {"type": "heatmap", "z": [[1, 2, 3], [3, 1, 2], [2, 3, 1]]}
SCATTER = {"type": "scatter", "mode": "markers", "x": list(range(20)), "y": [i % 7 for i in range(20)], "marker": {"size": 8}}

PAGES = {
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
        (root / f"{name}.html").write_text(HEAD.format(**parts))
    server = serve(root)
    output = harness.OUTPUT_DIR / "self-test"
    reports = {}

    def report(name: str) -> harness.PageReport:
        if name not in reports:
            reports[name] = harness.visit_page(
                browser, server.url(f"{name}.html"), name, blocked_requests, output, render_timeout_ms=3_000,
                check_dark=name in ("good", "dark_unreadable", "dark_readable"),
            )
        return reports[name]

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
