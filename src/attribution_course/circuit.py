"""Reading the circuit: where each head looks and what it writes, on the TransformerBridge.

Localisation (ablation, patching, attribution) names *which* heads matter; this
module shows *what* they do, from one forward pass over IOI prompts:

* **attention** (:func:`head_attention`): each head's attention pattern
  (``blocks.{L}.attn.hook_pattern``, ``[batch, head, query, key]``) read at the
  final position towards the IO name, the first subject (S1) and the repeated
  subject (S2), and at S2 towards S1;
* **direct logit attribution** (:func:`direct_logit_attribution`): what each
  head writes at the final position, read straight off by the unembedding as a
  contribution to ``logit(IO) - logit(S)``;
* **roles** (:func:`head_roles`): labels derived from those numbers with the
  explicit thresholds below.

Direct logit attribution. The final residual stream ``r`` is a sum of
components (embeddings, every head, every attention bias, every MLP), and the
logits are ``LN(r) @ W_U + b_U``. With the final LayerNorm's scale
``σ = sqrt(var(r) + ε)`` frozen at its value on the run, ``LN`` is linear:
it centres ``r`` and divides by ``σ`` (compatibility mode has folded the
LayerNorm's weight into ``W_U`` and its bias into ``b_U``). So each component
``c`` contributes exactly

    DLA(c) = (c - mean(c)) / σ · (W_U[:, IO] - W_U[:, S])

and the contributions of all components plus ``b_U[IO] - b_U[S]`` add up to the
logit difference (:meth:`DirectLogitAttribution.total`). A head's component is
its output ``z @ W_O`` (``hook_z``, ``[batch, pos, head, d_head]``).
Compatibility mode also folds each head's value bias into the layer's output
bias ``b_O``, so that constant vector is counted under "attention biases", not
under the head; the same is true of the course's ablations, which act on ``hook_z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from .metrics import logit_diff
from .patching import cache_activations, hook_names
from .prompts import IOIPrompts

#: The final LayerNorm's scale, ``[batch, pos, 1]``.
FINAL_SCALE_HOOK = "ln_final.hook_scale"
EMBED_HOOK = "hook_embed"
POS_EMBED_HOOK = "hook_pos_embed"
#: The logits, ``[batch, pos, vocab]``.
LOGITS_HOOK = "unembed.hook_out"

#: A head *attends to the IO name* when its mean attention from the final position
#: to the IO name is at least this, and larger than its attention to S1 and S2
#: together (issue 9's criterion for a name mover, positive or negative).
IO_MIN_ATTENTION = 0.3

#: A head *attends to the subject* when its mean attention from the final position
#: to S1 and S2 together is at least this (a majority of its attention), and
#: larger than its attention to the IO name.
SUBJECT_MIN_ATTENTION = 0.5

#: A head is a *duplicate-token head* when its mean attention from the S2
#: position (the repeated name) back to S1 (its first occurrence) is at least this.
#: Attention spread evenly over the 11 positions up to S2 would give about 0.09.
DUPLICATE_TOKEN_MIN_ATTENTION = 0.3

#: A head's direct logit attribution counts as a *direct effect* only when its
#: size is at least this fraction of the largest ``|DLA|`` among all heads; below
#: it the head writes (almost) nothing the unembedding reads as IO vs S.
MIN_DLA_FRACTION = 0.05

#: The roles :func:`head_roles` can assign, each with the rule that assigns it.
ROLE_RULES: dict[str, str] = {
    "name mover": "attends to IO; positive direct effect (writes the IO name)",
    "negative name mover": "attends to IO; negative direct effect (writes against the IO name)",
    "subject suppressor": "attends to S; positive direct effect (writes against the subject it attends to)",
    "subject mover": "attends to S; negative direct effect (writes the subject it attends to)",
    "S-inhibition candidate": "attends to S; no direct effect (any effect must go through later heads)",
    "duplicate-token head": "at S2, attends to S1 (notices the repeated name)",
}


def _final_position_hooks(model) -> list[str]:
    """Every hook :func:`read_circuit` needs, in one forward pass."""
    return [
        EMBED_HOOK,
        POS_EMBED_HOOK,
        FINAL_SCALE_HOOK,
        LOGITS_HOOK,
        *hook_names(model, "head"),  # blocks.{L}.attn.hook_z
        *hook_names(model, "pattern"),  # blocks.{L}.attn.hook_pattern
        *hook_names(model, "mlp"),  # blocks.{L}.hook_mlp_out
    ]


def cache_for_reading(model, prompts: IOIPrompts) -> dict[str, torch.Tensor]:
    """Activations at every hook the circuit reading uses, on the clean prompts (one forward)."""
    return cache_activations(model, prompts.clean_tokens, _final_position_hooks(model))


# ---------------------------------------------------------------- attention


@dataclass(frozen=True)
class HeadAttention:
    """Mean attention of every head, over prompts, ``[layer, head]`` each.

    ``to_io``, ``to_s1`` and ``to_s2`` are read from the final position;
    ``s2_to_s1`` from the S2 position (the repeated name) to S1.
    """

    to_io: Float[torch.Tensor, "layer head"]
    to_s1: Float[torch.Tensor, "layer head"]
    to_s2: Float[torch.Tensor, "layer head"]
    s2_to_s1: Float[torch.Tensor, "layer head"]

    @property
    def to_s(self) -> Float[torch.Tensor, "layer head"]:
        """Attention from the final position to either occurrence of the subject."""
        return self.to_s1 + self.to_s2

    def targets(self) -> dict[str, Float[torch.Tensor, "layer head"]]:
        """``{"IO": ..., "S1": ..., "S2": ...}``: attention from the final position."""
        return {"IO": self.to_io, "S1": self.to_s1, "S2": self.to_s2}


def stacked_patterns(model, cache: dict[str, torch.Tensor]) -> Float[torch.Tensor, "batch layer head query key"]:
    """Every layer's ``hook_pattern`` from ``cache``, stacked on a layer axis."""
    return torch.stack([cache[name] for name in hook_names(model, "pattern")], dim=1)


