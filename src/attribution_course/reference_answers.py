"""Reference answers for the few exercise quantities the core modules do not compute.

The graded checks compare a learner's function with a value computed by the package
in the same cell (:mod:`attribution_course.patching`, :mod:`attribution_course.corrections`,
:mod:`attribution_course.metrics`). These helpers cover the rest; they are written
independently of the solution notebooks, so a check never compares a solution with itself.
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from .patching import Activations, layer_of_hook


def largest_components(effects: Float[torch.Tensor, "..."], k: int) -> list[tuple[int, ...]]:
    """Indices of the ``k`` entries with the largest ``|effect|``, largest first.

    Ties are broken by the flat (row-major) index, so the answer is unique.
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    flat = effects.detach().abs().flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    return [tuple(int(i) for i in torch.unravel_index(torch.tensor(i), effects.shape)) for i in order]


def step_norms(acts: Activations, replacements: Activations) -> Float[torch.Tensor, "layer head"]:
    """Mean over prompts of ``‖a' − a‖`` per head (norm over positions and ``d_head``).

    ``acts`` and ``replacements`` map ``blocks.{l}.attn.hook_z`` to ``[batch, pos, head, d_head]``.
    """
    layers = sorted(acts, key=layer_of_hook)
    rows = [torch.linalg.vector_norm(replacements[n] - acts[n], dim=(1, 3)).mean(0) for n in layers]
    return torch.stack(rows)


def removals_the_wrong_sign_calls_supporting(
    exact: Float[torch.Tensor, "layer head"],
    a_dot_grad: Float[torch.Tensor, "layer head"],
    min_gain: float,
) -> list[tuple[int, int]]:
    """Heads whose zero ablation raises the metric by more than ``min_gain`` while ``+a·∂M/∂a``, read as the
    removal's effect, says it lowers it; ``(layer, head)``, largest gain first (ties by flat index)."""
    n_heads = exact.shape[1]
    flagged = [
        (-exact[layer, head].item(), layer * n_heads + head, (layer, head))
        for layer in range(exact.shape[0])
        for head in range(n_heads)
        if exact[layer, head].item() > min_gain and a_dot_grad[layer, head].item() < 0
    ]
    return [pair for *_, pair in sorted(flagged)]
