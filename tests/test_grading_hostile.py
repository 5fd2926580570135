"""Submissions that attack the grader, cheat, or are correct but unusual, graded in one
sandboxed batch of chapter-2 notebooks (the cheapest kernel).

Escapes must be contained (files unchanged, no process left, the batch completes),
cheats must not earn points, unusual correct work must get full marks.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import nbformat
import pytest

import attribution_course
from attribution_course.grading import generation as ex
from attribution_course.grading import grader
from test_grading import digests, exercise_cells, filled, learner_notebook, rows_by, solution_bodies, write

pytestmark = pytest.mark.slow
STEM = "02_task_and_metric"
IDS = ["2.1", "2.2", "2.3", "2.4"]
MARKER = "MARKER-OF-ALICE-5d1e"
DAEMON = "hostile-daemon-93817"


def with_cell(nb: nbformat.NotebookNode, source: str, *, before: str | None = None) -> nbformat.NotebookNode:
    """``nb`` with a code cell inserted before exercise ``before``'s statement (None: at the end)."""
    cell = nbformat.v4.new_code_cell(source)
    if before is None:
        nb.cells.append(cell)
    else:
        index = exercise_cells(STEM)[before] - 1  # the statement cell precedes the solution cell
        nb.cells.insert(index, cell)
    return nb


def stubs() -> nbformat.NotebookNode:
    return ex.read_notebook(ex.exercise_path(STEM))


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path).encode() + path.read_bytes())
    return h.hexdigest()


