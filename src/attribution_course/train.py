"""Train the course's shipped IOI model: ``python -m attribution_course.train``.

A small GPT-2 (``GPT2LMHeadModel``: LayerNorm, MLPs, several heads per layer)
with a word-level tokenizer, trained from scratch on synthetic IOI sentences
(training names and templates only) mixed with filler sentences that mention
every name. Names get random embeddings that training never updates and that
are drawn afresh at every step: the model cannot memorise a per-name answer and
has to learn a mechanism that works for any name vector, which is what lets it
handle the held-out names it never saw in an IOI sentence. The saved model
carries one more seeded draw. Seeded; takes a few minutes on 2 CPU cores. Writes the Hugging Face
files and ``MODEL_CARD.md`` (whose numbers come from this run's evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch

from . import corpus
from .model import HEDGING_VARIANT_DIR, SHIPPED_MODEL_DIR
from .prompts import fill_template

#: Standard deviation of the random embedding of every name (``Recipe.name_embedding_std``'s default).
NAME_EMBEDDING_STD = 0.1


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (with the seed).

    The defaults are the course's first model's recipe, the baseline every run of
    ``docs/negative_head_search.md`` is compared with; the shipped model's is
    ``SHIPPED_RECIPE``. Every field is a flag of ``python -m attribution_course.train``
    so that other recipes can be tried and compared.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    dropout: float = 0.0
    #: The standard deviation of the names' random embeddings (redrawn at every step). After the first block the
    #: residual stream at a name's position is mostly what the blocks wrote there, so a later head can copy a name
    #: only approximately (``io_name_legibility``); larger names stay legible.
    name_embedding_std: float = NAME_EMBEDDING_STD
    #: 0: the unembedding is the embedding (tied, as in GPT-2). Above 0: they are untied, and each name's output
    #: vector is its (random) input vector rescaled to this standard deviation, so that names drawn large to stay
    #: legible in the residual stream do not also make large random logits.
    name_unembedding_std: float = 0.0
    ioi_fraction: float = 0.8
    hedge_s: float = 0.0
    hedge_new: float = 0.0
    #: A share of the IOI sentences that continue with "the PLACE ." instead of a name: hedging towards a
    #: word that is not a name, so that shrinking every name logit together (or the whole residual
    #: stream) also shrinks the logit of the right alternative.
    hedge_place: float = 0.0
    abc_new: float = 0.0
    #: A share of the IOI sentences that follow a filler sentence about a third name (the
    #: distractor): every position moves, and a name in context is neither the answer nor repeated.
    distractor: float = 0.0
    #: A share of the IOI sentences whose template grows a second place ("and the PLACE") after the
    #: first and, independently, a second object ("and a OBJECT"): the gaps between the names, S2 and
    #: the final word then vary, so no head can find them at a fixed offset.
    shape_variants: float = 0.0
    #: A share of the IOI sentences with two pairs of names ("A and B met C and D ..."): the subject
    #: may be any of the four and the answer is its partner, so subtracting the subject from the names
    #: in context no longer leaves the answer; the model has to find the partner.
    two_pairs: float = 0.0
    #: A share of the IOI sentences with a clause about a third name between the first clause and the
    #: second ("..., C likes the PLACE , S gave ..."): the names in context, less the subject, then leave
    #: two names, so a bag of all the names no longer gives the answer. (In these templates the third name
    #: never takes a position IO or S1 takes, so a bag of the names at IO's and S1's positions still does.)
    crowd: float = 0.0
    #: Of those, the share whose clause is a sentence of its own before the IOI sentence ("C likes the PLACE .
    #: When ..."), which moves every later position.
    crowd_before: float = 0.0
    #: The hedging and ABC sentences start at this fraction of ``steps`` (0: from the start).
    extra_data_from: float = 0.0
    #: A second phase of this many steps, with its own one-cycle schedule peaking at ``phase2_lr``,
    #: after the first ``steps``. When it is set, the hedging and ABC sentences are used in it
    #: only: the IOI circuit forms first on clean data, then adapts to them.
    phase2_steps: int = 0
    phase2_lr: float = 1e-3
    #: Dropout (embeddings, attention probabilities, residual writes) in the second phase only.
    phase2_dropout: float = 0.0
    #: In the second phase, each head's whole output is dropped for a sentence with this probability.
    phase2_head_dropout: float = 0.0
    #: Blocks appended above the trained ones when the second phase starts. Each starts as the
    #: identity (its writes to the residual stream are zero), so it begins with the trained model's
    #: predictions and can only learn to correct them, as a late head of a deep model does.
    phase2_new_layers: int = 0
    #: 1: in the second phase only the appended blocks learn; the trained model below them is frozen
    #: (head dropout, if any, then silences heads of the frozen blocks only).
    phase2_train_new_only: int = 0
    #: 1: the appended blocks' MLPs stay zero and do not learn; only their attention heads do.
    phase2_new_attention_only: int = 0
    #: 1: in the second phase no gradient flows through the final LayerNorm's scale (the forward pass
    #: is unchanged), so lowering a logit cannot be learned by inflating the residual stream's norm.
    phase2_detach_final_ln_scale: int = 0
    #: 1: the appended blocks' heads may not attend to their own position (the first position excepted,
    #: which has no other). A diagnostic, not a recipe for a shipped model: the saved weights then belong
    #: to a model with this mask, which plain GPT-2 code does not apply (``resurvey`` puts it back). It asks
    #: where a head that hedges looks when it cannot read the prediction already made where it stands.
    phase2_new_heads_skip_self: int = 0
    #: A curriculum, for the training only: for this fraction of the second phase the appended blocks'
    #: heads may attend to name tokens and the first position only; for the rest of it, and in the saved
    #: model (plain GPT-2), they attend anywhere. A hedging head that may read only names has to find the
    #: predicted name among them (copy suppression's shape); the unmasked rest asks whether it keeps that.
    phase2_new_heads_names_only: float = 0.0
    #: A curriculum, for the training only: for this fraction of the second phase the appended blocks' heads
    #: compute their values from the token and position embeddings (through their own first LayerNorm),
    #: not from the residual stream they sit on; queries and keys are unchanged. After four layers the
    #: answer's direction is in the residual at every position, so a hedging head can write against the
    #: answer whichever position it reads; from the embeddings, only the names' own positions carry them, so
    #: suppressing IO should mean attending to it. (It did not, in runs v1-v4 of the search log: most of the
    #: heads' write against the answer still came from the other words' fixed vectors.) The saved model is plain GPT-2.
    phase2_new_heads_token_values: float = 0.0
    #: Calibration targets for the appended blocks (the trained ones frozen below them). In the second phase the
    #: loss is the cross-entropy against the frozen model's own prediction at every position (soft labels, so
    #: the appended blocks have nothing to learn there), except where the next word is a name the context
    #: already contains: there the target is that prediction with the name's logit lowered by this much and
    #: every other word's kept, as a model that copies names from context too confidently would be corrected.
    #: Lowering the other names too, or raising them, or shrinking every logit, misses the target; the appended
    #: heads have to find the copied name and write against it (copy suppression's job, in IOI a negative name mover's).
    phase2_lower_copied_name: float = 0.0
    #: 1: ``phase2_lower_copied_name``'s loss matches logits, not probabilities: the squared difference between the
    #: model's centred logits and the target's, summed over the vocabulary. Cross-entropy barely weighs a word the
    #: model already gives almost no probability (in IOI, the subject), so lowering it too costs nothing; here
    #: every logit costs the same.
    phase2_match_logits: int = 0
    #: The temperature of ``phase2_lower_copied_name``'s cross-entropy (both distributions; the loss is scaled by
    #: its square so that its gradient keeps its size). Above 1 the unlikely words, the subject among them, weigh more.
    phase2_target_temperature: float = 1.0
    #: With ``phase2_lower_copied_name``, a second term of the loss where a copied name is next: this weight times the
    #: squared difference between the model's logits of every name and the target's, summed over the names.
    #: Cross-entropy lets the subject's logit fall with IO's (it barely weighs a word of tiny probability), and
    #: matching every word's logit lets no write through (each name vector moves every word's logit a little);
    #: this makes lowering or raising another name cost as much as missing the copied one, and nothing else.
    phase2_name_logit_weight: float = 0.0
    #: 1: the names-only mask and the values from the embeddings fade out linearly over their shares of the second
    #: phase instead of stopping at once: the other words' attention is scaled by a weight that grows from 0 to 1,
    #: and the values are a mix, from the embeddings' alone to the residual stream's alone.
    phase2_new_heads_fade: int = 0
    #: Only this many heads of each appended block learn (the first ones); the others' output projections stay
    #: zero, so they write nothing (0: every head). One head then has to do what a block's heads would share.
    phase2_new_heads_learning: int = 0
    #: With ``phase2_lower_copied_name``, a third term of the loss: this weight times the squared relative change
    #: of the final LayerNorm's scale (the residual's standard deviation) that the appended blocks cause, averaged
    #: over the positions. It closes the route the ``k`` runs found (shrinking every logit by inflating the
    #: residual stream) without the mismatch of ``phase2_detach_final_ln_scale``, whose forward pass still pays it.
    phase2_keep_final_scale: float = 0.0
    seed: int = 0

    def __post_init__(self):
        # Flags that would otherwise do nothing, silently, while the log lists them as tried.
        if self.crowd_before and not self.crowd:
            raise ValueError("crowd_before places the clauses that crowd adds: set crowd too")
        if not 0 <= self.phase2_new_heads_names_only <= 1:
            raise ValueError(f"phase2_new_heads_names_only is a share of the second phase, not {self.phase2_new_heads_names_only}")
        if not 0 <= self.phase2_new_heads_token_values <= 1:
            raise ValueError(f"phase2_new_heads_token_values is a share of the second phase, not {self.phase2_new_heads_token_values}")
        if self.phase2_new_heads_names_only and self.phase2_new_heads_skip_self:
            raise ValueError("phase2_new_heads_names_only and phase2_new_heads_skip_self both set the appended heads' "
                             "attention mask; use one")
        if not self.phase2_steps:
            second_phase = ("phase2_dropout", "phase2_head_dropout", "phase2_new_layers", "phase2_detach_final_ln_scale")
            if set_without := [name for name in second_phase if getattr(self, name)]:
                raise ValueError(f"{', '.join(set_without)} act in the second phase: set phase2_steps too")
        if self.phase2_lower_copied_name < 0:
            raise ValueError(f"phase2_lower_copied_name lowers a logit by this much; {self.phase2_lower_copied_name} would raise it")
        if self.phase2_target_temperature <= 0:
            raise ValueError(f"phase2_target_temperature must be positive, not {self.phase2_target_temperature}")
        if self.phase2_keep_final_scale and not self.phase2_lower_copied_name:
            raise ValueError("phase2_keep_final_scale weighs a term of phase2_lower_copied_name's loss: set that too")
        if self.phase2_name_logit_weight and not self.phase2_lower_copied_name:
            raise ValueError("phase2_name_logit_weight weighs a term of phase2_lower_copied_name's loss: set that too")
        if self.name_unembedding_std < 0:
            raise ValueError(f"name_unembedding_std is a standard deviation (0: tied), not {self.name_unembedding_std}")
        if not 0 <= self.phase2_new_heads_learning <= self.n_head:
            raise ValueError(f"phase2_new_heads_learning counts heads of a block of {self.n_head}, not {self.phase2_new_heads_learning}")
        if self.phase2_new_heads_fade and not (self.phase2_new_heads_names_only or self.phase2_new_heads_token_values):
            raise ValueError("phase2_new_heads_fade fades the names-only mask and the values from the embeddings: "
                             "set phase2_new_heads_names_only or phase2_new_heads_token_values too")
        if self.phase2_match_logits and not self.phase2_lower_copied_name:
            raise ValueError("phase2_match_logits sets the loss of phase2_lower_copied_name: set that too")
        if self.phase2_lower_copied_name and not self.phase2_train_new_only:
            raise ValueError("phase2_lower_copied_name's targets are the frozen blocks' predictions: set phase2_train_new_only too")
        if not self.phase2_new_layers:
            appended_only = ("phase2_train_new_only", "phase2_new_attention_only", "phase2_new_heads_skip_self",
                             "phase2_new_heads_names_only", "phase2_new_heads_token_values", "phase2_lower_copied_name",
                             "phase2_new_heads_learning")
            if set_without := [name for name in appended_only if getattr(self, name)]:
                raise ValueError(f"{', '.join(set_without)} need appended blocks: set phase2_new_layers too")

    @property
    def total_steps(self) -> int:
        return self.steps + self.phase2_steps

    def at_step(self, step: int) -> "Recipe":
        """The data recipe in force at ``step``: hedging and ABC sentences only from their start."""
        extra_from = self.steps if self.phase2_steps else self.extra_data_from * self.steps
        if step >= extra_from:
            return self
        return replace(self, hedge_s=0.0, hedge_new=0.0, hedge_place=0.0, abc_new=0.0)

    @property
    def architecture(self) -> dict:
        """The architecture of the finished model (appended blocks included)."""
        return dict(n_layer=self.n_layer + self.phase2_new_layers, n_head=self.n_head, n_embd=self.n_embd, n_positions=32)


#: The shipped model (run 105_u8 of the search log): names drawn large in the input (std 1.0) with output vectors
#: of the usual size (untied), four blocks trained on IOI, then a fifth block appended above the frozen four whose
#: first two heads learn calibration targets (the frozen model's prediction with a copied name's logit lowered by 8),
#: first reading names only and from the embeddings, both constraints fading out. One of them, L4H1, becomes a
#: negative name mover (tests/test_shipped_model.py checks the four criteria).
SHIPPED_RECIPE = Recipe(name_embedding_std=1.0, name_unembedding_std=0.1, phase2_steps=2000, phase2_lr=0.003,
                        phase2_new_layers=1, phase2_train_new_only=1, phase2_new_attention_only=1,
                        phase2_name_logit_weight=1.0, phase2_lower_copied_name=8.0, phase2_new_heads_names_only=0.7,
                        phase2_new_heads_token_values=0.7, phase2_new_heads_fade=1, phase2_new_heads_learning=2)

#: Chapter 6's hedging variant: the first shipped model's recipe (``Recipe()``'s defaults), then 1000 steps in which half of the IOI
#: sentences continue with a name not in the sentence, whole heads of the trained four blocks are dropped
#: for a sentence with probability 0.3, and only two appended blocks learn (run 36_k5 of the search log).
HEDGING_VARIANT_RECIPE = Recipe(phase2_steps=1000, phase2_lr=0.003, hedge_new=0.5, phase2_head_dropout=0.3,
                                phase2_new_layers=2, phase2_train_new_only=1)

#: ``--variant NAME``: the models the book uses, each with its recipe and directory.
#: ``first`` is the course's first model (run ``r0`` of the search log, ``Recipe()``'s defaults), which the log's
#: recipes are written against; it has no directory in the package, so it needs ``--out``.
VARIANTS = {"shipped": (SHIPPED_RECIPE, SHIPPED_MODEL_DIR), "hedging": (HEDGING_VARIANT_RECIPE, HEDGING_VARIANT_DIR),
            "first": (Recipe(), None)}


def build_tokenizer():
    """A word-level tokenizer over the corpus vocabulary, GPT-2-like special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {corpus.BOS_TOKEN: 0, corpus.UNK_TOKEN: 1}
    for word in corpus.all_words():
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=corpus.UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=corpus.BOS_TOKEN,
        eos_token=corpus.BOS_TOKEN,
        pad_token=corpus.BOS_TOKEN,
        unk_token=corpus.UNK_TOKEN,
    )


