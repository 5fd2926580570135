"""The notebooks a learner downloads run outside the repository, installed the way their first cell says.

A fresh virtual environment gets only a bare Jupyter kernel (ipykernel and nbclient, as Colab or
any Jupyter has). Then, driven by nbclient inside that environment:

1. the downloaded exercise notebook of chapter 2 (``book/downloads``), with every stub replaced by
   the reference solution so that all of it runs: its set-up cell finds no ``attribution_course``
   and installs it, with the model, from ``COURSE_PACKAGE_SOURCE`` = a copy of this checkout
   (the published repository stands in for it: the network is closed here); every check cell
   must then print PASSED;
2. a downloaded chapter notebook (the book's ".ipynb" download of chapter 5), in the environment
   step 1 installed (its set-up cell does nothing there): every cell runs, and its figures carry
   Plotly's JSON, which JupyterLab, Notebook 7 and VS Code draw.

pip installs with the lock as constraints (the versions everyone gets) and takes torch's CPU build
from the same local wheel as ``make venv`` (the machine's pip configuration). Most of the time is
pip installing torch, transformers and the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import pytest

from attribution_course import chapter_notebooks, notebook_setup
from attribution_course.grading import generation as ex
from attribution_course.plots import PLOTLY_MIME
from test_grading import exercise_cells, solution_bodies

pytestmark = pytest.mark.slow

REPO = ex.REPO_ROOT
EXERCISES = "02_task_and_metric"  # the quickest exercise notebook (about 20 s)
CHAPTER = "05_first_order_approximation"  # figures, glued values, a dropdown, citations
BUILT_HTML = REPO / "book" / "_build" / "html"


def downloaded_chapter() -> Path:
    path = BUILT_HTML / "_sources" / f"{CHAPTER}.ipynb"
    if not path.is_file():
        pytest.skip("book not built (make test builds it first)")
    return path


def downloaded_exercises() -> nbformat.NotebookNode:
    path = REPO / "book" / "downloads" / f"{EXERCISES}.ipynb"
    if not path.is_file():  # written by `make book` (sync-book); the same file as exercises/ then
        path = ex.exercise_path(EXERCISES)
    return ex.read_notebook(path)


def with_solutions(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` with each stub replaced by the reference solution's lines."""
    bodies = solution_bodies(EXERCISES)
    for index in exercise_cells(EXERCISES).values():
        lines = nb.cells[index].source.split("\n")
        [stub] = [i for i, line in enumerate(lines) if line.strip() == ex.STUB]
        nb.cells[index].source = "\n".join(lines[:stub] + bodies[index] + lines[stub + 1 :])
    return nb


def published_copy(target: Path) -> Path:
    """What the published repository holds for pip: the package (with its model), pyproject, README."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", target / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)
    return target


EXECUTE = textwrap.dedent("""
    import sys, nbformat
    from nbclient import NotebookClient
    source, target = sys.argv[1:3]
    nb = nbformat.read(source, as_version=4)
    try:
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": sys.argv[3]}}).execute()
    finally:
        nbformat.write(nb, target)
""")


@pytest.fixture(scope="module")
def fresh_environment(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {
        key: value for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "JUPYTER_PATH", "JUPYTER_DATA_DIR")
    }
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", PIP_CONSTRAINT=str(REPO / "requirements.lock"),
        HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYDEVD_DISABLE_FILE_VALIDATION="1",
        JUPYTER_DATA_DIR=str(root / "jupyter-data"),  # no user-level kernel of another environment
        PIP_NO_COMPILE="1",  # compiling torch's and transformers' .py files would double pip's time
        **{notebook_setup.PACKAGE_SOURCE_ENV: str(published_copy(root / "checkout"))},
    )
    # a bare Jupyter: a kernel and a client, no course package
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "ipykernel", "nbclient"], env=env, check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    probe = subprocess.run([str(python), "-c", "import attribution_course"], env=env, capture_output=True)
    assert probe.returncode != 0, "the fresh environment must start without the course package"
    (root / "execute.py").write_text(EXECUTE)
    return root, python, env


def execute(fresh, nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    root, python, env = fresh
    source, target = root / f"{name}.ipynb", root / f"{name}.executed.ipynb"
    nbformat.write(nb, str(source))
    workdir = root / "work"
    workdir.mkdir(exist_ok=True)
    run = subprocess.run([str(python), str(root / "execute.py"), str(source), str(target), str(workdir)],
                         env=env, capture_output=True, text=True, timeout=3000)
    executed = nbformat.read(str(target), as_version=4) if target.exists() else None
    assert run.returncode == 0, f"{name} failed in the fresh environment:\n{run.stderr[-4000:]}"
    return executed


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def test_downloaded_exercise_notebook_installs_the_package_and_passes(fresh_environment):
    executed = execute(fresh_environment, with_solutions(downloaded_exercises()), "exercises")
    [setup_cell] = [c for c in executed.cells if notebook_setup.is_setup_cell(c)]
    assert "Installing the course package" in stdout_of(setup_cell), "the set-up cell did not install the package"
    solution = ex.read_notebook(ex.solution_path(EXERCISES))
    verdicts = [stdout_of(executed.cells[e.check_cell]).strip() for e in ex.parse_exercises(solution, EXERCISES)]
    assert verdicts and all(v.endswith(": PASSED") for v in verdicts), verdicts


def test_downloaded_chapter_notebook_runs_and_its_figures_carry_plotly_json(fresh_environment):
    downloaded = ex.read_notebook(downloaded_chapter())
    check_figures(downloaded, "as downloaded")
    # after the exercise test its set-up cell finds the package; run alone, it installs it
    executed = execute(fresh_environment, downloaded, "chapter")
    check_figures(executed, "after running it")


def check_figures(nb: nbformat.NotebookNode, when: str) -> None:
    figures = [o.data[PLOTLY_MIME] for c in nb.cells if c.cell_type == "code"
               for o in c.outputs if PLOTLY_MIME in o.get("data", {})]
    assert len(figures) >= 2, f"{CHAPTER} {when}: {len(figures)} figures carry {PLOTLY_MIME}"
    for payload in figures:
        assert payload["data"] and all("type" in trace or "x" in trace or "z" in trace for trace in payload["data"])
        go.Figure(payload["data"], payload.get("layout"))  # plotly validates what JupyterLab will draw


def test_downloaded_chapter_notebook_is_plain_jupyter():
    nb = ex.read_notebook(downloaded_chapter())
    assert chapter_notebooks.leftover_myst(nb) == []
    text = json.dumps(nb.cells)
    assert "myst_nb" not in text, "the notebook must not need MyST-NB"
    assert str(REPO) not in text and "/tmp/" not in text, "the build machine's paths leaked into the notebook"
    streams = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"]
    assert all(o.name == "stdout" for o in streams), "stderr of the build is kept"
    assert notebook_setup.is_setup_cell(next(c for c in nb.cells if c.cell_type == "code"))
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "<details><summary><b>Check yourself</b></summary>" in markdown
    assert "[Nanda](https://" in markdown, "citations become linked author names"
