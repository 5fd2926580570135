"""The training script's data and recipe flags (no training here: `make train` takes minutes).

The shipped model is reproducible only while the default recipe draws exactly the
sentences it was trained on; the search flags (``docs/negative_head_search.md``)
must add draws only when they are set.
"""

import hashlib
import random
from dataclasses import replace

import pytest
import torch

from attribution_course import corpus
from attribution_course.train import (
    Recipe,
    append_identity_blocks,
    detach_final_ln_scale,
    drop_whole_heads,
    train,
    training_sentence,
)

#: SHA-256 of the first 2000 sentences of the default recipe from ``random.Random(0)``: the stream the
#: shipped model was trained on (the same digest before and after the search flags were added).
DEFAULT_STREAM_SHA256 = "3fd5ade5132bb3fe9f70312689114361f8a87ce51e3ec78ff98a1dde210c38d3"


def sentences(recipe: Recipe, n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [training_sentence(rng, recipe) for _ in range(n)]


@pytest.mark.parametrize("recipe", ["first", "shipped"])
def test_the_first_and_shipped_recipes_draw_the_models_sentences(recipe):
    """Both models' first phases train on the same stream of sentences; the shipped model's recipe changes its
    name vectors and adds a second phase, not the sentences."""
    from attribution_course.train import VARIANTS

    digest = hashlib.sha256("\n".join(sentences(VARIANTS[recipe][0])).encode()).hexdigest()
    assert digest == DEFAULT_STREAM_SHA256, "the sampler changed: make train no longer reproduces the shipped model"


def test_phase2_only_flags_do_not_touch_the_sentences():
    assert sentences(Recipe(phase2_steps=10, phase2_dropout=0.1, phase2_head_dropout=0.2), 300) == sentences(Recipe(), 300)


def test_distractor_sentences_put_a_third_name_first_and_keep_the_ioi_answer():
    filler_lengths = {len(template.split()) for template in corpus.FILLER_TEMPLATES}
    names = set(corpus.TRAIN_NAMES)
    seen = 0
    for sentence in sentences(Recipe(distractor=1.0, ioi_fraction=1.0), 200):
        words = sentence.split()
        first_stop = words.index(".")
        prefix, ioi = words[: first_stop + 1], words[first_stop + 1 :]
        assert len(prefix) in filler_lengths, sentence
        (distractor,) = [w for w in prefix if w in names]
        # corpus positions count the beginning-of-sequence token, which sentences do not carry
        a, b, s = (ioi[position - 1] for position in (corpus.NAME1_POSITION, corpus.NAME2_POSITION, corpus.S2_POSITION))
        answer = ioi[-2]
        assert len(ioi) == corpus.N_POSITIONS + 1, sentence  # 14 template words, the answer and "."
        assert s in (a, b) and answer == ({a, b} - {s}).pop(), sentence
        assert distractor not in (a, b, answer), sentence
        seen += 1
    assert seen == 200


def test_head_dropout_silences_whole_heads_for_a_sentence_in_training_only():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=40, n_positions=12, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # only the head dropout under test
    model = GPT2LMHeadModel(config)
    handles = drop_whole_heads(model, 0.5)
    seen = []
    model.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    tokens = torch.randint(0, 40, (64, 6))
    model.eval()
    model(tokens)
    model.train()
    model(tokens)
    clean, dropped = (z.unflatten(-1, (4, -1)) for z in seen)  # [batch, pos, head, d_head]
    zeroed = (dropped == 0).all(-1).all(1)  # [batch, head]: silenced at every position
    assert 0.3 < zeroed.float().mean() < 0.7
    kept = (~zeroed)[:, None, :, None].expand_as(dropped)
    torch.testing.assert_close(dropped[kept], 2 * clean[kept])  # the survivors scaled by 1 / (1 - p)
    for handle in handles:
        handle.remove()
    model(tokens)
    assert not (seen[-1].unflatten(-1, (4, -1)) == 0).all(-1).all(1).any(), "the hooks are gone"


@pytest.mark.parametrize("flag, kind", [
    ("distractor", "float"), ("shape_variants", "float"), ("two_pairs", "float"), ("phase2_dropout", "float"),
    ("phase2_head_dropout", "float"), ("phase2_new_layers", "int"), ("phase2_train_new_only", "int"),
    ("phase2_detach_final_ln_scale", "int"), ("phase2_new_attention_only", "int"), ("hedge_place", "float"),
    ("phase2_new_heads_skip_self", "int"), ("phase2_new_heads_names_only", "float"),
    ("phase2_new_heads_token_values", "float"), ("crowd", "float"), ("crowd_before", "float"),
    ("phase2_lower_copied_name", "float"), ("phase2_match_logits", "int"), ("phase2_target_temperature", "float"),
    ("phase2_name_logit_weight", "float"), ("phase2_new_heads_fade", "int"), ("name_embedding_std", "float"),
    ("phase2_new_heads_learning", "int"), ("phase2_keep_final_scale", "float"), ("name_unembedding_std", "float"),
])
def test_search_flags_are_command_line_options(flag, kind, capsys):
    from attribution_course.train import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"--{flag.replace('_', '-')}", "not-a-number"])
    # the option exists and parses a number (an unknown option would fail with "unrecognized arguments")
    assert exit_info.value.code == 2
    assert f"invalid {kind} value: 'not-a-number'" in capsys.readouterr().err