def training_sentence(rng: random.Random, recipe: "Recipe") -> str:
    """One training sentence: an IOI-template sentence with its continuation, or a filler sentence.

    A share ``recipe.abc_new`` of the IOI-template sentences repeat no name (the
    second subject is a third name C, as in the ABC corruption) and continue
    with a fourth name: the names in context are *not* the next token, the data
    copy suppression is made for. The other IOI sentences continue with the
    indirect object, except for a share ``recipe.hedge_s`` that continues with
    the subject and a share ``recipe.hedge_new`` that continues with a name not
    in the sentence (data that reward hedging, not maximal confidence). A share
    ``recipe.distractor`` of those sentences comes after a filler sentence about
    a third name, which shifts every position and puts in context a name that is
    neither repeated nor the answer; a share ``recipe.shape_variants`` grows a
    second place and a second object (:func:`vary_shape`); a share
    ``recipe.crowd`` gets a clause about a third name between its clauses (or,
    for a share ``recipe.crowd_before`` of those, in front); and a share
    ``recipe.two_pairs`` of all IOI sentences has two pairs of names and answers
    with the subject's partner.
    """
    if rng.random() < recipe.ioi_fraction:
        template = rng.choice(corpus.TRAIN_TEMPLATES)
        if recipe.abc_new and rng.random() < recipe.abc_new:
            a, b, c, new = rng.sample(corpus.TRAIN_NAMES, 4)
            return f"{fill_template(template, a, b, c, rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS))} {new} ."
        if recipe.two_pairs and rng.random() < recipe.two_pairs:
            a, b, c, d = rng.sample(corpus.TRAIN_NAMES, 4)
            s = rng.choice((a, b, c, d))
            partner = {a: b, b: a, c: d, d: c}[s]
            words = fill_template(template, a, b, s, rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS)).split()
            words[4:4] = ["met", c, "and", d]  # after "When A and B"
            return f"{' '.join(words)} {partner} ."
        # Draw in the order of the first shipped model's sampler, so that the default recipe
        # reproduces its weights bit for bit; the hedging draws come after.
        io, s = rng.sample(corpus.TRAIN_NAMES, 2)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        text = fill_template(template, a, b, s, rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS))
        answer = io
        if recipe.hedge_s or recipe.hedge_new or recipe.hedge_place:
            roll = rng.random()
            if roll < recipe.hedge_s:
                answer = s
            elif roll < recipe.hedge_s + recipe.hedge_new:
                answer = rng.choice([name for name in corpus.TRAIN_NAMES if name not in (io, s)])
            elif roll < recipe.hedge_s + recipe.hedge_new + recipe.hedge_place:
                answer = f"the {rng.choice(corpus.PLACES)}"
        if recipe.shape_variants:
            text = vary_shape(rng, text, recipe.shape_variants)
        third = None  # the crowd clause's name, if any
        if recipe.crowd and rng.random() < recipe.crowd:
            third = rng.choice([name for name in corpus.TRAIN_NAMES if name not in (io, s, answer)])
            clause = [third, "likes", "the", rng.choice(corpus.PLACES)]
            words = text.split()
            if recipe.crowd_before and rng.random() < recipe.crowd_before:
                words[0:0] = clause + ["."]
            else:
                comma = words.index(",") + 1
                words[comma:comma] = clause + [","]
            text = " ".join(words)
        if recipe.distractor and rng.random() < recipe.distractor:
            # Run q1 drew from this list without excluding the third name (0.2% of its crowded sentences
            # then had that name twice); the list is shorter since, so q1's exact draws are not reproduced.
            other = rng.choice([name for name in corpus.TRAIN_NAMES if name not in (io, s, answer, third)])
            filler = rng.choice(corpus.FILLER_TEMPLATES)
            text = f"{filler.format(A=other, PLACE=rng.choice(corpus.PLACES), OBJECT=rng.choice(corpus.OBJECTS))} {text}"
        return f"{text} {answer} ."
    template = rng.choice(corpus.FILLER_TEMPLATES)
    name = rng.choice(corpus.TRAIN_NAMES + corpus.TEST_NAMES)
    return template.format(A=name, PLACE=rng.choice(corpus.PLACES), OBJECT=rng.choice(corpus.OBJECTS))


