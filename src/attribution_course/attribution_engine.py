"""Attribution patching at the cost floor: the bridge's hook names, the bare model's speed.

:func:`patching.attribution_sweeps` caches activations and gradients at
TransformerLens hook names (``blocks.0.attn.hook_z`` ...). Running those passes
through the TransformerBridge costs 1.2-1.3× a bare ``transformers`` forward and
backward (its hook points and weight processing sit on every call). This module
runs the same two passes on the bare ``GPT2LMHeadModel`` behind the bridge, with
plain PyTorch hooks at the modules that compute each hook point, and returns the
activations and gradients *in the bridge's own coordinates*, so every estimate is
the bridge's to float rounding:

==============================  ==========================================  ==================================
bridge hook                     bare module                                 bridge coordinates from bare values
==============================  ==========================================  ==================================
``blocks.L.hook_resid_pre``     input of ``transformer.h[L]``               centred over ``d_model``
``blocks.L.attn.hook_z``        input of ``transformer.h[L].attn.c_proj``   ``[b, p, head, d_head]``, minus ``b_V^eff``
``blocks.L.hook_attn_out``      output of ``transformer.h[L].attn``         centred over ``d_model``
``blocks.L.hook_mlp_out``       output of ``transformer.h[L].mlp``          centred over ``d_model``
==============================  ==========================================  ==================================

Why these conversions are exact: compatibility mode *centres* every weight that
writes to the residual stream, which removes the mean over ``d_model`` of each
write, and folds each head's effective value bias ``b_V^eff`` out of ``z`` into the
output bias (:mod:`zero_ablation`). Every reader of the residual stream is a
LayerNorm, which ignores that mean, so the gradients are the same in both
coordinate systems, and the unembedding is centred over the vocabulary: the twin
built here gets an untied, centred copy of it, so the metric sees the bridge's
logits exactly. The attention pattern (``hook_pattern``) has no module of its own in
``transformers`` (it is computed inside a function), so families that need it stay
on the bridge.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from .patching import _gradient_tap, _saver

Activations = dict[str, torch.Tensor]

#: Hook-name templates this engine serves (every family of ``patching`` except ``pattern``).
SUPPORTED_HOOKS = (
    "blocks.{layer}.hook_resid_pre",
    "blocks.{layer}.attn.hook_z",
    "blocks.{layer}.hook_attn_out",
    "blocks.{layer}.hook_mlp_out",
)
SOURCE_ATTRIBUTE = "course_model_source"
#: bridge -> its bare twin. Not an attribute of the bridge: nn.Module would register the twin as a
#: submodule, and its parameters would show up in ``model.parameters()``, ``model.train()`` and so on.
_TWINS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _parse(name: str) -> tuple[str, int]:
    """``("blocks.{layer}.attn.hook_z", 3)`` for ``"blocks.3.attn.hook_z"``; ``ValueError`` if not served."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        template = ".".join(["blocks", "{layer}", *parts[2:]])
        if template in SUPPORTED_HOOKS:
            return template, int(parts[1])
    raise ValueError(f"the bare attribution engine does not serve hook {name!r}; it serves {SUPPORTED_HOOKS}")


def serves(names) -> bool:
    """Whether every hook name in ``names`` can be cached on the bare twin."""
    try:
        for name in names:
            _parse(name)
    except ValueError:
        return False
    return True


def bridge_has_hooks(model) -> bool:
    """Whether hooks are attached to the bridge (``with model.hooks(...)``): the twin would not see them."""
    return any(hook_point.has_hooks() for hook_point in model.hook_dict.values())


def bare_twin(model) -> nn.Module | None:
    """The bare ``GPT2LMHeadModel`` matching ``model`` (a bridge from :func:`model.load_model`), or None.

    Loaded once from the same source and cached on the bridge. Its unembedding is
    untied from the token embedding and centred over the vocabulary, like the
    bridge's, so both give the same logits. ``None`` when the model was not built by
    :func:`model.load_model` or is not a GPT-2 (the caller stays on the bridge).
    """
    twin = _TWINS.get(model)
    if twin is not None:
        return twin
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    if source is None:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    # no "Loading weights" bar: the first attribution call may sit in a graded exercise cell,
    # where nbval treats any stderr output as a changed result
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        twin = AutoModelForCausalLM.from_pretrained(source)
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    if getattr(twin.config, "model_type", None) != "gpt2":
        return None
    with torch.no_grad():
        unembed = twin.get_output_embeddings()
        centred = nn.Linear(unembed.in_features, unembed.out_features, bias=unembed.bias is not None)
        centred.weight.copy_(unembed.weight - unembed.weight.mean(0, keepdim=True))  # [vocab, d_model]
        if unembed.bias is not None:
            centred.bias.copy_(unembed.bias - unembed.bias.mean())
        twin.lm_head = centred
        twin.config.tie_word_embeddings = False
    twin.eval()  # after the new unembedding is in place: dropout off everywhere
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    _TWINS[model] = twin
    return twin


