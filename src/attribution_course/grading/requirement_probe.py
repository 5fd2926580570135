"""Stated requirements (:mod:`.requirements`) checked where the rest of the learner's notebook cannot reach.

In the learner's graded run every cell of the notebook runs, so an earlier cell could replace
whatever would check a requirement there; a value is safe from that (it is compared with a
reference the learner's kernel never sees) but a yes/no requirement is not. So requirements are
observed in a run of their own:

1. **The grader picks the learner's definitions** (:func:`learner_definitions`): from the
   notebook's code cells up to the one that grades the exercise (later cells do not count in
   the kernel either), only the imports, functions, classes and constants (assignments without a
   call) that the exercise's function reads as globals, directly or through each other
   (scope-aware, with :mod:`symtable`). No other statement of the notebook runs. It refuses, with
   the cell and line, whatever would let the probe see another function than the one graded: a
   needed name also bound where the probe cannot follow (inside an ``if``/``for``/``try``/``with``
   block, by an assignment that calls something, a walrus, a magic, ``global``), ``globals()``,
   ``exec`` or ``%run`` anywhere, a skipped statement that changes a needed global
   (``FLAGS["detach"] = False``, ``FLAGS.update(...)``) or patches an imported module. And it
   refuses picked code that could reach into the interpreter, the process or the grader
   (``sys``, ``os``, ``gc``, ``getattr``, ``exec`` even as a class attribute, ``open``, pickle
   loaders, ``isinstance`` (jaxtyping evaluates dimension strings there), ``attrgetter``,
   ``bytes.fromhex``, frames and code objects (``f_``, ``gi_``, ``co_``...), ``attribution_course.grading``,
   dunder names and definitions, strings holding ``__``, underscore attributes except
   ``self._x``, a metaclass, changes to an imported module, names only an IPython kernel
   defines, imports outside ``ALLOWED_IMPORTS``).
2. **A fresh process in its own sandbox** (:func:`main`) reads its spec and deletes it (the
   spec's nonce then lives only in this process), runs the exercises notebook's set-up cells
   (trusted: taken from ``exercises/``), draws the hidden input and lists the model's parameters,
   with the C-level accessors of :mod:`.requirements` taken at import: all before any learner
   code exists. Then it defines the picked code and calls the function (the requirement's
   observer), with the file-size limit at zero while learner code exists (no file can be written,
   so none can be imported or unpickled). It stops every other process of its sandbox, writes
   its observations with the nonce, and exits at once.
3. **The grader judges** the observations in its own process (the requirement's judge), and only
   those of a run that exited normally with the right nonce.

What it cannot stop: a function that notices it is being observed through state the probe does
not recreate (a counter of its own calls, an attribute a skipped cell set on the model), or a
route to running code inside the probe that the refusals above miss (the probe's own process
is as exposed to such code as any process; the refusals are a list, reviewed twice, not a
proof). The values' checks on hidden inputs and the audit still apply.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import signal
import symtable
import sys
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .notebooks import cells_of, text_of

#: Modules the picked code may import (and their submodules), besides ``__future__``.
ALLOWED_IMPORTS = frozenset({
    "torch", "numpy", "einops", "fancy_einsum", "jaxtyping", "typing", "typing_extensions", "math", "functools",
    "itertools", "collections", "dataclasses", "transformer_lens", "attribution_course", "tqdm", "re",
    "contextlib", "random", "statistics", "enum", "abc", "warnings", "__future__",
})
#: Global names and attributes the picked code may not use: ways into the interpreter, the process, files,
#: code loaded from data, attributes by name, or the grader.
REFUSED_NAMES = frozenset({
    "sys", "os", "gc", "inspect", "ctypes", "threading", "multiprocessing", "subprocess", "signal", "builtins",
    "importlib", "eval", "exec", "compile", "getattr", "setattr", "delattr", "globals", "locals", "vars", "open",
    "io", "pathlib", "Path", "shutil", "socket", "pickle", "marshal", "types", "weakref", "atexit", "faulthandler",
    "resource", "runpy", "tempfile", "asyncio", "concurrent", "grading", "overrides", "library", "jit", "breakpoint",
    "get_ipython", "memoryview", "hub", "load", "loads", "memmap", "attrgetter", "methodcaller", "Formatter",
    "get_type_hints", "In", "Out", "display", "exit", "quit", "chr", "bytes", "bytearray", "isinstance",
    "issubclass", "jaxtyped", "beartype", "typechecked", "ForwardRef",
})
#: Attributes refused besides those names: routes to code in data (hex strings, string annotations, pickles, shells).
REFUSED_ATTRIBUTES = REFUSED_NAMES | {"fromhex", "decode", "register", "read_array", "run", "collect_env", "system"}
_INTERPRETER_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_")  # frames, generators, tracebacks, code objects
_ALLOWED_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__future__"})
_CODE_MAGICS = frozenset({"time", "timeit", "prun", "capture"})  # magics whose argument or body is Python
_UNFOLLOWABLE_MAGICS = frozenset({"run", "load", "store", "recall", "rerun", "macro", "env"})
_DYNAMIC_BINDERS = frozenset({"globals", "vars", "locals", "exec", "eval", "setattr", "delattr", "__import__"})
_NAMESPACES = frozenset({"user_ns", "user_global_ns", "push", "run_cell", "ex", "ev", "modules", "__dict__"})
_TIMED_LINE = re.compile(r"^([ \t]*)%time[ \t]+(?=\S)", re.MULTILINE)
_IPYTHON_HISTORY = re.compile(r"^(_{1,3}|_i{1,3}|_i?\d+|_[iod]h)$")  # names IPython defines in a kernel only
SPEC, RESULT = "probe.json", "observations.json"


class Refused(ValueError):
    """The picked code uses something the probe does not run; the message names it and where."""


@dataclass(frozen=True)
class Statement:
    cell: int  # code cell of the submission, counted from 1
    line: int  # first line in that cell (its decorators included)
    index: int  # position among the notebook's statements (two on one line stay apart)
    node: ast.stmt

    @property
    def text(self) -> str:
        return ast.unparse(self.node)


# ---------------------------------------------------------------- picking the learner's definitions (grader)


def _cell_python(source: str) -> tuple[str, int]:
    """A cell's source as Python and the number of lines dropped before it: the body of a ``%%time``-like
    cell magic, other cells with IPython magics and shell lines turned into calls (then dropped as statements)."""
    if source.startswith("%%"):
        first, _, body = source.partition("\n")
        magic = first[2:].split()[0] if first[2:].split() else ""
        return (body, 1) if magic in _CODE_MAGICS else ("", 0)
    source = _TIMED_LINE.sub(r"\1", source)  # `%time x = f()` runs `x = f()` in the notebook: the same statement
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source), 0
    except Exception:  # noqa: BLE001 - odd text: parse it as it is
        return source, 0


def _kept(node: ast.stmt) -> bool:
    """Imports, definitions and constants: what a notebook defines without computing anything."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if not all(isinstance(t, ast.Name) or isinstance(t, ast.Tuple) and all(isinstance(e, ast.Name) for e in t.elts)
                   for t in targets):
            return False
        return not _computes(node.value)
    return False


