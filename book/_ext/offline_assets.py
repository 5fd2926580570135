"""Serve plotly.js from the built site, so figures render with no network access; keep pages light.

plotly.js is served as ``_static/plotly.min.js``: plotly.js's cartesian bundle (npm package
``plotly.js-cartesian-dist-min``, 0.5 MB gzipped, installed by ``.ci/install-site-assets``) when it
is the same plotly.js version as the installed ``plotly`` package's, which wrote the figures' JSON;
otherwise that package's full bundle (1.5 MB gzipped). Nothing is vendored, so it cannot go stale
when plotly is upgraded; a figure whose trace type the cartesian bundle lacks fails the build.
It is copied when the builder starts, so Sphinx adds its content checksum (``?v=...``) to the URL
like for every other static file (cache-busting).

Only pages that need them load plotly.js and MathJax (2.3 MB, 0.7 MB gzipped): a page without a figure gets no plotly, a page without mathematics no MathJax. Both
load with ``defer``, so they never block the first paint. A figure's inline ``Plotly.newPlot``
script is turned into a module script: module scripts run after the deferred scripts before
them, so ``Plotly`` exists when they run. ``course-figures.js`` (deferred, after plotly.js)
removes plotly's links to its cloud service from every figure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

PLOTLY_JS = "plotly.min.js"
FIGURE_SETUP_JS = "course-figures.js"  # book/_static: plotly's global settings for the course
# A figure output written by plotly.io.to_html(include_plotlyjs=False): its newPlot script.
FIGURE_SCRIPT = re.compile(r'<script(?: type="text/javascript")?>(?=\s*window\.PLOTLYENV)')
FIGURE_DIV = 'class="plotly-graph-div"'
# Sphinx writes every formula (inline or display) with the class "math".
MATH_ELEMENT = re.compile(r'<(?:span|div) class="math\b')


def _plotly_js_source() -> Path:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: the installed plotly package does not ship {PLOTLY_JS}")
    return source


# plotly.js's "cartesian" bundle (npm plotly.js-cartesian-dist-min, pinned in tools/site-assets,
# installed by .ci/install-site-assets): 0.5 MB gzipped instead of 1.5 MB, with these trace types.
CARTESIAN_BUNDLE = (Path(__file__).resolve().parents[2] / "tools" / "site-assets" / "node_modules"
                    / "plotly.js-cartesian-dist-min" / "plotly-cartesian.min.js")
CARTESIAN_TRACES = frozenset({"bar", "box", "contour", "heatmap", "histogram", "histogram2d", "histogram2dcontour",
                              "image", "pie", "scatter", "scatterternary", "violin"})
PLOTLY_JS_VERSION = re.compile(rb"plotly\.js[^\n]*? v(\d+\.\d+\.\d+)")


def _plotly_js_version(path: Path) -> str:
    match = PLOTLY_JS_VERSION.search(path.read_bytes()[:1000])
    return match.group(1).decode() if match else ""


def _plotly_bundle() -> tuple[Path, frozenset | None]:
    """The plotly.js to serve and the trace types it draws (None: all).

    The cartesian bundle only when it is the same plotly.js version as the installed plotly
    package's (which wrote the figures' JSON); otherwise the package's full bundle.
    """
    full = _plotly_js_source()
    if CARTESIAN_BUNDLE.is_file() and _plotly_js_version(CARTESIAN_BUNDLE) == _plotly_js_version(full):
        return CARTESIAN_BUNDLE, CARTESIAN_TRACES
    logger.info(f"offline_assets: serving the full {full.name} (no cartesian bundle of plotly.js "
                f"{_plotly_js_version(full)} in {CARTESIAN_BUNDLE.parent}; `bash .ci/install-site-assets` installs it)")
    return full, None


def _copy_plotly_js(app) -> None:
    if app.builder.format == "html":
        source, app.config.course_plotly_traces = _plotly_bundle()
        target = Path(app.outdir) / "_static" / PLOTLY_JS
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def figure_trace_types(body: str) -> set[str]:
    """Trace types of every ``Plotly.newPlot(id, traces, ...)`` call in a page's HTML."""
    from attribution_course.plots import figures_in_html

    return {trace.get("type", "scatter") for figure in figures_in_html(body) for trace in figure["data"]}


