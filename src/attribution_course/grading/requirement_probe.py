"""Stated requirements (:mod:`.requirements`) checked where the rest of the learner's notebook cannot reach.

In the learner's graded run every cell of the notebook runs, so an earlier cell could replace
whatever would check a requirement there; a value is safe from that (it is compared with a
reference the learner's kernel never sees) but a yes/no requirement is not. So requirements are
observed in a run of their own:

1. **The grader picks the learner's definitions** (:func:`learner_definitions`): from all the
   notebook's code cells, only the imports, functions, classes and constants (assignments
   without a call) that the exercise's function refers to, directly or through each other. No
   other statement of the notebook runs. Code that could reach into the interpreter, the
   process or the grader (``sys``, ``os``, ``gc``, ``threading``, ``getattr``, ``open``,
   ``attribution_course.grading``, any name or attribute with a leading double underscore or an
   attribute with a leading underscore, imports outside ``ALLOWED_IMPORTS``) is refused with a
   message naming it, its cell and its line.
2. **A fresh process in its own sandbox** (:func:`main`) runs the exercises notebook's set-up
   cells (trusted: taken from ``exercises/``, not from the submission), draws the hidden inputs
   and lists the model's parameters, with the C-level accessors of :mod:`.requirements` taken at
   import: all before any learner code exists. Then it defines the picked code and calls the
   function (the requirement's observer). Before writing what it saw it stops every other
   process of its sandbox, and it writes last.
3. **The grader judges** the observations in its own process (the requirement's judge).

What it does not stop: code that gets past the refusal list by another route to the interpreter
(none is known to us, but a list is only a list); the values' own checks and the audit still apply.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .notebooks import cells_of, text_of

#: Modules the picked code may import (and their submodules), besides ``__future__``.
ALLOWED_IMPORTS = frozenset({
    "torch", "numpy", "einops", "fancy_einsum", "jaxtyping", "typing", "typing_extensions", "math", "functools",
    "itertools", "collections", "dataclasses", "transformer_lens", "attribution_course", "tqdm", "re", "string",
    "operator", "contextlib", "random", "statistics", "enum", "abc", "warnings", "__future__",
})
#: Names and attributes the picked code may not use: ways into the interpreter, the process, files or the grader.
REFUSED_NAMES = frozenset({
    "sys", "os", "gc", "inspect", "ctypes", "threading", "multiprocessing", "subprocess", "signal", "builtins",
    "importlib", "eval", "exec", "compile", "getattr", "setattr", "delattr", "globals", "locals", "vars", "open",
    "io", "pathlib", "Path", "shutil", "socket", "pickle", "marshal", "types", "weakref", "atexit", "faulthandler",
    "resource", "runpy", "tempfile", "asyncio", "concurrent", "grading", "overrides", "library", "jit", "breakpoint",
    "get_ipython", "memoryview", "hub",
})
_ALLOWED_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__future__"})
SPEC, RESULT = "probe.json", "observations.json"


class Refused(ValueError):
    """The picked code uses something the probe does not run; the message names it and where."""


@dataclass(frozen=True)
class Statement:
    cell: int  # code cell of the submission, counted from 1
    line: int  # first line in that cell
    node: ast.stmt

    @property
    def text(self) -> str:
        return ast.unparse(self.node)


# ---------------------------------------------------------------- picking the learner's definitions (grader)


def _python_of(source: str) -> str:
    """A cell's source as Python: IPython magics and shell lines become calls (then dropped as statements)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001 - odd text: parse it as it is
        return source


