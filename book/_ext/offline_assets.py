"""Serve plotly.js from the built site, so figures render with no network access.

The file is copied from the installed ``plotly`` package (the same version that
wrote the figures' JSON) into ``_build/html/_static/`` and loaded in every
page's ``<head>``, before the inline ``Plotly.newPlot`` calls of the figures.
Nothing is vendored, so it cannot go stale when plotly is upgraded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PLOTLY_JS = "plotly.min.js"


def _plotly_js_source() -> Path:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: the installed plotly package does not ship {PLOTLY_JS}")
    return source


def _copy_plotly_js(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / PLOTLY_JS
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_plotly_js_source(), target)


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
    # Chapters' kernels inherit this: attribution_course.plots then emits HTML only.
    os.environ["ATTRIBUTION_COURSE_BOOK_BUILD"] = "1"
    _plotly_js_source()  # fail at start-up, not after executing every chapter
    # Loaded without `defer`, so the global `Plotly` exists before the figures' inline scripts run.
    app.add_js_file(PLOTLY_JS, priority=200)
    app.connect("build-finished", _copy_plotly_js)
    app.connect("html-page-context", _offline_scripts, priority=900)
    app.connect("source-read", _drop_plotly_json)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
