"""Hidden inputs: every graded exercise listed here is also run on inputs drawn at grading time.

A check cell uses one fixed input, printed in the notebook, so a constant return or a
mistake that happens not to matter on that input (``.all`` for ``.any``, a missing
``abs``, a fixed position) can pass. The grader gives the learner's run and the reference
run the same random seed (``ATTRIBUTION_COURSE_HIDDEN_SEED``); both draw the same inputs
with :func:`hidden_inputs`, the learner's run calls the learner's function on them and the
reference run calls the published solution, and the grader compares the results too.
The inputs are chosen so that the common mistakes give different answers.

Exercises not listed have no hidden inputs yet (their check cells use the notebook's model).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

SEED_ENV = "ATTRIBUTION_COURSE_HIDDEN_SEED"


def _logits_and_tokens(g: torch.Generator, batch: int = 6, pos: int = 9, vocab: int = 40):
    logits = torch.randn(batch, pos, vocab, generator=g)
    io = torch.randint(0, vocab, (batch,), generator=g)
    s = (io + torch.randint(1, vocab, (batch,), generator=g)) % vocab  # never equal to io
    end = int(torch.randint(2, pos - 1, (), generator=g))  # never the last position
    return logits, io, s, end


def _logit_diff_inputs(g):  # 2.1: a different end position, several prompts
    logits, io, s, end = _logits_and_tokens(g)
    return [(logits, io, s, end)]


def _accuracy_inputs(g):  # 2.2: three of eight prompts right, so a constant is wrong
    logits, _, _, end = _logits_and_tokens(g, batch=8)
    io = logits[:, end].argmin(-1)  # wrong for every prompt ...
    right = torch.randperm(8, generator=g)[:3]
    io[right] = logits[right, end].argmax(-1)  # ... except these
    return [(logits, io, end)]


def _normalize_inputs(g):  # 2.3: clean below corrupted too, so a sign slip shows
    values = torch.randn(3, 4, generator=g) * 3
    return [(values, 2.5, -0.7), (values, -1.25, 1.5)]


def _positions_inputs(g):  # 2.4: positions where only some prompts differ (.any, not .all)
    clean = torch.randint(0, 50, (4, 10), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 1) % 50  # every prompt
    corrupted[1, 6] = (clean[1, 6] + 1) % 50  # one prompt only
    corrupted[[0, 2], 8] = (clean[[0, 2], 8] + 7) % 50  # two prompts
    return [(clean, corrupted)]


GENERATORS: dict[str, Callable[[torch.Generator], list[tuple]]] = {
    "2.1": _logit_diff_inputs,
    "2.2": _accuracy_inputs,
    "2.3": _normalize_inputs,
    "2.4": _positions_inputs,
}


def hidden_inputs(exercise: str) -> list[tuple]:
    """The hidden argument tuples of ``exercise`` for this grading run (empty: none)."""
    seed = os.environ.get(SEED_ENV)
    if exercise not in GENERATORS or seed is None:
        return []
    g = torch.Generator().manual_seed(int(seed) * 1000 + sum(map(ord, exercise)))
    return GENERATORS[exercise](g)
