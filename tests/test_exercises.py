"""The exercise notebooks: structure, generation from the solutions, book sync, check messages.

These run no kernel; grading end to end is in test_grading.py.
"""

from __future__ import annotations

import re

import nbformat
import pytest
import torch

from attribution_course import notebook_setup as setup
from attribution_course.grading import generation as ex
from attribution_course.grading.compare import compare

TOPICS = {  # issue 4's list of topics -> exercises that cover it
    "the metric": ["2.1", "2.3"],
    "zero, mean and resample ablation of heads": ["3.1", "3.2", "3.4"],
    "activation patching: residual stream, heads, head x position, noising and denoising": ["4.1", "4.2", "4.3"],
    "caching activations and gradients with hooks": ["5.1", "5.2"],
    "attribution patching for the same components": ["5.3", "5.4", "5.5"],
    "the zero-ablation sign -a·grad": ["6.1", "6.4"],
    "mean ablation (mean - a)·grad": ["7.2", "7.4"],
    "attention-pattern attribution": ["8.1"],
    "comparing estimate and exact effect": ["6.2", "6.3"],
    "a failure of the approximation": ["8.2"],
    "fixing part of it": ["8.3", "8.4"],
    "choosing the base run and the gradient (noising and denoising)": ["5.6"],
    "integrated gradients where the zero-ablation sign fails": ["6.5"],
    "per-edge attention attribution with the zero-ablation sign": ["6.6"],
    "a large head whose removal helps, which the wrong sign calls supporting (issue 9)": ["6.7"],
    "AtP*'s QK fix against saturation": ["8.5"],
    "AtP*'s GradDrop against cancelling paths": ["8.6"],
    "direct versus total effect (path patching to the logits)": ["4.5"],
    "diagnosing a failure by freezing (graded, numeric)": ["8.7"],
}


@pytest.fixture(scope="module")
def solutions():
    return {stem: ex.read_notebook(ex.solution_path(stem)) for stem in ex.NOTEBOOK_STEMS}


@pytest.fixture(scope="module")
def parsed(solutions):
    return {stem: ex.parse_exercises(nb, stem) for stem, nb in solutions.items()}


def test_exercise_notebooks_are_exactly_what_the_generator_writes():
    problems = ex.check(list(ex.NOTEBOOK_STEMS))
    assert problems == [], "\n".join(problems)


def test_check_detects_a_hand_edit(tmp_path, monkeypatch):
    stem = ex.NOTEBOOK_STEMS[0]
    monkeypatch.setattr(ex, "EXERCISES_DIR", tmp_path)
    edited = ex.read_notebook(ex.SOLUTIONS_DIR.parent / "exercises" / f"{stem}.ipynb")
    edited.cells[0].source += "\nedited by hand"
    (tmp_path / f"{stem}.ipynb").write_text(ex.notebook_text(edited))
    problems = ex.check([stem])
    assert len(problems) == 1 and "differs from what the generator writes" in problems[0] and stem in problems[0]


def test_at_least_seven_notebooks_and_25_exercises_covering_every_topic(parsed):
    assert len(parsed) >= 7
    ids = [e.id for exs in parsed.values() for e in exs]
    assert len(ids) >= 25, ids
    for topic, needed in TOPICS.items():
        assert set(needed) <= set(ids), f"topic {topic!r} lost its exercises {needed}"
    for stem, exs in parsed.items():
        chapter = int(stem[:2])
        assert all(e.id.startswith(f"{chapter}.") for e in exs), f"{stem}: exercise ids must start with {chapter}."


