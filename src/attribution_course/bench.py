"""Benchmark: exact patching and attribution patching, ours vs TransformerLens, vs the cost floor.

Run ``python -m attribution_course.bench`` (or ``make bench``). Everything runs
in one process on the same model, prompts and components; every time is the
median of ``--repeats`` runs (default 5) after one warm-up run, wall time and
process CPU time both recorded, with each call's peak memory growth
(:class:`PeakMemory`), and methods that are compared run round-robin
(:func:`time_interleaved`) so load changes hit them alike. It writes
``bench-output/bench.json`` and ``bench-output/bench.md`` (and, with
``--markdown PATH`` / ``--json PATH``, copies there: the committed run is
``docs/performance.md`` and ``docs/performance.json``, written by
``make bench BENCH_ARGS="--markdown docs/performance.md --json docs/performance.json"``).

What is timed (the headline sweep: every attention head at every position,
``head_pos``, clean/corrupt patching in the denoising direction, because that is
the direction both TransformerLens tools implement):

* ``floor_bare``: the cost floor on the bare ``transformers`` model (no
  TransformerLens): forward on the clean prompts (no grad), forward on the
  corrupted prompts with parameters frozen and one backward from the metric to the
  embedding output (:func:`bare_floor_run`).
* ``floor_frozen``: the bridge floor: TransformerBridge forward on the clean prompts
  (no grad), forward on the corrupted prompts with autograd recording from the
  embedding output only (parameters frozen) and one backward; no TransformerLens
  hooks (one plain ``torch`` forward hook on the embedding module marks its output
  as requiring grad).
* ``floor_full``: the same with the parameters left trainable, so the backward
  also computes every weight gradient (what a bare ``loss.backward()`` does).
* ``attribution_ours``: :func:`patching.attribution_sweeps` for ``head_pos``.
* ``attribution_ours_all_families``: the same call for every family at once.
* ``exact_ours``: :func:`patching.replacement_activations` + :func:`patching.exact_sweep`
  (engine ``"prefix"``, the default for GPT-2 models).
* ``exact_ours_stacked``: the same with the bridge forward and stacked variants.
* ``exact_ours_loop``: one bridge forward per component (``variants_per_pass=1``).
* ``exact_peer_transformers``: the strongest exact peer found, plain ``transformers``
  with PyTorch hooks, each variant started at the patched layer from the cached
  residual and unembedded only where the metric reads (:func:`peer_exact_head_pos`).
* ``exact_transformer_lens``: ``run_with_cache`` + ``transformer_lens.patching.
  get_act_patch_attn_head_out_by_pos``, called inside ``torch.no_grad()``.
* ``attribution_transformer_lens``: ``transformer_lens.tools.analysis.
  attribution_patching.attribution_patch`` (node granularity), once per prompt pair
  (see "sign and scale conventions" below for why per pair).

JSON schema (``schema_version`` 1); every time is in seconds::

    {
      "schema_version": 1,
      "command": str,                       # how this run was started
      "started_at": str, "duration_s": float,
      "machine": {"platform", "python", "torch", "transformer_lens", "cpu_count",
                  "affinity_cores", "torch_threads", "load_average_before": [3 floats],
                  "load_average_after": [3 floats]},
      "model": {"path": str, "n_layers", "n_heads", "d_model", "d_vocab", "n_params"},
      "setup": {"n_prompts", "n_positions", "seed", "family", "direction", "kind",
                "n_components", "repeats", "slow_repeats", "warmup"},
      "timings": {name: {"median_s", "min_s", "max_s", "runs_s": [float],
                         "cpu_median_s", "cpu_min_s", "cpu_max_s", "cpu_runs_s": [float],
                         "peak_growth_mb": float | null,
                         "available": bool, "reason": str | null}},
      "ratios": {"attribution_over_floor_bare", "floor_bridge_over_floor_bare", "peer_over_exact_ours",
                 "attribution_over_floor_frozen", "attribution_over_floor_full",
                 "attribution_all_families_over_floor_frozen",
                 "exact_ours_over_transformer_lens", "transformer_lens_over_exact_ours",
                 "exact_over_attribution", "loop_over_exact_ours"},
      "agreement": {"exact_ours_vs_transformer_lens_max_abs", "exact_ours_vs_loop_max_abs",
                    "attribution_ours_vs_transformer_lens_head_pos_max_abs",
                    "attribution_ours_vs_transformer_lens_mlp_pos_max_abs", "exact_stacked_vs_loop_max_abs",
                    "exact_loop_vs_transformer_lens_max_abs", "exact_ours_vs_peer_transformers_max_abs"},
      "scale": {"exact_head_pos_max_abs", "attribution_head_pos_max_abs"},
      "families": [{"family", "components", "exact_ours_s", "exact_transformer_lens_s",
                    "transformer_lens_function", "speedup", "max_abs_diff", "attribution_ours_s"}],
      "scaling": {"prompts": [{"n_prompts", "exact_ours_s", "exact_transformer_lens_s",
                               "attribution_ours_s", "floor_frozen_s", "floor_bare_s",
                               "exact_peer_transformers_s", and "*_cpu_s" for ours, the
                               peer, attribution and the bare floor}],
                  "positions": [{"n_positions_swept", "n_components", "exact_ours_s",
                                 "exact_ours_loop_s", "attribution_ours_s"}]},
      "sizes": [{"label", "varies": "prompts" | "positions" | "model" | "threads", "model", "n_prompts",
                 "n_positions", "n_components", "threads", "repeats",
                 "timings": {method: timing as above} for exact_ours, exact_peer_transformers,
                            attribution_ours, floor_bare, floor_bridge (and exact_transformer_lens),
                 "flops": {"exact_ours", "exact_peer_transformers"}, "gflops_per_s": {same keys},
                 "peer_over_exact_ours", "peer_flops_over_ours", "attribution_over_floor_bare",
                 "floor_bridge_over_floor_bare", "exact_largest_effect",
                 "exact_ours_vs_peer_relative", "exact_ours_vs_transformer_lens_relative"}],
      "matmul_gflops": {threads: float},    # float32 1024 x 1024 matrix multiply, same run
      "peak_memory_fresh_process_mb": {method: {"peak_growth_mb": float | null, "reason": str | null}},
      "peak_rss_mb": float,                 # whole process, so an upper bound for every run
      "targets": [{"name", "value", "limit", "met": bool}]
    }

Beyond the headline, ``sizes`` times the exact sweep, the strongest peer, attribution and both
floors in the same rounds at every size: 8-256 prompts, longer sequences, a GPT-2-small-sized
model with random weights (built in the run, no download), and one and two torch threads; and
``peak_memory_fresh_process_mb`` runs each method once in a new process
(``--peak-memory-of METHOD``) for its peak memory.

Read it back with :func:`load_results`; :func:`scaling_figure` draws the scaling
plot the cost chapter shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .exact_engine import torch_threads

SCHEMA_VERSION = 1
DEFAULT_OUTPUT_DIR = Path("bench-output")
#: The committed copy of one real run (written with ``--markdown``/``--json``), which the book plots.
COMMITTED_MARKDOWN = Path(__file__).resolve().parents[2] / "docs" / "performance.md"
COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "performance.json"

#: Exact-sweep families with their transformer_lens.patching counterpart and how
#: to turn its result ([layer, ...] in its axis order) into ours.
TL_EXACT = {
    "head": ("get_act_patch_attn_head_out_all_pos", lambda t: t),
    "head_pos": ("get_act_patch_attn_head_out_by_pos", lambda t: t.permute(0, 2, 1)),  # [layer, pos, head] -> [layer, head, pos]
    "pattern": ("get_act_patch_attn_head_pattern_all_pos", lambda t: t),
    "resid_pos": ("get_act_patch_resid_pre", lambda t: t),
    "mlp_pos": ("get_act_patch_mlp_out", lambda t: t),
    "attn_pos": ("get_act_patch_attn_out", lambda t: t),
    "mlp": (None, None),
}

# ---------------------------------------------------------------- timing


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Wall time, process CPU time and peak memory of each call over ``repeats`` runs after ``warmup`` runs.

    The calls run round-robin: each round runs every call once, so a change in machine load during the
    benchmark (other processes on a shared machine) hits all of them alike. Wall time shows what a
    reader waits; process CPU time (every thread of this process) is steadier when other processes
    compete for the cores. Peak memory is the growth of this process's peak resident set over its
    resident set when the call starts (:class:`PeakMemory`), the largest over the runs.
    A call that raises is reported unavailable, with the reason. Returns
    ``(timings, last return values)``.
    """
    runs: dict[str, list[float]] = {name: [] for name in calls}
    cpu_runs: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, list[float]] = {name: [] for name in calls}
    values: dict[str, object] = {}
    failed: dict[str, str] = {}
    memory = PeakMemory()
    for round_index in range(warmup + repeats):
        for name, fn in calls.items():
            if name in failed:
                continue
            memory.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                values[name] = fn()
            except Exception as err:  # report, do not fake
                failed[name] = f"{type(err).__name__}: {err}"
                continue
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            peak = memory.growth_mb()
            if round_index >= warmup:
                runs[name].append(wall)
                cpu_runs[name].append(cpu)
                if peak is not None:
                    peaks[name].append(peak)
    timings = {}
    for name in calls:
        if name in failed:
            timings[name] = unavailable(failed[name])
        else:
            r, c = runs[name], cpu_runs[name]
            timings[name] = {
                "median_s": statistics.median(r), "min_s": min(r), "max_s": max(r), "runs_s": r,
                "cpu_median_s": statistics.median(c), "cpu_min_s": min(c), "cpu_max_s": max(c), "cpu_runs_s": c,
                "peak_growth_mb": max(peaks[name]) if peaks[name] else None,
                "available": True, "reason": None,
            }
    return timings, values