def hostile_submissions(folder: Path, out: Path) -> None:
    package = Path(attribution_course.__file__).parent
    alice = filled(STEM)
    alice.cells.insert(1, nbformat.v4.new_code_cell(f"# {MARKER}"))
    write(alice, folder / "alice" / f"{STEM}.ipynb")
    write(stubs(), folder / "zed_stubs" / f"{STEM}.ipynb")
    # ---- escapes
    write(with_cell(stubs(), f"""
import glob
for path in glob.glob({str(package)!r} + "/**/*.py", recursive=True):
    try:
        open(path, "a").write("\\ncheck = submit = lambda *a, **k: print('PASSED')\\n")
    except OSError as err:
        print("blocked:", err)
""", before="2.1"), folder / "append_to_package" / f"{STEM}.ipynb")
    write(with_cell(stubs(), f"""
import glob, os
marker = {MARKER[:9]!r} + {MARKER[9:]!r}  # not written out, so that this cell does not find itself
found = []
places = [{str(folder)!r}, "/tmp", "/work", "/root", "/home"]
places += [f"/proc/{{p}}/cwd" for p in os.listdir("/proc") if p.isdigit()]
for place in places:
    for path in glob.glob(place + "/**/*.ipynb", recursive=True)[:500]:
        try:
            if marker in open(path).read():
                found.append(path)
                open(path, "w").write("{{}}")  # and wreck it
        except OSError:
            pass
if found:  # a solution only if another learner's notebook could be read
    def normalize(values, clean_value, corrupted_value):
        return (values - corrupted_value) / (clean_value - corrupted_value)
""", before="2.3"), folder / "read_others" / f"{STEM}.ipynb")
    write(with_cell(stubs(), f"""
for path in [{str(ex.solution_path(STEM))!r}, {str(ex.exercise_path(STEM))!r}, {str(out / 'grades.csv')!r},
             {str(folder / 'alice' / f'{STEM}.ipynb')!r}]:
    try:
        open(path, "a").write("tampered")
    except OSError as err:
        print("blocked:", err)
""", before="2.1"), folder / "write_files" / f"{STEM}.ipynb")
    write(with_cell(learner_notebook(STEM, {"2.1": None}), f"""
import subprocess, sys
script = "import time\\nwhile True:\\n    time.sleep(1)\\n    try:\\n        open({str(out / 'grades.csv')!r}, 'a').write('daemon,passed')\\n    except OSError:\\n        pass"
subprocess.Popen([sys.executable, "-c", script, {DAEMON!r}], start_new_session=True)
subprocess.Popen(["sleep", "987"], start_new_session=True)
""", before="2.2"), folder / "background" / f"{STEM}.ipynb")
    write(with_cell(learner_notebook(STEM, {"2.1": None}), """
import os, signal
for pid in [os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
""", before="2.2"), folder / "kill_grader" / f"{STEM}.ipynb")
    # ---- cheats (every function left as the stub, or returning nonsense)
    write(with_cell(stubs(), """
import attribution_course.checks as public
import attribution_course.grading.checks as checks
import attribution_course.grading.compare as comparing
import attribution_course.metrics as metrics
public.compare = checks.compare = comparing.compare = lambda *a, **k: (True, "")
real_check = checks.check
check = public.check = checks.check = lambda exercise, function, *a, expected=None, name=None, **k: real_check(
    exercise, lambda: expected, expected=expected, name=name)
checks.submit = lambda exercise, function, *a, name=None, **k: (checks._save(exercise, {
    "exercise": exercise, "name": name, "status": "returned", "detail": "", "value": "PASSED"}),
    print(f"ex {exercise} {name}: PASSED"))
metrics.logit_diff = lambda *a, **k: 0.0
""", before="2.1"), folder / "monkeypatch" / f"{STEM}.ipynb")
    write(with_cell(stubs(), """
import json, os, torch
results = os.environ.get("ATTRIBUTION_COURSE_RESULTS", "/grading/results")
for exercise in ["2.1", "2.2", "2.3", "2.4"]:
    torch.save({"exercise": exercise, "status": "returned", "verdict": "PASSED", "value": "PASSED", "detail": ""},
               f"{results}/{exercise}.pt")
    with open(os.path.join(os.path.dirname(results), "verdicts.jsonl"), "a") as out:
        out.write(json.dumps({"exercise": exercise, "verdict": "PASSED", "from_graded_cell": True}) + "\\n")
print("ex 2.1 logit_diff_per_prompt: PASSED")
"""), folder / "forge_results" / f"{STEM}.ipynb")
    subclass = learner_notebook(STEM, {"2.1": ["return Agreeable(torch.zeros(len(io_token)))"],
                                       "2.3": ["return Agreeable(torch.zeros_like(values))"]})
    write(with_cell(subclass, """
import torch
import attribution_course.grading.checks as checks

class Agreeable(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if getattr(func, "__name__", "") in ("isclose", "eq", "__eq__", "allclose", "equal"):
            return torch.ones_like(torch.as_tensor(result), dtype=torch.bool)
        return result

checks.plain_value = lambda value: value  # save the subclass itself
""", before="2.1"), folder / "tensor_subclass" / f"{STEM}.ipynb")
    # ---- correct work written unusually: must pass
    cells = exercise_cells(STEM)
    merged = learner_notebook(STEM, {"2.2": None, "2.3": None, "2.4": None})
    graded_21 = next(i for i, c in enumerate(merged.cells) if '"2.1"' in c.source and "check(" in c.source and i > cells["2.1"])
    solution_21 = ex.read_notebook(ex.solution_path(STEM)).cells[cells["2.1"]].source
    merged.cells[graded_21].source = solution_21 + "\n\n" + merged.cells[graded_21].source
    write(merged, folder / "merged_cell" / f"{STEM}.ipynb")
    own = filled(STEM)
    for cell in own.cells:
        cell.metadata = {}  # metadata lost (pasted into a new notebook): graded cells found by their check call
    own.metadata = {}
    own.cells.insert(cells["2.1"], nbformat.v4.new_code_cell(
        'check("2.1", lambda: torch.zeros(3), expected=torch.zeros(3), what="my own test of check")'))
    write(own, folder / "own_check_call" / f"{STEM}.ipynb")
    body = solution_bodies(STEM)[cells["2.1"]]
    chatty_lines = ["from IPython.display import display", "import plotly.express as px",
                    "display(logits.shape)", "px.line(y=[1, 2, 3]).show()",
                    "for i in range(2000):", "    print('debug line', i, flush=True)"] + [line.strip() for line in body]
    chatty = learner_notebook(STEM, {"2.1": chatty_lines, "2.2": None, "2.3": None, "2.4": None})
    write(chatty, folder / "output_inside" / f"{STEM}.ipynb")
    # ---- wrong answers that the notebook's own input does not show: caught by the hidden inputs
    write(learner_notebook(STEM, {"2.1": None, "2.2": ["return 1.0"], "2.3": None, "2.4": None}),
          folder / "constant_accuracy" / f"{STEM}.ipynb")
    write(learner_notebook(STEM, {"2.1": None, "2.2": None, "2.3": None, "2.4": [
        "return (clean_tokens != corrupted_tokens).all(dim=0).nonzero().flatten().tolist()"]}),
          folder / "all_not_any" / f"{STEM}.ipynb")


