"""Requirements an exercise states besides its return value.

* 5.1 ``cache_activations``: "store detached tensors and run without gradients": no cached
  tensor may require grad or carry a ``grad_fn`` (it would keep the whole graph alive);
* 5.2 ``cache_gradients``: "afterwards clear the parameter gradients": no parameter of the
  model may hold a non-zero ``.grad`` after the call, and a second call on the same input
  must return the same gradients (nothing accumulated across calls).

A requirement is a yes/no fact about how the function behaves, so it is checked in two steps
that can run in different processes:

* an **observer** (``OBSERVERS``) calls the learner's function and records plain facts (which
  returned tensors are attached to a graph, which parameters kept a gradient, how far a second
  call's values are from the first's). In a grading run it runs in the requirement probe
  (:mod:`.requirement_probe`): a fresh sandboxed process in which only the learner's
  definitions exist, never the rest of the notebook. The facts are read through C-level
  accessors taken when this module is imported, before any learner code is defined, so a
  learner who replaces ``torch.Tensor.requires_grad`` or ``torch.allclose`` changes nothing;
* a **judge** (``JUDGES``) turns the facts into a problem a learner can act on, or ``""``.
  The grader calls it in its own process.

:func:`check_requirements` runs both in one process: the learner's own ``check()`` gives the
same feedback with it (feedback only, never a grade).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

RETURNED = "returned"  # the status call_learner_function gives a function that returned (re-exported by checks)

Call = Callable[[], tuple[str, Any, str]]

# Taken at import, before learner code exists: C-level accessors that Python-level patches cannot reach.
_TensorBase = torch._C.TensorBase
_requires_grad = _TensorBase.requires_grad.__get__
_grad_fn = _TensorBase.grad_fn.__get__
_grad = _TensorBase.grad.__get__
_set_grad = _TensorBase.grad.__set__
_detach = _TensorBase.detach
_to_numpy = _TensorBase.numpy
_contiguous_cpu = _TensorBase.cpu
_no_torch_function = torch._C.DisableTorchFunction
_enable_grad = torch.enable_grad
_named_parameters = torch.nn.Module.named_parameters
_count_nonzero, _as_array, _abs, _max, _float64 = np.count_nonzero, np.asarray, np.abs, np.ndarray.max, np.float64
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_RTOL, _ATOL = 1e-5, 1e-7  # a second call must give the same gradients up to float noise


def _tensors(value: Any, path: str = ""):
    """``(where, tensor)`` for every tensor in ``value`` (dicts, lists and tuples are walked; exact types only,
    so a subclass of dict or of Tensor cannot hide anything: it is returned as itself, to be refused)."""
    kind = type(value)
    if kind in _PLAIN_TENSORS or isinstance(value, _PLAIN_TENSORS[0]):
        yield path or "the result", value
    elif kind is dict:
        for key, item in dict.items(value):
            yield from _tensors(item, f"{path}[{key!r}]")
    elif kind in (list, tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")


def _subclassed(value: Any) -> list[str]:
    """Where ``value`` holds a tensor subclass (its attributes could answer anything)."""
    return [where for where, t in _tensors(value) if type(t) not in _PLAIN_TENSORS]


def _array(tensor) -> np.ndarray:
    with _no_torch_function():
        return _as_array(_to_numpy(_contiguous_cpu(_detach(tensor))), dtype=_float64)


def _same_parameters(model, parameters: list[tuple[str, Any]]) -> bool:
    """Whether ``model`` still holds the very parameter objects listed before the call."""
    if model is None:
        return True
    return [id(p) for _, p in _named_parameters(model)] == [id(p) for _, p in parameters]


# ---------------------------------------------------------------- observers (where the function runs)


def observe_attached(call: Call, model, parameters: list[tuple[str, Any]]) -> dict:
    """5.1: with gradients enabled (as in a notebook), which returned tensors keep the autograd graph."""
    with _enable_grad():
        status, got, detail = call()
    if status != RETURNED:
        return {"status": status, "detail": detail}
    with _no_torch_function():
        attached = [where for where, t in _tensors(got) if _requires_grad(t) or _grad_fn(t) is not None]
    return {"status": status, "attached": attached, "subclassed": _subclassed(got)}


def observe_gradients(call: Call, model, parameters: list[tuple[str, Any]]) -> dict:
    """5.2: which parameters hold a non-zero gradient after a call, and how far a second call's
    values are from the first's (``excess``: largest ``|a - b| - rtol |b|``; 0: the same)."""
    for _, p in parameters:
        _set_grad(p, None)
    status, first, detail = call()
    if status != RETURNED:
        return {"status": status, "detail": detail}
    with _no_torch_function():
        kept = [name for name, p in parameters if (g := _grad(p)) is not None and _count_nonzero(_array(g))]
    if not _same_parameters(model, parameters):
        kept.append("(the model's parameters were replaced by the function)")
    for _, p in parameters:
        _set_grad(p, None)
    observation = {"status": status, "kept": kept, "subclassed": _subclassed(first), "second_status": None,
                   "differs_at": None, "excess": 0.0}
    if kept or observation["subclassed"]:
        return observation
    firsts = [(where, _array(t)) for where, t in _tensors(first)]  # copied now: a second call may change them in place
    second_status, second, detail = call()
    observation["second_status"] = second_status
    if second_status != RETURNED:
        observation["detail"] = detail
        return observation
    seconds = [(where, _array(t)) for where, t in _tensors(second)]
    if [w for w, _ in firsts] != [w for w, _ in seconds]:
        observation.update(differs_at="the structure of the result", excess=float("inf"))
        return observation
    for (where, a), (_, b) in zip(firsts, seconds):
        excess = float("inf") if a.shape != b.shape else float(_max(_abs(a - b) - _RTOL * _abs(b), initial=0.0))
        if not excess <= observation["excess"]:  # also catches nan
            observation.update(differs_at=where, excess=excess)
    return observation