class PeakMemory:
    """Peak resident-set growth of this process during one call (Linux; ``None`` elsewhere).

    :meth:`start` resets the kernel's high-water mark (``VmHWM``, by writing ``5`` to
    ``/proc/self/clear_refs``) and notes the resident set; :meth:`growth_mb` is the
    high-water mark's rise above it. Memory the allocator kept from earlier calls and
    reuses is not counted again, so this is what the call adds to the process at its
    peak, not whole-process RSS.
    """

    def __init__(self):
        self.start_kb: int | None = None

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.start_kb = None
            return
        self.start_kb = self._status_kb("VmRSS")

    def growth_mb(self) -> float | None:
        peak = self._status_kb("VmHWM")
        if self.start_kb is None or peak is None:
            return None
        return max(0, peak - self.start_kb) / 1024


def unavailable(reason: str) -> dict:
    return {
        "median_s": None, "min_s": None, "max_s": None, "runs_s": [],
        "cpu_median_s": None, "cpu_min_s": None, "cpu_max_s": None, "cpu_runs_s": [],
        "peak_growth_mb": None, "available": False, "reason": reason,
    }


def logit_diff_at_read(final_logits, correct, wrong):
    """The course metric (:func:`metrics.logit_diff`) from the logits at the read position only, ``[batch, vocab]``:
    the mean over the batch of ``logit(correct) - logit(wrong)`` (for IOI, ``prompts.io_token``, ``prompts.s_token``)."""
    rows = torch.arange(final_logits.shape[0])
    return (final_logits[rows, correct] - final_logits[rows, wrong]).mean()



def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the operations timed


def floor_run(model, clean_tokens, corrupted_tokens, metric, *, frozen: bool) -> None:
    """The cost floor: clean forward, corrupted forward with autograd, one backward; no lens hooks."""
    from .patching import parameters_frozen

    with torch.no_grad():
        model(clean_tokens)
    if frozen:
        handle = model.embed.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
        try:
            with parameters_frozen(model), torch.enable_grad():
                metric(model(corrupted_tokens)).backward()
        finally:
            handle.remove()
    else:
        with torch.enable_grad():
            metric(model(corrupted_tokens)).backward()
        model.zero_grad(set_to_none=True)


def tl_exact(model, base_tokens, source_tokens, metric, family: str):
    """``transformer_lens.patching``'s sweep for ``family``, as M(patched) in its own axis order."""
    from transformer_lens import patching as tl_patching

    function_name, _ = TL_EXACT[family]
    draw_progress = tl_patching.tqdm
    tl_patching.tqdm = lambda iterable, **kwargs: iterable  # its per-sweep progress bar would flood the log
    try:
        with torch.no_grad():
            _, source_cache = model.run_with_cache(source_tokens)
            return getattr(tl_patching, function_name)(model, base_tokens, source_cache, metric)
    finally:
        tl_patching.tqdm = draw_progress


def bare_model(model_path):
    """The plain ``transformers`` model behind the bridge (no TransformerLens), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_path)).eval()


def bare_floor_run(bare, clean_tokens, corrupted_tokens, metric) -> None:
    """The floor on the bare ``transformers`` model: clean forward, corrupted forward with autograd, one backward.

    Parameters frozen; autograd records from the embedding output only (a plain ``torch``
    forward hook marks it), like :func:`floor_run` on the bridge.
    """
    from .patching import parameters_frozen

    with torch.no_grad():
        bare(clean_tokens)
    handle = bare.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    try:
        with parameters_frozen(bare), torch.enable_grad():
            metric(bare(corrupted_tokens).logits).backward()
    finally:
        handle.remove()


def peer_exact_head_pos(bare, base_tokens, source_tokens, read_position: int, metric_at_read) -> torch.Tensor:
    """The strongest exact peer found: plain ``transformers`` with PyTorch hooks, ``M(patched) - M(base)``.

    One cached forward per run: each head's output (``z``, the input of ``attn.c_proj``)
    on the source prompts, and the residual stream entering every block on the base
    prompts. Each variant then starts at the patched layer from the cached residual,
    a forward pre-hook on that layer's ``attn.c_proj`` overwrites one head at one
    position, and only the position the metric reads is normalised and unembedded
    (``metric_at_read`` takes ``[batch, vocab]`` logits there). Returns ``[layer, head, pos]``.
    """
    transformer = bare.transformer
    blocks = transformer.h
    n_heads = bare.config.n_head
    d_head = bare.config.n_embd // n_heads
    n_positions = base_tokens.shape[1]
    causal = torch.full((n_positions, n_positions), float("-inf")).triu(1)[None, None]
    source_z: dict[int, torch.Tensor] = {}
    handles = [
        block.attn.c_proj.register_forward_pre_hook(lambda module, args, layer=layer: source_z.__setitem__(layer, args[0].detach()))
        for layer, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            bare(source_tokens)
    finally:
        for handle in handles:
            handle.remove()

    def unembed_read(hidden):
        return bare.lm_head(transformer.ln_f(hidden[:, read_position]))

    effects = torch.zeros(len(blocks), n_heads, n_positions)
    with torch.no_grad():
        base_run = bare(base_tokens, output_hidden_states=True)
        entering = base_run.hidden_states[: len(blocks)]  # the residual stream entering each block
        base_value = metric_at_read(base_run.logits[:, read_position]).item()
        for layer in range(len(blocks)):
            for head in range(n_heads):
                columns = slice(head * d_head, (head + 1) * d_head)
                for position in range(n_positions):

                    def overwrite(module, args, layer=layer, columns=columns, position=position):
                        z = args[0].clone()
                        z[:, position, columns] = source_z[layer][:, position, columns]
                        return (z,)

                    handle = blocks[layer].attn.c_proj.register_forward_pre_hook(overwrite)
                    try:
                        hidden = entering[layer]
                        for block in blocks[layer:]:
                            hidden = block(hidden, attention_mask=causal)
                    finally:
                        handle.remove()
                    effects[layer, head, position] = metric_at_read(unembed_read(hidden)).item() - base_value
    return effects


def tl_attribution(model, prompts, metric_for):
    """TransformerLens node attribution, one call per prompt pair, averaged (see module docstring).

    Returns ``{"head_pos": [layer, head, pos], "mlp_pos": [layer, pos]}``.
    """
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    n_layers, n_heads, n_positions = model.cfg.n_layers, model.cfg.n_heads, prompts.clean_tokens.shape[1]
    heads = torch.zeros(n_layers, n_heads, n_positions)
    mlps = torch.zeros(n_layers, n_positions)
    for i in range(len(prompts)):
        pair = prompts.subset([i])
        result = attribution_patch(model, pair.clean_tokens, pair.corrupted_tokens, metric_for(pair))
        for node, score in result.node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head, node.position] += score
            elif node.kind == "mlp_out":
                mlps[node.layer, node.position] += score
    return {"head_pos": heads / len(prompts), "mlp_pos": mlps / len(prompts)}


# ---------------------------------------------------------------- sizes: every method at one size, in the same rounds


@dataclass
class SweepTask:
    """What one size of the benchmark sweeps: base and source prompts and a logit difference read at one position.

    ``base``/``source`` are ``[batch, pos]``; the metric is the mean over the batch of
    ``logit(correct) - logit(wrong)`` at ``read_position`` (for IOI prompts, exactly
    :func:`metrics.logit_diff`).
    """

    label: str
    base: torch.Tensor
    source: torch.Tensor
    read_position: int
    correct: torch.Tensor  # [batch]
    wrong: torch.Tensor  # [batch]
    prompts: object = None  # the IOI prompts it was made from (TransformerLens's attribution takes them pair by pair)

    def metric_at_read(self, final_logits: torch.Tensor) -> torch.Tensor:
        """The metric from the logits at the read position only, ``[batch, vocab]``."""
        return logit_diff_at_read(final_logits, self.correct, self.wrong)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric from ``[batch, pos, vocab]`` logits."""
        return self.metric_at_read(logits[:, self.read_position])


