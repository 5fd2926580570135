"""Zero ablation of a head makes it write nothing, checked against a plain Hugging Face GPT-2.

The bridge (compatibility mode) folds each head's value bias into b_O, so
hook_z = 0 leaves the head writing b_V^eff·W_O. The reference here is the
unfolded Hugging Face model, where a head writes nothing when its slice of
c_proj's input is zero.
"""

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2LMHeadModel

from attribution_course import patching, zero_ablation
from attribution_course.metrics import logit_diff
from attribution_course.model import SHIPPED_MODEL_DIR


@pytest.fixture(scope="module")
def hf_model():
    model = GPT2LMHeadModel.from_pretrained(SHIPPED_MODEL_DIR)
    model.eval()
    return model


@pytest.fixture(scope="module")
def prompts(test_prompts):
    return test_prompts.subset(range(16))


def hf_logits_with_heads_silenced(hf_model, tokens, silenced: dict[int, list[int]]) -> torch.Tensor:
    """Logits of the plain HF model with the c_proj input slice of each head in ``silenced[layer]`` zeroed."""
    d_head = hf_model.config.n_embd // hf_model.config.n_head
    handles = []
    for layer, heads in silenced.items():

        def zero_slices(module, args, heads=heads):
            (x,) = args
            x = x.clone()
            for head in heads:
                x[..., head * d_head : (head + 1) * d_head] = 0.0
            return (x,)

        handles.append(hf_model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_slices))
    try:
        with torch.no_grad():
            return hf_model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()


def centred(vector: torch.Tensor) -> torch.Tensor:
    """The bridge centres every weight that writes to the residual stream (mean over d_model removed)."""
    return vector - vector.mean(-1, keepdim=True)


def attn_out_with_replacement(model, tokens, layer, replacement) -> torch.Tensor:
    out = {}
    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            fwd_hooks=[
                (f"blocks.{layer}.attn.hook_z", lambda z, hook: replacement.expand_as(z).clone()),
                (f"blocks.{layer}.hook_attn_out", lambda a, hook: out.setdefault("a", a.detach())),
            ],
        )
    return out["a"]


@pytest.mark.parametrize("layer", [0, 3])
def test_zeroing_every_head_leaves_attention_output_equal_to_its_bias(model, hf_model, prompts, layer):
    tokens = prompts.clean_tokens
    replacements = patching.replacement_activations(model, "head", kind="zero", base_tokens=tokens)
    true_zero = replacements[f"blocks.{layer}.attn.hook_z"][:1]
    hf_bias = hf_model.transformer.h[layer].attn.c_proj.bias.detach()
    attn_out = attn_out_with_replacement(model, tokens, layer, true_zero)
    assert_close(attn_out, centred(hf_bias).expand_as(attn_out), atol=1e-5, rtol=0)
    # and the same in the plain HF model: every head's c_proj input zeroed leaves its bias
    seen = {}
    hook = hf_model.transformer.h[layer].attn.c_proj.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    try:
        hf_logits_with_heads_silenced(hf_model, tokens, {layer: list(range(model.cfg.n_heads))})
    finally:
        hook.remove()
    assert_close(seen["o"], hf_bias.expand_as(seen["o"]), atol=1e-6, rtol=0)


def test_the_bias_check_fails_for_folded_zero(model, hf_model, prompts):
    """hook_z = 0 leaves each head's value bias written through W_O: the check above must see it."""
    layer = 0
    tokens = prompts.clean_tokens
    folded = patching.replacement_activations(model, "head", kind="folded_zero", base_tokens=tokens)
    attn_out = attn_out_with_replacement(model, tokens, layer, folded[f"blocks.{layer}.attn.hook_z"][:1])
    hf_bias = hf_model.transformer.h[layer].attn.c_proj.bias.detach()
    assert (attn_out - centred(hf_bias)).abs().max() > 1e-2


