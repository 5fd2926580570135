"""Which course notebook a submission is, and the two copies the grader runs.

* the **learner copy**: the learner's cells, in their order, with every graded cell taken
  from the generated exercises notebook and its ``check(...)`` call rewritten into
  :func:`~attribution_course.grading.checks.submit` without ``expected=`` (the learner's
  kernel never receives the reference value);
* the **reference copy**: the solutions notebook with each ``check(...)`` rewritten into
  :func:`~attribution_course.grading.checks.record_reference` (only the expected value
  and the tolerances), run in a separate process.

Nothing read from a submission is trusted: every field may be missing or of the wrong
type, and text may hold lone surrogates.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .generation import _CHECK_CALL, GRADED_TAG, KERNELSPEC, METADATA_KEY, NBVAL_CHECK_TAG, NOTEBOOK_STEMS, NotebookFormatError, read_notebook

_NBVAL_TAGS = {NBVAL_CHECK_TAG, "nbval-ignore-output", "nbval-skip", "nbval-raises-exception", "raises-exception"}
_SUBMIT = "_grader_submit"
_RECORD = "_grader_record_reference"
_SUBMIT_IMPORT = f"from attribution_course.grading.checks import submit as {_SUBMIT}\n"
_RECORD_IMPORT = f"from attribution_course.grading.checks import record_reference as {_RECORD}\n"
_COMPARISON_KEYWORDS = ("expected", "atol", "rtol", "what")


@dataclass(frozen=True)
class ReferenceExercise:
    id: str
    name: str
    points: int
    cell: nbformat.NotebookNode  # the graded cell of the generated exercises notebook


# ---------------------------------------------------------------- untrusted fields


def text_of(value) -> str:
    """A cell's source (or any text field) as a str that can be written as UTF-8."""
    if isinstance(value, list):
        value = "".join(v for v in value if isinstance(v, str))
    if not isinstance(value, str):
        return ""
    return value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def cells_of(nb) -> list[dict]:
    cells = _dict(nb).get("cells")
    return [c for c in cells if isinstance(c, dict)] if isinstance(cells, list) else []


