"""Plotly figures for the course: labelled heatmaps and exact-vs-estimate scatters.

Every figure works offline and in both light and dark page themes:

* :func:`use_course_renderer` makes ``fig.show()`` emit two representations:
  Plotly's own JSON (JupyterLab, Notebook 7 and VS Code draw it natively) and a small HTML
  snippet that calls the page's global ``Plotly`` (the book serves plotly.js
  from its own ``_static/`` folder, so no CDN is contacted). The snippet's
  ``<div>`` id is a hash of the figure, so rerunning a cell gives the same output.
  In Colab, which has no renderer for Plotly's JSON and no global ``Plotly``, the HTML
  loads plotly.js from plotly's CDN instead (:func:`notebook_bundle`).
* the ``"course"`` template has a transparent background and a mid-grey font,
  which reads on white and on near-black; the book's CSS lightens text further
  in dark mode.
* colour is never the only channel: heatmaps print their values in the cells,
  scatters use marker symbols per series and name every point on hover.
"""

from __future__ import annotations

import copy
import hashlib
import html as html_module
import json
import os
import re
import sys
import textwrap
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch

from .patching import effect_shape, get_family

#: Marker symbols cycled through by scatter series (shape, not colour, tells series apart).
SYMBOLS = ("circle", "x", "diamond", "square", "triangle-up", "cross", "star", "triangle-down")
#: A colour-blind-safe qualitative palette (Okabe & Ito).
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
#: Diverging scale for signed effects: blue negative, white zero, red positive.
DIVERGING = "RdBu_r"
#: Sequential scale for fractions such as attention weights: white 0, dark blue 1.
SEQUENTIAL = "Blues"
#: Values are printed in heatmap cells only up to this many columns: on a 390 px
#: phone screen each cell is then still wide enough for "0.00" in a readable font.
MAX_COLUMNS_WITH_VALUES = 8
#: Font size of values printed in heatmap cells and on bars (pixels).
VALUE_FONT_SIZE = 12
#: Titles are wrapped at this many characters: a line of the title font then fits a 390 px phone.
TITLE_WRAP = 42
#: Font size of figure titles (pixels).
TITLE_FONT_SIZE = 15
#: Height of plotly's toolbar (the "modebar", top right of every figure, 25 px) plus a gap: titles start below it.
MODEBAR_CLEARANCE = 34
#: Height of one title line (pixels, measured in Chromium at :data:`TITLE_FONT_SIZE`).
TITLE_LINE_HEIGHT = 20
#: plotly anchors a title of several lines about this much higher than a one-line title (measured).
MULTILINE_TITLE_SHIFT = 15
#: Room for tick labels of an x axis drawn above the plot (and for its title, if it has one).
TOP_AXIS_HEIGHT = 28
#: Text on bars shrinks to fit the bar; below this size (pixels) it is hidden instead (hover shows the value).
MIN_BAR_TEXT_SIZE = 9

_GRID = "rgba(128,128,128,0.30)"
_FONT = "#6b6b6b"


def _course_template() -> go.layout.Template:
    template = go.layout.Template(pio.templates["plotly_white"])
    axis = dict(gridcolor=_GRID, zerolinecolor="rgba(128,128,128,0.55)", linecolor=_GRID, automargin=True)
    template.layout.update(
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font=dict(color=_FONT, size=13),
        colorway=list(COLOURS),
        xaxis=axis,
        yaxis=axis,
        margin=dict(l=60, r=20, t=60, b=50),
        hoverlabel=dict(font=dict(color="#111111"), bgcolor="#fafafa"),
        # the title at the left, under the toolbar (fit_narrow_screens sets its distance from the top)
        title=dict(x=0, xref="container", xanchor="left", y=1, yref="container", yanchor="top",
                   font=dict(size=TITLE_FONT_SIZE)),
        uniformtext=dict(minsize=MIN_BAR_TEXT_SIZE, mode="hide"),
    )
    return template


