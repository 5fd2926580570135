"""Exact interventions and their first-order (attribution) estimates.

Every method in the course is one of two operations on a *base run* (the
prompts the model actually sees) and a *replacement* activation ``a'`` for
some component:

* exact: overwrite the component's activation ``a`` with ``a'``, rerun, and
  report ``M(patched) - M(base)``; one forward pass per component;
* attribution: ``(a' - a) · ∂M/∂a``, with ``a`` and the gradient taken on the
  base run; one forward and one backward pass for every component at once.

The choice of base run and replacement names the method:

============================  ===============  =============================
method                        base run         replacement ``a'``
============================  ===============  =============================
zero ablation                 clean            ``0``
mean ablation                 clean            mean of ``a`` over a reference set
resample ablation             clean            ``a`` on other prompts
patching, noising             clean            ``a`` on the corrupted prompts
patching, denoising           corrupted        ``a`` on the clean prompts
============================  ===============  =============================

so zero ablation's estimate is ``(0 - a)·∂M/∂a = -a·∂M/∂a``: the minus sign
is not a convention, it is the direction of the intervention. "0" means the
component writes nothing: for a head's ``hook_z``, whose value bias
compatibility mode folds away, that is ``-b_V^eff`` rather than 0, and the
estimate is ``(-b_V^eff - a)·∂M/∂a`` (:mod:`zero_ablation`).

A *component family* says which hook holds the activation and how a component
indexes into it (see :data:`FAMILIES`).

Cost. :func:`attribution_sweeps` does every family at once in one forward on
the replacement prompts and one forward plus one backward on the base prompts,
with parameters frozen so the backward computes no weight gradients.
:func:`exact_sweep` still reruns the model once per component, but skips what a
replacement cannot change (see its ``engine`` argument): earlier layers and,
by causal masking, earlier positions, and in the last block every position the
metric does not read. ``python -m attribution_course.bench`` measures both
against TransformerLens and against the bare 2-forward-1-backward floor.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], Float[torch.Tensor, ""]]
Tokens = Int[torch.Tensor, "batch pos"]
Activations = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """A kind of component: which hook holds it and which axes index it.

    ``axes`` names the activation's axes at ``hook`` (after the batch axis);
    ``component_axes`` are the ones that index a component (besides the layer).
    Every other axis is summed over in an attribution estimate.
    """

    name: str
    hook: str
    axes: tuple[str, ...]
    component_axes: tuple[str, ...]

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)


FAMILIES: dict[str, Family] = {
    "head": Family("head", "blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"), ("head",)),
    "head_pos": Family("head_pos", "blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"), ("head", "pos")),
    "pattern": Family("pattern", "blocks.{layer}.attn.hook_pattern", ("head", "query", "key"), ("head",)),
    "resid_pos": Family("resid_pos", "blocks.{layer}.hook_resid_pre", ("pos", "d_model"), ("pos",)),
    "mlp": Family("mlp", "blocks.{layer}.hook_mlp_out", ("pos", "d_model"), ()),
    "mlp_pos": Family("mlp_pos", "blocks.{layer}.hook_mlp_out", ("pos", "d_model"), ("pos",)),
    "attn_pos": Family("attn_pos", "blocks.{layer}.hook_attn_out", ("pos", "d_model"), ("pos",)),
}



def get_family(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown component family {family!r}; choose one of {sorted(FAMILIES)}") from None


def hook_names(model, family: str | Family) -> list[str]:
    """The hook name of ``family`` in every layer."""
    fam = get_family(family)
    return [fam.hook_name(layer) for layer in range(model.cfg.n_layers)]


def effect_shape(model, family: str | Family, n_positions: int) -> tuple[int, ...]:
    """Shape of a sweep's result: ``(n_layers, *component_axes)``."""
    fam = get_family(family)
    sizes = {"head": model.cfg.n_heads, "pos": n_positions}
    return (model.cfg.n_layers, *(sizes[a] for a in fam.component_axes))


def component_index(family: Family, component: tuple[int, ...]) -> tuple:
    """An index into the activation ``[batch, *axes]`` selecting one component."""
    index: list = [slice(None)] * (1 + len(family.axes))
    for axis, value in zip(family.component_axes, component):
        index[1 + family.axes.index(axis)] = value
    return tuple(index)


