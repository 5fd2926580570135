"""Indirect-object-identification (IOI) prompts: clean, corrupted, reproducible.

A clean prompt ends where the indirect object (IO) should come next::

    When Mary and John went to the store , John gave a drink to   ->  Mary

Two corruptions are offered; both change only the token at the second-subject
position (``S2``), so clean and corrupted prompts have equal length and the same
position labels:

* ``"abc"``: S2 becomes a third name C (Wang et al. 2022's "ABC" distribution).
  Neither first name is repeated, so the model has no reason to prefer either.
* ``"swap"``: S2 becomes the IO name, which swaps the roles of the two names:
  the corrupted answer is the clean subject, and the logit difference flips sign.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Int

from . import corpus

Corruption = Literal["abc", "swap"]
Split = Literal["train", "test"]


@dataclass(frozen=True)
class IOIPrompts:
    """A batch of clean prompts with their corrupted twins and answer tokens.

    All token tensors have shape ``[batch, pos]`` with the same ``pos`` for every
    prompt; ``io_positions`` and ``s1_positions`` depend on the ABBA/BABA order.
    """

    clean_text: tuple[str, ...]
    corrupted_text: tuple[str, ...]
    clean_tokens: Int[torch.Tensor, "batch pos"]
    corrupted_tokens: Int[torch.Tensor, "batch pos"]
    io_token: Int[torch.Tensor, " batch"]
    s_token: Int[torch.Tensor, " batch"]
    io_positions: Int[torch.Tensor, " batch"]
    s1_positions: Int[torch.Tensor, " batch"]
    s2_position: int
    end_position: int
    corruption: str
    seed: int

    def __len__(self) -> int:
        return len(self.clean_text)

    @property
    def position_labels(self) -> tuple[str, ...]:
        """One label per token position, e.g. ``"S2"`` or ``"end"``."""
        return corpus.POSITION_LABELS

    def subset(self, indices: Sequence[int] | slice) -> "IOIPrompts":
        """The prompts at ``indices`` (a list of ints or a slice), as a new batch."""
        idx = torch.arange(len(self))[indices]
        pick = idx.tolist()
        return IOIPrompts(
            clean_text=tuple(self.clean_text[i] for i in pick),
            corrupted_text=tuple(self.corrupted_text[i] for i in pick),
            clean_tokens=self.clean_tokens[idx],
            corrupted_tokens=self.corrupted_tokens[idx],
            io_token=self.io_token[idx],
            s_token=self.s_token[idx],
            io_positions=self.io_positions[idx],
            s1_positions=self.s1_positions[idx],
            s2_position=self.s2_position,
            end_position=self.end_position,
            corruption=self.corruption,
            seed=self.seed,
        )


def _tokenizer_of(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as one token with a leading space (GPT-2 style).

    Raises ``ValueError`` naming the word when the tokenizer splits it or does
    not know it.
    """
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1:
        raise ValueError(
            f"IOI prompt word {word!r} is {len(ids)} tokens for this tokenizer, "
            "but every name, place and object must be exactly one token"
        )
    if unk is not None and ids[0] == unk:
        raise ValueError(f"IOI prompt word {word!r} is not in the tokenizer's vocabulary (it maps to {tokenizer.unk_token!r})")
    return ids[0]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the beginning-of-sequence token prepended.

    Raises ``ValueError`` if any word is unknown to the tokenizer.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        bad = sorted({w for w in text.split() if tokenizer.encode(" " + w, add_special_tokens=False) == [unk]})
        raise ValueError(f"cannot encode prompt {text!r}: unknown word(s) {bad} for this tokenizer")
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no beginning-of-sequence token; IOI prompts need one at position 0")
    return [tokenizer.bos_token_id, *ids]


def fill_template(template: str, a: str, b: str, s: str, place: str, obj: str) -> str:
    """Fill one template's slots."""
    return template.format(A=a, B=b, S=s, PLACE=place, OBJECT=obj)


