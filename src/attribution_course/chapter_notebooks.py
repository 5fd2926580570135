"""A chapter as a notebook a learner can download and run in any Jupyter.

The book executes each chapter (a MyST Markdown notebook) into
``book/_build/jupyter_execute/<chapter>.ipynb``. That file is made for the book, not for
Jupyter: its markdown holds MyST roles and directives (``{glue:text}``, ``:::{admonition}``,
``{cite:p}``) that Jupyter shows as raw text, its figures are HTML calling the book page's
global ``Plotly``, and it keeps what the build machine printed on stderr. :func:`clean_notebook`
turns it into a plain Jupyter notebook:

* markdown: glued values written in (as the book shows them), admonitions as quotes
  (``dropdown`` ones as ``<details>``), citations as "Author (year)" linked to the source,
  cross-references as the page's title; no MyST syntax is left;
* code: ``from myst_nb import glue`` becomes :func:`glue` below, which prints each value
  the text quotes when the learner reruns the cell (glue outputs left in the notebook become
  those printed lines);
* outputs: figures carry Plotly's JSON (``application/vnd.plotly.v1+json``, drawn by
  JupyterLab, Notebook 7 and VS Code with no network) plus HTML that loads plotly.js
  from plotly's CDN (Colab); no stderr (progress bars, warnings naming the build's paths);
* the set-up cell of :mod:`attribution_course.notebook_setup` first, so the notebook installs
  the course package where it is missing.

The book's Sphinx extension ``book/_ext/chapter_notebooks.py`` writes these notebooks for
the page's ".ipynb" download button.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Callable, Mapping

import nbformat

from .notebook_setup import with_setup_cell
from .plots import PLOTLY_MIME, figures_in_html, notebook_bundle

#: a MyST inline role: {name}`content`
ROLE = re.compile(r"\{([A-Za-z][\w:.-]*)\}`([^`]*)`")
#: the opening line of a MyST directive fenced by colons or backticks: :::{name} argument
DIRECTIVE = re.compile(r"^(?P<fence>:{3,}|`{3,})\{(?P<name>[\w:.-]+)\}[ \t]*(?P<argument>.*)$")
DIRECTIVE_OPTION = re.compile(r"^:([\w-]+):[ \t]*(.*)$")
GLUE_IMPORT = re.compile(r"^from myst_nb import glue[ \t]*$", re.MULTILINE)
GLUE_REPLACEMENT = "from attribution_course.chapter_notebooks import glue  # prints the values the text quotes"
ADMONITIONS = {"admonition", "note", "tip", "hint", "important", "warning", "caution", "attention", "danger",
               "error", "seealso", "dropdown"}


def glue(name: str, value, display: bool = True) -> None:
    """Stands in for MyST-NB's ``glue`` in a downloaded chapter: prints ``name = value``.

    In the book the value is written into the text; in Jupyter the text keeps the value
    the book computed, and rerunning the cell prints the value computed now.
    """
    text = getattr(value, "data", value)  # IPython's Markdown(...) holds its text in .data
    print(f"{name} = {text}")


# ---------------------------------------------------------------- glue values


def glued_values(nb: nbformat.NotebookNode) -> dict[str, dict]:
    """``{name: mime bundle}`` of every ``glue(name, value)`` output in an executed notebook."""
    from myst_nb.ext.glue import extract_glue_data_cell

    values = {}
    for cell in copy.deepcopy(nb).cells:
        if cell.cell_type == "code":
            values.update({key: output["data"] for key, output in extract_glue_data_cell(cell)})
    return values


def glue_cache(executed_dir: Path, docname: str) -> dict[str, dict]:
    """``{name: mime bundle}`` MyST-NB saved beside the executed notebook (``<docname>.glue.json``)."""
    from myst_nb.ext.glue.crossref import read_glue_cache

    return {name: output["data"] for name, output in read_glue_cache(str(executed_dir), docname).items()}


def _glue_text(bundle: dict) -> str:
    """What ``glue`` prints for a glued value: its markdown if it has one, else its plain text."""
    return bundle.get("text/markdown") or bundle.get("text/plain", "")


# ---------------------------------------------------------------- markdown


class MarkdownConverter:
    """MyST markdown -> the markdown Jupyter renders.

    ``glued``: glue values (:func:`glued_values`); ``titles``: ``{docname: title}`` for
    ``{doc}`` references; ``citation``: ``(keys, textual) -> text`` for ``{cite:p}``/``{cite:t}``.
    """

    def __init__(self, glued: Mapping[str, dict], titles: Mapping[str, str], citation: Callable[[list[str], bool], str]):
        self.glued, self.titles, self.citation = glued, titles, citation

    def convert(self, text: str) -> str:
        return self._roles("\n".join(self._directives(text.split("\n"))))

    # ---- roles

    def _roles(self, text: str) -> str:
        return ROLE.sub(self._role, text)

    def _role(self, match: re.Match) -> str:
        name, content = match.group(1), match.group(2)
        if name.startswith("glue"):
            return self._glue(name, content)
        if name in ("cite:p", "cite:t", "cite"):
            return self.citation([k.strip() for k in content.split(",")], name == "cite:t")
        label, target = _label_and_target(content)
        if name == "doc":
            return f"*{label or self.titles.get(target.lstrip('/'), target)}*"
        if name in ("math",):
            return f"${content}$"
        if name == "download":  # the file is on the book's page, not beside the notebook
            return f"{label} (`{Path(target).name}`, on this chapter's page of the book)" if label else f"`{Path(target).name}`"
        if name in ("ref", "numref", "term", "abbr"):
            return label or target
        return f"`{label or target}`"  # e.g. {kbd}, {code}, roles of the course's own

    def _glue(self, name: str, content: str) -> str:
        key, _, fmt = content.partition(":") if name in ("glue:text", "gluetext") else (content, "", "")
        if key not in self.glued:
            raise KeyError(f"{{{name}}}`{content}`: no glued value named {key!r} in the executed notebook")
        bundle = self.glued[key]
        if name in ("glue:md", "gluemd"):
            return bundle.get("text/markdown", bundle.get("text/plain", ""))
        from myst_nb.core.variables import format_plain_text

        return format_plain_text(bundle.get("text/plain", ""), fmt)

    # ---- directives

    def _directives(self, lines: list[str]) -> list[str]:
        out, index = [], 0
        while index < len(lines):
            opening = DIRECTIVE.match(lines[index])
            if not opening:
                out.append(lines[index])
                index += 1
                continue
            fence = opening.group("fence")
            end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == fence), len(lines))
            body = lines[index + 1 : end]
            options = {}
            while body and (option := DIRECTIVE_OPTION.match(body[0])):
                options[option.group(1)] = option.group(2)
                body = body[1:]
            out += self._directive(opening.group("name"), opening.group("argument").strip(), options,
                                   self._directives(body))
            index = end + 1
        return out

    def _directive(self, name: str, argument: str, options: dict, body: list[str]) -> list[str]:
        if name in ADMONITIONS:
            title = argument or name.capitalize()
            if name == "dropdown" or "dropdown" in options.get("class", "").split():
                return [f"<details><summary><b>{self._roles(title)}</b></summary>", "", *body, "", "</details>"]
            return [f"> **{title}**", ">", *[f"> {line}".rstrip() for line in body]]
        if name in ("image", "figure"):
            alt = options.get("alt", "")
            caption = " ".join(body).strip()
            return [f"*{caption or alt or 'Figure'} (see this figure in the course's book)*"]
        if name in ("math",):
            return ["$$", *body, "$$"]
        return [f"**{argument}**" if argument else "", *body]  # any other directive: its content


def _label_and_target(content: str) -> tuple[str, str]:
    """``text <target>`` -> (text, target); ``target`` -> ('', target)."""
    explicit = re.fullmatch(r"\s*(.*?)\s*<([^<>]+)>\s*", content)
    return (explicit.group(1), explicit.group(2)) if explicit else ("", content.strip())


# ---------------------------------------------------------------- citations


def bibliography_citation(bib_path: Path) -> Callable[[list[str], bool], str]:
    """``(keys, textual) -> "Nanda (2023)"`` or ``"(Nanda, 2023; Wang et al., 2023)"``, each
    name linked to the work's URL, from the book's BibTeX file."""
    from pybtex.database import parse_file

    entries = parse_file(str(bib_path)).entries

    def author_year(key: str) -> tuple[str, str]:
        entry = entries.get(key)
        if entry is None:
            raise KeyError(f"citation {key!r} is not in {bib_path}")
        people = entry.persons.get("author", [])
        last = [" ".join(p.last_names).replace("{", "").replace("}", "") for p in people]
        names = last[0] if len(last) == 1 else f"{last[0]} and {last[1]}" if len(last) == 2 else f"{last[0]} et al."
        names = _latex_accents(names)
        url = entry.fields.get("url") or (f"https://doi.org/{entry.fields['doi']}" if "doi" in entry.fields else "")
        return (f"[{names}]({url})" if url else names), entry.fields.get("year", "n.d.")

    def cite(keys: list[str], textual: bool) -> str:
        works = [author_year(k) for k in keys]
        if textual:
            return "; ".join(f"{names} ({year})" for names, year in works)
        return "(" + "; ".join(f"{names}, {year}" for names, year in works) + ")"

    return cite


def _latex_accents(text: str) -> str:
    """``Kram\\'ar`` -> ``Kramár`` (the accents BibTeX names use)."""
    import unicodedata

    marks = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303", "c": "\u0327"}
    text = re.sub(r"\\([\'`\"^~c])\s*\{?([A-Za-z])\}?", lambda m: m.group(2) + marks[m.group(1)], text)
    return unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------- outputs