# ---------------------------------------------------------------- checks


def check_tokens(tokens, argument: str) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{argument} must be an integer tensor of shape [batch, pos], got {shape}")


def check_replacements(model, replacements: Activations, family: Family, base_tokens: Tokens) -> None:
    """Every layer's replacement exists and has the base run's batch and position sizes."""
    for name in hook_names(model, family):
        if name not in replacements:
            raise ValueError(
                f"replacements hold no activation for hook {name!r} (family {family.name!r}); "
                "build them with replacement_activations(model, family, ...) for the same family"
            )
        shape = replacements[name].shape
        if shape[0] != base_tokens.shape[0]:
            raise ValueError(
                f"replacements[{name!r}] has batch size {shape[0]} but base_tokens has "
                f"{base_tokens.shape[0]} prompts; build the replacements for these base tokens"
            )
        for dim, axis in enumerate(family.axes, start=1):
            if axis in ("pos", "query", "key") and shape[dim] != base_tokens.shape[1]:
                raise ValueError(
                    f"replacements[{name!r}] has {shape[dim]} positions on its {axis!r} axis but base_tokens "
                    f"have {base_tokens.shape[1]}; build the replacements for these base tokens"
                )


# ---------------------------------------------------------------- caching


def _saver(store: Activations, name: str):
    """A hook that stores its input under ``name`` (TransformerBridge passes the
    aliased hook, e.g. ``blocks.0.hook_in`` for ``blocks.0.hook_resid_pre``)."""

    def save(tensor, hook):
        store[name] = tensor.detach()

    return save


def cache_activations(model, tokens: Tokens, names: list[str]) -> Activations:
    """Activations at the hooks ``names`` on ``tokens`` (no gradients kept)."""
    activations: Activations = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, _saver(activations, name)) for name in names])
    return activations


@contextmanager
def parameters_frozen(model) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter, and restore each flag on exit.

    Inside, autograd records only what depends on a tensor we mark ourselves
    (see :func:`cache_activations_and_gradients`), so a backward pass computes
    no weight gradients and stops at the earliest hooked activation.
    """
    parameters = list(model.parameters())
    saved = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(parameters, saved):
            p.requires_grad_(flag)


def _gradient_tap(activations: Activations, gradients: Activations, name: str):
    """A forward hook that records the activation and arranges for ``∂M/∂a`` to be recorded.

    With frozen parameters the activation usually carries no autograd history;
    it is then replaced by a leaf that requires grad (same values), which is
    where the backward pass will stop. The hook returns the tensor it tapped so
    the model consumes exactly that tensor (TransformerBridge hands hooks a
    reshaped view and only uses what the hook returns; this is also why
    ``retain_grad()`` on the view does nothing).
    """

    def tap(tensor, hook):
        if not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_(True)
        activations[name] = tensor.detach()

        def record(grad):
            gradients[name] = grad.detach()

        tensor.register_hook(record)
        return tensor

    return tap


def cache_activations_and_gradients(
    model, tokens: Tokens, metric: Metric, names: list[str]
) -> tuple[float, Activations, Activations]:
    """One forward and one backward pass: metric value, activations and ``∂M/∂a``.

    Only what lies between the earliest hook in ``names`` and the metric is
    differentiated: parameters are frozen for the call (their ``requires_grad``
    flags are restored afterwards) and gradients are captured by tensor hooks on
    the hooked activations, so no weight gradient is computed and nothing is
    left in any ``.grad``. Hooks already registered on ``model`` (e.g. with
    ``model.hooks(...)``) run first and are respected.
    """
    activations: Activations = {}
    gradients: Activations = {}
    taps = [(name, _gradient_tap(activations, gradients, name)) for name in names]
    with parameters_frozen(model), torch.enable_grad():
        value = metric(model.run_with_hooks(tokens, fwd_hooks=taps))
        if not value.requires_grad:
            raise RuntimeError(f"the metric does not depend on any of the hooks {names}")
        value.backward()
    missing = [n for n in names if n not in gradients]
    if missing:
        raise RuntimeError(f"no gradient reached hook(s) {missing}; does the metric depend on them?")
    return value.item(), activations, gradients


# ---------------------------------------------------------------- replacements

ReplacementKind = Literal["zero", "folded_zero", "mean", "resample", "patch"]
REPLACEMENT_KINDS: tuple[str, ...] = ("zero", "folded_zero", "mean", "resample", "patch")


def zero_replacement(activations: Activations) -> Activations:
    """``a' = 0`` in the hook's own coordinates, for every cached activation (``kind="folded_zero"``)."""
    return {name: torch.zeros_like(act) for name, act in activations.items()}


def _zero_kind_replacement(model, family: Family, kind: str, like: Activations) -> Activations:
    """``"zero"``: the component writes nothing (:func:`zero_ablation.silent_replacement`); ``"folded_zero"``: zeros."""
    if kind == "folded_zero":
        return zero_replacement(like)
    from .zero_ablation import silent_replacement  # it imports this module

    return silent_replacement(model, family, like)


def mean_replacement(activations: Activations) -> Activations:
    """``a'`` = the mean over the batch (kept per position), broadcast back to the batch."""
    return {name: act.mean(0, keepdim=True).expand_as(act) for name, act in activations.items()}


