"""Diagnosing where attribution patching fails: freeze part of the network and see whether the gap closes.

Attribution patching (AtP) replaces the exact effect ``M(a') − M(a)`` of a
patch by the tangent ``(a' − a)·∂M/∂a``. Between the patched activation and
the metric lie many nonlinear maps (attention softmaxes, MLP activations,
LayerNorm scales); the tangent is exact when all of them are linear along the
step. A *freezing experiment* holds some of them at their base-run values and
reruns both:

* exact, with the frozen activations overwritten by their base-run values in
  the patched forward pass (:func:`frozen_exact_sweep`);
* AtP, with the gradient cut at the same activations (:func:`frozen_attribution_sweep`).
  On the base run a frozen activation *is* its base-run value, so cutting its
  gradient is the first-order version of the same intervention.

Reading the results:

* if freezing ``X`` barely moves the *exact* effect, the effect does not flow
  through ``X``'s change (e.g. frozen downstream attention patterns: the patch
  does not work by moving later patterns, so saturation cannot be its problem);
* if freezing ``X`` makes exact and AtP *agree*, the tangent's error lived in
  ``X``'s response to the step (e.g. LayerNorm scales: the division by the norm);
* freezing every pattern, every MLP output and every LayerNorm scale downstream
  leaves a map that is linear in the patched activation, so exact and AtP must
  then agree to float precision (``tests/test_diagnosis.py`` checks it).

A second kind of experiment keeps an MLP's activation function but replaces it
by its *tangent* at the base run (``linearised_mlps``): the exact effect then
sees that MLP as linear, while AtP (which already linearises it) is unchanged.

Components are those of :data:`patching.FAMILIES` or of
:data:`attention_attribution.QKV_FAMILIES`; ``frozen`` is a list of hook names
(helpers below name the usual ones). Components whose own hook is frozen
(their patch would be overwritten) are left NaN by both sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .atp_star import resolve_family, residual_contribution_hooks
from .patching import (
    Activations,
    Family,
    Metric,
    Tokens,
    _components,
    _gradient_tap,
    attribution_estimate,
    cache_activations,
    check_replacements,
    check_tokens,
    component_index,
    effect_shape,
    hook_names,
    parameters_frozen,
)

# ---------------------------------------------------------------- which hooks to freeze


def attention_pattern_hooks(model, layers: Sequence[int] | None = None) -> list[str]:
    """``attn.hook_pattern`` of ``layers`` (default: every layer)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    return [f"blocks.{l}.attn.hook_pattern" for l in layers]


def mlp_output_hooks(model, layers: Sequence[int] | None = None) -> list[str]:
    """``hook_mlp_out`` of ``layers`` (default: every layer)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    return [f"blocks.{l}.hook_mlp_out" for l in layers]


def layernorm_scale_hooks(model) -> list[str]:
    """Every LayerNorm's ``hook_scale`` (``1/σ`` per position, ``[batch, pos, 1]``), final LayerNorm last."""
    per_block = [f"blocks.{l}.{ln}.hook_scale" for l in range(model.cfg.n_layers) for ln in ("ln1", "ln2")]
    return per_block + ["ln_final.hook_scale"]


def layer_output_hooks(layer: int) -> list[str]:
    """What block ``layer`` adds to the residual stream (its attention and MLP outputs)."""
    return residual_contribution_hooks(layer)


def everything_nonlinear_hooks(model) -> list[str]:
    """Every pattern, MLP output and LayerNorm scale: frozen together, the metric is linear in any upstream patch."""
    return attention_pattern_hooks(model) + mlp_output_hooks(model) + layernorm_scale_hooks(model)


@dataclass(frozen=True)
class Freeze:
    """One freezing experiment: hooks held at base-run values, MLP layers replaced by their tangent."""

    frozen: tuple[str, ...] = ()
    linearised_mlps: tuple[int, ...] = ()


def _check_freeze(model, freeze: Freeze) -> None:
    unknown = [name for name in freeze.frozen if name not in model.hook_dict]
    if unknown:
        raise ValueError(f"frozen hooks {unknown} do not exist in the model; see diagnosis.layernorm_scale_hooks etc.")
    bad_layers = [l for l in freeze.linearised_mlps if not 0 <= l < model.cfg.n_layers]
    if bad_layers:
        raise ValueError(f"linearised_mlps must be layers in 0..{model.cfg.n_layers - 1}, got {bad_layers}")


