"""The bare attribution engine: the bridge's estimates, at the bare model's cost.

`patching.attribution_sweeps` runs on the bare `transformers` twin of the bridge when it
can (`attribution_engine`). These tests hold it to the bridge's numbers for every
family it serves and every replacement kind, check that it really runs only the twin
(two passes, no bridge forward), and that it steps aside where it cannot be exact.
"""

import pytest
import torch
from torch.testing import assert_close

from attribution_course import attribution_engine, patching

SERVED = ["head", "head_pos", "resid_pos", "mlp", "mlp_pos", "attn_pos"]


def relative_gap(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["patch", "resample", "mean", "zero", "folded_zero"])
def test_bare_estimates_equal_the_bridge_for_every_served_family(model, prompts, metric, kind):
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    source = {"patch": corrupted, "resample": corrupted.roll(1, dims=0)}.get(kind)
    bridge = patching.attribution_sweeps(model, clean, metric, SERVED, kind=kind, source_tokens=source, engine="bridge")
    bare = patching.attribution_sweeps(model, clean, metric, SERVED, kind=kind, source_tokens=source, engine="bare")
    for family in SERVED:
        assert relative_gap(bare[family], bridge[family]) < 1e-5, family


def raw_io_logit(prompts):
    """The IO token's logit itself: unlike a logit difference it moves if the logits are shifted."""
    rows = torch.arange(len(prompts))
    return lambda logits: logits[rows, prompts.end_position, prompts.io_token].mean()


@pytest.mark.parametrize("metric_name", ["logit difference", "raw IO logit"])
def test_bare_activations_and_gradients_are_the_bridges_in_its_coordinates(model, prompts, metric, metric_name):
    metric = metric if metric_name == "logit difference" else raw_io_logit(prompts)
    names = [patching.get_family(f).hook_name(layer) for f in ("head", "resid_pos", "mlp", "attn_pos")
             for layer in range(model.cfg.n_layers)]
    value, acts, grads = patching.cache_activations_and_gradients(model, prompts.clean_tokens, metric, names)
    bare_value, bare_acts, bare_grads = attribution_engine.cache_activations_and_gradients(model, prompts.clean_tokens, metric, names)
    assert bare_value == pytest.approx(value, rel=1e-5)
    for name in names:
        # relative to the tensor's largest entry; a layer that always writes zero (the last block's MLP) is compared as is
        scale = acts[name].abs().max().clamp_min(1.0e-6)
        assert_close(bare_acts[name] / scale, acts[name] / scale, atol=1e-5, rtol=0, msg=name)
        scale = grads[name].abs().max().clamp_min(1.0e-6)
        assert_close(bare_grads[name] / scale, grads[name] / scale, atol=1e-5, rtol=0, msg=name)


def test_auto_runs_two_passes_of_the_twin_and_none_of_the_bridge(model, prompts, metric, monkeypatch):
    twin = attribution_engine.bare_twin(model)
    calls = {"twin": 0, "bridge": 0}
    twin_forward, bridge_forward = type(twin).forward, type(model).forward

    def count_twin(self, *args, **kwargs):
        calls["twin"] += 1
        return twin_forward(self, *args, **kwargs)

    def count_bridge(self, *args, **kwargs):
        calls["bridge"] += 1
        return bridge_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(twin), "forward", count_twin)
    monkeypatch.setattr(type(model), "forward", count_bridge)
    patching.attribution_sweeps(model, prompts.clean_tokens, metric, ["head_pos", "mlp"], kind="patch",
                                source_tokens=prompts.corrupted_tokens)
    assert calls == {"twin": 2, "bridge": 0}


def test_auto_stays_on_the_bridge_for_the_pattern_and_under_attached_hooks(model, prompts, metric):
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    names = patching.hook_names(model, "pattern")
    assert not attribution_engine.usable(model, names)
    with pytest.raises(ValueError, match="engine='bare' cannot serve"):
        patching.attribution_sweeps(model, clean, metric, ["pattern"], kind="patch", source_tokens=corrupted, engine="bare")

    # a hook attached to the bridge changes its run; the twin would not see it, so auto must not use the twin
    def silence_l0h0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", silence_l0h0)]):
        assert not attribution_engine.usable(model, patching.hook_names(model, "mlp"))
        hooked = patching.attribution_sweeps(model, clean, metric, ["mlp"], kind="patch", source_tokens=corrupted)
        on_bridge = patching.attribution_sweeps(model, clean, metric, ["mlp"], kind="patch", source_tokens=corrupted, engine="bridge")
    assert_close(hooked["mlp"], on_bridge["mlp"])
    plain = patching.attribution_sweeps(model, clean, metric, ["mlp"], kind="patch", source_tokens=corrupted)
    assert relative_gap(plain["mlp"], hooked["mlp"]) > 1e-3, "the attached hook should have changed the estimate"


def test_unknown_engine_is_refused(model, prompts, metric):
    with pytest.raises(ValueError, match="engine must be"):
        patching.attribution_sweeps(model, prompts.clean_tokens, metric, ["mlp"], kind="zero", engine="fast")


@pytest.mark.slow
def test_bare_estimates_equal_the_bridge_on_a_gpt2_small_sized_model(gpt2_small_sized):
    model = gpt2_small_sized
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(2, model.cfg.d_vocab, (8, 6), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(2, model.cfg.d_vocab, (8,), generator=generator)
    answers = torch.randint(2, model.cfg.d_vocab, (2, 8), generator=generator)
    rows = torch.arange(8)

    def metric(logits):
        return (logits[rows, -1, answers[0]] - logits[rows, -1, answers[1]]).mean()

    bridge = patching.attribution_sweeps(model, corrupted, metric, SERVED, kind="patch", source_tokens=clean, engine="bridge")
    bare = patching.attribution_sweeps(model, corrupted, metric, SERVED, kind="patch", source_tokens=clean, engine="bare")
    for family in SERVED:
        assert relative_gap(bare[family], bridge[family]) < 1e-4, family