def test_each_exercise_has_statement_markers_typed_signature_hints_and_a_graded_check(solutions, parsed):
    for stem, exs in parsed.items():
        nb = solutions[stem]
        assert nb.metadata.kernelspec == ex.KERNELSPEC
        for e in exs:
            statement = nb.cells[e.statement_cell].source
            assert re.search(r"Difficulty: [🔴⚪]{3}", statement) and re.search(r"Importance: [🔵⚪]{3}", statement)
            code = nb.cells[e.solution_cell].source
            assert f"def {e.name}(" in code, f"{stem} {e.id}: the solution cell must define {e.name}"
            assert '"""' in code and "->" in code, f"{stem} {e.id}: signature needs a return type and a docstring"
            hints = [c for c in nb.cells[e.solution_cell : e.check_cell] if c.cell_type == "markdown"]
            assert hints and all("<details>" in h.source and "</details>" in h.source for h in hints)
            graded = nb.cells[e.check_cell]
            assert e.check_cell == max(i for i in range(e.statement_cell, e.check_cell + 1) if nb.cells[i].cell_type == "code")
            assert ex.NBVAL_CHECK_TAG in graded.metadata.tags and graded.metadata[ex.METADATA_KEY]["exercise"] == e.id


def test_solutions_are_executed_and_every_graded_output_is_the_stable_verdict(solutions, parsed):
    for stem, nb in solutions.items():
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{stem}: run `python -m attribution_course.exercises generate`"
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
        for e in parsed[stem]:
            outputs = nb.cells[e.check_cell].outputs
            assert [o.output_type for o in outputs] == ["stream"] and outputs[0].name == "stdout"
            assert outputs[0].text == f"ex {e.id} {e.name}: PASSED\n", f"{stem}: {outputs[0].text!r}"


def test_learner_notebooks_hold_stubs_hints_and_graded_cells_but_no_solution(parsed):
    for stem, exs in parsed.items():
        nb = ex.read_notebook(ex.exercise_path(stem))
        text = ex.exercise_path(stem).read_text()
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        for e in exs:
            assert ex.STUB in nb.cells[e.solution_cell].source
            graded = nb.cells[e.check_cell]
            assert ex.NBVAL_CHECK_TAG in graded.metadata.tags and graded.metadata[ex.METADATA_KEY]["exercise"] == e.id


def learner_notebook_paths() -> list:
    """exercises/*.ipynb, and book/downloads/*.ipynb when sync-book has written them."""
    downloads = sorted((ex.BOOK_DIR / "downloads").glob("*.ipynb"))
    return [ex.exercise_path(stem) for stem in ex.NOTEBOOK_STEMS] + downloads