def tags_of(cell: dict) -> list[str]:
    tags = _dict(cell.get("metadata")).get("tags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def exercise_id_of(cell: dict) -> str | None:
    """The exercise a cell is the graded cell of, by its metadata (as generated)."""
    if cell.get("cell_type") != "code" or GRADED_TAG not in tags_of(cell):
        return None
    exercise = _dict(_dict(cell.get("metadata")).get(METADATA_KEY)).get("exercise")
    return exercise if isinstance(exercise, str) else None


def checked_exercise(cell: dict) -> str | None:
    """The exercise a code cell's ``check("N.M", ...)`` call names, if any."""
    if cell.get("cell_type") != "code":
        return None
    found = _CHECK_CALL.search(text_of(cell.get("source")))
    return found.group(1) if found else None


# ---------------------------------------------------------------- which notebook


def stem_of_chapter(exercise_id: str) -> str | None:
    chapter = exercise_id.split(".")[0]
    return next((s for s in NOTEBOOK_STEMS if chapter.isdigit() and int(s[:2]) == int(chapter)), None)


def identify(nb, path: Path) -> tuple[str | None, str]:
    """``(stem, note)``: which course notebook this is, judged by its content (notebook
    metadata, then the exercises its cells check) before its file name; the note says
    when the file name names another chapter."""
    by_name = [s for s in NOTEBOOK_STEMS if s in path.name]
    name_stem = by_name[0] if len(by_name) == 1 else None
    meta = _dict(_dict(_dict(nb).get("metadata")).get(METADATA_KEY)).get("notebook")
    content_stem = meta if isinstance(meta, str) and meta in NOTEBOOK_STEMS else None
    if content_stem is None:
        chapters = Counter(
            stem_of_chapter(ex) for cell in cells_of(nb) if (ex := exercise_id_of(cell) or checked_exercise(cell))
        )
        chapters.pop(None, None)
        content_stem = chapters.most_common(1)[0][0] if chapters else None
    stem = content_stem or name_stem
    note = ""
    if content_stem and name_stem and content_stem != name_stem:
        note = f"this is the {content_stem} notebook saved as {path.name}; it was graded as {content_stem}"
    return stem, note


def load_reference(stem: str, exercises_dir: Path) -> list[ReferenceExercise]:
    """The graded cells of the generated exercises notebook ``stem``."""
    path = exercises_dir / f"{stem}.ipynb"
    nb = read_notebook(path)
    exercises = []
    for cell in nb.cells:
        if cell.cell_type == "code" and GRADED_TAG in cell.metadata.get("tags", []):
            meta = cell.metadata[METADATA_KEY]
            exercises.append(ReferenceExercise(meta["exercise"], meta["name"], int(meta["points"]), cell))
    if not exercises:
        raise NotebookFormatError(f"{path}: reference notebook has no graded cells")
    return exercises


# ---------------------------------------------------------------- rewriting the check call


def rewrite_check(source: str, *, exercise: str, name: str, learner: bool) -> str:
    """The graded cell ``source`` with its ``check(...)`` call replaced.

    learner=True: ``submit(exercise, function, *args, name=name, **other keywords)``, i.e.
    without ``expected``/``atol``/``rtol``/``what``; learner=False:
    ``record_reference(exercise, expected=..., atol=..., rtol=..., what=..., name=name)``.
    """
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "check"]
    if len(calls) != 1:
        raise NotebookFormatError(f"graded cell of exercise {exercise}: expected one check(...) call, found {len(calls)}")
    call = calls[0]
    name_keyword = ast.keyword("name", ast.Constant(name))
    if learner:
        keywords = [k for k in call.keywords if k.arg not in (*_COMPARISON_KEYWORDS, "name")]
        new = ast.Call(ast.Name(_SUBMIT), [ast.Constant(exercise), *call.args[1:]], [*keywords, name_keyword])
    else:
        keywords = [k for k in call.keywords if k.arg in _COMPARISON_KEYWORDS]
        new = ast.Call(ast.Name(_RECORD), [ast.Constant(exercise)], [*keywords, name_keyword])
    return (_SUBMIT_IMPORT if learner else _RECORD_IMPORT) + _replace_call(source, call, ast.unparse(new))


def _replace_call(source: str, call: ast.Call, text: str) -> str:
    """``source`` with the expression of ``call`` replaced by ``text``."""
    data = source.encode("utf-8")  # ast offsets are in UTF-8 bytes
    lines = data.split(b"\n")
    start = sum(len(l) + 1 for l in lines[: call.lineno - 1]) + call.col_offset
    end = sum(len(l) + 1 for l in lines[: call.end_lineno - 1]) + call.end_col_offset
    return (data[:start] + text.encode("utf-8") + data[end:]).decode("utf-8")


def without_submit(source: str) -> str:
    """A learner copy's graded cell with its ``submit(...)`` call replaced by ``None``: what the cell
    defines for later cells (``means = ...``) without calling the learner's function again."""
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == _SUBMIT]
    return _replace_call(source, calls[0], "None") if calls else source


def submitted_line(exercise: str, name: str) -> str:
    return f"ex {exercise} {name}: submitted for grading\n"


def reference_line(exercise: str) -> str:
    return f"ex {exercise}: reference recorded\n"


def _graded_cell(source: str, meta: dict, output_text: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source=source)
    cell.metadata = nbformat.NotebookNode(tags=[GRADED_TAG, NBVAL_CHECK_TAG], **{METADATA_KEY: dict(meta)})
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output_text)]
    cell.execution_count = 1  # nbval silently skips a cell without one
    return cell


def _new_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


# ---------------------------------------------------------------- the two copies