def test_appended_blocks_start_as_the_identity():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    grown = append_identity_blocks(model, 2).eval()
    assert grown.config.n_layer == 4 and model.config.n_layer == 2
    tokens = torch.randint(0, 30, (5, 8))
    with torch.no_grad():
        torch.testing.assert_close(grown(tokens).logits, model(tokens).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(grown.transformer.h[1].attn.c_attn.weight, model.transformer.h[1].attn.c_attn.weight)


def test_training_only_the_appended_blocks_leaves_the_trained_ones_alone(tmp_path):
    """A few steps of a tiny recipe: the first phase's weights are saved at its end, and after a second
    phase that trains only an appended block they are unchanged while the new block has learned."""
    from transformers import GPT2LMHeadModel

    recipe = Recipe(n_layer=1, n_head=2, n_embd=16, steps=3, batch_size=4, phase2_steps=3, phase2_lr=0.01,
                    phase2_new_layers=1, phase2_train_new_only=1, hedge_new=0.5)
    train(tmp_path / "model", recipe, checkpoint=tmp_path / "phase1.pt", checkpoint_at=3)
    before = torch.load(tmp_path / "phase1.pt", weights_only=False)["model"]
    grown = GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    assert grown.config.n_layer == 2
    after = grown.state_dict()
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight",
                "transformer.wpe.weight"):
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)
    assert after["transformer.h.1.attn.c_proj.weight"].abs().max() > 0, "the appended block should have learned"
    assert after["transformer.h.1.mlp.c_proj.weight"].abs().max() > 0, "its MLP too, unless told otherwise"
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in (tmp_path / "model").iterdir()), \
        "every file must be readable by others (the grading sandbox's user)"

    attention_only = train(tmp_path / "attention_only", replace(recipe, phase2_new_attention_only=1))
    after = GPT2LMHeadModel.from_pretrained(tmp_path / "attention_only").state_dict()
    assert after["transformer.h.1.attn.c_proj.weight"].abs().max() > 0
    assert after["transformer.h.1.mlp.c_proj.weight"].abs().max() == 0, "the appended MLP must stay silent"
    assert attention_only["architecture"]["n_layer"] == 2


@pytest.mark.parametrize("flags", [
    dict(phase2_new_layers=1),  # no second phase to append them in
    dict(phase2_detach_final_ln_scale=1),
    dict(phase2_steps=10, phase2_train_new_only=1),  # nothing appended to train
    dict(phase2_steps=10, phase2_new_attention_only=1),
    dict(phase2_steps=10, phase2_new_heads_skip_self=1),
    dict(phase2_steps=10, phase2_new_heads_names_only=0.5),
    dict(phase2_steps=10, phase2_new_heads_token_values=0.5),
    dict(phase2_steps=10, phase2_lower_copied_name=1.0),
])
def test_flags_that_would_do_nothing_are_refused(flags):
    with pytest.raises(ValueError, match="set phase2_"):
        Recipe(**flags)