def _script_name(script) -> str:
    return (getattr(script, "filename", script) or "").split("?")[0]


def _page_assets(app, pagename, templatename, context, doctree) -> None:
    """plotly.js only on pages with a figure, MathJax only on pages with a formula."""
    scripts = context.get("script_files")
    if scripts is None:
        return
    body = context.get("body", "")
    has_figures = FIGURE_DIV in body
    has_math = bool(MATH_ELEMENT.search(body))
    figure_scripts = {f"_static/{PLOTLY_JS}", f"_static/{FIGURE_SETUP_JS}"}
    mathjax = f"_static/{app.config.mathjax_path}"

    def needed(script) -> bool:
        name = _script_name(script)
        if name in figure_scripts:
            return has_figures
        if name == mathjax or getattr(script, "attributes", {}).get("body", "").startswith("window.MathJax"):
            return has_math
        return True

    scripts[:] = [script for script in scripts if needed(script)]
    drawable = app.config.course_plotly_traces
    if has_figures and drawable is not None and not figure_trace_types(body) <= drawable:
        missing = sorted(figure_trace_types(body) - drawable)
        raise ExtensionError(f"{pagename}: figures of trace type(s) {missing} are not in plotly.js's cartesian "
                             f"bundle served by the book ({sorted(drawable)}); see book/_ext/offline_assets.py")
    for script in scripts:
        # MathJax is listed by more than one extension, not always deferred; it never needs to block.
        if _script_name(script) == mathjax and hasattr(script, "attributes"):
            script.attributes.pop("async", None)
            script.attributes["defer"] = "defer"
    if has_figures:
        context["body"] = FIGURE_SCRIPT.sub('<script type="module">', body)


def _offline_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop scripts that would reach the network, and scripts listed twice.

    sphinx-thebe (always loaded by Jupyter Book) writes the URL of thebe on a CDN
    into every page even with thebe switched off; the course does not use thebe.
    MathJax ends up listed twice on pages with maths; it must load once.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    kept, seen = [], set()
    for script in scripts:
        filename = getattr(script, "filename", script) or ""
        body = getattr(script, "attributes", {}).get("body", "") or ""
        if "unpkg.com" in body or filename.endswith("sphinx-thebe.js"):
            continue
        key = filename.split("?")[0] if filename else body
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    scripts[:] = kept


PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _drop_plotly_json(app, docname, source) -> None:
    """Stored notebooks (the appendix): keep a figure's HTML, drop its Plotly JSON twin.

    ``attribution_course.plots`` emits both outside the book build; MyST-NB has
    no renderer for the JSON and would warn (a failed strict build).
    """
    if not str(app.env.doc2path(docname)).endswith(".ipynb") or PLOTLY_MIME not in source[0]:
        return
    notebook = json.loads(source[0])
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data and "text/html" in data:
                del data[PLOTLY_MIME]
    source[0] = json.dumps(notebook)


def setup(app):
    app.add_config_value("course_plotly_traces", None, "")  # set at builder-inited (_copy_plotly_js)
    # Chapters' kernels inherit this: attribution_course.plots then emits HTML only.
    os.environ["ATTRIBUTION_COURSE_BOOK_BUILD"] = "1"
    _plotly_js_source()  # fail at start-up, not after executing every chapter
    app.add_js_file(PLOTLY_JS, priority=200, loading_method="defer")
    app.add_js_file(FIGURE_SETUP_JS, priority=201, loading_method="defer")
    app.connect("builder-inited", _copy_plotly_js)
    app.connect("html-page-context", _offline_scripts, priority=900)
    app.connect("html-page-context", _page_assets, priority=901)
    app.connect("source-read", _drop_plotly_json)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