#: plotly config of every figure: no logo link, and no "Share chart" button (plotly.js 4 shows one,
#: which uploads the figure to plotly's cloud, unless showSendToCloud is off).
FIGURE_CONFIG = {"displaylogo": False, "showSendToCloud": False}

#: Set by the book's Sphinx extension (book/_ext/offline_assets.py) for the kernels it starts.
BOOK_BUILD_ENV = "ATTRIBUTION_COURSE_BOOK_BUILD"


class _CourseRenderer(pio.base_renderers.MimetypeRenderer):
    """Plotly JSON for notebook front-ends plus an HTML snippet for the book.

    In the book build only the HTML is emitted: MyST-NB has no renderer for
    Plotly's JSON mime type and would warn (and the build treats warnings as errors).
    """

    def to_mimebundle(self, fig_dict):
        fig_dict = fit_narrow_screens(fig_dict)
        if os.environ.get(BOOK_BUILD_ENV):
            return {"text/html": figure_html(fig_dict)}
        return notebook_bundle(fig_dict, standalone_html="google.colab" in sys.modules)


PLOTLY_MIME = "application/vnd.plotly.v1+json"


def notebook_bundle(fig, *, standalone_html: bool) -> dict:
    """A figure's output in a notebook: Plotly's JSON, which JupyterLab, Notebook 7 and VS Code
    draw with no network (and prefer to any HTML), plus HTML for other front-ends:
    ``standalone_html`` loads plotly.js from plotly's CDN (Colab, a downloaded notebook),
    otherwise the HTML calls the global ``Plotly`` of the page it is on (the book's appendix)."""
    fig_dict = fig if isinstance(fig, dict) else fig.to_dict()
    bundle = pio.base_renderers.PlotlyRenderer(config=FIGURE_CONFIG).to_mimebundle(fig_dict)
    bundle["text/html"] = figure_html(fig_dict, plotlyjs_from_cdn=standalone_html)
    return bundle


def figure_html(fig, *, plotlyjs_from_cdn: bool = False) -> str:
    """An HTML ``<div>`` plus ``Plotly.newPlot`` call that uses the page's global Plotly
    (or, with ``plotlyjs_from_cdn``, first loads plotly.js from plotly's CDN).

    The id is derived from the figure's JSON, so it is the same on every run. The ``<div>`` is
    an image to assistive technology (``role="img"``), named by :func:`figure_description`.
    """
    fig_dict = fig if isinstance(fig, dict) else fig.to_dict()
    digest = hashlib.sha1(json.dumps(fig_dict, sort_keys=True, default=str).encode()).hexdigest()[:12]
    html = pio.to_html(
        fig_dict,
        include_plotlyjs="cdn" if plotlyjs_from_cdn else False,
        full_html=False,
        div_id=f"fig-{digest}",
        config={**FIGURE_CONFIG, "responsive": True},
        validate=False,
    )
    label = html_module.escape(figure_description(fig_dict), quote=True)
    return html.replace('class="plotly-graph-div"', f'class="plotly-graph-div" role="img" aria-label="{label}"', 1)


def _plain(text) -> str:
    """Title text without plotly's HTML line breaks and tags."""
    text = text.get("text", "") if isinstance(text, dict) else (text or "")
    return " ".join(re.sub(r"<[^>]+>", " ", str(text)).split())


