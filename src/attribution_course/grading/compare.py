"""Compare a learner's result with the reference value and explain the difference.

Used by :func:`attribution_course.grading.checks.check` (a learner checking one exercise
in their own kernel) and by the grader, which compares results read back from a
sandboxed run in its own process (:mod:`attribution_course.grading.verdicts`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch


# ---------------------------------------------------------------- comparison


def compare(got: Any, expected: Any, *, atol: float, rtol: float, what: str = "the result") -> tuple[bool, str]:
    """``(True, "")`` if ``got`` matches ``expected``, else ``(False, explanation)``.

    Never raises: a value that cannot be compared at all (say numpy rows where tuples
    are expected) is a wrong answer with the reason.
    """
    try:
        return _compare(got, expected, atol=atol, rtol=rtol, what=what)
    except Exception as err:  # noqa: BLE001 - anything a learner returns must give a verdict
        return False, f"{what}: cannot be compared with {_describe(expected)} ({type(err).__name__}: {_one_line(str(err))})"


def _compare(got: Any, expected: Any, *, atol: float, rtol: float, what: str) -> tuple[bool, str]:
    if got is None and expected is not None:
        return False, f"returned None; expected {_describe(expected)} (is a `return` missing?)"
    if isinstance(expected, dict):
        return _compare_dicts(got, expected, atol=atol, rtol=rtol, what=what)
    if isinstance(expected, (str, bool)) or (isinstance(expected, (list, tuple)) and _all_plain(expected)):
        if _plain(got) == _plain(expected):
            return True, ""
        return False, f"{what}: expected {_short(expected)}, got {_short(got)}"
    if isinstance(expected, int) and not isinstance(expected, bool):
        if isinstance(got, (int, torch.Tensor)) and _as_number(got) == expected:
            return True, ""
        return False, f"{what}: expected {expected}, got {_short(got)}"
    return _compare_tensors(got, expected, atol=atol, rtol=rtol, what=what)


def _compare_dicts(got: Any, expected: dict, *, atol: float, rtol: float, what: str) -> tuple[bool, str]:
    if not isinstance(got, dict):
        return False, f"{what}: expected a dict with keys {sorted(expected)}, got {type(got).__name__}"
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {extra}" if extra else ""]
        return False, f"{what}: " + "; ".join(p for p in parts if p)
    for key in expected:
        ok, detail = _compare(got[key], expected[key], atol=atol, rtol=rtol, what=f"{what}[{key!r}]")
        if not ok:
            return False, detail
    return True, ""


def _compare_tensors(got: Any, expected: Any, *, atol: float, rtol: float, what: str) -> tuple[bool, str]:
    want = torch.as_tensor(expected).detach().cpu()
    try:
        have = _to_tensor(got)
    except (TypeError, ValueError, RuntimeError):
        return False, f"{what}: expected {_describe(expected)}, got {type(got).__name__}"
    if have.shape != want.shape:
        message = f"{what}: shape {tuple(have.shape)}, expected {tuple(want.shape)}"
        hint = _axis_hint(have, want, atol, rtol)
        return False, message + (f" ({hint})" if hint else "")
    if want.dtype == torch.bool or not want.is_floating_point():
        if have.is_floating_point() and not want.is_floating_point():
            have = have.round()
        wrong = have.to(want.dtype) != want
        if not wrong.any():
            return True, ""
        first = _index_of(wrong)
        return False, (
            f"{what}: {int(wrong.sum())} of {want.numel()} entries differ; "
            f"at {first} expected {_fmt(want[first])}, got {_fmt(have[first])}"
        )
    have = have.to(torch.float64)
    want = want.to(torch.float64)
    # NaN marks "not computed" in a reference (e.g. positions a sweep skipped): the
    # learner's value must be NaN exactly there, and everything else is compared
    nan_mismatch = torch.isnan(have) != torch.isnan(want)
    if nan_mismatch.any():
        first = _index_of(nan_mismatch)
        return False, (
            f"{what}: {int(nan_mismatch.sum())} of {want.numel()} entries are NaN where the expected value is "
            f"not, or the other way round; at {first} expected {_fmt(want[first])}, got {_fmt(have[first])}"
        )
    both_nan = torch.isnan(want)
    have, want = have.masked_fill(both_nan, 0.0), want.masked_fill(both_nan, 0.0)
    allowed = atol + rtol * want.abs()
    error = (have - want).abs()
    bad = error > allowed
    if not bad.any():
        return True, ""
    return False, f"{what}: " + _explain_values(have, want, bad, error, atol, rtol)


def _explain_values(have, want, bad, error, atol, rtol) -> str:
    n = want.numel()
    worst = _index_of(error == error.max())
    tolerance = f"tolerance {_fmt(atol)} + {_fmt(rtol)}*|expected|"
    parts = []
    if torch.isclose(have, -want, rtol=rtol, atol=atol).all():
        parts.append("every value has the opposite sign of the expected one (is a minus sign missing or extra?)")
    else:
        scale = _common_scale(have, want, atol, rtol)
        if scale is not None:
            parts.append(f"every value is {_fmt(scale)} times the expected one (a sum instead of a mean, or the reverse?)")
    significant = (want.abs() > atol) & (have.abs() > atol)
    flipped = significant & (torch.sign(have) != torch.sign(want))
    if flipped.any():
        parts.append(f"sign differs on {int(flipped.sum())} of {n} entries")
    parts.append(f"{int(bad.sum())} of {n} entries are off")
    location = f"at {list(worst)}" if want.ndim else ""
    parts.append(
        f"max abs error {_fmt(error[worst])} {location} (expected {_fmt(want[worst])}, got {_fmt(have[worst])}; {tolerance})"
        .replace("  ", " ")
    )
    return "; ".join(parts)


def _common_scale(have, want, atol, rtol) -> float | None:
    """The factor ``c`` if ``have == c * want`` within tolerance (and ``c`` is not 1 or -1)."""
    mask = want.abs() > max(atol, 1e-12)
    if mask.sum() < 1:
        return None
    ratios = have[mask] / want[mask]
    scale = ratios.median().item()
    if not math.isfinite(scale) or abs(abs(scale) - 1) < 1e-3 or abs(scale) < 1e-9:
        return None
    return scale if torch.isclose(have, scale * want, rtol=rtol, atol=atol).all() else None


def _axis_hint(have: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> str:
    """Explain a shape mismatch: permuted axes, or a sum over the wrong axis."""
    if have.numel() == want.numel() and have.ndim == want.ndim and have.ndim > 1:
        for order in itertools.permutations(range(want.ndim)):
            if tuple(have.shape[i] for i in order) == tuple(want.shape):
                permuted = have.permute(*order).to(torch.float64)
                if torch.isclose(permuted, want.to(torch.float64), rtol=rtol, atol=atol).all():
                    return f"the values match after permuting the axes to {order}: wrong axis order"
        return "same number of entries: are two axes in the wrong order?"
    if have.ndim == want.ndim + 1:
        return "one axis too many: is a sum or mean over an axis missing?"
    if have.ndim + 1 == want.ndim:
        return "one axis too few: did you sum or average over an axis that should be kept?"
    return ""


# ---------------------------------------------------------------- helpers


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "__array__") or isinstance(value, (list, tuple, int, float)):
        return torch.as_tensor(value)
    raise TypeError(type(value).__name__)


def _as_number(value: Any):
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _plain(value: Any):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _all_plain(values) -> bool:
    return all(isinstance(v, (str, bool, int)) or (isinstance(v, (list, tuple)) and _all_plain(v)) for v in values)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(value)}"
    return f"a {type(value).__name__}"


def _index_of(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0]) if mask.ndim else ()


def _fmt(value: Any) -> str:
    value = _as_number(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
