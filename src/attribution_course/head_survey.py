"""Per-head measurements on a plain ``transformers`` GPT-2, independent of TransformerLens.

The model card (``python -m attribution_course.train``) and the tests use this
module to decide, on held-out prompts, what each attention head does at the
final position:

* where it looks: mean attention from the final position to the IO name, the
  first subject (S1), the repeated subject (S2) and the final position itself
  (a head that reads the prediction already made there, not any name);
* what it writes: its direct logit attribution (DLA) to ``logit(IO) - logit(S)``,
  the head's output passed through the final LayerNorm with the LayerNorm's
  scale frozen at its value on the run;
* what removing it does: the exact change in the logit difference when the
  head writes nothing (its slice of the attention output projection's input is
  zeroed, value bias included), and the first-order estimate of that change,
  ``(0 - z)·∂M/∂z = -z·∂M/∂z``;
* how much of that change goes through the final LayerNorm's scale: the same
  removal with the final LayerNorm dividing by its scale on the clean run. A
  head whose removal helps only when the scale is free calibrates by changing
  the norm of the residual stream (shrinking every logit together), not by
  writing against the answer.

It works on the Hugging Face model directly (forward hooks on each block's
``attn.c_proj``), so the numbers do not depend on how TransformerLens folds or
centres weights: a second, independent measurement of what the chapters show.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float

from .prompts import IOIPrompts


@dataclass(frozen=True)
class HeadSurvey:
    """Per-head numbers, each ``[n_layer, n_head]``, averaged over prompts."""

    attention_to_io: Float[torch.Tensor, "layer head"]
    attention_to_s1: Float[torch.Tensor, "layer head"]
    attention_to_s2: Float[torch.Tensor, "layer head"]
    direct_logit_attribution: Float[torch.Tensor, "layer head"]
    zero_ablation_effect: Float[torch.Tensor, "layer head"]
    zero_ablation_estimate: Float[torch.Tensor, "layer head"]
    clean_logit_diff: float
    n_prompts: int
    #: The zero-ablation effect with the final LayerNorm's scale fixed at its clean value.
    zero_ablation_effect_fixed_final_ln: Float[torch.Tensor, "layer head"] | None = None
    #: Attention from the final position to itself.
    attention_to_end: Float[torch.Tensor, "layer head"] | None = None

    @property
    def attention_to_s(self) -> Float[torch.Tensor, "layer head"]:
        """Attention to either occurrence of the subject name."""
        return self.attention_to_s1 + self.attention_to_s2

    def negative_name_mover_criteria(self, layer: int, head: int) -> dict[str, bool]:
        """The four tests a head must pass to count as a negative name mover.

        At the final position it attends mostly to the IO name (mean attention
        at least 0.3 and more than to both subject tokens together); it writes
        against the answer (negative DLA); removing it *raises* the logit
        difference by at least 10% of the largest head effect; and the
        first-order estimate of that removal, ``-z·∂M/∂z``, is positive (so the
        mistaken ``+z·∂M/∂z`` calls it a supporting head).
        """
        largest = self.zero_ablation_effect.abs().max().item()
        effect = self.zero_ablation_effect[layer, head].item()
        return {
            "attends_to_io": self.attention_to_io[layer, head].item() >= 0.3
            and self.attention_to_io[layer, head].item() > self.attention_to_s[layer, head].item(),
            "negative_direct_logit_attribution": self.direct_logit_attribution[layer, head].item() < 0,
            "removal_helps_by_10_percent": effect >= 0.1 * largest,
            "minus_a_grad_right_sign": self.zero_ablation_estimate[layer, head].item() > 0,
        }

    def negative_name_movers(self) -> list[tuple[int, int]]:
        """Every head that passes all four criteria."""
        n_layer, n_head = self.zero_ablation_effect.shape
        return [
            (layer, head)
            for layer in range(n_layer)
            for head in range(n_head)
            if all(self.negative_name_mover_criteria(layer, head).values())
        ]


def _logit_diff(logits: torch.Tensor, prompts: IOIPrompts) -> torch.Tensor:
    final = logits[:, prompts.end_position]
    rows = torch.arange(len(prompts))
    return (final[rows, prompts.io_token] - final[rows, prompts.s_token]).mean()


@contextmanager
def _eager_attention(model):
    """Only the eager attention returns its probabilities (SDPA returns none); the model's own is restored after."""
    previous_attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous_attention)


