"""Measuring where attribution patching is wrong, and one way to make it less wrong.

Attribution patching evaluates the gradient once, at the base run, and
extrapolates along a straight line to the replacement:
``M(a') - M(a) ≈ (a' - a) · ∂M/∂a (a)``. When ``M`` curves between ``a`` and
``a'`` (a saturated softmax, a LayerNorm whose input shrinks, two components
that cancel) the tangent misses.

Integrated gradients (Sundararajan et al. 2017) replace the single gradient by
its average along the path ``a + α (a' - a)``, ``α ∈ [0, 1]``:

.. math::

   M(a') - M(a) = (a' - a) · ∫_0^1 ∂M/∂a (a + α (a' - a)) dα,

which is exact for the path it integrates along (fundamental theorem of
calculus). :func:`integrated_gradients_activations_sweep` moves every component
of one layer of a family together, so the equality above holds for the whole
layer at once, and each component's share is a better, but not exact, estimate
of its own effect. Cost: ``n_layers`` forward and backward passes over
``steps`` copies of the batch, instead of one.

Which integrated gradients this is. It interpolates the *activations* of one
layer at a time, the variant of Marks et al. 2024 (sparse feature circuits),
called "EAP-IG-activations" in the MIB benchmark (Mueller et al. 2025). It is
not Hanna et al. 2024's EAP-IG, which interpolates the model's *inputs*
(token embeddings) from the corrupted to the clean prompt and reads every
gradient along that one path; the two agree only when the model is linear
between the two runs.
"""

from __future__ import annotations

import torch

from .patching import (
    Activations,
    Family,
    Metric,
    Tokens,
    attribution_estimate,
    cache_activations,
    cache_activations_and_gradients,
    check_replacements,
    check_tokens,
    get_family,
    hook_names,
)


def relative_error(exact, estimate) -> float:
    """``‖estimate − exact‖ / ‖exact‖`` over all components (0 is perfect)."""
    exact = torch.as_tensor(exact, dtype=torch.float64)
    estimate = torch.as_tensor(estimate, dtype=torch.float64)
    return ((estimate - exact).norm() / exact.norm()).item()


def sign_agreement(exact, estimate, *, min_abs_effect: float = 0.0) -> float:
    """Fraction of components whose estimate has the sign of the exact effect.

    Components with ``|exact| <= min_abs_effect`` are left out (their sign is noise).
    """
    exact = torch.as_tensor(exact).flatten()
    estimate = torch.as_tensor(estimate).flatten()
    keep = exact.abs() > min_abs_effect
    if not keep.any():
        return float("nan")
    return (torch.sign(exact[keep]) == torch.sign(estimate[keep])).float().mean().item()


def _chunked_metric(metric: Metric, batch: int, steps: int) -> Metric:
    """The sum of ``metric`` over ``steps`` stacked copies of a batch.

    Each copy's gradient is then the gradient of its own metric, because the
    copies do not interact.
    """

    def summed(logits):
        return sum(metric(logits[k * batch : (k + 1) * batch]) for k in range(steps))

    return summed


def integrated_gradients_activations_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    *,
    steps: int = 8,
) -> torch.Tensor:
    """``(a' − a) · mean_k ∂M/∂a (a + α_k (a' − a))`` for every component of ``family``.

    For each layer the family's activation is moved, in ``steps`` stacked copies
    of the batch, to ``a + α_k (a' − a)`` with midpoints ``α_k = (k + ½) / steps``,
    and the gradient is read there (:func:`patching.cache_activations_and_gradients`).
    ``steps=1`` evaluates the gradient half-way; as ``steps`` grows the estimate of
    the whole layer's effect becomes exact. Same shape as :func:`patching.attribution_sweep`.

    This is integrated gradients on the activations (Marks et al. 2024;
    "EAP-IG-activations" in MIB), not Hanna et al. 2024's input-interpolating
    EAP-IG (module docstring).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    fam = get_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    names = hook_names(model, fam)
    batch = base_tokens.shape[0]
    base_activations = cache_activations(model, base_tokens, names)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    stacked_tokens = base_tokens.repeat(steps, *([1] * (base_tokens.ndim - 1)))
    summed_metric = _chunked_metric(metric, batch, steps)
    mean_gradients: Activations = {}
    for name in names:
        start = base_activations[name]
        delta = replacements[name].to(start.dtype) - start
        path = torch.cat([start + alpha * delta for alpha in alphas])  # [steps * batch, ...]

        def move_along_path(act, hook, path=path):
            # value = the point on the path, but still connected to ``act``: the
            # backward hook only fires if the gradient flows through this hook point
            return act + (path.to(act.dtype).reshape(act.shape) - act).detach()

        with model.hooks(fwd_hooks=[(name, move_along_path)]):
            _, _, gradients = cache_activations_and_gradients(model, stacked_tokens, summed_metric, [name])
        mean_gradients[name] = gradients[name].reshape(steps, batch, *start.shape[1:]).mean(0)
    return attribution_estimate(base_activations, mean_gradients, replacements, fam)


#: The name the chapters use; the same function (integrated gradients on activations, not input EAP-IG).
integrated_gradients_sweep = integrated_gradients_activations_sweep
