"""The ".ipynb" a chapter page offers for download is a notebook that runs in any Jupyter.

sphinx-book-theme's download button (and ``repository_links._offer_executed_notebook``)
serves ``_sources/<chapter>.ipynb``, a copy of the notebook the build executed: MyST syntax
Jupyter shows as raw text, figures that stay blank outside the book, the build's stderr. When
the build has finished, each chapter's copy is replaced by the notebook
:func:`attribution_course.chapter_notebooks.clean_notebook` makes from it (glued values
written in, plain Jupyter markdown, Plotly's JSON for figures, the set-up cell that installs the
course package first). A chapter whose notebook still holds MyST syntax fails the build.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)


def chapter_docnames(app) -> list[str]:
    """Pages written as MyST Markdown notebooks and executed by this build."""
    executed = Path(app.outdir).parent / "jupyter_execute"
    return sorted(
        docname for docname in app.env.found_docs
        if str(app.env.doc2path(docname)).endswith(".md") and (executed / f"{docname}.ipynb").is_file()
    )


def _write_clean_notebooks(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    from attribution_course.chapter_notebooks import bibliography_citation, clean_notebook, glue_cache, leftover_myst
    from repository_links import repository_url

    url = repository_url(app.config.course_repository_url)
    titles = {docname: title.astext() for docname, title in app.env.titles.items()}
    citation = bibliography_citation(Path(app.srcdir) / app.config.bibtex_bibfiles[0])
    executed_dir = Path(app.outdir).parent / "jupyter_execute"
    written = []
    for docname in chapter_docnames(app):
        executed = nbformat.read(str(executed_dir / f"{docname}.ipynb"), as_version=4)
        try:
            clean = clean_notebook(executed, repository_url=url, titles=titles, citation=citation,
                                   glued=glue_cache(executed_dir, docname))
        except KeyError as err:
            raise ExtensionError(f"{docname}: cannot make its downloadable notebook: {err}") from err
        problems = leftover_myst(clean)
        if problems:
            raise ExtensionError(f"{docname}: its downloadable notebook still shows MyST syntax: {problems[:5]}; "
                                 "teach attribution_course/chapter_notebooks.py that syntax")
        target = Path(app.outdir) / "_sources" / f"{docname}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(clean, str(target))
        written.append(docname)
    logger.info(f"chapter_notebooks: wrote {len(written)} downloadable chapter notebooks to _sources/")


def setup(app):
    app.connect("build-finished", _write_clean_notebooks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