@pytest.mark.parametrize("path", learner_notebook_paths(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_learner_notebook_stores_an_output_let_alone_a_verdict(path):
    """A learner must never see `PASSED` (or any value) under a stub they have not solved."""
    problems = ex.stored_outputs(ex.read_notebook(path))
    assert problems == [], f"{path}: " + "; ".join(problems)


def test_stored_outputs_names_the_cell_and_the_verdict():
    """The check above can fail: the solution notebook (graded outputs stored) is reported."""
    problems = ex.stored_outputs(ex.read_notebook(ex.solution_path("03_exact_ablation")))
    assert any("verdict 'ex 3.1 zero_ablate_head: PASSED'" in p for p in problems), problems
    nb = ex.read_notebook(ex.exercise_path("03_exact_ablation"))
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells[last].outputs = [nbformat.v4.new_output("stream", name="stdout", text="ex 3.4 x: WRONG - off\n")]
    assert ex.stored_outputs(nb) == [f"cell {last} stores 1 output(s) (execution count None), "
                                     "among them the verdict 'ex 3.4 x: WRONG'"]


# ---------------------------------------------------------------- the set-up cell


def test_every_learner_notebook_opens_with_the_set_up_cell_for_the_configured_repository():
    source = setup.setup_cell_source(setup.course_repository_url(environ={}))
    for stem in ex.NOTEBOOK_STEMS:
        nb = ex.read_notebook(ex.exercise_path(stem))
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert setup.is_setup_cell(code[0]) and code[0].source == source, f"{stem}: first code cell is not the set-up cell"
        assert sum(setup.is_setup_cell(c) for c in nb.cells) == 1


def run_setup_cell(source: str, monkeypatch, *, installed: bool) -> list[list[str]]:
    """Run a set-up cell's code as a kernel would; return the pip commands it ran (none really run)."""
    import importlib.util
    import subprocess

    commands = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real_find_spec(name, *a) if installed or name != "attribution_course" else None)
    monkeypatch.setattr(subprocess, "check_call", lambda command: commands.append(command))
    exec(compile(source, "set-up cell", "exec"), {})
    return commands


def test_set_up_cell_without_a_repository_url_names_no_url_and_says_what_to_do(monkeypatch):
    source = setup.setup_cell_source("")
    assert "github.com" not in source and "OWNER" not in source and "git+" not in source
    monkeypatch.delenv(setup.PACKAGE_SOURCE_ENV, raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install <path of the checkout>.*COURSE_PACKAGE_SOURCE"):
        run_setup_cell(source, monkeypatch, installed=False)
    monkeypatch.setenv(setup.PACKAGE_SOURCE_ENV, "/some/checkout")
    [command] = run_setup_cell(source, monkeypatch, installed=False)
    assert command[1:] == ["-m", "pip", "install", "--quiet", "/some/checkout"]


def test_set_up_cell_installs_from_the_published_repository_with_torch_cpu(monkeypatch):
    url = "https://github.com/someone/attribution-course"
    source = setup.setup_cell_source(url)
    monkeypatch.delenv(setup.PACKAGE_SOURCE_ENV, raising=False)
    assert run_setup_cell(source, monkeypatch, installed=True) == [], "an installed package is left alone"
    [command] = run_setup_cell(source, monkeypatch, installed=False)
    assert command[-1] == f"attribution-course @ git+{url}" and setup.TORCH_CPU_INDEX in command
    monkeypatch.setenv(setup.PACKAGE_SOURCE_ENV, "/some/checkout")
    [command] = run_setup_cell(source, monkeypatch, installed=False)
    assert command[-1] == "/some/checkout" and setup.TORCH_CPU_INDEX not in command


def test_strip_solution_keeps_indentation_and_names_the_cell():
    source = "def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"
    assert ex.strip_solution(source, "nb cell 3") == f"def f(x):\n    '''doc'''\n    {ex.STUB}\n"
    with pytest.raises(ex.NotebookFormatError, match="nb cell 3"):
        ex.strip_solution("def f():\n    ### BEGIN SOLUTION\n    pass\n", "nb cell 3")


def test_malformed_solution_structure_is_reported_with_file_and_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("## Exercise 9.1: `f`\n\nDifficulty: 🔴⚪⚪ · Importance: 🔵⚪⚪"),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"),
        nbformat.v4.new_code_cell('check("9.1", f, expected=1)'),
    ]
    with pytest.raises(ex.NotebookFormatError, match=r"some\.ipynb: exercise 9\.1 needs a hint cell"):
        ex.parse_exercises(nb, "some.ipynb")


def test_sync_book_writes_appendix_and_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "BOOK_DIR", tmp_path)
    monkeypatch.delenv("COURSE_REPOSITORY_URL", raising=False)
    ex.sync_book(ex.available_stems())
    for stem in ex.NOTEBOOK_STEMS:
        appendix = ex.read_notebook(tmp_path / "appendix" / f"{stem}.ipynb")
        assert appendix.cells[0].source.startswith("# Solutions")
        assert "reference solution" in appendix.cells[0].source
        folded = [c for c in appendix.cells if c.cell_type == "code" and ex.BEGIN_SOLUTION in c.source]
        assert folded and all("hide-input" in c.metadata.tags for c in folded)
        assert all(c.execution_count for c in appendix.cells if c.cell_type == "code"), "rendered without execution"
        assert not any(setup.is_setup_cell(c) for c in appendix.cells), "the book's kernel needs no set-up cell"
        assert (tmp_path / "downloads" / f"{stem}.ipynb").read_bytes() == ex.exercise_path(stem).read_bytes()