def test_hook_z_is_raw_z_minus_effective_value_bias(model, hf_model, prompts):
    tokens = prompts.clean_tokens
    bias = zero_ablation.head_value_bias(model)
    n_heads, d_head = bias.shape[1:]
    for layer in range(model.cfg.n_layers):
        raw = {}
        handle = hf_model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(
            lambda m, args: raw.setdefault("z", args[0].detach())
        )
        try:
            with torch.no_grad():
                hf_model(tokens)
        finally:
            handle.remove()
        bridge_z = patching.cache_activations(model, tokens, [f"blocks.{layer}.attn.hook_z"])[f"blocks.{layer}.attn.hook_z"]
        assert_close(bridge_z + bias[layer], raw["z"].view(*bridge_z.shape), atol=1e-5, rtol=0)
        assert bias[layer].abs().max() > 1e-2, "a model whose value biases vanish cannot tell the two zeros apart"


def test_true_zero_sweep_equals_silencing_each_head_in_the_hf_model(model, hf_model, prompts):
    tokens = prompts.clean_tokens
    metric = lambda logits: logit_diff(logits, prompts)  # noqa: E731
    both = zero_ablation.head_zero_effects(model, tokens, metric)
    with torch.no_grad():
        base = metric(hf_model(tokens).logits).item()
    reference = torch.tensor(
        [
            [metric(hf_logits_with_heads_silenced(hf_model, tokens, {l: [h]})).item() - base for h in range(model.cfg.n_heads)]
            for l in range(model.cfg.n_layers)
        ]
    )
    assert_close(both.true, reference, atol=2e-4, rtol=0)
    assert (both.folded - reference).abs().max() > 1e-2, "folded zero should differ from silencing the head"
    # the package's default zero is the true one, for the exact sweep and for the attribution estimate
    zeros = patching.replacement_activations(model, "head", kind="zero", base_tokens=tokens)
    assert_close(patching.exact_sweep(model, tokens, metric, zeros, "head"), both.true, atol=2e-5, rtol=0)
    assert_close(patching.attribution_sweep(model, tokens, metric, zeros, "head"), both.true_estimate)
    sweeps = patching.attribution_sweeps(model, tokens, metric, ["head", "mlp"], kind="zero")
    assert_close(sweeps["head"], both.true_estimate)
    folded_sweeps = patching.attribution_sweeps(model, tokens, metric, ["head"], kind="folded_zero")
    assert_close(folded_sweeps["head"], both.folded_estimate)


def test_true_zero_estimate_is_minus_raw_z_times_gradient(model, prompts):
    """(a' − a)·∂M/∂a with a' = −b_V^eff is −(hook_z + b_V^eff)·∂M/∂z = −z_raw·∂M/∂z."""
    tokens = prompts.clean_tokens
    metric = lambda logits: logit_diff(logits, prompts)  # noqa: E731
    names = patching.hook_names(model, "head")
    _, acts, grads = patching.cache_activations_and_gradients(model, tokens, metric, names)
    bias = zero_ablation.head_value_bias(model)
    expected = torch.stack([-((acts[n] + bias[l]) * grads[n]).sum((0, 1, 3)) for l, n in enumerate(names)])
    both = zero_ablation.head_zero_effects(model, tokens, metric)
    assert_close(both.true_estimate, expected)
    assert (both.true_estimate - both.folded_estimate).abs().max() > 1e-3


def test_zero_of_other_families_is_zeros(model, prompts):
    tokens = prompts.clean_tokens
    for family in ("mlp", "attn_pos", "resid_pos", "pattern"):
        zeros = patching.replacement_activations(model, family, kind="zero", base_tokens=tokens)
        assert all((a == 0).all() for a in zeros.values()), family


def test_a_model_without_recorded_biases_is_refused_with_a_clear_error():
    class Bare:
        pass

    with pytest.raises(ValueError, match="load_model"):
        zero_ablation.head_value_bias(Bare())
