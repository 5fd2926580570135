"""Zero ablation that removes a component, on a model in compatibility mode.

What "set it to zero" does depends on the coordinates of the hook.
:func:`model.load_model` turns on TransformerBridge's compatibility mode, which
*folds* the model's weights:

* the LayerNorm scale and bias go into the next linear map (``W_Q``, ``W_K``,
  ``W_V``, ``W_in``), and
* each head's value bias, which after folding is ``b_V^eff = b_V + β_LN1 · W_V``
  (Hugging Face's ``c_attn`` bias plus ``ln_1.bias`` pushed through ``W_V``),
  is moved into the attention output bias ``b_O``. That is exact because every
  row of an attention pattern sums to one, so the bias reaches ``z`` unchanged.
* every weight that writes to the residual stream is centred (mean over
  ``d_model`` removed); every reader starts with a LayerNorm that removes that
  mean anyway, so centring changes no logit difference.

So the bridge's ``blocks.L.attn.hook_z`` holds ``z_raw − b_V^eff`` per head,
and ``hook_z = 0`` is *not* a silent head: the head still writes
``b_V^eff · W_O`` through the folded ``b_O``. The head writes nothing when its
raw ``z`` is zero, i.e. when ``hook_z = −b_V^eff``. That is the replacement
:func:`silent_replacement` returns, and what ``kind="zero"`` means in
:func:`patching.replacement_activations` and :func:`patching.attribution_sweeps`.

Which coordinates each family's zero acts on (the model's own, Hugging Face's):

============  ====================================  ==========================================
family        hook                                  zero ablation makes the component write
============  ====================================  ==========================================
head(_pos)    ``attn.hook_z`` (value bias folded)   nothing: ``hook_z = −b_V^eff`` (raw ``z = 0``)
pattern       ``attn.hook_pattern``                 its value bias still (``z = 0`` in folded
                                                    coordinates); use :func:`attention_attribution.edge_attribution`
                                                    for a pattern zero that includes the bias
mlp(_pos)     ``hook_mlp_out`` (incl. ``b_out``)    nothing (up to the all-ones direction,
                                                    which every LayerNorm reading it removes)
attn_pos      ``hook_attn_out`` (incl. ``b_O``)     nothing (same remark)
resid_pos     ``hook_resid_pre``                    a residual stream of zeros
============  ====================================  ==========================================

``kind="folded_zero"`` keeps the literal zero of the hook's coordinates for
every family (the old meaning of ``"zero"``, shown next to the true one by
:func:`head_zero_effects`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from .patching import (
    Activations,
    Family,
    Metric,
    Tokens,
    cache_activations_and_gradients,
    exact_sweep,
    get_family,
    hook_names,
    layer_of_hook,
)

#: Hooks whose activation holds each head's output *without* its value bias.
_VALUE_BIAS_FOLDED_HOOKS = ("blocks.{layer}.attn.hook_z",)


#: Attribute under which :func:`record_value_bias` stores ``b_V^eff`` on a model.
VALUE_BIAS_ATTRIBUTE = "course_head_value_bias"


def record_value_bias(model) -> None:
    """Store each head's effective value bias on ``model``, *before* compatibility mode folds it away.

    ``b_V^eff = b_V + β_LN1 · W_V`` per head, ``[layer, head, d_head]``, from
    the bridge's unprocessed weights (the Hugging Face ``c_attn`` value bias and
    ``ln_1.bias``). After :meth:`enable_compatibility_mode` neither is left
    anywhere: the bridge's ``b_V`` is 0, its LayerNorm bias is folded, and even
    ``model.original_model``'s ``ln_1.bias`` has been overwritten, so it cannot
    be recovered afterwards. :func:`model.load_model` calls this.
    """
    from .exact_engine import _unwrap

    with torch.no_grad():
        W_V, b_V = model.W_V, model.b_V  # [layer, head, d_model, d_head], [layer, head, d_head]
        biases = []
        for layer in range(model.cfg.n_layers):
            ln_bias = getattr(_unwrap(model.blocks[layer].ln1), "bias", None)
            folded_in = 0.0 if ln_bias is None else torch.einsum("m,hmd->hd", ln_bias, W_V[layer])
            biases.append(b_V[layer] + folded_in)
    setattr(model, VALUE_BIAS_ATTRIBUTE, torch.stack(biases).detach().clone())


def head_value_bias(model) -> Float[torch.Tensor, "layer head d_head"]:
    """Each head's effective value bias ``b_V^eff = b_V + β_LN1 · W_V`` (stored by :func:`record_value_bias`).

    It is what the bridge's ``hook_z`` lacks of the head's raw ``z``
    (``tests/test_zero_ablation.py`` checks this against a plain Hugging Face
    forward). Raises ``ValueError`` for a model not loaded with
    :func:`model.load_model` (or without :func:`record_value_bias`).
    """
    bias = getattr(model, VALUE_BIAS_ATTRIBUTE, None)
    if bias is None:
        raise ValueError(
            "this model carries no record of its heads' value biases; load it with "
            "attribution_course.model.load_model (or call zero_ablation.record_value_bias(model) "
            "before model.enable_compatibility_mode())"
        )
    return bias


def folds_value_bias(family: str | Family) -> bool:
    """Whether ``family``'s hook holds head outputs without their (folded) value bias."""
    return get_family(family).hook in _VALUE_BIAS_FOLDED_HOOKS