def test_downloads_install_from_the_repository_url_in_force(tmp_path, monkeypatch):
    """The publishing workflow sets COURSE_REPOSITORY_URL: the book's downloads follow it, exercises/ does not."""
    url = "https://github.com/someone/attribution-course"
    monkeypatch.setattr(ex, "BOOK_DIR", tmp_path)
    monkeypatch.setenv("COURSE_REPOSITORY_URL", url)
    ex.sync_book(ex.available_stems())
    for stem in ex.NOTEBOOK_STEMS:
        download = ex.read_notebook(tmp_path / "downloads" / f"{stem}.ipynb")
        [cell] = [c for c in download.cells if setup.is_setup_cell(c)]
        assert cell.source == setup.setup_cell_source(url)
        assert ex.stored_outputs(download) == []
    assert ex.check(list(ex.NOTEBOOK_STEMS)) == [], "exercises/ depends on book/_config.yml alone"


def test_book_lists_the_appendix_and_every_chapter_links_its_exercises():
    toc = (ex.BOOK_DIR / "_toc.yml").read_text()
    for stem in ex.NOTEBOOK_STEMS:
        assert f"appendix/{stem}" in toc, f"book/_toc.yml does not list appendix/{stem}"
        chapter = ex.BOOK_DIR / f"{stem}.md"
        assert f"downloads/{stem}.ipynb" in chapter.read_text() and "{download}" in chapter.read_text(), (
            f"{chapter} has no {{download}} link to downloads/{stem}.ipynb"
        )


def test_built_book_renders_solutions_and_ships_the_downloads():
    html = ex.BOOK_DIR / "_build" / "html"
    if not (html / "index.html").exists():
        pytest.skip("book not built (make test builds it first)")
    downloads = {p.name for p in (html / "_downloads").rglob("*.ipynb")}
    for stem in ex.NOTEBOOK_STEMS:
        page = (html / "appendix" / f"{stem}.html").read_text()
        assert "Solutions" in page and "PASSED" in page, f"appendix/{stem}.html lacks the rendered solutions"
        assert f"{stem}.ipynb" in downloads


# ---------------------------------------------------------------- check() explanations


def test_compare_accepts_other_correct_implementations():
    torch.manual_seed(0)
    a, g = torch.randn(8, 15, 4, 32), torch.randn(8, 15, 4, 32)
    loops = torch.stack([torch.stack([(a[:, :, h] * g[:, :, h]).sum() for h in range(4)])])
    einsum = torch.einsum("bphd,bphd->h", a, g)[None]
    assert compare(einsum, loops, atol=1e-4, rtol=1e-3) == (True, "")
    assert compare(einsum.double(), loops, atol=1e-4, rtol=1e-3)[0]
    assert compare(0.5, torch.tensor(0.5), atol=1e-6, rtol=0)[0]
    assert compare([1, 10], [1, 10], atol=0, rtol=0)[0] and compare(torch.tensor([10]), [10], atol=0, rtol=0)[0]
    nan = float("nan")  # a reference's "not computed" entries: NaN in both is agreement
    assert compare(torch.tensor([1.0, nan]), torch.tensor([1.0, nan]), atol=1e-4, rtol=0) == (True, "")