@pytest.fixture(scope="module")
def hostile_batch(tmp_path_factory, sandbox_or_skip):
    folder = tmp_path_factory.mktemp("hostile")
    out = tmp_path_factory.mktemp("hostile-grades")
    hostile_submissions(folder, out)
    guarded = {"package": Path(attribution_course.__file__).parent, "solutions": ex.SOLUTIONS_DIR,
               "exercises": ex.EXERCISES_DIR}
    before = {name: tree_digest(path) for name, path in guarded.items()}
    submissions = digests(folder)
    start = time.monotonic()
    results = grader.grade_batch(folder, out / "grades.csv", workers=2, timeout=900, cell_timeout=300, progress=False)
    seconds = time.monotonic() - start
    print(f"hostile batch: {len(results)} notebooks in {seconds:.0f} s")
    time.sleep(3)  # a leftover daemon would write to the CSV within a second
    after = {name: tree_digest(path) for name, path in guarded.items()}
    return rows_by(out / "grades.csv"), before, after, submissions, digests(folder), out


def verdicts_of(rows, who: str) -> list[str]:
    return [rows[(f"{who}/{STEM}.ipynb", i)]["verdict"] for i in IDS]


def test_escapes_are_contained(hostile_batch):
    rows, before, after, submissions_before, submissions_after, out = hostile_batch
    assert before == after, "the package, solutions/ or exercises/ changed"
    assert submissions_before == submissions_after, "a submission changed"
    assert "daemon" not in (out / "grades.csv").read_text()
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if DAEMON in cmdline or "sleep\x00987" in cmdline:
            leftovers.append(pid)
    assert not leftovers, f"processes left behind: {leftovers}"
    assert verdicts_of(rows, "append_to_package") == ["not attempted"] * 4
    assert verdicts_of(rows, "zed_stubs") == ["not attempted"] * 4
    assert verdicts_of(rows, "read_others")[2] == "not attempted"  # found no other notebook
    assert verdicts_of(rows, "write_files") == ["not attempted"] * 4
    assert verdicts_of(rows, "background")[0] == "passed"
    assert verdicts_of(rows, "alice") == ["passed"] * 4  # graded normally, although others attacked
    killer = rows[(f"kill_grader/{STEM}.ipynb", IDS[0])]
    assert killer["verdict"] in ("passed", "not graded") and killer["max_points"] == "1"


def test_cheats_earn_no_points(hostile_batch):
    rows, *_ = hostile_batch
    for who in ("monkeypatch", "forge_results", "tensor_subclass"):
        found = verdicts_of(rows, who)
        assert "passed" not in found, (who, found)
        assert sum(int(rows[(f"{who}/{STEM}.ipynb", i)]["points"]) for i in IDS) == 0
    assert verdicts_of(rows, "monkeypatch") == ["wrong"] * 4
    assert verdicts_of(rows, "tensor_subclass")[0] == "wrong" and verdicts_of(rows, "tensor_subclass")[2] == "wrong"


def test_hidden_inputs_catch_what_the_notebook_input_does_not_show(hostile_batch):
    rows, *_ = hostile_batch
    for who, exercise in (("constant_accuracy", "2.2"), ("all_not_any", "2.4")):
        row = rows[(f"{who}/{STEM}.ipynb", exercise)]
        assert row["verdict"] == "wrong" and "hidden input" in row["detail"], row
        others = [rows[(f"{who}/{STEM}.ipynb", i)]["verdict"] for i in IDS if i != exercise]
        assert others == ["passed"] * 3, (who, others)


def test_correct_work_written_unusually_gets_full_marks(hostile_batch):
    rows, *_ = hostile_batch
    for who in ("merged_cell", "own_check_call", "output_inside"):
        assert verdicts_of(rows, who) == ["passed"] * 4, (who, [rows[(f"{who}/{STEM}.ipynb", i)]["detail"] for i in IDS])


