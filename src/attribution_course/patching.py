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
    return exact_joint_effect(model, base_tokens, metric, replacements, family, [(layer, *component)])


def exact_joint_effect(
    model,
    base_tokens: Tokens,
    metric: Metric,
    replacements: Activations,
    family: str | Family,
    components: Sequence[tuple[int, ...]],
) -> float:
    """``M(base with every listed component replaced at once) - M(base)``, exactly.

    ``components`` holds ``(layer, *component)`` tuples, e.g. ``[(3, 1), (2, 0)]``
    for heads L3H1 and L2H0. With one component this is :func:`exact_effect`; with
    several, the result need not be the sum of their single effects (interactions).
    """
    fam = get_family(family)
    if not components:
        raise ValueError("exact_joint_effect: `components` is empty; list at least one (layer, *component) tuple")
    indices: dict[str, list[tuple]] = {}
    for layer, *component in components:
        indices.setdefault(fam.hook_name(layer), []).append(component_index(fam, tuple(component)))

    def replacer(name: str):
        # one closure per hook name: the bridge may report an aliased name at run time
        def replace(act, hook):
            act = act.clone()
            for index in indices[name]:
                act[index] = replacements[name][index].to(act.dtype)
            return act

        return replace

    with torch.no_grad():
        base = metric(model(base_tokens)).item()
        patched = metric(model.run_with_hooks(base_tokens, fwd_hooks=[(name, replacer(name)) for name in indices])).item()
    return patched - base


def direct_path_effects(
    model,
    base_tokens: Tokens,
    source_tokens: Tokens,
    metric: Metric,
) -> Float[torch.Tensor, "layer head"]:
    """Each head's *direct* effect: patch only its path to the logits, exactly.

    For head ``h`` of layer ``l``, the base run is rerun with the head's output
    change ``(z'_h - z_h) W_O[l, h]`` (``z'`` from ``source_tokens``) added to the
    residual stream after the last block, so the final LayerNorm and the
    unembedding see it but no later layer does. The total effect
    (:func:`exact_sweep` with family ``"head"``) also lets every later component
    respond, down to the last block's MLP (the only difference for a head in the
    last layer). Path patching restricted to
    the head-to-logits path (Wang et al. 2022). ``M(patched) - M(base)``, ``[layer, head]``.
    """
    check_tokens(base_tokens, "base_tokens")
    check_tokens(source_tokens, "source_tokens")
    names = hook_names(model, "head")
    base = cache_activations(model, base_tokens, names)
    source = cache_activations(model, source_tokens, names)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    effects = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    with torch.no_grad():
        base_value = metric(model(base_tokens)).item()
        for layer, name in enumerate(names):
            for head in range(model.cfg.n_heads):
                step = source[name][:, :, head] - base[name][:, :, head]  # [batch, pos, d_head]
                written = step @ model.W_O[layer, head]                      # [batch, pos, d_model]

                def add_direct_path(resid, hook, written=written):
                    return resid + written.to(resid.dtype)

                effects[layer, head] = metric(model.run_with_hooks(base_tokens, fwd_hooks=[(last, add_direct_path)])).item() - base_value
    return effects


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


