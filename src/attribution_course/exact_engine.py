"""The fast exact engine: patched variants of a GPT-2 run, recomputed only where they can change.

:func:`attribution_course.patching.exact_sweep` (the teaching API) uses it as its
``"prefix"`` engine. For a GPT-2-architecture TransformerBridge it reads the
bridge's own (processed) weights into plain tensors (:class:`GPT2Weights`),
runs the base prompts once functionally and keeps every layer's residual stream,
keys and values; each patched variant then starts at the patched layer and
position from that cache (causal attention: nothing earlier can change), and
its last block and unembedding run only at the positions the metric reads.

Memory. A pass stacks the variants that share a layer and a first position.
:meth:`PrefixRunner.rows_per_pass` sizes passes by what this engine allocates
(the recomputed positions' activations and the logits at the positions the
metric reads, never full-vocabulary logits at every position), and when not even
one variant of the whole batch fits, the batch is split into row chunks:
the work is chunked, never handed to a slower engine. The metric sees each
variant's logits in one reused ``[batch, pos, vocab]`` buffer
(:class:`VariantLogits`).

The engine checks itself against the bridge on the base run
(:func:`verified_prefix_runner`) and is used only when they agree.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .patching import Activations, Family, Tokens, _replace_components, _saver, get_family, hook_names

def _unwrap(module):
    """The Hugging Face module inside TransformerBridge's wrappers."""
    while hasattr(module, "original_component") and module.original_component is not None:
        module = module.original_component
    return module


@dataclass
class GPT2Weights:
    """The weights a GPT-2-architecture TransformerBridge runs, as plain tensors.

    They are read from the bridge itself (``W_Q``, ``W_in``, ``W_U``, ... and
    its LayerNorm modules), i.e. after the weight processing of compatibility
    mode (LayerNorm folding), so a functional forward over them computes what
    the bridge computes. Per layer: ``qkv_w`` ``[d_model, 3 * n_heads * d_head]``,
    ``out_w`` ``[n_heads * d_head, d_model]``, ``in_w`` ``[d_model, d_mlp]``,
    ``mlp_out_w`` ``[d_mlp, d_model]``.
    """

    token_embedding: torch.Tensor
    position_embedding: torch.Tensor
    blocks: list[dict[str, torch.Tensor]]
    final_norm: tuple[torch.Tensor | None, torch.Tensor | None]
    unembed: torch.Tensor
    unembed_bias: torch.Tensor | None
    eps: float
    n_heads: int

    @classmethod
    def from_bridge(cls, model) -> "GPT2Weights":
        cfg = model.cfg
        hf_config = getattr(_unwrap(getattr(model, "original_model", None)), "config", None)
        problems = {
            "model_type": (getattr(hf_config, "model_type", None), "gpt2"),
            "normalization_type": (cfg.normalization_type, "LN"),
            "positional_embedding_type": (cfg.positional_embedding_type, "standard"),
            "parallel_attn_mlp": (bool(cfg.parallel_attn_mlp), False),
            "attn_only": (bool(cfg.attn_only), False),
            "scale_attn_by_inverse_layer_idx": (bool(getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)), False),
            "reorder_and_upcast_attn": (bool(getattr(hf_config, "reorder_and_upcast_attn", False)), False),
        }
        for what, (found, wanted) in problems.items():
            if found != wanted:
                raise ValueError(f"the prefix engine needs {what}={wanted!r}, the model has {found!r}")
        if cfg.act_fn not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"the prefix engine needs the tanh GELU, the model uses {cfg.act_fn!r}")
        with torch.no_grad():
            heads_last = lambda w: w.permute(1, 0, 2).reshape(w.shape[1], -1)  # [head, d_model, d_head] -> [d_model, head*d_head]
            # each W_* property stacks every layer, so read each once
            W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O
            b_Q, b_K, b_V, b_O = model.b_Q, model.b_K, model.b_V, model.b_O
            W_in, b_in, W_out, b_out = model.W_in, model.b_in, model.W_out, model.b_out
            blocks = []
            for layer in range(cfg.n_layers):
                ln_1, ln_2 = _unwrap(model.blocks[layer].ln1), _unwrap(model.blocks[layer].ln2)
                blocks.append(
                    {
                        "ln_1_w": ln_1.weight, "ln_1_b": ln_1.bias,
                        "qkv_w": torch.cat([heads_last(W_Q[layer]), heads_last(W_K[layer]), heads_last(W_V[layer])], 1),
                        "qkv_b": torch.cat([b_Q[layer].flatten(), b_K[layer].flatten(), b_V[layer].flatten()]),
                        "out_w": W_O[layer].reshape(-1, cfg.d_model), "out_b": b_O[layer],
                        "ln_2_w": ln_2.weight, "ln_2_b": ln_2.bias,
                        "in_w": W_in[layer], "in_b": b_in[layer],
                        "mlp_out_w": W_out[layer], "mlp_out_b": b_out[layer],
                    }
                )
            ln_f = _unwrap(model.ln_final)
            return cls(
                token_embedding=model.W_E.detach(),
                position_embedding=model.W_pos.detach(),
                blocks=[{k: v.detach() if v is not None else None for k, v in b.items()} for b in blocks],
                final_norm=(ln_f.weight, ln_f.bias),
                unembed=model.W_U.detach(),
                unembed_bias=None if getattr(model, "b_U", None) is None else model.b_U.detach(),
                eps=cfg.eps,
                n_heads=cfg.n_heads,
            )