# ---------------------------------------------------------------- stated requirements (chapter 5), observed apart

CH5 = "05_first_order_approximation"
FORGED_REQUIREMENTS = """import attribution_course.grading.checks as k, attribution_course.grading.requirements as r
k.check_requirements = r.check_requirements = lambda *args, **kwargs: []  # "no problems"
r.OBSERVERS = {}
"""
UNUSUAL_CACHE = """%time SCALE = 1.0
SCALE = 1.0


def detached(t):
    print("caching", tuple(t.shape))
    return t.detach() * SCALE


@torch.no_grad()
def cache_activations(model, tokens, names):
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return {name: detached(cache[name]) for name in names}
"""


def requirement_submissions(folder: Path) -> None:
    cells = exercise_cells(CH5)
    bodies = solution_bodies(CH5)
    cache_body, gradients_body = bodies[cells["5.1"]], bodies[cells["5.2"]]
    body = lambda lines: [line[4:] for line in lines]  # noqa: E731 - learner_notebook indents the lines itself
    attached = "\n".join(cache_body).replace(".detach()", "").replace("with torch.no_grad():", "if True:")
    kept = [line for line in gradients_body if "zero_grad" not in line]
    # a forger: both requirements broken, and the in-kernel checks replaced, in a cell of its own and in the function's
    forger = learner_notebook(CH5, {"5.1": body(attached.split("\n")), "5.2": body(kept)})
    forger.cells[cells["5.2"]].source = FORGED_REQUIREMENTS + forger.cells[cells["5.2"]].source
    forger.cells.insert(cells["5.1"], nbformat.v4.new_code_cell(FORGED_REQUIREMENTS))
    write(forger, folder / "forger" / f"{CH5}.ipynb")
    # code that reaches for the grader from inside the function: refused, and said where
    reacher = learner_notebook(CH5, {"5.1": ["import attribution_course.grading.requirements as r", *body(cache_body)],
                                     "5.2": None})
    write(reacher, folder / "reacher" / f"{CH5}.ipynb")
    # correct work written unusually: a decorator, helpers and constants in other cells, a magic, prints
    unusual = learner_notebook(CH5, {"5.2": body(["    clear(model)" if "zero_grad" in l else l for l in gradients_body])})
    unusual.cells[cells["5.1"]].source = UNUSUAL_CACHE
    unusual.cells.insert(cells["5.2"], nbformat.v4.new_code_cell("def clear(model):\n    model.zero_grad(set_to_none=True)"))
    write(unusual, folder / "unusual" / f"{CH5}.ipynb")


@pytest.fixture(scope="module")
def requirement_batch(tmp_path_factory, sandbox_or_skip):
    folder = tmp_path_factory.mktemp("requirements")
    out = tmp_path_factory.mktemp("requirement-grades")
    requirement_submissions(folder)
    grader.grade_batch(folder, out / "grades.csv", workers=2, timeout=900, cell_timeout=300, progress=False)
    return rows_by(out / "grades.csv")


def test_requirements_are_observed_where_the_notebook_cannot_forge_them(requirement_batch):
    rows = requirement_batch
    row = lambda who, exercise: rows[(f"{who}/{CH5}.ipynb", exercise)]  # noqa: E731
    assert row("forger", "5.1")["verdict"] == "wrong", row("forger", "5.1")
    assert "keeps the model's computation graph" in row("forger", "5.1")["detail"]
    assert row("forger", "5.2")["verdict"] == "wrong", row("forger", "5.2")
    assert "model.zero_grad(set_to_none=True)" in row("forger", "5.2")["detail"]
    assert row("reacher", "5.1")["verdict"] == "wrong", row("reacher", "5.1")
    assert "imports attribution_course.grading.requirements" in row("reacher", "5.1")["detail"]
    assert row("reacher", "5.2")["verdict"] == "passed", row("reacher", "5.2")
    assert [row("unusual", e)["verdict"] for e in ("5.1", "5.2")] == ["passed", "passed"], \
        [row("unusual", e)["detail"] for e in ("5.1", "5.2")]