def test_crowded_sentences_put_a_third_name_between_the_clauses_or_before_the_sentence():
    """``crowd``: a clause about a name that is neither IO nor S, after the first clause's comma or, for a share
    ``crowd_before``, as a sentence of its own in front; the answer is still IO."""
    import random

    from attribution_course import corpus
    from attribution_course.train import training_sentence

    def ioi_sentences(recipe, n=400):
        rng = random.Random(0)
        sentences = (training_sentence(rng, recipe).split() for _ in range(n))
        return [words for words in sentences if "," in words]  # the IOI ones (filler sentences have no comma)

    between = ioi_sentences(Recipe(crowd=1.0))
    assert between and all(words[words.index(",") + 1 : words.index(",") + 3][1] == "likes" for words in between)
    for words in between:
        third = words[words.index(",") + 1]
        assert third in corpus.TRAIN_NAMES and words.count(third) == 1 and words[-2] != third
        assert words[-2] in words[:4], "the answer is still a name of the first clause (IO)"
    with_distractor = ioi_sentences(Recipe(crowd=1.0, crowd_before=0.5, distractor=1.0))
    for words in with_distractor:
        # the clause is "C likes the PLACE" then "," or "."; the filler's "A likes the PLACE and the OBJECT ." is not
        third = next(words[i - 1] for i, word in enumerate(words) if word == "likes" and words[i + 3] in (".", ","))
        assert words.count(third) == 1, words
    placed = ioi_sentences(Recipe(crowd=1.0, crowd_before=0.5))
    in_front = [words for words in placed if words[1] == "likes" and words[4] == "."]
    assert 0.35 < len(in_front) / len(placed) < 0.65, len(in_front)
    with pytest.raises(ValueError, match="set crowd too"):
        Recipe(crowd_before=0.5)


@pytest.mark.parametrize("flags, message", [
    (dict(phase2_new_heads_names_only=1.5), "a share of the second phase"),
    (dict(phase2_new_heads_names_only=0.5, phase2_new_heads_skip_self=1), "use one"),
    (dict(phase2_new_heads_token_values=-0.1), "a share of the second phase"),
    (dict(phase2_lower_copied_name=1.0), "set phase2_train_new_only too"),  # its targets come from frozen blocks
    (dict(phase2_lower_copied_name=-1.0, phase2_train_new_only=1), "would raise it"),
    (dict(phase2_match_logits=1, phase2_train_new_only=1), "set that too"),
    (dict(phase2_target_temperature=0.0), "must be positive"),
    (dict(phase2_name_logit_weight=1.0, phase2_train_new_only=1), "set that too"),
    (dict(phase2_new_heads_fade=1), "set phase2_new_heads_names_only or phase2_new_heads_token_values too"),
    (dict(phase2_new_heads_learning=5), "counts heads of a block of 4"),
    (dict(phase2_keep_final_scale=1.0, phase2_train_new_only=1), "set that too"),
])
def test_names_only_mask_settings_that_make_no_sense_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        Recipe(phase2_steps=10, phase2_new_layers=1, **flags)


def test_sentences_longer_than_the_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="32 positions"):
        train(tmp_path, Recipe(n_layer=1, n_head=2, n_embd=16, steps=1, distractor=1.0, shape_variants=1.0, hedge_place=1.0))


def test_place_hedging_continues_with_the_place_and_adds_no_draws_when_off():
    assert sentences(Recipe(hedge_place=0.0), 300) == sentences(Recipe(), 300)
    hedged = sentences(Recipe(hedge_place=1.0, ioi_fraction=1.0), 50)
    for sentence in hedged:
        words = sentence.split()
        assert words[-4] == "to" and words[-3] == "the" and words[-2] in corpus.PLACES and words[-1] == ".", sentence


def test_shape_variants_move_s2_and_the_final_word_but_keep_the_answer():
    gaps = set()
    for sentence in sentences(Recipe(shape_variants=0.5, ioi_fraction=1.0), 300):
        words = sentence.split()
        comma = words.index(",")
        a, b, s, answer = words[1], words[3], words[comma + 1], words[-2]
        assert s in (a, b) and answer == ({a, b} - {s}).pop(), sentence
        assert words[-3] == "to" and all(place in corpus.PLACES for place in words[comma - 1 : comma])
        gaps.add((comma - 3, len(words) - 2 - comma))  # B to S2, S2 to the answer
    assert gaps == {(5, 6), (8, 6), (5, 9), (8, 9)}, "each insertion happens, alone and together"


