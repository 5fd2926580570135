"""One source of truth for the graded exercises: solutions/ -> exercises/ and the book.

``solutions/NN_name.ipynb`` are the only hand-written notebooks. Each exercise in
them is a run of cells::

    markdown   "## Exercise 3.2: `name`" + "Difficulty: 🔴🔴⚪ · Importance: 🔵🔵🔵" + statement
    code       the function, its body between ``### BEGIN SOLUTION`` and ``### END SOLUTION``
    markdown   one or more hints, each folded in ``<details><summary>Hint</summary> ... </details>``
    code       the graded check, tagged ``graded``: ``check("3.2", name, ..., expected=...)``

Commands (``python -m attribution_course.exercises COMMAND``):

``generate``
    re-execute every solution notebook (fresh kernel, fixed seeds) to refresh its
    stored outputs, then write ``exercises/NN_name.ipynb`` from it: solution bodies
    become ``raise NotImplementedError(...)``, hints stay, and no cell keeps an output
    (a learner's notebook never shows a verdict or a value it has not computed itself;
    the grader takes its reference from a run of ``solutions/``, see ``grader.py``).
    Both notebooks open with the set-up cell of :mod:`attribution_course.notebook_setup`
    (it installs the course package where it is missing), written for the repository URL
    of ``book/_config.yml``.
``check``
    fail (exit 1) if a solution notebook is malformed or unexecuted, or if any
    exercise notebook differs from what ``generate`` would write now.
``sync-book``
    write ``book/appendix/NN_name.ipynb`` (the solutions, rendered without
    re-execution) and ``book/downloads/NN_name.ipynb`` (the learner notebooks, their
    set-up cell written for the repository URL in force, ``COURSE_REPOSITORY_URL`` included).

nbval runs in lax mode: only cells tagged ``nbval-check-output`` (the graded ones,
tagged by this module) are compared with their stored output; every other cell only
has to run. Only ``solutions/`` stores those outputs; the grader writes its own into the
copies it runs (``notebooks.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ..notebook_setup import SETUP_TAG, course_repository_url, is_setup_cell, with_setup_cell

REPO_ROOT = Path(__file__).resolve().parents[3]
SOLUTIONS_DIR = REPO_ROOT / "solutions"
EXERCISES_DIR = REPO_ROOT / "exercises"
BOOK_DIR = REPO_ROOT / "book"

NOTEBOOK_STEMS: tuple[str, ...] = (
    "02_task_and_metric",
    "03_exact_ablation",
    "04_activation_patching",
    "05_first_order_approximation",
    "06_getting_the_sign_right",
    "07_mean_ablation_and_baselines",
    "08_when_the_approximation_fails",
)

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
GRADED_TAG = "graded"
NBVAL_CHECK_TAG = "nbval-check-output"
METADATA_KEY = "attribution_course"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
STUB = 'raise NotImplementedError("replace this line with your solution")'

_HEADING = re.compile(r"^##\s+Exercise\s+(\d+\.\d+):\s*`?([A-Za-z_][A-Za-z0-9_]*)`?", re.MULTILINE)
_DIFFICULTY = re.compile(r"Difficulty:\s*([🔴⚪]{3})")
_IMPORTANCE = re.compile(r"Importance:\s*([🔵⚪]{3})")
_CHECK_CALL = re.compile(r"\bcheck\(\s*\"(\d+\.\d+)\"")


class NotebookFormatError(ValueError):
    """A solution or learner notebook does not have the expected structure; the message names it."""


@dataclass(frozen=True)
class Exercise:
    id: str  # "3.2"
    name: str  # the function the learner writes
    points: int  # difficulty: number of 🔴
    statement_cell: int  # indices into notebook.cells
    solution_cell: int
    check_cell: int


# ---------------------------------------------------------------- structure


def parse_exercises(nb: nbformat.NotebookNode, where: str | Path) -> list[Exercise]:
    """The exercises of a solution notebook, validated; errors name ``where`` and the cell."""
    starts = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and _HEADING.search(c.source)]
    if not starts:
        raise NotebookFormatError(f"{where}: no '## Exercise N.M: `name`' heading found")
    exercises = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(nb.cells)
        statement = nb.cells[start].source
        ex_id, name = _HEADING.search(statement).groups()
        difficulty, importance = _DIFFICULTY.search(statement), _IMPORTANCE.search(statement)
        if not difficulty or not importance:
            raise NotebookFormatError(
                f"{where}: cell {start} (exercise {ex_id}) needs 'Difficulty: 🔴⚪⚪' and 'Importance: 🔵⚪⚪' markers"
            )
        span = range(start + 1, end)
        solutions = [i for i in span if nb.cells[i].cell_type == "code" and BEGIN_SOLUTION in nb.cells[i].source]
        checks = [i for i in span if nb.cells[i].cell_type == "code" and _CHECK_CALL.search(nb.cells[i].source)]
        hints = [i for i in span if nb.cells[i].cell_type == "markdown" and "<details>" in nb.cells[i].source]
        if len(solutions) != 1:
            raise NotebookFormatError(
                f"{where}: exercise {ex_id} (cells {start}-{end - 1}) needs exactly one code cell with "
                f"'{BEGIN_SOLUTION}', found {len(solutions)}"
            )
        if len(checks) != 1:
            raise NotebookFormatError(
                f"{where}: exercise {ex_id} (cells {start}-{end - 1}) needs exactly one graded cell calling "
                f'check("{ex_id}", ...), found {len(checks)}'
            )
        check_id = _CHECK_CALL.search(nb.cells[checks[0]].source).group(1)
        if check_id != ex_id:
            raise NotebookFormatError(f"{where}: cell {checks[0]} checks exercise {check_id} under heading {ex_id}")
        if not hints or not solutions[0] < hints[0] < checks[0]:
            raise NotebookFormatError(
                f"{where}: exercise {ex_id} needs a hint cell (<details>) between its solution and its check"
            )
        _solution_region(nb.cells[solutions[0]].source, f"{where}: cell {solutions[0]}")
        exercises.append(Exercise(ex_id, name, difficulty.group(1).count("🔴"), start, solutions[0], checks[0]))
    ids = [e.id for e in exercises]
    if len(set(ids)) != len(ids):
        raise NotebookFormatError(f"{where}: duplicate exercise ids {ids}")
    return exercises


def _solution_region(source: str, where: str) -> tuple[int, int, str]:
    """Line numbers of the BEGIN and END markers and the BEGIN marker's indentation."""
    lines = source.split("\n")
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_SOLUTION]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_SOLUTION]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise NotebookFormatError(f"{where}: needs one '{BEGIN_SOLUTION}' line followed by one '{END_SOLUTION}' line")
    indent = lines[begins[0]][: len(lines[begins[0]]) - len(lines[begins[0]].lstrip())]
    return begins[0], ends[0], indent