def _freeze_hooks(model, base_tokens: Tokens, freeze: Freeze) -> list:
    """Forward hooks that hold ``freeze.frozen`` at their base-run values and linearise ``freeze.linearised_mlps``.

    An MLP is linearised at its activation function: ``post = post₀ + f'(pre₀)·(pre − pre₀)``
    with ``pre₀``, ``post₀`` from the base run (GPT-2's ``gelu_new`` is ``F.gelu(approximate="tanh")``).
    """
    pre_names = [f"blocks.{l}.mlp.hook_pre" for l in freeze.linearised_mlps]
    post_names = [f"blocks.{l}.mlp.hook_post" for l in freeze.linearised_mlps]
    base = cache_activations(model, base_tokens, list(freeze.frozen) + pre_names + post_names)

    def hold(tensor, hook):
        return base[hook.name].to(tensor.dtype).reshape(tensor.shape)

    hooks = [(name, hold) for name in freeze.frozen]
    for pre_name, post_name in zip(pre_names, post_names):
        pre0 = base[pre_name].clone().requires_grad_(True)
        with torch.enable_grad():
            slope = torch.autograd.grad(F.gelu(pre0, approximate="tanh").sum(), pre0)[0]
        current = {}

        def keep_pre(tensor, hook, current=current):
            current["pre"] = tensor
            return tensor

        def tangent(tensor, hook, current=current, pre0=base[pre_name], post0=base[post_name], slope=slope):
            return (post0 + slope * (current["pre"] - pre0)).to(tensor.dtype).reshape(tensor.shape)

        hooks += [(pre_name, keep_pre), (post_name, tangent)]
    return hooks


def frozen_exact_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    freeze: Freeze = Freeze(),
    *,
    components: Sequence[tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """Exact effect of patching each component with ``freeze`` applied to base and patched runs alike.

    ``M(patched, frozen) − M(base, frozen)``, shape :func:`patching.effect_shape`
    (the family's). A freeze leaves the base run unchanged (it holds base-run
    values), so with ``Freeze()`` this is :func:`patching.exact_sweep`. One
    bridge forward per component; ``components`` (``(layer, *index)`` tuples)
    restricts the sweep, leaving NaN elsewhere.
    """
    fam = resolve_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    _check_freeze(model, freeze)
    hooks = _freeze_hooks(model, base_tokens, freeze)
    if components is None:
        components = [tuple(c) for c in _components(model, fam, base_tokens.shape[1], None).tolist()]
    # a component whose own hook is frozen would have its patch overwritten: left NaN
    components = [c for c in components if fam.hook_name(c[0]) not in freeze.frozen]
    effects = torch.full(effect_shape(model, fam, base_tokens.shape[1]), float("nan"))
    with torch.no_grad():
        base_value = metric(model.run_with_hooks(base_tokens, fwd_hooks=hooks)).item()
        for layer, *index in components:
            name = fam.hook_name(layer)
            where = component_index(fam, tuple(index))

            def patch(act, hook, name=name, where=where):
                act = act.clone()
                act[where] = replacements[name][where].to(act.dtype)
                return act

            logits = model.run_with_hooks(base_tokens, fwd_hooks=[(name, patch)] + hooks)
            effects[(layer, *index)] = metric(logits).item() - base_value
    return effects


def frozen_attribution_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    freeze: Freeze = Freeze(),
) -> torch.Tensor:
    """AtP ``(a' − a)·∂M/∂a`` with the gradient cut at ``freeze.frozen``; shape :func:`patching.effect_shape`.

    Cutting the gradient is what freezing does to first order. A linearised MLP
    has the same gradient at the base run as the real one, so
    ``freeze.linearised_mlps`` does not change this estimate (only the exact effect).
    One forward and one backward pass.
    """
    fam = resolve_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    _check_freeze(model, freeze)

    def cut(tensor, hook):
        return tensor.detach()

    names = hook_names(model, fam)
    activations: Activations = {}
    gradients: Activations = {}
    taps = [(name, _gradient_tap(activations, gradients, name)) for name in names]
    # cuts first: a tap on a frozen hook must sit after the cut (it then starts a fresh leaf there)
    with parameters_frozen(model), torch.enable_grad():
        value = metric(model.run_with_hooks(base_tokens, fwd_hooks=[(n, cut) for n in freeze.frozen] + taps))
        if value.requires_grad:
            value.backward()
    for name in names:  # a component every path of which is frozen has no gradient: its estimate is 0
        gradients.setdefault(name, torch.zeros_like(activations[name]))
    estimate = attribution_estimate(activations, gradients, replacements, fam)
    for layer, name in enumerate(hook_names(model, fam)):
        if name in freeze.frozen:
            estimate[layer] = float("nan")  # as in frozen_exact_sweep: the patch itself would be frozen
    return estimate