def _check_kind(kind: str, source_tokens: Tokens | None, base_tokens: Tokens) -> None:
    if kind not in REPLACEMENT_KINDS:
        raise ValueError(f"replacement kind must be one of {', '.join(map(repr, REPLACEMENT_KINDS))}, got {kind!r}")
    if kind in ("resample", "patch"):
        if source_tokens is None:
            raise ValueError(f"replacement kind {kind!r} needs source_tokens")
        if source_tokens.shape != base_tokens.shape:
            raise ValueError(
                f"source_tokens {tuple(source_tokens.shape)} and base_tokens {tuple(base_tokens.shape)} "
                "must have the same shape, so each prompt is patched from its own twin"
            )
    if kind == "mean" and source_tokens is not None and source_tokens.shape[1] != base_tokens.shape[1]:
        raise ValueError(
            f"mean replacement: source_tokens have {source_tokens.shape[1]} positions but base_tokens "
            f"have {base_tokens.shape[1]}; the mean is taken per position"
        )


def replacement_activations(
    model,
    family: str | Family,
    *,
    kind: ReplacementKind,
    base_tokens: Tokens,
    source_tokens: Tokens | None = None,
) -> Activations:
    """Replacement activations for every layer of ``family``, shaped like the base run's.

    * ``"zero"``: what makes the component write nothing. For head outputs
      (``hook_z``, whose value bias compatibility mode folds into ``b_O``) that
      is ``−b_V^eff`` per head, not 0; for every other family, zeros
      (:mod:`zero_ablation` says which coordinates each family's zero acts on).
    * ``"folded_zero"``: zeros in the hook's own coordinates (for heads: the
      head still writes its value bias).
    * ``"mean"``: the mean over ``source_tokens`` (default: the base prompts), per position.
    * ``"resample"`` / ``"patch"``: the activations on ``source_tokens`` row by row
      (other prompts for resampling, the corrupted or clean twins for patching).
      Resample sources from :func:`prompts.make_ioi_prompts` with another seed keep
      each prompt's ABBA/BABA order (a confound; see that function).
    """
    names = hook_names(model, family)
    check_tokens(base_tokens, "base_tokens")
    _check_kind(kind, source_tokens, base_tokens)
    if kind in ("zero", "folded_zero"):
        base = cache_activations(model, base_tokens[:1], names)
        like = {n: a.expand(base_tokens.shape[0], *a.shape[1:]) for n, a in base.items()}
        return _zero_kind_replacement(model, get_family(family), kind, like)
    if kind == "mean":
        source = base_tokens if source_tokens is None else source_tokens
        means = cache_activations(model, source, names)
        return {n: a.mean(0, keepdim=True).expand(base_tokens.shape[0], *a.shape[1:]) for n, a in means.items()}
    return cache_activations(model, source_tokens, names)


# ---------------------------------------------------------------- exact