def test_two_pair_sentences_answer_with_the_subjects_partner():
    seen = 0
    for sentence in sentences(Recipe(two_pairs=1.0, ioi_fraction=1.0), 200):
        words = sentence.split()
        a, b, c, d = words[1], words[3], words[5], words[7]
        assert words[2] == words[6] == "and" and words[4] == "met", sentence
        s, answer = words[words.index(",") + 1], words[-2]
        partner = {a: b, b: a, c: d, d: c}
        assert len({a, b, c, d}) == 4 and s in partner and answer == partner[s], sentence
        seen += s in (c, d)
    assert 60 < seen < 140, "the subject is in either pair"


def test_detaching_the_final_ln_scale_changes_the_gradient_not_the_forward_pass():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=8, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    tokens = torch.randint(0, 30, (4, 8))

    def logits_and_gradient():
        model.zero_grad()
        logits = model(tokens).logits
        logits[..., 3].sum().backward()  # one token's logit: its gradient runs through the LayerNorm's scale
        return logits.detach(), model.transformer.h[0].mlp.c_proj.weight.grad.clone()

    live_logits, live_gradient = logits_and_gradient()
    handle = detach_final_ln_scale(model)
    detached_logits, detached_gradient = logits_and_gradient()
    torch.testing.assert_close(detached_logits, live_logits, atol=1e-6, rtol=1e-6)
    assert (detached_gradient - live_gradient).abs().max() > 1e-4
    model.eval()
    _, eval_gradient = logits_and_gradient()
    torch.testing.assert_close(eval_gradient, live_gradient)  # the hook acts in training mode only
    handle.remove()


def test_appended_heads_that_skip_their_own_position_keep_the_mask_after_saving(tmp_path):
    """A tiny run with the diagnostic mask: its heads give their own position no attention (the first
    position excepted), the trained block below keeps it, and ``resurvey`` measures the model with the mask
    (without it, the saved weights compute something else)."""
    from transformers import GPT2LMHeadModel

    from attribution_course.train import block_attention_to_self, resurvey

    recipe = Recipe(n_layer=1, n_head=2, n_embd=16, steps=2, batch_size=4, phase2_steps=3, phase2_lr=0.01,
                    phase2_new_layers=1, phase2_train_new_only=1, phase2_new_heads_skip_self=1, hedge_new=0.5)
    trained = train(tmp_path, recipe)
    model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    model.set_attn_implementation("eager")
    tokens = torch.randint(2, 30, (3, 9))
    with torch.no_grad():
        plain = model(tokens, output_attentions=True)
        block_attention_to_self(model.transformer.h[1:])
        masked = model(tokens, output_attentions=True)
    below, appended = masked.attentions
    assert (below.diagonal(dim1=-2, dim2=-1)[..., 1:] > 0).all(), "the trained block may attend to itself"
    assert (appended.diagonal(dim1=-2, dim2=-1)[..., 1:] == 0).all() and (appended[..., 0, 0] == 1).all()
    assert (appended.triu(1) == 0).all(), "still causal"
    assert not torch.allclose(plain.logits, masked.logits), "without the mask the saved weights compute another model"
    assert resurvey(tmp_path)["head_survey"] == trained["head_survey"], "resurvey must put the mask back"


def test_the_names_only_mask_lets_heads_read_names_and_the_first_token_only():
    from transformers import GPT2Config, GPT2LMHeadModel

    from attribution_course.train import NamesOnlyAttention

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("eager")
    tokens = torch.tensor([[0, 5, 21, 6, 22, 7, 21, 8], [0, 23, 5, 6, 7, 24, 8, 9]])
    names = torch.tensor([21, 22, 23, 24])
    readable = torch.isin(tokens, names)
    readable[:, 0] = True
    mask = NamesOnlyAttention(model.transformer.h[1:], names)
    mask.ids = tokens
    with torch.no_grad():
        below, appended = model(tokens, output_attentions=True).attentions
        assert (appended.transpose(1, 3)[~readable] == 0).all(), "no attention to a word that is not a name"
        assert (appended.transpose(1, 3)[readable].sum() > 0) and (appended.triu(1) == 0).all()
        assert (below.transpose(1, 3)[~readable] > 0).any(), "the block below is not masked"
        mask.active = False
        _, unmasked = model(tokens, output_attentions=True).attentions
        assert (unmasked.transpose(1, 3)[~readable] > 0).any(), "inactive, the mask does nothing"
        mask.active = True
        mask.remove()
        _, removed = model(tokens, output_attentions=True).attentions
        torch.testing.assert_close(removed, unmasked)


