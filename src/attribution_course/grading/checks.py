"""Graded checks for the exercise notebooks: the learner's ``check`` and the grader's recorders.

Every graded cell of an exercise notebook calls :func:`check` once, e.g.::

    check("3.2", zero_ablation_sweep, model, tokens, metric,
          expected=patching.exact_sweep(...), atol=1e-4, what="per-head effects [layer, head]")

In a learner's own kernel ``check`` calls the function, compares what it returns with
the expected value (computed by the package in the same cell, never a stored float)
and prints exactly one line::

    ex 3.2 zero_ablation_sweep: PASSED
    ex 3.2 zero_ablation_sweep: NOT ATTEMPTED - the function still raises NotImplementedError
    ex 3.2 zero_ablation_sweep: WRONG - sign differs on 6 of 16 entries (max abs error 0.31 at [2, 1], ...)

That line is feedback only: no grade is decided in a learner's kernel. The grader
(:mod:`attribution_course.grading.grader`) rewrites each graded cell of its copies:

* in the learner's copy the call becomes :func:`submit`, without the ``expected=``
  argument, so it only calls the learner's function and saves what it returned (also
  on the exercise's hidden inputs, :mod:`attribution_course.grading.hidden`); stated
  requirements are observed apart, in a run with only the learner's definitions
  (:mod:`attribution_course.grading.requirement_probe`);
* in the reference copy (the solutions notebook, run in a separate process) it becomes
  :func:`record_reference`, which saves the expected value and the tolerances.

The grader then compares the two files in its own process
(:mod:`attribution_course.grading.verdicts`). Redefining ``check``, ``compare`` or
these recorders, printing verdict lines or writing result files can only change what
is compared, never how.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .compare import _one_line, compare
from .hidden import hidden_inputs
from .requirements import RETURNED, check_requirements

#: Directory (in the grading sandbox) the recorders write one ``<exercise>.pt`` file to.
RESULTS_ENV = "ATTRIBUTION_COURSE_RESULTS"

PASSED = "PASSED"
WRONG = "WRONG"
NOT_ATTEMPTED = "NOT ATTEMPTED"

# what a learner's function did, as recorded by submit() (RETURNED lives beside the requirement checks that test it)
RAISED = "raised"


@dataclass(frozen=True)
class Verdict:
    exercise: str
    name: str
    verdict: str  # PASSED, WRONG or NOT ATTEMPTED
    detail: str = ""

    @property
    def line(self) -> str:
        head = f"ex {self.exercise} {self.name}: {self.verdict}"
        return f"{head} - {self.detail}" if self.detail else head


def check(
    exercise: str,
    function: Callable[..., Any],
    *args: Any,
    expected: Any,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    what: str = "the result",
    name: str | None = None,
    **kwargs: Any,
) -> None:
    """Call ``function(*args, **kwargs)``, compare with ``expected``, print one verdict line.

    Tensors match when every entry satisfies ``|got - expected| <= atol + rtol * |expected|``
    (the rule of :func:`torch.isclose`); numbers likewise; strings, booleans,
    integers and lists of them must be equal; dicts are compared key by key.
    Tensor arguments are cloned first, so a function that edits its inputs in place
    cannot change what later cells see. Anything the function prints or displays is
    swallowed, so that debugging output never changes the graded output.
    """
    label = name or getattr(function, "__name__", "function")
    status, got, detail = call_learner_function(function, args, kwargs)
    if status == NOT_ATTEMPTED:
        result = Verdict(exercise, label, NOT_ATTEMPTED, detail)
    elif status == RAISED:
        result = Verdict(exercise, label, WRONG, detail)
    else:
        ok, explanation = compare(got, expected, atol=atol, rtol=rtol, what=what)
        if ok:  # the values are right: are the exercise's stated requirements met too?
            problems = check_requirements(exercise, lambda: call_learner_function(function, args, kwargs), args)
            ok, explanation = not problems, "; ".join(problems)
        result = Verdict(exercise, label, PASSED) if ok else Verdict(exercise, label, WRONG, explanation)
    print(result.line)  # returns None, so a notebook shows the printed line and nothing else


def call_learner_function(function: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[str, Any, str]:
    """``(RETURNED, value, "")``, ``(NOT_ATTEMPTED, None, why)`` or ``(RAISED, None, why)``.

    Arguments are copied (a function that edits its inputs cannot change later cells),
    printed and displayed output is captured, and hooks left on a model are removed.
    """
    from IPython.utils.capture import capture_output

    safe_args = [_defensive_copy(a) for a in args]
    safe_kwargs = {k: _defensive_copy(v) for k, v in kwargs.items()}
    try:
        with capture_output(stdout=True, stderr=True, display=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = function(*safe_args, **safe_kwargs)
    except NotImplementedError:
        return NOT_ATTEMPTED, None, "the function still raises NotImplementedError"
    except Exception as err:  # any bug in learner code is a wrong answer, explained
        return RAISED, None, f"raised {type(err).__name__}: {_one_line(str(err))}"
    finally:
        for value in (*args, *kwargs.values()):
            _remove_leftover_hooks(value)
    return RETURNED, got, ""


# ---------------------------------------------------------------- recorders of the grader's copies


def submit(exercise: str, function: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any) -> None:
    """Learner's copy: call the learner's function and save what it returned (no verdict here)."""
    label = name or getattr(function, "__name__", "function")
    status, got, detail = call_learner_function(function, args, kwargs)
    record = {"exercise": exercise, "name": label, "status": status, "detail": detail, "value": None, "hidden": []}
    if status == RETURNED:
        try:
            record["value"] = plain_value(got)
        except TypeError as err:
            record.update(status=RAISED, detail=f"returned {err}, which cannot be graded")
    if record["status"] == RETURNED:
        named = _notebook_function(label)  # the check may call a lambda; hidden inputs go to the named function
        for hidden_args in hidden_inputs(exercise):
            status, got, detail = call_learner_function(named, hidden_args, {})
            try:
                value = plain_value(got) if status == RETURNED else None
            except TypeError as err:
                status, value, detail = RAISED, None, f"returned {err}, which cannot be graded"
            record["hidden"].append({"status": status, "value": value, "detail": detail})
    # stated requirements (requirements.py) are not observed here, where every other cell of the notebook
    # has run, but by the grader's requirement probe (requirement_probe.py)
    _save(exercise, record)
    print(f"ex {exercise} {label}: submitted for grading")


def record_reference(
    exercise: str, *, expected: Any, atol: float = 1e-4, rtol: float = 1e-3, what: str = "the result", name: str = ""
) -> None:
    """Reference copy: save the expected value and how to compare with it."""
    solution = _notebook_function(name)
    hidden = [plain_value(solution(*hidden_args)) for hidden_args in hidden_inputs(exercise)]
    _save(exercise, {"exercise": exercise, "name": name, "expected": plain_value(expected), "hidden": hidden,
                     "atol": float(atol), "rtol": float(rtol), "what": str(what)})
    print(f"ex {exercise}: reference recorded")


def _notebook_function(name: str) -> Callable[..., Any]:
    """The function ``name`` as the notebook defines it now (for the hidden inputs)."""
    from IPython import get_ipython

    shell = get_ipython()
    function = shell.user_ns.get(name) if shell is not None else None
    if callable(function):
        return function

    def missing(*args, **kwargs):
        raise NameError(f"the notebook defines no function {name}")

    return missing


def plain_value(value: Any) -> Any:
    """``value`` as plain tensors, numbers, strings, lists, tuples and dicts (what the grader
    loads with ``torch.load(weights_only=True)``); tensor subclasses become base tensors.
    Raises TypeError naming anything else."""
    if isinstance(value, torch.Tensor):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.as_subclass(value, torch.Tensor).detach().cpu().clone()
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "__array__") and hasattr(value, "dtype"):  # numpy arrays and scalars
        import numpy as np

        return torch.from_numpy(np.array(value, copy=True))
    if type(value) in (list, tuple):
        return type(value)(plain_value(v) for v in value)
    if type(value) is dict:
        return {plain_value(k): plain_value(v) for k, v in value.items()}
    raise TypeError(f"a {type(value).__name__}")


def _save(exercise: str, record: dict) -> None:
    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        raise RuntimeError(f"{RESULTS_ENV} is not set: this cell only runs inside the grader")
    path = Path(folder) / f"{exercise}.pt"
    partial = path.with_suffix(".partial")
    torch.save(record, partial)
    os.replace(partial, path)


# ---------------------------------------------------------------- helpers


def _defensive_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _defensive_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_defensive_copy(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_defensive_copy(v) for v in value)
    return value


def _remove_leftover_hooks(value: Any) -> None:
    """A learner's function may add hooks and forget them; they would poison later cells."""
    reset = getattr(value, "reset_hooks", None)
    if callable(reset) and hasattr(value, "cfg"):
        reset()