def _computes(node: ast.AST) -> bool:
    """Whether evaluating ``node`` calls anything (a lambda's body runs later, not now)."""
    if isinstance(node, ast.Lambda):
        return any(_computes(d) for d in (*node.args.defaults, *node.args.kw_defaults) if d is not None)
    if isinstance(node, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)):
        return True
    return any(_computes(child) for child in ast.iter_child_nodes(node))


def _binds(node: ast.stmt) -> set[str]:
    """Names a statement binds at module scope (nested blocks included, nested scopes not)."""
    names: set[str] = set()

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
            parts = [*n.decorator_list, *getattr(n, "bases", []), *getattr(n, "keywords", [])]
            if not isinstance(n, ast.ClassDef):  # what runs when the def runs: defaults and annotations
                arguments = n.args
                parts += [*arguments.defaults, *(d for d in arguments.kw_defaults if d is not None), n.returns]
                parts += [a.annotation for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                                 arguments.vararg, arguments.kwarg) if a is not None]
            for part in parts:
                if part is not None:
                    visit(part)
            return
        if isinstance(n, ast.Lambda):
            for part in (*n.args.defaults, *(d for d in n.args.kw_defaults if d is not None)):
                visit(part)
            return
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            names.update(w.target.id for w in ast.walk(n) if isinstance(w, ast.NamedExpr))  # := binds outside
            return
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            names.add(n.rest)
        for child in ast.iter_child_nodes(n):
            visit(child)

    visit(node)
    return names


