"""Hidden inputs: every graded exercise is also run on inputs drawn at grading time.

A check cell uses one fixed input, printed in the notebook, so a constant return or a
mistake that happens not to matter on that input (``.all`` for ``.any``, a missing
``abs``, a fixed position, a global used instead of an argument) can pass. The grader
gives the learner's run and the reference run the same random seed
(``ATTRIBUTION_COURSE_HIDDEN_SEED``); both draw the same inputs with
:func:`hidden_inputs`, the learner's run calls the learner's function on them and the
reference run calls the published solution, and the grader compares the results too.

The inputs are chosen so that the common mistakes give different answers:

* numbers and tensors: random values of both signs, the largest ones negative where
  ``abs`` matters, axes of distinct lengths (a swapped axis changes the shape or the values);
* the model's exercises: other prompts (a few, to keep grading fast), their own metric,
  the other patching direction (noising where the notebook denoises), so that a function
  reading the notebook's globals (``tokens``, ``metric``, ``clean``) instead of its
  arguments, or running the wrong base run, gives another answer;
* the gradient exercises: another metric, so the gradient of the notebook's metric is wrong.

Structural sizes that the model fixes (layers, heads, ``d_head``, ``d_model``, the prompt
length) are kept, since a solution may legitimately read them from ``model.cfg`` or the
notebook. Generators draw from their own ``torch.Generator``: the global random state of
the notebook is left as it was.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

SEED_ENV = "ATTRIBUTION_COURSE_HIDDEN_SEED"


# ---------------------------------------------------------------- chapter 2: logits and tokens only


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


# ---------------------------------------------------------------- the model's exercises (chapters 3-8)


def _model():
    """The notebook's ``model`` (loading the shipped model costs seconds per kernel), else the shipped model.

    Learner code that changed its ``model`` only changes its own results: the expected values
    come from the reference run."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        model = shell.user_ns.get("model") if shell is not None else None
    except ImportError:
        model = None
    if hasattr(model, "cfg") and hasattr(model, "run_with_hooks"):
        return model
    return _shipped_model()


@functools.lru_cache(maxsize=1)
def _shipped_model():
    from attribution_course.model import load_model

    with torch.random.fork_rng():
        return load_model()


