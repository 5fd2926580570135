"""Exact interventions and their first-order (attribution) estimates.

Every method in the course is one of two operations on a *base run* (the
prompts the model actually sees) and a *replacement* activation ``a'`` for
some component:

* exact: overwrite the component's activation ``a`` with ``a'``, rerun, and
  report ``M(patched) - M(base)``; one forward pass per component;
* attribution: ``(a' - a) · ∂M/∂a``, with ``a`` and the gradient taken on the
  base run; one forward and one backward pass for every component at once.

The choice of base run and replacement names the method:

============================  ===============  =============================
method                        base run         replacement ``a'``
============================  ===============  =============================
zero ablation                 clean            ``0``
mean ablation                 clean            mean of ``a`` over a reference set
resample ablation             clean            ``a`` on other prompts
patching, noising             clean            ``a`` on the corrupted prompts
patching, denoising           corrupted        ``a`` on the clean prompts
============================  ===============  =============================

so zero ablation's estimate is ``(0 - a)·∂M/∂a = -a·∂M/∂a``: the minus sign
is not a convention, it is the direction of the intervention.

A *component family* says which hook holds the activation and how a component
indexes into it (see :data:`FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from jaxtyping import Float, Int

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], Float[torch.Tensor, ""]]
Tokens = Int[torch.Tensor, "batch pos"]
Activations = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """A kind of component: which hook holds it and which axes index it.

    ``axes`` names the activation's axes at ``hook`` (after the batch axis);
    ``component_axes`` are the ones that index a component (besides the layer).
    Every other axis is summed over in an attribution estimate.
    """

    name: str
    hook: str
    axes: tuple[str, ...]
    component_axes: tuple[str, ...]

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)


FAMILIES: dict[str, Family] = {
    "head": Family("head", "blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"), ("head",)),
    "head_pos": Family("head_pos", "blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"), ("head", "pos")),
    "pattern": Family("pattern", "blocks.{layer}.attn.hook_pattern", ("head", "query", "key"), ("head",)),
    "resid_pos": Family("resid_pos", "blocks.{layer}.hook_resid_pre", ("pos", "d_model"), ("pos",)),
    "mlp": Family("mlp", "blocks.{layer}.hook_mlp_out", ("pos", "d_model"), ()),
    "mlp_pos": Family("mlp_pos", "blocks.{layer}.hook_mlp_out", ("pos", "d_model"), ("pos",)),
    "attn_pos": Family("attn_pos", "blocks.{layer}.hook_attn_out", ("pos", "d_model"), ("pos",)),
}

FamilyName = Literal["head", "head_pos", "pattern", "resid_pos", "mlp", "mlp_pos", "attn_pos"]


def get_family(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown component family {family!r}; choose one of {sorted(FAMILIES)}") from None


def hook_names(model, family: str | Family) -> list[str]:
    """The hook name of ``family`` in every layer."""
    fam = get_family(family)
    return [fam.hook_name(layer) for layer in range(model.cfg.n_layers)]


def effect_shape(model, family: str | Family, n_positions: int) -> tuple[int, ...]:
    """Shape of a sweep's result: ``(n_layers, *component_axes)``."""
    fam = get_family(family)
    sizes = {"head": model.cfg.n_heads, "pos": n_positions}
    return (model.cfg.n_layers, *(sizes[a] for a in fam.component_axes))


def component_index(family: Family, component: tuple[int, ...]) -> tuple:
    """An index into the activation ``[batch, *axes]`` selecting one component."""
    index: list = [slice(None)] * (1 + len(family.axes))
    for axis, value in zip(family.component_axes, component):
        index[1 + family.axes.index(axis)] = value
    return tuple(index)


# ---------------------------------------------------------------- caching


def _saver(store: Activations, name: str):
    """A hook that stores its input under ``name`` (TransformerBridge passes the
    aliased hook, e.g. ``blocks.0.hook_in`` for ``blocks.0.hook_resid_pre``)."""

    def save(tensor, hook):
        store[name] = tensor.detach()

    return save


def cache_activations(model, tokens: Tokens, names: list[str]) -> Activations:
    """Activations at the hooks ``names`` on ``tokens`` (no gradients kept)."""
    activations: Activations = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, _saver(activations, name)) for name in names])
    return activations