def attention_between(
    patterns: Float[torch.Tensor, "batch layer head query key"],
    query_positions: torch.Tensor | int,
    key_positions: torch.Tensor | int,
) -> Float[torch.Tensor, "layer head"]:
    """Mean over prompts of the attention from ``query_positions`` to ``key_positions``.

    Each position is an ``int`` (the same in every prompt) or a ``[batch]`` tensor
    (one per prompt, e.g. ``prompts.io_positions``).
    """
    batch = patterns.shape[0]
    rows = torch.arange(batch)
    query = torch.as_tensor(query_positions).expand(batch)
    key = torch.as_tensor(key_positions).expand(batch)
    return patterns[rows, :, :, query, key].mean(dim=0)  # advanced indices first: [batch, layer, head]


def attention_summary(model, cache: dict[str, torch.Tensor], prompts: IOIPrompts) -> HeadAttention:
    """:class:`HeadAttention` from a :func:`cache_for_reading` cache."""
    patterns = stacked_patterns(model, cache)
    end, s2 = prompts.end_position, prompts.s2_position
    return HeadAttention(
        to_io=attention_between(patterns, end, prompts.io_positions),
        to_s1=attention_between(patterns, end, prompts.s1_positions),
        to_s2=attention_between(patterns, end, s2),
        s2_to_s1=attention_between(patterns, s2, prompts.s1_positions),
    )


def head_attention(model, prompts: IOIPrompts) -> HeadAttention:
    """Where every head looks, averaged over the clean ``prompts`` (one forward pass)."""
    return attention_summary(model, cache_for_reading(model, prompts), prompts)


# ---------------------------------------------------------------- direct logit attribution


def answer_direction(model, prompts: IOIPrompts) -> Float[torch.Tensor, "batch d_model"]:
    """``W_U[:, IO] - W_U[:, S]`` for each prompt: the residual direction the logit difference reads."""
    unembed = model.W_U.detach()  # [d_model, vocab], final LayerNorm weight folded in
    return (unembed[:, prompts.io_token] - unembed[:, prompts.s_token]).T