def _global_reads(node: ast.stmt) -> set[str]:
    """Global names ``node`` reads when it runs or when what it defines is called (scope-aware: a
    function's locals and parameters are not global reads)."""
    table = symtable.symtable(ast.unparse(node), "<statement>", "exec")
    names = {s.get_name() for s in table.get_symbols() if s.is_referenced()}
    stack = list(table.get_children())
    while stack:
        scope = stack.pop()
        names |= {s.get_name() for s in scope.get_symbols() if s.is_global() and s.is_referenced()}
        stack += scope.get_children()
    return names


@dataclass
class _Cell:
    number: int
    offset: int  # lines before the parsed text
    statements: list[ast.stmt]


def _cells(notebook) -> list[_Cell]:
    cells = []
    code_cells = [c for c in cells_of(notebook) if c.get("cell_type") == "code"]
    for number, cell in enumerate(code_cells, 1):
        source = text_of(cell.get("source"))
        python, offset = _cell_python(source)
        try:
            tree = ast.parse(python)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        cells.append(_Cell(number, offset, tree.body))
    return cells


def _magic_code(node: ast.stmt) -> list[tuple[str, str]]:
    """``(magic, argument)`` of the IPython magic calls in a (transformed) statement."""
    found = []
    for call in ast.walk(node):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("run_line_magic", "run_cell_magic")
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args)):
            values = [a.value for a in call.args]
            found.append((values[0], "\n".join(values[1:])) if values else ("", ""))
    return found


def learner_definitions(
    notebook, function: str, set_up: frozenset[str] = frozenset(), graded_cell: int | None = None,
) -> list[Statement]:
    """The statements of ``notebook`` that ``function`` needs, in notebook order (every binding of a
    needed name is kept: the last one wins when they run, as in the notebook).

    Raises Refused when the picked code uses what the probe does not run, or when a needed name is
    also bound where the probe cannot follow (inside an ``if``/``for``/``try``/``with`` block, by a
    computed assignment, a magic, ``global`` or ``globals()``): the function the probe would run
    might not be the one the notebook graded. ``set_up``: the unparsed statements of the course's
    set-up cells (:func:`set_up_statements`), which the probe runs itself. ``graded_cell``: the code
    cell that grades the exercise (:func:`graded_cell_number`); later cells do not count, as in the kernel."""
    cells = [c for c in _cells(notebook) if graded_cell is None or c.number <= graded_cell]
    statements: list[Statement] = []
    skipped: list[tuple[int, int, ast.stmt]] = []  # what the kernel ran before grading but the probe will not
    for cell in cells:  # (a cell that does not parse never runs in the kernel either: nothing to follow)
        for node in cell.statements:
            line = _first_line(node) + cell.offset
            if ast.unparse(node) in set_up:  # the course's own set-up statements run in the probe too
                continue
            if _kept(node):
                statements.append(Statement(cell.number, line, len(statements), node))
            else:
                skipped.append((cell.number, line, node))

    needed, picked = {function}, set()
    while True:
        new = {s.index for s in statements if s.index not in picked and (
            _binds(s.node) & needed or isinstance(s.node, ast.ImportFrom) and any(a.name == "*" for a in s.node.names))}
        if not new:
            break
        picked |= new
        for index in new:
            needed |= _global_reads(statements[index].node)
    chosen = [s for s in statements if s.index in picked]
    modules = {name for s in chosen for node in ast.walk(s.node) if isinstance(node, (ast.Import, ast.ImportFrom))
               for name in _binds(node)} | _imported(set_up)  # imported anywhere, in a function too
    unpicked = skipped + [(s.cell, s.line, s.node) for s in statements if s.index not in picked]
    for cell, line, node in unpicked:
        problem = _unfollowed(node, needed, modules)
        if problem:
            raise Refused(f"code cell {cell}, line {line}: {problem}; the probe runs only plain top-level defs, "
                          f"imports and constants, so it might not see the {function} that was graded")
    for statement in chosen:
        _refuse_what_reaches_out(statement, modules)
    return chosen