#: Where each family's hook sits in a block of the functional forward.
FUNCTIONAL_SITES = {
    "blocks.{layer}.hook_resid_pre": "resid_pre",
    "blocks.{layer}.attn.hook_pattern": "pattern",
    "blocks.{layer}.attn.hook_z": "z",
    "blocks.{layer}.hook_attn_out": "attn_out",
    "blocks.{layer}.hook_mlp_out": "mlp_out",
}


#: Sites whose replacement at one position leaves the rest of its own block's positions as they were.
POSITION_LOCAL_SITES = frozenset({"z", "attn_out", "mlp_out"})


class PrefixRunner:
    """Runs patched variants from the patched layer and position onwards.

    The base run is computed once (functionally) and its residual stream and
    keys/values are kept per layer; :meth:`run` then starts a stack of
    variants at ``layer`` with positions ``first..`` only, reading the base
    run's keys and values for earlier positions.
    """

    def __init__(self, model, base_tokens: Tokens, family: Family, replacements: Activations):
        self.weights = GPT2Weights.from_bridge(model)
        self.family = family
        self.replacements = replacements
        self.site = FUNCTIONAL_SITES[family.hook]
        # A head's output, an attention output or an MLP output replaced at position p changes the
        # patched block's residual stream at p alone (nothing inside the block reads it at other
        # positions), so the patched block needs rerunning only there.
        self.patch_is_position_local = self.site in POSITION_LOCAL_SITES and "pos" in family.component_axes
        self.batch, self.n_positions = base_tokens.shape
        self.base_resid: list[torch.Tensor] = []
        self.base_keys: list[torch.Tensor] = []
        self.base_values: list[torch.Tensor] = []
        self.base_qkv: list[torch.Tensor] = []  # per layer, [batch, pos, 3 * d_model]
        self.base_activations: Activations = {}
        self.base_logits = self._forward_base(base_tokens)

    # -- pieces of a GPT-2 block
    def _norm(self, x, weight, bias):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.weights.eps)

    def _heads(self, x):  # [rows, pos, d_model] -> [rows, head, pos, d_head]
        rows, pos, d_model = x.shape
        return x.view(rows, pos, self.weights.n_heads, d_model // self.weights.n_heads).transpose(1, 2)

    def _block(self, layer, resid, positions, keys_before, values_before, patch=None, queries=None, qkv_after_first=None):
        """One block on the residual stream at ``positions`` (absolute, contiguous up to the end).

        ``keys_before``/``values_before`` (``[rows, head, first, d_head]``) hold earlier
        positions' keys and values, the base run's: ``resid`` may stack several variants
        of those rows (variant-major), which all read the one copy (broadcast, not repeated).
        ``queries`` (indices into ``positions``) limits what the block outputs to
        those positions (their keys and values are still computed for all).
        ``patch(site, act, positions_of_act)`` may replace an activation.
        ``qkv_after_first`` (``[rows, len(positions) - 1, 3 * d_model]``), when only the
        first position's residual stream differs from the base run, is the base run's
        queries, keys and values at the others, so they are not recomputed.
        """
        w = self.weights.blocks[layer]
        if patch is not None:
            resid = patch("resid_pre", resid, positions)
        recomputed = resid if qkv_after_first is None else resid[:, :1]
        qkv = torch.addmm(w["qkv_b"], self._norm(recomputed, w["ln_1_w"], w["ln_1_b"]).flatten(0, 1), w["qkv_w"])
        qkv = qkv.view(recomputed.shape[0], recomputed.shape[1], -1)
        if qkv_after_first is not None:
            qkv = torch.cat([qkv, qkv_after_first], dim=1)
        q, k, v = qkv.split(resid.shape[-1], dim=-1)
        out_positions = positions
        if queries is not None:
            q, resid, out_positions = q[:, queries], resid[:, queries], positions[queries]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = q @ k.transpose(-1, -2)
        n_before = 0
        if keys_before is not None:
            n_before = keys_before.shape[2]
            by_variant = lambda t: t.view(-1, keys_before.shape[0], *t.shape[1:])  # noqa: E731  [variant, rows, ...]
            scores = torch.cat([(by_variant(q) @ keys_before.transpose(-1, -2)).flatten(0, 1), scores], dim=-1)
        scores = scores / math.sqrt(q.shape[-1])
        key_positions = torch.arange(scores.shape[-1])
        scores = scores.masked_fill(key_positions.unsqueeze(0) > out_positions.unsqueeze(1), float("-inf"))
        pattern = scores.softmax(-1)
        if patch is not None:
            pattern = patch("pattern", pattern, out_positions)
        z = pattern[..., n_before:] @ v
        if keys_before is not None:
            z = z + (by_variant(pattern[..., :n_before]) @ values_before).flatten(0, 1)
        z = z.transpose(1, 2)  # [rows, pos, head, d_head]
        if patch is not None:
            z = patch("z", z, out_positions)
        attn_out = torch.addmm(w["out_b"], z.flatten(2).flatten(0, 1), w["out_w"]).view_as(resid)
        if patch is not None:
            attn_out = patch("attn_out", attn_out, out_positions)
        resid_mid = resid + attn_out
        hidden = torch.addmm(w["in_b"], self._norm(resid_mid, w["ln_2_w"], w["ln_2_b"]).flatten(0, 1), w["in_w"])
        hidden = torch.nn.functional.gelu(hidden, approximate="tanh")
        mlp_out = torch.addmm(w["mlp_out_b"], hidden, w["mlp_out_w"]).view_as(resid)
        if patch is not None:
            mlp_out = patch("mlp_out", mlp_out, out_positions)
        sites = {"resid_pre": resid, "pattern": pattern, "z": z, "attn_out": attn_out, "mlp_out": mlp_out, "qkv": qkv}
        return resid_mid + mlp_out, k, v, sites

    def _unembed(self, resid):
        normed = self._norm(resid, *self.weights.final_norm)
        logits = normed @ self.weights.unembed
        return logits if self.weights.unembed_bias is None else logits + self.weights.unembed_bias

    def _forward_base(self, tokens):
        positions = torch.arange(tokens.shape[1])
        resid = self.weights.token_embedding[tokens] + self.weights.position_embedding[positions]
        for layer in range(len(self.weights.blocks)):
            self.base_resid.append(resid)
            resid, k, v, sites = self._block(layer, resid, positions, None, None)
            self.base_keys.append(k)
            self.base_values.append(v)
            self.base_qkv.append(sites["qkv"])
            self.base_activations[self.family.hook_name(layer)] = sites[self.site]
        return self._unembed(resid)

    def _keys_values_before(self, layer: int, rows: slice, first: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The base run's keys and values at positions before ``first`` (``None`` when there are none)."""
        if not first:
            return None, None
        return self.base_keys[layer][rows, :, :first], self.base_values[layer][rows, :, :first]

    @staticmethod
    def recomputed_read_positions(first: int, n_positions: int, read_positions: Sequence[int] | None) -> list[int]:
        """The positions ``first..`` whose logits a variant starting at ``first`` must compute."""
        if read_positions is None:
            return list(range(first, n_positions))
        return sorted(t for t in set(read_positions) if first <= t < n_positions)

    def floats_per_row(self, first: int, read_positions: Sequence[int] | None) -> int:
        """A generous count of the float32 values alive at once per prompt-row of a pass from ``first``.

        Per recomputed position: the residual stream, its norm, queries/keys/values,
        the attention output and MLP output (about 12 ``d_model``), the MLP hidden
        layer before and after the GELU (2 ``d_mlp``) and the scores, masked scores and
        pattern (3 ``n_heads * n_positions``); per position overall, the keys and
        values (4 ``d_model``, the base run's copy and the concatenation); per position
        whose logits the metric reads, the logits and their bias-added copy
        (2 ``d_vocab``). No full-vocabulary logits at unread positions.
        """
        d_model = self.weights.token_embedding.shape[1]
        d_mlp = self.weights.blocks[0]["in_w"].shape[1]
        d_vocab = self.weights.unembed.shape[1]
        recomputed = self.n_positions - first
        n_read = len(self.recomputed_read_positions(first, self.n_positions, read_positions))
        per_position = 12 * d_model + 2 * d_mlp + 3 * self.weights.n_heads * self.n_positions
        return recomputed * per_position + 4 * self.n_positions * d_model + 2 * n_read * d_vocab

    def rows_per_pass(self, first: int, read_positions: Sequence[int] | None, memory_budget_bytes: int) -> int:
        """How many prompt-rows (variants x prompts) one pass from ``first`` may hold (at least 1)."""
        return max(1, memory_budget_bytes // (4 * self.floats_per_row(first, read_positions)))

    def run(
        self,
        layer: int,
        first: int,
        components: torch.Tensor,
        read_positions: Sequence[int] | None = None,
        rows: slice = slice(None),
    ) -> tuple[list[int], torch.Tensor]:
        """Logits of the variants patched at ``layer``, only where they can differ from the base run.

        ``components`` is ``[n_variants, len(component_axes)]``; ``rows`` picks the
        prompts to run (default: all). Only positions ``first..`` are recomputed
        (earlier ones are the base run's, exactly), and with ``read_positions``
        (the positions the metric reads) the last block and the unembedding run
        only at those. Returns ``(positions, logits)``: the absolute positions
        computed (:meth:`recomputed_read_positions`) and their logits,
        ``[n_variants * n_rows, len(positions), vocab]``, variant-major.
        """
        n_variants = components.shape[0]
        n_layers = len(self.weights.blocks)
        computed = self.recomputed_read_positions(first, self.n_positions, read_positions)
        n_rows = self.base_resid[layer][rows].shape[0]
        if not computed:  # nothing the metric reads can change
            return computed, self.base_logits.new_empty((n_variants * n_rows, 0, self.base_logits.shape[-1]))
        repeat = lambda t: t.repeat(n_variants, *([1] * (t.ndim - 1)))  # noqa: E731
        source = self.replacements[self.family.hook_name(layer)][rows]

        def patch(site, act, positions):
            return _replace_components(act, source, self.family, components, positions) if site == self.site else act

        positions = torch.arange(first, self.n_positions)
        start = layer
        if self.patch_is_position_local:
            # the patched block at position `first` only (its keys and values before it are the base run's)
            patched, _, _, _ = self._block(
                layer, repeat(self.base_resid[layer][rows, first : first + 1]), positions[:1], *self._keys_values_before(layer, rows, first), patch=patch
            )
            if layer == n_layers - 1:
                # only position `first` changed: every other position's logits are the base run's
                logits = repeat(self.base_logits[rows][:, computed])
                if computed[0] == first:
                    logits[:, 0] = self._unembed(patched)[:, 0]
                return computed, logits
            resid = torch.cat([patched, repeat(self.base_resid[layer + 1][rows, first + 1 :])], dim=1)
            start = layer + 1
        else:
            resid = repeat(self.base_resid[layer][rows, first:])
        queries = None
        for current in range(start, n_layers):
            before = self._keys_values_before(current, rows, first)
            if current == n_layers - 1 and read_positions is not None:
                queries = torch.tensor(computed, dtype=torch.long) - first
            # the block after a position-local patch: only position `first` enters it changed
            qkv_after_first = repeat(self.base_qkv[current][rows, first + 1 :]) if current == start and start > layer else None
            resid, _, _, _ = self._block(
                current, resid, positions, *before, patch=patch if current == layer else None, queries=queries, qkv_after_first=qkv_after_first
            )
        return computed, self._unembed(resid)


class VariantLogits:
    """One reused ``[batch, pos, vocab]`` buffer that shows the metric one variant's logits at a time.

    It holds the base run's logits at the positions the metric reads and NaN
    everywhere else, so a metric that reads an unread position gives NaN (which
    :func:`~attribution_course.patching.exact_sweep` reports). Each variant's
    recomputed logits are written over it after :meth:`reset` has put back what
    the previous variant overwrote: one buffer the size of the base logits
    however many variants a sweep has.
    """

    def __init__(self, base_logits: torch.Tensor, read_positions: Sequence[int] | None):
        self.base_logits = base_logits
        self.buffer = base_logits.clone()
        if read_positions is not None:
            unread = sorted(set(range(base_logits.shape[1])) - set(read_positions))
            self.buffer[:, unread] = float("nan")
        self.overwritten: set[int] = set()

    def reset(self) -> None:
        """Back to the base run's logits (at the read positions)."""
        if self.overwritten:
            restored = sorted(self.overwritten)
            self.buffer[:, restored] = self.base_logits[:, restored]
            self.overwritten.clear()

    def write(self, rows: slice, positions: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Write ``logits`` ``[n_rows, len(positions), vocab]`` at ``rows`` and ``positions``; return the buffer."""
        if positions:
            self.buffer[rows, positions] = logits
            self.overwritten.update(positions)
        return self.buffer


def variant_logits(
    runner: PrefixRunner,
    shown: VariantLogits,
    layer: int,
    first: int,
    components: torch.Tensor,
    read_positions: Sequence[int] | None,
    rows_per_pass: int,
) -> Iterator[torch.Tensor]:
    """For each row of ``components`` in turn, the ``[batch, pos, vocab]`` logits the metric should see.

    With ``rows_per_pass >= batch`` all variants run in one stacked pass; otherwise
    each variant runs alone, its prompts split into chunks of ``rows_per_pass``
    rows, so a pass never holds more than ``rows_per_pass`` prompt-rows. The
    yielded tensor is ``shown``'s buffer, valid until the next one is yielded.
    """
    batch = runner.batch
    if rows_per_pass >= batch:
        positions, logits = runner.run(layer, first, components, read_positions)
        for k in range(components.shape[0]):
            shown.reset()
            yield shown.write(slice(None), positions, logits[k * batch : (k + 1) * batch])
        return
    for k in range(components.shape[0]):
        shown.reset()
        for start in range(0, batch, rows_per_pass):
            rows = slice(start, min(start + rows_per_pass, batch))
            positions, logits = runner.run(layer, first, components[k : k + 1], read_positions, rows=rows)
            shown.write(rows, positions, logits)
        yield shown.buffer


@contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` torch threads, then restore the count it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def over_threads(work: Callable[[list], list], passes: list, threads: int) -> list:
    """``work(share)`` for ``threads`` interleaved shares of ``passes``, concatenated.

    With more than one thread each share runs in its own Python thread with one torch
    thread (PyTorch releases the GIL inside its kernels, so the shares' arithmetic runs
    in parallel; interleaving balances early-layer passes, which cost more, across
    shares). The torch thread count is restored afterwards.
    """
    if threads <= 1 or len(passes) < 2:
        return work(passes)
    shares = [passes[i::threads] for i in range(threads)]

    def one_torch_thread(share):
        torch.set_num_threads(1)  # per worker: OpenMP keeps the thread count per calling thread
        return work(share)

    with torch_threads(1), ThreadPoolExecutor(max_workers=threads) as pool:
        return [item for part in pool.map(one_torch_thread, shares) for item in part]


#: How closely the functional forward must reproduce the bridge before it is trusted.
FUNCTIONAL_TOLERANCE = 1e-4


def functional_engine_problem(model, base_tokens: Tokens, family: str | Family, replacements: Activations | None = None) -> str | None:
    """Why the prefix engine cannot run ``family`` on ``model``, or ``None`` if it can.

    Besides the architecture checks, it runs the base prompts through the bridge
    and the functional forward and compares the logits and the family's hook
    activations (max abs difference at most :data:`FUNCTIONAL_TOLERANCE`).
    """
    return verified_prefix_runner(model, base_tokens, get_family(family), replacements or {})[1]


def verified_prefix_runner(model, base_tokens: Tokens, fam: Family, replacements: Activations) -> tuple[PrefixRunner | None, str | None]:
    """A prefix runner for the base run and ``None``, or ``None`` and the reason it cannot be trusted."""
    if fam.hook not in FUNCTIONAL_SITES:
        return None, f"hook {fam.hook} has no place in the functional forward"
    try:
        with torch.no_grad():
            runner = PrefixRunner(model, base_tokens, fam, replacements)
    except (ValueError, AttributeError, TypeError) as err:
        return None, str(err)
    names = hook_names(model, fam)
    bridge_activations: Activations = {}
    with torch.no_grad():
        bridge_logits = model.run_with_hooks(base_tokens, fwd_hooks=[(n, _saver(bridge_activations, n)) for n in names])
    if bridge_logits.shape != runner.base_logits.shape:
        return None, f"logits shape {tuple(runner.base_logits.shape)} != bridge {tuple(bridge_logits.shape)}"
    worst = (bridge_logits - runner.base_logits).abs().max().item()
    for name in names:
        ours, theirs = runner.base_activations[name], bridge_activations[name]
        if ours.shape != theirs.shape:
            return None, f"{name}: shape {tuple(ours.shape)} != bridge {tuple(theirs.shape)}"
        worst = max(worst, (ours - theirs).abs().max().item())
    if not worst <= FUNCTIONAL_TOLERANCE:
        return None, f"functional forward differs from the bridge by {worst:.2e} (> {FUNCTIONAL_TOLERANCE})"
    return runner, None
