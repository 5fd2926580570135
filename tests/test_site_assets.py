"""book/_ext/offline_assets.py: which plotly.js the book serves, and the trace types it must draw."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from sphinx.errors import ExtensionError

from attribution_course import plots

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("offline_assets", REPO / "book" / "_ext" / "offline_assets.py")
offline_assets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_assets)


def _page(*figures) -> str:
    return "<p>text</p>" + "".join(plots.figure_html(fig) for fig in figures)


def test_trace_types_are_read_from_the_figures_json():
    plots.use_course_renderer()
    heat = plots.heatmap(np.arange(6.0).reshape(2, 3), x_labels=list("abc"), y_labels=list("de"), title="t")
    bars = plots.bar([1.0, 2.0], labels=["a", "b"], title="t")
    assert offline_assets.figure_trace_types(_page(heat, bars)) == {"heatmap", "bar"}
    assert offline_assets.figure_trace_types("<p>no figure</p>") == set()


def test_the_course_plot_helpers_draw_with_the_cartesian_bundle():
    plots.use_course_renderer()
    figures = [
        plots.heatmap(np.ones((2, 2)), x_labels=["a", "b"], y_labels=["c", "d"], title="t"),
        plots.exact_vs_estimate(np.arange(3.0), {"est": np.arange(3.0)}, labels=["a", "b", "c"], title="t"),
        plots.grouped_bar({"s": [1.0]}, labels=["a"], title="t"),
        plots.lines({"s": [0.0, 1.0]}, {"s": [1.0, 2.0]}, title="t", x_title="x", y_title="y"),
    ]
    assert offline_assets.figure_trace_types(_page(*figures)) <= offline_assets.CARTESIAN_TRACES


def test_served_bundle_matches_the_plotly_package_version():
    source, traces = offline_assets._plotly_bundle()
    assert offline_assets._plotly_js_version(source) == offline_assets._plotly_js_version(offline_assets._plotly_js_source())
    if not offline_assets.CARTESIAN_BUNDLE.is_file():
        pytest.skip("tools/site-assets not installed (bash .ci/install-site-assets): the full bundle is served")
    assert source == offline_assets.CARTESIAN_BUNDLE and traces == offline_assets.CARTESIAN_TRACES


def test_a_figure_the_bundle_cannot_draw_fails_the_build():
    class App:
        class config:
            course_plotly_traces = offline_assets.CARTESIAN_TRACES
            mathjax_path = "mathjax/tex-svg-full.js"

    import plotly.graph_objects as go

    body = _page(go.Figure(go.Scattergl(x=[1, 2], y=[3, 4])))
    with pytest.raises(ExtensionError, match=r"chapter_x: figures of trace type\(s\) \['scattergl'\]"):
        offline_assets._page_assets(App, "chapter_x", "page.html", {"script_files": [], "body": body}, None)


# ---------------------------------------------------------------- figures on a phone (plots.py)


def test_titles_wrap_to_fit_a_phone():
    title = "Mean ablation of the residual stream (input of each layer) at each position"
    lines = plots.wrap_title(title).split("<br>")
    assert len(lines) > 1 and all(len(line) <= plots.TITLE_WRAP for line in lines)
    assert " ".join(lines) == title
    assert plots.wrap_title("short") == "short"


def test_every_shown_figure_gets_the_narrow_screen_layout():
    plots.use_course_renderer()
    figure = plots.grouped_bar({"zero": [1.0, 2.0], "mean": [2.0, 1.0]}, labels=["a", "b"],
                               title="Exact effect of each component under each baseline, a long title")
    laid_out = plots.fit_narrow_screens(figure.to_dict())
    legend, title = laid_out["layout"]["legend"], laid_out["layout"]["title"]
    assert (legend["orientation"], legend["yref"], legend["y"], legend["yanchor"]) == ("h", "container", 0, "bottom")
    assert "<br>" in title["text"] and title["pad"]["t"] >= plots.MODEBAR_CLEARANCE
    assert laid_out["layout"]["margin"]["t"] >= plots.MODEBAR_CLEARANCE + 2 * plots.TITLE_LINE_HEIGHT
    assert "<br>" not in figure.layout.title.text, "the figure itself is not modified"
    html = plots._CourseRenderer().to_mimebundle(figure.to_dict())["text/html"]
    assert '"orientation":"h"' in html.replace(" ", ""), "the renderer shows the narrow-screen layout"


def test_figures_are_described_to_screen_readers():
    plots.use_course_renderer()
    figure = plots.heatmap(np.ones((2, 2)), x_labels=["H0", "H1"], y_labels=["L0", "L1"], title="Effect of each head",
                           x_title="head", y_title="layer")
    html = plots.figure_html(figure)
    assert 'role="img"' in html
    assert 'aria-label="Heatmap: Effect of each head. Horizontal axis: head; vertical axis: layer."' in html
    scatter = plots.exact_vs_estimate(np.arange(3.0), {"right": np.arange(3.0), "wrong": -np.arange(3.0)},
                                      labels=["a", "b", "c"], title="Exact vs estimate")
    assert "Series: right, wrong" in plots.figure_description(scatter.to_dict())
