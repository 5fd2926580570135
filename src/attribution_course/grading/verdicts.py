"""One exercise's verdict, decided in the grader's process.

The learner's run saved what the learner's function returned; the reference run saved
the expected value and the tolerances. Both are validated here (exact types: a tensor
subclass, or any object, cannot take part in the comparison) and compared with
:func:`~attribution_course.grading.compare.compare`. nbval's cell report only explains
an exercise for which no result was saved (it timed out, the kernel died, the cell raised).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .checks import NOT_ATTEMPTED, RAISED, RETURNED
from .compare import compare
from .nbval_watchdog import KERNEL_DIED
from .requirements import JUDGES
from .notebooks import ReferenceExercise, writable_text
from .runner import UnreadableRecord

# verdicts of one exercise
V_PASSED, V_WRONG, V_NOT_ATTEMPTED, V_NOT_GRADED = "passed", "wrong", "not attempted", "not graded"

# what nbval (and the watchdog plugin) write when a cell did not run normally
DIED_HERE = KERNEL_DIED
DEAD_BEFORE = "Kernel dead on test start"
NOT_INTERRUPTIBLE = "Failed to interrupt kernel"
EARLIER_HANG = "Previous cell timed out"
TIMEOUT = "Timeout of"

_MAX_DEPTH, _MAX_ITEMS = 8, 100_000


@dataclass
class ExerciseResult:
    exercise: str
    name: str
    verdict: str
    points: int
    max_points: int
    detail: str = ""


class NotPlain(ValueError):
    pass


def validate_plain(value, depth: int = 0, budget: list[int] | None = None):
    """``value`` if it is made only of base tensors, numbers, strings, lists, tuples and dicts."""
    budget = budget if budget is not None else [_MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise NotPlain("a value nested too deeply or with too many parts")
    kind = type(value)
    if kind is torch.Tensor:
        if value.is_sparse or value.layout != torch.strided or value.is_complex():
            raise NotPlain("a sparse or complex tensor")
        return value
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value
    if kind in (list, tuple):
        return kind(validate_plain(v, depth + 1, budget) for v in value)
    if kind is dict:
        return {validate_plain(k, depth + 1, budget): validate_plain(v, depth + 1, budget) for k, v in value.items()}
    raise NotPlain(f"a {kind.__name__}")


def decide(
    ref: ReferenceExercise, expected: dict | None, submitted, cell: tuple[str, str] | None, cell_timeout: float
) -> ExerciseResult:
    """The verdict of exercise ``ref`` from the reference record, the learner's record and nbval's cell report."""

    def result(verdict: str, detail: str = "") -> ExerciseResult:
        points = ref.points if verdict == V_PASSED else 0
        return ExerciseResult(ref.id, ref.name, verdict, points, ref.points, writable_text(detail))

    if expected is None:
        return result(V_NOT_GRADED, "the reference run did not record this exercise (a problem of the course, not yours)")
    if submitted is not None:
        return _judge(submitted, expected, result)
    status, message = cell or (None, "")
    if status is None:
        return result(V_NOT_GRADED, "the check cell was never run")
    if DIED_HERE in message:
        return result(V_WRONG, "the kernel died while running this cell (os._exit, a crash, out of memory or "
                               "over the CPU-time limit?)")
    if DEAD_BEFORE in message:
        return result(V_NOT_GRADED, "not run: the kernel had died in an earlier cell")
    if NOT_INTERRUPTIBLE in message:
        return result(V_WRONG, f"did not finish within {cell_timeout:g} s of CPU time and ignored the interrupt; the kernel was stopped")
    if EARLIER_HANG in message:
        return result(V_NOT_GRADED, "not run: an earlier cell hung and the kernel was stopped")
    if TIMEOUT in message:
        return result(V_WRONG, f"did not finish within {cell_timeout:g} s of CPU time and was interrupted; is there an infinite loop?")
    if status == "passed":
        return result(V_WRONG, "the graded cell ran but saved no result (was the grader's recorder replaced?)")
    return result(V_WRONG, "the check cell raised " + exception_summary(message))


def _judge(submitted, expected: dict, result) -> ExerciseResult:
    if isinstance(submitted, UnreadableRecord) or not isinstance(submitted, dict):
        return result(V_WRONG, "the saved result could not be read (it was not written by the grader's recorder)")
    status, detail = submitted.get("status"), submitted.get("detail")
    detail = detail if isinstance(detail, str) else ""
    if status == NOT_ATTEMPTED:
        return result(V_NOT_ATTEMPTED, detail)
    if status == RAISED:
        return result(V_WRONG, detail)
    if status != RETURNED:
        return result(V_WRONG, "the saved result could not be read (it was not written by the grader's recorder)")
    try:
        got = validate_plain(submitted.get("value"))
    except NotPlain as err:
        return result(V_WRONG, f"returned {err}, which cannot be graded (return plain tensors, numbers or lists)")
    atol, rtol = float(expected["atol"]), float(expected["rtol"])
    ok, explanation = compare(got, expected["expected"], atol=atol, rtol=rtol, what=str(expected["what"]))
    if not ok:
        return result(V_WRONG, explanation)
    wanted = expected.get("hidden") or []
    tried = submitted.get("hidden")
    tried = tried if isinstance(tried, list) else []
    for number, want in enumerate(wanted, 1):
        where = f"on hidden input {number} of {len(wanted)} (drawn at grading time)"
        attempt = tried[number - 1] if number <= len(tried) and isinstance(tried[number - 1], dict) else {}
        if attempt.get("status") != RETURNED:
            reason = attempt.get("detail") if isinstance(attempt.get("detail"), str) else "no result was saved"
            return result(V_WRONG, f"{where}: {reason}")
        try:
            value = validate_plain(attempt.get("value"))
        except NotPlain as err:
            return result(V_WRONG, f"{where}: returned {err}, which cannot be graded")
        ok, explanation = compare(value, want, atol=atol, rtol=rtol, what="the result")
        if not ok:
            return result(V_WRONG, f"{where}: {explanation} (right on the notebook's input: a constant, a global "
                                   "used instead of an argument, or a mistake that input does not show?)")
    return result(V_PASSED)


def apply_requirements(results: list[ExerciseResult], observed: dict[str, dict | str]) -> None:
    """Judge the stated requirements (requirements.py) of exercises whose values passed, from what the
    requirement probe observed (a dict) or why it could not (a str); a problem makes the exercise wrong."""
    for r in results:
        if r.exercise not in observed or r.verdict != V_PASSED:
            continue
        found = observed[r.exercise]
        problem = found if isinstance(found, str) else JUDGES[r.exercise](found)
        if problem:
            r.verdict, r.points, r.detail = V_WRONG, 0, writable_text(problem)


def valid_reference(record) -> dict | None:
    """A reference record (from the trusted reference run) if it has the expected fields."""
    if isinstance(record, dict) and {"expected", "atol", "rtol", "what"} <= set(record):
        if all(isinstance(record[k], float) and math.isfinite(record[k]) for k in ("atol", "rtol")):
            return record
    return None


def exception_summary(message: str) -> str:
    """The last 'SomeError: text' line of a traceback."""
    lines = [l.strip() for l in message.splitlines() if re.match(r"^\s*[A-Za-z_.]*(Error|Exception|Interrupt)\b", l)]
    return short(lines[-1]) if lines else short(message)


def short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