@pytest.mark.parametrize(
    "got, expected, words",
    [
        (-torch.arange(1.0, 17).reshape(4, 4), torch.arange(1.0, 17).reshape(4, 4), "opposite sign"),
        (torch.zeros(8), torch.zeros(4, 8), "shape (8,), expected (4, 8)"),
        (torch.arange(60.0).reshape(4, 15).T, torch.arange(60.0).reshape(4, 15), "wrong axis order"),
        (torch.tensor([1.0, -2, 3, -4]), torch.tensor([1.0, 2, 3, 4]), "sign differs on 2 of 4 entries"),
        (16 * torch.arange(1.0, 5), torch.arange(1.0, 5), "16 times the expected"),
        (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), "1 of 2 entries are NaN"),
        (torch.tensor([1.0, 5.0]), torch.tensor([1.0, float("nan")]), "1 of 2 entries are NaN"),
        (torch.tensor([2.0, float("nan")]), torch.tensor([1.0, float("nan")]), "1 of 2 entries are off"),
        (None, torch.zeros(3), "returned None"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(2)}, "missing keys ['b']"),
        ([[10], [11]], [[10], [10]], "expected [[10], [10]], got [[10], [11]]"),
    ],
)
def test_compare_explains_wrong_answers(got, expected, words):
    ok, detail = compare(got, expected, atol=1e-4, rtol=1e-3)
    assert not ok and words in detail, detail


def test_check_prints_one_stable_line_and_recognises_not_attempted(capsys):
    from attribution_course import checks

    def chatty(x):
        print("debugging output the learner forgot")
        return x * 2

    def stub(x):
        raise NotImplementedError

    def buggy(x):
        return x.reshape(3)

    checks.check("1.1", chatty, torch.ones(2), expected=torch.full((2,), 2.0))
    checks.check("1.2", stub, torch.ones(2), expected=torch.ones(2))
    checks.check("1.3", buggy, torch.ones(2), expected=torch.ones(2))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ex 1.1 chatty: PASSED"
    assert lines[1] == "ex 1.2 stub: NOT ATTEMPTED - the function still raises NotImplementedError"
    assert lines[2].startswith("ex 1.3 buggy: WRONG - raised RuntimeError: shape '[3]' is invalid")
    assert len(lines) == 3


def test_compare_never_raises_on_values_it_cannot_compare():
    import numpy as np

    rows = np.array([[0, 1], [2, 3]])  # numpy rows where a list of tuples is expected
    ok, detail = compare(rows, [(0, 1), (2, 3)], atol=0, rtol=0, what="top components")
    assert not ok and "top components: cannot be compared" in detail  # a verdict, not an exception
    ok, detail = compare(object(), torch.zeros(2), atol=0, rtol=0, what="effects")
    assert not ok and "effects" in detail


def test_appendix_spells_out_ratings_and_links_back_to_its_chapter():
    from attribution_course.grading.generation import make_appendix_notebook, spell_out_ratings

    spoken = spell_out_ratings("Difficulty: 🔴🔴⚪ · Importance: 🔵⚪⚪")
    assert spoken == ('Difficulty: 2 of 3 <span aria-hidden="true">🔴🔴⚪</span> · '
                      'Importance: 1 of 3 <span aria-hidden="true">🔵⚪⚪</span>')
    assert spell_out_ratings("no markers here") == "no markers here"
    solution = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Exercises: x"),
        nbformat.v4.new_markdown_cell("## Exercise 9.1: `f`\n\nDifficulty: 🔴⚪⚪ · Importance: 🔵🔵🔵"),
    ])
    appendix = make_appendix_notebook(solution, "09_x")
    assert "{doc}`/09_x`" in appendix.cells[0].source
    assert "Difficulty: 1 of 3" in appendix.cells[1].source and "Importance: 3 of 3" in appendix.cells[1].source
    assert solution.cells[1].source.startswith("## Exercise 9.1"), "the solution notebook is not modified"


def test_learner_notebooks_spell_out_difficulty_and_importance():
    """In Jupyter too a screen reader should hear "Difficulty: 2 of 3", not three circles."""
    for stem in ex.NOTEBOOK_STEMS:
        nb = ex.read_notebook(ex.exercise_path(stem))
        statements = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Exercise")]
        assert statements, stem
        for statement in statements:
            assert re.search(r"Difficulty: [123] of 3 <span aria-hidden=\"true\">[🔴⚪]{3}</span>", statement), (stem, statement[:80])
            assert re.search(r"Importance: [123] of 3 <span aria-hidden=\"true\">[🔵⚪]{3}</span>", statement), (stem, statement[:80])