def figure_description(fig_dict: dict) -> str:
    """A one-sentence text alternative for a figure: its kind, title, axes and series.

    E.g. "Heatmap: Exact effect of ablating each head. Horizontal axis: head; vertical axis: layer."
    """
    traces = fig_dict.get("data", [])
    layout = fig_dict.get("layout", {})
    kinds = []
    for trace in traces:
        kind = trace.get("type", "scatter")
        if kind == "scatter":
            kind = "line chart" if "lines" in str(trace.get("mode", "lines")) and trace.get("hoverinfo") != "skip" else "scatter plot"
            if trace.get("hoverinfo") == "skip":
                continue  # a reference line such as y = x
        elif kind == "bar":
            kind = "bar chart"
        if kind not in kinds:
            kinds.append(kind)
    def first_upper(text: str) -> str:
        return text[:1].upper() + text[1:]

    sentence = [f"{first_upper(', '.join(kinds) or 'figure')}: {_plain(layout.get('title')) or 'untitled'}."]
    axes = [(name, _plain(layout.get(key, {}).get("title"))) for name, key in (("horizontal", "xaxis"), ("vertical", "yaxis"))]
    axes = [f"{name} axis: {title}" for name, title in axes if title]
    if axes:
        sentence.append(first_upper("; ".join(axes)) + ".")
    series = [trace["name"] for trace in traces if trace.get("name") and trace.get("showlegend", True) is not False]
    if len(series) > 1:
        sentence.append("Series: " + ", ".join(dict.fromkeys(series)) + ".")
    return " ".join(sentence)


def wrap_title(text: str, width: int = TITLE_WRAP) -> str:
    """``text`` with plotly line breaks (``<br>``) so that no line is longer than ``width`` characters."""
    lines = re.split(r"<br\s*/?>", text)
    return "<br>".join("<br>".join(textwrap.wrap(line, width)) or line for line in lines)


def fit_narrow_screens(fig_dict: dict) -> dict:
    """The layout every course figure is shown with, legible on a 390 px phone and on a desktop.

    * the title is wrapped (:func:`wrap_title`) and starts below the toolbar, which covers the
      top right of a figure (half its width on a phone); the top margin makes room for it;
    * a legend is horizontal, at the bottom, left-aligned (plotly moves the axis title up to
      make room): a legend at the side takes a third of a phone's width, and long series names
      were cut off on wide screens.

    Heatmap cell values are hidden in the browser while the cells are too narrow for them
    (``book/_static/course-figures.js``); text on bars is hidden below :data:`MIN_BAR_TEXT_SIZE`
    (the template's ``uniformtext``). Returns a new dict; ``fig_dict`` is not modified.
    """
    fig_dict = copy.deepcopy(fig_dict)
    layout = fig_dict.setdefault("layout", {})
    title = layout.get("title")
    if isinstance(title, str):
        title = layout["title"] = {"text": title}
    top = MODEBAR_CLEARANCE
    if title and title.get("text"):
        title["text"] = wrap_title(title["text"])
        lines = title["text"].count("<br>") + 1
        title["pad"] = {"t": MODEBAR_CLEARANCE + (MULTILINE_TITLE_SHIFT if lines > 1 else 0), "l": 8}
        top += lines * TITLE_LINE_HEIGHT
    top_axes = [axis for key, axis in layout.items() if key.startswith("xaxis") and isinstance(axis, dict) and axis.get("side") == "top"]
    top += sum(TOP_AXIS_HEIGHT * (2 if _plain(axis.get("title")) else 1) for axis in top_axes[:1])
    layout.setdefault("margin", {})["t"] = top + 12
    layout.setdefault("legend", {}).update(orientation="h", x=0, xanchor="left", y=0, yanchor="bottom", yref="container")
    return fig_dict


def figures_in_html(html: str) -> list[dict]:
    """Every figure drawn by a ``Plotly.newPlot(id, data, layout[, config])`` call in ``html``
    (what :func:`figure_html` writes), as ``{"data": ..., "layout": ..., "config": ...}``."""
    decoder, separator, figures = json.JSONDecoder(), re.compile(r"\s*,\s*"), []
    for call in re.finditer(r"Plotly\.newPlot\(\s*", html):
        arguments, position = [], call.end()
        while len(arguments) < 4:
            value, position = decoder.raw_decode(html, position)
            arguments.append(value)
            comma = separator.match(html, position)
            if comma is None:
                break
            position = comma.end()
        figures.append({"data": arguments[1], "layout": arguments[2] if len(arguments) > 2 else {},
                        "config": arguments[3] if len(arguments) > 3 else {}})
    return figures


