"""Reading the circuit (attribution_course.circuit): attention, direct logit attribution, roles.

The shipped-model numbers are checked two ways: internally (every component's
direct attribution adds up to the logit difference) and against an independent
measurement on the plain ``transformers`` model (attribution_course.head_survey).
"""

from __future__ import annotations

import pytest
import torch

from attribution_course import circuit, plots
from attribution_course.model import SHIPPED_MODEL_DIR
from attribution_course.prompts import make_ioi_prompts


@pytest.fixture(scope="module")
def prompts(model):
    return make_ioi_prompts(model, 24, split="test", corruption="abc", seed=3)


@pytest.fixture(scope="module")
def cache(model, prompts):
    return circuit.cache_for_reading(model, prompts)


@pytest.fixture(scope="module")
def reading(model, prompts):
    return circuit.read_circuit(model, prompts)


# ---------------------------------------------------------------- direct logit attribution


def test_direct_attributions_add_up_to_the_logit_difference(model, reading):
    attribution = reading.attribution
    assert attribution.heads.shape == (24, model.cfg.n_layers, model.cfg.n_heads)
    assert torch.allclose(attribution.total(), attribution.logit_diff, atol=1e-4), (
        (attribution.total() - attribution.logit_diff).abs().max()
    )


def test_the_sum_check_fails_without_the_layernorm_scale(model, prompts, cache):
    """The identity is not automatic: forgetting to divide by σ breaks it."""
    broken = dict(cache)
    broken[circuit.FINAL_SCALE_HOOK] = torch.ones_like(cache[circuit.FINAL_SCALE_HOOK])
    attribution = circuit.attribution_from_cache(model, broken, prompts)
    assert (attribution.total() - attribution.logit_diff).abs().max() > 1.0


def test_the_sum_check_fails_when_a_head_is_left_out(model, prompts, cache):
    attribution = circuit.attribution_from_cache(model, cache, prompts)
    missing_one = attribution.heads.clone()
    layer, head = divmod(int(attribution.per_head.abs().argmax()), model.cfg.n_heads)
    missing_one[:, layer, head] = 0  # the head with the largest direct attribution
    total = missing_one.sum(dim=(1, 2)) + torch.stack(list(attribution.rest.values())).sum(0)
    assert (total - attribution.logit_diff).abs().mean() > 0.5


def test_logit_attribution_centres_and_scales():
    written = torch.tensor([[[1.0, 2.0, 3.0]]])  # [batch=1, component=1, d_model=3]
    direction = torch.tensor([[1.0, 0.0, 0.0]])  # not centred itself, so centring ``written`` matters
    # centred: [-1, 0, 1]; dot with direction: -1; divided by σ = 2: -0.5
    assert circuit.logit_attribution(written, torch.tensor([2.0]), direction).item() == pytest.approx(-0.5)
    # a constant vector carries nothing through the LayerNorm's centring
    constant = torch.full((1, 1, 3), 5.0)
    assert circuit.logit_attribution(constant, torch.tensor([1.0]), direction).item() == pytest.approx(0.0)


# ---------------------------------------------------------------- agreement with plain transformers