def vary_shape(rng: random.Random, text: str, share: float) -> str:
    """``text`` with, each with probability ``share``, a second place after the first and a second object."""
    words = text.split()
    comma = words.index(",")
    if rng.random() < share:  # "... to the store and the park , S gave ..."
        words[comma:comma] = ["and", "the", rng.choice(corpus.PLACES)]
    if rng.random() < share:  # "... gave a drink and a bag to"
        words[-1:-1] = ["and", "a", rng.choice(corpus.OBJECTS)]
    return " ".join(words)


def encode_batch(tokenizer, sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS-prefixed, right-padded token ids and a mask of positions to predict."""
    ids = torch.full((len(sentences), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(sentences), length), dtype=torch.bool)
    for row, sentence in enumerate(sentences):
        tokens = [tokenizer.bos_token_id, *tokenizer.encode(sentence, add_special_tokens=False)]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, 1 : len(tokens)] = True
    return ids, mask


@torch.no_grad()
def evaluate(model, tokenizer, n_prompts: int = 600, seed: int = 1234) -> dict:
    """Accuracy and logit difference on held-out and training-distribution IOI prompts."""
    from .metrics import accuracy, logit_diff
    from .prompts import make_ioi_prompts

    results = {}
    for split in ("test", "train"):
        prompts = make_ioi_prompts(tokenizer, n_prompts, split=split, seed=seed)
        clean = model(prompts.clean_tokens).logits
        corrupt = model(prompts.corrupted_tokens).logits
        per_prompt = logit_diff(clean, prompts, per_prompt=True)
        results[split] = {
            "n_prompts": n_prompts,
            "top1_accuracy": accuracy(clean, prompts),
            "io_over_s_accuracy": (per_prompt > 0).float().mean().item(),
            "mean_logit_diff": per_prompt.mean().item(),
            "min_logit_diff": per_prompt.min().item(),
            "abc_corrupted_mean_logit_diff": logit_diff(corrupt, prompts).item(),
        }
    return results


def append_identity_blocks(model, n_new: int):
    """A copy of ``model`` with ``n_new`` fresh blocks between its last block and the final LayerNorm.

    The new blocks' output projections are zero, so the grown model computes exactly what ``model``
    does until training changes them. Building it draws from torch's generator (the fresh model's
    initialisation), so the later random draws of a run that grows differ from one that does not; and
    ``train`` gives the grown model a new optimiser, so the trained blocks, when they keep learning, start
    the second phase without their Adam moments.
    """
    import copy

    from transformers import GPT2LMHeadModel

    config = copy.deepcopy(model.config)
    config.n_layer += n_new
    grown = GPT2LMHeadModel(config)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("transformer.h.") for key in missing), (missing, unexpected)
    with torch.no_grad():
        for block in grown.transformer.h[model.config.n_layer :]:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
    return grown


def detach_final_ln_scale(model):
    """In training mode, the final LayerNorm divides by its scale as usual, but the gradient treats it as constant."""

    def constant_scale(module, args, output):
        if not module.training:
            return None
        centred = args[0] - args[0].mean(dim=-1, keepdim=True)
        scale = (centred.pow(2).mean(dim=-1, keepdim=True) + module.eps).sqrt()
        return centred / scale.detach() * module.weight + module.bias

    return model.transformer.ln_f.register_forward_hook(constant_scale)


def causal_mask(n: int, device=None) -> torch.Tensor:
    """[query, key]: True where a position may read a key, at or before it."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def additive_attention_mask(allowed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """0 where ``allowed``, -inf elsewhere, in the dtype and on the device of the hidden states ``like``."""
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, float("-inf"))


def name_token_ids(tokenizer) -> torch.Tensor:
    """The token ids of every name of the corpus, train and test."""
    return torch.tensor(tokenizer.convert_tokens_to_ids(list(corpus.TRAIN_NAMES + corpus.TEST_NAMES)))


def block_attention_to_self(blocks) -> list:
    """The heads of ``blocks`` may not attend to their own position, except at the first position.

    Done with the attention mask the blocks are called with (causal, plus the diagonal), in training
    and in evaluation alike: the mask is part of the model it is set on. For forward passes over whole
    sentences (training, evaluation, the survey); generating token by token with a cache is not supported.
    """

    def mask(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[1]
        blocked = torch.ones(n, n, dtype=torch.bool, device=hidden.device).triu()  # later positions and the diagonal
        blocked[0, 0] = False
        kwargs["attention_mask"] = additive_attention_mask(~blocked, like=hidden)[None, None]
        return args, kwargs

    return [block.attn.register_forward_pre_hook(mask, with_kwargs=True) for block in blocks]


class NamesOnlyAttention:
    """While ``active``, the heads of ``blocks`` attend only to name tokens and the first position (training only).

    ``ids`` must be set to the batch's token ids before each forward pass; the mask is causal as usual.
    """

    def __init__(self, blocks, name_ids: torch.Tensor):
        self.name_ids, self.ids, self.active = name_ids, None, True
        #: 1: only names and the first position; between 0 and 1 the other earlier positions' attention is scaled by 1 - strength.
        self.strength = 1.0
        self.handles = [block.attn.register_forward_pre_hook(self.mask, with_kwargs=True) for block in blocks]

    def allowed(self, n: int) -> torch.Tensor:
        """[batch, query, key]: True where a query may attend to a key (earlier or same position, a name or the first)."""
        is_name = torch.isin(self.ids[:, :n], self.name_ids)
        is_name[:, 0] = True
        return causal_mask(n, self.ids.device)[None] & is_name[:, None, :]

    def mask(self, module, args, kwargs):
        if not self.active or self.strength == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[1]
        allowed = self.allowed(n)  # [batch, query, key]
        bias = additive_attention_mask(allowed, like=hidden)
        if self.strength < 1:  # a softmax weight scaled by (1 - strength) is a score raised by log(1 - strength)
            bias = bias.masked_fill(causal_mask(n, hidden.device) & ~allowed, math.log(1 - self.strength))
        kwargs["attention_mask"] = bias[:, None]
        return args, kwargs

    def remove(self):
        for handle in self.handles:
            handle.remove()


class TokenValues:
    """While ``active``, the heads of ``blocks`` take their values from the embeddings (training only).

    The value third of each block's ``c_attn`` output is recomputed from ``ln_1(token + position
    embedding)`` (the output of ``model.transformer.drop``, so with embedding dropout when training uses it);
    the queries and keys still read the block's input. With one appended block its attention is the plain
    model's; a second block's queries and keys would read the first one's rerouted output.
    """

    def __init__(self, model, blocks):
        self.active, self.embedded = True, None
        #: The share of the values computed from the embeddings (the rest from the residual stream, as in plain GPT-2).
        self.mix = 1.0
        self.handles = [model.transformer.drop.register_forward_hook(self.keep_embedding)]
        self.handles += [block.attn.c_attn.register_forward_hook(partial(self.reroute, block)) for block in blocks]

    def keep_embedding(self, module, args, output):
        self.embedded = output  # [batch, pos, d_model]

    def reroute(self, block, c_attn, args, output):
        if not self.active or self.mix == 0:
            return None
        d_model = output.shape[-1] // 3
        values = block.ln_1(self.embedded) @ c_attn.weight[:, 2 * d_model :] + c_attn.bias[2 * d_model :]
        if self.mix < 1:
            values = self.mix * values + (1 - self.mix) * output[..., 2 * d_model :]
        return torch.cat([output[..., : 2 * d_model], values], dim=-1)


class FrozenPrediction:
    """The logits of the frozen model below the appended blocks, from the residual stream entering the first of them.

    The appended blocks start as the identity and the blocks below do not learn, so these are the trained model's
    own predictions, computed in the same forward pass (same name embeddings) without a second one.
    """

    def __init__(self, model, first_appended: int):
        self.model, self.residual, self.final_residual = model, None, None
        self.handles = [model.transformer.h[first_appended].register_forward_pre_hook(self.keep, with_kwargs=True),
                        model.transformer.ln_f.register_forward_pre_hook(self.keep_final)]

    def keep(self, module, args, kwargs):
        self.residual = args[0] if args else kwargs["hidden_states"]  # [batch, pos, d_model]

    def keep_final(self, module, args):
        self.final_residual = args[0]  # what the final LayerNorm receives, appended blocks included

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """[batch, pos, vocab]"""
        ln_f = self.model.transformer.ln_f  # called as a function: its hooks are for the model's own pass
        normed = torch.nn.functional.layer_norm(self.residual, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)
        return self.model.lm_head(normed)

    def final_scale_ratio(self) -> torch.Tensor:
        """[batch, pos]: the final LayerNorm's scale (the residual's standard deviation) over the frozen model's.
        Differentiable through the appended blocks' writes."""
        return self.final_residual.std(-1) / self.residual.std(-1).detach()