def _bridge_rows_per_pass(model, n_positions: int, memory_budget_bytes: int) -> int:
    """How many prompt-rows one TransformerBridge forward may hold within ``memory_budget_bytes``.

    A generous estimate of the float32 tensors alive per row: the residual
    stream and its norms, the MLP hidden layer, the attention scores and
    pattern, and the logits (a bridge forward unembeds every position). The
    prefix engine sizes its own passes (:meth:`exact_engine.PrefixRunner.rows_per_pass`).
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
    * ``"prefix"`` (:mod:`attribution_course.exact_engine`): for GPT-2-style
      models, a functional forward over the bridge's own weights that starts
      each variant at the patched layer from the cached base residual stream,
      and at the patched position with the base run's keys and values for
      earlier positions (causal attention: they cannot change). Variants that
      share a layer and a first position run stacked in one pass. It checks
      itself against the bridge's logits and hook activations on the base run
      and is used only if they agree (max abs difference <=
      :data:`exact_engine.FUNCTIONAL_TOLERANCE`). Its last block runs only at the
      positions whose logits the metric reads (``metric_positions``; ``"auto"``
      finds them with :func:`positions_read_by`, ``None`` means all), since the
      last block's output elsewhere cannot reach the metric; the metric sees NaN
      at every position it does not read, and a metric that reads one anyway
      raises an error.
    * ``"auto"``: ``"loop"`` if the caller passes ``variants_per_pass=1`` (so
      old calls keep meaning the plain loop), else ``"prefix"`` whenever it
      applies, at any batch size or vocabulary, else ``"stacked"`` on a GPU and
      ``"loop"`` on the CPU (where the benchmark finds stacked bridge passes
      slower than the loop).

    ``variants_per_pass`` (default: as many as fit ``memory_budget_bytes``, sized
    by what each engine allocates) caps how many variants share one pass. When
    not even one variant of the whole batch fits, the prefix engine splits the
    batch into row chunks rather than leave the engine.
    """
    from tqdm.auto import tqdm

    from . import exact_engine

    fam = get_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    if engine not in ("auto", "prefix", "stacked", "loop"):
        raise ValueError(f"engine must be 'auto', 'prefix', 'stacked' or 'loop', got {engine!r}")
    if variants_per_pass is not None and variants_per_pass < 1:
        raise ValueError(f"variants_per_pass must be at least 1, got {variants_per_pass}")
    if engine == "auto" and variants_per_pass == 1:
        engine = "loop"
    runner = None
    if engine in ("auto", "prefix"):
        runner, problem = exact_engine.verified_prefix_runner(model, base_tokens, fam, replacements)
        if runner is not None:
            engine = "prefix"
        elif engine == "prefix":
            raise ValueError(f"engine='prefix' cannot run this model: {problem}")
        else:
            # measured on CPU (python -m attribution_course.bench): stacked bridge passes are
            # slower than the plain loop there; on a GPU stacking is what pays
            engine = "stacked" if base_tokens.is_cuda else "loop"

    batch, n_positions = base_tokens.shape
    components = _components(model, fam, n_positions, positions)
    effects = torch.full(effect_shape(model, fam, n_positions), float("nan"))
    with torch.no_grad():
        base_logits = runner.base_logits if engine == "prefix" else model(base_tokens)
        base_value = metric(base_logits).item()
        read_positions = positions_read_by(metric, base_logits) if metric_positions == "auto" else metric_positions
        if engine == "prefix":

            def rows_per_pass(first: int) -> int:
                if variants_per_pass is not None:
                    return variants_per_pass * batch
                return runner.rows_per_pass(first, read_positions, memory_budget_bytes)

            def logits_of(layer, first, chunk_components, shown):
                return exact_engine.variant_logits(runner, shown, layer, first, chunk_components, read_positions, rows_per_pass(first))

            chunks = _chunks(fam, components, lambda first: max(1, rows_per_pass(first) // batch), by_first_position=True)
        else:
            bridge_variants = variants_per_pass or max(1, _bridge_rows_per_pass(model, n_positions, memory_budget_bytes) // batch)

            def logits_of(layer, first, chunk_components, shown):
                return _bridge_variant_logits(model, base_tokens, replacements, fam, layer, chunk_components)

            chunks = _chunks(fam, components, lambda first: 1 if engine == "loop" else bridge_variants, by_first_position=False)
        bar = tqdm(total=len(chunks), disable=not progress, desc=f"exact {fam.name}")

        def metric_values(share):
            """``(component row, M(patched))`` for every variant of the passes in ``share``."""
            values = []
            # a buffer per share: shares may run in parallel threads
            shown = exact_engine.VariantLogits(base_logits, read_positions) if engine == "prefix" else None
            for layer, first, members in share:
                for row, logits in zip(members, logits_of(layer, first, components[members][:, 1:], shown)):
                    value = metric(logits).item()
                    if math.isnan(value) and not math.isnan(base_value):
                        raise RuntimeError(
                            f"the metric read logits at positions other than metric_positions={read_positions}; "
                            "pass metric_positions=None"
                        )
                    values.append((row, value))
                bar.update(1)
            return values

        # the prefix engine's passes are independent: with n torch threads, n Python threads run
        # their own share of passes (one torch thread each), since its small matrix products
        # leave a second intra-op thread mostly idle
        values = exact_engine.over_threads(metric_values, chunks, torch.get_num_threads() if engine == "prefix" else 1)
        bar.close()
        for row, value in values:
            effects[tuple(components[row].tolist())] = value - base_value
    return effects


def _chunks(
    family: Family, components: torch.Tensor, variants_per_pass: Callable[[int], int], *, by_first_position: bool
) -> list[tuple[int, int, list[int]]]:
    """``(layer, first position, rows of components)`` for each pass of a sweep.

    Variants share a pass when they share a layer (and, with ``by_first_position``,
    the first position they can change); ``variants_per_pass(first)`` caps a pass.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (layer, *rest) in enumerate(components.tolist()):
        first = _first_changed_position(family, rest) if by_first_position else 0
        groups.setdefault((layer, first), []).append(k)
    chunks = []
    for (layer, first), members in groups.items():
        size = variants_per_pass(first)
        chunks += [(layer, first, members[start : start + size]) for start in range(0, len(members), size)]
    return chunks


def _bridge_variant_logits(model, base_tokens: Tokens, replacements: Activations, family: Family, layer: int, components: torch.Tensor):
    """Each variant's ``[batch, pos, vocab]`` logits from one bridge forward over the stacked copies."""
    name = family.hook_name(layer)

    def replace(act, hook):
        return _replace_components(act, replacements[name], family, components)

    batch = base_tokens.shape[0]
    logits = model.run_with_hooks(base_tokens.repeat(components.shape[0], 1), fwd_hooks=[(name, replace)])
    return (logits[k * batch : (k + 1) * batch] for k in range(components.shape[0]))


_ENGINE_NAMES = ("GPT2Weights", "FUNCTIONAL_TOLERANCE", "functional_engine_problem")


def __getattr__(name: str):
    """The prefix engine's public names, still importable from here (they live in :mod:`exact_engine`)."""
    if name in _ENGINE_NAMES:
        from . import exact_engine

        return getattr(exact_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    engine: Literal["auto", "bridge", "bare"] = "bridge",
) -> torch.Tensor:
    """Attribution for every component of ``family``: one forward and one backward pass.

    ``engine`` as in :func:`attribution_sweeps`, but the bridge by default: ``replacements``
    were computed by the caller, and ``a' - a`` must come from one engine, or a small step
    (``a' = a + ε·δ``, or positions where ``a' = a``) is swamped by the two engines' float
    rounding (~1e-6 relative). :func:`attribution_sweeps` computes both on the bare twin.
    """
    fam = get_family(family)
    check_tokens(base_tokens, "base_tokens")
    check_replacements(model, replacements, fam, base_tokens)
    names = hook_names(model, fam)
    _, activations, gradients = _caching_engine(model, names, engine)[1](model, base_tokens, metric, names)
    return attribution_estimate(activations, gradients, replacements, fam)


def _caching_engine(model, names: list[str], engine: str):
    """``(cache_activations, cache_activations_and_gradients)`` of the engine that serves ``names``."""
    from . import attribution_engine

    if engine not in ("auto", "bridge", "bare"):
        raise ValueError(f"engine must be 'auto', 'bridge' or 'bare', got {engine!r}")
    usable = engine != "bridge" and attribution_engine.usable(model, names)
    if engine == "bare" and not usable:
        raise ValueError(f"engine='bare' cannot serve hooks {names[0]} ... on this model "
                         "(the attention pattern, a model not from load_model, or hooks attached to the bridge)")
    if usable:
        return attribution_engine.cache_activations, attribution_engine.cache_activations_and_gradients
    return cache_activations, cache_activations_and_gradients


def attribution_sweeps(
    model,
    base_tokens: Tokens,
    metric: Metric,
    families: Sequence[str | Family],
    *,
    kind: ReplacementKind,
    source_tokens: Tokens | None = None,
    engine: Literal["auto", "bridge", "bare"] = "auto",
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

    ``engine="auto"`` runs both passes on the bare ``transformers`` twin of the bridge
    (:mod:`attribution_engine`: same hook names and numbers, without the bridge's
    overhead) whenever it serves every family and no hooks are attached to the
    bridge; ``"bridge"`` always uses the bridge; ``"bare"`` insists on the twin.
    """
    if not families:
        raise ValueError("families must name at least one component family")
    fams = [get_family(f) for f in families]
    check_tokens(base_tokens, "base_tokens")
    _check_kind(kind, source_tokens, base_tokens)
    names = list(dict.fromkeys(name for fam in fams for name in hook_names(model, fam)))
    cache, cache_with_gradients = _caching_engine(model, names, engine)
    if kind in ("patch", "resample") or (kind == "mean" and source_tokens is not None):
        source = cache(model, source_tokens, names)
    _, activations, gradients = cache_with_gradients(model, base_tokens, metric, names)
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
