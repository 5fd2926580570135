"""Requirements an exercise states besides its return value, checked in the run that calls the function.

* 5.1 ``cache_activations``: "store detached tensors and run without gradients": no cached
  tensor may require grad or carry a ``grad_fn`` (it would keep the whole graph alive);
* 5.2 ``cache_gradients``: "afterwards clear the parameter gradients": no parameter of the
  model may hold a non-zero ``.grad`` after the call, and a second call on the same input
  must return the same gradients (nothing accumulated across calls).

Each check gets a ``call()`` that runs the learner's function once on the exercise's input
(as :func:`~attribution_course.grading.checks.call_learner_function` does: status, value,
detail) and that input's arguments; it returns a problem a learner can act on, or ``""``.
In a grading run the result is saved with the function's values and the verdict, decided
in the grader's process, fails the exercise on any problem.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

RETURNED = "returned"  # the status call_learner_function gives a function that returned (re-exported by checks)

Call = Callable[[], tuple[str, Any, str]]


def _tensors(value: Any, path: str = ""):
    """``(where, tensor)`` for every tensor in ``value`` (dicts, lists and tuples are walked)."""
    if isinstance(value, torch.Tensor):
        yield path or "the result", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")


def activations_detached(call: Call, args: tuple) -> str:
    """5.1: with gradients enabled (as in a notebook), nothing returned keeps the autograd graph."""
    with torch.enable_grad():
        status, got, _ = call()
    if status != RETURNED:
        return ""  # the values' verdict already explains a function that raised
    attached = [where for where, tensor in _tensors(got) if tensor.requires_grad or tensor.grad_fn is not None]
    if not attached:
        return ""
    shown = ", ".join(attached[:3]) + (f" and {len(attached) - 3} more" if len(attached) > 3 else "")
    return (f"requirement not met: the cached tensors still require grad ({shown}), so the cache keeps the model's "
            "computation graph alive; store activation.detach() and run the model under torch.no_grad()")


def gradients_cleared(call: Call, args: tuple) -> str:
    """5.2: no parameter keeps a gradient after the call, and a second call returns the same gradients."""
    model = args[0] if args else None
    parameters = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    for _, p in parameters:
        p.grad = None
    status, first, _ = call()
    if status != RETURNED:
        return ""
    kept = [name for name, p in parameters if p.grad is not None and bool(p.grad.ne(0).any())]
    for _, p in parameters:
        p.grad = None
    if kept:
        return (f"requirement not met: after the call {len(kept)} parameters of the model still hold gradients "
                f"(e.g. {kept[0]}); they would add up over calls: call model.zero_grad(set_to_none=True) after .backward()")
    status, second, _ = call()
    if status != RETURNED:
        return ""
    for (where, a), (_, b) in zip(_tensors(first), _tensors(second)):
        if a.shape != b.shape or not torch.allclose(a.detach().double(), b.detach().double(), rtol=1e-5, atol=1e-7):
            return (f"requirement not met: a second call on the same input returned different gradients at {where} "
                    "(are gradients accumulated across calls, e.g. added to a dict that outlives the call?)")
    return ""


REQUIREMENTS: dict[str, Callable[[Call, tuple], str]] = {
    "5.1": activations_detached,
    "5.2": gradients_cleared,
}


def check_requirements(exercise: str, call: Call, args: tuple) -> list[str]:
    """The problems with ``exercise``'s stated requirements (empty: met, or none stated)."""
    requirement = REQUIREMENTS.get(exercise)
    if requirement is None:
        return []
    problem = requirement(call, args)
    return [problem] if problem else []
