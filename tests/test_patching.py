"""Correctness of the patching core: every fast path against the slow one it replaces.

Speed is measured by ``python -m attribution_course.bench``, never here.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from attribution_course import bench, corrections, patching
from attribution_course.metrics import logit_diff

KINDS = ["zero", "mean", "resample", "patch"]
TIGHT = dict(atol=2e-5, rtol=0)  # float32 reordering only; a wrong patch moves effects by >1e-2


@pytest.fixture(scope="module")
def prompts(test_prompts):
    """Four prompts: the exact sweeps here run every engine on every family (overrides conftest's 16)."""
    return test_prompts.subset(range(4))



def _source(prompts, kind):
    if kind == "patch":
        return prompts.corrupted_tokens
    if kind == "resample":  # other prompts: the batch rolled by one
        return prompts.clean_tokens.roll(1, dims=0)
    return None


@pytest.fixture(scope="module")
def replacements(model, prompts):
    cache = {}

    def get(family, kind):
        if (family, kind) not in cache:
            cache[family, kind] = patching.replacement_activations(
                model, family, kind=kind, base_tokens=prompts.clean_tokens, source_tokens=_source(prompts, kind)
            )
        return cache[family, kind]

    return get


@pytest.fixture(scope="module")
def loop_sweeps(model, prompts, metric, replacements):
    """The one-at-a-time reference sweep (``variants_per_pass=1``), computed once per case."""
    cache = {}

    def get(family, kind):
        if (family, kind) not in cache:
            cache[family, kind] = patching.exact_sweep(
                model, prompts.clean_tokens, metric, replacements(family, kind), family, variants_per_pass=1
            )
        return cache[family, kind]

    return get


# ---------------------------------------------------------------- exact sweeps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(patching.FAMILIES))
@pytest.mark.parametrize("engine", ["stacked", "prefix"])
def test_batched_sweep_equals_the_one_at_a_time_loop(model, prompts, metric, replacements, loop_sweeps, family, kind, engine):
    loop = loop_sweeps(family, kind)
    batched = patching.exact_sweep(model, prompts.clean_tokens, metric, replacements(family, kind), family, engine=engine)
    assert batched.shape == loop.shape == patching.effect_shape(model, family, prompts.clean_tokens.shape[1])
    assert loop.abs().max() > 1e-2, "a sweep whose effects are all ~0 cannot tell a right patch from a wrong one"
    assert_close(batched, loop, **TIGHT)


def test_stacked_engine_with_small_passes_equals_the_loop_exactly(model, prompts, metric, replacements, loop_sweeps):
    """Three variants per pass, so passes mix layers' variants at chunk borders."""
    stacked = patching.exact_sweep(
        model, prompts.clean_tokens, metric, replacements("head_pos", "patch"), "head_pos", engine="stacked", variants_per_pass=3
    )
    assert_close(stacked, loop_sweeps("head_pos", "patch"), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "family, component",
    [("head", (1,)), ("head_pos", (2, 10)), ("pattern", (3,)), ("resid_pos", (10,)), ("mlp", ()), ("mlp_pos", (14,)), ("attn_pos", (10,))],
)
def test_exact_effect_equals_the_sweep_entry(model, prompts, metric, replacements, family, component):
    reps = replacements(family, "patch")
    sweep = patching.exact_sweep(model, prompts.clean_tokens, metric, reps, family)
    for layer in range(model.cfg.n_layers):
        single = patching.exact_effect(model, prompts.clean_tokens, metric, reps, family, layer, component)
        assert single == pytest.approx(sweep[(layer, *component)].item(), abs=2e-5)


def test_joint_effect_replaces_every_listed_component_at_once(model, prompts, metric, replacements):
    """Two heads in one layer and one in another, against hooks written out by hand."""
    reps = replacements("head", "patch")
    clean = prompts.clean_tokens
    components = [(0, 1), (0, 3), (2, 2)]

    def by_hand(layer, heads):
        name = f"blocks.{layer}.attn.hook_z"

        def replace(z, hook):
            z = z.clone()
            z[:, :, heads] = reps[name][:, :, heads]
            return z

        return name, replace

    with torch.no_grad():
        expected = metric(model.run_with_hooks(clean, fwd_hooks=[by_hand(0, [1, 3]), by_hand(2, [2])])).item() - metric(model(clean)).item()
    joint = patching.exact_joint_effect(model, clean, metric, reps, "head", components)
    assert joint == pytest.approx(expected, abs=1e-6)
    singles = sum(patching.exact_effect(model, clean, metric, reps, "head", layer, (head,)) for layer, head in components)
    assert joint != pytest.approx(singles, abs=1e-6), "a joint patch that equals the sum of singles here would not test joint replacement"
    with pytest.raises(ValueError, match="components"):
        patching.exact_joint_effect(model, clean, metric, reps, "head", [])


def test_direct_path_effect_is_the_patch_with_everything_downstream_held(model, prompts, metric, replacements):
    """For a last-layer head the only downstream component is the last MLP: hold it, and the
    exact patch must equal the direct-path effect; earlier heads' totals differ from it."""
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    direct = patching.direct_path_effects(model, clean, corrupted, metric)
    last = model.cfg.n_layers - 1
    z_name, mlp_name = f"blocks.{last}.attn.hook_z", f"blocks.{last}.hook_mlp_out"
    corrupted_z = patching.cache_activations(model, corrupted, [z_name])[z_name]
    clean_mlp = patching.cache_activations(model, clean, [mlp_name])[mlp_name]
    with torch.no_grad():
        base = metric(model(clean)).item()
        for head in range(model.cfg.n_heads):
            def patch_z(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = corrupted_z[:, :, head]
                return z

            held = metric(model.run_with_hooks(clean, fwd_hooks=[(z_name, patch_z), (mlp_name, lambda m, hook: clean_mlp)])).item()
            assert direct[last, head].item() == pytest.approx(held - base, abs=1e-4)
    total = patching.exact_sweep(model, clean, metric, replacements("head", "patch"), "head")
    assert (direct[:-1] - total[:-1]).abs().max() > 0.1, "later layers respond to earlier heads"


def test_positions_restrict_the_sweep_and_leave_the_rest_nan(model, prompts, metric, replacements, loop_sweeps):
    swept = [10, 14]
    partial = patching.exact_sweep(model, prompts.clean_tokens, metric, replacements("head_pos", "patch"), "head_pos", positions=swept)
    assert torch.isnan(partial[:, :, :10]).all()
    assert_close(partial[:, :, swept], loop_sweeps("head_pos", "patch")[:, :, swept], **TIGHT)


@pytest.mark.parametrize(
    "family, function_name",
    [("head_pos", "get_act_patch_attn_head_out_by_pos"), ("resid_pos", "get_act_patch_resid_pre"), ("head", "get_act_patch_attn_head_out_all_pos")],
)
def test_our_exact_sweep_equals_transformer_lens_patching(model, prompts, metric, family, function_name):
    base, source = patching.base_and_source(prompts.clean_tokens, prompts.corrupted_tokens, "denoising")
    reps = patching.replacement_activations(model, family, kind="patch", base_tokens=base, source_tokens=source)
    ours = patching.exact_sweep(model, base, metric, reps, family)
    theirs = bench.tl_exact(model, base, source, metric, family)
    with torch.no_grad():
        base_value = metric(model(base)).item()
    to_ours = bench.TL_EXACT[family][1]
    assert bench.TL_EXACT[family][0] == function_name
    assert_close(ours, to_ours(theirs) - base_value, atol=1e-4, rtol=0)


def test_the_prefix_engine_finds_the_positions_the_metric_reads_and_checks_them(model, prompts, metric, replacements, loop_sweeps):
    with torch.no_grad():
        logits = model(prompts.clean_tokens)
    assert patching.positions_read_by(metric, logits) == [prompts.end_position]
    reads_everything = lambda logits: logits.mean()  # noqa: E731
    assert patching.positions_read_by(reads_everything, logits) == list(range(logits.shape[1]))
    reps = replacements("mlp_pos", "patch")
    with pytest.raises(RuntimeError, match="pass metric_positions=None"):
        patching.exact_sweep(model, prompts.clean_tokens, reads_everything, reps, "mlp_pos", metric_positions=[14])
    everywhere = patching.exact_sweep(model, prompts.clean_tokens, metric, reps, "mlp_pos", engine="prefix", metric_positions=None)
    assert_close(everywhere, loop_sweeps("mlp_pos", "patch"), **TIGHT)


def test_prefix_engine_refuses_a_model_it_does_not_reproduce(model, prompts, metric, replacements, loop_sweeps, monkeypatch):
    assert patching.functional_engine_problem(model, prompts.clean_tokens, "head_pos") is None
    monkeypatch.setattr(model.cfg, "act_fn", "relu")
    problem = patching.functional_engine_problem(model, prompts.clean_tokens, "head_pos")
    assert problem is not None and "GELU" in problem
    with pytest.raises(ValueError, match="engine='prefix' cannot run this model"):
        patching.exact_sweep(model, prompts.clean_tokens, metric, replacements("head", "patch"), "head", engine="prefix")
    # "auto" falls back to a bridge engine, which gives the loop's numbers
    fallback = patching.exact_sweep(model, prompts.clean_tokens, metric, replacements("head", "patch"), "head")
    assert_close(fallback, loop_sweeps("head", "patch"), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- attribution


def test_gradients_match_an_independent_autograd_computation(model, prompts, metric):
    """``∂M/∂a`` from our hooks equals ``torch.autograd.grad`` w.r.t. a leaf swapped in for ``a``."""
    name = "blocks.2.attn.hook_z"
    _, activations, gradients = patching.cache_activations_and_gradients(model, prompts.clean_tokens, metric, [name])
    leaf = activations[name].clone().requires_grad_(True)
    with torch.enable_grad():
        value = metric(model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(name, lambda act, hook: leaf)]))
        (expected,) = torch.autograd.grad(value, leaf)
    assert_close(gradients[name], expected, atol=1e-6, rtol=1e-5)


def test_attribution_equals_a_hand_computation(model, prompts, metric, replacements):
    """``(a' - a)·∂M/∂a`` summed by explicit loops over prompts and ``d_head``, for a few components."""
    reps = replacements("head_pos", "patch")
    estimate = patching.attribution_sweep(model, prompts.clean_tokens, metric, reps, "head_pos")
    names = patching.hook_names(model, "head_pos")
    _, acts, grads = patching.cache_activations_and_gradients(model, prompts.clean_tokens, metric, names)
    for layer, head, pos in [(0, 1, 10), (3, 2, 14), (1, 0, 3)]:
        name = names[layer]
        total = 0.0
        for i in range(len(prompts)):
            for d in range(model.cfg.d_head):
                total += (reps[name][i, pos, head, d] - acts[name][i, pos, head, d]).item() * grads[name][i, pos, head, d].item()
        assert estimate[layer, head, pos].item() == pytest.approx(total, abs=1e-5)


@pytest.mark.parametrize("family", ["head_pos", "resid_pos", "mlp", "pattern"])
def test_attribution_is_the_first_order_term_of_the_exact_effect(model, prompts, metric, family):
    """A linear-ish case: for ``a' = a + ε (a_corrupt - a)`` the exact effect is ``ε · estimate + O(ε²)``."""
    names = patching.hook_names(model, family)
    base_acts = patching.cache_activations(model, prompts.clean_tokens, names)
    corrupt = patching.replacement_activations(
        model, family, kind="patch", base_tokens=prompts.clean_tokens, source_tokens=prompts.corrupted_tokens
    )
    full_step = patching.attribution_sweep(model, prompts.clean_tokens, metric, corrupt, family)
    for epsilon in (2e-3, -2e-3):
        nudged = {n: base_acts[n] + epsilon * (corrupt[n] - base_acts[n]) for n in names}
        exact = patching.exact_sweep(model, prompts.clean_tokens, metric, nudged, family)
        estimate = patching.attribution_sweep(model, prompts.clean_tokens, metric, nudged, family)
        assert_close(estimate, epsilon * full_step, atol=1e-6, rtol=1e-4)  # the estimate is linear in a' - a
        scale = full_step.abs().max().item()
        assert (exact - estimate).abs().max().item() < 0.05 * abs(epsilon) * scale


@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_for_all_families_equals_one_family_at_a_time(model, prompts, metric, replacements, kind):
    families = list(patching.FAMILIES)
    together = patching.attribution_sweeps(  # the bridge, like attribution_sweep: this compares passes, not engines
        model, prompts.clean_tokens, metric, families, kind=kind, source_tokens=_source(prompts, kind), engine="bridge"
    )
    assert set(together) == set(families)
    for family in families:
        alone = patching.attribution_sweep(model, prompts.clean_tokens, metric, replacements(family, kind), family)
        assert_close(together[family], alone, atol=1e-6, rtol=1e-5)


def test_noising_and_denoising_use_the_right_base_run(model, prompts, metric):
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    assert patching.base_and_source(clean, corrupted, "noising") == (clean, corrupted)
    assert patching.base_and_source(clean, corrupted, "denoising") == (corrupted, clean)
    results = {}
    for direction in ("noising", "denoising"):
        base, source = patching.base_and_source(clean, corrupted, direction)
        results[direction] = patching.attribution_sweeps(model, base, metric, ["head_pos"], kind="patch", source_tokens=source)["head_pos"]
        names = patching.hook_names(model, "head_pos")
        _, acts, grads = patching.cache_activations_and_gradients(model, base, metric, names)
        source_acts = patching.cache_activations(model, source, names)
        assert_close(results[direction], patching.attribution_estimate(acts, grads, source_acts, "head_pos"))
    # different gradients (clean vs corrupted run): not simply negatives of each other
    assert not torch.allclose(results["noising"], -results["denoising"], atol=1e-3)
    assert torch.corrcoef(torch.stack([results["noising"].flatten(), -results["denoising"].flatten()]))[0, 1] > 0.5


def test_our_attribution_equals_transformer_lens_attribution(model, prompts):
    metric_for = lambda p: (lambda logits: logit_diff(logits, p))  # noqa: E731
    base, source = patching.base_and_source(prompts.clean_tokens, prompts.corrupted_tokens, "denoising")
    ours = patching.attribution_sweeps(model, base, metric_for(prompts), ["head_pos", "mlp_pos"], kind="patch", source_tokens=source)
    theirs = bench.tl_attribution(model, prompts, metric_for)
    for family in ("head_pos", "mlp_pos"):
        assert ours[family].abs().max() > 1e-2
        assert_close(ours[family], theirs[family], atol=1e-5, rtol=1e-4)


def test_attribution_leaves_parameters_as_it_found_them(model, prompts, metric):
    before = [p.requires_grad for p in model.parameters()]
    assert any(before)
    patching.attribution_sweeps(model, prompts.clean_tokens, metric, ["head"], kind="zero")
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors(model, prompts, metric, replacements):
    clean = prompts.clean_tokens
    with pytest.raises(ValueError, match="unknown component family 'heads'"):
        patching.exact_sweep(model, clean, metric, {}, "heads")
    with pytest.raises(ValueError, match="replacement kind must be"):
        patching.replacement_activations(model, "head", kind="ablate", base_tokens=clean)
    with pytest.raises(ValueError, match="replacement kind must be"):
        patching.attribution_sweeps(model, clean, metric, ["head"], kind="ablate")
    with pytest.raises(ValueError, match="needs source_tokens"):
        patching.attribution_sweeps(model, clean, metric, ["head"], kind="patch")
    with pytest.raises(ValueError, match="same shape"):
        patching.replacement_activations(model, "head", kind="patch", base_tokens=clean, source_tokens=clean[:2])
    with pytest.raises(ValueError, match=r"base_tokens must be an integer tensor of shape \[batch, pos\]"):
        patching.exact_sweep(model, clean[0], metric, replacements("head", "zero"), "head")
    with pytest.raises(ValueError, match="batch size 4 but base_tokens has 2"):
        patching.exact_sweep(model, clean[:2], metric, replacements("head", "zero"), "head")
    with pytest.raises(ValueError, match="no activation for hook 'blocks.0.hook_mlp_out'"):
        patching.exact_sweep(model, clean, metric, replacements("head", "zero"), "mlp")
    with pytest.raises(ValueError, match="positions= only applies"):
        patching.exact_sweep(model, clean, metric, replacements("head", "zero"), "head", positions=[3])
    with pytest.raises(ValueError, match="positions must be"):
        patching.exact_sweep(model, clean, metric, replacements("head_pos", "zero"), "head_pos", positions=[99])
    with pytest.raises(ValueError, match="engine must be"):
        patching.exact_sweep(model, clean, metric, replacements("head", "zero"), "head", engine="fast")
    with pytest.raises(ValueError, match="direction must be"):
        patching.base_and_source(clean, clean, "forwards")
    with pytest.raises(ValueError, match="families must name"):
        patching.attribution_sweeps(model, clean, metric, [], kind="zero")
    short = {name: act[:, :-1] for name, act in replacements("head", "zero").items()}
    with pytest.raises(ValueError, match="has 14 positions on its 'pos' axis but base_tokens have 15"):
        patching.attribution_sweep(model, clean, metric, short, "head")
    short_patterns = {name: act[:, :, :, :-1] for name, act in replacements("pattern", "zero").items()}
    with pytest.raises(ValueError, match="has 14 positions on its 'key' axis"):
        patching.exact_sweep(model, clean, metric, short_patterns, "pattern")
    with pytest.raises(ValueError, match="no activation for hook 'blocks.0.hook_mlp_out'"):
        corrections.integrated_gradients_sweep(model, clean, metric, replacements("head", "zero"), "mlp")


# ---------------------------------------------------------------- the benchmark's plumbing


def test_the_plain_transformers_peer_computes_our_exact_sweep(model, prompts, metric):
    """The benchmark's strongest peer (bare ``transformers`` + hooks) must compute the same numbers to be a peer."""
    from attribution_course.model import SHIPPED_MODEL_DIR

    base, source = patching.base_and_source(prompts.clean_tokens, prompts.corrupted_tokens, "denoising")
    reps = patching.replacement_activations(model, "head_pos", kind="patch", base_tokens=base, source_tokens=source)
    ours = patching.exact_sweep(model, base, metric, reps, "head_pos")
    bare = bench.bare_model(SHIPPED_MODEL_DIR)
    peer = bench.peer_exact_head_pos(bare, base, source, prompts.end_position, lambda final: bench.logit_diff_at_read(final, prompts.io_token, prompts.s_token))
    assert ours.abs().max() > 1e-2
    assert_close(peer, ours, atol=1e-4, rtol=0)


def test_timing_records_wall_and_cpu_time_and_each_calls_own_peak_memory():
    """Run in a fresh interpreter: the peak-memory figure is the growth of the process's resident set,
    which a long-lived process (this test session) can hide by reusing memory freed by earlier tests."""
    script = """
import json, torch
from attribution_course import bench
def allocate_80_mb():
    return torch.ones(20 * 2**20).sum()  # 20 Mi float32 values
timings, values = bench.time_interleaved(
    {"big": allocate_80_mb, "small": lambda: torch.ones(10).sum(), "fails": lambda: 1 / 0}, repeats=2)
assert values["big"].item() == 20 * 2**20
print(json.dumps(timings))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("big", "small"):
        assert len(timings[name]["runs_s"]) == len(timings[name]["cpu_runs_s"]) == 2
        assert timings[name]["cpu_median_s"] >= 0 and timings[name]["median_s"] > 0
    if timings["big"]["peak_growth_mb"] is not None:  # Linux
        assert timings["big"]["peak_growth_mb"] >= 70
        assert timings["small"]["peak_growth_mb"] < 20  # not the process's whole resident set
    assert not timings["fails"]["available"] and "ZeroDivisionError" in timings["fails"]["reason"]


def test_load_results_names_the_file_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="no benchmark results at"):
        bench.load_results(tmp_path / "missing.json")
    bad = tmp_path / "bench.json"
    bad.write_text('{"schema_version": 0}')
    with pytest.raises(ValueError, match=str(bad)):
        bench.load_results(bad)


@pytest.mark.slow
def test_quick_benchmark_run_writes_json_markdown_and_a_figure(tmp_path):
    markdown, copy = tmp_path / "performance.md", tmp_path / "performance.json"
    arguments = ["--quick", "--repeats", "1", "--prompts", "2", "--out", str(tmp_path), "--markdown", str(markdown), "--json", str(copy)]
    assert bench.main(arguments) == 0
    results = bench.load_results(tmp_path / "bench.json")
    assert bench.load_results(copy) == results
    assert results["agreement"]["exact_ours_vs_transformer_lens_max_abs"] < 1e-4
    assert results["agreement"]["exact_ours_vs_peer_transformers_max_abs"] < 1e-4  # the peer computes the same sweep
    timed = [t for t in results["timings"].values() if t["available"]]
    assert all(t["cpu_median_s"] > 0 and len(t["cpu_runs_s"]) == len(t["runs_s"]) for t in timed)
    assert {t["name"] for t in results["targets"]} and all(isinstance(t["met"], bool) for t in results["targets"])
    assert markdown.read_text() == (tmp_path / "bench.md").read_text()
    assert "| exact sweep, ours (prefix engine) |" in markdown.read_text()
    # every size times the exact sweep beside the peer, and the one-thread and two-thread runs both happen
    assert {size["varies"] for size in results["sizes"]} == {"prompts", "positions", "threads"}
    assert {size["threads"] for size in results["sizes"]} == {1, 2} and set(results["matmul_gflops"]) == {"1", "2"}
    assert all(size["exact_ours_vs_peer_relative"] < 1e-4 and size["flops"]["exact_ours"] > 0 for size in results["sizes"])
    assert all(value["peak_growth_mb"] is not None for value in results["peak_memory_fresh_process_mb"].values())
    assert "## Every size" in markdown.read_text()
    figure = bench.scaling_figure(results)
    assert len(figure.data) >= 5