@dataclass
class Diagnosis:
    """Exact and AtP effects of the same components under several freezes: ``exact[name]``, ``atp[name]``."""

    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    atp: dict[str, torch.Tensor] = field(default_factory=dict)

    def gap(self, name: str) -> torch.Tensor:
        """``AtP − exact`` under the freeze ``name`` (NaN where the exact effect was not computed)."""
        return self.atp[name] - self.exact[name]


def diagnose(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    freezes: Mapping[str, Freeze],
    *,
    components: Sequence[tuple[int, ...]] | None = None,
) -> Diagnosis:
    """Run :func:`frozen_exact_sweep` and :func:`frozen_attribution_sweep` for every named freeze."""
    result = Diagnosis()
    for name, freeze in freezes.items():
        result.exact[name] = frozen_exact_sweep(model, base_tokens, metric, replacements, family, freeze, components=components)
        result.atp[name] = frozen_attribution_sweep(model, base_tokens, metric, replacements, family, freeze)
    return result


def standard_freezes(model, layer: int) -> dict[str, Freeze]:
    """The chapter's freezing experiments for components in ``layer``, by name.

    ``"nothing"``; ``"later attention patterns"`` (layers after ``layer``);
    ``"MLP{layer} output"``; ``"MLP{layer} linearised"`` (its activation
    function replaced by the tangent); ``"LayerNorm scales"`` (all, final
    included); ``"layer ℓ output"`` for every later layer ℓ (the forward
    counterpart of GradDrop's blocked gradient); ``"everything nonlinear"``.
    """
    later = range(layer + 1, model.cfg.n_layers)
    freezes = {
        "nothing": Freeze(),
        "later attention patterns": Freeze(tuple(attention_pattern_hooks(model, later))),
        f"MLP{layer} output": Freeze(tuple(mlp_output_hooks(model, [layer]))),
        f"MLP{layer} linearised": Freeze(linearised_mlps=(layer,)),
        "LayerNorm scales": Freeze(tuple(layernorm_scale_hooks(model))),
    }
    freezes.update({f"layer {l} output": Freeze(tuple(layer_output_hooks(l))) for l in later})
    freezes["everything nonlinear"] = Freeze(tuple(everything_nonlinear_hooks(model)))
    return freezes


def step_norms(
    activations: Activations, replacements: Activations, family: str | Family
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖a' − a‖, ‖a' − a‖ / ‖a‖)`` per component, averaged over prompts: ``[layer, *component]`` each.

    The norm runs over every axis of one prompt's activation that does not
    index a component (so over exactly the numbers a patch of that component
    replaces), for every family alike; the ratio makes families in different
    units (``d_model``, ``d_head``, probabilities) comparable.
    """
    fam = resolve_family(family)
    keep = [1 + fam.axes.index(axis) for axis in fam.component_axes]
    absolute, relative = [], []
    for name in sorted(activations, key=lambda n: int(n.split(".")[1])):
        act = activations[name]
        step = replacements[name].to(act.dtype) - act
        reduce = [d for d in range(1, act.ndim) if d not in keep]
        step_norm = step.pow(2).sum(reduce).sqrt()  # [batch, *component] in activation order
        act_norm = act.pow(2).sum(reduce).sqrt()
        order = sorted(keep)
        permutation = [0] + [1 + order.index(k) for k in keep]
        absolute.append(step_norm.permute(*permutation).mean(0))
        relative.append((step_norm / act_norm.clamp_min(1e-12)).permute(*permutation).mean(0))
    return torch.stack(absolute), torch.stack(relative)