def logit_attribution(
    written: Float[torch.Tensor, "batch *component d_model"],
    final_scale: Float[torch.Tensor, " batch"],
    direction: Float[torch.Tensor, "batch d_model"],
) -> Float[torch.Tensor, "batch *component"]:
    """``(c - mean(c)) / σ · direction`` per prompt: what the unembedding reads off component ``c``.

    ``written`` is what a component adds to the residual stream at the final
    position; ``final_scale`` is the final LayerNorm's scale ``σ`` on the same run.
    """
    centred = written - written.mean(dim=-1, keepdim=True)
    extra = written.ndim - 2  # component axes between batch and d_model
    shape = (written.shape[0],) + (1,) * extra
    return (centred * direction.reshape(shape + direction.shape[-1:])).sum(-1) / final_scale.reshape(shape)


def head_outputs(model, z: Float[torch.Tensor, "batch layer head d_head"]) -> Float[torch.Tensor, "batch layer head d_model"]:
    """What each head writes into the residual stream: ``z @ W_O`` per head (no bias)."""
    return torch.einsum("blhd,lhdm->blhm", z, model.W_O.detach())


@dataclass(frozen=True)
class DirectLogitAttribution:
    """Per-prompt direct logit attributions to ``logit(IO) - logit(S)`` at the final position.

    ``heads`` holds one value per head; ``rest`` every other component by name
    (embeddings, each layer's attention output bias and MLP, the unembedding
    bias); ``logit_diff`` is the model's own logit difference on the same run.
    """

    heads: Float[torch.Tensor, "batch layer head"]
    rest: dict[str, Float[torch.Tensor, " batch"]]
    logit_diff: Float[torch.Tensor, " batch"]

    @property
    def per_head(self) -> Float[torch.Tensor, "layer head"]:
        """Mean over prompts of each head's direct logit attribution."""
        return self.heads.mean(dim=0)

    def total(self) -> Float[torch.Tensor, " batch"]:
        """Sum of every component's attribution: equals ``logit_diff`` (up to float error)."""
        return self.heads.sum(dim=(1, 2)) + torch.stack(list(self.rest.values())).sum(dim=0)


def attribution_from_cache(model, cache: dict[str, torch.Tensor], prompts: IOIPrompts) -> DirectLogitAttribution:
    """:class:`DirectLogitAttribution` from a :func:`cache_for_reading` cache.

    ``logit_diff`` comes from the logits of the same forward pass, so
    :meth:`DirectLogitAttribution.total` can be checked against it.
    """
    end = prompts.end_position
    scale = cache[FINAL_SCALE_HOOK][:, end, 0]  # [batch]
    direction = answer_direction(model, prompts)  # [batch, d_model]
    z = torch.stack([cache[name][:, end] for name in hook_names(model, "head")], dim=1)  # [batch, layer, head, d_head]
    heads = logit_attribution(head_outputs(model, z), scale, direction)

    batch = len(prompts)
    rest = {
        "embedding": logit_attribution(cache[EMBED_HOOK][:, end], scale, direction),
        "position embedding": logit_attribution(cache[POS_EMBED_HOOK][:, end], scale, direction),
    }
    for layer, mlp_hook in enumerate(hook_names(model, "mlp")):
        bias = model.b_O.detach()[layer].expand(batch, -1)  # includes the folded value biases
        rest[f"attention bias L{layer}"] = logit_attribution(bias, scale, direction)
        rest[f"MLP{layer}"] = logit_attribution(cache[mlp_hook][:, end], scale, direction)
    unembed_bias = model.b_U.detach()
    rest["unembedding bias"] = unembed_bias[prompts.io_token] - unembed_bias[prompts.s_token]
    return DirectLogitAttribution(heads=heads, rest=rest, logit_diff=logit_diff(cache[LOGITS_HOOK], prompts, per_prompt=True))


def direct_logit_attribution(model, prompts: IOIPrompts) -> DirectLogitAttribution:
    """What every head (and every other component) writes towards IO vs S, on the clean ``prompts``."""
    return attribution_from_cache(model, cache_for_reading(model, prompts), prompts)


# ---------------------------------------------------------------- roles


@dataclass(frozen=True)
class HeadRole:
    """One head's numbers and the roles they earn (empty when no rule applies)."""

    label: str
    layer: int
    head: int
    roles: tuple[str, ...]
    to_io: float
    to_s: float
    s2_to_s1: float
    direct_logit_attribution: float