def silent_replacement(model, family: str | Family, like: Activations) -> Activations:
    """The replacement that makes each component of ``family`` write nothing.

    ``like`` maps each layer's hook name to an activation of the base run
    (``[batch, *axes]``), only its shape and dtype are used. For head outputs
    (``hook_z``) that is ``−b_V^eff`` of each head at every position
    (:func:`head_value_bias`); for every other family, zeros (see the module
    docstring for what those zeros mean).
    """
    fam = get_family(family)
    if not folds_value_bias(fam):
        return {name: torch.zeros_like(act) for name, act in like.items()}
    bias = head_value_bias(model)  # [layer, head, d_head]
    return {name: (-bias[layer_of_hook(name)]).to(act.dtype).expand_as(act).clone() for name, act in like.items()}


@dataclass(frozen=True)
class HeadZeroEffects:
    """Exact zero-ablation effects of every head, ``[layer, head]``, in both coordinates.

    ``folded``: ``hook_z`` set to 0 (the head still writes its value bias);
    ``true``: the head writes nothing (raw ``z`` = 0).
    ``folded_estimate`` / ``true_estimate``: the attribution estimates
    ``(a' − a)·∂M/∂a`` for the same two replacements (``a' = 0`` and ``a' = −b_V^eff``).
    """

    folded: torch.Tensor
    true: torch.Tensor
    folded_estimate: torch.Tensor
    true_estimate: torch.Tensor


def head_zero_effects(model, base_tokens: Tokens, metric: Metric) -> HeadZeroEffects:
    """Folded-zero and true-zero ablation of every head, exact and estimated, side by side.

    One exact sweep per kind of zero and one forward-backward pass for both
    estimates.
    """
    from .patching import attribution_estimate

    names = hook_names(model, "head")
    _, activations, gradients = cache_activations_and_gradients(model, base_tokens, metric, names)
    batch_shaped = {n: a.expand(base_tokens.shape[0], *a.shape[1:]) for n, a in activations.items()}
    folded = {n: torch.zeros_like(a) for n, a in batch_shaped.items()}
    true = silent_replacement(model, "head", batch_shaped)
    return HeadZeroEffects(
        folded=exact_sweep(model, base_tokens, metric, folded, "head"),
        true=exact_sweep(model, base_tokens, metric, true, "head"),
        folded_estimate=attribution_estimate(activations, gradients, folded, "head"),
        true_estimate=attribution_estimate(activations, gradients, true, "head"),
    )