def prepare_learner_copy(learner, reference: list[ReferenceExercise]) -> tuple[nbformat.NotebookNode, dict[int, str], list[str]]:
    """The notebook nbval runs for a learner, its graded code-cell numbers ``{nbval cell
    number: exercise}``, and the exercises whose graded cell the learner deleted.

    A graded cell is found by its metadata; without any, by the last cell calling
    ``check("N.M", ...)`` (so a learner's own check call above the solution does not take
    its place). If the learner changed a graded cell (say, wrote the solution into it),
    their version runs first as an ordinary cell, then the graded one.
    """
    by_id = {r.id: r for r in reference}
    cells = cells_of(learner)
    slot: dict[str, int] = {}
    for index, cell in enumerate(cells):
        exercise = exercise_id_of(cell)
        if exercise in by_id and exercise not in slot:
            slot[exercise] = index
    for index, cell in enumerate(cells):
        exercise = checked_exercise(cell)
        if exercise in by_id and not any(exercise_id_of(c) == exercise for c in cells):
            slot[exercise] = index  # the last one wins
    graded_at = {index: exercise for exercise, index in slot.items()}

    nb = _new_notebook()
    for index, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        source = text_of(cell.get("source"))
        exercise = graded_at.get(index)
        if exercise is None or source.strip() != by_id[exercise].cell.source.strip():
            learner_cell = nbformat.v4.new_code_cell(source=source)
            # a copy of a graded cell (Jupyter copies its tags) is the learner's cell, not a graded one
            tags = [t for t in tags_of(cell) if t not in _NBVAL_TAGS | {GRADED_TAG}]
            if tags:
                learner_cell.metadata["tags"] = tags
            nb.cells.append(learner_cell)
        if exercise is not None:
            nb.cells.append(_learner_graded_cell(by_id[exercise]))
    missing = [r.id for r in reference if r.id not in slot]
    for exercise in missing:
        nb.cells.append(_learner_graded_cell(by_id[exercise]))
    graded = {number: cell.metadata[METADATA_KEY]["exercise"]
              for number, cell in enumerate(nb.cells) if GRADED_TAG in cell.metadata.get("tags", [])}
    return nb, graded, missing


def _learner_graded_cell(ref: ReferenceExercise) -> nbformat.NotebookNode:
    source = rewrite_check(ref.cell.source, exercise=ref.id, name=ref.name, learner=True)
    return _graded_cell(source, ref.cell.metadata[METADATA_KEY], submitted_line(ref.id, ref.name))


def restart_copy(
    nb: nbformat.NotebookNode, graded: dict[int, str], stop: int, done: set[str], dropped: set[int] = frozenset(),
) -> tuple[nbformat.NotebookNode, dict[int, str]]:
    """A learner copy to run in a fresh kernel after cell ``stop`` of ``nb`` killed or hung the kernel.

    Every cell runs again in its order (the setup and the learner's definitions), except: the
    cells in ``dropped`` and cell ``stop`` itself are left out (a graded one keeps what it defines,
    without its ``submit`` call), and so are the ``submit`` calls of exercises already graded
    (``done``). Returns the copy and its graded cells ``{cell number: exercise}``.
    """
    copy = _new_notebook()
    for number, cell in enumerate(nb.cells):
        exercise = graded.get(number)
        if exercise is None and (number == stop or number in dropped):
            continue
        if exercise is not None and (number == stop or exercise in done):
            copy.cells.append(nbformat.v4.new_code_cell(source=without_submit(cell.source)))
            continue
        copy.cells.append(nbformat.from_dict(cell))
    numbers = {number: cell.metadata[METADATA_KEY]["exercise"]
               for number, cell in enumerate(copy.cells) if GRADED_TAG in cell.metadata.get("tags", [])}
    return copy, numbers


def prepare_reference_copy(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The solutions notebook with each check call recording the reference instead."""
    nb = _new_notebook()
    for cell in solution.cells:
        if cell.cell_type != "code":
            continue
        if GRADED_TAG in cell.metadata.get("tags", []):
            meta = cell.metadata[METADATA_KEY]
            source = rewrite_check(cell.source, exercise=meta["exercise"], name=meta["name"], learner=False)
            nb.cells.append(_graded_cell(source, meta, reference_line(meta["exercise"])))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source=cell.source))
    return nb


def writable_text(text: str) -> str:
    """Any text (a detail, a path) as something a CSV or terminal in UTF-8 accepts."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "?", text_of(text))
