"""Submissions built from the course's own notebooks, for the grader's tests and its scale measurement.

A learner notebook is the generated exercises notebook with some stubs replaced: by the
solution's own lines (a correct answer) or by given lines (a mistake, a cheat, a slow answer).
"""

from __future__ import annotations

import nbformat

from . import generation as ex


def solution_bodies(stem: str) -> dict[int, list[str]]:
    """The lines between the solution markers, by cell index."""
    solution = ex.read_notebook(ex.solution_path(stem))
    bodies = {}
    for index, cell in enumerate(solution.cells):
        if cell.cell_type == "code" and ex.BEGIN_SOLUTION in cell.source:
            begin, end, _ = ex._solution_region(cell.source, f"{stem} cell {index}")
            bodies[index] = cell.source.split("\n")[begin + 1 : end]
    return bodies


def exercise_cells(stem: str) -> dict[str, int]:
    """Exercise id -> index of its solution cell (the same index in both notebooks)."""
    solution = ex.read_notebook(ex.solution_path(stem))
    return {e.id: e.solution_cell for e in ex.parse_exercises(solution, stem)}


def learner_notebook(stem: str, answers: dict[str, list[str] | None]) -> nbformat.NotebookNode:
    """The generated exercises notebook with the stub of each exercise in ``answers``
    replaced by the given lines (``None``: the solution's own lines)."""
    nb = ex.read_notebook(ex.exercise_path(stem))
    bodies, cells = solution_bodies(stem), exercise_cells(stem)
    for ex_id, lines in answers.items():
        index = cells[ex_id]
        source = nb.cells[index].source.split("\n")
        stub_lines = [i for i, line in enumerate(source) if line.strip() == ex.STUB]
        assert len(stub_lines) == 1, f"{stem} exercise {ex_id}: expected one stub line"
        stub = stub_lines[0]
        indent = source[stub][: len(source[stub]) - len(source[stub].lstrip())]
        if lines is None:
            new = bodies[index]
        else:
            new = [indent + line for line in lines]
        nb.cells[index].source = "\n".join(source[:stub] + new + source[stub + 1 :])
    return nb


def filled(stem: str) -> nbformat.NotebookNode:
    """Every stub replaced by its solution."""
    return learner_notebook(stem, {e: None for e in exercise_cells(stem)})