def clean_outputs(cell: nbformat.NotebookNode, glued: Mapping[str, dict]) -> list:
    """A code cell's outputs for Jupyter: no stderr, glue outputs as the lines :func:`glue`
    prints, figures as Plotly's JSON plus standalone HTML."""
    outputs = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stderr":
            continue
        scrapbook = output.get("metadata", {}).get("scrapbook")
        if scrapbook:
            name = scrapbook["name"]
            outputs.append(nbformat.v4.new_output("stream", name="stdout", text=f"{name} = {_glue_text(glued[name])}\n"))
            continue
        figures = figures_in_html(output.get("data", {}).get("text/html", "")) if "data" in output else []
        if figures and PLOTLY_MIME not in output.data:
            for figure in figures:
                config = figure.pop("config")
                bundle = notebook_bundle(figure, standalone_html=True)
                bundle[PLOTLY_MIME]["config"] = {**config, **bundle[PLOTLY_MIME].get("config", {})}
                title = (figure["layout"].get("title") or {}).get("text", "")
                bundle["text/plain"] = f"<plotly figure{': ' + title if title else ''}>"
                outputs.append(nbformat.v4.new_output("display_data", data=bundle))
            continue
        outputs.append(output)
    return _merge_streams(outputs)


def _merge_streams(outputs: list) -> list:
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                and previous.name == output.name):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