def make_ioi_prompts(
    model_or_tokenizer,
    n_prompts: int,
    *,
    split: Split = "test",
    corruption: Corruption = "abc",
    seed: int = 0,
    templates: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> IOIPrompts:
    """Build ``n_prompts`` clean/corrupted IOI prompts, reproducibly from ``seed``.

    Half are ABBA (IO first) and half BABA (subject first), alternating:
    prompt ``i`` is ABBA exactly when ``i`` is even, whatever the seed. So a
    batch built with another seed, used as the source of a resample ablation,
    pairs every prompt with one *of the same order*: resampling then keeps the
    name order (and whatever a component encodes about it) and removes only
    the rest. That is a confound of every resample ablation built this way;
    rolling the source batch by one pairs each prompt with the opposite order instead.
    ``split`` picks held-out (``"test"``) or training (``"train"``) names and
    templates; ``templates``/``names`` override it.

    Raises ``ValueError`` for unknown arguments and for prompts the tokenizer
    cannot encode as single-token names of equal length.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if corruption not in ("abc", "swap"):
        raise ValueError(f"corruption must be 'abc' or 'swap', got {corruption!r}")
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1, got {n_prompts}")
    templates = tuple(templates or (corpus.TEST_TEMPLATES if split == "test" else corpus.TRAIN_TEMPLATES))
    names = tuple(names or (corpus.TEST_NAMES if split == "test" else corpus.TRAIN_NAMES))
    if len(set(names)) < 3:
        raise ValueError("names must hold at least 3 distinct names (IO, subject and a third for 'abc')")
    tokenizer = _tokenizer_of(model_or_tokenizer)
    rng = random.Random(seed)

    rows = []
    for i in range(n_prompts):
        template = rng.choice(templates)
        io, s, c = rng.sample(names, 3)
        place, obj = rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS)
        abba = i % 2 == 0
        a, b = (io, s) if abba else (s, io)
        corrupt_s2 = c if corruption == "abc" else io
        clean = fill_template(template, a, b, s, place, obj)
        corrupted = fill_template(template, a, b, corrupt_s2, place, obj)
        first, second = corpus.NAME1_POSITION, corpus.NAME2_POSITION
        rows.append((clean, corrupted, io, s, first if abba else second, second if abba else first))

    clean_ids = [encode_prompt(tokenizer, r[0]) for r in rows]
    corrupt_ids = [encode_prompt(tokenizer, r[1]) for r in rows]
    lengths = {len(t) for t in clean_ids + corrupt_ids}
    if len(lengths) != 1:
        raise ValueError(
            f"IOI prompts tokenized to different lengths {sorted(lengths)}; every template word, "
            "name, place and object must be a single token for this tokenizer"
        )
    (length,) = lengths
    if length != corpus.N_POSITIONS:
        raise ValueError(f"IOI prompts are {length} tokens, expected {corpus.N_POSITIONS} (see corpus.POSITION_LABELS)")
    io_ids = [single_token_id(tokenizer, r[2]) for r in rows]
    s_ids = [single_token_id(tokenizer, r[3]) for r in rows]
    return IOIPrompts(
        clean_text=tuple(r[0] for r in rows),
        corrupted_text=tuple(r[1] for r in rows),
        clean_tokens=torch.tensor(clean_ids),
        corrupted_tokens=torch.tensor(corrupt_ids),
        io_token=torch.tensor(io_ids),
        s_token=torch.tensor(s_ids),
        io_positions=torch.tensor([r[4] for r in rows]),
        s1_positions=torch.tensor([r[5] for r in rows]),
        s2_position=corpus.S2_POSITION,
        end_position=corpus.END_POSITION,
        corruption=corruption,
        seed=seed,
    )


def replace_io_name(
    model_or_tokenizer, prompts: IOIPrompts, *, seed: int = 0, names: Sequence[str] | None = None
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, " batch"]]:
    """Twins of the clean prompts whose IO name is another name C, and C's token ids.

    The IO name occurs once in an IOI prompt; the twin has C there and is the
    same everywhere else, with C drawn (reproducibly from ``seed``) from
    ``names`` (default: the held-out names) so that it is neither the prompt's
    IO nor its subject. Copying an activation from a twin into the clean run
    then shows whether that activation carries the IO name: if it does, the
    model's answer becomes C, a name the clean prompt never mentions.
    """
    names = tuple(names or corpus.TEST_NAMES)
    tokenizer = _tokenizer_of(model_or_tokenizer)
    ids = [single_token_id(tokenizer, name) for name in names]
    rng = random.Random(seed)
    new_ids = []
    for io, s in zip(prompts.io_token.tolist(), prompts.s_token.tolist()):
        choices = [i for i in ids if i not in (io, s)]
        if not choices:
            raise ValueError(f"names {names} hold no name other than a prompt's IO and subject")
        new_ids.append(rng.choice(choices))
    new = torch.tensor(new_ids)
    twins = prompts.clean_tokens.clone()
    twins[torch.arange(len(prompts)), prompts.io_positions] = new
    return twins, new
