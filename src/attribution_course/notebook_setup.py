"""The set-up cell that opens every learner notebook (exercises and chapters).

It makes a downloaded notebook runnable in Colab, Binder or a bare Jupyter: where the
course package ``attribution_course`` is importable (the course's repository after
``make venv`` / ``make lab``, Binder) it does nothing; otherwise it installs the package,
which ships the course's model, and then the notebook runs as in the repository.

Where it installs from:

* ``COURSE_PACKAGE_SOURCE`` (environment variable of the kernel), when set: any pip
  requirement, e.g. the path of a checkout (``/home/me/attribution-course``); the tests
  install from the local checkout this way, with the network closed;
* otherwise the published repository, the one setting ``course_repository_url`` of
  ``book/_config.yml`` (or ``COURSE_REPOSITORY_URL``; see ``book/_ext/repository_links.py``),
  with torch's CPU build from PyTorch's CPU index (a tenth of the size of the CUDA build);
* with no repository URL set, no URL is made up: the cell stops with an instruction
  (install from a checkout, or set ``COURSE_PACKAGE_SOURCE``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOK_CONFIG = REPO_ROOT / "book" / "_config.yml"
PACKAGE_SOURCE_ENV = "COURSE_PACKAGE_SOURCE"
#: the lock's torch is its CPU build (torch==2.13.0+cpu), which lives on PyTorch's own index
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: tag of the set-up cell (one per notebook, just before the first code cell)
SETUP_TAG = "course-setup"

_HEADER = '''\
# Set-up: lets this notebook run in Colab, Binder or any Jupyter. Where the course package is
# installed (the course's repository after `make lab`, or Binder) it does nothing; elsewhere it
# installs the package, which holds the course's model, {origin}.
import importlib
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("attribution_course") is None:
    source = os.environ.get("{env}")  # a checkout's path or any pip requirement
    command = [sys.executable, "-m", "pip", "install", "--quiet"]
'''
_FROM_REPOSITORY = '''\
    if source:
        command.append(source)
    else:  # torch's CPU build, from PyTorch's index: a tenth of the download of the default build
        command += ["--extra-index-url", "{index}", "attribution-course @ git+{url}"]
'''
_NO_REPOSITORY = '''\
    if not source:
        raise ModuleNotFoundError(
            "This notebook needs the course package attribution_course (it holds the course's model). "
            "In a checkout of the course's repository, run `make lab` there, or `pip install <path of the checkout>` "
            "in this notebook's environment; or set the environment variable {env} to the checkout's path "
            "(or any pip requirement) and run this cell again."
        )
    command.append(source)
'''
_FOOTER = '''\
    print("Installing the course package and its model (a few minutes):", command[-1], flush=True)
    subprocess.check_call(command)
    importlib.invalidate_caches()
'''


def setup_cell_source(repository_url: str) -> str:
    """The set-up cell's code for a course published at ``repository_url`` ('' = not published)."""
    origin = (f"from {repository_url} (or from ${PACKAGE_SOURCE_ENV})" if repository_url
              else f"from ${PACKAGE_SOURCE_ENV}")
    body = (_FROM_REPOSITORY.format(index=TORCH_CPU_INDEX, url=repository_url) if repository_url
            else _NO_REPOSITORY.format(env=PACKAGE_SOURCE_ENV))
    return (_HEADER.format(origin=origin, env=PACKAGE_SOURCE_ENV) + body + _FOOTER).rstrip("\n")


def course_repository_url(environ=os.environ) -> str:
    """The repository URL in force: ``COURSE_REPOSITORY_URL`` in ``environ``, else the book's
    ``course_repository_url`` ('' = none). Pass ``environ={}`` for the committed setting alone."""
    spec = importlib.util.spec_from_file_location(
        "_course_repository_links", REPO_ROOT / "book" / "_ext" / "repository_links.py")
    links = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(links)  # the book's one definition of the setting and its validation
    return links.book_repository_url(BOOK_CONFIG, environ)


def is_setup_cell(cell) -> bool:
    return cell.get("cell_type") == "code" and SETUP_TAG in cell.get("metadata", {}).get("tags", [])


def with_setup_cell(nb: nbformat.NotebookNode, repository_url: str) -> nbformat.NotebookNode:
    """``nb`` (changed in place and returned) with one set-up cell, just before its first code cell.

    A set-up cell already there with the same code is kept as it is (with its execution
    count); one with other code is replaced.
    """
    source = setup_cell_source(repository_url)
    existing = [i for i, cell in enumerate(nb.cells) if is_setup_cell(cell)]
    if len(existing) == 1 and nb.cells[existing[0]].source == source:
        return nb
    nb.cells = [cell for cell in nb.cells if not is_setup_cell(cell)]
    first_code = next((i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"), len(nb.cells))
    cell = nbformat.v4.new_code_cell(source=source)
    cell.metadata["tags"] = [SETUP_TAG]
    nb.cells.insert(first_code, cell)
    return nb