def _kept(node: ast.stmt) -> bool:
    """Imports, definitions and constants: what a notebook defines without computing anything."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names_only = all(isinstance(n, ast.Name) for t in targets for n in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", [t])))
        return names_only and not any(isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr))
                                      for n in ast.walk(node.value))
    return False


def _binds(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name.split(".")[0]) for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _uses(node: ast.stmt) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _statements(notebook) -> list[Statement]:
    statements = []
    code_cells = [c for c in cells_of(notebook) if c.get("cell_type") == "code"]
    for number, cell in enumerate(code_cells, 1):
        try:
            tree = ast.parse(_python_of(text_of(cell.get("source"))))
        except (SyntaxError, ValueError):
            continue  # the graded run reports it; nothing in it can be picked
        statements += [Statement(number, min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node)
                       for node in tree.body if _kept(node)]
    return statements


def learner_definitions(notebook, function: str) -> list[Statement]:
    """The statements of ``notebook`` that ``function`` needs, in notebook order (every binding of a
    needed name is kept: the last one wins when they run, as in the notebook). Raises Refused."""
    statements = _statements(notebook)
    needed, picked = {function}, set()
    while True:
        new = {i for i, s in enumerate(statements) if i not in picked and (_binds(s.node) & needed
                                                                               or isinstance(s.node, ast.ImportFrom) and any(a.name == "*" for a in s.node.names))}
        if not new:
            break
        picked |= new
        for i in new:
            needed |= _uses(statements[i].node)
    chosen = [statements[i] for i in sorted(picked)]
    for statement in chosen:
        _refuse_what_reaches_out(statement)
    return chosen


def _refuse_what_reaches_out(statement: Statement) -> None:
    def refuse(node: ast.AST, what: str) -> None:
        line = getattr(node, "lineno", statement.line)  # the cell was parsed alone: lines are the cell's
        raise Refused(f"code cell {statement.cell}, line {line}: {what}")

    for node in ast.walk(statement.node):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                modules += [f"{node.module}.{a.name}" for a in node.names]
            for module in modules:
                parts = module.split(".")
                if isinstance(node, ast.ImportFrom) and node.level:
                    refuse(node, "a relative import")
                if parts[0] and parts[0] not in ALLOWED_IMPORTS:
                    refuse(node, f"imports {parts[0]}, which the requirement check does not run "
                                 f"(it runs imports of {', '.join(sorted(ALLOWED_IMPORTS - {'__future__'}))})")
                if refused := [p for p in parts if p in REFUSED_NAMES]:
                    refuse(node, f"imports {module}, which the requirement check does not run ({refused[0]})")
        elif isinstance(node, ast.Name) and (node.id in REFUSED_NAMES or _dunder(node.id)):
            refuse(node, f"uses {node.id}, which the requirement check does not run (it could reach into the "
                         "interpreter or the grader); a solution does not need it")
        elif isinstance(node, ast.Attribute) and (node.attr in REFUSED_NAMES or node.attr.startswith("_")
                                                  and node.attr not in _ALLOWED_DUNDERS):
            refuse(node, f"uses .{node.attr}, which the requirement check does not run (it could reach into the "
                         "interpreter or the grader); a solution does not need it")


def _dunder(name: str) -> bool:
    return name.startswith("__") and name not in _ALLOWED_DUNDERS


# ---------------------------------------------------------------- running it (grader side)


def context_cells(exercises_notebook) -> list[str]:
    """The exercises notebook's code cells before its first graded cell: its set-up (trusted)."""
    from .generation import GRADED_TAG

    cells = []
    for cell in exercises_notebook.cells:
        if cell.cell_type != "code":
            continue
        if GRADED_TAG in cell.metadata.get("tags", []):
            break
        cells.append(cell.source)
    return cells


def observe_outside(
    learner, exercises_notebook, functions: dict[str, str], *, timeout: float, cpu_seconds: float,
    sandboxed: bool = True, extra_env: dict[str, str] | None = None,
) -> dict[str, dict | str]:
    """Observe the requirements of ``functions`` (``{exercise: function name}``) in a run of their own.

    Returns, per exercise, the observation (a dict, for the judge) or why there is none (a
    str the learner can act on)."""
    from .runner import _open_regular, run_folder, run_process

    outcome: dict[str, dict | str] = {}
    picked: dict[str, list[Statement]] = {}
    for exercise, function in functions.items():
        try:
            picked[exercise] = learner_definitions(learner, function)
        except Refused as err:
            outcome[exercise] = f"the requirement could not be checked: {err}"
    if not picked:
        return outcome
    # one run for all: every statement any of the functions needs, once, in notebook order
    statements = sorted({(s.cell, s.line): s for ss in picked.values() for s in ss}.values(), key=lambda s: (s.cell, s.line))
    with run_folder() as workdir:
        inside = Path(sandbox.SANDBOX_WORKDIR) if sandboxed else workdir
        spec = {
            "context": context_cells(exercises_notebook),
            "definitions": [[s.cell, s.line, s.text] for s in statements],
            "functions": {exercise: functions[exercise] for exercise in picked},
            "result": str(inside / RESULT),
            "stop_other_processes": sandboxed,  # only in a PID namespace of its own
        }
        (workdir / SPEC).write_text(json.dumps(spec))
        command = [sys.executable, "-m", __name__, str(inside / SPEC)]
        limits = sandbox.Limits(cpu_seconds=int(cpu_seconds))
        returncode, timed_out, output = run_process(command, workdir, env=dict(extra_env or {}), timeout=timeout,
                                                    sandboxed=sandboxed, limits=limits)
        opened = _open_regular(workdir / RESULT)
        observed = {}
        if opened is not None:
            with opened:
                try:
                    observed = json.load(opened)
                except ValueError:
                    observed = {}
    why = (f"did not finish within {timeout:g} s" if timed_out
           else f"stopped without a result (exit code {returncode}; over the CPU-time limit of {cpu_seconds:g} s, "
                "out of memory or sys.exit?)")
    for exercise, function in spec["functions"].items():
        found = observed.get(exercise) if isinstance(observed, dict) else None
        if isinstance(found, dict):
            outcome[exercise] = found
        elif isinstance(found, str):
            outcome[exercise] = f"the requirement could not be checked: {found}"
        else:
            outcome[exercise] = (f"the requirement could not be checked: the run of {function} on its own {why}")
    return outcome