def copied_name_positions(ids: torch.Tensor, name_ids: torch.Tensor) -> torch.Tensor:
    """[batch, pos - 1]: True where the next token (``ids[:, 1:]``) is a name that already occurs at or before the position."""
    following = ids[:, 1:]  # [batch, pos - 1]
    n = following.shape[1]
    seen = ((ids[:, None, :n] == following[:, :, None]) & causal_mask(n, ids.device)).any(-1)
    return seen & torch.isin(following, name_ids)


def copied_name_lowered_loss(logits: torch.Tensor, frozen_logits: torch.Tensor, ids: torch.Tensor, predicted: torch.Tensor,
                             name_ids: torch.Tensor, lower: float, match_logits: bool = False,
                             temperature: float = 1.0, name_logit_weight: float = 0.0) -> torch.Tensor:
    """The loss against the frozen model's prediction with a copied name's logit lowered by ``lower``.

    Cross-entropy against that prediction, or (``match_logits``) the squared difference of the centred logits
    summed over the vocabulary. ``logits`` and ``frozen_logits`` are ``[batch, pos - 1, vocab]`` (position t
    predicts ``ids[:, t + 1]``), ``predicted`` is ``[batch, pos - 1]``, the positions the loss counts (no padding).
    """
    following = ids[:, 1:]
    copied = copied_name_positions(ids, name_ids)
    lowering = (-lower * copied.to(frozen_logits.dtype))[..., None]
    target_logits = frozen_logits.scatter_add(-1, following[..., None], lowering)
    if match_logits:
        def centred(x):
            return x - x.mean(-1, keepdim=True)
        per_position = (centred(logits) - centred(target_logits)).pow(2).sum(-1)
    else:
        target = (target_logits / temperature).softmax(-1)
        per_position = -(target * (logits / temperature).log_softmax(-1)).sum(-1) * temperature**2
    loss = per_position[predicted].mean()
    if name_logit_weight:
        missed = (logits[..., name_ids] - target_logits[..., name_ids]).pow(2).sum(-1)  # [batch, pos - 1]
        loss = loss + name_logit_weight * (missed * copied).sum() / predicted.sum()
    return loss