@pytest.fixture(scope="module")
def survey_and_reading():
    """The independent survey and circuit.py on the same few held-out prompts."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from attribution_course.head_survey import survey_heads
    from attribution_course.model import load_model

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    prompts = make_ioi_prompts(tokenizer, 16, split="test", seed=1234)
    hf_model = GPT2LMHeadModel.from_pretrained(SHIPPED_MODEL_DIR)
    survey = survey_heads(hf_model, prompts)
    bridge = load_model()
    return hf_model, bridge, prompts, survey, circuit.read_circuit(bridge, prompts)


def test_attention_agrees_with_plain_transformers(survey_and_reading):
    _, _, _, survey, reading = survey_and_reading
    for ours, theirs in [
        (reading.attention.to_io, survey.attention_to_io),
        (reading.attention.to_s1, survey.attention_to_s1),
        (reading.attention.to_s2, survey.attention_to_s2),
    ]:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_attention_to_the_final_position_itself_agrees_with_the_bridge(survey_and_reading):
    _, bridge, prompts, survey, _ = survey_and_reading
    cache = circuit.cache_for_reading(bridge, prompts)
    end = prompts.end_position
    ours = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][:, :, end, end].mean(0)
                        for layer in range(bridge.cfg.n_layers)])
    torch.testing.assert_close(survey.attention_to_end, ours, atol=1e-5, rtol=0)
    assert survey.attention_to_end.max() > 0.05  # some head looks at the final position itself


def _folded_value_bias_attribution(hf_model, bridge, prompts) -> torch.Tensor:
    """DLA of each head's constant value-bias output ``(ln_1.bias @ W_V + b_V) @ W_O``, [layer, head].

    Compatibility mode folds this constant into the layer's output bias, so circuit.py
    counts it under "attention bias"; head_survey keeps it in the head.
    """
    config = hf_model.config
    d_model, n_head = config.n_embd, config.n_head
    d_head = d_model // n_head
    cache = circuit.cache_for_reading(bridge, prompts)
    scale = cache[circuit.FINAL_SCALE_HOOK][:, prompts.end_position, 0]
    direction = circuit.answer_direction(bridge, prompts)
    per_layer = []
    for block in hf_model.transformer.h:
        w_v = block.attn.c_attn.weight.detach()[:, 2 * d_model :]
        b_v = block.attn.c_attn.bias.detach()[2 * d_model :]
        value_bias = (block.ln_1.bias.detach() @ w_v + b_v).reshape(n_head, d_head)
        w_o = block.attn.c_proj.weight.detach().reshape(n_head, d_head, d_model)
        written = torch.einsum("hd,hdm->hm", value_bias, w_o).expand(len(prompts), n_head, d_model)
        per_layer.append(circuit.logit_attribution(written, scale, direction).mean(0))
    return torch.stack(per_layer)


def test_direct_logit_attribution_agrees_with_plain_transformers(survey_and_reading):
    hf_model, bridge, prompts, survey, reading = survey_and_reading
    folded = _folded_value_bias_attribution(hf_model, bridge, prompts)
    torch.testing.assert_close(
        reading.attribution.per_head + folded, survey.direct_logit_attribution.detach(), atol=1e-4, rtol=0
    )
    # the folded value biases are small next to the heads that matter, so both views label heads alike
    assert folded.abs().max() < circuit.MIN_DLA_FRACTION * survey.direct_logit_attribution.abs().max()


def test_the_agreement_check_can_fail(survey_and_reading):
    """A DLA that forgets the LayerNorm scale disagrees with the survey."""
    hf_model, bridge, prompts, survey, reading = survey_and_reading
    cache = circuit.cache_for_reading(bridge, prompts)
    cache[circuit.FINAL_SCALE_HOOK] = torch.ones_like(cache[circuit.FINAL_SCALE_HOOK])
    unscaled = circuit.attribution_from_cache(bridge, cache, prompts).per_head
    folded = _folded_value_bias_attribution(hf_model, bridge, prompts)
    assert not torch.allclose(unscaled + folded, survey.direct_logit_attribution.detach(), atol=1e-4)


# ---------------------------------------------------------------- attention


def test_attention_between_indexes_each_prompt_at_its_own_positions():
    patterns = torch.zeros(2, 1, 1, 4, 4)  # [batch, layer, head, query, key]
    patterns[0, 0, 0, 3, 1] = 1.0
    patterns[1, 0, 0, 3, 2] = 0.5
    assert circuit.attention_between(patterns, 3, torch.tensor([1, 2])).item() == pytest.approx(0.75)
    assert circuit.attention_between(patterns, 3, torch.tensor([2, 1])).item() == pytest.approx(0.0)  # swapped: both miss


def test_attention_rows_are_probabilities(reading):
    attention = reading.attention
    total = attention.to_io + attention.to_s1 + attention.to_s2
    assert (total <= 1 + 1e-5).all() and (total >= 0).all()


# ---------------------------------------------------------------- roles


def _attention(to_io, to_s1, to_s2, s2_to_s1) -> circuit.HeadAttention:
    as_grid = lambda values: torch.tensor(values, dtype=torch.float32).reshape(1, -1)  # noqa: E731
    return circuit.HeadAttention(as_grid(to_io), as_grid(to_s1), as_grid(to_s2), as_grid(s2_to_s1))


def test_head_roles_apply_each_rule():
    # heads: name mover, negative name mover, subject suppressor, subject mover,
    #        S-inhibition candidate, duplicate-token head, tiny-DLA IO head, split head
    attention = _attention(
        to_io=[0.6, 0.5, 0.0, 0.1, 0.0, 0.0, 0.9, 0.4],
        to_s1=[0.1, 0.1, 0.3, 0.1, 0.2, 0.0, 0.0, 0.45],
        to_s2=[0.0, 0.1, 0.6, 0.7, 0.5, 0.0, 0.0, 0.0],
        s2_to_s1=[0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0, 0.0],
    )
    dla = torch.tensor([[2.0, -1.0, 1.5, -0.5, 0.01, 0.02, 0.05, 3.0]])  # threshold 5% of 3.0 = 0.15
    roles = [row.roles for row in circuit.head_roles(attention, dla)]
    assert roles == [
        ("name mover",),
        ("negative name mover",),
        ("subject suppressor",),
        ("subject mover",),
        ("S-inhibition candidate",),
        ("duplicate-token head",),
        (),  # attends to IO but writes almost nothing
        (),  # 0.4 to IO is less than 0.45 to S, and 0.45 is not a majority
    ]


def test_io_attention_must_exceed_subject_attention():
    """Issue 9's rule: attention to IO at least 0.3 AND more than to S1 and S2 together."""
    attention = _attention(to_io=[0.35], to_s1=[0.2], to_s2=[0.2], s2_to_s1=[0.0])
    assert circuit.head_roles(attention, torch.tensor([[-1.0]]))[0].roles == ()
    attention = _attention(to_io=[0.35], to_s1=[0.2], to_s2=[0.1], s2_to_s1=[0.0])
    assert circuit.head_roles(attention, torch.tensor([[-1.0]]))[0].roles == ("negative name mover",)


