"""The metric every chapter measures: the IO-minus-S logit difference."""

from __future__ import annotations

import torch
from jaxtyping import Float

from .prompts import IOIPrompts


def logit_diff(
    logits: Float[torch.Tensor, "batch pos vocab"],
    prompts: IOIPrompts,
    *,
    per_prompt: bool = False,
) -> Float[torch.Tensor, ""] | Float[torch.Tensor, " batch"]:
    """IO logit minus subject logit at the final position.

    Positive means the model prefers the indirect object (the right answer).
    Returns the mean over the batch, or one value per prompt with ``per_prompt``.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape [batch, pos, vocab], got {tuple(logits.shape)}")
    if logits.shape[0] != len(prompts):
        raise ValueError(f"logits hold {logits.shape[0]} prompts but prompts hold {len(prompts)}")
    final = logits[:, prompts.end_position, :]
    rows = torch.arange(len(prompts), device=logits.device)
    diff = final[rows, prompts.io_token.to(logits.device)] - final[rows, prompts.s_token.to(logits.device)]
    return diff if per_prompt else diff.mean()


def normalized_logit_diff(
    value: Float[torch.Tensor, "..."] | float,
    clean_value: float,
    corrupted_value: float,
) -> Float[torch.Tensor, "..."] | float:
    """Rescale a logit difference so the corrupted run scores 0 and the clean run 1.

    Raises ``ValueError`` when the clean and corrupted values (nearly) coincide,
    since the scale would then be meaningless.
    """
    span = float(clean_value) - float(corrupted_value)
    if abs(span) < 1e-6:
        raise ValueError(
            f"clean ({clean_value}) and corrupted ({corrupted_value}) logit differences coincide; "
            "normalisation needs a corruption that changes the metric"
        )
    return (value - corrupted_value) / span


def accuracy(logits: Float[torch.Tensor, "batch pos vocab"], prompts: IOIPrompts) -> float:
    """Fraction of prompts whose top-1 prediction at the final position is the IO name."""
    top = logits[:, prompts.end_position, :].argmax(-1).cpu()
    return (top == prompts.io_token).float().mean().item()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two tensors' entries (flattened): how well ``y`` tracks ``x``."""
    if x.numel() != y.numel():
        raise ValueError(f"pearson needs tensors with equal numbers of entries, got {x.numel()} and {y.numel()}")
    return torch.corrcoef(torch.stack([x.flatten().double(), y.flatten().double()]))[0, 1].item()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation: Pearson correlation of the entries' ranks (ties broken by order)."""
    rank = lambda t: t.flatten().argsort().argsort().double()  # noqa: E731
    return pearson(rank(x), rank(y))
