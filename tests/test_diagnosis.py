"""Freezing experiments (diagnosis.py) checked against exact patching."""

import pytest
import torch
from torch.testing import assert_close

from attribution_course import diagnosis, patching
from attribution_course.diagnosis import Freeze


@pytest.fixture(scope="module")
def noising(model, prompts):
    """Replacements for patching every head's output from the corrupted prompts."""
    return patching.replacement_activations(
        model, "head", kind="patch", base_tokens=prompts.clean_tokens, source_tokens=prompts.corrupted_tokens
    )


def test_no_freeze_reproduces_exact_patching_and_atp(model, prompts, metric, noising):
    clean = prompts.clean_tokens
    assert_close(
        diagnosis.frozen_exact_sweep(model, clean, metric, noising, "head"),
        patching.exact_sweep(model, clean, metric, noising, "head"),
        atol=1e-4, rtol=1e-4,
    )
    assert_close(
        diagnosis.frozen_attribution_sweep(model, clean, metric, noising, "head"),
        patching.attribution_sweep(model, clean, metric, noising, "head"),
        atol=1e-6, rtol=1e-5,
    )


def test_a_freeze_upstream_of_every_head_changes_nothing(model, prompts, metric, noising):
    """Layer 0's patterns and LN1 scale are computed before any head's output: holding them is no intervention."""
    clean = prompts.clean_tokens
    upstream = Freeze(("blocks.0.attn.hook_pattern", "blocks.0.ln1.hook_scale"))
    exact = patching.exact_sweep(model, clean, metric, noising, "head")
    assert_close(diagnosis.frozen_exact_sweep(model, clean, metric, noising, "head", upstream), exact, atol=1e-4, rtol=1e-4)


def test_a_freeze_downstream_changes_the_exact_effect(model, prompts, metric, noising):
    """Fails if freezing silently did nothing (e.g. the bridge ignored the hook's return value)."""
    clean = prompts.clean_tokens
    exact = patching.exact_sweep(model, clean, metric, noising, "head")
    layer = int(exact.abs().amax(dim=1).argmax())  # the layer of the head whose noising matters most
    frozen = diagnosis.frozen_exact_sweep(model, clean, metric, noising, "head", Freeze((f"blocks.{layer}.hook_mlp_out",)))
    assert (frozen[layer] - exact[layer]).abs().max() > 0.1
    assert_close(frozen[layer + 1:], exact[layer + 1:], atol=1e-4, rtol=1e-4)  # the MLP is upstream of later heads


def test_with_everything_nonlinear_frozen_exact_equals_atp(model, prompts, metric, noising):
    """Patterns, MLP outputs and LayerNorm scales held: the metric is linear in z, so the tangent is exact."""
    clean = prompts.clean_tokens
    everything = Freeze(tuple(diagnosis.everything_nonlinear_hooks(model)))
    exact = diagnosis.frozen_exact_sweep(model, clean, metric, noising, "head", everything)
    atp = diagnosis.frozen_attribution_sweep(model, clean, metric, noising, "head", everything)
    assert_close(exact, atp, atol=2e-4, rtol=1e-3)
    unfrozen_atp = patching.attribution_sweep(model, clean, metric, noising, "head")
    unfrozen_exact = patching.exact_sweep(model, clean, metric, noising, "head")
    assert (unfrozen_exact - unfrozen_atp).abs().max() > 0.1, "the test needs a case where the tangent is not exact"


def test_linearising_an_mlp_leaves_atp_alone_and_is_exact_for_a_tiny_step(model, prompts, metric, noising):
    clean = prompts.clean_tokens
    linear = Freeze(linearised_mlps=(0,))
    assert_close(
        diagnosis.frozen_attribution_sweep(model, clean, metric, noising, "head", linear),
        patching.attribution_sweep(model, clean, metric, noising, "head"),
        atol=1e-6, rtol=1e-5,
    )
    # a step of 1e-3 of the way: the tangent of GELU and GELU agree, so the exact effects match
    names = patching.hook_names(model, "head")
    base = patching.cache_activations(model, clean, names)
    tiny = {n: base[n] + 1e-3 * (noising[n] - base[n]) for n in names}
    assert_close(
        diagnosis.frozen_exact_sweep(model, clean, metric, tiny, "head", linear, components=[(0, 3)])[0, 3],
        diagnosis.frozen_exact_sweep(model, clean, metric, tiny, "head", components=[(0, 3)])[0, 3],
        atol=1e-5, rtol=1e-2,
    )


def test_bad_freezes_are_refused(model, prompts, metric, noising):
    clean = prompts.clean_tokens
    own = Freeze(("blocks.1.attn.hook_z",))
    for sweep in (diagnosis.frozen_exact_sweep, diagnosis.frozen_attribution_sweep):
        result = sweep(model, clean, metric, noising, "head", own)
        assert result[1].isnan().all() and not result[[0, 2, 3]].isnan().any(), "a frozen patch is no patch"
    with pytest.raises(ValueError, match="do not exist"):
        diagnosis.frozen_attribution_sweep(model, clean, metric, noising, "head", Freeze(("blocks.9.hook_mlp_out",)))
    with pytest.raises(ValueError, match="linearised_mlps"):
        diagnosis.frozen_exact_sweep(model, clean, metric, noising, "head", Freeze(linearised_mlps=(7,)))


def test_step_norms_use_the_components_own_axes(model, prompts, noising):
    names = patching.hook_names(model, "head")
    base = patching.cache_activations(model, prompts.clean_tokens, names)
    absolute, relative = diagnosis.step_norms(base, noising, "head")
    assert absolute.shape == relative.shape == (model.cfg.n_layers, model.cfg.n_heads)
    z = base[names[2]][:, :, 1]  # layer 2, head 1: [batch, pos, d_head]
    step = (noising[names[2]][:, :, 1] - z).flatten(1).norm(dim=1)
    assert_close(absolute[2, 1], step.mean())
    assert_close(relative[2, 1], (step / z.flatten(1).norm(dim=1)).mean())
    zero = {n: torch.zeros_like(a) for n, a in base.items()}
    assert_close(diagnosis.step_norms(base, zero, "head")[1], torch.ones(model.cfg.n_layers, model.cfg.n_heads))