def ioi_task(model, n_prompts: int, seed: int, *, extra_positions: int = 0) -> SweepTask:
    """IOI prompts (denoising: base = corrupted, source = clean), optionally lengthened.

    ``extra_positions`` > 0 puts the same seeded random tokens before every prompt, base and
    source alike, so the sequence is longer and the metric still reads the IOI answer.
    """
    from . import patching
    from .prompts import make_ioi_prompts

    prompts = make_ioi_prompts(model, n_prompts, seed=seed)
    base, source = patching.base_and_source(prompts.clean_tokens, prompts.corrupted_tokens, "denoising")
    if extra_positions:
        generator = torch.Generator().manual_seed(seed)
        filler = torch.randint(1, model.cfg.d_vocab, (1, extra_positions), generator=generator).expand(len(prompts), -1)
        base, source = torch.cat([filler, base], 1), torch.cat([filler, source], 1)
    return SweepTask(f"IOI, {n_prompts} prompts x {base.shape[1]} positions", base, source,
                     prompts.end_position + extra_positions, prompts.io_token, prompts.s_token, prompts)


def random_task(model, n_prompts: int, n_positions: int, seed: int) -> SweepTask:
    """Random tokens with one token changed at position 1 (for a model with no IOI ability, e.g. random weights)."""
    from . import patching

    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, model.cfg.d_vocab, (n_prompts, n_positions), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(2, model.cfg.d_vocab, (n_prompts,), generator=generator)
    answers = torch.randint(2, model.cfg.d_vocab, (2, n_prompts), generator=generator)
    base, source = patching.base_and_source(clean, corrupted, "denoising")
    return SweepTask(f"random tokens, {n_prompts} prompts x {n_positions} positions", base, source, n_positions - 1, answers[0], answers[1])


def exact_ours_for(model, task: SweepTask, *, family: str = "head_pos", engine: str = "auto", positions=None):
    """Our exact sweep as a user calls it: the replacements, then :func:`patching.exact_sweep` (engine ``"auto"``)."""
    from . import patching

    replacements = patching.replacement_activations(model, family, kind="patch", base_tokens=task.base, source_tokens=task.source)
    return patching.exact_sweep(model, task.base, task.metric, replacements, family, engine=engine, positions=positions)


def attribution_ours_for(model, task: SweepTask, families=("head_pos",)):
    """Our attribution as a user calls it: :func:`patching.attribution_sweeps` (the bare twin where it applies)."""
    from . import patching

    return patching.attribution_sweeps(model, task.base, task.metric, list(families), kind="patch", source_tokens=task.source)


def size_methods(model, bare, task: SweepTask, *, with_transformer_lens: bool = False) -> dict[str, Callable[[], object]]:
    """The methods every size times, in one round-robin: our exact sweep, the strongest exact peer,
    our attribution, the bare floor and the bridge floor (and TransformerLens's exact sweep when asked)."""
    calls = {
        "exact_ours": lambda: exact_ours_for(model, task),
        "exact_peer_transformers": lambda: peer_exact_head_pos(bare, task.base, task.source, task.read_position, task.metric_at_read),
        "attribution_ours": lambda: attribution_ours_for(model, task),
        "floor_bare": lambda: bare_floor_run(bare, task.source, task.base, task.metric),
        "floor_bridge": lambda: floor_run(model, task.source, task.base, task.metric, frozen=True),
    }
    if with_transformer_lens:
        calls["exact_transformer_lens"] = lambda: tl_exact(model, task.base, task.source, task.metric, "head_pos")
    return calls


def matmul_flops(call: Callable[[], object]) -> int:
    """The floating-point operations of one call, counted by ``torch.utils.flop_counter`` (matrix multiplies,
    attention products and convolutions: what dominates a transformer; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def matmul_gflops(repeats: int = 5, size: int = 1024) -> float:
    """This machine's float32 matrix-multiply speed at the current torch thread count, GFLOP/s (median)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def measure_size(model, bare, task: SweepTask, repeats: int, *, model_label: str, varies: str, with_transformer_lens: bool = False,
                 warmup: int = 1) -> dict:
    """Every size method timed in the same rounds, their FLOPs, agreement and ratios: one row of ``results["sizes"]``."""
    calls = size_methods(model, bare, task, with_transformer_lens=with_transformer_lens)
    if warmup:
        timings, values = time_interleaved(calls, repeats, warmup=warmup)
    else:
        # exact sweeps too long to warm up: the fast methods (attribution, floors) still get their
        # warm-up, in rounds of their own, or their first run would carry one-off start-up costs
        slow = {name: call for name, call in calls.items() if name.startswith("exact_")}
        timings, values = time_interleaved(slow, repeats, warmup=0)
        fast_timings, fast_values = time_interleaved({n: c for n, c in calls.items() if n not in slow}, max(repeats, 5))
        timings.update(fast_timings)
        values.update(fast_values)
    for name in ("exact_ours", "attribution_ours"):
        if not timings[name]["available"]:
            raise RuntimeError(f"our own {name} failed on {task.label}: {timings[name]['reason']}")
    # counted on one thread: the count does not depend on threads, and FlopCounterMode sees only
    # the thread it was entered in (the exact sweep's passes run in worker threads when given two)
    with torch_threads(1):
        flops = {name: matmul_flops(calls[name]) for name in ("exact_ours", "exact_peer_transformers")}
    median = lambda name: timings[name]["median_s"] if timings[name]["available"] else None  # noqa: E731
    ratio = lambda a, b: None if median(a) is None or median(b) is None else median(a) / median(b)  # noqa: E731
    ours = values["exact_ours"]
    scale = ours.abs().max().item()
    row = {
        "label": task.label,
        "varies": varies,  # "prompts", "positions", "model" or "threads": which scaling this row belongs to
        "model": model_label,
        "n_prompts": int(task.base.shape[0]),
        "n_positions": int(task.base.shape[1]),
        "n_components": int(ours.numel()),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,  # 0: the exact sweeps had no warm-up run; the fast methods had 1 (and at least 5 runs)
        "timings": timings,
        "flops": flops,
        "gflops_per_s": {name: flops[name] / median(name) / 1e9 if median(name) else None for name in flops},
        "peer_over_exact_ours": ratio("exact_peer_transformers", "exact_ours"),
        "peer_flops_over_ours": flops["exact_peer_transformers"] / flops["exact_ours"] if flops["exact_ours"] else None,
        "attribution_over_floor_bare": ratio("attribution_ours", "floor_bare"),
        "floor_bridge_over_floor_bare": ratio("floor_bridge", "floor_bare"),
        "exact_largest_effect": scale,
        "exact_ours_vs_peer_relative": None,
        "exact_ours_vs_transformer_lens_relative": None,
    }
    if timings["exact_peer_transformers"]["available"]:
        row["exact_ours_vs_peer_relative"] = (ours - values["exact_peer_transformers"]).abs().max().item() / scale
    if with_transformer_lens and timings["exact_transformer_lens"]["available"]:
        with torch.no_grad():
            base_value = task.metric(model(task.base)).item()
        theirs = TL_EXACT["head_pos"][1](values["exact_transformer_lens"]) - base_value
        row["exact_ours_vs_transformer_lens_relative"] = (ours - theirs).abs().max().item() / scale
    return row