def use_course_renderer() -> None:
    """Register the ``"course"`` template and renderer and make them the defaults."""
    pio.templates["course"] = _course_template()
    pio.templates.default = "course"
    pio.renderers["course"] = _CourseRenderer()
    pio.renderers.default = "course"


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float().numpy()
    return np.asarray(values, dtype=float)


# ------------------------------------------------------------------ labels


def component_labels(model, family: str, position_labels: Sequence[str] | None = None) -> np.ndarray:
    """A label for every component of ``family``, shaped like a sweep's result.

    ``"L1H3"`` for heads, ``"L1H3@S2"`` for head x position, ``"resid_pre L2@end"``,
    ``"MLP0"``, ``"MLP0@S2"``, ``"attn L0@end"``, ``"pattern L1H3"``.
    """
    fam = get_family(family)
    positions = list(position_labels) if position_labels is not None else []
    shape = effect_shape(model, fam, len(positions))
    labels = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        layer, rest = index[0], dict(zip(fam.component_axes, index[1:]))
        head = f"H{rest['head']}" if "head" in rest else ""
        where = f"@{positions[rest['pos']]}" if "pos" in rest else ""
        prefix = {"mlp": "MLP", "mlp_pos": "MLP", "resid_pos": "resid_pre L", "attn_pos": "attn L", "pattern": "pattern L"}
        labels[index] = f"{prefix.get(fam.name, 'L')}{layer}{head}{where}"
    return labels


# ------------------------------------------------------------------ figures