def survey_heads(hf_model, prompts: IOIPrompts) -> HeadSurvey:
    """Measure every head of a ``GPT2LMHeadModel`` on ``prompts`` (see the module doc)."""
    with _eager_attention(hf_model.eval()) as model:
        return _survey(model, prompts)


def _frozen_scale_and_answer_direction(model, final_ln_input: torch.Tensor, prompts: IOIPrompts):
    """The final LayerNorm's scale at the final position, ``[batch, 1]``, and the direction a write (centred,
    divided by that scale) is read along for ``logit(IO) - logit(S)``, ``[batch, d_model]``."""
    resid = final_ln_input[:, prompts.end_position]  # [batch, d_model]
    scale = (resid.var(dim=-1, unbiased=False, keepdim=True) + model.transformer.ln_f.eps).sqrt()
    unembed = model.lm_head.weight  # [vocab, d_model]
    return scale, (unembed[prompts.io_token] - unembed[prompts.s_token]) * model.transformer.ln_f.weight


def direct_logit_attribution_by_source(model, prompts: IOIPrompts, layer: int) -> dict[str, torch.Tensor]:
    """Each head of ``layer``: its direct logit attribution, split by the position it reads from.

    At the final position a head writes ``sum_k A_k v_k W_O``; the term of source ``k`` is read like the whole
    write (centred, through the final LayerNorm with its scale frozen, onto ``unembed[IO] - unembed[S]``). Keys
    ``io``, ``s1``, ``s2``, ``end`` (the final position itself) and ``other`` (every other position), each
    ``[n_head]`` averaged over prompts; they add up to the head's DLA in :func:`survey_heads`. The values are
    whatever the block's ``c_attn`` returns, so a forward hook there (a training-time reroute) is honoured.
    """
    config = model.config
    n_head, d_model = config.n_head, config.n_embd
    d_head = d_model // n_head
    block = model.transformer.h[layer]
    tokens, end, rows = prompts.clean_tokens, prompts.end_position, torch.arange(len(prompts))
    kept = {}
    handles = [
        block.attn.c_attn.register_forward_hook(lambda module, args, output: kept.__setitem__("qkv", output)),
        model.transformer.ln_f.register_forward_pre_hook(lambda module, args: kept.__setitem__("final", args[0])),
    ]
    try:
        with _eager_attention(model), torch.no_grad():
            pattern = model(tokens, output_attentions=True).attentions[layer][:, :, end]  # [batch, head, key]
    finally:
        for handle in handles:
            handle.remove()
    values = kept["qkv"][..., 2 * d_model :].unflatten(-1, (n_head, d_head))  # [batch, key, head, d_head]
    w_out = block.attn.c_proj.weight.detach().unflatten(0, (n_head, d_head))  # [head, d_head, d_model]
    scale, answer_direction = _frozen_scale_and_answer_direction(model, kept["final"], prompts)
    with torch.no_grad():
        written = torch.einsum("bhk,bkhe,hed->bhkd", pattern, values, w_out)  # [batch, head, key, d_model]
        written = written - written.mean(dim=-1, keepdim=True)
        by_key = torch.einsum("bhkd,bd->bhk", written, answer_direction) / scale[:, :, None]  # [batch, head, key]
    io = by_key[rows, :, prompts.io_positions]  # [batch, head]
    s1 = by_key[rows, :, prompts.s1_positions]
    s2, at_end = by_key[:, :, prompts.s2_position], by_key[:, :, end]
    other = by_key.sum(dim=-1) - io - s1 - s2 - at_end
    return {name: part.mean(dim=0) for name, part in
            {"io": io, "s1": s1, "s2": s2, "end": at_end, "other": other}.items()}