def measure_sizes(
    model, bare, *, seed: int, repeats: int, n_prompts: int, scaling_prompts, extra_positions,
    two_thread_prompts, gpt2_small_prompts: int | None, gpt2_small_repeats: int, log: Callable[[str], None] = print,
) -> list[dict]:
    """Rows of :func:`measure_size` over prompts, sequence length, model size and thread count.

    Prompts at the benchmark's thread count (TransformerLens's exact sweep beside them up to 64
    prompts); longer sequences at ``n_prompts``; a GPT-2-small-sized model with random weights
    (built here, no download) with ``gpt2_small_repeats`` runs; and ``two_thread_prompts`` again
    with the other of one and two torch threads.
    """
    import tempfile

    from .model import load_model, save_random_gpt2

    sizes = []
    for n in scaling_prompts:
        sizes.append(measure_size(model, bare, ioi_task(model, n, seed), repeats, model_label="shipped", varies="prompts", with_transformer_lens=n <= 64))
        log(f"size: {n} prompts done")
    for extra in extra_positions:
        sizes.append(measure_size(model, bare, ioi_task(model, n_prompts, seed, extra_positions=extra), repeats, model_label="shipped", varies="positions"))
        log(f"size: {extra} more positions done")
    if gpt2_small_prompts:
        with tempfile.TemporaryDirectory() as directory:
            save_random_gpt2(directory)
            big, big_bare = load_model(directory), bare_model(directory)
            # 8 positions, few prompts and no warm-up: one exact sweep over 1,152 components takes
            # tens of seconds on this model, and its one-off start-up cost is negligible beside that
            task = random_task(big, gpt2_small_prompts, GPT2_SMALL_POSITIONS, seed)
            sizes.append(measure_size(big, big_bare, task, gpt2_small_repeats, model_label="GPT-2-small-sized (random weights)",
                                      varies="model", warmup=0))
            del big, big_bare
        log("size: GPT-2-small-sized model done")
    other = 2 if torch.get_num_threads() == 1 else 1  # the benchmark's own count is one of the pair 1 and 2
    with torch_threads(other):
        for n in two_thread_prompts:
            sizes.append(measure_size(model, bare, ioi_task(model, n, seed), repeats, model_label="shipped", varies="threads"))
            log(f"size: {n} prompts with {other} thread(s) done")
    return sizes


def prompt_scaling_rows(sizes: list[dict], threads: int) -> list[dict]:
    """The shipped model's IOI rows at one thread count, in the flat form the scaling figure reads."""
    rows = []
    for size in sizes:
        if size["varies"] != "prompts" or size["threads"] != threads:
            continue
        t = size["timings"]
        value = lambda name, key="median_s": t[name][key] if name in t and t[name]["available"] else None  # noqa: E731
        rows.append({
            "n_prompts": size["n_prompts"],
            "exact_ours_s": value("exact_ours"), "exact_transformer_lens_s": value("exact_transformer_lens"),
            "attribution_ours_s": value("attribution_ours"), "floor_frozen_s": value("floor_bridge"),
            "floor_bare_s": value("floor_bare"), "exact_peer_transformers_s": value("exact_peer_transformers"),
            "exact_ours_cpu_s": value("exact_ours", "cpu_median_s"),
            "exact_peer_transformers_cpu_s": value("exact_peer_transformers", "cpu_median_s"),
            "attribution_ours_cpu_s": value("attribution_ours", "cpu_median_s"),
            "floor_bare_cpu_s": value("floor_bare", "cpu_median_s"),
        })
    return rows


def matmul_gflops_at(threads: int) -> float:
    """:func:`matmul_gflops` with ``threads`` torch threads (the thread count is restored after)."""
    with torch_threads(threads):
        return matmul_gflops()


#: Positions per prompt on the GPT-2-small-sized model (its sweeps cost ~100x the shipped model's per component).
GPT2_SMALL_POSITIONS = 8


# ---------------------------------------------------------------- peak memory, one fresh process per method

MEMORY_METHODS = (
    "exact_ours", "exact_peer_transformers", "exact_transformer_lens", "exact_ours_loop",
    "attribution_ours", "attribution_transformer_lens", "floor_bare", "floor_bridge",
)


def peak_memory_of(method: str, n_prompts: int, seed: int) -> float | None:
    """In this (fresh) process: load the shipped model, run ``method`` once, return its peak memory growth in MB.

    The growth is the kernel's high-water mark of the resident set during the call above the
    resident set when it starts (:class:`PeakMemory`), so imports and the model do not count;
    the first call's one-time allocations (weight copies, allocator growth) do.
    """
    from .metrics import logit_diff
    from .model import SHIPPED_MODEL_DIR, load_model

    model = load_model(None)
    bare = bare_model(SHIPPED_MODEL_DIR)
    task = ioi_task(model, n_prompts, seed)
    calls = size_methods(model, bare, task, with_transformer_lens=True)
    calls["exact_ours_loop"] = lambda: exact_ours_for(model, task, engine="loop")
    calls["attribution_transformer_lens"] = lambda: tl_attribution(model, task.prompts, lambda p: (lambda logits: logit_diff(logits, p)))
    memory = PeakMemory()
    memory.start()
    calls[method]()
    return memory.growth_mb()