# ---------------------------------------------------------------- the notebook


def clean_notebook(
    executed: nbformat.NotebookNode, *, repository_url: str, titles: Mapping[str, str],
    citation: Callable[[list[str], bool], str], glued: Mapping[str, dict] | None = None,
) -> nbformat.NotebookNode:
    """The downloadable form of an executed chapter (a new notebook; ``executed`` is untouched).

    ``glued``: glue values MyST-NB took out of the notebook (``glue(..., display=False)`` outputs
    are removed from ``jupyter_execute/<chapter>.ipynb`` and kept in ``<chapter>.glue.json``, see
    :func:`glue_cache`); values still in the notebook's outputs are found there.
    """
    glued = {**glued_values(executed), **(glued or {})}
    markdown = MarkdownConverter(glued, titles, citation)
    nb = copy.deepcopy(executed)
    nb.metadata = nbformat.NotebookNode(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
    )
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode({"tags": cell.metadata["tags"]} if cell.metadata.get("tags") else {})
        if cell.cell_type == "markdown":
            cell.source = markdown.convert(cell.source)
        elif cell.cell_type == "code":
            cell.source = GLUE_IMPORT.sub(GLUE_REPLACEMENT, cell.source)
            cell.outputs = clean_outputs(cell, glued)
            for output in cell.outputs:
                if output.output_type in ("display_data", "execute_result") and "text/markdown" in output.data:
                    output.data["text/markdown"] = markdown.convert(output.data["text/markdown"])
    nb = with_setup_cell(nb, repository_url)
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:03d}"
    nbformat.validate(nb)
    return nb


def leftover_myst(nb: nbformat.NotebookNode) -> list[str]:
    """MyST syntax a clean notebook still shows as raw text (empty list: none)."""
    problems = []
    for index, cell in enumerate(nb.cells):
        texts = [cell.source] if cell.cell_type == "markdown" else [
            o.data["text/markdown"] for o in cell.get("outputs", []) if "text/markdown" in o.get("data", {})]
        for text in texts:
            for pattern in (ROLE, re.compile(r"^(:{3,}|`{3,})\{", re.MULTILINE)):
                found = pattern.search(text)
                if found:
                    problems.append(f"cell {index}: {found.group(0)!r}")
    return problems
