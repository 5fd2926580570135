"""Chapter 6's claims about the sign of the zero-ablation estimate, checked on the shipped model.

The chapter (book/06_getting_the_sign_right.md) asserts the same claims while the
book is built; these tests keep them true when the book is not rebuilt, and use
the chapter's own prompts (32 held-out prompts, seed 0) so prose and tests agree.
"""


import pytest
import torch

from attribution_course import attention_attribution, patching, zero_ablation
from attribution_course.metrics import logit_diff, pearson
from attribution_course.prompts import make_ioi_prompts

CHAPTER_PROMPTS = dict(n_prompts=32, split="test", seed=0)


@pytest.fixture(scope="module")
def chapter6(model):
    prompts = make_ioi_prompts(model, **CHAPTER_PROMPTS)
    clean = prompts.clean_tokens
    metric = lambda logits: logit_diff(logits, prompts)  # noqa: E731
    # zero ablation silences the head; a is its raw z (hook_z plus the folded value bias), as in the chapter
    zeros = patching.replacement_activations(model, "head", kind="zero", base_tokens=clean)
    exact = patching.exact_sweep(model, clean, metric, zeros, "head")
    names = patching.hook_names(model, "head")
    _, acts, grads = patching.cache_activations_and_gradients(model, clean, metric, names)
    value_bias = zero_ablation.head_value_bias(model)
    a_dot_grad = torch.stack([((acts[n] + value_bias[l]) * grads[n]).sum(dim=(0, 1, 3)) for l, n in enumerate(names)])
    folded = -torch.stack([(acts[n] * grads[n]).sum(dim=(0, 1, 3)) for n in names])
    return dict(model=model, prompts=prompts, metric=metric, zeros=zeros, exact=exact,
                right=-a_dot_grad, wrong=+a_dot_grad, folded_right=folded)


def sign_claim_violations(exact, right, wrong) -> list[str]:
    """The chapter's claims, as a list of the ones that do not hold (empty = all hold)."""
    problems = []
    if not pearson(exact, right) > 0.5:
        problems.append(f"right sign does not correlate with exact zero ablation (r = {pearson(exact, right):.3f})")
    if not pearson(exact, wrong) < -0.5:
        problems.append(f"wrong sign does not anti-correlate with exact zero ablation (r = {pearson(exact, wrong):.3f})")
    helps = exact > 0.01 * exact.abs().max()
    if helps.any():
        if not (torch.sign(wrong[helps]) < 0).all():
            problems.append("the wrong sign does not report every head whose removal helps as supporting the behaviour")
        if not (torch.sign(right[helps]) > 0).float().mean() > 0.5:
            problems.append("the right sign gets the direction wrong for most heads whose removal helps")
    return problems


def test_right_sign_correlates_and_wrong_sign_anticorrelates(chapter6):
    assert sign_claim_violations(chapter6["exact"], chapter6["right"], chapter6["wrong"]) == []


def test_the_claim_check_fails_when_the_signs_are_swapped(chapter6):
    """The check above can fail: hand it the wrong sign as if it were the right one."""
    assert sign_claim_violations(chapter6["exact"], chapter6["wrong"], chapter6["right"]) != []


def test_right_sign_is_what_the_package_computes_for_zero_ablation(chapter6):
    c = chapter6
    package = patching.attribution_sweep(c["model"], c["prompts"].clean_tokens, c["metric"], c["zeros"], "head")
    torch.testing.assert_close(package, c["right"])


def test_the_shipped_model_has_a_head_whose_removal_helps(chapter6):
    """Chapter 6 shows one; if retraining removes it, the chapter's text switches branch, but say so here."""
    exact = chapter6["exact"]
    assert (exact > 0.01 * exact.abs().max()).any(), f"no head raises the logit difference when removed: {exact}"


def test_the_negative_name_mover_is_a_large_helper_the_wrong_sign_calls_supporting(chapter6):
    """Chapter 6's real case on its own prompts: chapter 2's negative name mover raises the logit difference by at
    least 10% of the largest head effect when removed, the right sign says so and the wrong sign the opposite, and
    with the final LayerNorm's scale fixed a sizeable share of the gain (its direct write) remains."""
    from attribution_course import circuit
    from attribution_course.diagnosis import Freeze, frozen_exact_sweep

    c, exact = chapter6, chapter6["exact"]
    reading = circuit.read_circuit(c["model"], c["prompts"])
    movers = [(r.layer, r.head) for r in circuit.heads_with_role(reading.roles, "negative name mover")]
    large = [(l, h) for l, h in movers if exact[l, h] >= 0.1 * exact.abs().max()]
    assert large, f"no negative name mover whose removal helps by 10% of the largest effect: {movers}, {exact}"
    fixed = frozen_exact_sweep(c["model"], c["prompts"].clean_tokens, c["metric"], c["zeros"], "head",
                               Freeze(("ln_final.hook_scale",)))
    for l, h in large:
        assert c["right"][l, h] > 0 > c["wrong"][l, h]
        assert 0.2 < fixed[l, h] / exact[l, h] < 0.8, (fixed[l, h], exact[l, h])