def peak_memory_in_fresh_processes(n_prompts: int, seed: int, threads: int, methods=MEMORY_METHODS, log: Callable[[str], None] = print) -> dict:
    """``{method: {"peak_growth_mb", "reason"}}``, each method measured alone in a new Python process."""
    import subprocess

    peaks: dict = {}
    for method in methods:
        command = [sys.executable, "-m", "attribution_course.bench", "--peak-memory-of", method,
                   "--prompts", str(n_prompts), "--seed", str(seed), "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            peaks[method] = {"peak_growth_mb": None, "reason": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            peaks[method] = {"peak_growth_mb": json.loads(lines[-1])["peak_growth_mb"], "reason": None}
        log(f"peak memory of {method}: {peaks[method]}")
    return peaks


# ---------------------------------------------------------------- the benchmark


def run_benchmark(
    model_path: str | None = None,
    *,
    n_prompts: int = 32,
    repeats: int = 5,
    seed: int = 0,
    scaling_prompts: tuple[int, ...] = (8, 16, 32, 64, 128, 256),
    scaling_positions: tuple[int, ...] = (1, 3, 5, 10, 15),
    extra_positions: tuple[int, ...] = (8, 16),
    two_thread_prompts: tuple[int, ...] = (32, 128),  # timed again with the other of 1 and 2 threads
    gpt2_small_prompts: int | None = 2,
    gpt2_small_repeats: int = 3,
    memory_methods: tuple[str, ...] = MEMORY_METHODS,
    families: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Run every measurement and return the results dict (schema in the module docstring)."""
    import importlib.metadata

    from . import patching
    from .metrics import logit_diff
    from .model import SHIPPED_MODEL_DIR, load_model

    started = time.time()
    load_before = list(os.getloadavg())
    model = load_model(model_path)
    bare = bare_model(model_path or SHIPPED_MODEL_DIR)
    cfg = model.cfg
    task = ioi_task(model, n_prompts, seed)
    metric_for = lambda p: (lambda logits: logit_diff(logits, p))  # noqa: E731  (TransformerLens's attribution, pair by pair)
    family = "head_pos"
    base, source, metric = task.base, task.source, task.metric
    n_positions = base.shape[1]
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
            "cpu_count": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
        },
        "model": {
            "path": str(model_path or SHIPPED_MODEL_DIR),
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab,
            "n_params": sum(p.numel() for p in model.parameters()),
        },
        "setup": {
            "n_prompts": n_prompts,
            "n_positions": n_positions,
            "seed": seed,
            "family": family,
            "direction": "denoising",
            "kind": "patch",
            "n_components": int(torch.tensor(patching.effect_shape(model, family, n_positions)).prod()),
            "repeats": repeats,
            "slow_repeats": repeats,
            "warmup": 1,
        },
    }

    exact_ours = lambda **kwargs: exact_ours_for(model, task, **kwargs)  # noqa: E731
    attribution_ours = lambda families=(family,): attribution_ours_for(model, task, families)  # noqa: E731

    log(f"model {results['model']['path']}: {n_prompts} prompts x {n_positions} positions, {torch.get_num_threads()} torch threads")
    fast, _ = time_interleaved(
        {
            "floor_frozen": lambda: floor_run(model, source, base, metric, frozen=True),
            "floor_full": lambda: floor_run(model, source, base, metric, frozen=False),
            "floor_bare": lambda: bare_floor_run(bare, source, base, metric),
            "attribution_ours": attribution_ours,
            "attribution_ours_all_families": lambda: attribution_ours(patching.FAMILIES),
        },
        repeats,
    )
    log("floor and attribution timed")
    slow_repeats = results["setup"]["slow_repeats"]
    slow, kept = time_interleaved(
        {
            "exact_ours": exact_ours,
            "exact_transformer_lens": lambda: tl_exact(model, base, source, metric, family),
            "exact_peer_transformers": lambda: peer_exact_head_pos(bare, base, source, task.read_position, task.metric_at_read),
            "exact_ours_loop": lambda: exact_ours(engine="loop"),
            "exact_ours_stacked": lambda: exact_ours(engine="stacked"),
            "attribution_transformer_lens": lambda: tl_attribution(model, task.prompts, metric_for),
        },
        slow_repeats,
    )
    for name in ("exact_ours", "exact_ours_loop", "exact_ours_stacked"):
        if not slow[name]["available"]:
            raise RuntimeError(f"our own {name} failed: {slow[name]['reason']}")
    log("exact sweeps and TransformerLens timed")
    timings = {**fast, **slow}
    results["timings"] = timings

    # ---- agreement (on the results of the timed runs)
    agreement: dict = {}
    ours, loop = kept["exact_ours"], kept["exact_ours_loop"]
    agreement["exact_ours_vs_loop_max_abs"] = (ours - loop).abs().max().item()
    agreement["exact_stacked_vs_loop_max_abs"] = (kept["exact_ours_stacked"] - loop).abs().max().item()
    with torch.no_grad():
        base_value = metric(model(base)).item()
    if timings["exact_transformer_lens"]["available"]:
        theirs = TL_EXACT[family][1](kept["exact_transformer_lens"]) - base_value
        agreement["exact_ours_vs_transformer_lens_max_abs"] = (ours - theirs).abs().max().item()
        agreement["exact_loop_vs_transformer_lens_max_abs"] = (loop - theirs).abs().max().item()
    attribution = attribution_ours(("head_pos", "mlp_pos"))
    if timings["attribution_transformer_lens"]["available"]:
        theirs = kept["attribution_transformer_lens"]
        for fam in ("head_pos", "mlp_pos"):
            agreement[f"attribution_ours_vs_transformer_lens_{fam}_max_abs"] = (attribution[fam] - theirs[fam]).abs().max().item()
    if timings["exact_peer_transformers"]["available"]:
        agreement["exact_ours_vs_peer_transformers_max_abs"] = (ours - kept["exact_peer_transformers"]).abs().max().item()
    results["agreement"] = agreement
    results["scale"] = {"exact_head_pos_max_abs": ours.abs().max().item(), "attribution_head_pos_max_abs": attribution["head_pos"].abs().max().item()}

    # ---- ratios
    median = lambda name: timings[name]["median_s"]  # noqa: E731
    ratios = {
        "attribution_over_floor_frozen": median("attribution_ours") / median("floor_frozen"),
        "attribution_over_floor_full": median("attribution_ours") / median("floor_full"),
        "attribution_over_floor_bare": median("attribution_ours") / median("floor_bare"),
        "floor_bridge_over_floor_bare": median("floor_frozen") / median("floor_bare"),
        "peer_over_exact_ours": None,
        "attribution_all_families_over_floor_frozen": median("attribution_ours_all_families") / median("floor_frozen"),
        "exact_over_attribution": median("exact_ours") / median("attribution_ours"),
        "loop_over_exact_ours": median("exact_ours_loop") / median("exact_ours"),
        "exact_ours_over_transformer_lens": None,
        "transformer_lens_over_exact_ours": None,
    }
    if timings["exact_transformer_lens"]["available"]:
        ratios["exact_ours_over_transformer_lens"] = median("exact_ours") / median("exact_transformer_lens")
        ratios["transformer_lens_over_exact_ours"] = median("exact_transformer_lens") / median("exact_ours")
    if timings["exact_peer_transformers"]["available"]:
        ratios["peer_over_exact_ours"] = median("exact_peer_transformers") / median("exact_ours")
    results["ratios"] = ratios

    # ---- every family: our exact sweep vs transformer_lens.patching's
    rows = []
    if families:
        for fam in patching.FAMILIES:
            function_name, to_ours = TL_EXACT.get(fam, (None, None))
            calls = {"ours": lambda: exact_ours(family=fam), "attribution": lambda: attribution_ours((fam,))}
            if function_name is not None:
                calls["transformer_lens"] = lambda: tl_exact(model, base, source, metric, fam)
            timed, values = time_interleaved(calls, 1)
            row = {
                "family": fam,
                "components": int(torch.tensor(patching.effect_shape(model, fam, n_positions)).prod()),
                "exact_ours_s": timed["ours"]["median_s"],
                "attribution_ours_s": timed["attribution"]["median_s"],
                "transformer_lens_function": function_name,
                "exact_transformer_lens_s": None,
                "speedup": None,
                "max_abs_diff": None,
            }
            if function_name is None:
                row["transformer_lens_function"] = "not available: transformer_lens.patching has no whole-layer MLP sweep"
            elif not timed["transformer_lens"]["available"]:
                row["transformer_lens_function"] = f"not available: {timed['transformer_lens']['reason']}"
            else:
                row["exact_transformer_lens_s"] = timed["transformer_lens"]["median_s"]
                row["speedup"] = row["exact_transformer_lens_s"] / row["exact_ours_s"]
                theirs = to_ours(values["transformer_lens"]) - base_value
                row["max_abs_diff"] = (values["ours"] - theirs).abs().max().item()
            rows.append(row)
            log(f"family {fam} done")
    results["families"] = rows

    # ---- scaling
    scaling: dict = {"prompts": [], "positions": []}
    scaling_repeats = repeats
    sizes = measure_sizes(
        model, bare, seed=seed, repeats=repeats, n_prompts=n_prompts, scaling_prompts=scaling_prompts,
        extra_positions=extra_positions, two_thread_prompts=two_thread_prompts,
        gpt2_small_prompts=gpt2_small_prompts, gpt2_small_repeats=gpt2_small_repeats, log=log,
    )
    results["sizes"] = sizes
    scaling["prompts"] = prompt_scaling_rows(sizes, threads=torch.get_num_threads())
    thread_counts = {1, 2} if two_thread_prompts else {torch.get_num_threads()}
    results["matmul_gflops"] = {str(t): matmul_gflops_at(t) for t in sorted(thread_counts)}
    for k in scaling_positions:
        k = min(k, n_positions)
        swept = list(range(n_positions - k, n_positions))  # the last k positions
        cheap, _ = time_interleaved(
            {"ours": lambda: exact_ours(positions=swept), "attribution": attribution_ours, "loop": lambda: exact_ours(engine="loop", positions=swept)},
            scaling_repeats,
        )
        scaling["positions"].append(
            {
                "n_positions_swept": k,
                "n_components": cfg.n_layers * cfg.n_heads * k,
                "exact_ours_s": cheap["ours"]["median_s"],
                "exact_ours_loop_s": cheap["loop"]["median_s"],
                "attribution_ours_s": cheap["attribution"]["median_s"],
            }
        )
        log(f"scaling: {k} positions done")
    results["scaling"] = scaling

    results["peak_memory_fresh_process_mb"] = peak_memory_in_fresh_processes(n_prompts, seed, torch.get_num_threads(), memory_methods, log=log)
    results["machine"]["load_average_after"] = list(os.getloadavg())
    results["peak_rss_mb"] = peak_rss_mb()
    results["duration_s"] = time.time() - started
    results["targets"] = check_targets(results)
    return results


def check_targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value (the worst over every size) and whether it is met."""
    ratios, sizes = results["ratios"], results["sizes"]

    def worst(key, pick):
        values = [size[key] for size in sizes if size.get(key) is not None]
        return pick(values) if values else None

    speedup_from_threads = None
    by_threads = {t: {s["n_prompts"]: s for s in sizes if s["varies"] in ("prompts", "threads") and s["threads"] == t} for t in (1, 2)}
    shared = sorted(set(by_threads[1]) & set(by_threads[2]))
    if shared:
        n = shared[-1]  # the largest size timed with one thread and with two
        wall = lambda t: by_threads[t][n]["timings"]["exact_ours"]["median_s"]  # noqa: E731
        speedup_from_threads = wall(1) / wall(2)
    memory = [m["peak_growth_mb"] for m in results.get("peak_memory_fresh_process_mb", {}).values() if m["peak_growth_mb"] is not None]
    checks = [
        ("attribution / bare transformers floor (2F+1B) <= 1.1 at every size", worst("attribution_over_floor_bare", max), 1.1, "max"),
        ("strongest exact peer (transformers + hooks) / our exact >= 3 at every size", worst("peer_over_exact_ours", min), 3.0, "min"),
        ("|our exact - transformers peer| / largest effect < 1e-4 at every size", worst("exact_ours_vs_peer_relative", max), 1e-4, "below"),
        ("|our exact - TransformerLens exact| / largest effect < 1e-4 wherever both ran", worst("exact_ours_vs_transformer_lens_relative", max), 1e-4, "below"),
        ("our exact sweep uses both cores: 1-thread / 2-thread wall time >= 1.2 at the largest size run both ways", speedup_from_threads, 1.2, "min"),
        ("TransformerLens exact / our exact (head x position, headline) >= 3", ratios["transformer_lens_over_exact_ours"], 3.0, "min"),
        ("peak memory of every method, each in a fresh process (growth over the loaded model) < 4 GB", max(memory) if memory else None, 4096.0, "below"),
        ("peak memory (RSS, whole benchmark process) < 4 GB", results["peak_rss_mb"], 4096.0, "below"),
    ]
    targets = []
    for name, value, limit, how in checks:
        if value is None:
            met = False
        elif how == "max":
            met = value <= limit
        elif how == "min":
            met = value >= limit
        else:
            met = value < limit
        targets.append({"name": name, "value": value, "limit": limit, "met": met})
    return targets


# ---------------------------------------------------------------- reading and reporting


def load_results(path: str | os.PathLike = COMMITTED_RESULTS) -> dict:
    """The results of a benchmark run, read from its JSON (schema in the module docstring).

    The default is the committed run, ``docs/performance.json``; pass
    ``"bench-output/bench.json"`` for the latest local run.

    Raises ``ValueError`` naming the file if it is not a benchmark result of this schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no benchmark results at {path}; run `make bench` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(results, dict) or results.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} is not a benchmark result with schema_version {SCHEMA_VERSION}")
    return results


def scaling_figure(results: dict):
    """A plotly figure: time vs number of prompts and vs number of positions swept (log y)."""
    from plotly.subplots import make_subplots

    # one panel above the other: side by side, each panel would be a sixth of a phone's width
    figure = make_subplots(rows=2, cols=1, vertical_spacing=0.2,
                           subplot_titles=("time vs number of prompts", "time vs positions swept (head x position)"))
    prompts = results["scaling"]["prompts"]
    # one colour per series in both panels; marker symbol and dash differ too, so the
    # lines read without colour
    style = {
        "exact, ours": dict(symbol="circle", dash="solid", color="#1f77b4"),
        "exact, TransformerLens": dict(symbol="square", dash="dash", color="#d62728"),
        "exact, one at a time": dict(symbol="diamond", dash="dashdot", color="#9467bd"),
        "attribution, ours": dict(symbol="triangle-up", dash="dot", color="#2ca02c"),
        "bridge floor 2F+1B": dict(symbol="x", dash="longdash", color="#7f7f7f"),
        "exact, transformers peer": dict(symbol="star", dash="dash", color="#ff7f0e"),
        "bare floor 2F+1B": dict(symbol="cross", dash="dot", color="#000000"),
    }

    def add(rows, x_key, key, label, panel, showlegend):
        figure.add_scatter(
            x=[r[x_key] for r in rows], y=[r[key] for r in rows], name=label, legendgroup=label, showlegend=showlegend,
            mode="lines+markers", marker=dict(symbol=style[label]["symbol"], size=9, color=style[label]["color"]),
            line=dict(dash=style[label]["dash"], color=style[label]["color"]),
            row=panel, col=1,
        )

    series = [
        ("exact_ours_s", "exact, ours"),
        ("exact_transformer_lens_s", "exact, TransformerLens"),
        ("attribution_ours_s", "attribution, ours"),
        ("floor_frozen_s", "bridge floor 2F+1B"),
        ("exact_peer_transformers_s", "exact, transformers peer"),
        ("floor_bare_s", "bare floor 2F+1B"),
    ]
    for key, label in series:
        if any(row.get(key) is not None for row in prompts):
            add(prompts, "n_prompts", key, label, panel=1, showlegend=True)
    positions = results["scaling"]["positions"]
    for key, label in [("exact_ours_s", "exact, ours"), ("exact_ours_loop_s", "exact, one at a time"), ("attribution_ours_s", "attribution, ours")]:
        add(positions, "n_positions_swept", key, label, panel=2, showlegend=key == "exact_ours_loop_s")
    figure.update_yaxes(type="log", title_text="seconds (median)")
    figure.update_xaxes(title_text="prompts", row=1, col=1)
    figure.update_xaxes(title_text="positions swept", row=2, col=1)
    # a title of its own: the first panel's title would otherwise sit under the plotly toolbar
    figure.update_layout(title="Benchmark: time against prompts and against positions swept",
                         height=760, margin=dict(b=40, l=60, r=20))
    return figure


def _seconds(value) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown_report(results: dict) -> str:
    """The markdown table (with machine info and the command) written next to the JSON."""
    t, r, a, s, mach, mdl = (results[k] for k in ("timings", "ratios", "agreement", "setup", "machine", "model"))
    lines = [
        "# Performance: exact patching and attribution patching",
        "",
        f"Generated by `{results['command']}` on {results['started_at']} (took {results['duration_s']:.0f} s). Do not edit by hand.",
        "",
        f"Machine: {mach['platform']}, {mach['affinity_cores']} cores available, torch {mach['torch']} with "
        f"{mach['torch_threads']} threads, transformer_lens {mach['transformer_lens']}, Python {mach['python']}. "
        f"Load average before/after: {mach['load_average_before'][0]:.2f} / {mach['load_average_after'][0]:.2f}.",
        "",
        f"Model: `{mdl['path']}` ({mdl['n_layers']} layers, {mdl['n_heads']} heads, d_model {mdl['d_model']}, "
        f"{mdl['n_params']:,} parameters). Prompts: {s['n_prompts']} IOI prompts of {s['n_positions']} tokens (seed {s['seed']}). "
        f"Sweep: every head x position ({s['n_components']} components), clean/corrupt patching, {s['direction']}. "
        f"Times: median of {s['repeats']} runs after {s['warmup']} warm-up ({s['slow_repeats']} runs for the exact sweeps and "
        "TransformerLens's attribution; 1 run after a warm-up in the per-family table; 1 run for the scaling table's loop, up to 3 "
        "for the rest). Competing methods run round-robin, so load changes on a shared machine hit them alike.",
        "",
        "| what | wall time (median) | process CPU time (median) | peak memory growth | notes |",
        "|---|---:|---:|---:|---|",
    ]
    rows = [
        ("floor_bare", "cost floor: bare `transformers` model, 2 forward + 1 backward, parameters frozen", "no TransformerLens at all; backward from the metric to the embedding output only"),
        ("floor_frozen", "bridge floor: 2 forward + 1 backward through the TransformerBridge, parameters frozen", "no lens hooks; backward to the embedding output only"),
        ("floor_full", "2 forward + 1 backward, trainable parameters", "backward also computes every weight gradient"),
        ("attribution_ours", "attribution, ours (head x position)", "hooks on the `hook_z` points only"),
        ("attribution_ours_all_families", "attribution, ours (all 7 families at once)", "same 2F+1B, more hook points"),
        ("attribution_transformer_lens", "attribution, `transformer_lens.tools.analysis.attribution_patching`", "node granularity, one call per prompt pair"),
        ("exact_ours", "exact sweep, ours (prefix engine)", "starts each variant at the patched layer and position"),
        ("exact_ours_stacked", "exact sweep, ours (bridge forward, variants stacked)", "full forwards, many variants per pass"),
        ("exact_ours_loop", "exact sweep, one component at a time", "one bridge forward per component"),
        ("exact_transformer_lens", "exact sweep, `transformer_lens.patching.get_act_patch_attn_head_out_by_pos`", "inside `torch.no_grad()`"),
        ("exact_peer_transformers", "exact sweep, strongest peer: plain `transformers` + PyTorch hooks", "starts each variant at the patched layer from the cached residual; unembeds only the position the metric reads"),
    ]
    for key, label, note in rows:
        timing = t.get(key)
        if timing is None:
            continue
        if timing["available"]:
            peak = timing.get("peak_growth_mb")
            lines.append(
                f"| {label} | {_seconds(timing['median_s'])} | {_seconds(timing.get('cpu_median_s'))} | "
                f"{'n/a' if peak is None else f'{peak:.0f} MB'} | {note} |"
            )
        else:
            lines.append(f"| {label} | not available: {timing['reason']} | | | {note} |")
    lines += [
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| attribution / bare `transformers` floor | {_ratio(r.get('attribution_over_floor_bare'))} |",
        f"| bridge floor / bare `transformers` floor | {_ratio(r.get('floor_bridge_over_floor_bare'))} |",
        f"| strongest exact peer / exact (ours) | {_ratio(r.get('peer_over_exact_ours'))} |",
        f"| attribution / bridge floor (frozen) | {_ratio(r['attribution_over_floor_frozen'])} |",
        f"| attribution / floor (trainable parameters) | {_ratio(r['attribution_over_floor_full'])} |",
        f"| attribution, all families / floor (frozen) | {_ratio(r['attribution_all_families_over_floor_frozen'])} |",
        f"| exact (ours) / exact (TransformerLens) | {_ratio(r['exact_ours_over_transformer_lens'])} |",
        f"| exact (TransformerLens) / exact (ours) | {_ratio(r['transformer_lens_over_exact_ours'])} |",
        f"| exact (ours) / attribution (ours): what attribution saves | {_ratio(r['exact_over_attribution'])} |",
        f"| one-at-a-time loop / exact (ours) | {_ratio(r['loop_over_exact_ours'])} |",
        "",
        "| agreement | max abs difference |",
        "|---|---:|",
    ]
    labels = {
        "exact_ours_vs_loop_max_abs": "exact: ours (prefix engine) vs one at a time",
        "exact_stacked_vs_loop_max_abs": "exact: ours (stacked) vs one at a time",
        "exact_ours_vs_transformer_lens_max_abs": "exact: ours (prefix engine) vs TransformerLens",
        "exact_loop_vs_transformer_lens_max_abs": "exact: one at a time vs TransformerLens",
        "exact_ours_vs_peer_transformers_max_abs": "exact: ours (prefix engine) vs the plain-transformers peer",
        "attribution_ours_vs_transformer_lens_head_pos_max_abs": "attribution, head x position: ours vs TransformerLens",
        "attribution_ours_vs_transformer_lens_mlp_pos_max_abs": "attribution, MLP x position: ours vs TransformerLens",
    }
    for key, value in a.items():
        lines.append(f"| {labels.get(key, key)} | {value:.2e} |")
    lines += [
        "",
        f"For scale: the largest exact effect is {results['scale']['exact_head_pos_max_abs']:.2f} and the largest "
        f"attribution estimate {results['scale']['attribution_head_pos_max_abs']:.2f} (logit difference).",
    ]
    if results["families"]:
        lines += [
            "",
            "Every family, clean/corrupt patching (denoising), exact sweep ours vs `transformer_lens.patching`:",
            "",
            "| family | components | exact, ours | exact, TransformerLens | speed-up | max abs diff | attribution, ours | TransformerLens function |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in results["families"]:
            diff = "n/a" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
            lines.append(
                f"| {row['family']} | {row['components']} | {_seconds(row['exact_ours_s'])} | {_seconds(row['exact_transformer_lens_s'])} | "
                f"{_ratio(row['speedup'])} | {diff} | {_seconds(row['attribution_ours_s'])} | {row['transformer_lens_function']} |"
            )
    lines += [
        "",
        "Scaling (head x position; median wall time, process CPU time in brackets where measured):",
        "",
        "| prompts | exact, ours | exact, transformers peer | exact, TransformerLens | attribution, ours | bare floor | bridge floor |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["scaling"]["prompts"]:
        with_cpu = lambda key: _seconds(row.get(key)) + (f" ({_seconds(row[key[:-2] + '_cpu_s'])})" if row.get(key[:-2] + "_cpu_s") is not None else "")  # noqa: E731
        lines.append(
            f"| {row['n_prompts']} | {with_cpu('exact_ours_s')} | {with_cpu('exact_peer_transformers_s')} | "
            f"{_seconds(row['exact_transformer_lens_s'])} | {with_cpu('attribution_ours_s')} | {with_cpu('floor_bare_s')} | "
            f"{_seconds(row['floor_frozen_s'])} |"
        )
    lines += ["", "| positions swept | components | exact, ours | exact, one at a time | attribution, ours |", "|---:|---:|---:|---:|---:|"]
    for row in results["scaling"]["positions"]:
        lines.append(
            f"| {row['n_positions_swept']} | {row['n_components']} | {_seconds(row['exact_ours_s'])} | "
            f"{_seconds(row['exact_ours_loop_s'])} | {_seconds(row['attribution_ours_s'])} |"
        )
    lines += sizes_report(results)
    lines += ["", f"Peak memory (RSS of the whole benchmark process): {results['peak_rss_mb']:.0f} MB.", "", "Targets:", ""]
    for target in results["targets"]:
        value = "n/a" if target["value"] is None else f"{target['value']:.3g}"
        lines.append(f"- {'met' if target['met'] else 'NOT met'}: {target['name']} (measured {value})")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def _spread(timing) -> str:
    """``median (min-max)`` wall time of one method, or why it is missing."""
    if not timing or not timing["available"]:
        return "n/a"
    return f"{_seconds(timing['median_s'])} ({_seconds(timing['min_s'])}-{_seconds(timing['max_s'])})"


METHOD_LABELS = {
    "exact_ours": "exact sweep, ours (`exact_sweep`, engine auto)",
    "exact_peer_transformers": "exact sweep, strongest peer (plain `transformers` + hooks)",
    "exact_transformer_lens": "exact sweep, `transformer_lens.patching`",
    "exact_ours_loop": "exact sweep, one bridge forward per component",
    "attribution_ours": "attribution, ours (head x position)",
    "attribution_transformer_lens": "attribution, `transformer_lens` `attribution_patch` per pair",
    "floor_bare": "floor: bare `transformers`, 2 forward + 1 backward",
    "floor_bridge": "floor: TransformerBridge, 2 forward + 1 backward",
}


def sizes_report(results: dict) -> list[str]:
    """Markdown for every size (prompts, sequence length, model size, threads), what the exact win is made of,
    the matrix-multiply reference and the fresh-process memory."""
    gflops = results.get("matmul_gflops", {})
    lines = [
        "",
        "## Every size",
        "",
        "Each row times all its methods in the same rounds (median wall time, min-max over the runs in brackets). "
        "FLOPs are counted by `torch.utils.flop_counter` (matrix multiplies and attention products) on one run of each "
        "exact sweep. Float32 matrix multiply (1024 x 1024) on this machine in the same run: "
        + ", ".join(f"{value:.0f} GFLOP/s with {threads} thread(s)" for threads, value in gflops.items()) + ".",
        "",
        "| varies | model | threads | prompts x positions | runs (warm-up) | exact, ours | exact, peer | peer / ours | peer FLOPs / ours | ours GFLOP/s | peer GFLOP/s | attribution, ours | bare floor | attribution / bare floor | bridge floor / bare floor | max rel. diff vs peer |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in results.get("sizes", []):
        t, rate = size["timings"], size["gflops_per_s"]
        lines.append(
            f"| {size['varies']} | {size['model']} | {size['threads']} | {size['n_prompts']} x {size['n_positions']} | {size['repeats']} ({size['warmup']}) | "
            f"{_spread(t['exact_ours'])} | {_spread(t['exact_peer_transformers'])} | {_ratio(size['peer_over_exact_ours'])} | "
            f"{_ratio(size['peer_flops_over_ours'])} | {_number(rate['exact_ours'])} | {_number(rate['exact_peer_transformers'])} | "
            f"{_spread(t['attribution_ours'])} | {_spread(t['floor_bare'])} | {_ratio(size['attribution_over_floor_bare'])} | "
            f"{_ratio(size['floor_bridge_over_floor_bare'])} | {_number(size['exact_ours_vs_peer_relative'], '.1e')} |"
        )
    lines += ["", "What the exact win is made of (peer time / our time = FLOP ratio x our GFLOP/s / the peer's GFLOP/s):", ""]
    for size in results.get("sizes", []):
        rate = size["gflops_per_s"]
        if None in (size["peer_over_exact_ours"], size["peer_flops_over_ours"], rate["exact_ours"], rate["exact_peer_transformers"]):
            continue
        reference = gflops.get(str(size["threads"]))
        limit = f"; ours runs at {rate['exact_ours'] / reference:.0%} of the matrix-multiply speed" if reference else ""
        lines.append(
            f"- {size['varies']}, {size['model']}, {size['threads']} thread(s), {size['n_prompts']} x {size['n_positions']}: "
            f"{size['peer_over_exact_ours']:.2f}x = {size['peer_flops_over_ours']:.2f}x fewer FLOPs x "
            f"{rate['exact_ours'] / rate['exact_peer_transformers']:.2f}x faster FLOPs{limit}."
        )
    memory = results.get("peak_memory_fresh_process_mb")
    if memory:
        lines += [
            "",
            f"Peak memory of each method, {results['setup']['n_prompts']} prompts, each run once in a fresh process "
            "(high-water mark of the resident set during the call minus the resident set before it: imports and the model excluded):",
            "",
            "| method | peak memory growth |",
            "|---|---:|",
        ]
        for method, value in memory.items():
            shown = f"{value['peak_growth_mb']:.0f} MB" if value["peak_growth_mb"] is not None else f"not measured: {value['reason']}"
            lines.append(f"| {METHOD_LABELS.get(method, method)} | {shown} |")
    return lines


def _number(value, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


NOTES = """Notes.

- Sign and scale conventions. Ours: `(a' - a) · ∂M/∂a`, with `a` and the gradient
  taken on the base run and `M` the logit difference averaged over the batch.
  Denoising runs the corrupted prompts and patches in the clean activations, so
  ours is `(a_clean - a_corrupt) · ∂M/∂a |corrupt`, which is exactly
  TransformerLens's `attribution_patch` node score (it also takes the gradient on
  the corrupt run and points toward the clean activation). It scores each prompt
  pair separately and averages; ours differentiates the batch mean, whose
  gradient with respect to prompt `i`'s activation is `1/n ∂M_i/∂a_i`, so the
  two agree without any sign flip or rescaling. Its `metric_fn` gets one
  example's logits and no index, so the benchmark calls it once per pair with
  that pair's metric. TransformerLens has no noising form or zero/mean baseline
  for attribution; ours for noising is a different estimate (gradient at the
  clean run), not a sign flip of denoising.
- `transformer_lens.patching.get_act_patch_*` return `M(patched)`; ours return
  `M(patched) - M(base)`, so the comparison subtracts `M(corrupted)` from theirs.
  Their axis order for head x position is `[layer, pos, head]`; ours `[layer, head, pos]`.
- Both TransformerLens tools work with the TransformerBridge in compatibility
  mode. Exact times include caching the source activations (one forward) for both.
- The prefix engine is exact: it reruns the model from the patched layer, reusing
  the base run only where the patch cannot reach (earlier layers; earlier
  positions, by causal masking). It is a functional GPT-2 forward over the
  bridge's own (processed) weights, checked against the bridge's logits and hook
  activations on every call; other architectures use the stacked bridge engine.
- Our attribution's backward stops at the earliest hooked activation
  (`blocks.0.attn.hook_z` for heads); the frozen floor's goes back to the
  embedding output, so it does slightly more backward work than ours.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attribution_course.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the shipped model)")
    parser.add_argument("--prompts", type=int, default=32, help="number of IOI prompts (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT_DIR), help="output directory (default bench-output)")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here (e.g. docs/performance.md)")
    parser.add_argument("--json", default=None, help="also write the JSON here (e.g. docs/performance.json)")
    parser.add_argument("--quick", action="store_true", help="small scaling grid and no per-family table (for smoke tests)")
    parser.add_argument("--peak-memory-of", default=None, choices=MEMORY_METHODS,
                        help="(used by the benchmark itself) run one method once in this fresh process and print its peak memory as JSON")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.repeats < 1:
        parser.error("--prompts and --repeats must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        print(json.dumps({"method": args.peak_memory_of, "peak_growth_mb": peak_memory_of(args.peak_memory_of, args.prompts, args.seed)}))
        return 0
    command = "python -m attribution_course.bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    quick = dict(scaling_prompts=(2, 4), scaling_positions=(1, 15), extra_positions=(4,), two_thread_prompts=(4,),
                 gpt2_small_prompts=None, memory_methods=("exact_ours", "floor_bare"), families=False)
    kwargs = quick if args.quick else {}
    results = run_benchmark(args.model, n_prompts=args.prompts, repeats=args.repeats, seed=args.seed, command=command.strip(), **kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown_report(results)
    (out / "bench.md").write_text(report)
    written = [out / "bench.json", out / "bench.md"]
    for copy, text in ((args.markdown, report), (args.json, json.dumps(results, indent=2) + "\n")):
        if copy:
            Path(copy).parent.mkdir(parents=True, exist_ok=True)
            Path(copy).write_text(text)
            written.append(Path(copy))
    print(report)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
