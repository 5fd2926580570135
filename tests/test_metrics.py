import pytest
import torch

from attribution_course.metrics import accuracy, logit_diff, normalized_logit_diff
from attribution_course.prompts import make_ioi_prompts


@pytest.fixture(scope="module")
def small_prompts(model):
    return make_ioi_prompts(model, 4, seed=0)


def fake_logits(prompts, io_value, s_value, vocab=300):
    logits = torch.zeros(len(prompts), 15, vocab)
    rows = torch.arange(len(prompts))
    logits[rows, prompts.end_position, prompts.io_token] = io_value
    logits[rows, prompts.end_position, prompts.s_token] = s_value
    return logits


def test_logit_diff_is_io_minus_s_at_the_final_position(small_prompts):
    logits = fake_logits(small_prompts, 3.0, 1.0)
    logits[:, 0, :] = 100.0  # other positions must not matter
    assert logit_diff(logits, small_prompts).item() == pytest.approx(2.0)
    assert logit_diff(logits, small_prompts, per_prompt=True).tolist() == [2.0] * 4


def test_logit_diff_on_the_model_is_positive_for_clean_prompts(model, test_prompts):
    with torch.no_grad():
        clean = logit_diff(model(test_prompts.clean_tokens), test_prompts).item()
        corrupted = logit_diff(model(test_prompts.corrupted_tokens), test_prompts).item()
    assert clean > 2.0
    assert abs(corrupted) < clean / 2


def test_normalized_logit_diff_maps_corrupted_to_zero_and_clean_to_one():
    assert normalized_logit_diff(4.0, clean_value=4.0, corrupted_value=1.0) == pytest.approx(1.0)
    assert normalized_logit_diff(1.0, clean_value=4.0, corrupted_value=1.0) == pytest.approx(0.0)
    assert normalized_logit_diff(2.5, clean_value=4.0, corrupted_value=1.0) == pytest.approx(0.5)
    values = normalized_logit_diff(torch.tensor([1.0, 4.0]), 4.0, 1.0)
    torch.testing.assert_close(values, torch.tensor([0.0, 1.0]))


def test_normalized_logit_diff_refuses_a_degenerate_scale():
    with pytest.raises(ValueError, match="coincide"):
        normalized_logit_diff(1.0, clean_value=2.0, corrupted_value=2.0)


def test_logit_diff_rejects_mismatched_shapes(small_prompts):
    with pytest.raises(ValueError, match=r"\[batch, pos, vocab\]"):
        logit_diff(torch.zeros(4, 300), small_prompts)
    with pytest.raises(ValueError, match="hold 3 prompts"):
        logit_diff(torch.zeros(3, 15, 300), small_prompts)


def test_accuracy_counts_top1_io_predictions(small_prompts):
    assert accuracy(fake_logits(small_prompts, 5.0, 1.0), small_prompts) == 1.0
    assert accuracy(fake_logits(small_prompts, 1.0, 5.0), small_prompts) == 0.0