def test_token_values_give_appended_heads_values_from_the_embeddings_only():
    """With the reroute, the appended block's values are computed from the embeddings alone (not from what the
    block below wrote), its queries and keys are the plain model's, and inactive or removed it changes nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from attribution_course.train import TokenValues

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("eager")
    tokens = torch.tensor([[0, 5, 21, 6, 22, 7, 21, 8]])
    appended = model.transformer.h[1]
    with torch.no_grad():  # a block below that writes as much as a trained one, so that values move
        for parameter in model.transformer.h[0].parameters():
            parameter.normal_(0, 0.5)
    reroute = TokenValues(model, [appended])
    seen = {}  # what the attention receives: registered after the reroute's hook, so it sees its output
    appended.attn.c_attn.register_forward_hook(lambda module, args, output: seen.__setitem__("qkv", output))
    with torch.no_grad():
        model(tokens)
        rerouted = seen["qkv"]
        reroute.active = False
        model(tokens)
        plain = seen["qkv"]
        embedded = model.transformer.wte(tokens) + model.transformer.wpe(torch.arange(8))
        c_attn = appended.attn.c_attn
        from_embedding = appended.ln_1(embedded) @ c_attn.weight + c_attn.bias  # not a module call: no hooks
        torch.testing.assert_close(rerouted[..., 32:], from_embedding[..., 32:])  # values: from the embeddings
        torch.testing.assert_close(rerouted[..., :32], plain[..., :32])  # queries and keys: as in the plain model
        assert (plain[..., 1:, 32:] - from_embedding[..., 1:, 32:]).abs().max() > 0.1, "the block below moves the plain values"
        reroute.active, reroute.mix = True, 0.25  # fading out: a quarter from the embeddings, the rest as plain
        model(tokens)
        torch.testing.assert_close(seen["qkv"][..., 32:], 0.25 * from_embedding[..., 32:] + 0.75 * plain[..., 32:])
        torch.testing.assert_close(seen["qkv"][..., :32], plain[..., :32])
        for handle in reroute.handles:
            handle.remove()
        model(tokens)
        torch.testing.assert_close(seen["qkv"], plain)


def test_a_run_trained_reading_names_only_saves_a_plain_model_and_measures_it_under_the_mask(tmp_path):
    """The names-only mask is for the training: the saved model is plain GPT-2 (its survey is of the unmasked
    model), and training_info adds where the appended heads look with the mask put back (IO, S1, S2 and the
    first token then take all of a head's attention, which they do not without it); ``resurvey`` repeats both."""
    from attribution_course.train import resurvey

    recipe = Recipe(n_layer=1, n_head=2, n_embd=16, steps=2, batch_size=4, phase2_steps=4, phase2_lr=0.01,
                    phase2_new_layers=1, phase2_train_new_only=1, phase2_new_heads_names_only=0.5, hedge_new=0.5)
    trained = train(tmp_path, recipe)
    under_mask = trained["attention_under_names_only_mask"]
    assert sorted(under_mask) == ["L1H0", "L1H1"], "the appended block's heads only"
    for row in under_mask.values():
        assert abs(sum(row.values()) - 1) < 1e-3, row
    unmasked = {row["head"]: row for row in trained["head_survey"]["heads"]}
    # Under the mask the final word (not a name) gets no attention; in the plain model it does.
    assert any(unmasked[head]["attention_to_end"] > 0 for head in under_mask), "the survey is of the plain model"
    again = resurvey(tmp_path)
    assert again["attention_under_names_only_mask"] == under_mask and again["head_survey"] == trained["head_survey"]


def test_a_run_trained_with_values_from_the_embeddings_is_also_surveyed_with_them(tmp_path):
    """The saved model is plain GPT-2; training_info adds the appended heads surveyed with the reroute put back:
    the same attention, other writes; ``resurvey`` repeats both."""
    from attribution_course.train import resurvey

    recipe = Recipe(n_layer=1, n_head=2, n_embd=16, steps=2, batch_size=4, phase2_steps=6, phase2_lr=0.03,
                    phase2_new_layers=1, phase2_train_new_only=1, phase2_new_heads_token_values=1.0, hedge_new=0.5)
    trained = train(tmp_path, recipe)
    rerouted = trained["appended_heads_under_token_values"]
    plain = {row["head"]: row for row in trained["head_survey"]["heads"]}
    assert [row["head"] for row in rerouted["heads"]] == ["L1H0", "L1H1"], "the appended block's heads only"
    for row in rerouted["heads"]:
        for key in ("attention_to_io", "attention_to_s1", "attention_to_s2", "attention_to_end"):
            assert abs(row[key] - plain[row["head"]][key]) < 1e-3, (key, row, plain[row["head"]])
    assert any(row["direct_logit_attribution"] != plain[row["head"]]["direct_logit_attribution"] for row in rerouted["heads"])
    assert rerouted["clean_logit_diff"] != trained["head_survey"]["clean_logit_diff"]
    # The write split by source adds up to the head's direct logit attribution, plain and rerouted.
    by_source = rerouted["direct_logit_attribution_by_source"]
    for survey_rows, split in ((plain, by_source["plain"]), ({row["head"]: row for row in rerouted["heads"]}, by_source["rerouted"])):
        assert sorted(split) == ["L1H0", "L1H1"]
        for head, parts in split.items():
            assert sorted(parts) == ["end", "io", "other", "s1", "s2"]
            assert abs(sum(parts.values()) - survey_rows[head]["direct_logit_attribution"]) < 3e-4, (head, parts)
    assert by_source["plain"] != by_source["rerouted"]
    again = resurvey(tmp_path)
    assert again["appended_heads_under_token_values"] == rerouted and again["head_survey"] == trained["head_survey"]
    assert "attention_under_names_only_mask" not in trained


def test_the_command_line_trains_the_shipped_model_or_a_variant_with_overrides():
    from attribution_course.model import HEDGING_VARIANT_DIR, SHIPPED_MODEL_DIR
    from attribution_course.train import HEDGING_VARIANT_RECIPE, SHIPPED_RECIPE, parse_arguments

    args, recipe = parse_arguments([])
    assert recipe == SHIPPED_RECIPE and args.out == SHIPPED_MODEL_DIR
    args, recipe = parse_arguments(["--variant", "first", "--out", "r0", "--hedge-s", "0.25"])
    assert recipe == Recipe(hedge_s=0.25) and str(args.out) == "r0"
    args, recipe = parse_arguments(["--variant", "hedging"])
    assert recipe == HEDGING_VARIANT_RECIPE and args.out == HEDGING_VARIANT_DIR
    args, recipe = parse_arguments(["--variant", "hedging", "--hedge-new", "0.3", "--out", "elsewhere"])
    assert recipe == replace(HEDGING_VARIANT_RECIPE, hedge_new=0.3) and str(args.out) == "elsewhere"


def test_a_command_line_recipe_that_would_do_nothing_is_an_error(capsys):
    from attribution_course.train import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments(["--variant", "first", "--out", "r0", "--phase2-new-layers", "1"])
    assert "set phase2_steps too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_arguments(["--variant", "first"])  # it has no directory of its own to overwrite
    assert "give --out" in capsys.readouterr().err


def test_copied_names_are_the_names_the_context_already_holds():
    """Position t is marked when ``ids[t + 1]`` is a name that occurs at or before t: not a first mention, not a
    repeated word that is not a name."""
    from attribution_course.train import copied_name_positions

    names = torch.tensor([5, 7])
    ids = torch.tensor([[0, 5, 7, 9, 9, 5, 7, 3],
                        [0, 7, 5, 5, 3, 3, 3, 3]])
    assert copied_name_positions(ids, names).tolist() == [
        [False, False, False, False, True, True, False],  # 5 and 7 again; the second 9 is no name
        [False, False, True, False, False, False, False],  # 5 right after 5
    ]


@pytest.mark.parametrize("match_logits, temperature, name_weight", [(False, 1.0, 0.0), (False, 3.0, 0.0), (True, 1.0, 0.0),
                                                                  (False, 1.0, 1.0)])
def test_the_copied_name_loss_is_lowest_where_only_the_copied_name_is_lowered(match_logits, temperature, name_weight):
    """The frozen prediction with the copied name's logit lowered by exactly ``lower`` beats the frozen prediction
    itself, the copied name lowered by half as much, and every name lowered together."""
    from attribution_course.train import copied_name_lowered_loss

    torch.manual_seed(0)
    names = torch.tensor([5, 7])
    ids = torch.tensor([[0, 5, 7, 9, 5, 3]])  # position 3 predicts 5, a copied name
    frozen = torch.randn(1, 5, 12) * 3
    predicted = torch.ones(1, 5, dtype=torch.bool)

    def loss_with(change: dict) -> float:
        logits = frozen.clone()
        for token, amount in change.items():
            logits[0, 3, token] += amount
        return copied_name_lowered_loss(logits, frozen, ids, predicted, names, 2.0, match_logits, temperature,
                                        name_weight).item()

    best = loss_with({5: -2.0})
    assert best < loss_with({}) and best < loss_with({5: -1.0}) and best < loss_with({5: -2.0, 7: -2.0})
    assert best == pytest.approx(loss_with({5: -2.0, 9: 0.0}))
    if match_logits:
        assert best == pytest.approx(0.0, abs=1e-5)


def test_the_name_logit_term_charges_for_moving_another_name_as_much_as_for_missing_the_copied_one():
    """With only the name term (weight 1) on top of cross-entropy, lowering the other name by 1 costs 1/n of the
    squared miss summed over the copied positions, exactly; cross-entropy alone charges almost nothing for it."""
    from attribution_course.train import copied_name_lowered_loss

    names = torch.tensor([5, 7])
    ids = torch.tensor([[0, 5, 7, 9, 5, 3]])
    frozen = torch.zeros(1, 5, 12)
    frozen[0, 3, 5], frozen[0, 3, 7] = 10.0, -10.0  # the copied name is sure, the other one nearly impossible
    predicted = torch.ones(1, 5, dtype=torch.bool)
    right = frozen.clone()
    right[0, 3, 5] -= 2.0
    also_other = right.clone()
    also_other[0, 3, 7] -= 1.0

    def loss(logits, weight):
        return copied_name_lowered_loss(logits, frozen, ids, predicted, names, 2.0, name_logit_weight=weight).item()

    assert loss(also_other, 0.0) - loss(right, 0.0) < 1e-6
    assert loss(also_other, 1.0) - loss(right, 1.0) == pytest.approx(1.0 / 5, rel=1e-4)  # one unit squared, five positions


def test_training_constraints_stop_at_their_share_or_fade_over_it():
    from attribution_course.train import training_constraint_strength

    recipe = Recipe(steps=100, phase2_steps=100, phase2_new_layers=1, phase2_new_heads_names_only=0.5)
    assert [training_constraint_strength(recipe, step, 0.5) for step in (100, 149, 150, 199)] == [1.0, 1.0, 0.0, 0.0]
    faded = replace(recipe, phase2_new_heads_fade=1)
    assert [training_constraint_strength(faded, step, 0.5) for step in (100, 125, 150, 199)] == [1.0, 0.5, 0.0, 0.0]
    assert training_constraint_strength(faded, 150, 0.0) == 0.0  # no share: never on


def test_a_fading_names_only_mask_scales_the_other_words_attention():
    """At strength 0.5 a non-name earlier word's score is lowered by log 2 (its softmax weight halved before
    normalising); names and the first position are untouched; later positions stay masked; at 0 there is no mask."""
    import math

    from attribution_course.train import NamesOnlyAttention

    block = torch.nn.Module()
    block.attn = torch.nn.Identity()
    mask = NamesOnlyAttention([block], torch.tensor([5, 7]))
    mask.ids = torch.tensor([[0, 5, 9, 7, 9]])
    hidden = torch.zeros(1, 5, 4)
    mask.strength = 0.5
    _, kwargs = mask.mask(None, (hidden,), {})
    bias = kwargs["attention_mask"][0, 0]  # [query, key]
    assert bias[4].tolist() == pytest.approx([0.0, 0.0, math.log(0.5), 0.0, math.log(0.5)])
    assert bias[1, 2:].isinf().all() and (bias[1, 2:] < 0).all()
    mask.strength = 1.0
    _, kwargs = mask.mask(None, (hidden,), {})
    assert kwargs["attention_mask"][0, 0, 4, 2].isinf()
    mask.strength = 0.0
    assert mask.mask(None, (hidden,), {}) is None


def test_appended_heads_beyond_the_learning_ones_write_nothing(tmp_path):
    """``phase2_new_heads_learning=1``: after a second phase the appended block's first head writes, the second
    one's rows of the output projection are still zero."""
    from transformers import GPT2LMHeadModel

    recipe = Recipe(n_layer=1, n_head=2, n_embd=16, steps=2, batch_size=4, phase2_steps=3, phase2_lr=0.01,
                    phase2_new_layers=1, phase2_train_new_only=1, phase2_new_attention_only=1, phase2_new_heads_learning=1)
    train(tmp_path / "model", recipe)
    projection = GPT2LMHeadModel.from_pretrained(tmp_path / "model").transformer.h[1].attn.c_proj.weight  # [z, d_model]
    assert projection[:8].abs().max() > 0, "the learning head should have learned"
    assert projection[8:].abs().max() == 0, "the other head must stay silent"


def test_the_frozen_prediction_is_the_model_below_the_appended_blocks():
    """Read in the grown model's own forward pass: the logits are the ungrown model's exactly while the appended block
    writes nothing, and the final scale ratio is 1; once the block writes, the ratio moves and the frozen logits do not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from attribution_course.train import FrozenPrediction

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    grown = append_identity_blocks(model, 1).eval()
    frozen = FrozenPrediction(grown, 1)
    tokens = torch.randint(0, 30, (3, 8))
    with torch.no_grad():
        expected = model(tokens).logits
        grown(tokens)
        torch.testing.assert_close(frozen.logits(), expected)
        torch.testing.assert_close(frozen.final_scale_ratio(), torch.ones(3, 8))
        grown.transformer.h[1].attn.c_proj.weight.normal_(0, 1.0)
        grown(tokens)
        torch.testing.assert_close(frozen.logits(), expected)
        assert (frozen.final_scale_ratio() - 1).abs().max() > 0.01


def test_the_io_name_stays_legible_in_the_shipped_model_and_the_measurement_restores_its_names():
    """On the shipped model, with names drawn at its training's size: before the first block the residual at IO's
    position is nearly all the name (R² near 1), and a linear read still recovers most of it before every block
    (the point of drawing names large; on the first model, with names ten times smaller, it fell to about 0.5).
    The model's own name embeddings are put back afterwards."""
    from attribution_course.model import SHIPPED_MODEL_DIR
    from attribution_course.train import SHIPPED_RECIPE, io_name_legibility
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    model = GPT2LMHeadModel.from_pretrained(SHIPPED_MODEL_DIR).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(SHIPPED_MODEL_DIR)
    before = model.transformer.wte.weight.clone()
    legibility = io_name_legibility(model, tokenizer, SHIPPED_RECIPE.name_embedding_std, n_draws=10)
    assert len(legibility) == model.config.n_layer
    assert legibility[0] > 0.9 and min(legibility) > 0.7, legibility
    # the same read with names drawn ten times smaller than the model was trained on is far worse: it measures
    # the names the model was trained with, not any random vectors
    assert min(io_name_legibility(model, tokenizer, SHIPPED_RECIPE.name_embedding_std / 10, n_draws=10)) < 0.7
    assert torch.equal(model.transformer.wte.weight, before)


def test_untied_names_get_their_input_directions_rescaled_as_output_vectors(tmp_path):
    """``name_unembedding_std``: the saved model is untied; each name's output vector is its input vector times
    the ratio of the two standard deviations; other words keep output vectors of their own."""
    from transformers import GPT2LMHeadModel

    from attribution_course.train import build_tokenizer, name_token_ids

    recipe = Recipe(n_layer=1, n_head=2, n_embd=16, steps=2, batch_size=4, name_embedding_std=0.5, name_unembedding_std=0.1)
    train(tmp_path / "model", recipe)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    names = name_token_ids(build_tokenizer())
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight[names], model.transformer.wte.weight[names] * 0.2)
    assert not torch.equal(model.lm_head.weight[:2], model.transformer.wte.weight[:2])
    with pytest.raises(ValueError, match="standard deviation"):
        Recipe(name_unembedding_std=-0.1)
