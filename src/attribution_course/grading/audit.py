"""``--audit``: flag submissions that call the package's reference implementations or run
the published solutions.

An open course cannot prevent either (the package and the solutions are public), but an
instructor should see it. The check is static (no learner code runs): the reference
implementations are the package functions the chapter's graded cells call to compute
expected values; a finding is any call to one of them inside a learner's exercise
function, and any mention of the solution notebooks or their book pages.
"""

from __future__ import annotations

import ast
import re

from .notebooks import ReferenceExercise, cells_of, exercise_id_of, text_of

_PACKAGE_MODULES = ("patching", "corrections", "metrics", "reference_answers")
_SOLUTIONS = re.compile(r"(solutions|appendix)/\d\d_\w+|attribution_course\.grading\.generation|BEGIN SOLUTION")


def _parse(source: str) -> ast.Module | None:
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return ast.parse(TransformerManager().transform_cell(source))
    except Exception:  # noqa: BLE001 - a cell that does not parse cannot call anything
        return None


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _PACKAGE_MODULES:
        return f"{func.value.id}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return None


def reference_implementations(exercises_nb, reference: list[ReferenceExercise], solution_nb=None) -> set[str]:
    """``module.function`` (or an imported bare name) the graded cells call: the reference
    implementations, less the helpers the published solutions themselves call."""
    imported = set()
    for cell in cells_of(exercises_nb):
        tree = _parse(text_of(cell.get("source"))) if cell.get("cell_type") == "code" else None
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attribution_course"):
                imported |= {alias.asname or alias.name for alias in node.names}
    names = set()
    for ref in reference:
        tree = _parse(ref.cell.source)
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Call) and (name := _called_name(node)):
                if "." in name or name in imported - {"check"}:
                    names.add(name)
    if solution_nb is not None:
        for calls in _exercise_function_calls(solution_nb, reference):
            for called in calls.values():
                names -= called
    return names


def _exercise_function_calls(nb, reference: list[ReferenceExercise]) -> list[dict[str, set[str]]]:
    """Per code cell: ``{exercise function name: names it calls}``."""
    functions = {r.name for r in reference}
    found = []
    for cell in cells_of(nb):
        tree = _parse(text_of(cell.get("source"))) if cell.get("cell_type") == "code" and not exercise_id_of(cell) else None
        calls = {}
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.FunctionDef) and node.name in functions:
                calls[node.name] = {n for c in ast.walk(node) if isinstance(c, ast.Call) and (n := _called_name(c))}
        found.append(calls)
    return found


def audit_notebook(learner, reference: list[ReferenceExercise], implementations: set[str]) -> list[str]:
    """Findings for one submission (empty: nothing to look at)."""
    ids = {r.name: r.id for r in reference}
    findings = []
    for cell in cells_of(learner):
        source = text_of(cell.get("source")) if cell.get("cell_type") == "code" and not exercise_id_of(cell) else ""
        if _SOLUTIONS.search(source):
            findings.append(f"a cell mentions the published solutions: {_SOLUTIONS.search(source).group(0)!r}")
    for calls in _exercise_function_calls(learner, reference):
        for function, called in calls.items():
            if called & implementations:
                findings.append(f"exercise {ids[function]} `{function}` calls the reference implementation "
                                f"{', '.join(sorted(called & implementations))}")
    return findings