def heatmap(
    values,
    *,
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str,
    x_title: str = "",
    y_title: str = "",
    value_name: str = "effect",
    show_values: bool = True,
    digits: int = 2,
    height: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> go.Figure:
    """A signed heatmap centred on zero, with axis labels and the values printed in the cells.

    ``values`` has shape ``[len(y_labels), len(x_labels)]``. With ``value_range=(low, high)``
    the colours run over that range on a sequential scale instead (for fractions
    such as attention weights, which are never negative).
    """
    z = _numpy(values)
    if z.shape != (len(y_labels), len(x_labels)):
        raise ValueError(f"heatmap values have shape {z.shape} but the labels give {(len(y_labels), len(x_labels))}")
    # NaN cells (components a sweep skipped) must not set the colour scale
    limit = float(np.nan_to_num(np.nanmax(np.abs(z)), nan=0.0)) if np.isfinite(z).any() else 0.0
    limit = limit or 1.0
    colours = (
        dict(colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit)
        if value_range is None
        else dict(colorscale=SEQUENTIAL, zmin=value_range[0], zmax=value_range[1])
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(x_labels),
            y=list(y_labels),
            **colours,
            # a horizontal colour bar at the bottom leaves the cells the figure's whole width (a
            # phone then still has room for printed values); plotly lifts the x axis above it
            colorbar=dict(title=dict(text=value_name, side="right"), orientation="h", thickness=12, len=0.6,
                          x=0, xanchor="left", xref="container", y=0, yanchor="bottom", yref="container"),
            texttemplate=f"%{{z:.{digits}f}}" if show_values else None,
            textfont=dict(size=10),
            hovertemplate=f"{y_title or 'row'} %{{y}}<br>{x_title or 'column'} %{{x}}<br>{value_name} %{{z:.4f}}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=title,
        xaxis=dict(title=x_title, type="category", showgrid=False),
        yaxis=dict(title=y_title, type="category", autorange="reversed", showgrid=False),
        # rows of 30 px, plus the title, the x axis (its labels turn on a phone) and the colour bar
        height=height or 240 + 30 * len(y_labels),
    )
    return fig


def layer_heatmap(values, model, family: str, *, title: str, position_labels: Sequence[str] | None = None, **kwargs) -> go.Figure:
    """:func:`heatmap` of a sweep result, with rows and columns named after the family's axes.

    ``head`` and ``pattern`` give layer x head; ``*_pos`` families give
    layer x position (``head_pos`` gives layer.head x position).
    """
    fam = get_family(family)
    z = _numpy(values)
    layers = [f"L{layer}" for layer in range(model.cfg.n_layers)]
    heads = [f"H{h}" for h in range(model.cfg.n_heads)]
    positions = list(position_labels) if position_labels is not None else None
    if fam.component_axes == ("head",):
        return heatmap(z, x_labels=heads, y_labels=layers, title=title, x_title="head", y_title="layer", **kwargs)
    if fam.component_axes == ("pos",):
        return heatmap(z, x_labels=positions, y_labels=layers, title=title, x_title="position", y_title="layer", **kwargs)
    if fam.component_axes == ("head", "pos"):
        rows = [f"L{layer}H{h}" for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        kwargs.setdefault("show_values", False)
        return heatmap(z.reshape(len(rows), -1), x_labels=positions, y_labels=rows, title=title, x_title="position", y_title="head", **kwargs)
    if fam.component_axes == ():
        return heatmap(z.reshape(1, -1), x_labels=[f"MLP{layer}" for layer in range(len(z))], y_labels=["all positions"], title=title, x_title="layer", **kwargs)
    raise ValueError(f"no heatmap layout for family {fam.name!r}")


def exact_vs_estimate(
    exact,
    estimates: dict[str, object],
    *,
    labels,
    title: str,
    x_title: str = "exact effect  M(patched) − M(base)",
    y_title: str = "estimate",
) -> go.Figure:
    """Scatter of estimates against exact effects, with the diagonal y = x.

    ``estimates`` maps a series name (e.g. ``"(a' − a)·∂M/∂a"``) to values shaped
    like ``exact``; each series gets its own marker symbol and colour. Points
    are named by ``labels`` on hover. On the diagonal the estimate is perfect.
    """
    x = _numpy(exact).ravel()
    names = np.asarray(labels, dtype=object).ravel()
    if len(names) != len(x):
        raise ValueError(f"{len(names)} labels for {len(x)} points")
    fig = go.Figure()
    everything = [x]
    for k, (series, values) in enumerate(estimates.items()):
        y = _numpy(values).ravel()
        if y.shape != x.shape:
            raise ValueError(f"series {series!r} has {y.size} values but exact has {x.size}")
        everything.append(y)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="markers",
                name=series,
                text=names,
                marker=dict(symbol=SYMBOLS[k % len(SYMBOLS)], size=9, color=COLOURS[k % len(COLOURS)], line=dict(width=1)),
                hovertemplate="%{text}<br>exact %{x:.4f}<br>" + series + " %{y:.4f}<extra></extra>",
            )
        )
    _add_diagonal(fig, everything, x_title=x_title, y_title=y_title)
    fig.update_layout(title=title)
    return fig


def exact_vs_estimate_by_series(
    series: dict[str, tuple[object, object, object]],
    *,
    title: str,
    x_title: str = "exact effect",
    y_title: str = "first-order estimate",
) -> go.Figure:
    """Like :func:`exact_vs_estimate`, but each series has its own exact values.

    ``series`` maps a name (e.g. a baseline) to ``(exact, estimate, labels)``.
    """
    fig = go.Figure()
    everything = []
    for k, (name, (exact, estimate, labels)) in enumerate(series.items()):
        x, y = _numpy(exact).ravel(), _numpy(estimate).ravel()
        names = np.asarray(labels, dtype=object).ravel()
        if not (x.shape == y.shape == names.shape):
            raise ValueError(f"series {name!r}: {x.size} exact values, {y.size} estimates, {names.size} labels")
        everything += [x, y]
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="markers", name=name, text=names,
                marker=dict(symbol=SYMBOLS[k % len(SYMBOLS)], size=9, color=COLOURS[k % len(COLOURS)], line=dict(width=1)),
                hovertemplate="%{text}<br>exact %{x:.4f}<br>estimate %{y:.4f}<extra>" + name + "</extra>",
            )
        )
    _add_diagonal(fig, everything, x_title=x_title, y_title=y_title)
    fig.update_layout(title=title)
    return fig