OBSERVERS: dict[str, Callable[[Call, Any, list], dict]] = {"5.1": observe_attached, "5.2": observe_gradients}


# ---------------------------------------------------------------- judges (in the grader's process)


def _not_run(observation: dict, status_key: str = "status") -> str:
    """A function that did not return where the requirement was observed leaves it unchecked: a problem."""
    if observation.get(status_key) == RETURNED:
        return ""
    detail = observation.get("detail")
    return ("the requirement could not be checked: called on its own, the function "
            + (detail if isinstance(detail, str) and detail else "did not return"))


def _unchecked(observation: dict, facts: str) -> str:
    """A problem if the function did not return, returned tensor subclasses, or the observation lacks
    its ``facts`` (a list)."""
    if problem := _not_run(observation):
        return problem
    if not isinstance(observation.get(facts), list) or not isinstance(observation.get("subclassed"), list):
        return "the requirement could not be checked: no observation was recorded"
    if subclassed := observation["subclassed"]:
        return (f"the requirement could not be checked: the function returned a torch.Tensor subclass at "
                f"{subclassed[0]}; return plain tensors")
    return ""


def judge_attached(observation: dict) -> str:
    if problem := _unchecked(observation, "attached"):
        return problem
    attached = observation["attached"]
    if not attached:
        return ""
    shown = ", ".join(map(str, attached[:3])) + (f" and {len(attached) - 3} more" if len(attached) > 3 else "")
    return (f"requirement not met: the cached tensors still require grad ({shown}), so the cache keeps the model's "
            "computation graph alive; store activation.detach() and run the model under torch.no_grad()")


def judge_gradients(observation: dict) -> str:
    if problem := _unchecked(observation, "kept"):
        return problem
    kept = observation["kept"]
    if kept:
        return (f"requirement not met: after the call {len(kept)} parameters of the model still hold gradients "
                f"(e.g. {kept[0]}); they would add up over calls: call model.zero_grad(set_to_none=True) after .backward()")
    if problem := _not_run(observation, "second_status"):
        return problem
    excess = observation.get("excess")
    if not isinstance(excess, (int, float)) or not excess <= _ATOL:
        return (f"requirement not met: a second call on the same input returned different gradients at "
                f"{observation.get('differs_at')} (are gradients accumulated across calls, e.g. added to a dict that "
                "outlives the call?)")
    return ""


JUDGES: dict[str, Callable[[dict], str]] = {"5.1": judge_attached, "5.2": judge_gradients}
REQUIREMENTS = frozenset(OBSERVERS)


def model_of(args: tuple):
    """The model (the first argument), if the exercise takes one."""
    model = args[0] if args else None
    return model if isinstance(model, torch.nn.Module) else None


def parameters_of(model) -> list[tuple[str, Any]]:
    """The model's parameters, listed before the learner's function runs."""
    return list(_named_parameters(model)) if model is not None else []


def check_requirements(exercise: str, call: Call, args: tuple) -> list[str]:
    """The problems with ``exercise``'s stated requirements, observed and judged in this process
    (the learner's own check; empty: met, or none stated)."""
    if exercise not in OBSERVERS:
        return []
    model = model_of(args)
    problem = JUDGES[exercise](OBSERVERS[exercise](call, model, parameters_of(model)))
    return [problem] if problem else []
