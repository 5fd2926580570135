"""Per-edge pattern attribution and the query/key/value families, against the model itself."""

import pytest
import torch
from torch.testing import assert_close

from attribution_course import attention_attribution as aa
from attribution_course import patching, zero_ablation



def test_attention_pattern_recomputes_the_bridges_pattern(model, prompts):
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_{s}" for l in range(n_layers) for s in ("q", "k", "pattern")]
    acts = patching.cache_activations(model, prompts.clean_tokens, names)
    for layer in range(n_layers):
        q, k = acts[f"blocks.{layer}.attn.hook_q"], acts[f"blocks.{layer}.attn.hook_k"]
        pattern = acts[f"blocks.{layer}.attn.hook_pattern"]
        assert_close(aa.attention_pattern(q, k), pattern, atol=1e-5, rtol=0)
        # the check can fail: without the 1/sqrt(d_head) scale the pattern differs
        assert (aa.attention_pattern(q * q.shape[-1] ** 0.5, k) - pattern).abs().max() > 1e-2


def test_qkv_hooks_index_heads_and_carry_gradients(model, prompts, metric):
    batch, n_pos = prompts.clean_tokens.shape
    cfg = model.cfg
    for family in aa.QKV_FAMILIES.values():
        names = patching.hook_names(model, family)
        _, acts, grads = patching.cache_activations_and_gradients(model, prompts.clean_tokens, metric, names)
        for name in names:
            assert acts[name].shape == (batch, n_pos, cfg.n_heads, cfg.d_head)
        assert all(grads[n].abs().max() > 0 for n in names), family.name


def test_qkv_input_hooks_need_the_split_switch_and_then_split_heads(model, prompts, metric):
    """What the module docstring says about hook_q_input in TransformerBridge (TransformerLens 4.x)."""
    tokens = prompts.clean_tokens
    with pytest.raises(ValueError, match="set_use_split_qkv_input"):
        patching.cache_activations(model, tokens, ["blocks.1.hook_q_input"])
    model.set_use_split_qkv_input(True)
    try:
        _, acts, grads = patching.cache_activations_and_gradients(model, tokens, metric, ["blocks.1.hook_q_input"])
    finally:
        model.set_use_split_qkv_input(False)
    assert acts["blocks.1.hook_q_input"].shape == (*tokens.shape, model.cfg.n_heads, model.cfg.d_model)
    assert grads["blocks.1.hook_q_input"].abs().max() > 0


def test_exact_patching_of_queries_moves_the_metric(model, prompts, metric):
    """The loop engine patches hook_q; patching every head's queries from the corrupted run changes M."""
    family = aa.QKV_FAMILIES["head_q"]
    replacements = patching.cache_activations(model, prompts.corrupted_tokens, patching.hook_names(model, family))
    exact = patching.exact_sweep(model, prompts.clean_tokens, metric, replacements, family)
    assert exact.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert exact.abs().max() > 1e-2


def test_edges_sum_to_the_heads_zero_ablation_estimate(model, prompts, metric):
    tokens = prompts.clean_tokens
    both = zero_ablation.head_zero_effects(model, tokens, metric)
    edges = aa.edge_attribution(model, tokens, metric)
    n_pos = tokens.shape[1]
    assert edges.shape == (model.cfg.n_layers, model.cfg.n_heads, n_pos, n_pos)
    assert (edges.triu(1) == 0).all(), "no edge to a future key"
    assert_close(edges.sum((2, 3)), both.true_estimate, atol=1e-5, rtol=1e-4)
    folded_edges = aa.edge_attribution(model, tokens, metric, value_bias=False)
    assert_close(folded_edges.sum((2, 3)), both.folded_estimate, atol=1e-5, rtol=1e-4)
    assert (both.true_estimate - both.folded_estimate).abs().max() > 1e-3, "the two sums must be distinguishable"


def test_folded_edges_equal_minus_pattern_times_its_gradient(model, prompts, metric):
    """Without the value bias, dM/dA from hook_z and hook_v equals the gradient taken at hook_pattern."""
    tokens = prompts.clean_tokens
    names = patching.hook_names(model, "pattern")
    _, acts, grads = patching.cache_activations_and_gradients(model, tokens, metric, names)
    expected = torch.stack([(-acts[n] * grads[n]).sum(0) for n in names])
    assert_close(aa.edge_attribution(model, tokens, metric, value_bias=False), expected, atol=1e-6, rtol=1e-4)