def _add_diagonal(fig: go.Figure, arrays: list[np.ndarray], *, x_title: str, y_title: str) -> None:
    """The dashed y = x line, and equal square axes covering every point."""
    low = float(min(v.min() for v in arrays))
    high = float(max(v.max() for v in arrays))
    pad = 0.05 * (high - low or 1.0)
    low, high = low - pad, high + pad
    fig.add_trace(
        go.Scatter(
            x=[low, high], y=[low, high], mode="lines", name="y = x (perfect estimate)",
            line=dict(dash="dash", color="#888888", width=1.5), hoverinfo="skip",
        )
    )
    fig.update_layout(
        xaxis=dict(title=x_title, range=[low, high], zeroline=True),
        yaxis=dict(title=y_title, range=[low, high], zeroline=True, scaleanchor="x", scaleratio=1),
        height=520,
    )


def bar(values, *, labels: Sequence[str], title: str, y_title: str = "", series_name: str = "") -> go.Figure:
    """A bar chart with the value printed on every bar."""
    y = _numpy(values).ravel()
    fig = go.Figure(go.Bar(x=list(labels), y=y, name=series_name, text=[f"{v:.2f}" for v in y], textposition="outside"))
    fig.update_layout(title=title, yaxis=dict(title=y_title), xaxis=dict(type="category"), height=400)
    return fig


def grouped_bar(series: dict[str, Sequence[float]], *, labels: Sequence[str], title: str, y_title: str = "") -> go.Figure:
    """Bars grouped by ``labels``, one pattern-filled bar per series (so print and colour-blind readers can tell them apart)."""
    patterns = ("", "/", ".", "x", "\\", "+")
    # values on the bars only while they fit; otherwise hover shows them
    label_bars = len(labels) * len(series) <= 32
    fig = go.Figure()
    for k, (name, values) in enumerate(series.items()):
        y = _numpy(values).ravel()
        fig.add_trace(
            go.Bar(
                x=list(labels), y=y, name=name, text=[f"{v:.2f}" for v in y] if label_bars else None,
                textposition="outside" if label_bars else "none",
                hovertemplate="%{x}<br>" + name + " %{y:.4f}<extra></extra>",
                marker=dict(color=COLOURS[k % len(COLOURS)], pattern=dict(shape=patterns[k % len(patterns)])),
            )
        )
    fig.update_layout(title=title, barmode="group", yaxis=dict(title=y_title), xaxis=dict(type="category"), height=420)
    return fig


def lines(
    x_values: dict[str, Sequence[float]],
    y_values: dict[str, Sequence[float]],
    *,
    title: str,
    x_title: str,
    y_title: str,
    point_labels: dict[str, Sequence[str]] | None = None,
    log_axes: bool = False,
) -> go.Figure:
    """One line with markers per series (symbol and dash differ per series)."""
    dashes = ("solid", "dash", "dot", "dashdot")
    fig = go.Figure()
    for k, name in enumerate(y_values):
        fig.add_trace(
            go.Scatter(
                x=list(x_values[name]), y=list(y_values[name]), mode="lines+markers", name=name,
                text=list(point_labels[name]) if point_labels else None,
                marker=dict(symbol=SYMBOLS[k % len(SYMBOLS)], size=10, color=COLOURS[k % len(COLOURS)]),
                line=dict(dash=dashes[k % len(dashes)], color=COLOURS[k % len(COLOURS)]),
                hovertemplate=("%{text}<br>" if point_labels else "") + f"{x_title} %{{x}}<br>{y_title} %{{y:.3g}}<extra>{name}</extra>",
            )
        )
    axis_type = "log" if log_axes else "linear"
    fig.update_layout(title=title, xaxis=dict(title=x_title, type=axis_type), yaxis=dict(title=y_title, type=axis_type), height=450)
    return fig