class _Tap:
    """One hook point on the twin, recorded by :mod:`patching`'s own taps (``_gradient_tap``
    when gradients are wanted, else ``_saver``) in the twin's coordinates; :meth:`in_bridge`
    then gives the bridge's view. ``to_bridge`` is a shift that does not change the gradient,
    ``reshape`` splits heads where the bridge does; the model computes on the bare tensor.
    """

    def __init__(self, name: str, to_bridge: Callable[[torch.Tensor], torch.Tensor],
                 reshape: Callable[[torch.Tensor], torch.Tensor], raw: Activations, raw_gradients: Activations | None):
        self.name, self.to_bridge, self.reshape = name, to_bridge, reshape
        self.record = _saver(raw, name) if raw_gradients is None else _gradient_tap(raw, raw_gradients, name)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        kept = self.record(tensor, None)  # _gradient_tap may swap in a leaf where the backward pass stops
        return tensor if kept is None else kept

    def in_bridge(self, raw: Activations, raw_gradients: Activations) -> tuple[torch.Tensor, torch.Tensor | None]:
        gradient = raw_gradients.get(self.name)
        return self.to_bridge(self.reshape(raw[self.name])), None if gradient is None else self.reshape(gradient)


def _centred(tensor: torch.Tensor) -> torch.Tensor:
    return tensor - tensor.mean(-1, keepdim=True)


def _register(twin: nn.Module, model, name: str, raw: Activations, raw_gradients: Activations | None):
    """Attach the PyTorch hook that serves bridge hook ``name`` on the twin; returns its handle and tap."""
    template, layer = _parse(name)
    block = twin.transformer.h[layer]
    n_heads = model.cfg.n_heads
    identity = lambda t: t  # noqa: E731
    if template == "blocks.{layer}.hook_resid_pre":
        tap = _Tap(name, _centred, identity, raw, raw_gradients)

        def pre_block(module, args, kwargs):
            if args:
                return (tap(args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=tap(kwargs["hidden_states"]))
            return args, kwargs

        return block.register_forward_pre_hook(pre_block, with_kwargs=True), tap
    if template == "blocks.{layer}.attn.hook_z":
        from .zero_ablation import head_value_bias

        value_bias = head_value_bias(model)[layer]  # [head, d_head]
        split = lambda t: t.reshape(*t.shape[:-1], n_heads, -1)  # noqa: E731  [b, p, head*d_head] -> [b, p, head, d_head]
        tap = _Tap(name, lambda z: z - value_bias.to(z.dtype), split, raw, raw_gradients)
        return block.attn.c_proj.register_forward_pre_hook(lambda module, args: (tap(args[0]), *args[1:])), tap
    if template == "blocks.{layer}.hook_attn_out":
        tap = _Tap(name, _centred, identity, raw, raw_gradients)

        def after_attention(module, args, output):
            if isinstance(output, tuple):
                return (tap(output[0]), *output[1:])
            return tap(output)

        return block.attn.register_forward_hook(after_attention), tap
    tap = _Tap(name, _centred, identity, raw, raw_gradients)  # blocks.{layer}.hook_mlp_out
    return block.mlp.register_forward_hook(lambda module, args, output: tap(output)), tap


def _run(twin, model, tokens: torch.Tensor, names: list[str], gradients: Activations | None, metric=None):
    """One twin forward (and, with ``metric``, one backward); returns the metric value and the
    activations at ``names`` in bridge coordinates, and fills ``gradients`` (if given) likewise."""
    raw: Activations = {}
    raw_gradients: Activations | None = None if gradients is None else {}
    registered = [_register(twin, model, name, raw, raw_gradients) for name in names]
    try:
        value = None
        if metric is None:
            with torch.no_grad():
                twin(tokens)
        else:
            with torch.enable_grad():
                output = metric(twin(tokens).logits)
                if not output.requires_grad:
                    raise RuntimeError(f"the metric does not depend on any of the hooks {names}")
                output.backward()
            value = output.item()
    finally:
        for handle, _ in registered:
            handle.remove()
    activations: Activations = {}
    for _, tap in registered:
        activations[tap.name], gradient = tap.in_bridge(raw, raw_gradients or {})
        if gradients is not None and gradient is not None:
            gradients[tap.name] = gradient
    return value, activations


def cache_activations(model, tokens: torch.Tensor, names: list[str]) -> Activations:
    """:func:`patching.cache_activations` on the bare twin (one no-grad forward)."""
    _, activations = _run(bare_twin(model), model, tokens, names, None)
    return activations


def cache_activations_and_gradients(model, tokens: torch.Tensor, metric, names: list[str]) -> tuple[float, Activations, Activations]:
    """:func:`patching.cache_activations_and_gradients` on the bare twin: one forward, one backward.

    The twin's parameters never require gradients, so the backward pass computes no
    weight gradient and stops at the earliest tapped activation.
    """
    gradients: Activations = {}
    value, activations = _run(bare_twin(model), model, tokens, names, gradients, metric)
    missing = [n for n in names if n not in gradients]
    if missing:
        raise RuntimeError(f"no gradient reached hook(s) {missing}; does the metric depend on them?")
    return value, activations, gradients


def usable(model, names) -> bool:
    """Whether :func:`patching.attribution_sweeps` may run on the bare twin for these hook names."""
    return serves(names) and not bridge_has_hooks(model) and bare_twin(model) is not None
