"""Attribution through the attention pattern: per edge, and through queries, keys and values.

A head's output at query position ``q`` is ``z_q = Σ_k A_qk (v_k + b_V^eff)``,
with ``A = softmax(q·k / √d_head)`` (causal). Two ways to look inside it:

* **per edge**: the estimate of cutting the edge ``q → k`` (setting ``A_qk`` to
  zero, no renormalisation, so the edge carries nothing, value bias included) is
  ``−A_qk · ∂M/∂A_qk`` with ``∂M/∂A_qk = ∂M/∂z_q · (v_k + b_V^eff)``
  (:func:`edge_attribution`). Summed over keys and queries it is exactly the
  estimate for zero-ablating the whole head (``−z_raw · ∂M/∂z``), so it splits
  a head's estimate over its edges.
* **query, key and value families** (:data:`QKV_FAMILIES`): the per-head
  query, key and value vectors at ``attn.hook_q`` / ``hook_k`` / ``hook_v``
  (``[batch, pos, head, d_head]``). Replacing head ``h``'s query vectors is the
  same intervention as replacing only the residual stream head ``h`` reads its
  queries from (``q_h`` depends on nothing else), so these families take
  attribution separately through queries, keys and values. In TransformerLens
  4.x's TransformerBridge ``blocks.L.hook_q_input`` / ``hook_k_input`` /
  ``hook_v_input`` are per head too (``[batch, pos, head, d_model]``, before
  LayerNorm), but only after ``model.set_use_split_qkv_input(True)`` (without
  it, adding a hook there raises ``ValueError``), a switch of the whole model's
  state; gradients flow through both. ``hook_q`` etc. need no switch, so the
  families use them; the estimate through ``hook_q_input`` differs only in
  also linearising LayerNorm (``tests/test_attention_attribution.py``).

Estimates through queries and keys linearise the softmax; when a pattern is
saturated the tangent is nearly flat and the estimate misses. :mod:`atp_star`
recomputes the softmax exactly for those families (AtP*'s QK fix).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float

from .patching import (
    Family,
    Metric,
    Tokens,
    cache_activations,
    cache_activations_and_gradients,
)
from .zero_ablation import head_value_bias

#: Per-head query, key and value vectors, one component per head (every position).
QKV_FAMILIES: dict[str, Family] = {
    "head_q": Family("head_q", "blocks.{layer}.attn.hook_q", ("pos", "head", "d_head"), ("head",)),
    "head_k": Family("head_k", "blocks.{layer}.attn.hook_k", ("pos", "head", "d_head"), ("head",)),
    "head_v": Family("head_v", "blocks.{layer}.attn.hook_v", ("pos", "head", "d_head"), ("head",)),
}


def attention_pattern(
    queries: Float[torch.Tensor, "batch query head d_head"],
    keys: Float[torch.Tensor, "batch key head d_head"],
) -> Float[torch.Tensor, "batch head query key"]:
    """The causal attention pattern ``softmax(q·k / √d_head)`` of GPT-2 (exactly the bridge's ``hook_pattern``)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", queries, keys) / math.sqrt(queries.shape[-1])
    n_query, n_key = scores.shape[-2:]
    future = torch.ones(n_query, n_key, dtype=torch.bool).triu(1 + n_key - n_query)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def edge_attribution(
    model,
    base_tokens: Tokens,
    metric: Metric,
    *,
    value_bias: bool = True,
) -> Float[torch.Tensor, "layer head query key"]:
    """``−A ⊙ ∂M/∂A`` for every edge ``(layer, head, query, key)``, summed over the batch.

    The estimate of zero-ablating each edge of each attention pattern (the
    zero-ablation sign: ``a' − a = −A``). ``∂M/∂A_qk = ∂M/∂z_q · (v_k + b_V^eff)``
    is computed from the gradient at ``hook_z`` and the values at ``hook_v``.
    With ``value_bias=True`` (default) a cut edge carries nothing, and the sum
    over keys and queries equals the true-zero estimate of the head; with
    ``False`` the values are the bridge's folded ones (bias left in ``b_O``),
    which is what the gradient at ``hook_pattern`` gives, and the sum equals the
    folded-zero estimate ``−hook_z · ∂M/∂z``.
    """
    n_layers = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    pattern_names = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
    value_names = [f"blocks.{l}.attn.hook_v" for l in range(n_layers)]
    _, _, gradients = cache_activations_and_gradients(model, base_tokens, metric, z_names)
    cached = cache_activations(model, base_tokens, pattern_names + value_names)
    bias = head_value_bias(model) if value_bias else None
    per_layer = []
    for layer in range(n_layers):
        values = cached[value_names[layer]]  # [batch, key, head, d_head]
        if bias is not None:
            values = values + bias[layer]
        grad_z = gradients[z_names[layer]]  # [batch, query, head, d_head]
        grad_pattern = torch.einsum("bqhd,bkhd->bhqk", grad_z, values)
        per_layer.append((-cached[pattern_names[layer]] * grad_pattern).sum(0))
    return torch.stack(per_layer)