def _unfollowed(node: ast.stmt, needed: set[str], modules: set[str]) -> str:
    """Why a statement the probe does not run could change what the graded function is or does ("": it cannot)."""
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in _DYNAMIC_BINDERS or isinstance(n, ast.Attribute) and n.attr in _NAMESPACES:
            return f"uses {getattr(n, 'id', None) or n.attr}, which can bind any name"
        if isinstance(n, ast.Global) and set(n.names) & needed:
            return f"declares global {sorted(set(n.names) & needed)[0]}"
        root, store = None, False
        if isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, (ast.Store, ast.Del)):
            root, store = n, True
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            root = n.func
        if root is not None:
            root = _root(root)
            if isinstance(root, ast.Name) and (root.id in needed - modules or store and root.id in modules):
                return f"changes {root.id} ({ast.unparse(n)[:60]}), which the graded function reads"
    names = _binds(node)
    for magic, code in _magic_code(node):
        if magic in _UNFOLLOWABLE_MAGICS:
            return f"runs %{magic}, which can bind any name"
        if magic in _CODE_MAGICS:
            try:
                names |= set().union(*(_binds(n) for n in ast.parse(code).body))
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                return f"runs %{magic} on code that cannot be read"
    if clash := sorted(names & needed):
        return (f"binds {clash[0]} where the requirement check cannot follow (inside an if/for/try/with block, "
                "by an assignment that calls something, or a magic)")
    return ""


def _imported(statements: frozenset[str]) -> set[str]:
    """Names bound by the import statements among ``statements`` (unparsed)."""
    found = set()
    for text in statements:
        node = ast.parse(text).body[0]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _binds(node)
    return found


def graded_cell_number(notebook, exercise: str) -> int | None:
    """The code cell (counted from 1) that grades ``exercise`` in the kernel, found as the grader's copy finds it
    (its metadata, else the last cell calling ``check("N.M", ...)``); None: the notebook has none."""
    from .notebooks import checked_exercise, exercise_id_of

    code_cells = [c for c in cells_of(notebook) if c.get("cell_type") == "code"]
    by_metadata = [n for n, c in enumerate(code_cells, 1) if exercise_id_of(c) == exercise]
    if by_metadata:
        return by_metadata[0]
    by_call = [n for n, c in enumerate(code_cells, 1) if checked_exercise(c) == exercise]
    return by_call[-1] if by_call else None


def set_up_statements(cells: list[str]) -> frozenset[str]:
    """The unparsed top-level statements of the course's set-up cells."""
    found = set()
    for source in cells:
        try:
            found |= {ast.unparse(node) for node in ast.parse(_cell_python(source)[0]).body}
        except (SyntaxError, ValueError, RecursionError):
            continue
    return frozenset(found)