def strip_solution(source: str, where: str) -> str:
    """Replace everything from ``### BEGIN SOLUTION`` to ``### END SOLUTION`` by the stub."""
    begin, end, indent = _solution_region(source, where)
    lines = source.split("\n")
    return "\n".join(lines[:begin] + [indent + STUB] + lines[end + 1 :])


def exercise_metadata(exercise: Exercise) -> dict:
    return {"exercise": exercise.id, "name": exercise.name, "points": exercise.points}


# ---------------------------------------------------------------- canonical form


def canonicalize(
    nb: nbformat.NotebookNode, stem: str, where: str | Path, repository_url: str | None = None,
) -> nbformat.NotebookNode:
    """The solution notebook in canonical form (a new object; ``nb`` is untouched).

    Fixed kernelspec, no tool metadata (jupytext, timings), deterministic cell ids,
    the set-up cell for ``repository_url`` (default: the one of ``book/_config.yml``) before
    the first code cell, graded cells tagged for nbval and labelled with their exercise, no
    stderr outputs (progress bars carry timings), no cell metadata except tags and ours.
    """
    nb = with_setup_cell(copy.deepcopy(nb), committed_repository_url() if repository_url is None else repository_url)
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.NotebookNode(
        kernelspec=dict(KERNELSPEC),
        language_info={"name": "python"},
        **{METADATA_KEY: {"notebook": stem}},
    )
    exercises = {e.check_cell: e for e in parse_exercises(nb, where)}
    for index, cell in enumerate(nb.cells):
        tags = [t for t in cell.metadata.get("tags", []) if t not in (GRADED_TAG, NBVAL_CHECK_TAG)]
        cell.metadata = nbformat.NotebookNode()
        cell.id = f"cell-{index:03d}"
        if cell.cell_type == "code":
            cell.outputs = _merge_streams(o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr"))
        if index in exercises:
            tags += [GRADED_TAG, NBVAL_CHECK_TAG]
            cell.metadata[METADATA_KEY] = exercise_metadata(exercises[index])
        if tags:
            cell.metadata["tags"] = tags
    return nb


def committed_repository_url() -> str:
    """The repository URL of ``book/_config.yml`` alone: committed notebooks depend only on
    committed settings (``COURSE_REPOSITORY_URL`` is for the book's downloads, see sync-book)."""
    return course_repository_url(environ={})


def _merge_streams(outputs) -> list:
    """Join consecutive pieces of one stream: the kernel may split a print at random."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output.output_type == "stream" and previous is not None
            and previous.output_type == "stream" and previous.name == output.name
        ):
            previous.text = previous.text + output.text
        else:
            merged.append(output)
    return merged


def make_exercise_notebook(solution: nbformat.NotebookNode, stem: str, where: str | Path) -> nbformat.NotebookNode:
    """The learner notebook: stubs for solutions, and no outputs at all.

    A stored output would show a verdict (``PASSED``) or a value under a stub the learner
    has not solved; the grader keeps its reference outputs to itself. Difficulty and
    importance are spelled out in words (:func:`spell_out_ratings`), as on the appendix pages.
    """
    nb = copy.deepcopy(solution)
    parse_exercises(nb, where)  # a malformed solution notebook is reported here, naming the cell
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = spell_out_ratings(cell.source)
        if cell.cell_type != "code":
            continue
        if BEGIN_SOLUTION in cell.source:
            cell.source = strip_solution(cell.source, f"{where}: cell {index}")
        cell.outputs = []
        cell.execution_count = None
    return nb


#: What a verdict line of ``check()`` looks like (``ex 3.2 name: PASSED``, ``WRONG``, ``NOT ATTEMPTED``).
_VERDICT = re.compile(r"\bex \d+\.\d+ \S+: (PASSED|WRONG|NOT ATTEMPTED)")


def stored_outputs(nb) -> list[str]:
    """Problems: each code cell of a learner notebook that stores an output, naming the cell
    and quoting a verdict when the output holds one (empty list: no outputs)."""
    problems = []
    for index, cell in enumerate(nb.get("cells", [])):
        outputs = cell.get("outputs") or []
        if cell.get("cell_type") != "code" or not (outputs or cell.get("execution_count") is not None):
            continue
        verdict = _VERDICT.search(json.dumps(outputs, default=str))
        problems.append(f"cell {index} stores {len(outputs)} output(s) (execution count {cell.get('execution_count')})"
                        + (f", among them the verdict {verdict.group(0)!r}" if verdict else ""))
    return problems


def spell_out_ratings(markdown: str) -> str:
    """Difficulty and importance markers with their meaning in words, for screen readers.

    "Difficulty: 🔴🔴⚪" reads aloud as "large red circle, large red circle, medium white
    circle"; it becomes "Difficulty: 2 of 3 🔴🔴⚪" with the circles hidden from assistive
    technology (``aria-hidden``). Text without markers is returned unchanged.
    """
    def spelled(match: re.Match, filled: str) -> str:
        word, circles = match.group(0).split(":")[0], match.group(1)
        return f'{word}: {circles.count(filled)} of {len(circles)} <span aria-hidden="true">{circles}</span>'

    markdown = _DIFFICULTY.sub(lambda m: spelled(m, "🔴"), markdown)
    return _IMPORTANCE.sub(lambda m: spelled(m, "🔵"), markdown)


def make_appendix_notebook(solution: nbformat.NotebookNode, stem: str) -> nbformat.NotebookNode:
    """The solution as a book page: a 'Solutions' title, a link back to its chapter, a note,
    difficulty and importance in words (:func:`spell_out_ratings`), solution code folded."""
    nb = copy.deepcopy(solution)
    first = nb.cells[0]
    lines = first.source.split("\n")
    title = lines[0].replace("# Exercises", "# Solutions", 1) if lines[0].startswith("# ") else f"# Solutions: {stem}"
    nb.cells = [cell for cell in nb.cells if not is_setup_cell(cell)]  # the book's own kernel has the package
    note = (
        f"This page is the **reference solution** of the exercises notebook `{stem}.ipynb` "
        f"({{download}}`download the exercises <../downloads/{stem}.ipynb>`). The solution code is "
        "folded under each exercise; the outputs are the ones stored in `solutions/"
        f"{stem}.ipynb`, and `make test` re-runs that notebook with nbval to prove they are current. "
        "Try the exercises before you unfold an answer."
    )
    back = f"These exercises belong to the chapter {{doc}}`/{stem}`: read it first."
    first.source = "\n".join([title, "", back, "", "```{note}", note, "```", *lines[1:]])
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = spell_out_ratings(cell.source)
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            tags = cell.metadata.setdefault("tags", [])
            tags.append("hide-input")
    return nb


# ---------------------------------------------------------------- files


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read a notebook, raising ``NotebookFormatError`` naming ``path`` if it cannot be read."""
    try:
        return nbformat.read(str(path), as_version=4)
    except FileNotFoundError:
        raise NotebookFormatError(f"{path}: no such file") from None
    except Exception as err:  # nbformat raises JSON, validation and unicode errors
        raise NotebookFormatError(f"{path}: not a readable notebook ({type(err).__name__}: {err})") from err


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """The exact text a notebook is written as (so 'differs' means byte-different)."""
    return nbformat.writes(nb, version=4) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def execute(nb: nbformat.NotebookNode, *, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run ``nb`` top to bottom in a fresh ``python3`` kernel; stop at the first error."""
    from nbclient import NotebookClient

    # the kernel inherits this; one thread is faster for the tiny model than several spin-waiting
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNELSPEC["name"], record_timing=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb


def solution_path(stem: str) -> Path:
    return SOLUTIONS_DIR / f"{stem}.ipynb"


def exercise_path(stem: str) -> Path:
    return EXERCISES_DIR / f"{stem}.ipynb"


def available_stems() -> list[str]:
    return [s for s in NOTEBOOK_STEMS if solution_path(s).exists()]


def generate(stems: list[str], *, run: bool = True) -> None:
    for stem in stems:
        path = solution_path(stem)
        nb = read_notebook(path)
        if run:
            start = time.monotonic()
            nb = execute(canonicalize(nb, stem, path), cwd=SOLUTIONS_DIR)
            print(f"executed {path.relative_to(REPO_ROOT)} in {time.monotonic() - start:.1f} s", flush=True)
        solution = canonicalize(nb, stem, path)
        write_if_changed(path, notebook_text(solution))
        exercise = make_exercise_notebook(solution, stem, path)
        changed = write_if_changed(exercise_path(stem), notebook_text(exercise))
        print(f"{'wrote' if changed else 'unchanged'} {exercise_path(stem).relative_to(REPO_ROOT)}")


def check(stems: list[str]) -> list[str]:
    """Problems: missing, malformed, unexecuted or stale notebooks (empty list = all good)."""
    problems = []
    for stem in stems:
        path = solution_path(stem)
        try:
            solution = read_notebook(path)
            canonical = canonicalize(solution, stem, path)
            if notebook_text(canonical) != notebook_text(solution):
                problems.append(f"{path}: not in canonical form; run `python -m attribution_course.exercises generate`")
            unrun = [i for i, c in enumerate(solution.cells) if c.cell_type == "code" and c.execution_count is None]
            if unrun:
                problems.append(f"{path}: code cells {unrun} were never executed; run generate")
            expected = notebook_text(make_exercise_notebook(canonical, stem, path))
        except NotebookFormatError as err:
            problems.append(str(err))
            continue
        target = exercise_path(stem)
        if not target.exists():
            problems.append(f"{target}: missing; run `python -m attribution_course.exercises generate`")
        elif target.read_text(encoding="utf-8") != expected:
            problems.append(f"{target}: differs from what the generator writes from {path}; run generate (never edit it by hand)")
    return problems


def sync_book(stems: list[str]) -> None:
    url = course_repository_url()  # the URL in force for this build: COURSE_REPOSITORY_URL wins
    for stem in NOTEBOOK_STEMS:
        if stem not in stems:  # only while the course is being written: keeps the book's toc valid
            print(f"sync-book: WARNING {solution_path(stem)} does not exist yet; writing a placeholder page")
            placeholder = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
            placeholder.cells = [nbformat.v4.new_markdown_cell(f"# Solutions: {stem}\n\nNot written yet.", id="cell-000")]
            write_if_changed(BOOK_DIR / "appendix" / f"{stem}.ipynb", notebook_text(placeholder))
            write_if_changed(BOOK_DIR / "downloads" / f"{stem}.ipynb", notebook_text(placeholder))
    for stem in stems:
        path = solution_path(stem)
        solution = canonicalize(read_notebook(path), stem, path)
        write_if_changed(BOOK_DIR / "appendix" / f"{stem}.ipynb", notebook_text(make_appendix_notebook(solution, stem)))
        learner = exercise_path(stem)
        nb = read_notebook(learner) if learner.exists() else make_exercise_notebook(solution, stem, path)
        download = with_setup_cell(nb, url)
        for index, cell in enumerate(download.cells):
            cell.id = f"cell-{index:03d}"
        write_if_changed(BOOK_DIR / "downloads" / f"{stem}.ipynb", notebook_text(download))
    print(f"sync-book: wrote book/appendix and book/downloads for {len(stems)} notebook(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attribution_course.exercises", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="re-execute solutions/ and write exercises/ from them")
    gen.add_argument("stems", nargs="*", help=f"notebooks to regenerate (default: all of {', '.join(NOTEBOOK_STEMS)})")
    gen.add_argument("--no-execute", action="store_true", help="reuse the stored solution outputs")
    sub.add_parser("check", help="fail if exercises/ is stale or solutions/ malformed")
    sub.add_parser("sync-book", help="write book/appendix and book/downloads")
    args = parser.parse_args(argv)

    if args.command == "generate":
        unknown = [s for s in args.stems if s not in NOTEBOOK_STEMS]
        if unknown:
            parser.error(f"unknown notebook(s) {unknown}; choose from {', '.join(NOTEBOOK_STEMS)}")
        generate(args.stems or available_stems(), run=not args.no_execute)
        return 0
    if args.command == "check":
        missing = [str(solution_path(s)) for s in NOTEBOOK_STEMS if not solution_path(s).exists()]
        problems = [f"{m}: missing" for m in missing] + check(available_stems())
        for problem in problems:
            print(problem, file=sys.stderr)
        print("exercises check: " + ("FAILED" if problems else f"{len(NOTEBOOK_STEMS)} notebooks up to date"))
        return 1 if problems else 0
    sync_book(available_stems())
    return 0


if __name__ == "__main__":
    sys.exit(main())
