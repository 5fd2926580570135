"""AtP*: the QK fix, GradDrop and the paper's scores, checked piece by piece and on the shipped model."""

import pytest
import torch
from torch.testing import assert_close

from attribution_course import atp_star, patching
from attribution_course.attention_attribution import QKV_FAMILIES
from attribution_course.metrics import logit_diff



# ---------------------------------------------------------------- scores


def test_top_k_recall_ranks_by_absolute_value():
    exact = torch.tensor([5.0, -4.0, 0.1, 0.2])
    assert atp_star.top_k_recall(exact, torch.tensor([1.0, -2.0, 0.0, 0.0]), 2) == 1.0
    assert atp_star.top_k_recall(exact, torch.tensor([1.0, 0.0, 0.0, 2.0]), 2) == 0.5
    # a signed ranking would call -4 small: the recall must not
    assert atp_star.top_k_recall(exact, torch.tensor([3.0, -9.0, 1.0, 2.0]), 2) == 1.0
    with pytest.raises(ValueError, match="k must be between 1 and"):
        atp_star.top_k_recall(exact, exact, 5)


def test_false_negatives_are_large_effects_estimated_small():
    exact = torch.tensor([10.0, -3.0, 0.5, 2.0])
    estimate = torch.tensor([9.0, -0.5, 4.0, -2.5])
    assert atp_star.false_negatives(exact, estimate, threshold=0.1).tolist() == [False, True, False, False]
    assert atp_star.false_negatives(exact, estimate, threshold=0.5).tolist() == [False, False, False, False]


# ---------------------------------------------------------------- GradDrop


def test_blocking_nothing_gives_the_ordinary_gradients(model, prompts, metric):
    names = patching.hook_names(model, "head")
    _, acts, grads = patching.cache_activations_and_gradients(model, prompts.clean_tokens, metric, names)
    acts2, grads2 = atp_star.gradients_with_layer_blocked(model, prompts.clean_tokens, metric, names, None)
    for name in names:
        assert_close(acts2[name], acts[name])
        assert_close(grads2[name], grads[name])


def test_blocking_a_layer_cuts_its_own_heads_and_only_changes_earlier_ones(model, prompts, metric):
    names = patching.hook_names(model, "head")
    _, plain = atp_star.gradients_with_layer_blocked(model, prompts.clean_tokens, metric, names, None)
    _, blocked = atp_star.gradients_with_layer_blocked(model, prompts.clean_tokens, metric, names, 1)
    assert (blocked["blocks.1.attn.hook_z"] == 0).all(), "layer 1's heads write only through layer 1's output"
    for later in (2, 3):
        assert_close(blocked[f"blocks.{later}.attn.hook_z"], plain[f"blocks.{later}.attn.hook_z"])
    assert (blocked["blocks.0.attn.hook_z"] - plain["blocks.0.attn.hook_z"]).abs().max() > 1e-5


def test_per_prompt_estimate_averages_to_the_attribution_estimate(model, prompts, metric):
    fam = patching.get_family("head")
    names = patching.hook_names(model, fam)
    replacements = patching.cache_activations(model, prompts.corrupted_tokens, names)
    acts, grads = atp_star.gradients_with_layer_blocked(model, prompts.clean_tokens, metric, names, None)
    per_prompt = atp_star.per_prompt_estimate(acts, grads, replacements, fam)
    assert per_prompt.shape == (model.cfg.n_layers, model.cfg.n_heads, len(prompts))
    assert_close(per_prompt.mean(-1), patching.attribution_estimate(acts, grads, replacements, fam), atol=1e-6, rtol=1e-5)


def test_grad_drop_of_last_layer_heads_is_the_size_of_atp(model, prompts, metric):
    """For the last layer every dropped layer but its own leaves the gradient alone: (L-1)|AtP| / (L-1)."""
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    replacements = patching.cache_activations(model, corrupted, patching.hook_names(model, "head"))
    atp = patching.attribution_sweep(model, clean, metric, replacements, "head")
    batch_mean = atp_star.grad_drop_sweep(model, clean, corrupted, metric, "head", per_prompt=False)
    per_prompt = atp_star.grad_drop_sweep(model, clean, corrupted, metric, "head")
    last = model.cfg.n_layers - 1
    assert_close(batch_mean[last], atp[last].abs(), atol=1e-6, rtol=1e-5)
    assert (per_prompt >= batch_mean - 1e-6).all(), "the mean of |I| is at least |mean of I|"
    assert (batch_mean[:last] - atp[:last].abs()).abs().max() > 1e-4, "earlier layers must see the dropped gradients"