def exact_effect(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    layer: int,
    component: tuple[int, ...],
) -> float:
    """``M(base with one component replaced) - M(base)``, exactly, by rerunning."""
    fam = get_family(family)
    name = fam.hook_name(layer)
    index = component_index(fam, component)

    def replace(act, hook):
        act = act.clone()
        act[index] = replacements[name][index].to(act.dtype)
        return act

    with torch.no_grad():
        base = metric(model(base_tokens)).item()
        patched = metric(model.run_with_hooks(base_tokens, fwd_hooks=[(name, replace)])).item()
    return patched - base


def _components(model, family: Family, n_positions: int, positions: Sequence[int] | None) -> torch.Tensor:
    """Every ``(layer, *component)`` index of a sweep, as rows of an int tensor, layer-major."""
    shape = effect_shape(model, family, n_positions)
    grids = [torch.arange(size) for size in shape]
    if positions is not None:
        if "pos" not in family.component_axes:
            raise ValueError(f"positions= only applies to families indexed by position, not {family.name!r}")
        chosen = torch.as_tensor(list(positions), dtype=torch.long)
        if chosen.numel() == 0 or chosen.min() < 0 or chosen.max() >= n_positions:
            raise ValueError(f"positions must be a non-empty list of positions in 0..{n_positions - 1}, got {list(positions)}")
        grids[1 + family.component_axes.index("pos")] = chosen.unique()
    return torch.cartesian_prod(*grids).reshape(-1, len(shape))


def _first_changed_position(family: Family, component: Sequence[int]) -> int:
    """The earliest position a replacement can change (causal attention: nothing before it)."""
    if "pos" in family.component_axes:
        return int(component[family.component_axes.index("pos")])
    return 0