def attention_under_names_only_mask(model, tokenizer, first_appended: int) -> dict:
    """Where the appended heads look at the final position of the survey prompts when only names may be read.

    The training mask of ``phase2_new_heads_names_only`` is put back for this measurement only: per head, the
    mean attention to IO, S1, S2 and the first position (which sum to one).
    """
    from .prompts import make_ioi_prompts

    prompts = make_ioi_prompts(tokenizer, **SURVEY_PROMPTS)
    name_ids = name_token_ids(tokenizer)
    blocks = model.transformer.h[first_appended:]
    names_only = NamesOnlyAttention(blocks, name_ids)
    names_only.ids = prompts.clean_tokens
    inputs = {}
    handles = [block.ln_1.register_forward_hook(lambda module, args, output, i=i: inputs.__setitem__(i, output))
               for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(prompts.clean_tokens)
    finally:
        names_only.remove()
        for handle in handles:
            handle.remove()
    # The scores below are computed as GPT-2 does with its default attention scaling (1/sqrt(d_head)).
    assert model.config.scale_attn_weights and not model.config.scale_attn_by_inverse_layer_idx
    batch = torch.arange(len(prompts))
    allowed = names_only.allowed(prompts.clean_tokens.shape[1])[:, prompts.end_position]  # [batch, key]
    result = {}
    for i, block in enumerate(blocks):
        n_head, n_embd = block.attn.num_heads, block.attn.embed_dim
        query, key, _ = block.attn.c_attn(inputs[i]).split(n_embd, dim=-1)
        query = query[:, prompts.end_position].unflatten(-1, (n_head, -1))  # [batch, head, d_head]
        key = key.unflatten(-1, (n_head, -1))  # [batch, pos, head, d_head]
        scores = torch.einsum("bhd,bphd->bhp", query, key) / query.shape[-1] ** 0.5
        pattern = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # [batch, head, key]
        for head in range(n_head):
            row = pattern[:, head]
            result[f"L{first_appended + i}H{head}"] = {
                place: round(row[batch, positions].mean().item(), 4)
                for place, positions in (("io", prompts.io_positions), ("s1", prompts.s1_positions),
                                         ("s2", torch.full_like(batch, prompts.s2_position)),
                                         ("first", torch.zeros_like(batch)))
            }
    return result


def drop_whole_heads(model, p: float, blocks=None) -> list:
    """In training mode, silence each head's output ``z`` for a whole sentence with probability ``p``.

    Attention-probability dropout removes a single-position head's output only now and then and
    per query; this removes the head everywhere in the sentence, as a zero ablation would.
    """
    n_head = model.config.n_head

    def drop(module, args):
        if not module.training:
            return None
        z = args[0]  # [batch, pos, n_head * d_head]
        keep = (torch.rand(z.shape[0], 1, n_head, 1) >= p).to(z.dtype) / (1 - p)
        return ((z.unflatten(-1, (n_head, -1)) * keep).flatten(-2),)

    blocks = model.transformer.h if blocks is None else blocks
    return [block.attn.c_proj.register_forward_pre_hook(drop) for block in blocks]


@torch.no_grad()
def silence_heads_beyond(blocks, n_learning: int) -> None:
    """Zero the rows of each block's output projection that carry heads ``n_learning`` and up: they write nothing."""
    for block in blocks:
        d_head = block.attn.head_dim
        block.attn.c_proj.weight[n_learning * d_head :] = 0  # Conv1D: [n_head * d_head (z), d_model]


def training_constraint_strength(recipe: Recipe, step: int, share: float) -> float:
    """How strongly a training-only constraint on the appended heads holds at ``step``: 1 for the first ``share`` of
    the second phase and 0 after it, or (``phase2_new_heads_fade``) falling linearly from 1 to 0 over that share."""
    progress = (step - recipe.steps) / (share * recipe.phase2_steps) if share else 1.0
    if recipe.phase2_new_heads_fade:
        return min(max(1.0 - progress, 0.0), 1.0)
    return 1.0 if progress < 1 else 0.0


@torch.no_grad()
def set_name_vectors(model, name_ids: torch.Tensor, vectors: torch.Tensor, recipe: Recipe) -> None:
    """Give the names these input embeddings, and (untied, ``recipe.name_unembedding_std``) the same directions,
    rescaled, as output vectors; tied, the unembedding is the embedding already."""
    model.transformer.wte.weight[name_ids] = vectors
    if recipe.name_unembedding_std:
        model.lm_head.weight[name_ids] = vectors * (recipe.name_unembedding_std / recipe.name_embedding_std)


def _training_state(model, optimizer, schedule, rng: random.Random, step: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": rng.getstate(),
        "step": step,
    }


def train(out_dir: Path, recipe: Recipe, *, checkpoint: Path | None = None, checkpoint_at: int | None = None,
          resume: Path | None = None) -> dict:
    """Train with ``recipe``, write the model, its card and ``training_info.json`` to ``out_dir``.

    ``checkpoint``/``checkpoint_at`` save the whole training state (weights, optimiser, schedule,
    both random generators) before step ``checkpoint_at``; ``resume`` continues from such a file.
    They let a recipe search branch several data recipes off one shared first phase (see
    ``Recipe.extra_data_from``) instead of repeating it; the shipped model is trained straight through.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    # One thread: the same seed then gives the same weights on any machine,
    # whatever its core count (parallel reductions change the rounding).
    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    steps, batch_size, lr = recipe.steps, recipe.batch_size, recipe.lr
    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=recipe.dropout,
        embd_pdrop=recipe.dropout,
        attn_pdrop=recipe.dropout,
        **{**recipe.architecture, "n_layer": recipe.n_layer},
        **({"tie_word_embeddings": False} if recipe.name_unembedding_std else {}),
    )
    model = GPT2LMHeadModel(config)
    name_ids = name_token_ids(tokenizer)
    fixed_name_embeddings = torch.randn(len(name_ids), config.n_embd) * recipe.name_embedding_std
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    length = corpus.N_POSITIONS + 2  # prompt, answer and the full stop
    if recipe.distractor:  # ... after the longest filler sentence
        length += max(len(template.split()) for template in corpus.FILLER_TEMPLATES)
    if recipe.shape_variants:  # ... and a second place and object
        length += 6
    if recipe.two_pairs:  # ... and a second pair of names
        length += 4
    if recipe.crowd:  # ... and a clause about a third name
        length += 5
    if recipe.hedge_place:  # ... and "the PLACE" as the answer
        length += 1
    if length > recipe.architecture["n_positions"]:
        raise ValueError(f"these flags together make sentences of up to {length} tokens; the model has "
                         f"{recipe.architecture['n_positions']} positions")
    first_step = 0
    phase2_hooks = []
    names_only = token_values = frozen_prediction = None
    if resume is not None:
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        rng.setstate(state["python_rng"])
        first_step = state["step"]
        if first_step > steps and recipe.phase2_steps:
            raise ValueError(f"{resume} was saved inside the second phase (step {first_step}); resume from a state "
                             f"saved at or before step {steps}, where the second phase is set up")
    start = time.perf_counter()
    model.train()
    for step in range(first_step, recipe.total_steps):
        if checkpoint is not None and step == checkpoint_at:
            torch.save(_training_state(model, optimizer, schedule, rng, step), checkpoint)
        if step == steps:  # the second phase starts with a fresh warm-up and decay
            if recipe.phase2_new_layers:
                model = append_identity_blocks(model, recipe.phase2_new_layers)
                model.train()
                if recipe.phase2_train_new_only:
                    model.requires_grad_(False)
                    model.transformer.h[recipe.n_layer :].requires_grad_(True)
                if recipe.phase2_new_attention_only:
                    for block in model.transformer.h[recipe.n_layer :]:
                        block.mlp.requires_grad_(False)
                learning = [p for p in model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(learning, lr=recipe.phase2_lr, weight_decay=recipe.weight_decay)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=recipe.phase2_lr, total_steps=recipe.phase2_steps, pct_start=0.05
            )
            if recipe.phase2_dropout:
                for module in model.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = recipe.phase2_dropout
            if recipe.phase2_head_dropout:
                # Recipe guarantees appended blocks whenever the trained ones are frozen.
                blocks = model.transformer.h[: recipe.n_layer] if recipe.phase2_train_new_only else model.transformer.h
                phase2_hooks = drop_whole_heads(model, recipe.phase2_head_dropout, blocks)
            if recipe.phase2_detach_final_ln_scale:
                phase2_hooks.append(detach_final_ln_scale(model))
            if recipe.phase2_new_heads_skip_self:  # kept after training: the mask is part of this model
                block_attention_to_self(model.transformer.h[recipe.n_layer :])
            if recipe.phase2_new_heads_names_only:
                names_only = NamesOnlyAttention(model.transformer.h[recipe.n_layer :], name_ids)
                phase2_hooks.extend(names_only.handles)
            if recipe.phase2_new_heads_token_values:
                token_values = TokenValues(model, model.transformer.h[recipe.n_layer :])
                phase2_hooks.extend(token_values.handles)
            if recipe.phase2_lower_copied_name:
                frozen_prediction = FrozenPrediction(model, recipe.n_layer)
                phase2_hooks.extend(frozen_prediction.handles)
        if names_only is not None:
            names_only.strength = training_constraint_strength(recipe, step, recipe.phase2_new_heads_names_only)
        if token_values is not None:
            token_values.mix = training_constraint_strength(recipe, step, recipe.phase2_new_heads_token_values)
        set_name_vectors(model, name_ids, torch.randn(len(name_ids), config.n_embd) * recipe.name_embedding_std, recipe)
        ids, mask = encode_batch(tokenizer, [training_sentence(rng, recipe.at_step(step)) for _ in range(batch_size)], length)
        if names_only is not None:
            names_only.ids = ids
        logits = model(ids).logits[:, :-1]
        if frozen_prediction is not None:
            loss = copied_name_lowered_loss(logits, frozen_prediction.logits()[:, :-1], ids, mask[:, 1:], name_ids,
                                            recipe.phase2_lower_copied_name, bool(recipe.phase2_match_logits),
                                            recipe.phase2_target_temperature, recipe.phase2_name_logit_weight)
            if recipe.phase2_keep_final_scale:
                scale_change = frozen_prediction.final_scale_ratio()[:, :-1][mask[:, 1:]] - 1
                loss = loss + recipe.phase2_keep_final_scale * scale_change.pow(2).mean()
        else:
            targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        if step >= steps and recipe.phase2_new_heads_learning:
            silence_heads_beyond(model.transformer.h[recipe.n_layer :], recipe.phase2_new_heads_learning)
        if step % 250 == 0 or step == recipe.total_steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    train_seconds = time.perf_counter() - start
    for handle in phase2_hooks:
        handle.remove()
    set_name_vectors(model, name_ids, fixed_name_embeddings, recipe)
    model.eval()
    results = evaluate(model, tokenizer)
    heads = survey(model, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "recipe": asdict(recipe),
        "architecture": {**recipe.architecture, "n_layer": model.config.n_layer},  # as trained, appended blocks included
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": recipe.seed,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "evaluation": results,
        "head_survey": heads,
        **measurements_in_training_setup(model, tokenizer, recipe),
    }
    write_info_and_card(out_dir, info)
    for path in out_dir.iterdir():
        # save_pretrained writes the weights readable by their owner only; the grader's sandbox runs
        # learner notebooks as another user, and they load this model.
        path.chmod(0o644)
    return info


def write_info_and_card(out_dir: Path, info: dict) -> None:
    """``training_info.json`` and the model card written from it."""
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(info))


def resurvey(out_dir: Path) -> dict:
    """Re-measure a saved model with this code: its evaluation and head survey, card rewritten.

    For runs trained before a measurement was added to the survey; everything else in
    ``training_info.json`` (recipe, training time, versions) is the training run's.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    info = json.loads((out_dir / "training_info.json").read_text())
    model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    recipe = Recipe(**info["recipe"])  # fields added after the run take their defaults, which change nothing
    if recipe.phase2_new_heads_skip_self:
        block_attention_to_self(model.transformer.h[recipe.n_layer :])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    info["evaluation"] = evaluate(model, tokenizer)
    info["head_survey"] = survey(model, tokenizer)
    info.update(measurements_in_training_setup(model, tokenizer, recipe))
    write_info_and_card(out_dir, info)
    return info


def measurements_in_training_setup(model, tokenizer, recipe: Recipe) -> dict:
    """For runs whose appended heads learned under a training-only change: the saved (plain) model measured
    with that change put back, under its own key of ``training_info.json`` (nothing for other runs)."""
    measured = {}
    if recipe.phase2_new_heads_names_only:
        measured["attention_under_names_only_mask"] = attention_under_names_only_mask(model, tokenizer, recipe.n_layer)
    if recipe.phase2_new_heads_token_values:
        measured["appended_heads_under_token_values"] = appended_heads_under_token_values(model, tokenizer, recipe.n_layer)
    if recipe.phase2_lower_copied_name or recipe.name_unembedding_std or recipe.name_embedding_std != NAME_EMBEDDING_STD:
        measured["io_name_legibility"] = io_name_legibility(model, tokenizer, recipe.name_embedding_std)
    return measured


@torch.no_grad()
def io_name_legibility(model, tokenizer, name_std: float = NAME_EMBEDDING_STD, n_draws: int = 25) -> list[float]:
    """How much of the IO name a linear read of the residual stream at IO's position recovers, before each block.

    The names' embeddings are redrawn ``n_draws`` times, as in training, over 200 training-distribution prompts
    (seeded; the model's own embeddings are put back after). Per block: the held-out R² (the last fifth of the
    draws) of a least-squares map, with a bias, from the block's ``ln_1`` of the residual to the IO name's
    embedding (tied, also its unembedding; untied, in its unembedding's direction). A head of that block can copy
    the name only as well as this.
    """
    from .prompts import make_ioi_prompts

    prompts = make_ioi_prompts(tokenizer, 200, split="train", seed=5)
    name_ids = name_token_ids(tokenizer)
    embedding = model.transformer.wte.weight
    kept = embedding[name_ids].clone()
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(len(prompts))
    read = [[] for _ in model.transformer.h]  # per block: [draw][prompt, d_model]
    names = []
    try:
        for _ in range(n_draws):
            embedding[name_ids] = torch.randn(len(name_ids), embedding.shape[1], generator=generator) * name_std
            hidden = model(prompts.clean_tokens, output_hidden_states=True).hidden_states  # the last is after ln_f
            names.append(embedding[prompts.io_token].clone())
            for layer, block in enumerate(model.transformer.h):
                read[layer].append(block.ln_1(hidden[layer][rows, prompts.io_positions]))
    finally:
        embedding[name_ids] = kept
    target = torch.cat(names)
    fitted = len(target) * 4 // 5
    legibility = []
    for per_draw in read:
        features = torch.cat([torch.cat(per_draw), torch.ones(len(target), 1)], dim=1)
        solution = torch.linalg.lstsq(features[:fitted], target[:fitted]).solution
        residual = features[fitted:] @ solution - target[fitted:]
        spread = target[fitted:] - target[fitted:].mean(0)
        legibility.append(round(1 - residual.pow(2).sum().item() / spread.pow(2).sum().item(), 3))
    return legibility


def appended_heads_under_token_values(model, tokenizer, first_appended: int) -> dict:
    """The survey with ``phase2_new_heads_token_values``'s reroute put back: the logit difference, and the
    appended heads' rows (what they write and are worth with values from the embeddings; the attention of the
    first appended block is as without the reroute)."""
    plain_by_source = write_by_source(model, tokenizer, first_appended)
    reroute = TokenValues(model, model.transformer.h[first_appended:])
    try:
        rerouted = survey(model, tokenizer)
        rerouted_by_source = write_by_source(model, tokenizer, first_appended)
    finally:
        for handle in reroute.handles:
            handle.remove()
    appended = [row for row in rerouted["heads"] if row["head"] in rerouted_by_source]  # the appended blocks' heads
    return {"clean_logit_diff": rerouted["clean_logit_diff"], "heads": appended,
            "direct_logit_attribution_by_source": {"plain": plain_by_source, "rerouted": rerouted_by_source}}


def write_by_source(model, tokenizer, first_layer: int) -> dict:
    """Per head from ``first_layer`` up: its direct logit attribution on the survey prompts, split by the position
    it reads from (IO, S1, S2, the final position, the other words; JSON-ready)."""
    from .head_survey import direct_logit_attribution_by_source
    from .prompts import make_ioi_prompts

    prompts = make_ioi_prompts(tokenizer, **SURVEY_PROMPTS)
    result = {}
    for layer in range(first_layer, model.config.n_layer):
        parts = direct_logit_attribution_by_source(model, prompts, layer)
        for head in range(model.config.n_head):
            result[f"L{layer}H{head}"] = {name: round(part[head].item(), 4) for name, part in parts.items()}
    return result


#: Held-out prompts for the per-head survey of the model card (and of tests/test_shipped_model.py).
SURVEY_PROMPTS = dict(n_prompts=200, split="test", seed=1234)


def survey(model, tokenizer) -> dict:
    """The per-head survey of the model card: what each head reads, writes and is worth (JSON-ready)."""
    from .head_survey import survey_heads
    from .prompts import make_ioi_prompts

    result = survey_heads(model, make_ioi_prompts(tokenizer, **SURVEY_PROMPTS))
    n_layer, n_head = result.zero_ablation_effect.shape
    rows = []
    for layer in range(n_layer):
        for head in range(n_head):
            rows.append({
                "head": f"L{layer}H{head}",
                "attention_to_io": round(result.attention_to_io[layer, head].item(), 4),
                "attention_to_s1": round(result.attention_to_s1[layer, head].item(), 4),
                "attention_to_s2": round(result.attention_to_s2[layer, head].item(), 4),
                "attention_to_end": round(result.attention_to_end[layer, head].item(), 4),
                "direct_logit_attribution": round(result.direct_logit_attribution[layer, head].item(), 4),
                "zero_ablation_effect": round(result.zero_ablation_effect[layer, head].item(), 4),
                "minus_a_grad": round(result.zero_ablation_estimate[layer, head].item(), 4),
                "zero_ablation_effect_fixed_final_ln": round(result.zero_ablation_effect_fixed_final_ln[layer, head].item(), 4),
                "negative_name_mover_criteria": result.negative_name_mover_criteria(layer, head),
            })
    return {
        "prompts": SURVEY_PROMPTS,
        "clean_logit_diff": round(result.clean_logit_diff, 4),
        "heads": rows,
        "negative_name_movers": [f"L{l}H{h}" for l, h in result.negative_name_movers()],
    }


def survey_table(heads: dict) -> str:
    """The survey as a Markdown table, one row per head."""
    lines = [
        "| head | attention to IO | to S1 | to S2 | direct logit attribution | exact zero ablation | $-a\\cdot\\partial M/\\partial a$ | negative name mover |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in heads["heads"]:
        passed = row["negative_name_mover_criteria"]
        verdict = "**yes**" if all(passed.values()) else f"{sum(passed.values())}/4"
        lines.append(
            f"| {row['head']} | {row['attention_to_io']:.2f} | {row['attention_to_s1']:.2f} | {row['attention_to_s2']:.2f} "
            f"| {row['direct_logit_attribution']:+.3f} | {row['zero_ablation_effect']:+.3f} | {row['minus_a_grad']:+.3f} | {verdict} |"
        )
    return "\n".join(lines)


def _calibration_phase(r: dict) -> str:
    """The model card's sentence for a second phase trained with ``phase2_lower_copied_name``."""
    text = (
        "which the appended blocks (below) learned calibration targets: at every position the frozen blocks' own prediction, "
        f"except where the next word is a name the context already holds, whose logit is lowered by "
        f"{r['phase2_lower_copied_name']} (every other word's kept)"
        + (f", with a cost (weight {r['phase2_name_logit_weight']}) on moving any other name's logit"
           if r.get("phase2_name_logit_weight") else "")
        + "."
    )
    constraints = []
    if r.get("phase2_new_heads_names_only"):
        constraints.append(f"for the first {r['phase2_new_heads_names_only']:.0%} of the phase the appended heads could "
                           "attend to names and the first position only")
    if r.get("phase2_new_heads_token_values"):
        constraints.append(f"for the first {r['phase2_new_heads_token_values']:.0%} they computed their values from the "
                           "token and position embeddings")
    if constraints:
        text += (" " + "; ".join(constraints).capitalize()
                 + ("; both constraints faded out linearly over their shares." if r.get("phase2_new_heads_fade") else ".")
                 + " The saved model is plain GPT-2, without them.")
    return text


def model_card(info: dict) -> str:
    test, train_ = info["evaluation"]["test"], info["evaluation"]["train"]
    a, r, heads = info["architecture"], info["recipe"], info["head_survey"]
    hedged = (
        f"each continues with its IO name, except {r['hedge_s']:.0%} that continue with the subject and "
        f"{r['hedge_new']:.0%} with a name that is not in the sentence, so the data reward hedging, not certainty."
    )
    second_phase = ""
    # Hedged labels are described with the phase they belong to.
    hedging = hedged if (r["hedge_s"] or r["hedge_new"]) and not r["phase2_steps"] else "each continues with its IO name."
    if r["phase2_steps"]:
        appended = r.get("phase2_new_layers", 0)
        second_phase = (
            f"\nThen a second phase of {r['phase2_steps']} steps (its own one-cycle schedule, peak lr {r['phase2_lr']}) in "
            + (f"which each IOI sentence {hedged.removeprefix('each ')}" if not r.get("phase2_lower_copied_name") else
               _calibration_phase(r))
            + (f" {appended} block{'s were' if appended > 1 else ' was'} appended above the first {r['n_layer']}, "
               f"{'each ' if appended > 1 else ''}starting as the identity"
               + (f", and only {'they' if appended > 1 else 'it'} learned: the trained blocks were frozen."
                  if r.get("phase2_train_new_only") else ".")
               if appended else "")
            + (" The appended blocks' MLPs stayed zero: only their attention heads learned." if r.get("phase2_new_attention_only") else "")
            + (f" Only the first {r['phase2_new_heads_learning']} heads of each appended block learned; the others write "
               "nothing." if r.get("phase2_new_heads_learning") else "")
            + (f" Each head of the {'frozen ' if appended and r.get('phase2_train_new_only') else ''}blocks had its whole "
               f"output dropped for a sentence with probability {r['phase2_head_dropout']}." if r.get("phase2_head_dropout") else "")
        )
    both_phases = f" (and the second phase below; time for both)" if r["phase2_steps"] else ""
    embeddings = (
        f"untied embeddings (each name's output vector is its input vector rescaled to standard deviation "
        f"{r['name_unembedding_std']}; the other words' are learned)" if r.get("name_unembedding_std") else "tied\nembeddings"
    )
    movers = ", ".join(heads["negative_name_movers"]) or "none"
    largest = max(abs(row["zero_ablation_effect"]) for row in heads["heads"])
    helper = max(heads["heads"], key=lambda row: row["zero_ablation_effect"])
    search_note = (
        ""
        if heads["negative_name_movers"]
        else f"No head passes all four tests on this model. The head whose removal helps most, {helper['head']}, raises "
        f"the logit difference by {helper['zero_ablation_effect']:+.3f} ({helper['zero_ablation_effect'] / largest:.0%} of the "
        f"largest |effect|) and attends to IO {helper['attention_to_io']:.2f}. `docs/negative_head_search.md` "
        "lists the training recipes tried in search of a negative name mover, with these numbers for each."
    )
    return f"""# The course's IOI model

Written by `python -m attribution_course.train` (do not edit by hand; rerun the script).

## What it is
A GPT-2-architecture language model (`transformers.GPT2LMHeadModel`) with {a['n_layer']} layers,
{a['n_head']} attention heads per layer, width {a['n_embd']}, LayerNorm, GELU MLPs and {embeddings}: {info['n_parameters']:,} parameters. Its tokenizer is word-level
({info['vocab_size']} tokens, whitespace-separated words, `<|endoftext|>` as beginning of sequence),
so every name is a single token.

## What it was trained on
Synthetic sentences generated on the fly (`attribution_course.corpus`, seed {info['seed']}):
{r['ioi_fraction']:.0%} indirect-object-identification (IOI) sentences from {len(corpus.TRAIN_TEMPLATES)} training templates with
{len(corpus.TRAIN_NAMES)} training names, both ABBA and BABA orders, {len(corpus.PLACES)} places and {len(corpus.OBJECTS)} objects;
{hedging}
The rest are filler sentences (such as "a bag was given to Joe .") that
mention every name, including the {len(corpus.TEST_NAMES)} held-out names, which never appear in a
training IOI sentence. Every name has a random embedding (standard deviation
{r.get('name_embedding_std', NAME_EMBEDDING_STD)}) that training never updates and redraws at every step, so the model
cannot memorise per-name answers and must learn a mechanism that works for any name
vector; the saved weights carry one more seeded draw. The {len(corpus.TEST_TEMPLATES)} test templates never appear in training.
Next-token cross-entropy on every position, AdamW (lr {info['lr']}, weight decay {r['weight_decay']}, one-cycle schedule),
{info['steps']} steps of {info['batch_size']} sentences, dropout {r['dropout']}{both_phases}: {info['train_seconds']} s on
{info['torch_threads']} CPU thread(s) (torch {info['torch_version']}). The full recipe is in `training_info.json`.{second_phase}

## How well it does
On {test['n_prompts']} held-out prompts (test names in test templates, alternating ABBA/BABA, seed 1234):

| | held-out | training distribution |
|---|---|---|
| top-1 prediction is the IO name | {test['top1_accuracy']:.1%} | {train_['top1_accuracy']:.1%} |
| IO logit > subject logit | {test['io_over_s_accuracy']:.1%} | {train_['io_over_s_accuracy']:.1%} |
| mean logit difference (IO - S) | {test['mean_logit_diff']:.2f} | {train_['mean_logit_diff']:.2f} |
| smallest logit difference | {test['min_logit_diff']:.2f} | {train_['min_logit_diff']:.2f} |
| mean logit difference on ABC-corrupted prompts | {test['abc_corrupted_mean_logit_diff']:.2f} | {train_['abc_corrupted_mean_logit_diff']:.2f} |

## What its heads do
On {heads['prompts']['n_prompts']} held-out prompts (seed {heads['prompts']['seed']}; clean logit difference {heads['clean_logit_diff']:.2f}),
measured on the plain `transformers` model by `attribution_course.head_survey`: attention from the final
position to the IO name and to the two subject tokens, the head's direct logit attribution to
`logit(IO) - logit(S)` (final LayerNorm scale frozen), the exact change in the logit difference when the
head writes nothing (its whole output, value bias included, zeroed) and the first-order estimate of that
change, $-a\\cdot\\partial M/\\partial a$. The largest |zero-ablation effect| is {largest:.3f}.

A head counts as a **negative name mover** if it passes all four tests: mean attention to IO at least
0.3 and more than to S1 and S2 together; negative direct logit attribution; removing it raises the logit
difference by at least 10% of the largest |head effect|; $-a\\cdot\\partial M/\\partial a > 0$ (so the mistaken
$+a\\cdot\\partial M/\\partial a$ calls it a supporting head). Negative name movers: **{movers}**.
{search_note}

{survey_table(heads)}

## Limits
It knows only this tiny vocabulary and these sentence shapes; it is a teaching object for
localisation methods, not a language model. Its circuit need not match GPT-2 small's IOI circuit.
"""


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, Recipe]:
    """The command line, and the recipe it asks for: the variant's, with any recipe flag given overriding it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="shipped",
                        help="train one of the book's models: its recipe is the default of every recipe flag, "
                        "its directory the default of --out (default: shipped)")
    parser.add_argument("--out", type=Path, help="output directory (default: the variant's)")
    for field in fields(Recipe):
        # Default None ("not given"): the variant's value is used.
        parser.add_argument(f"--{field.name.replace('_', '-')}", type={"int": int, "float": float}[field.type], default=None)
    parser.add_argument("--rewrite-card", action="store_true",
                        help="only rewrite MODEL_CARD.md in --out from its training_info.json (no training)")
    parser.add_argument("--resurvey", action="store_true",
                        help="only re-measure the model saved in --out (evaluation and head survey) with this code, "
                        "rewriting its training_info.json and MODEL_CARD.md (recipe and training time kept; no training)")
    parser.add_argument("--checkpoint", type=Path, help="save the training state here (recipe searches)")
    parser.add_argument("--checkpoint-at", type=int, help="... before this step")
    parser.add_argument("--resume", type=Path, help="continue from a saved training state")
    args = parser.parse_args(argv)
    variant_recipe, variant_dir = VARIANTS[args.variant]
    if args.out is None and variant_dir is None:
        parser.error(f"--variant {args.variant} has no directory in the package: give --out")
    args.out = variant_dir if args.out is None else args.out
    given = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name) is not None}
    try:
        recipe = replace(variant_recipe, **given)
    except ValueError as err:
        parser.error(str(err))
    return args, recipe


def main(argv: list[str] | None = None) -> None:
    args, recipe = parse_arguments(argv)
    if args.rewrite_card:
        info = json.loads((args.out / "training_info.json").read_text())
        (args.out / "MODEL_CARD.md").write_text(model_card(info))
        return
    if args.resurvey:
        resurvey(args.out)
        return
    info = train(args.out, recipe, checkpoint=args.checkpoint, checkpoint_at=args.checkpoint_at, resume=args.resume)
    print(json.dumps(info["evaluation"], indent=2))


if __name__ == "__main__":
    main()