# ------------------------------------------------------------------ reading the circuit


def _head_row_labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]


def head_attention_heatmap(targets: dict[str, object], *, title: str, x_title: str = "") -> go.Figure:
    """Attention of every head (rows ``L0H0``, ``L0H1``, ...) to each target (columns).

    ``targets`` maps a column name (e.g. ``"end → IO"``, which says the query and
    key positions, so no axis title is needed) to the mean attention
    ``[layer, head]`` between those positions. One row
    per head keeps the figure narrow enough for a phone; the colours run from 0
    to 1 and the values are printed while the columns fit
    (:data:`MAX_COLUMNS_WITH_VALUES`).
    """
    columns = [_numpy(values) for values in targets.values()]
    shapes = {c.shape for c in columns}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every target needs a [layer, head] array of the same shape, got {sorted(shapes)}")
    n_layers, n_heads = columns[0].shape
    rows = _head_row_labels(n_layers, n_heads)
    fig = heatmap(
        np.stack([c.ravel() for c in columns], axis=1),
        x_labels=list(targets),
        y_labels=rows,
        title=title,
        x_title=x_title,
        y_title="head",
        value_name="attention",
        show_values=len(targets) <= MAX_COLUMNS_WITH_VALUES,
        value_range=(0.0, 1.0),
        height=130 + 26 * len(rows),
    )
    fig.update_traces(
        textfont=dict(size=VALUE_FONT_SIZE),
        colorbar=dict(orientation="h", y=-0.04, yanchor="top", thickness=12, title=dict(side="top")),
        hovertemplate="%{y} → %{x}<br>attention %{z:.3f}<extra></extra>",
    )
    fig.update_layout(xaxis=dict(side="top"), margin=dict(l=60, r=20, b=20))  # top margin: fit_narrow_screens
    return fig


def head_bars(values, *, title: str, x_title: str, annotations: Sequence[str] | None = None) -> go.Figure:
    """One horizontal bar per head (rows ``L0H0``, ``L0H1``, ...) for a signed value ``[layer, head]``.

    Positive bars are red and negative ones blue with a hatch pattern (the
    colours of :data:`DIVERGING`), so the sign reads without colour too; the value
    is printed next to every bar. ``annotations`` (one string per head, e.g. its
    role) are shown on hover.
    """
    z = _numpy(values)
    if z.ndim != 2:
        raise ValueError(f"head_bars needs a [layer, head] array, got shape {z.shape}")
    rows = _head_row_labels(*z.shape)
    x = z.ravel()
    extra = list(annotations) if annotations is not None else [""] * len(rows)
    if len(extra) != len(rows):
        raise ValueError(f"{len(extra)} annotations for {len(rows)} heads")
    negative = x < 0
    fig = go.Figure(
        go.Bar(
            x=x,
            y=rows,
            orientation="h",
            text=[f"{v:+.2f}" for v in x],
            textposition="outside",
            textfont=dict(size=VALUE_FONT_SIZE),
            cliponaxis=False,
            customdata=extra,
            marker=dict(
                color=["#2166AC" if n else "#B2182B" for n in negative],
                pattern=dict(shape=["/" if n else "" for n in negative]),
            ),
            hovertemplate="%{y}<br>" + x_title + " %{x:.3f}<br>%{customdata}<extra></extra>",
        )
    )
    span = float(np.abs(x).max()) or 1.0
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    pad = 0.3 * span  # room for the printed values beside the longest bars
    fig.update_layout(
        title=title,
        xaxis=dict(title=x_title, range=[low - (pad if low < 0 else 0.05 * span), high + pad], zeroline=True),
        yaxis=dict(title="head", type="category", autorange="reversed", showgrid=False),
        height=130 + 26 * len(rows),
        showlegend=False,
    )
    return fig