def _replace_components(
    stacked: torch.Tensor,
    source: torch.Tensor,
    family: Family,
    components: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy, in variant ``k`` of ``stacked``, component ``components[k]`` from ``source``.

    ``stacked`` is ``[n_variants * batch, *axes]`` (variant-major), ``source`` is
    ``[batch, *axes]`` and ``components`` is ``[n_variants, len(component_axes)]``
    (no layer column). ``positions`` (default: all) are the absolute positions
    held along ``stacked``'s ``pos``/``query`` axis, when it holds only some; a
    component at a position not held is not there to replace. One
    ``torch.where`` with a boolean mask does every variant at once; the values
    copied are exactly the loop's.
    """
    n_variants = components.shape[0]
    batch = source.shape[0]
    position_axis = next((1 + i for i, a in enumerate(family.axes) if a in ("pos", "query")), None)
    if positions is not None and position_axis is not None:
        source = source.index_select(position_axis, positions)
    sizes = stacked.shape[1:]
    mask_shape = [n_variants] + [sizes[i] if axis in family.component_axes else 1 for i, axis in enumerate(family.axes)]
    mask = torch.zeros(mask_shape, dtype=torch.bool)
    index: list[torch.Tensor] = [torch.arange(n_variants)]
    held = torch.ones(n_variants, dtype=torch.bool)
    for axis in family.axes:
        if axis not in family.component_axes:
            index.append(torch.zeros(n_variants, dtype=torch.long))
            continue
        column = components[:, family.component_axes.index(axis)]
        if axis == "pos" and positions is not None:
            matches = column.unsqueeze(1) == positions.unsqueeze(0)  # [n_variants, n_held]
            held &= matches.any(1)
            column = matches.long().argmax(1)
        index.append(column)
    mask[tuple(i[held] for i in index)] = True
    by_variant = stacked.reshape(n_variants, batch, *sizes)
    patched = torch.where(mask.unsqueeze(1), source.to(stacked.dtype).unsqueeze(0), by_variant)
    return patched.reshape(stacked.shape)


def positions_read_by(metric: Metric, logits: torch.Tensor) -> list[int] | None:
    """The positions whose logits ``metric`` reads, or ``None`` if that cannot be told.

    Position ``t`` counts as unread when setting every logit there to NaN leaves
    the metric's value unchanged (a metric that reads a NaN returns NaN).
    """
    reference = metric(logits)
    if not torch.isfinite(reference).all():
        return None
    read = []
    for t in range(logits.shape[1]):
        probe = logits.clone()
        probe[:, t] = float("nan")
        value = metric(probe)
        if not torch.equal(value, reference):
            read.append(t)
    return read or None


def _rows_per_pass(model, n_positions: int, memory_budget_bytes: int) -> int:
    """How many prompt-rows one forward pass may hold within ``memory_budget_bytes``.

    A generous estimate of the float32 tensors alive per row: the residual
    stream and its norms, the MLP hidden layer, the attention scores and
    pattern, and the logits.
    """
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    floats_per_row = n_positions * (8 * cfg.d_model + 2 * d_mlp + 3 * cfg.n_heads * n_positions + 2 * cfg.d_vocab)
    return max(1, memory_budget_bytes // (4 * floats_per_row))


#: Default memory for one batched pass of an exact sweep (activations only). Small on
#: purpose: on CPU, stacking more variants into a bridge forward does not make it faster.
DEFAULT_PASS_MEMORY = 32 * 2**20

Engine = Literal["auto", "prefix", "stacked", "loop"]


def exact_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    *,
    variants_per_pass: int | None = None,
    progress: bool = False,
    positions: Sequence[int] | None = None,
    engine: Engine = "auto",
    memory_budget_bytes: int = DEFAULT_PASS_MEMORY,
    metric_positions: Sequence[int] | Literal["auto"] | None = "auto",
) -> torch.Tensor:
    """Exact effect of replacing each component of ``family`` in turn.

    Returns ``M(patched) - M(base)`` with shape :func:`effect_shape` (entries
    outside ``positions``, if given, are NaN). Every entry is a real rerun of
    the model with one component replaced; the engines differ only in how much
    redundant work they skip:

    * ``"loop"``: one TransformerBridge forward per component (the textbook
      loop, and what ``transformer_lens.patching`` does);
    * ``"stacked"``: ``variants_per_pass`` patched copies of the batch stacked
      along the batch axis in one bridge forward, the copies patched by one
      vectorised ``torch.where`` per hook;
    * ``"prefix"``: for GPT-2-style models, a functional forward over the
      bridge's own weights (see :class:`GPT2Weights`) that starts each variant at
      the patched layer from the cached base residual stream, and at the
      patched position with the base run's keys and values for earlier
      positions (causal attention: they cannot change). Variants that share a
      layer and a first position run stacked in one pass. It checks itself
      against the bridge's logits and hook activations on the base run and is
      used only if they agree (max abs difference <= :data:`FUNCTIONAL_TOLERANCE`).
      Its last block runs only at the positions whose logits the metric
      reads (``metric_positions``; ``"auto"`` finds them with
      :func:`positions_read_by`, ``None`` means all), since the last block's
      output elsewhere cannot reach the metric; the logits it does not compute
      are NaN, and a metric that reads one raises an error.
    * ``"auto"``: ``"loop"`` if ``variants_per_pass == 1`` (so old calls keep
      meaning the plain loop), else ``"prefix"`` when it applies, else
      ``"stacked"`` on a GPU and ``"loop"`` on the CPU (where the benchmark
      finds stacked bridge passes slower than the loop).

    ``variants_per_pass`` (default: as many as fit ``memory_budget_bytes``) caps
    how many variants share one pass in the stacked and prefix engines.
    """
    from tqdm.auto import tqdm

    fam = get_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    if engine not in ("auto", "prefix", "stacked", "loop"):
        raise ValueError(f"engine must be 'auto', 'prefix', 'stacked' or 'loop', got {engine!r}")
    if variants_per_pass is not None and variants_per_pass < 1:
        raise ValueError(f"variants_per_pass must be at least 1, got {variants_per_pass}")
    batch, n_positions = base_tokens.shape
    if variants_per_pass is None:
        variants_per_pass = max(1, _rows_per_pass(model, n_positions, memory_budget_bytes) // batch)
    runner = None
    if engine == "auto":
        if variants_per_pass == 1:
            engine = "loop"
        else:
            runner, _ = _verified_prefix_runner(model, base_tokens, fam, replacements)
            # measured on CPU (python -m attribution_course.bench): stacked bridge passes are
            # slower than the plain loop there; on a GPU stacking is what pays
            engine = "prefix" if runner is not None else ("stacked" if base_tokens.is_cuda else "loop")
    elif engine == "prefix":
        runner, problem = _verified_prefix_runner(model, base_tokens, fam, replacements)
        if problem is not None:
            raise ValueError(f"engine='prefix' cannot run this model: {problem}")
    if engine == "loop":
        variants_per_pass = 1

    shape = effect_shape(model, fam, n_positions)
    components = _components(model, fam, n_positions, positions)
    effects = torch.full(shape, float("nan"))
    # group the variants that can share one pass: same layer (and, for the prefix engine, same first position)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (layer, *rest) in enumerate(components.tolist()):
        first = _first_changed_position(fam, rest) if engine == "prefix" else 0
        groups.setdefault((layer, first), []).append(k)
    chunks = [
        (layer, first, members[start : start + variants_per_pass])
        for (layer, first), members in groups.items()
        for start in range(0, len(members), variants_per_pass)
    ]
    with torch.no_grad():
        if engine == "prefix":
            base_logits = runner.base_logits
        else:
            base_logits = model(base_tokens)
        base_value = metric(base_logits).item()
        read_positions = positions_read_by(metric, base_logits) if metric_positions == "auto" else metric_positions
        for layer, first, members in tqdm(chunks, disable=not progress, desc=f"exact {fam.name}"):
            chunk_components = components[members][:, 1:]
            if engine == "prefix":
                logits = runner.run(layer, first, chunk_components, read_positions)
            else:
                name = fam.hook_name(layer)

                def replace(act, hook, name=name, chunk_components=chunk_components):
                    return _replace_components(act, replacements[name], fam, chunk_components)

                stacked_tokens = base_tokens.repeat(len(members), 1)
                logits = model.run_with_hooks(stacked_tokens, fwd_hooks=[(name, replace)])
            for k, row in enumerate(members):
                value = metric(logits[k * batch : (k + 1) * batch]).item()
                if math.isnan(value) and not math.isnan(base_value):
                    raise RuntimeError(
                        f"the metric read logits at positions other than metric_positions={read_positions}; "
                        "pass metric_positions=None"
                    )
                effects[tuple(components[row].tolist())] = value - base_value
    return effects


# ---------------------------------------------------------------- the prefix engine (GPT-2)


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
_FUNCTIONAL_SITES = {
    "blocks.{layer}.hook_resid_pre": "resid_pre",
    "blocks.{layer}.attn.hook_pattern": "pattern",
    "blocks.{layer}.attn.hook_z": "z",
    "blocks.{layer}.hook_attn_out": "attn_out",
    "blocks.{layer}.hook_mlp_out": "mlp_out",
}


class _PrefixRunner:
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
        self.site = _FUNCTIONAL_SITES[family.hook]
        self.batch, self.n_positions = base_tokens.shape
        self.base_resid: list[torch.Tensor] = []
        self.base_keys: list[torch.Tensor] = []
        self.base_values: list[torch.Tensor] = []
        self.base_activations: Activations = {}
        self.base_logits = self._forward_base(base_tokens)

    # -- pieces of a GPT-2 block
    def _norm(self, x, weight, bias):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.weights.eps)

    def _heads(self, x):  # [rows, pos, d_model] -> [rows, head, pos, d_head]
        rows, pos, d_model = x.shape
        return x.view(rows, pos, self.weights.n_heads, d_model // self.weights.n_heads).transpose(1, 2)

    def _block(self, layer, resid, positions, keys_before, values_before, patch=None, queries=None):
        """One block on the residual stream at ``positions`` (absolute, contiguous up to the end).

        ``keys_before``/``values_before`` hold earlier positions' keys and values.
        ``queries`` (indices into ``positions``) limits what the block outputs to
        those positions (their keys and values are still computed for all).
        ``patch(site, act, positions_of_act)`` may replace an activation.
        """
        w = self.weights.blocks[layer]
        if patch is not None:
            resid = patch("resid_pre", resid, positions)
        qkv = torch.addmm(w["qkv_b"], self._norm(resid, w["ln_1_w"], w["ln_1_b"]).flatten(0, 1), w["qkv_w"])
        q, k, v = qkv.view(resid.shape[0], resid.shape[1], -1).split(resid.shape[-1], dim=-1)
        out_positions = positions
        if queries is not None:
            q, resid, out_positions = q[:, queries], resid[:, queries], positions[queries]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if keys_before is not None:
            k = torch.cat([keys_before, k], dim=2)
            v = torch.cat([values_before, v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        key_positions = torch.arange(k.shape[2])
        scores = scores.masked_fill(key_positions.unsqueeze(0) > out_positions.unsqueeze(1), float("-inf"))
        pattern = scores.softmax(-1)
        if patch is not None:
            pattern = patch("pattern", pattern, out_positions)
        z = (pattern @ v).transpose(1, 2)  # [rows, pos, head, d_head]
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
        sites = {"resid_pre": resid, "pattern": pattern, "z": z, "attn_out": attn_out, "mlp_out": mlp_out}
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
            self.base_activations[self.family.hook_name(layer)] = sites[self.site]
        return self._unembed(resid)

    def run(self, layer: int, first: int, components: torch.Tensor, read_positions: Sequence[int] | None = None) -> torch.Tensor:
        """Logits ``[n_variants * batch, pos, vocab]`` of the variants patched at ``layer``.

        Only positions ``first..`` are recomputed (earlier ones are the base
        run's, exactly). With ``read_positions`` (the positions the metric
        reads), the last block and the unembedding run only there and every
        other recomputed position's logits are NaN, so a metric that reads
        them anyway gives NaN instead of a wrong number.
        """
        n_variants = components.shape[0]
        n_layers = len(self.weights.blocks)
        repeat = lambda t: t.repeat(n_variants, *([1] * (t.ndim - 1)))  # noqa: E731
        source = self.replacements[self.family.hook_name(layer)]

        def patch(site, act, positions):
            return _replace_components(act, source, self.family, components, positions) if site == self.site else act

        positions = torch.arange(first, self.n_positions)
        resid = repeat(self.base_resid[layer][:, first:])
        queries = None
        for current in range(layer, n_layers):
            before = (repeat(self.base_keys[current][:, :, :first]), repeat(self.base_values[current][:, :, :first])) if first else (None, None)
            if current == n_layers - 1 and read_positions is not None:
                queries = torch.tensor([i for i, t in enumerate(positions.tolist()) if t in read_positions], dtype=torch.long)
            resid, _, _, _ = self._block(current, resid, positions, *before, patch=patch if current == layer else None, queries=queries)
        computed = self._unembed(resid)
        if queries is None:
            logits = computed
        else:
            logits = computed.new_full((computed.shape[0], len(positions), computed.shape[-1]), float("nan"))
            logits[:, queries] = computed
        if first:
            logits = torch.cat([repeat(self.base_logits[:, :first]), logits], dim=1)
        return logits


#: How closely the functional forward must reproduce the bridge before it is trusted.
FUNCTIONAL_TOLERANCE = 1e-4


def functional_engine_problem(model, base_tokens: Tokens, family: str | Family, replacements: Activations | None = None) -> str | None:
    """Why the prefix engine cannot run ``family`` on ``model``, or ``None`` if it can.

    Besides the architecture checks, it runs the base prompts through the bridge
    and the functional forward and compares the logits and the family's hook
    activations (max abs difference at most :data:`FUNCTIONAL_TOLERANCE`).
    """
    return _verified_prefix_runner(model, base_tokens, get_family(family), replacements or {})[1]


def _verified_prefix_runner(model, base_tokens: Tokens, fam: Family, replacements: Activations) -> tuple["_PrefixRunner | None", str | None]:
    """A prefix runner for the base run and ``None``, or ``None`` and the reason it cannot be trusted."""
    if fam.hook not in _FUNCTIONAL_SITES:
        return None, f"hook {fam.hook} has no place in the functional forward"
    try:
        with torch.no_grad():
            runner = _PrefixRunner(model, base_tokens, fam, replacements)
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


# ---------------------------------------------------------------- attribution


def attribution_estimate(
    activations: Activations,
    gradients: Activations,
    replacements: Activations,
    family: str | Family,
) -> torch.Tensor:
    """First-order estimate ``(a' - a) · ∂M/∂a`` for every component of ``family``.

    ``activations`` and ``gradients`` come from the base run, with the metric
    averaged over the batch; the product is summed over the batch and every
    axis that does not index a component. Shape :func:`effect_shape`.
    """
    fam = get_family(family)
    keep = [1 + fam.axes.index(axis) for axis in fam.component_axes]
    per_layer = []
    for name in sorted(activations, key=layer_of_hook):
        if name not in gradients or name not in replacements:
            raise ValueError(f"hook {name!r} has an activation but no gradient or replacement")
        product = (replacements[name].to(activations[name].dtype) - activations[name]) * gradients[name]
        summed = [d for d in range(product.ndim) if d not in keep]
        reduced = product.sum(dim=summed)
        # summing leaves the kept axes in activation order; put them in component order
        order = sorted(keep)
        reduced = reduced.permute(*[order.index(k) for k in keep]) if len(keep) > 1 else reduced
        per_layer.append(reduced)
    return torch.stack(per_layer)


def layer_of_hook(name: str) -> int:
    """The layer of a per-layer hook name: ``blocks.3.attn.hook_z`` -> 3."""
    return int(name.split(".")[1])


def attribution_sweep(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
) -> torch.Tensor:
    """Attribution for every component of ``family``: one forward and one backward pass."""
    fam = get_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    names = hook_names(model, fam)
    _, activations, gradients = cache_activations_and_gradients(model, base_tokens, metric, names)
    return attribution_estimate(activations, gradients, replacements, fam)


def attribution_sweeps(
    model,
    base_tokens: Tokens,
    metric: Metric,
    families: Sequence[str | Family],
    *,
    kind: ReplacementKind,
    source_tokens: Tokens | None = None,
) -> dict[str, torch.Tensor]:
    """Attribution for several component families at once, at the cost floor.

    One forward pass on ``source_tokens`` (only for ``"patch"``/``"resample"``,
    or ``"mean"`` over a separate reference set) caches the replacements, and
    one forward plus one backward pass on ``base_tokens`` gives every family's
    activations and gradients: hooks sit only on the hook points the families
    need, parameters are frozen for the call and the backward stops at the
    earliest of those hook points. ``"zero"`` and ``"mean"`` over the base
    prompts need no second forward at all.

    Noising: ``base_tokens`` = clean, ``source_tokens`` = corrupted;
    denoising: the other way round (:func:`base_and_source`).
    Returns ``{family name: estimate}``, each shaped :func:`effect_shape`.
    """
    if not families:
        raise ValueError("families must name at least one component family")
    fams = [get_family(f) for f in families]
    check_tokens(base_tokens, "base_tokens")
    _check_kind(kind, source_tokens, base_tokens)
    names = list(dict.fromkeys(name for fam in fams for name in hook_names(model, fam)))
    if kind in ("patch", "resample") or (kind == "mean" and source_tokens is not None):
        source = cache_activations(model, source_tokens, names)
    _, activations, gradients = cache_activations_and_gradients(model, base_tokens, metric, names)
    if kind in ("zero", "folded_zero"):
        replacements = {}
        for fam in fams:
            mine = {n: activations[n] for n in hook_names(model, fam)}
            replacements.update(_zero_kind_replacement(model, fam, kind, mine))
    elif kind == "mean":
        means = activations if source_tokens is None else source
        replacements = {n: means[n].mean(0, keepdim=True).expand_as(activations[n]) for n in names}
    else:
        replacements = source
    results = {}
    for fam in fams:
        mine = set(hook_names(model, fam))
        pick = lambda store: {n: t for n, t in store.items() if n in mine}  # noqa: E731
        results[fam.name] = attribution_estimate(pick(activations), pick(gradients), pick(replacements), fam)
    return results


Direction = Literal["noising", "denoising"]


def base_and_source(clean_tokens: Tokens, corrupted_tokens: Tokens, direction: Direction) -> tuple[Tokens, Tokens]:
    """``(base_tokens, source_tokens)`` for clean/corrupt patching in ``direction``.

    Noising runs the clean prompts and patches in corrupted activations;
    denoising runs the corrupted prompts and patches in clean activations.
    """
    if direction == "noising":
        return clean_tokens, corrupted_tokens
    if direction == "denoising":
        return corrupted_tokens, clean_tokens
    raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
