"""A chapter's downloadable notebook: MyST -> plain Jupyter, on a small executed notebook made here.

The real chapters are checked after the book build (tests/test_learner_notebooks.py runs one in a
fresh environment); these tests pin each conversion and show the checks can fail.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import plotly.graph_objects as go
import pytest

from attribution_course import chapter_notebooks as cn
from attribution_course import notebook_setup, plots

BIBLIOGRAPHY = Path(__file__).resolve().parents[1] / "book" / "references.bib"


def executed_chapter() -> nbformat.NotebookNode:
    """What the book's build leaves in jupyter_execute/: MyST markdown, glue outputs, page HTML, stderr."""
    figure = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout={"title": {"text": "Two bars"}})
    code = nbformat.v4.new_code_cell("from myst_nb import glue\nglue('gap', 0.123456, display=False)\nfig.show()")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="Loading weights: 100%|#####| /work/secret/path\n"),
        nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": "0.123456"},
                               metadata={"scrapbook": {"name": "gap", "mime_prefix": "application/papermill.record/"}}),
        nbformat.v4.new_output("display_data", data={"text/html": plots.figure_html(figure), "text/plain": "fig"}),
        nbformat.v4.new_output("display_data", data={"text/markdown": "| head | {glue:text}`gap:.1f` |"}),
    ]
    markdown = nbformat.v4.new_markdown_cell(
        "# Chapter\n\n:::{admonition} Learning goals\n:class: tip\n- one\n- two\n:::\n\n"
        "The gap is {glue:text}`gap:.2f` {cite:p}`nanda2023attribution`, as {cite:t}`wang2022ioi` found; "
        "see {doc}`04_activation_patching` and {doc}`the appendix <appendix/05_x>`.\n\n"
        "::::{admonition} Check yourself\n:class: dropdown\n**Question.** Why?\n\n**Answer.** Because.\n::::\n\n"
        "Exercises: {download}`exercises notebook <downloads/05_x.ipynb>`."
    )
    return nbformat.v4.new_notebook(cells=[markdown, code], metadata={"jupytext": {"formats": "md:myst"}})


def clean(nb=None, **overrides) -> nbformat.NotebookNode:
    arguments = dict(repository_url="", titles={"04_activation_patching": "Activation patching"},
                     citation=cn.bibliography_citation(BIBLIOGRAPHY))
    return cn.clean_notebook(nb or executed_chapter(), **{**arguments, **overrides})


def test_markdown_becomes_plain_jupyter_markdown():
    nb = clean()
    text = nb.cells[0].source
    assert cn.leftover_myst(nb) == []
    assert "> **Learning goals**\n>\n> - one\n> - two" in text
    assert "The gap is 0.12 ([Nanda](https://www.neelnanda.io/" in text and ", 2023)" in text
    assert "[Wang et al.](https://arxiv.org/abs/2211.00593) (2023) found" in text
    assert "see *Activation patching* and *the appendix*" in text
    assert "<details><summary><b>Check yourself</b></summary>\n\n**Question.** Why?" in text and "</details>" in text
    assert "exercises notebook (`05_x.ipynb`, on this chapter's page of the book)" in text


def test_outputs_lose_stderr_and_glue_records_and_figures_carry_plotly_json():
    nb = clean()
    code = next(c for c in nb.cells if c.cell_type == "code" and not notebook_setup.is_setup_cell(c))
    assert "from attribution_course.chapter_notebooks import glue" in code.source and "myst_nb" not in code.source
    kinds = [(o.output_type, o.get("name") or sorted(o.data)) for o in code.outputs]
    assert ("stream", "stderr") not in kinds and "/work/secret" not in str(code.outputs)
    assert ("stream", "stdout") in kinds and "gap = 0.123456\n" in [o.get("text") for o in code.outputs]
    [figure] = [o for o in code.outputs if plots.PLOTLY_MIME in o.get("data", {})]
    payload = figure.data[plots.PLOTLY_MIME]
    assert payload["data"][0]["type"] == "bar" and payload["layout"]["title"]["text"] == "Two bars"
    assert payload["config"]["displaylogo"] is False
    assert "cdn.plot.ly" in figure.data["text/html"], "HTML for front-ends without plotly's renderer loads plotly.js"
    assert figure.data["text/plain"] == "<plotly figure: Two bars>"
    table = next(o for o in code.outputs if "text/markdown" in o.get("data", {}))
    assert table.data["text/markdown"] == "| head | 0.1 |"


def test_the_set_up_cell_comes_first_and_the_glue_stand_in_prints(capsys):
    nb = clean(repository_url="https://github.com/someone/course")
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert notebook_setup.is_setup_cell(first_code) and "git+https://github.com/someone/course" in first_code.source
    assert nb.metadata == {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                           "language_info": {"name": "python"}}
    cn.glue("gap", 0.5, display=False)
    assert capsys.readouterr().out == "gap = 0.5\n"


def test_unknown_glue_keys_and_leftover_syntax_are_reported():
    nb = executed_chapter()
    nb.cells[0].source += " {glue:text}`missing`"
    with pytest.raises(KeyError, match="missing"):
        clean(nb)
    leftover = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("```{mermaid}\ngraph\n```")])
    assert cn.leftover_myst(leftover) == ["cell 0: '```{'"]


def test_glue_values_the_build_saved_beside_the_notebook_are_used(tmp_path):
    """MyST-NB removes glue(..., display=False) outputs from jupyter_execute/<doc>.ipynb into <doc>.glue.json."""
    import json

    nb = executed_chapter()
    code = nb.cells[1]
    code.outputs = [o for o in code.outputs if "scrapbook" not in o.get("metadata", {})]
    with pytest.raises(KeyError, match="gap"):
        clean(nb)
    record = {"output_type": "display_data", "metadata": {"scrapbook": {"name": "gap", "mime_prefix": ""}},
              "data": {"text/plain": "0.987"}}
    (tmp_path / "05_x.glue.json").write_text(json.dumps({"gap": record}))
    text = clean(nb, glued=cn.glue_cache(tmp_path, "05_x")).cells[0].source
    assert "The gap is 0.99 " in text
