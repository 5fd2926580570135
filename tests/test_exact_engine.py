"""Engine selection of ``exact_sweep(engine="auto")`` at sizes where it used to fall back to the loop.

The prefix engine must be chosen whenever it applies, whatever the batch size or
vocabulary, and it must agree with TransformerLens-style exact patching (one
hooked bridge forward per component) to < 1e-4 relative to the largest effect.
Each test counts the bridge forwards a sweep makes: the prefix engine makes one
(checking its functional forward against the bridge); the loop makes one per
component plus one.
"""

from contextlib import contextmanager

import pytest
import torch

from attribution_course import patching
from attribution_course.metrics import logit_diff
from attribution_course.prompts import make_ioi_prompts

#: The prompt count at which ``engine="auto"`` fell back to the loop on the shipped model (105+)
#: and, a fortiori, on a GPT-2-small-sized model (22+).
N_PROMPTS = 128
RELATIVE_TOLERANCE = 1e-4


@contextmanager
def counting_bridge_forwards(model):
    """Counts forwards through the bridge (``model(...)`` and ``run_with_hooks`` alike).

    ``run_with_hooks`` bypasses the bridge's own ``__call__``, so the count is taken
    on the Hugging Face model the bridge wraps, which every bridge forward runs.
    """
    calls = []
    handle = model.original_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def hooked_reference(model, base_tokens, metric, replacements, family, components):
    """``M(patched) - M(base)`` for each ``(layer, *component)`` by a plain hook loop over the bridge.

    This is what ``transformer_lens.patching`` does: one full forward per component,
    the component's activation overwritten by a forward hook.
    """
    fam = patching.get_family(family)
    with torch.no_grad():
        base_value = metric(model(base_tokens)).item()
        effects = []
        for layer, *component in components:
            name = fam.hook_name(layer)
            index = patching.component_index(fam, tuple(component))

            def overwrite(activation, hook, name=name, index=index):
                activation = activation.clone()
                activation[index] = replacements[name][index]
                return activation

            effects.append(metric(model.run_with_hooks(base_tokens, fwd_hooks=[(name, overwrite)])).item() - base_value)
    return torch.tensor(effects)


def assert_auto_sweep_uses_the_prefix_engine_and_agrees(model, base, source, metric, family, reference_components, positions=None):
    replacements = patching.replacement_activations(model, family, kind="patch", base_tokens=base, source_tokens=source)
    n_components = len(patching._components(model, patching.get_family(family), base.shape[1], positions))
    with counting_bridge_forwards(model) as forwards:
        sweep = patching.exact_sweep(model, base, metric, replacements, family, positions=positions)
    assert len(forwards) == 1, (
        f"engine='auto' made {len(forwards)} bridge forwards for {n_components} components: "
        "it left the prefix engine (one verification forward) for a bridge engine"
    )
    reference = hooked_reference(model, base, metric, replacements, family, reference_components)
    ours = torch.stack([sweep[tuple(c)] for c in reference_components])
    scale = sweep.nan_to_num().abs().max().item()
    assert scale > 0, "a sweep whose effects are all 0 cannot tell a right patch from a wrong one"
    assert reference.abs().max().item() > 0.05 * scale, "pick reference components with sizeable effects"
    worst = (ours - reference).abs().max().item()
    assert worst < RELATIVE_TOLERANCE * scale, f"max |ours - reference| = {worst:.3g}, largest effect {scale:.3g}"


def test_auto_uses_the_prefix_engine_at_128_prompts_on_the_shipped_model(model):
    prompts = make_ioi_prompts(model, N_PROMPTS, split="test", corruption="abc", seed=1)
    assert len(prompts) == N_PROMPTS
    base, source = patching.base_and_source(prompts.clean_tokens, prompts.corrupted_tokens, "denoising")
    metric = lambda logits: logit_diff(logits, prompts)  # noqa: E731
    every_head = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    assert_auto_sweep_uses_the_prefix_engine_and_agrees(model, base, source, metric, "head", every_head)


# ---------------------------------------------------------------- a GPT-2-small-sized model

SMALL_SEQUENCE = 4  # positions per prompt: few, so the reference loop stays cheap


@pytest.mark.slow
def test_auto_uses_the_prefix_engine_at_128_prompts_on_a_gpt2_small_sized_model(gpt2_small_sized):
    model = gpt2_small_sized
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_vocab) == (12, 12, 768, 50257)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(2, model.cfg.d_vocab, (N_PROMPTS, SMALL_SEQUENCE), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(2, model.cfg.d_vocab, (N_PROMPTS,), generator=generator)  # change one token
    answers = torch.randint(2, model.cfg.d_vocab, (2, N_PROMPTS), generator=generator)
    rows = torch.arange(N_PROMPTS)

    def metric(logits):  # a logit difference at the last position, as in the course
        last = logits[:, -1]
        return (last[rows, answers[0]] - last[rows, answers[1]]).mean()

    base, source = patching.base_and_source(clean, corrupted, "denoising")
    swept_positions = [1, SMALL_SEQUENCE - 1]
    reference = [(0, 1), (5, 1), (11, SMALL_SEQUENCE - 1), (0, SMALL_SEQUENCE - 1)]
    assert_auto_sweep_uses_the_prefix_engine_and_agrees(model, base, source, metric, "resid_pos", reference, positions=swept_positions)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["head_pos", "attn_pos", "mlp_pos"])
def test_position_local_patches_agree_on_a_gpt2_small_sized_model(gpt2_small_sized, family):
    """A head, attention or MLP output replaced at one position reruns its own block at that position alone.

    The prefix engine then takes the next block's queries, keys and values at later positions from
    the base run, and in the last layer a patch at a position the metric does not read changes
    nothing. Each shortcut is checked against one hooked bridge forward per component, at a
    position the metric reads and one it does not, in the first, a middle and the last layer.
    """
    model = gpt2_small_sized
    n_prompts = 4
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(2, model.cfg.d_vocab, (n_prompts, SMALL_SEQUENCE), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(2, model.cfg.d_vocab, (n_prompts,), generator=generator)
    answers = torch.randint(2, model.cfg.d_vocab, (2, n_prompts), generator=generator)
    rows = torch.arange(n_prompts)

    def metric(logits):
        last = logits[:, -1]
        return (last[rows, answers[0]] - last[rows, answers[1]]).mean()

    base, source = patching.base_and_source(clean, corrupted, "denoising")
    last_layer, last_position = model.cfg.n_layers - 1, SMALL_SEQUENCE - 1
    if family == "head_pos":
        reference = [(0, 3, 1), (5, 7, 1), (last_layer, 2, 1), (last_layer, 2, last_position), (0, 0, last_position)]
    else:
        reference = [(0, 1), (5, 1), (last_layer, 1), (last_layer, last_position), (0, last_position)]
    assert_auto_sweep_uses_the_prefix_engine_and_agrees(model, base, source, metric, family, reference, positions=[1, last_position])