def _refuse_what_reaches_out(statement: Statement, modules: set[str]) -> None:
    offset = statement.line - _first_line(statement.node)

    def refuse(node: ast.AST, what: str) -> None:
        line = getattr(node, "lineno", statement.node.lineno) + offset
        raise Refused(f"code cell {statement.cell}, line {line}: {what}, which the requirement check does not run "
                      "(it could reach into the interpreter or the grader); a solution does not need it")

    global_reads = _global_reads(statement.node)
    for node in ast.walk(statement.node):  # local names too: a class body can shadow a refused builtin
        if isinstance(node, ast.Name) and (node.id in REFUSED_NAMES or _dunder(node.id)
                                           or node.id in global_reads and _IPYTHON_HISTORY.match(node.id)):
            refuse(node, f"uses {node.id}")
    docstrings = {id(n.body[0].value) for n in ast.walk(statement.node)
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(statement.node):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules_named = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                modules_named += [f"{node.module}.{a.name}" for a in node.names]
                if node.level:
                    refuse(node, "a relative import")
            for module in modules_named:
                parts = module.split(".")
                if parts[0] and parts[0] not in ALLOWED_IMPORTS:
                    refuse(node, f"imports {parts[0]} (it runs imports of {', '.join(sorted(ALLOWED_IMPORTS - {'__future__'}))})")
                if refused := [p for p in parts if p in REFUSED_NAMES or _dunder(p)]:
                    refuse(node, f"imports {module} ({refused[0]})")
        elif isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not (
                not node.attr.startswith("__") and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            if (node.attr in REFUSED_ATTRIBUTES or private and node.attr not in _ALLOWED_DUNDERS
                    or node.attr.startswith(_INTERPRETER_PREFIXES)):
                refuse(node, f"uses .{node.attr}")
            root = _root(node)
            if isinstance(node.ctx, (ast.Store, ast.Del)) and isinstance(root, ast.Name) and root.id in modules:
                refuse(node, f"changes {ast.unparse(node)} (part of a module, or of what was imported from one)")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _dunder(node.name):
            refuse(node, f"defines {node.name}")
        elif isinstance(node, ast.arg) and _dunder(node.arg):
            refuse(node, f"takes an argument {node.arg}")
        elif isinstance(node, ast.keyword) and node.arg == "metaclass":
            refuse(node, "a metaclass")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "__" in node.value \
                and id(node) not in docstrings:
            refuse(node, f"a string with a double underscore ({node.value[:40]!r}: a way to reach attributes by name)")


def _first_line(node: ast.stmt) -> int:
    """A statement's first line, its decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _root(node: ast.AST) -> ast.AST:
    """What an attribute or subscript chain starts from (``a`` of ``a.b[c].d``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node


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
    context = context_cells(exercises_notebook)
    set_up = set_up_statements(context)
    for exercise, function in functions.items():
        try:
            picked[exercise] = learner_definitions(learner, function, set_up, graded_cell_number(learner, exercise))
        except Refused as err:
            outcome[exercise] = f"the requirement could not be checked: {err}"
        except (RecursionError, MemoryError, SyntaxError, ValueError) as err:  # an absurdly deep expression, say
            outcome[exercise] = f"the requirement could not be checked: your code could not be analysed ({type(err).__name__})"
    if not picked:
        return outcome
    # one run for all: every statement any of the functions needs, once, in notebook order
    statements = sorted({s.index: s for ss in picked.values() for s in ss}.values(), key=lambda s: s.index)
    nonce = secrets.token_hex(16)  # the probe deletes the spec before any learner code exists; a forged result lacks it
    with run_folder() as workdir:
        inside = Path(sandbox.SANDBOX_WORKDIR) if sandboxed else workdir
        spec = {
            "nonce": nonce,
            "context": context,
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
        opened = _open_regular(workdir / RESULT) if returncode == 0 and not timed_out else None
        observed = {}
        if opened is not None:
            with opened:
                try:
                    observed = json.load(opened)
                except (ValueError, RecursionError):
                    observed = {}
        if not isinstance(observed, dict) or observed.get("nonce") != nonce:
            observed = {}
        observed = observed.get("observations")
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
    from . import requirements  # its C-level accessors are taken now, before any learner code exists
    from .checks import call_learner_function
    from .hidden import hidden_inputs

    spec_path = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    spec_path.unlink()  # the nonce now lives only in this process
    result_path, stop_others, nonce = spec["result"], bool(spec["stop_other_processes"]), spec.pop("nonce")
    replace, dumps, kill, exit_now = os.replace, json.dumps, os.kill, os._exit

    namespace: dict = {"__name__": "__main__"}
    for source in spec["context"]:  # the course's set-up cells
        exec(compile(source, "<set-up cell>", "exec"), namespace)  # noqa: S102 - trusted, from exercises/
    model = namespace.get("model")
    work = {}
    for exercise, function in spec["functions"].items():  # drawn before any learner code exists
        inputs = hidden_inputs(exercise, model=model)
        args = inputs[0] if inputs else ()
        model_argument = requirements.model_of(args)
        work[exercise] = (function, args, model_argument, requirements.parameters_of(model_argument))

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
    for exercise, (function, args, model_argument, parameters) in work.items():
        learner_function = namespace.get(function)
        if not args:
            observations[exercise] = "no hidden input for this exercise"
        elif not callable(learner_function):
            observations[exercise] = f"the notebook defines no function {function}" + (f" ({problems[0]})" if problems else "")
        else:
            try:
                observations[exercise] = requirements.OBSERVERS[exercise](
                    lambda: _explained(call_learner_function(learner_function, args, {}), problems), model_argument,
                    parameters)
            except Exception as err:  # noqa: BLE001 - learner code that broke the observer
                observations[exercise] = f"observing {function} raised {type(err).__name__}: {err}"
    text = dumps({"nonce": nonce, "observations": observations}, default=str)
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