def test_head_roles_rejects_a_per_prompt_attribution(reading):
    with pytest.raises(ValueError, match="per_head"):
        circuit.head_roles(reading.attention, reading.attribution.heads)


def test_heads_with_role_names_the_unknown_role(reading):
    with pytest.raises(ValueError, match="unknown role 'name-mover'"):
        circuit.heads_with_role(reading.roles, "name-mover")


def test_shipped_model_roles(reading):
    """What chapter 2 asserts of any shipped model: the head that writes most towards the answer
    copies IO or suppresses S, and some head notices the duplicated name at S2; and, since issue 9's retraining,
    name movers and a negative name mover. (On the shipped model: L2H3, a name mover, writes most; L4H1 is the
    negative name mover.)"""
    roles = {row.label: row.roles for row in reading.roles}
    largest = max(reading.roles, key=lambda r: abs(r.direct_logit_attribution))
    assert {"name mover", "subject suppressor"} & set(largest.roles), roles
    assert largest.direct_logit_attribution > 0, roles
    assert circuit.heads_with_role(reading.roles, "duplicate-token head"), roles
    assert len(circuit.heads_with_role(reading.roles, "name mover")) >= 2, roles
    assert circuit.heads_with_role(reading.roles, "negative name mover"), roles


def test_roles_markdown_lists_only_heads_with_a_role(reading):
    table = circuit.roles_markdown(reading.roles)
    labelled = [r for r in reading.roles if r.roles]
    assert len(table.splitlines()) == 2 + len(labelled)
    for row in labelled:
        assert f"| {row.label} |" in table


# ---------------------------------------------------------------- figures


def test_attention_heatmap_has_one_row_per_head_and_values_from_0_to_1(model, reading):
    columns = {"end → IO": reading.attention.to_io, "S2 → S1": reading.attention.s2_to_s1}
    fig = plots.head_attention_heatmap(columns, title="t")
    trace = fig.data[0]
    assert list(trace.y) == [f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    assert list(trace.x) == list(columns)
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    assert trace.texttemplate and trace.textfont.size >= 12
    assert trace.colorbar.orientation == "h"  # below the cells, not eating a phone's width


def test_attention_heatmap_hides_values_when_columns_do_not_fit():
    many = {f"c{i}": torch.rand(2, 2) for i in range(plots.MAX_COLUMNS_WITH_VALUES + 1)}
    assert not plots.head_attention_heatmap(many, title="t").data[0].texttemplate


def test_attention_heatmap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        plots.head_attention_heatmap({"a": torch.zeros(2, 2), "b": torch.zeros(3, 2)}, title="t")


def test_head_bars_show_sign_by_pattern_and_value(model, reading):
    fig = plots.head_bars(reading.attribution.per_head, title="t", x_title="DLA",
                          annotations=[", ".join(r.roles) for r in reading.roles])
    bar = fig.data[0]
    values = reading.attribution.per_head.flatten().tolist()
    assert list(bar.y)[model.cfg.n_heads + 1] == "L1H1" and len(bar.x) == model.cfg.n_layers * model.cfg.n_heads
    assert [shape == "/" for shape in bar.marker.pattern.shape] == [v < 0 for v in values]
    assert bar.text[0] == f"{values[0]:+.2f}"
    with pytest.raises(ValueError, match="annotations"):
        plots.head_bars(reading.attribution.per_head, title="t", x_title="DLA", annotations=["x"])


def test_removal_with_the_final_layernorm_scale_fixed_is_the_direct_effect_in_the_last_layer():
    """With nothing after the last attention layer but the final LayerNorm (its MLP silenced),
    removing a last-layer head with the LayerNorm's scale fixed changes the logit difference by
    exactly minus its direct logit attribution; with the scale free it does not (the check can fail)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from attribution_course.head_survey import survey_heads

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    prompts = make_ioi_prompts(tokenizer, 16, split="test", seed=1234)
    hf_model = GPT2LMHeadModel.from_pretrained(SHIPPED_MODEL_DIR)
    last_mlp = hf_model.transformer.h[-1].mlp.c_proj
    with torch.no_grad():
        last_mlp.weight.zero_()
        last_mlp.bias.zero_()
    survey = survey_heads(hf_model, prompts)
    fixed, free, dla = (survey.zero_ablation_effect_fixed_final_ln[-1], survey.zero_ablation_effect[-1],
                        survey.direct_logit_attribution[-1])
    torch.testing.assert_close(fixed, -dla, atol=1e-4, rtol=1e-4)
    assert (free + dla).abs().max() > 0.05, "the scale's own effect should show when it is free"
    assert (survey.zero_ablation_effect_fixed_final_ln[:-1] - survey.zero_ablation_effect[:-1]).abs().max() > 0.01
