import pytest
import torch

from attribution_course import corpus
from attribution_course.prompts import make_ioi_prompts


def test_prompts_are_reproducible_from_seed(model):
    first = make_ioi_prompts(model, 20, seed=3)
    again = make_ioi_prompts(model, 20, seed=3)
    other = make_ioi_prompts(model, 20, seed=4)
    assert first.clean_text == again.clean_text
    torch.testing.assert_close(first.clean_tokens, again.clean_tokens)
    assert first.clean_text != other.clean_text


def test_clean_and_corrupted_prompts_share_length_and_differ_only_at_s2(model):
    for corruption in ("abc", "swap"):
        prompts = make_ioi_prompts(model, 30, corruption=corruption, seed=1)
        assert prompts.clean_tokens.shape == prompts.corrupted_tokens.shape == (30, corpus.N_POSITIONS)
        differs = (prompts.clean_tokens != prompts.corrupted_tokens).any(0)
        assert differs.nonzero().flatten().tolist() == [corpus.S2_POSITION]


def test_answer_tokens_sit_where_the_indices_say(model):
    prompts = make_ioi_prompts(model, 30, seed=2)
    rows = torch.arange(30)
    assert (prompts.clean_tokens[rows, prompts.io_positions] == prompts.io_token).all()
    assert (prompts.clean_tokens[rows, prompts.s1_positions] == prompts.s_token).all()
    assert (prompts.clean_tokens[:, prompts.s2_position] == prompts.s_token).all()
    # half ABBA (IO first), half BABA
    assert prompts.io_positions.tolist().count(2) == 15


def test_abc_corruption_uses_a_third_name_and_swap_uses_the_io(model):
    abc = make_ioi_prompts(model, 30, corruption="abc", seed=5)
    s2 = abc.corrupted_tokens[:, abc.s2_position]
    assert ((s2 != abc.io_token) & (s2 != abc.s_token)).all()
    swap = make_ioi_prompts(model, 30, corruption="swap", seed=5)
    assert (swap.corrupted_tokens[:, swap.s2_position] == swap.io_token).all()


def test_train_and_test_splits_share_no_names_or_templates(model):
    test = make_ioi_prompts(model, 50, split="test", seed=0)
    train = make_ioi_prompts(model, 50, split="train", seed=0)
    test_names = set(test.io_token.tolist()) | set(test.s_token.tolist())
    train_names = set(train.io_token.tolist()) | set(train.s_token.tolist())
    assert not test_names & train_names
    assert not set(corpus.TEST_TEMPLATES) & set(corpus.TRAIN_TEMPLATES)
    assert not set(corpus.TEST_NAMES) & set(corpus.TRAIN_NAMES)


def test_subset_keeps_every_field_aligned(model):
    prompts = make_ioi_prompts(model, 10, seed=0)
    part = prompts.subset([1, 3])
    assert part.clean_text == (prompts.clean_text[1], prompts.clean_text[3])
    assert part.io_token.tolist() == [prompts.io_token[1].item(), prompts.io_token[3].item()]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="validation"), "split must be"),
        (dict(corruption="noise"), "corruption must be"),
        (dict(names=["Mary", "John"]), "at least 3 distinct names"),
        (dict(names=["Mary", "John", "Zebulon"]), r"unknown word\(s\) \['Zebulon'\]"),
        (dict(templates=["When {A} met {B} , {S} gave a {OBJECT} to"]), "tokens, expected 15"),
        (dict(templates=["When {A} and {B} went to the {PLACE} , {S} gave a {OBJECT} towards"]), "unknown word"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_ioi_prompts(model, 6, **kwargs)


def test_zero_prompts_is_an_error(model):
    with pytest.raises(ValueError, match="n_prompts"):
        make_ioi_prompts(model, 0)


def test_replace_io_name_changes_only_the_io_token_to_a_new_name(model):
    from attribution_course.prompts import replace_io_name

    prompts = make_ioi_prompts(model, 40, seed=3)
    twins, new = replace_io_name(model, prompts, seed=1)
    rows = torch.arange(len(prompts))
    assert torch.equal(twins[rows, prompts.io_positions], new)
    assert not (new == prompts.io_token).any() and not (new == prompts.s_token).any()
    assert ((twins != prompts.clean_tokens).sum(1) == 1).all(), "exactly one token (the IO name) differs"
    assert (twins == new.unsqueeze(1)).sum(1).eq(1).all(), "C occurs once, where IO was"
    assert torch.equal(replace_io_name(model, prompts, seed=1)[0], twins)
    assert len(set(new.tolist())) > 1, "C is drawn per prompt"
    with pytest.raises(ValueError, match="no name other than"):
        replace_io_name(model, prompts.subset([0]), names=[prompts.clean_text[0].split()[1], prompts.clean_text[0].split()[3]])