def _survey(model, prompts: IOIPrompts) -> HeadSurvey:
    config = model.config
    n_layer, n_head = config.n_layer, config.n_head
    d_head = config.n_embd // n_head
    blocks = model.transformer.h
    tokens = prompts.clean_tokens
    end, rows = prompts.end_position, torch.arange(len(prompts))

    head_inputs: list[torch.Tensor] = []  # per layer: [batch, pos, n_head * d_head], the heads' z

    def keep_head_input(module, args):
        z = args[0].detach().requires_grad_(True)
        head_inputs.append(z)
        return (z,)

    final_ln_input: list[torch.Tensor] = []
    handles = [block.attn.c_proj.register_forward_pre_hook(keep_head_input) for block in blocks]
    handles.append(model.transformer.ln_f.register_forward_pre_hook(lambda m, a: final_ln_input.append(a[0].detach())))
    try:
        with torch.enable_grad():
            out = model(tokens, output_attentions=True)
            metric = _logit_diff(out.logits, prompts)
            metric.backward()
    finally:
        for handle in handles:
            handle.remove()

    # Where each head looks from the final position: [layer, head].
    patterns = torch.stack([a[:, :, end].detach() for a in out.attentions], dim=1)  # [batch, layer, head, key]
    attention_to_io = patterns[rows, :, :, prompts.io_positions].mean(dim=0)
    attention_to_s1 = patterns[rows, :, :, prompts.s1_positions].mean(dim=0)
    attention_to_s2 = patterns[..., prompts.s2_position].mean(dim=0)
    attention_to_end = patterns[..., end].mean(dim=0)

    # Direct logit attribution: each head's write at the final position through ln_f with its scale frozen.
    scale, answer_direction = _frozen_scale_and_answer_direction(model, final_ln_input[0], prompts)
    dla = torch.zeros(n_layer, n_head)
    estimate = torch.zeros(n_layer, n_head)
    for layer, (block, z) in enumerate(zip(blocks, head_inputs)):
        w_out = block.attn.c_proj.weight.detach()  # Conv1D: [n_head * d_head, d_model]
        gradient = z.grad
        for head in range(n_head):
            cols = slice(head * d_head, (head + 1) * d_head)
            written = z.detach()[:, end, cols] @ w_out[cols]  # [batch, d_model]
            written = written - written.mean(dim=-1, keepdim=True)
            dla[layer, head] = ((written / scale) * answer_direction).sum(-1).mean()
            estimate[layer, head] = -(z.detach()[..., cols] * gradient[..., cols]).sum()
    del head_inputs[:]

    # Exact zero ablation: the head's z (value bias included) set to zero, one rerun per head;
    # a second rerun with the final LayerNorm dividing by its clean scale (of every position).
    clean = metric.item()
    final_ln = model.transformer.ln_f
    clean_scale = (final_ln_input[0].var(dim=-1, unbiased=False, keepdim=True) + final_ln.eps).sqrt()

    def fixed_scale_ln(module, args, output):
        centred = args[0] - args[0].mean(dim=-1, keepdim=True)
        return centred / clean_scale * module.weight + module.bias

    effect = torch.zeros(n_layer, n_head)
    effect_fixed_ln = torch.zeros(n_layer, n_head)
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            for head in range(n_head):
                cols = slice(head * d_head, (head + 1) * d_head)

                def silence(module, args, cols=cols):
                    z = args[0].clone()
                    z[..., cols] = 0
                    return (z,)

                handle = block.attn.c_proj.register_forward_pre_hook(silence)
                try:
                    effect[layer, head] = _logit_diff(model(tokens).logits, prompts).item() - clean
                    fixing = final_ln.register_forward_hook(fixed_scale_ln)
                    try:
                        effect_fixed_ln[layer, head] = _logit_diff(model(tokens).logits, prompts).item() - clean
                    finally:
                        fixing.remove()
                finally:
                    handle.remove()
    return HeadSurvey(
        attention_to_io=attention_to_io,
        attention_to_s1=attention_to_s1,
        attention_to_s2=attention_to_s2,
        direct_logit_attribution=dla,
        zero_ablation_effect=effect,
        zero_ablation_estimate=estimate,
        clean_logit_diff=clean,
        n_prompts=len(prompts),
        zero_ablation_effect_fixed_final_ln=effect_fixed_ln,
        attention_to_end=attention_to_end,
    )