def cache_activations_and_gradients(
    model, tokens: Tokens, metric: Metric, names: list[str]
) -> tuple[float, Activations, Activations]:
    """One forward and one backward pass: metric value, activations and ``∂M/∂a``.

    Gradients are captured with backward hooks, because ``retain_grad()`` has no
    effect at TransformerBridge's converted hook points.
    """
    activations: Activations = {}
    gradients: Activations = {}
    fwd = [(name, _saver(activations, name)) for name in names]
    bwd = [(name, _saver(gradients, name)) for name in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        value = metric(model(tokens))
        value.backward()
    model.zero_grad(set_to_none=True)
    missing = [n for n in names if n not in gradients]
    if missing:
        raise RuntimeError(f"no gradient reached hook(s) {missing}; does the metric depend on them?")
    return value.item(), activations, gradients


# ---------------------------------------------------------------- replacements


def zero_replacement(activations: Activations) -> Activations:
    """``a' = 0`` for every cached activation."""
    return {name: torch.zeros_like(act) for name, act in activations.items()}


def mean_replacement(activations: Activations) -> Activations:
    """``a'`` = the mean over the batch (kept per position), broadcast back to the batch."""
    return {name: act.mean(0, keepdim=True).expand_as(act) for name, act in activations.items()}


def replacement_activations(
    model,
    family: str | Family,
    *,
    kind: Literal["zero", "mean", "resample", "patch"],
    base_tokens: Tokens,
    source_tokens: Tokens | None = None,
) -> Activations:
    """Replacement activations for every layer of ``family``, shaped like the base run's.

    * ``"zero"``: zeros.
    * ``"mean"``: the mean over ``source_tokens`` (default: the base prompts), per position.
    * ``"resample"`` / ``"patch"``: the activations on ``source_tokens`` row by row
      (other prompts for resampling, the corrupted or clean twins for patching).
    """
    names = hook_names(model, family)
    if kind == "zero":
        base = cache_activations(model, base_tokens[:1], names)
        return {n: torch.zeros((base_tokens.shape[0], *a.shape[1:]), dtype=a.dtype) for n, a in base.items()}
    if kind == "mean":
        source = base_tokens if source_tokens is None else source_tokens
        means = cache_activations(model, source, names)
        return {n: a.mean(0, keepdim=True).expand(base_tokens.shape[0], *a.shape[1:]) for n, a in means.items()}
    if kind in ("resample", "patch"):
        if source_tokens is None:
            raise ValueError(f"replacement kind {kind!r} needs source_tokens")
        if source_tokens.shape != base_tokens.shape:
            raise ValueError(
                f"source_tokens {tuple(source_tokens.shape)} and base_tokens {tuple(base_tokens.shape)} "
                "must have the same shape, so each prompt is patched from its own twin"
            )
        return cache_activations(model, source_tokens, names)
    raise ValueError(f"replacement kind must be 'zero', 'mean', 'resample' or 'patch', got {kind!r}")


# ---------------------------------------------------------------- exact


def exact_effect(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    layer: int,
    component: tuple[int, ...],
) -> float:
    """``M(base with one component replaced) - M(base)``, exactly, by rerunning."""
    fam = get_family(family)
    name = fam.hook_name(layer)
    index = component_index(fam, component)

    def replace(act, hook):
        act = act.clone()
        act[index] = replacements[name][index].to(act.dtype)
        return act

    with torch.no_grad():
        base = metric(model(base_tokens)).item()
        patched = metric(model.run_with_hooks(base_tokens, fwd_hooks=[(name, replace)])).item()
    return patched - base


def exact_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    *,
    variants_per_pass: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Exact effect of replacing each component of ``family`` in turn.

    Returns ``M(patched) - M(base)`` with shape :func:`effect_shape`. To cut the
    Python and kernel-launch overhead, ``variants_per_pass`` patched copies of the
    batch are stacked along the batch axis and run in one forward pass;
    ``variants_per_pass=1`` is the plain one-at-a-time loop (same numbers).
    """
    from tqdm.auto import tqdm

    fam = get_family(family)
    batch = base_tokens.shape[0]
    shape = effect_shape(model, fam, base_tokens.shape[1])
    components = list(torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist())
    effects = torch.empty(len(components))
    with torch.no_grad():
        base_value = metric(model(base_tokens)).item()
        chunks = range(0, len(components), variants_per_pass)
        for start in tqdm(chunks, disable=not progress, desc=f"exact {fam.name}"):
            chunk = components[start : start + variants_per_pass]
            by_layer: dict[int, list[tuple[int, tuple]]] = {}
            for k, (layer, *rest) in enumerate(chunk):
                by_layer.setdefault(layer, []).append((k, component_index(fam, tuple(rest))))

            def make_hook(name, layer_items):
                def replace(act, hook):
                    act = act.clone()
                    source = replacements[name].to(act.dtype)
                    for k, index in layer_items:
                        rows = slice(k * batch, (k + 1) * batch)
                        act[(rows, *index[1:])] = source[index]
                    return act

                return replace

            hooks = [(fam.hook_name(layer), make_hook(fam.hook_name(layer), items)) for layer, items in by_layer.items()]
            logits = model.run_with_hooks(base_tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
            for k in range(len(chunk)):
                effects[start + k] = metric(logits[k * batch : (k + 1) * batch]).item() - base_value
    return effects.reshape(shape)


# ---------------------------------------------------------------- attribution


def attribution_estimate(
    activations: Activations,
    gradients: Activations,
    replacements: Activations,
    family: str | Family,
) -> torch.Tensor:
    """First-order estimate ``(a' - a) · ∂M/∂a`` for every component of ``family``.

    ``activations`` and ``gradients`` come from the base run, with the metric
    averaged over the batch; the product is summed over the batch and every
    axis that does not index a component. Shape :func:`effect_shape`.
    """
    fam = get_family(family)
    keep = [1 + fam.axes.index(axis) for axis in fam.component_axes]
    per_layer = []
    for name in sorted(activations, key=_layer_of):
        product = (replacements[name] - activations[name]) * gradients[name]
        summed = [d for d in range(product.ndim) if d not in keep]
        reduced = product.sum(dim=summed)
        # summing leaves the kept axes in activation order; put them in component order
        order = sorted(keep)
        reduced = reduced.permute(*[order.index(k) for k in keep]) if len(keep) > 1 else reduced
        per_layer.append(reduced)
    return torch.stack(per_layer)


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


def attribution_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
) -> torch.Tensor:
    """Attribution for every component of ``family``: one forward and one backward pass."""
    names = hook_names(model, family)
    _, activations, gradients = cache_activations_and_gradients(model, base_tokens, metric, names)
    return attribution_estimate(activations, gradients, replacements, family)