# ---------------------------------------------------------------- QK fix


@pytest.mark.parametrize("family", atp_star.QK_FIXABLE)
def test_qk_fix_is_first_order_in_the_exactly_patched_pattern(model, prompts, metric, family):
    """The QK fix equals pattern attribution with the pattern the model computes when queries (keys) are patched."""
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    fam = QKV_FAMILIES[family]
    source = patching.cache_activations(model, corrupted, patching.hook_names(model, fam))
    pattern_names = patching.hook_names(model, "pattern")
    patched_patterns = {}
    for layer, (q_or_k, pattern) in enumerate(zip(patching.hook_names(model, fam), pattern_names)):
        with model.hooks(fwd_hooks=[(q_or_k, lambda act, hook, new=source[q_or_k]: new.clone())]):
            patched_patterns.update(patching.cache_activations(model, clean, [pattern]))
    expected = patching.attribution_sweep(model, clean, metric, patched_patterns, "pattern")
    fixed = atp_star.qk_fix_sweep(model, clean, corrupted, metric, family)
    assert_close(fixed, expected, atol=1e-5, rtol=1e-4)
    plain = patching.attribution_sweep(model, clean, metric, source, fam)
    assert (fixed - plain).abs().max() > 1e-3, "the QK fix must differ from linearising the softmax"


def test_qk_fix_refuses_families_it_does_not_apply_to(model, prompts, metric):
    with pytest.raises(ValueError, match="family must be one of"):
        atp_star.qk_fix_sweep(model, prompts.clean_tokens, prompts.corrupted_tokens, metric, "head")


# ---------------------------------------------------------------- measured on the shipped model

CHAPTER_PROMPTS = dict(n_prompts=32, split="test", seed=0)


@pytest.fixture(scope="module")
def comparison(model):
    from attribution_course.prompts import make_ioi_prompts

    held_out = make_ioi_prompts(model, **CHAPTER_PROMPTS)
    metric = lambda logits: logit_diff(logits, held_out)  # noqa: E731
    return atp_star.compare_estimators(model, held_out.clean_tokens, held_out.corrupted_tokens, metric, ig_steps=4)


def test_on_the_shipped_model_the_qk_fix_removes_atps_false_negatives_and_graddrop_does_not(comparison):
    """What AtP*'s fixes do on this model (noising, ABC, 32 held-out prompts, seed 0), stated as measured.

    Components: every head through z, q, k and v (80, pooled); false negative:
    ``|exact| >= 0.1·max|exact|`` but ``|estimate|`` below that. Measured when
    this test was written (issue 9's model): AtP misses 2, the queries of the name
    movers L2H1 and L2H3 (exact -1.56 and -1.95, AtP -0.08 and -0.20): patching
    their queries from the ABC prompts moves their attention from IO, where it is
    nearly one-hot (0.91 on average), to S1, and the tangent of a saturated softmax
    sees almost none of that. The QK fix recomputes that softmax and misses none,
    and so does AtP*; GradDrop alone misses the same 2 (no cancellation to undo);
    integrated gradients (4 steps) miss none. If a retrained model changes this,
    the assertions fail and chapter 8's claims must be re-measured.
    """
    false_negatives = {m: s["false_negatives"] for m, s in comparison.scores(k=10).items()}
    assert false_negatives["AtP"] > 0
    assert false_negatives["AtP+QK fix"] < false_negatives["AtP"]
    assert false_negatives["AtP*"] < false_negatives["AtP"]
    assert false_negatives["AtP+GradDrop"] >= false_negatives["AtP"]
    assert false_negatives["IG"] < false_negatives["AtP"]
    exact, estimate = comparison.pooled("AtP")
    families = [f for f in comparison.exact for _ in range(comparison.exact[f].numel())]
    missed = {families[i] for i in atp_star.false_negatives(exact, estimate).nonzero().flatten().tolist()}
    assert missed <= set(atp_star.QK_FIXABLE), missed
    query_key = torch.cat([comparison.exact[f].flatten() for f in ("head_q", "head_k")])
    assert query_key.abs().max() > 0.25 * comparison.exact["head"].abs().max()


def test_qk_fix_does_not_add_false_negatives_where_it_acts(comparison):
    """On the query and key families alone (40 components) the QK fix misses no more than AtP (measured: 1 vs 2)."""
    scores = comparison.scores(k=10, families=["head_q", "head_k"])
    assert scores["AtP+QK fix"]["false_negatives"] <= scores["AtP"]["false_negatives"]