def head_roles(
    attention: HeadAttention,
    direct_logit_attribution: Float[torch.Tensor, "layer head"],
) -> list[HeadRole]:
    """Label every head from where it looks and what it writes, by :data:`ROLE_RULES`.

    ``direct_logit_attribution`` is the mean per head (``DirectLogitAttribution.per_head``).
    A head attends to IO or to S by :data:`IO_MIN_ATTENTION` and
    :data:`SUBJECT_MIN_ATTENTION`; its direct effect is positive or negative
    when ``|DLA|`` is at least :data:`MIN_DLA_FRACTION` of the largest ``|DLA|``
    of any head; at S2 it is a duplicate-token head by
    :data:`DUPLICATE_TOKEN_MIN_ATTENTION`. Returns one :class:`HeadRole` per
    head, layer-major.
    """
    dla = direct_logit_attribution.detach()
    if dla.shape != attention.to_io.shape:
        raise ValueError(
            f"direct_logit_attribution has shape {tuple(dla.shape)} but the attention is per "
            f"[layer, head] {tuple(attention.to_io.shape)}; pass DirectLogitAttribution.per_head"
        )
    threshold = MIN_DLA_FRACTION * dla.abs().max().item()
    n_layers, n_heads = dla.shape
    labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    table = []
    for layer in range(n_layers):
        for head in range(n_heads):
            to_io, to_s = attention.to_io[layer, head].item(), attention.to_s[layer, head].item()
            value = dla[layer, head].item()
            positive, negative = value >= threshold, value <= -threshold
            roles = []
            if to_io >= IO_MIN_ATTENTION and to_io > to_s:
                roles += ["name mover"] if positive else ["negative name mover"] if negative else []
            elif to_s >= SUBJECT_MIN_ATTENTION and to_s > to_io:
                roles += ["subject suppressor" if positive else "subject mover" if negative else "S-inhibition candidate"]
            if attention.s2_to_s1[layer, head].item() >= DUPLICATE_TOKEN_MIN_ATTENTION:
                roles.append("duplicate-token head")
            table.append(
                HeadRole(
                    label=labels[layer * n_heads + head], layer=layer, head=head, roles=tuple(roles),
                    to_io=to_io, to_s=to_s, s2_to_s1=attention.s2_to_s1[layer, head].item(),
                    direct_logit_attribution=value,
                )
            )
    return table


def heads_with_role(roles: list[HeadRole], role: str) -> list[HeadRole]:
    """The heads that play ``role`` (one of :data:`ROLE_RULES`), in layer-major order."""
    if role not in ROLE_RULES:
        raise ValueError(f"unknown role {role!r}; choose one of {sorted(ROLE_RULES)}")
    return [row for row in roles if role in row.roles]


@dataclass(frozen=True)
class CircuitReading:
    """Everything :func:`read_circuit` measures, from one forward pass."""

    attention: HeadAttention
    attribution: DirectLogitAttribution
    roles: list[HeadRole]


def read_circuit(model, prompts: IOIPrompts) -> CircuitReading:
    """Attention, direct logit attribution and roles of every head on the clean ``prompts``."""
    cache = cache_for_reading(model, prompts)
    attention = attention_summary(model, cache, prompts)
    attribution = attribution_from_cache(model, cache, prompts)
    return CircuitReading(attention, attribution, head_roles(attention, attribution.per_head))


def roles_markdown(roles: list[HeadRole]) -> str:
    """A Markdown table of the heads that have a role: their roles and the numbers behind them.

    Columns: mean attention from the final position to IO and to S1+S2, from S2
    to S1, and the direct logit attribution. Short headers keep it within a phone's width.
    """
    lines = [
        "| head | role | IO | S1+S2 | S2→S1 | DLA |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in roles:
        if row.roles:
            lines.append(
                f"| {row.label} | {', '.join(row.roles)} | {row.to_io:.2f} | {row.to_s:.2f} | "
                f"{row.s2_to_s1:.2f} | {row.direct_logit_attribution:+.2f} |"
            )
    if len(lines) == 2:
        lines.append("| (none) | no head passes any rule | | | | |")
    return "\n".join(lines)
