"""The sandbox and the grader's handling of untrusted files, without a kernel (seconds).

The end-to-end hostile submissions are in test_grading_hostile.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import torch

import attribution_course
from attribution_course.grading import gradebook, grader, notebooks, runner, sandbox, verdicts
from attribution_course.grading import generation as ex
from attribution_course.grading.checks import RETURNED, plain_value
from attribution_course.grading.requirement_probe import Refused

REPO = ex.REPO_ROOT


@pytest.fixture(scope="module")
def bwrap(sandbox_or_skip):
    """Tests that start a real sandbox ask for this (see conftest's ``sandbox_or_skip``)."""


def run_in_sandbox(tmp_path: Path, code: str, limits: sandbox.Limits = sandbox.Limits(), timeout: float = 120):
    workdir = tmp_path / "run"
    workdir.mkdir()
    uid = sandbox.run_as_uid()
    sandbox.prepare_workdir(workdir, uid)
    command = sandbox.sandboxed_command([sys.executable, "-c", textwrap.dedent(code)], workdir=workdir,
                                        env=sandbox.sandbox_env({}), limits=limits, uid=uid)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_sandbox_sees_no_network_no_repo_and_cannot_write_the_package(bwrap, tmp_path):
    package = Path(attribution_course.__file__).parent / "grading" / "checks.py"
    before = package.read_bytes()
    secret = tmp_path / "other_submission.ipynb"
    secret.write_text("SECRET")
    run = run_in_sandbox(tmp_path, f"""
        import os, socket
        results = {{}}
        results["net"] = "blocked" if [name for _, name in socket.if_nameindex()] == ["lo"] else "open"
        try:
            open({str(package)!r}, "a").write("# tampered"); results["package"] = "written"
        except OSError:
            results["package"] = "read-only"
        results["solutions"] = os.path.exists({str(REPO / 'solutions')!r})
        results["other submission"] = os.path.exists({str(secret)!r})
        results["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        try:
            os.kill(1, 9); results["kill init"] = "killed"
        except OSError:
            results["kill init"] = "refused"
        open("/grading/written", "w").write("ok")
        print(results)
    """)
    assert run.returncode == 0, run.stderr
    found = eval(run.stdout)
    assert found["net"] == "blocked" and found["package"] == "read-only"
    assert found["solutions"] is False and found["other submission"] is False
    assert max(found["processes"]) < 10, found["processes"]  # its own PID namespace
    if os.geteuid() == 0:
        assert found["kill init"] == "refused"
    assert package.read_bytes() == before


def test_sandbox_limits_memory_processes_and_file_size(bwrap, tmp_path):
    limits = sandbox.Limits(memory_bytes=2 * 2**30, processes=32, file_bytes=2**20, cpu_seconds=30)
    run = run_in_sandbox(tmp_path, """
        import os, time
        out = {}
        try:
            block = bytearray(3 * 2**30); out["memory"] = "allocated"
        except MemoryError:
            out["memory"] = "refused"
        try:
            with open("/grading/big", "wb") as f:
                f.write(b"x" * 2**21)
            out["file"] = "written"
        except OSError:
            out["file"] = "refused"
        forked = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(5); os._exit(0)
                forked += 1
        except OSError:
            pass
        out["forked"] = forked
        print(out, flush=True)
        os._exit(0)
    """, limits=limits)
    found = eval(run.stdout.strip().splitlines()[-1])
    assert found["memory"] == "refused" and found["file"] == "refused", found
    if os.geteuid() == 0:  # the process limit needs a user id of the run's own
        assert found["forked"] < 32, found


def test_nothing_outlives_a_sandboxed_run(bwrap, tmp_path):
    marker = "sleep-marker-7719"
    run = run_in_sandbox(tmp_path, f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"], start_new_session=True)
        print("started")
    """)
    assert run.stdout.strip() == "started", run.stderr
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            leftovers += [pid] if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") else []
        except OSError:
            pass
    assert not leftovers


# ---------------------------------------------------------------- untrusted notebooks, no kernel


def test_rewritten_graded_cells_never_pass_the_reference_to_the_learner():
    for stem in ex.NOTEBOOK_STEMS:
        for ref in notebooks.load_reference(stem, ex.EXERCISES_DIR):
            source = notebooks.rewrite_check(ref.cell.source, exercise=ref.id, name=ref.name, learner=True)
            assert "expected=" not in source and "check(" not in source.replace("_grader_submit(", ""), source
            compile(source, f"{stem} {ref.id}", "exec")


def test_a_notebook_of_another_chapter_is_recognised_and_named():
    chapter3 = ex.read_notebook(ex.exercise_path("03_exact_ablation"))
    stem, note = notebooks.identify(chapter3, Path("alice/02_task_and_metric.ipynb"))
    assert stem == "03_exact_ablation" and "03_exact_ablation" in note and "02_task_and_metric.ipynb" in note
    chapter3.metadata = {}  # no notebook metadata: recognised by the exercises it checks
    assert notebooks.identify(chapter3, Path("02_task_and_metric.ipynb"))[0] == "03_exact_ablation"


def test_odd_cells_lone_surrogates_and_wrong_typed_metadata_make_a_runnable_copy():
    stem = "02_task_and_metric"
    reference = notebooks.load_reference(stem, ex.EXERCISES_DIR)
    learner = json.loads(ex.exercise_path(stem).read_text())
    learner["metadata"] = ["not", "a", "dict"]
    learner["cells"][1]["source"] = "x = '\ud800 lone surrogate'"
    learner["cells"][3]["metadata"] = {"tags": "graded", "attribution_course": 7}
    learner["cells"][5]["metadata"] = {"tags": ["graded"], "attribution_course": {"exercise": ["2.1"]}}
    learner["cells"].append({"cell_type": "code", "source": 5, "metadata": None})
    learner["cells"].append("not a cell")
    nb, graded, missing = notebooks.prepare_learner_copy(learner, reference)
    text = nbformat.writes(nb)  # writable: no lone surrogate left
    assert "lone surrogate" in text and sorted(graded.values()) == ["2.1", "2.2", "2.3", "2.4"]
    assert notebooks.identify(learner, Path("x.ipynb"))[0] == stem


@pytest.mark.parametrize("content", ["{ not json", '{"cells": 5}', "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), ""])
def test_unreadable_notebooks_get_rows_with_full_max_points(tmp_path, content):
    path = tmp_path / "bob" / "02_task_and_metric.ipynb"
    path.parent.mkdir()
    path.write_text(content, encoding="latin-1")
    result = grader.grade_safely(path, name="bob/02_task_and_metric.ipynb", sandboxed=False)
    rows = gradebook.csv_rows(result)
    assert result.status == gradebook.S_MALFORMED, result
    assert sum(int(r["max_points"]) for r in rows) == 4, rows
    assert all(r["student"] == "bob" and r["chapter"] == "02_task_and_metric" for r in rows)


class Agreeable(torch.Tensor):
    """A tensor whose comparisons always succeed."""

    def __eq__(self, other):
        return True


def test_saved_results_are_validated_in_the_grader(tmp_path):
    ref = notebooks.load_reference("02_task_and_metric", ex.EXERCISES_DIR)[0]
    expected = {"expected": torch.arange(4.0), "atol": 1e-4, "rtol": 1e-3, "what": "values"}
    folder = tmp_path / "results"
    folder.mkdir()
    torch.save({"status": RETURNED, "value": Agreeable(torch.zeros(4)), "detail": ""}, folder / "2.1.pt")
    torch.save({"status": RETURNED, "value": plain_value(Agreeable(torch.zeros(4))), "detail": ""}, folder / "2.2.pt")
    torch.save({"status": RETURNED, "value": plain_value(torch.arange(4.0)), "detail": ""}, folder / "2.3.pt")
    (folder / "2.4.pt").symlink_to(folder / "2.3.pt")
    records = runner._read_records(folder)
    assert "2.4" not in records  # a symlink is not read
    decide = lambda rec: verdicts.decide(ref, expected, rec, None, 60)  # noqa: E731
    assert decide(records["2.1"]).verdict == verdicts.V_WRONG  # a subclass does not even load
    assert type(plain_value(Agreeable(torch.zeros(4)))) is torch.Tensor
    assert decide(records["2.2"]).verdict == verdicts.V_WRONG and "values" in decide(records["2.2"]).detail
    assert decide(records["2.3"]).verdict == verdicts.V_PASSED
    assert decide({"status": RETURNED, "value": object()}).verdict == verdicts.V_WRONG
    assert decide("PASSED").verdict == verdicts.V_WRONG


def test_batch_grading_refuses_to_run_without_the_sandbox(tmp_path, monkeypatch):
    (tmp_path / "a.ipynb").write_text("{}")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on the PATH
    run = subprocess.run([sys.executable, "-m", "attribution_course.grade", "--batch", str(tmp_path), "--csv",
                          str(tmp_path / "g.csv")], capture_output=True, text=True, env=dict(os.environ, PATH=str(tmp_path)))
    assert run.returncode == 2 and "--unsafe-no-sandbox" in run.stderr and "bwrap" in run.stderr, run.stderr
    assert not (tmp_path / "g.csv").exists()


def test_audit_flags_reference_implementations_and_the_solutions_but_not_the_solutions_themselves():
    from attribution_course.grading import audit
    from test_grading import filled, learner_notebook

    for stem in ex.NOTEBOOK_STEMS:  # the published solutions call helpers, never the reference implementations
        reference = notebooks.load_reference(stem, ex.EXERCISES_DIR)
        implementations = audit.reference_implementations(
            ex.read_notebook(ex.exercise_path(stem)), reference, ex.read_notebook(ex.solution_path(stem)))
        assert implementations and audit.audit_notebook(filled(stem), reference, implementations) == [], stem
    stem = "03_exact_ablation"
    reference = notebooks.load_reference(stem, ex.EXERCISES_DIR)
    implementations = audit.reference_implementations(
        ex.read_notebook(ex.exercise_path(stem)), reference, ex.read_notebook(ex.solution_path(stem)))
    copied = learner_notebook(stem, {"3.4": ["resampled = patching.replacement_activations(model, 'head', kind='resample', "
                                             "base_tokens=tokens, source_tokens=source_tokens)",
                                             "return patching.exact_sweep(model, tokens, metric, resampled, 'head')"]})
    copied.cells.append(nbformat.v4.new_code_cell("%run ../solutions/03_exact_ablation.ipynb"))
    findings = audit.audit_notebook(copied, reference, implementations)
    assert any("3.4" in f and "patching.exact_sweep" in f for f in findings), findings
    assert any("solutions/03_exact_ablation" in f for f in findings), findings


def test_hidden_inputs_are_compared_too():
    ref = notebooks.load_reference("02_task_and_metric", ex.EXERCISES_DIR)[1]
    expected = {"expected": 1.0, "hidden": [0.375], "atol": 1e-6, "rtol": 0.0, "what": "top-1 accuracy"}
    constant = {"status": RETURNED, "value": 1.0, "detail": "", "hidden": [{"status": RETURNED, "value": 1.0, "detail": ""}]}
    right = {"status": RETURNED, "value": 1.0, "detail": "", "hidden": [{"status": RETURNED, "value": 0.375, "detail": ""}]}
    skipped = {"status": RETURNED, "value": 1.0, "detail": ""}
    wrong = verdicts.decide(ref, expected, constant, None, 60)
    assert wrong.verdict == verdicts.V_WRONG and "hidden input 1 of 1" in wrong.detail, wrong
    assert verdicts.decide(ref, expected, right, None, 60).verdict == verdicts.V_PASSED
    assert verdicts.decide(ref, expected, skipped, None, 60).verdict == verdicts.V_WRONG


def test_hidden_inputs_tell_common_mistakes_apart(monkeypatch):
    from attribution_course.grading import hidden

    monkeypatch.setenv(hidden.SEED_ENV, "7")
    (logits, io, end), = hidden.hidden_inputs("2.2")
    accuracy = (logits[:, end].argmax(-1) == io).float().mean().item()
    assert 0 < accuracy < 1  # a constant 0 or 1 is wrong
    (clean, corrupted), = hidden.hidden_inputs("2.4")
    assert (clean != corrupted).any(0).sum() > (clean != corrupted).all(0).sum()  # .all is not .any
    (logits, io, s, end), = hidden.hidden_inputs("2.1")
    assert end != logits.shape[1] - 1 and bool((io != s).all())  # the last position is not the answer
    monkeypatch.setenv(hidden.SEED_ENV, "8")
    assert not torch.equal(hidden.hidden_inputs("2.2")[0][0], logits)  # drawn anew for each grading run


def test_hidden_inputs_of_every_chapter_are_drawn_anew_and_reproducibly():
    """Chapters 3-8 too: the learner's and the reference run draw the same inputs from one seed,
    another seed draws others (a constant answer cannot match both)."""
    from attribution_course.grading import hidden

    graded = {r.id for s in ex.NOTEBOOK_STEMS for r in notebooks.load_reference(s, ex.EXERCISES_DIR)}
    assert graded == set(hidden.EXERCISES), graded ^ set(hidden.EXERCISES)

    def flat(inputs):
        out = []
        for args in inputs:
            for a in args:
                out += list(a.values()) if isinstance(a, dict) else [a]
        return [a for a in out if isinstance(a, torch.Tensor)]

    for exercise in sorted(hidden.WITH_MODEL):
        first, again, other = (flat(hidden.hidden_inputs(exercise, seed=s)) for s in (11, 11, 12))
        assert first and all(torch.equal(a, b) for a, b in zip(first, again)), exercise
        assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other)), exercise


def test_hidden_inputs_show_a_missing_abs_and_a_global_threshold():
    from attribution_course.grading import hidden

    for effects, k in hidden.hidden_inputs("4.4", seed=3):
        top = effects.abs().flatten().argsort(descending=True)[:k]
        assert (effects.flatten()[top[:3]] < 0).all()  # without abs() other entries come first
    for exact, estimate, threshold in hidden.hidden_inputs("6.2", seed=3):
        kept = exact.abs() > threshold
        assert 0 < kept.sum() and (torch.sign(exact) != torch.sign(estimate))[kept].any()


def test_freezing_hidden_inputs_use_a_head_whose_gaps_a_constant_answer_cannot_match():
    """8.7: the hidden head is never the notebook's L1H2 and matters on the hidden prompts, so its gaps are far
    above the comparison's tolerance: an answer that is right only for the notebook's head (zeros, or a literal,
    elsewhere) fails. (With a head drawn at random, gaps of a few 1e-4 let such an answer through 11 of 40 times.)"""
    from attribution_course import diagnosis
    from attribution_course.grading import hidden

    for seed in range(4):
        ((model, tokens, metric, noise, layer, head, freezes),) = hidden.hidden_inputs("8.7", seed=seed)
        assert (layer, head) != (1, 2) and layer < model.cfg.n_layers - 1
        diag = diagnosis.diagnose(model, tokens, metric, noise, "head", freezes, components=[(layer, head)])
        gaps = torch.stack([diag.gap(name)[layer, head] for name in freezes])
        assert gaps.abs().max() > 0.01, (seed, layer, head, gaps)


def test_stated_requirements_are_checked_and_explained(model):
    from attribution_course.grading.checks import call_learner_function
    from attribution_course.grading.requirements import check_requirements

    tokens = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    names = ["blocks.0.hook_resid_pre"]

    def cache_attached(model, tokens, names):
        cache = {}
        model.run_with_hooks(tokens, fwd_hooks=[(names[0], lambda a, hook: cache.__setitem__(names[0], a))])
        return cache

    def cache_detached(model, tokens, names):
        with torch.no_grad():
            return cache_attached(model, tokens, names)

    def gradients(model, tokens, metric, names, clear=True):
        grads = {}
        with model.hooks(bwd_hooks=[(names[0], lambda g, hook: grads.__setitem__(names[0], g.detach()))]):
            metric(model(tokens)).backward()
        if clear:
            model.zero_grad(set_to_none=True)
        return grads

    metric = lambda logits: logits[:, -1, 0].sum()  # noqa: E731
    problems = lambda ex_id, f, args: check_requirements(ex_id, lambda: call_learner_function(f, args, {}), args)  # noqa: E731
    assert problems("5.1", cache_detached, (model, tokens, names)) == []
    assert "still require grad" in problems("5.1", cache_attached, (model, tokens, names))[0]
    assert problems("5.2", gradients, (model, tokens, metric, names)) == []
    kept = problems("5.2", lambda *a: gradients(*a, clear=False), (model, tokens, metric, names))
    assert "zero_grad(set_to_none=True)" in kept[0]
    accumulated = {}

    def accumulating(model, tokens, metric, names):
        for name, g in gradients(model, tokens, metric, names).items():
            accumulated[name] = accumulated.get(name, 0) + g
        return dict(accumulated)

    assert "accumulated across calls" in problems("5.2", accumulating, (model, tokens, metric, names))[0]
    assert all(p.grad is None for p in model.parameters())


def test_requirement_observations_are_judged_in_the_grader_and_a_missing_one_fails():
    passed = lambda exercise: verdicts.ExerciseResult(exercise, "f", verdicts.V_PASSED, 1, 1)  # noqa: E731
    results = [passed("5.1"), passed("5.2"), verdicts.ExerciseResult("5.1", "f", verdicts.V_WRONG, 0, 1, "values")]
    verdicts.apply_requirements(results[:1], {"5.1": {"status": RETURNED, "attached": [], "subclassed": []}})
    assert results[0].verdict == verdicts.V_PASSED and results[0].points == 1
    observed = {"5.1": {"status": RETURNED, "attached": ["['blocks.0.hook_z']"], "subclassed": []},
                "5.2": "the requirement could not be checked: code cell 3, line 2: uses sys"}
    verdicts.apply_requirements(results, observed)
    assert [r.verdict for r in results] == [verdicts.V_WRONG] * 3 and [r.points for r in results] == [0, 0, 0]
    assert "keeps the model's computation graph" in results[0].detail and "uses sys" in results[1].detail
    assert results[2].detail == "values"  # wrong values stay explained by the values
    # an observation that is missing its facts, or of a function that did not return, is a problem too
    for observation in ({}, {"status": RETURNED}, {"status": "raised", "detail": "raised NameError: x"}):
        result = [passed("5.2")]
        verdicts.apply_requirements(result, {"5.2": observation})
        assert result[0].verdict == verdicts.V_WRONG and "could not be checked" in result[0].detail, observation


PROBE_NOTEBOOK = [
    "import torch\nfrom jaxtyping import Int\nimport attribution_course.grading.checks as k\nk.submit = None",
    "%time x = 1\nSCALE = 2.0\nNAMES = sorted(['a'])\n_unused = [1, 2]\nkeep = lambda t: t.detach()",
    "def helper(t):\n    kept = keep(t)\n    return kept * SCALE / 2\n\n"
    "def unrelated():\n    import os\n    return os.getpid()",
    "import numpy as np; import einops\n@torch.no_grad()\ndef cache_activations(model, tokens: Int[torch.Tensor, 'b p'], names):\n"
    "    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)\n"
    "    return {n: helper(cache[n]) + 0 * np.zeros(1).sum() for n in names}",
]


def picked(cells: list[str], function: str = "cache_activations", set_up=frozenset()) -> list[tuple[int, int, str]]:
    from attribution_course.grading.requirement_probe import learner_definitions

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    return [(s.cell, s.line, s.text.split("\n")[0]) for s in learner_definitions(nb, function, set_up)]


def test_the_requirement_probe_picks_only_the_definitions_the_function_needs():
    assert picked(PROBE_NOTEBOOK) == [
        (1, 1, "import torch"), (1, 2, "from jaxtyping import Int"), (2, 2, "SCALE = 2.0"),
        (2, 5, "keep = lambda t: t.detach()"), (3, 1, "def helper(t):"), (4, 1, "import numpy as np"),
        (4, 2, "@torch.no_grad()")]
    # not picked: the cell that replaces the recorder, the call (NAMES), the magic, what nothing reads;
    # two statements on one line are both kept
    assert picked(["%%capture\ndef cache_activations(model, tokens, names):\n    return {}"]) == [
        (1, 2, "def cache_activations(model, tokens, names):")]  # the body of a %%capture cell is Python
    assert picked(["%time cache_activations = len"]) == [(1, 1, "cache_activations = len")]  # %time runs it as is


def test_the_requirement_probe_refuses_a_function_it_might_not_see_as_graded():
    """The graded kernel runs every cell; the probe runs only plain definitions. A needed name also
    bound where the probe cannot follow would let it run another function than the one graded."""
    honest = "def cache_activations(model, tokens, names):\n    return {}"
    for other, words in [
        ("if True:\n    def cache_activations(model, tokens, names):\n        return {'x': 1}", "binds cache_activations"),
        ("cache_activations = (lambda f: f)(print)", "binds cache_activations"),
        ("try:\n    from attribution_course.patching import cache_activations\nexcept ImportError:\n    pass",
         "binds cache_activations"),
        ("globals()['cache_' + 'activations'] = print", "can bind any name"),
        ("%run other.py", "can bind any name"),
        ("%timeit cache_activations = print", "binds cache_activations"),
        ("[cache_activations := print for _ in (0,)]", "binds cache_activations"),
    ]:
        with pytest.raises(Refused, match="code cell 2, line 1: ") as refused:
            picked([honest, other])
        assert words in str(refused.value), (other, str(refused.value))
    # a def whose default rebinds the function is run by the probe too (it binds a needed name)
    assert picked([honest, "def unused(x=(cache_activations := len)):\n    pass"])[-1] == (2, 1, "def unused(x=(cache_activations := len)):")
    # a skipped cell that changes what the function reads, or patches a module it uses
    flag = "FLAGS = {'detach': True}\ndef cache_activations(model, tokens, names):\n    return FLAGS['detach']"
    for other, words in [("FLAGS['detach'] = False", "changes FLAGS"), ("FLAGS.update(detach=False)", "changes FLAGS"),
                         ("import torch\ntorch.Tensor.detach = lambda t: t", "changes torch")]:
        with pytest.raises(Refused, match="code cell 2, line ") as refused:
            picked([flag.replace("return", "import torch\n    return"), other])
        assert words in str(refused.value), (other, str(refused.value))
    # what comes after the graded cell does not count (the kernel grades the function as it was there)
    graded = nbformat.v4.new_code_cell('check("5.1", cache_activations, model, clean, names, expected=None)')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(honest), graded, nbformat.v4.new_code_cell(
        "def cache_activations(model, tokens, names):\n    return {'later': 1}")])
    from attribution_course.grading.requirement_probe import graded_cell_number, learner_definitions
    assert graded_cell_number(nb, "5.1") == 2
    assert [s.cell for s in learner_definitions(nb, "cache_activations", graded_cell=2)] == [1]
    helper_by_call = ["LAYERS = list(range(2))", "def cache_activations(model, tokens, names):\n    return LAYERS"]
    with pytest.raises(Refused, match="code cell 1, line 1: binds LAYERS"):
        picked(helper_by_call)
    # the course's own set-up statements (run by the probe itself) are not held against the learner
    assert picked(["model = load_model()", "def cache_activations(m, t, n):\n    return model"],
                  set_up=frozenset({"model = load_model()"})) == [(2, 1, "def cache_activations(m, t, n):")]


@pytest.mark.parametrize("body, words", [
    ("return sys._getframe(1)", "line 3: uses sys"),
    ("return sys.modules", "line 3: uses sys"),
    ("import sys\n    return 1", "line 3: imports sys"),
    ("return getattr(torch, 'zeros')(1)", "line 3: uses getattr"),
    ("import attribution_course.grading.requirements as r\n    return r", "imports attribution_course.grading.requirements"),
    ("return model.__class__", "uses .__class__"),
    ("return torch.Tensor._make_subclass", "uses ._make_subclass"),
    ("import ctypes\n    return 1", "imports ctypes"),
    ("return __builtins__", "uses __builtins__"),
    ("return torch.hub.load('.', 'x', source='local')", "uses .load"),
    ("import operator\n    return operator.attrgetter('x')", "imports operator"),
    ("return '{0.__globals__}'.format(model)", "a string with a double underscore"),
    ("import numpy\n    numpy.max = numpy.min", "changes numpy.max"),
    ("torch.Tensor.requires_grad = property(lambda t: False)", "changes torch.Tensor.requires_grad"),
    ("try:\n        In\n    except NameError:\n        return 1", "line 4: uses In"),
    ("return _ih", "uses _ih"),
    ("class K:\n        run = exec\n    return K", "uses exec"),
    ("def g():\n        yield 1\n    return g().gi_frame.f_back", "uses .f_back"),
    ("return isinstance(names, Float[torch.Tensor, '{1+1}'])", "uses isinstance"),
    ("class Quiet(torch.Tensor):\n        def __torch_function__(cls, *a):\n            return None",
     "defines __torch_function__"),
])
def test_the_requirement_probe_refuses_code_that_reaches_into_the_interpreter(body, words):
    source = f"import torch\ndef cache_activations(model, tokens, names):\n    {body}"
    with pytest.raises(Refused, match="code cell 2, ") as refused:
        picked(["x = 1", source])
    assert words in str(refused.value), str(refused.value)


def test_the_requirement_probe_accepts_ordinary_solutions():
    ordinary = ("import torch\nclass Store:\n    def __init__(self):\n        self._items = {}\n"
                "    def add(self, name, t):\n        self._items[name] = t.detach()\n        return self._items\n"
                "def cache_activations(model, tokens, names):\n    \"\"\"Uses __init__ (a docstring may say so).\"\"\"\n"
                "    store, count = Store(), 3\n    return store.add('x', tokens)")
    assert [line for _, line, _ in picked([ordinary])] == [2, 8]  # Store and the function (torch is not read)


def test_a_restart_reruns_setup_and_definitions_but_not_the_stopping_cell_or_graded_exercises():
    stem = "02_task_and_metric"
    reference = notebooks.load_reference(stem, ex.EXERCISES_DIR)
    copy, graded, _ = notebooks.prepare_learner_copy(ex.read_notebook(ex.exercise_path(stem)), reference)
    number = {exercise: n for n, exercise in graded.items()}
    stop = number["2.2"]
    restarted, regraded = notebooks.restart_copy(copy, graded, stop, done={"2.1"})
    assert sorted(regraded.values()) == ["2.3", "2.4"]
    assert len(restarted.cells) == len(copy.cells)  # the graded cells that stopped or were graded keep what they define
    submits = [c.source for c in restarted.cells if "_grader_submit(" in c.source]
    assert len(submits) == 2 and all('"2.3"' in s or '"2.4"' in s or "'2.3'" in s or "'2.4'" in s for s in submits), submits
    learner_cell = stop - 1  # the learner's definition cell before 2.2's graded cell
    restarted, _ = notebooks.restart_copy(copy, graded, learner_cell, done={"2.1"})
    assert len(restarted.cells) == len(copy.cells) - 1


def test_the_stopping_cell_is_found_from_nbval_reports():
    Outcome = lambda cells, timed_out=False: runner.RunOutcome(cells, {}, timed_out, 0, "", [])  # noqa: E731
    graded = {2: "2.1", 4: "2.2", 6: "2.3"}
    died = Outcome({0: ("passed", ""), 2: ("passed", ""), 4: ("failure", verdicts.DIED_HERE),
                    5: ("failure", verdicts.DEAD_BEFORE), 6: ("failure", verdicts.DEAD_BEFORE)})
    assert grader._stopping_cell(died, graded, {"2.1": {}}) == (4, set())
    hung = Outcome({0: ("passed", ""), 2: ("failure", verdicts.NOT_INTERRUPTIBLE), 3: ("skipped", verdicts.EARLIER_HANG)})
    assert grader._stopping_cell(hung, graded, {})[0] == 2
    killed = Outcome({}, timed_out=True)
    assert grader._stopping_cell(killed, graded, {"2.1": {}}) == (4, {3})
    assert grader._stopping_cell(killed, graded, {}) == (2, {1})  # the setup cell (0) is never left out
    assert grader._stopping_cell(Outcome({0: ("passed", ""), 2: ("passed", "")}), graded, {}) == (None, set())


def python_notebook(*sources: str) -> nbformat.NotebookNode:
    """A notebook of code cells for the plain Python 3 kernel."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    return nb


def test_watchdog_logs_each_cells_cpu_time(tmp_path):
    """The reference run's per-cell CPU times scale the learner's cell limit: one entry per cell, in order."""
    from attribution_course.grading.nbval_watchdog import CPU_LOG_ENV

    nb = python_notebook("x = 1", "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass")
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    env = dict(os.environ, **{CPU_LOG_ENV: str(tmp_path / "cpu.json")})
    run = subprocess.run([sys.executable, "-m", "pytest", "n.ipynb", "--nbval-lax", "-p", "attribution_course.grading.nbval_watchdog",
                          "-q", "-c", os.devnull, "-p", "no:cacheprovider"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:]
    first, second = json.loads((tmp_path / "cpu.json").read_text())
    assert first < 0.5 and 1.4 <= second < 5


@pytest.mark.parametrize("ignores_interrupts", [False, True])
def test_the_wall_clock_stops_a_cell_that_sleeps(tmp_path, ignores_interrupts):
    """A cell that waits uses no CPU time, so only the wall-clock fallback (WALL_FACTOR times the cell's
    CPU limit) stops it: by an interrupt, after which the next cell runs in the same kernel, or, when the
    cell ignores the interrupt, by stopping the kernel. Either way long before the notebook's own timeout."""
    from attribution_course.grading.nbval_watchdog import WALL_FACTOR

    ignore = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" if ignores_interrupts else ""
    nb = python_notebook("x = 1", ignore + "import time\nwhile True:\n    time.sleep(0.2)", "x + 1")
    cell_limit = 0.5  # CPU seconds: the fallback stops the sleeping cell after WALL_FACTOR times this
    start = time.monotonic()
    outcome = runner.run_nbval(nb, timeout=300, cell_timeout=cell_limit, sandboxed=False)
    seconds = time.monotonic() - start
    assert not outcome.timed_out and WALL_FACTOR * cell_limit <= seconds < 150, (seconds, outcome.output[-2000:])
    status, message = outcome.cells[1]
    assert status in ("failure", "error"), outcome.cells
    if ignores_interrupts:
        assert verdicts.NOT_INTERRUPTIBLE in message, message
    else:
        assert verdicts.NOT_INTERRUPTIBLE not in message and outcome.cells[2][0] == "passed", outcome.cells