def test_pattern_attribution_equals_head_zero_ablation_estimate(chapter6):
    """-A.dM/dA = -z.dM/dz, because a head's output is linear in its attention pattern: with the raw
    values (value bias included) it is the silent-head estimate; at hook_pattern, whose gradient sees
    the folded values, it is the estimate of hook_z = 0."""
    c = chapter6
    clean = c["prompts"].clean_tokens
    edges = attention_attribution.edge_attribution(c["model"], clean, c["metric"])
    torch.testing.assert_close(edges.sum(dim=(-2, -1)), c["right"], atol=1e-4, rtol=1e-4)
    zero_patterns = patching.replacement_activations(c["model"], "pattern", kind="zero", base_tokens=clean)
    pattern = patching.attribution_sweep(c["model"], clean, c["metric"], zero_patterns, "pattern")
    torch.testing.assert_close(pattern, c["folded_right"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(c["folded_right"], c["right"], atol=1e-3), "the value bias should matter on this model"


# ---------------------------------------------------------------- the hedging variant (chapter 6's large case)


@pytest.fixture(scope="module")
def hedging_variant():
    from attribution_course.diagnosis import Freeze, frozen_exact_sweep
    from attribution_course.model import HEDGING_VARIANT_DIR, load_model

    model = load_model(HEDGING_VARIANT_DIR)
    prompts = make_ioi_prompts(model, **CHAPTER_PROMPTS)
    clean = prompts.clean_tokens
    metric = lambda logits: logit_diff(logits, prompts)  # noqa: E731
    zeros = patching.replacement_activations(model, "head", kind="zero", base_tokens=clean)
    return dict(
        exact=patching.exact_sweep(model, clean, metric, zeros, "head"),
        right=patching.attribution_sweep(model, clean, metric, zeros, "head"),
        fixed_scale=frozen_exact_sweep(model, clean, metric, zeros, "head", Freeze(("ln_final.hook_scale",))),
    )


def test_the_hedging_variant_has_a_large_head_whose_removal_helps_and_the_wrong_sign_calls_it_supporting(hedging_variant):
    exact, right = hedging_variant["exact"], hedging_variant["right"]
    layer, head = divmod(int(exact.argmax()), exact.shape[1])
    assert exact[layer, head] >= 0.1 * exact.abs().max(), f"the largest gain is small: {exact}"
    assert right[layer, head] > 0 > -right[layer, head]
    assert sign_claim_violations(exact, right, -right) == []


def test_the_hedging_variants_gain_goes_through_the_final_layernorm_scale(hedging_variant):
    exact, fixed = hedging_variant["exact"], hedging_variant["fixed_scale"]
    layer, head = divmod(int(exact.argmax()), exact.shape[1])
    assert fixed[layer, head] < 0.5 * exact[layer, head], (exact[layer, head], fixed[layer, head])
    # the experiment is not a no-op: heads that write the answer directly keep their effect
    strongest = exact.abs().argmax()
    assert fixed.flatten()[strongest] == pytest.approx(exact.flatten()[strongest].item(), rel=0.5)


def test_the_hedging_variant_is_trained_by_its_recipe():
    import json

    from attribution_course.model import HEDGING_VARIANT_DIR
    from attribution_course.train import HEDGING_VARIANT_RECIPE, VARIANTS, Recipe

    info = json.loads((HEDGING_VARIANT_DIR / "training_info.json").read_text())
    # Recipe fields added after the run are missing from its record and take their defaults (which change
    # nothing); a recorded value that differs, or a field Recipe no longer has, fails.
    assert Recipe(**info["recipe"]) == HEDGING_VARIANT_RECIPE, "retrain with `make train-variant`"
    assert VARIANTS["hedging"] == (HEDGING_VARIANT_RECIPE, HEDGING_VARIANT_DIR)