# ---------------------------------------------------------------- the probe process (in the sandbox)


def main(argv: list[str] | None = None) -> int:
    """``python -m attribution_course.grading.requirement_probe SPEC``: see the module's docstring."""
    import torch

    from . import requirements  # its C-level accessors are taken now, before any learner code exists
    from .checks import call_learner_function
    from .hidden import hidden_inputs

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    result_path, stop_others = spec["result"], bool(spec["stop_other_processes"])
    replace, dumps, kill, exit_now = os.replace, json.dumps, os.kill, os._exit

    namespace: dict = {"__name__": "__main__"}
    for source in spec["context"]:  # the course's set-up cells
        exec(compile(source, "<set-up cell>", "exec"), namespace)  # noqa: S102 - trusted, from exercises/
    model = namespace.get("model")
    work = {}
    for exercise, function in spec["functions"].items():  # drawn before any learner code exists
        inputs = hidden_inputs(exercise, model=model)
        work[exercise] = (function, inputs[0] if inputs else (), requirements.parameters_of(inputs[0] if inputs else ()))

    # No file may be written while learner code exists (a written file is a way to run unchecked code:
    # a hubconf.py, a pickle); the probe raises the limit back only to write its own result.
    import resource

    set_limit, fsize = resource.setrlimit, resource.RLIMIT_FSIZE
    soft, hard = resource.getrlimit(fsize)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write then fails with an error instead of killing the probe
    set_limit(fsize, (0, hard))

    observations: dict[str, dict | str] = {}
    problems = []
    for cell, line, text in spec["definitions"]:
        try:
            tree = ast.parse(text)
            ast.increment_lineno(tree, line - 1)
            exec(compile(tree, f"<code cell {cell}>", "exec"), namespace)  # noqa: S102 - the picked definitions
        except Exception as err:  # noqa: BLE001
            problems.append(f"defining code cell {cell}, line {line} raised {type(err).__name__}: {err}")
    for exercise, (function, args, parameters) in work.items():
        learner_function = namespace.get(function)
        if not args:
            observations[exercise] = "no hidden input for this exercise"
        elif not callable(learner_function):
            observations[exercise] = f"the notebook defines no function {function}" + (f" ({problems[0]})" if problems else "")
        else:
            try:
                observations[exercise] = requirements.OBSERVERS[exercise](
                    lambda: _explained(call_learner_function(learner_function, args, {}), problems), parameters)
            except Exception as err:  # noqa: BLE001 - learner code that broke the observer
                observations[exercise] = f"observing {function} raised {type(err).__name__}: {err}"
    text = dumps(observations, default=str)
    if stop_others:
        try:
            kill(-1, signal.SIGKILL)  # every other process of this sandbox's PID namespace, not this one
        except ProcessLookupError:
            pass
    set_limit(fsize, (soft, hard))
    partial = result_path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    replace(partial, result_path)
    exit_now(0)  # nothing of the learner's (threads, atexit handlers) runs after this


def _explained(called: tuple, problems: list[str]) -> tuple:
    """A NameError of a function that needs something the probe did not define, explained."""
    status, value, detail = called
    if "NameError" in detail:
        detail += (" (the requirement check runs your notebook's imports, functions, classes and constants "
                   "without calls, on their own: define what the function needs in one of those)")
    return status, value, detail


if __name__ == "__main__":
    raise SystemExit(main())
