"""AtP* (Kramár et al. 2024): two fixes for attribution patching's false negatives, and its scores.

Attribution patching (AtP) estimates the effect of patching a component by
``(a' − a) · ∂M/∂a``. Kramár et al. name two ways it produces *false negatives*
(components with a large exact effect and a small estimate) and fix each:

* **QK fix** (attention saturation). Patching a head's queries or keys moves
  its attention logits; if the softmax is saturated its gradient is nearly
  zero and the linear estimate sees almost nothing, however far the pattern
  would really move. The fix recomputes the head's pattern *exactly* with the
  patched queries (or keys), ``A' = softmax(q'·k / √d)``, and linearises only
  what comes after the pattern: ``Σ_{q,k} (A' − A)_{qk} · ∂M/∂A_{qk}``
  (:func:`qk_fix_sweep`). It applies to the query and key families
  (:data:`attention_attribution.QKV_FAMILIES`). For a head's output ``z``
  (family ``"head"``) there is nothing to fix: AtP already uses the patched
  ``z'``, computed with the patched pattern exactly.
* **GradDrop** (cancellation between a component's direct and indirect
  effects). For each layer ``ℓ`` the gradient is recomputed with the gradient
  flow through layer ``ℓ``'s contribution to the residual stream (its
  attention and MLP outputs) blocked, giving per-prompt estimates
  ``I_ℓ(n; x)``; the score is

  .. math:: ĉ_{GD}(n) = \\mathbb{E}_x \\Big[ \\tfrac{1}{L-1} \\sum_{ℓ=1}^{L} |I_ℓ(n; x)| \\Big]

  (their eq. 11). If paths through different layers cancel, some ``I_ℓ`` with
  one path removed is large, so the score is not small. Layers at or below
  ``n``'s own give ``I_ℓ = AtP`` (before it) or ``0`` (its own layer, which
  carries all of ``n``'s output), hence ``L − 1``. The score is an unsigned
  size, in the metric's units; :func:`grad_drop_sweep`.

AtP* is both together. The scores of the paper (:func:`top_k_recall`,
:func:`false_negatives`) compare an estimate's ranking with the exact one;
:func:`compare_estimators` runs AtP, AtP + QK fix, AtP + GradDrop, AtP* and
integrated gradients (:mod:`corrections`) against exact patching.

Every per-prompt quantity here assumes the metric is the *mean over the batch*
of a per-prompt metric (as :func:`metrics.logit_diff` is), so that ``batch ×``
a prompt's gradient is that prompt's own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float

from .attention_attribution import QKV_FAMILIES, attention_pattern
from .corrections import integrated_gradients_activations_sweep
from .patching import (
    Activations,
    Family,
    Metric,
    Tokens,
    _gradient_tap,
    cache_activations,
    check_tokens,
    exact_sweep,
    get_family,
    hook_names,
    layer_of_hook,
    parameters_frozen,
)

#: Families whose estimate the QK fix changes (it recomputes the pattern from patched queries or keys).
QK_FIXABLE = ("head_q", "head_k")


def resolve_family(family: str | Family) -> Family:
    """A family of :data:`patching.FAMILIES` or :data:`attention_attribution.QKV_FAMILIES`."""
    if isinstance(family, str) and family in QKV_FAMILIES:
        return QKV_FAMILIES[family]
    return get_family(family)


def residual_contribution_hooks(layer: int) -> list[str]:
    """The hooks through which block ``layer`` writes to the residual stream."""
    return [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]


def gradients_with_layer_blocked(
    model, tokens: Tokens, metric: Metric, names: Sequence[str], blocked_layer: int | None
) -> tuple[Activations, Activations]:
    """Activations and ``∂M/∂a`` at ``names``, with no gradient through block ``blocked_layer``.

    The forward pass is the ordinary one (values unchanged); only the backward
    pass is cut where block ``blocked_layer`` adds its attention and MLP outputs
    to the residual stream. A hook the metric's gradient cannot reach any more
    gets a zero gradient. ``blocked_layer=None`` blocks nothing (plain AtP).
    """
    activations: Activations = {}
    gradients: Activations = {}
    taps = [(name, _gradient_tap(activations, gradients, name)) for name in names]

    def block(tensor, hook):
        return tensor.detach()

    # taps first: a tap on a blocked hook must sit upstream of the cut, or it would reopen it
    blockers = [] if blocked_layer is None else [(n, block) for n in residual_contribution_hooks(blocked_layer)]
    with parameters_frozen(model), torch.enable_grad():
        value = metric(model.run_with_hooks(tokens, fwd_hooks=taps + blockers))
        if value.requires_grad:
            value.backward()
    for name in names:
        gradients.setdefault(name, torch.zeros_like(activations[name]))
    return activations, gradients


def per_prompt_estimate(
    activations: Activations,
    gradients: Activations,
    replacements: Activations,
    family: Family,
) -> Float[torch.Tensor, "layer *component batch"]:
    """``(a' − a) · ∂M_x/∂a`` for every component and every prompt ``x`` separately.

    ``gradients`` are of the batch-mean metric, so they are multiplied by the
    batch size to give each prompt's own gradient. Summing the result over the
    last axis and dividing by the batch size gives :func:`patching.attribution_estimate`.
    """
    keep = [1 + family.axes.index(axis) for axis in family.component_axes]
    per_layer = []
    for name in sorted(activations, key=layer_of_hook):
        act = activations[name]
        product = (replacements[name].to(act.dtype) - act) * gradients[name] * act.shape[0]
        reduced = product.sum(dim=[d for d in range(1, product.ndim) if d not in keep])  # [batch, *kept]
        order = sorted(keep)
        reduced = reduced.permute(*[1 + order.index(k) for k in keep], 0)
        per_layer.append(reduced)
    return torch.stack(per_layer)


def _pattern_names(model) -> list[str]:
    return [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]


def _qk_names(model) -> tuple[list[str], list[str]]:
    layers = range(model.cfg.n_layers)
    return [f"blocks.{l}.attn.hook_q" for l in layers], [f"blocks.{l}.attn.hook_k" for l in layers]


@dataclass
class _PatchedPatterns:
    """Each layer's clean pattern and the pattern with every head's queries (or keys) patched, exactly."""

    clean: list[torch.Tensor]
    patched: list[torch.Tensor]


def _patched_patterns(model, base_tokens: Tokens, source_tokens: Tokens, family: Family) -> _PatchedPatterns:
    """Patterns ``[batch, head, query, key]`` per layer: clean, and recomputed with patched queries or keys.

    Every head's pattern depends only on its own queries and keys, so patching
    all heads' queries at once gives each head's singly-patched pattern.
    """
    q_names, k_names = _qk_names(model)
    base = cache_activations(model, base_tokens, q_names + k_names + _pattern_names(model))
    source = cache_activations(model, source_tokens, q_names if family.name == "head_q" else k_names)
    clean, patched = [], []
    for layer in range(model.cfg.n_layers):
        q, k = base[q_names[layer]], base[k_names[layer]]
        if family.name == "head_q":
            q = source[q_names[layer]]
        else:
            k = source[k_names[layer]]
        clean.append(base[_pattern_names(model)[layer]])
        patched.append(attention_pattern(q, k))
    return _PatchedPatterns(clean, patched)


def _per_prompt_qk_fixed(patterns: _PatchedPatterns, pattern_gradients: Activations, model) -> torch.Tensor:
    """``Σ_{q,k} (A' − A) · ∂M_x/∂A`` per ``[layer, head, batch]``."""
    names = _pattern_names(model)
    per_layer = []
    for layer, name in enumerate(names):
        delta = patterns.patched[layer] - patterns.clean[layer]
        grad = pattern_gradients[name] * delta.shape[0]
        per_layer.append((delta * grad).sum((2, 3)).T)  # [head, batch]
    return torch.stack(per_layer)


def _check_qk_family(family: Family) -> None:
    if family.name not in QK_FIXABLE:
        raise ValueError(
            f"the QK fix recomputes a pattern from patched queries or keys: family must be one of {QK_FIXABLE}, "
            f"got {family.name!r} (for 'head' AtP already uses the patched z exactly)"
        )


def qk_fix_sweep(model, base_tokens: Tokens, source_tokens: Tokens, metric: Metric, family: str | Family) -> torch.Tensor:
    """AtP with the QK fix for every head's queries (``"head_q"``) or keys (``"head_k"``): ``[layer, head]``.

    ``Σ_{batch,q,k} (A' − A) · ∂M/∂A``, with ``A'`` the head's pattern recomputed
    exactly from the ``source_tokens`` queries (or keys) and the base run's keys
    (or queries), and ``∂M/∂A`` the gradient at ``hook_pattern`` on the base run.
    Cost: one forward on the source prompts, one forward and one backward on the base.
    """
    fam = resolve_family(family)
    _check_qk_family(fam)
    check_tokens(base_tokens, "base_tokens")
    check_tokens(source_tokens, "source_tokens")
    patterns = _patched_patterns(model, base_tokens, source_tokens, fam)
    _, gradients = gradients_with_layer_blocked(model, base_tokens, metric, _pattern_names(model), None)
    return _per_prompt_qk_fixed(patterns, gradients, model).mean(-1)


def grad_drop_sweep(
    model,
    base_tokens: Tokens,
    source_tokens: Tokens,
    metric: Metric,
    family: str | Family,
    *,
    qk_fix: bool = False,
    per_prompt: bool = True,
) -> torch.Tensor:
    """AtP + GradDrop (``qk_fix=True``: AtP*) for patching from ``source_tokens``: ``[layer, *component]``, ≥ 0.

    ``1/(L−1) Σ_ℓ |I_ℓ|`` with ``I_ℓ`` the estimate whose gradient has the flow
    through block ``ℓ``'s residual contribution blocked (module docstring),
    averaged over prompts with the absolute value taken per prompt
    (``per_prompt=True``, the paper's eq. 11), or taken of the batch mean of
    ``I_ℓ`` (``per_prompt=False``, comparable in scale with ``|exact|``, which is
    the absolute value of a batch mean). Cost: ``n_layers`` forward and backward passes.
    """
    fam = resolve_family(family)
    if qk_fix:
        _check_qk_family(fam)
    check_tokens(base_tokens, "base_tokens")
    check_tokens(source_tokens, "source_tokens")
    n_layers = model.cfg.n_layers
    if n_layers < 2:
        raise ValueError("GradDrop divides by n_layers - 1 and needs a model with at least 2 layers")
    if qk_fix:
        patterns = _patched_patterns(model, base_tokens, source_tokens, fam)
        names = _pattern_names(model)
    else:
        names = hook_names(model, fam)
        replacements = cache_activations(model, source_tokens, names)
    total = None
    for blocked in range(n_layers):
        activations, gradients = gradients_with_layer_blocked(model, base_tokens, metric, names, blocked)
        if qk_fix:
            estimate = _per_prompt_qk_fixed(patterns, gradients, model)
        else:
            estimate = per_prompt_estimate(activations, gradients, replacements, fam)
        size = estimate.abs().mean(-1) if per_prompt else estimate.mean(-1).abs()
        total = size if total is None else total + size
    return total / (n_layers - 1)


# ---------------------------------------------------------------- AtP*'s scores


def top_k_recall(exact: torch.Tensor, estimate: torch.Tensor, k: int) -> float:
    """Fraction of the ``k`` components with the largest ``|exact|`` among the ``k`` largest ``|estimate|``."""
    exact, estimate = exact.flatten(), estimate.flatten()
    if exact.shape != estimate.shape:
        raise ValueError(f"exact and estimate must hold the same components, got {exact.numel()} and {estimate.numel()}")
    if not 1 <= k <= exact.numel():
        raise ValueError(f"k must be between 1 and the number of components ({exact.numel()}), got {k}")
    true_top = set(exact.abs().topk(k).indices.tolist())
    found = set(estimate.abs().topk(k).indices.tolist())
    return len(true_top & found) / k


def false_negatives(exact: torch.Tensor, estimate: torch.Tensor, *, threshold: float = 0.1) -> torch.Tensor:
    """Mask of components with ``|exact| ≥ threshold·max|exact|`` but ``|estimate| < threshold·max|exact|``.

    Large and small are cut at the same value, in the metric's units, so an
    estimate that shrinks a large effect below the cut is a false negative.
    Same shape as ``exact``.
    """
    if exact.shape != estimate.shape:
        raise ValueError(f"exact {tuple(exact.shape)} and estimate {tuple(estimate.shape)} must have the same shape")
    cut = threshold * exact.abs().max()
    return (exact.abs() >= cut) & (estimate.abs() < cut)


METHODS = ("AtP", "AtP+QK fix", "AtP+GradDrop", "AtP*", "IG")


@dataclass
class Comparison:
    """Exact effects and every estimator's estimate, per family, ``[layer, head]`` each.

    ``estimates[family][method]``; for families the QK fix does not apply to,
    ``"AtP+QK fix"`` is AtP and ``"AtP*"`` is AtP + GradDrop.
    """

    exact: dict[str, torch.Tensor]
    estimates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def pooled(self, method: str, families: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exact, estimate)`` of ``families``' components (default: all) in one flat tensor each."""
        families = list(self.exact) if families is None else list(families)
        return (
            torch.cat([self.exact[f].flatten() for f in families]),
            torch.cat([self.estimates[f][method].flatten() for f in families]),
        )

    def scores(self, *, k: int, threshold: float = 0.1, families: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """``{method: {"recall": top-k recall, "false_negatives": count}}`` over ``families`` pooled (default: all).

        ``threshold`` is relative to the largest ``|exact|`` among those families (:func:`false_negatives`).
        """
        table = {}
        for method in METHODS:
            exact, estimate = self.pooled(method, families)
            table[method] = {
                "recall": top_k_recall(exact, estimate, k),
                "false_negatives": int(false_negatives(exact, estimate, threshold=threshold).sum()),
            }
        return table


def compare_estimators(
    model,
    base_tokens: Tokens,
    source_tokens: Tokens,
    metric: Metric,
    *,
    families: Sequence[str] = ("head", "head_q", "head_k", "head_v"),
    ig_steps: int = 8,
    grad_drop_per_prompt: bool = False,
) -> Comparison:
    """Exact patching from ``source_tokens`` next to AtP, AtP + QK fix, AtP + GradDrop, AtP* and IG.

    Noising: ``base_tokens`` = clean, ``source_tokens`` = corrupted. Every
    family's components are heads (one component per head, every position).
    GradDrop's scores are unsigned; compare with ``|exact|``.
    """
    from .patching import attribution_sweep

    comparison = Comparison(exact={})
    for name in families:
        fam = resolve_family(name)
        replacements = cache_activations(model, source_tokens, hook_names(model, fam))
        comparison.exact[name] = exact_sweep(model, base_tokens, metric, replacements, fam)
        atp = attribution_sweep(model, base_tokens, metric, replacements, fam)
        grad_drop = grad_drop_sweep(model, base_tokens, source_tokens, metric, fam, per_prompt=grad_drop_per_prompt)
        if fam.name in QK_FIXABLE:
            qk = qk_fix_sweep(model, base_tokens, source_tokens, metric, fam)
            star = grad_drop_sweep(
                model, base_tokens, source_tokens, metric, fam, qk_fix=True, per_prompt=grad_drop_per_prompt
            )
        else:
            qk, star = atp, grad_drop
        comparison.estimates[name] = {
            "AtP": atp,
            "AtP+QK fix": qk,
            "AtP+GradDrop": grad_drop,
            "AtP*": star,
            "IG": integrated_gradients_activations_sweep(model, base_tokens, metric, replacements, fam, steps=ig_steps),
        }
    return comparison