class _Draw:
    """What one exercise's generator needs: the random generator, the model and its sizes."""

    def __init__(self, g: torch.Generator, model=None):
        self.g = g
        self.model = model if model is not None else _model()
        cfg = self.model.cfg
        self.n_layers, self.n_heads, self.d_head, self.d_model = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model
        self.z_names = [f"blocks.{l}.attn.hook_z" for l in range(self.n_layers)]
        self.resid_names = [f"blocks.{l}.hook_resid_pre" for l in range(self.n_layers)]
        self.pattern_names = [f"blocks.{l}.attn.hook_pattern" for l in range(self.n_layers)]
        self.n_positions = self.prompts(1).clean_tokens.shape[1]

    def integer(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (), generator=self.g))

    def prompts(self, n: int):
        """``n`` IOI prompts with a seed the notebook never uses (it uses 0 and 1)."""
        from attribution_course.prompts import make_ioi_prompts

        corruption = "swap" if self.integer(0, 2) else "abc"
        return make_ioi_prompts(self.model, n, seed=1000 + self.integer(0, 10**6), corruption=corruption)

    def metric(self, prompts, flavour: int | None = None):
        """A metric on ``prompts``: their logit difference, or (``flavour=1``) the IO logit's log-probability."""
        from attribution_course.metrics import logit_diff

        flavour = self.integer(0, 2) if flavour is None else flavour
        if flavour == 0:
            return lambda logits: logit_diff(logits, prompts)
        rows = torch.arange(len(prompts))

        def io_log_prob(logits):
            final = logits[:, prompts.end_position].log_softmax(-1)
            return final[rows, prompts.io_token].mean()

        return io_log_prob

    def normal(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale

    def per_layer(self, names: list[str], *shape: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {name: self.normal(*shape, scale=scale) for name in names}

    def z(self, batch: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Random ``hook_z`` activations ``{name: [batch, pos, head, d_head]}``."""
        return self.per_layer(self.z_names, batch, self.n_positions, self.n_heads, self.d_head, scale=scale)

    def resid(self, batch: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Random ``hook_resid_pre`` activations ``{name: [batch, pos, d_model]}``."""
        return self.per_layer(self.resid_names, batch, self.n_positions, self.d_model, scale=scale)

    def head(self) -> tuple[int, int]:
        return self.integer(0, self.n_layers), self.integer(0, self.n_heads)

    def negative_largest(self, *shape: int) -> torch.Tensor:
        """Random effects whose three largest magnitudes are negative (a missing ``abs`` picks others)."""
        effects = self.normal(*shape)
        top = effects.abs().flatten().argsort(descending=True)[:3]
        flat = effects.flatten()
        flat[top] = -flat[top].abs()
        return flat.reshape(shape)


def _zero_ablate_head_inputs(d: _Draw):  # 3.1: other prompts and metric, two heads
    p = d.prompts(4)
    metric = d.metric(p)
    return [(d.model, p.clean_tokens, metric, *d.head()) for _ in range(2)]


def _replace_head_inputs(d: _Draw):  # 3.2: a random replacement (its head axis is the third)
    p = d.prompts(3)
    replacement = d.normal(3, d.n_positions, d.n_heads, d.d_head)
    return [(d.model, p.corrupted_tokens, d.metric(p), *d.head(), replacement) for _ in range(2)]


def _mean_z_inputs(d: _Draw):  # 3.3: other reference prompts, another batch size
    return [(d.model, d.prompts(5).clean_tokens, d.integer(0, d.n_layers), 3)]


def _resample_inputs(d: _Draw):  # 3.4: the corrupted prompts as the source, not a roll
    p = d.prompts(3)
    return [(d.model, p.clean_tokens, p.corrupted_tokens, d.metric(p))]


def _noising_inputs(n_prompts: int):  # 4.1-4.3: noising (the notebook denoises) on other prompts
    def generate(d: _Draw):
        p = d.prompts(n_prompts)
        return [(d.model, p.clean_tokens, p.corrupted_tokens, d.metric(p))]

    return generate


def _largest_components_inputs(d: _Draw):  # 4.4: the largest effects are negative; 3 and 2 axes
    return [(d.negative_largest(3, 4, 5), 4), (d.negative_largest(4, 6), 3)]


def _names(d: _Draw) -> list[str]:
    """A few hook names in a random order (5.1, 5.2)."""
    names = d.z_names + d.resid_names
    order = torch.randperm(len(names), generator=d.g)[: max(2, len(names) // 2)]
    return [names[i] for i in order]


def _cache_activations_inputs(d: _Draw):  # 5.1: other prompts, other names
    return [(d.model, d.prompts(3).corrupted_tokens, _names(d))]


def _cache_gradients_inputs(d: _Draw):  # 5.2: other prompts and another metric (another gradient)
    p = d.prompts(3)
    return [(d.model, p.clean_tokens, d.metric(p, flavour=1), _names(d))]


def _attribution_inputs(kind: str):  # 5.3-5.5: random activations, replacements and gradients
    def generate(d: _Draw):
        make = d.z if kind == "z" else d.resid
        return [(make(3), make(3, scale=0.1), make(3))]

    return generate


def _zero_attribution_inputs(d: _Draw):  # 6.1
    return [(d.z(3), d.z(3, scale=0.1))]


def _sign_agreement_inputs(d: _Draw):  # 6.2: small effects all flipped, so the threshold (and abs) decide
    exact = d.normal(d.n_layers, d.n_heads)
    threshold = exact.abs().median().item()
    flips = torch.where(torch.rand(exact.shape, generator=d.g) < 0.25, -1.0, 1.0)
    flips[exact.abs() <= threshold] = -1.0
    estimate = exact * flips * (0.5 + torch.rand(exact.shape, generator=d.g))
    return [(exact, estimate, threshold), (exact, estimate, 0.0)]


def _relative_error_inputs(d: _Draw):  # 6.3
    exact = d.normal(d.n_layers, d.n_heads)
    return [(exact, exact + d.normal(d.n_layers, d.n_heads, scale=0.7))]


def _mlp_attribution_inputs(d: _Draw):  # 6.4: other prompts and another metric
    p = d.prompts(3)
    return [(d.model, p.corrupted_tokens, d.metric(p, flavour=1))]


def _wrong_sign_inputs(d: _Draw):  # 6.7: another shape; min_gain decides (a tiny gain is flagged only at 0)
    exact = torch.randn(d.n_layers + 1, d.n_heads + 2, generator=d.g)
    a_dot_grad = torch.randn(exact.shape, generator=d.g)
    exact[0, 0], a_dot_grad[0, 0] = 0.05, -0.3
    return [(exact, a_dot_grad, 0.5), (exact, a_dot_grad, 0.0)]


def _mean_activations_inputs(d: _Draw):  # 7.1: 5 reference prompts, tiled to 3
    return [(d.z(5), 3)]


def _mean_attribution_inputs(d: _Draw):  # 7.2
    return [(d.z(3), d.z(3, scale=0.1), d.z(3))]


def _step_norm_inputs(d: _Draw):  # 7.3: a mean of norms is not a norm of means
    return [(d.z(3), d.z(3, scale=2.0))]


def _mean_from_zero_inputs(d: _Draw):  # 7.4
    return [(d.normal(d.n_layers, d.n_heads), d.z(3), d.z(3, scale=0.1))]


def _pattern_attribution_inputs(d: _Draw):  # 8.1: patterns [batch, head, query, key]
    shape = (3, d.n_heads, d.n_positions, d.n_positions)
    return [(d.per_layer(d.pattern_names, *shape), d.per_layer(d.pattern_names, *shape, scale=0.1),
             d.per_layer(d.pattern_names, *shape))]


def _per_layer_error_inputs(d: _Draw):  # 8.2
    exact = d.normal(d.n_layers, d.n_positions)
    return [(exact, exact + d.normal(d.n_layers, d.n_positions, scale=0.5))]


def _integrated_gradients_inputs(d: _Draw):  # 8.3: other prompts, noising, an odd number of steps
    from attribution_course.patching import cache_activations

    p = d.prompts(2)
    replacements = cache_activations(d.model, p.corrupted_tokens, d.resid_names)
    return [(d.model, p.clean_tokens, d.metric(p), replacements, 3)]


def _error_reduction_inputs(d: _Draw):  # 8.4: the integrated estimate is the closer one
    exact = d.normal(d.n_layers, d.n_positions)
    linear = exact + d.normal(d.n_layers, d.n_positions)
    integrated = exact + d.normal(d.n_layers, d.n_positions, scale=0.3)
    return [(exact, linear, integrated)]


def _either_direction_inputs(d: _Draw):  # 5.6: other prompts and metric, both directions (the denoising gradient)
    p = d.prompts(3)
    metric = d.metric(p)
    return [(d.model, p.clean_tokens, p.corrupted_tokens, metric, direction) for direction in ("noising", "denoising")]


def _mlp_integrated_gradients_inputs(d: _Draw):  # 6.5: other prompts, another metric, an odd number of steps
    p = d.prompts(2)
    return [(d.model, p.clean_tokens, d.metric(p, flavour=1), 3)]


def _edge_inputs(d: _Draw):  # 6.6: other prompts and another metric (a global metric or tokens shows)
    p = d.prompts(3)
    return [(d.model, p.corrupted_tokens, d.metric(p, flavour=1))]


def _denoising_inputs(n_prompts: int):  # 8.5, 8.6: denoising (the notebook noises) on other prompts
    def generate(d: _Draw):
        p = d.prompts(n_prompts)
        return [(d.model, p.corrupted_tokens, p.clean_tokens, d.metric(p))]

    return generate


def _freezing_inputs(d: _Draw):  # 8.7: other prompts and head, the freezes in another order and number
    from attribution_course import diagnosis
    from attribution_course.patching import exact_sweep, replacement_activations

    p = d.prompts(4)
    noise = replacement_activations(d.model, "head", kind="patch", base_tokens=p.clean_tokens, source_tokens=p.corrupted_tokens)
    metric = d.metric(p)
    # One of the three heads that matter most on these prompts (a head that barely matters has gaps too small for a
    # wrong answer to show), in a layer with a later one to freeze, and never the notebook's L1H2.
    effects = exact_sweep(d.model, p.clean_tokens, metric, noise, "head")[:-1].abs()
    ranked = [divmod(int(i), d.n_heads) for i in effects.flatten().argsort(descending=True)]
    candidates = [lh for lh in ranked if lh != (1, 2)][:3]
    layer, head = candidates[d.integer(0, len(candidates))]
    named = diagnosis.standard_freezes(d.model, layer)
    names = ["LayerNorm scales", "nothing", f"MLP{layer} output", "later attention patterns"]
    order = torch.randperm(len(names), generator=d.g).tolist()[: d.integer(2, len(names) + 1)]
    freezes = {names[i]: named[names[i]] for i in order}
    return [(d.model, p.clean_tokens, metric, noise, layer, head, freezes)]


PLAIN: dict[str, Callable[[torch.Generator], list[tuple]]] = {
    "2.1": _logit_diff_inputs,
    "2.2": _accuracy_inputs,
    "2.3": _normalize_inputs,
    "2.4": _positions_inputs,
}

WITH_MODEL: dict[str, Callable[[_Draw], list[tuple]]] = {
    "3.1": _zero_ablate_head_inputs,
    "3.2": _replace_head_inputs,
    "3.3": _mean_z_inputs,
    "3.4": _resample_inputs,
    "4.1": _noising_inputs(3),
    "4.2": _noising_inputs(3),
    "4.3": _noising_inputs(2),
    "4.4": _largest_components_inputs,
    "4.5": _noising_inputs(2),
    "5.1": _cache_activations_inputs,
    "5.2": _cache_gradients_inputs,
    "5.3": _attribution_inputs("z"),
    "5.4": _attribution_inputs("resid"),
    "5.5": _attribution_inputs("z"),
    "5.6": _either_direction_inputs,
    "6.1": _zero_attribution_inputs,
    "6.2": _sign_agreement_inputs,
    "6.3": _relative_error_inputs,
    "6.4": _mlp_attribution_inputs,
    "6.5": _mlp_integrated_gradients_inputs,
    "6.6": _edge_inputs,
    "6.7": _wrong_sign_inputs,
    "7.1": _mean_activations_inputs,
    "7.2": _mean_attribution_inputs,
    "7.3": _step_norm_inputs,
    "7.4": _mean_from_zero_inputs,
    "8.1": _pattern_attribution_inputs,
    "8.2": _per_layer_error_inputs,
    "8.3": _integrated_gradients_inputs,
    "8.4": _error_reduction_inputs,
    "8.5": _denoising_inputs(2),
    "8.6": _denoising_inputs(2),
    "8.7": _freezing_inputs,
}

#: Every exercise with hidden inputs.
EXERCISES = frozenset(PLAIN) | frozenset(WITH_MODEL)


def hidden_inputs(exercise: str, seed: int | str | None = None, model=None) -> list[tuple]:
    """The hidden argument tuples of ``exercise`` for this grading run (empty: none, or no seed set).

    ``seed`` defaults to the grading run's (``ATTRIBUTION_COURSE_HIDDEN_SEED``); ``model``, to the
    notebook's ``model`` (else the shipped model is loaded)."""
    seed = os.environ.get(SEED_ENV) if seed is None else seed
    if exercise not in EXERCISES or seed is None:
        return []
    g = torch.Generator().manual_seed(int(seed) * 1000 + sum(map(ord, exercise)))
    if exercise in PLAIN:
        return PLAIN[exercise](g)
    return WITH_MODEL[exercise](_Draw(g, model))
