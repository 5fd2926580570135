"""Grade exercise notebooks with nbval: one learner's notebook, or a folder of submissions.

Learner::

    python -m attribution_course.grade exercises/03_exact_ablation.ipynb

prints a scorecard, one line per exercise (passed / not attempted / wrong, with what
was expected and what came), and exits 0 only if every exercise passed.

Instructor::

    python -m attribution_course.grade --batch SUBMISSIONS_DIR --csv grades.csv

grades every ``*.ipynb`` under SUBMISSIONS_DIR, each in its own kernel with a timeout,
in parallel, and writes the CSV gradebook (submission, exercise, verdict, points,
max_points, detail) and one feedback file per submission (default: ``feedback/``
next to the CSV).

How a notebook is graded. The learner's file is only ever read. A copy is made in a
temporary directory in which every graded cell (found by its metadata or by its
``check("N.M", ...)`` call) gets the source, stored output and execution count of the
reference exercises notebook (``exercises/NN_name.ipynb``, generated from the
solutions), so neither an edited check cell nor the learner's own stored outputs
change the grade; a graded cell the learner deleted is appended at the end. nbval
(lax mode: only the graded cells' outputs are compared) runs the copy in a fresh
kernel. Each ``check`` also writes its verdict to a side file, which explains a
failure ("sign differs on 6 of 16 entries") better than an output diff can.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .checks import NOT_ATTEMPTED, PASSED, VERDICTS_ENV
from .nbval_watchdog import KERNEL_DIED
from .exercises import (
    _CHECK_CALL,
    EXERCISES_DIR,
    GRADED_TAG,
    KERNELSPEC,
    METADATA_KEY,
    NBVAL_CHECK_TAG,
    NOTEBOOK_STEMS,
    NotebookFormatError,
    read_notebook,
)

DEFAULT_TIMEOUT = 300  # seconds per notebook
DEFAULT_CELL_TIMEOUT = 60  # seconds per cell; nbval interrupts the kernel after it

# verdicts of one exercise
V_PASSED, V_WRONG, V_NOT_ATTEMPTED, V_NOT_GRADED = "passed", "wrong", "not attempted", "not graded"
# status of a whole notebook
S_GRADED, S_MALFORMED, S_UNKNOWN, S_TIMEOUT, S_CRASHED, S_ERROR = (
    "graded", "malformed", "unknown notebook", "timeout", "kernel crashed", "grader error",
)
_NBVAL_TAGS = {NBVAL_CHECK_TAG, "nbval-ignore-output", "nbval-skip", "nbval-raises-exception", "raises-exception"}
_ANSI = re.compile(r"(\x1b|#x1B)\[[0-9;]*m")  # junit xml escapes ESC as "#x1B"


@dataclass
class ExerciseResult:
    exercise: str
    name: str
    verdict: str
    points: int
    max_points: int
    detail: str = ""


@dataclass
class NotebookResult:
    submission: str
    notebook: str | None
    status: str
    detail: str = ""
    exercises: list[ExerciseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def all_passed(self) -> bool:
        return self.status == S_GRADED and bool(self.exercises) and all(e.verdict == V_PASSED for e in self.exercises)

    @property
    def points(self) -> int:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> int:
        return sum(e.max_points for e in self.exercises)


@dataclass(frozen=True)
class ReferenceExercise:
    id: str
    name: str
    points: int
    cell: nbformat.NotebookNode  # the graded cell with its reference output


# ---------------------------------------------------------------- reference


def exercise_id_of(cell: nbformat.NotebookNode) -> str | None:
    """The exercise a graded cell checks: from its metadata, else from its ``check("N.M"`` call."""
    if cell.cell_type != "code":
        return None
    meta = cell.get("metadata", {}).get(METADATA_KEY, {})
    if isinstance(meta, dict) and isinstance(meta.get("exercise"), str):
        return meta["exercise"]
    found = _CHECK_CALL.search(cell.source if isinstance(cell.source, str) else "")
    return found.group(1) if found else None


def load_reference(stem: str, reference_dir: Path) -> list[ReferenceExercise]:
    """The graded cells of the reference (generated) exercises notebook ``stem``."""
    path = reference_dir / f"{stem}.ipynb"
    nb = read_notebook(path)
    exercises = []
    for cell in nb.cells:
        if cell.cell_type == "code" and GRADED_TAG in cell.metadata.get("tags", []):
            meta = cell.metadata[METADATA_KEY]
            exercises.append(ReferenceExercise(meta["exercise"], meta["name"], int(meta["points"]), cell))
    if not exercises:
        raise NotebookFormatError(f"{path}: reference notebook has no graded cells")
    return exercises


def identify(nb: nbformat.NotebookNode, path: Path) -> str | None:
    """Which course notebook this is: from its metadata, else from its file name."""
    stem = nb.get("metadata", {}).get(METADATA_KEY, {}).get("notebook")
    if stem in NOTEBOOK_STEMS:
        return stem
    by_name = [s for s in NOTEBOOK_STEMS if s in path.name]
    return by_name[0] if len(by_name) == 1 else None


def prepare_graded_copy(
    learner: nbformat.NotebookNode, reference: list[ReferenceExercise]
) -> tuple[nbformat.NotebookNode, dict[int, str], list[str]]:
    """The notebook nbval runs, its graded code-cell numbers ``{nbval cell number: exercise}``,
    and the exercises whose graded cell the learner deleted (re-added at the end)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    by_id = {r.id: r for r in reference}
    placed: set[str] = set()
    for cell in learner.cells:
        if cell.get("cell_type") not in ("code", "markdown", "raw"):
            continue
        ex_id = exercise_id_of(cell)
        if ex_id in by_id and ex_id not in placed:
            placed.add(ex_id)
            nb.cells.append(_reference_cell(by_id[ex_id]))
        elif cell.cell_type == "code":
            learner_cell = nbformat.v4.new_code_cell(source=cell.source)
            # a copy of a graded cell (Jupyter copies its tags) is the learner's cell, not a graded one
            tags = [t for t in cell.get("metadata", {}).get("tags", []) if t not in _NBVAL_TAGS | {GRADED_TAG}]
            if tags:
                learner_cell.metadata["tags"] = tags
            nb.cells.append(learner_cell)
    missing = [r.id for r in reference if r.id not in placed]
    for ex_id in missing:
        nb.cells.append(_reference_cell(by_id[ex_id]))
    graded, number = {}, 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            if GRADED_TAG in cell.metadata.get("tags", []):
                graded[number] = cell.metadata[METADATA_KEY]["exercise"]
            number += 1
    return nb, graded, missing


#: First line of every graded cell in the grader's copy: it marks the verdict that follows
#: as the graded cell's own (``checks.graded_cell``). It prints nothing, so nbval's
#: comparison with the reference output is unchanged.
_GRADED_CELL_MARK = "import attribution_course.checks as _grading_checks; _grading_checks.graded_cell = {id!r}\n"


def _reference_cell(ref: ReferenceExercise) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source=_GRADED_CELL_MARK.format(id=ref.id) + ref.cell.source)
    cell.metadata = nbformat.NotebookNode(tags=[GRADED_TAG, NBVAL_CHECK_TAG], **{METADATA_KEY: dict(ref.cell.metadata[METADATA_KEY])})
    cell.outputs = nbformat.from_dict(ref.cell.outputs)
    cell.execution_count = ref.cell.execution_count
    return cell


# ---------------------------------------------------------------- running nbval


@dataclass
class RunOutcome:
    cells: dict[int, tuple[str, str]]  # nbval cell number -> (passed|failure|error|skipped, message)
    records: dict[str, dict]  # exercise -> last verdict record written by check()
    timed_out: bool
    returncode: int | None
    output: str


def run_nbval(nb: nbformat.NotebookNode, *, timeout: float, cell_timeout: float, threads: int) -> RunOutcome:
    workdir = Path(tempfile.mkdtemp(prefix="grade-"))
    try:
        notebook = workdir / "submission.ipynb"
        nbformat.write(nb, str(notebook))
        junit, verdicts = workdir / "junit.xml", workdir / "verdicts.jsonl"
        env = dict(os.environ, **{VERDICTS_ENV: str(verdicts), "HF_HUB_OFFLINE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
        # The model is tiny: one thread per kernel is faster than several spin-waiting on a busy machine.
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [
            sys.executable, "-m", "pytest", notebook.name, "--nbval-lax", "--nbval-current-env",
            f"--nbval-cell-timeout={cell_timeout}", f"--junitxml={junit}", "-p", "no:cacheprovider",
            "-p", "attribution_course.nbval_watchdog",
            "-q", "--rootdir", str(workdir), "-c", os.devnull,
        ]
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        timed_out = False
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(process)
            output, _ = process.communicate()
        return RunOutcome(_parse_junit(junit), _read_records(verdicts), timed_out, process.returncode, output or "")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill pytest and everything it started; the kernel runs in a session of its own."""
    try:
        import psutil

        children = psutil.Process(process.pid).children(recursive=True)
    except Exception:  # psutil missing or pytest already gone
        children = []
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass


def _parse_junit(path: Path) -> dict[int, tuple[str, str]]:
    if not path.exists():
        return {}
    cells = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        found = re.search(r"Cell (\d+)", case.get("name", ""))
        if not found:
            continue
        status, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                status = kind
                message = _ANSI.sub("", (node.get("message") or "") + "\n" + (node.text or ""))
                break
        cells[int(found.group(1))] = (status, message)
    return cells


def _read_records(path: Path) -> dict[str, dict]:
    records = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["from_graded_cell"]:  # a learner's own check() calls do not count
                    records[record["exercise"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return records


# ---------------------------------------------------------------- verdicts


# what nbval (and the watchdog plugin) write when a cell did not run normally
_DIED_HERE = KERNEL_DIED
_DEAD_BEFORE = "Kernel dead on test start"
_NOT_INTERRUPTIBLE = "Failed to interrupt kernel"
_EARLIER_HANG = "Previous cell timed out"
_TIMEOUT = "Timeout of"


def _exercise_result(
    ref: ReferenceExercise, cell: tuple[str, str] | None, record: dict | None, cell_timeout: float
) -> ExerciseResult:
    def result(verdict: str, detail: str = "") -> ExerciseResult:
        return ExerciseResult(ref.id, ref.name, verdict, ref.points if verdict == V_PASSED else 0, ref.points, detail)

    status, message = cell or (None, "")
    if record is not None:  # check() ran: its verdict explains best
        if record["verdict"] == NOT_ATTEMPTED:
            return result(V_NOT_ATTEMPTED, record.get("detail", ""))
        if record["verdict"] == PASSED and status == "passed":
            return result(V_PASSED)
        if record["verdict"] == PASSED:
            return result(V_WRONG, "the check passed, but the cell's output differs from the reference: " + _short(message))
        return result(V_WRONG, record.get("detail", ""))
    if status == "passed":  # the expected line was printed, but not by the course's check()
        return result(V_WRONG, "the graded cell printed the expected line, but the course's check() did not run in it (was `check` redefined?)")
    if status is None:
        return result(V_NOT_GRADED, "the check cell was never run")
    if _DIED_HERE in message:
        return result(V_WRONG, "the kernel died while running this cell (os._exit, a crash, or out of memory?)")
    if _DEAD_BEFORE in message:
        return result(V_NOT_GRADED, "not run: the kernel had died in an earlier cell")
    if _NOT_INTERRUPTIBLE in message:
        return result(V_WRONG, f"did not finish within {cell_timeout:g} s and ignored the interrupt; the kernel was stopped")
    if _EARLIER_HANG in message:
        return result(V_NOT_GRADED, "not run: an earlier cell hung and the kernel was stopped")
    if _TIMEOUT in message:
        return result(V_WRONG, f"did not finish within {cell_timeout:g} s and was interrupted; is there an infinite loop?")
    return result(V_WRONG, "the check cell raised " + _exception_summary(message))


def _exception_summary(message: str) -> str:
    """The last 'SomeError: text' line of a traceback."""
    lines = [l.strip() for l in message.splitlines() if re.match(r"^\s*[A-Za-z_.]*(Error|Exception|Interrupt)\b", l)]
    return _short(lines[-1]) if lines else _short(message)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def grade_notebook(
    path: Path,
    *,
    reference_dir: Path = EXERCISES_DIR,
    timeout: float = DEFAULT_TIMEOUT,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    threads: int = 1,
    name: str | None = None,
) -> NotebookResult:
    """Grade one notebook. ``path`` is only read, never written."""
    start = time.monotonic()
    submission = name or str(path)
    try:
        learner = read_notebook(path)
        stem = identify(learner, path)
        if stem is None:
            return NotebookResult(
                submission, None, S_UNKNOWN,
                f"{path}: cannot tell which exercise notebook this is (no '{METADATA_KEY}' metadata and no known "
                f"name such as {NOTEBOOK_STEMS[1]} in the file name)",
            )
    except NotebookFormatError as err:
        return NotebookResult(submission, None, S_MALFORMED, str(err), seconds=time.monotonic() - start)
    try:
        reference = load_reference(stem, reference_dir)
    except NotebookFormatError as err:
        return NotebookResult(
            submission, stem, S_ERROR, f"cannot read the reference notebook ({err}); pass --reference-dir"
        )
    try:
        graded_nb, graded_cells, missing = prepare_graded_copy(learner, reference)
    except Exception as err:  # learner JSON that is valid but odd (e.g. a cell without a source)
        return NotebookResult(submission, stem, S_MALFORMED, f"{path}: unexpected notebook structure ({err})")
    outcome = run_nbval(graded_nb, timeout=timeout, cell_timeout=cell_timeout, threads=threads)

    by_exercise = {ex: number for number, ex in graded_cells.items()}
    results = [
        _exercise_result(r, outcome.cells.get(by_exercise[r.id]), outcome.records.get(r.id), cell_timeout)
        for r in reference
    ]
    notes = [f"the graded cell of exercise {m} was missing; the reference check was appended at the end" for m in missing]
    for number, (status, message) in sorted(outcome.cells.items()):
        if number not in graded_cells and status in ("failure", "error") and _DEAD_BEFORE not in message:
            notes.append(f"code cell {number + 1} (not graded) raised {_exception_summary(message)}")
    messages = [m for _, m in outcome.cells.values()]
    status, detail = S_GRADED, ""
    if outcome.timed_out:
        status, detail = S_TIMEOUT, f"the notebook did not finish within {timeout:g} s and was stopped"
        for r in results:
            if r.verdict == V_NOT_GRADED:
                r.detail = "not reached before the notebook timed out"
    elif any(_NOT_INTERRUPTIBLE in m for m in messages):
        status, detail = S_TIMEOUT, (
            f"a cell ran longer than {cell_timeout:g} s and ignored the interrupt; the kernel was stopped"
        )
    elif any(_DIED_HERE in m or _DEAD_BEFORE in m for m in messages):
        status, detail = S_CRASHED, "the kernel died while running the notebook"
    elif not outcome.cells:
        status, detail = S_ERROR, "nbval did not run: " + _short(outcome.output[-2000:])
    return NotebookResult(submission, stem, status, detail, results, notes, time.monotonic() - start)


# ---------------------------------------------------------------- reports


def scorecard(result: NotebookResult) -> str:
    title = f"{result.submission}" + (f" ({result.notebook})" if result.notebook else "")
    lines = [f"Grading {title}"]
    if result.status != S_GRADED:
        lines.append(f"  {result.status.upper()}: {result.detail}")
    width = max((len(f"ex {e.exercise} {e.name}") for e in result.exercises), default=0)
    for e in result.exercises:
        label = f"ex {e.exercise} {e.name}".ljust(width)
        lines.append(f"  {label}  {e.verdict:<13}  {e.points}/{e.max_points}")
        if e.detail and e.verdict != V_PASSED:
            lines.append(f"      {e.detail}")
    for note in result.notes:
        lines.append(f"  note: {note}")
    if result.exercises:
        passed = sum(e.verdict == V_PASSED for e in result.exercises)
        lines.append(
            f"Score: {result.points}/{result.max_points} points; {passed} of {len(result.exercises)} exercises passed."
        )
    return "\n".join(lines)


CSV_COLUMNS = ("submission", "exercise", "verdict", "points", "max_points", "detail")


def csv_rows(result: NotebookResult) -> list[dict]:
    rows = []
    if result.status != S_GRADED:
        rows.append(dict(submission=result.submission, exercise="(notebook)", verdict=result.status, points=0,
                         max_points=0, detail=result.detail))
    for e in result.exercises:
        rows.append(dict(submission=result.submission, exercise=e.exercise, verdict=e.verdict, points=e.points,
                         max_points=e.max_points, detail=e.detail))
    return rows


def find_submissions(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and p.is_file())


def grade_batch(
    folder: Path,
    csv_path: Path,
    *,
    feedback_dir: Path | None = None,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    reference_dir: Path = EXERCISES_DIR,
    progress: bool = True,
) -> list[NotebookResult]:
    """Grade every notebook under ``folder`` in parallel; write the CSV and feedback files."""
    submissions = find_submissions(folder)
    workers = workers or max(1, min(len(submissions), os.cpu_count() or 1))
    feedback_dir = feedback_dir or csv_path.parent / "feedback"
    feedback_dir.mkdir(parents=True, exist_ok=True)
    results: dict[Path, NotebookResult] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(
                _grade_safely, path, name=str(path.relative_to(folder)), reference_dir=reference_dir,
                timeout=timeout, cell_timeout=cell_timeout,
            ): path
            for path in submissions
        }
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if progress:
                print(f"{result.submission}: {result.status}, {result.points}/{result.max_points} points "
                      f"({result.seconds:.0f} s)", flush=True)
    ordered = [results[p] for p in submissions]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in ordered:
            writer.writerows(csv_rows(result))
    for result in ordered:
        feedback_name = result.submission.replace(os.sep, "__").removesuffix(".ipynb") + ".txt"
        (feedback_dir / feedback_name).write_text(scorecard(result) + "\n", encoding="utf-8")
    return ordered


def _grade_safely(path: Path, **kwargs) -> NotebookResult:
    """A bug or surprise in one submission must not stop the batch."""
    try:
        return grade_notebook(path, **kwargs)
    except Exception as err:
        return NotebookResult(kwargs.get("name") or str(path), None, S_ERROR, f"{type(err).__name__}: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attribution_course.grade",
        description="Grade exercise notebooks with nbval (the notebooks are never modified).",
    )
    parser.add_argument("notebook", nargs="?", type=Path, help="one learner notebook to grade")
    parser.add_argument("--batch", type=Path, metavar="SUBMISSIONS_DIR", help="grade every notebook in this folder")
    parser.add_argument("--csv", type=Path, default=Path("grades.csv"), help="gradebook to write in batch mode")
    parser.add_argument("--feedback-dir", type=Path, help="per-submission feedback files (default: feedback/ next to the CSV)")
    parser.add_argument("--workers", type=int, help="notebooks graded at once (default: number of CPU cores)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per notebook (default %(default)s)")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT, help="seconds per cell (default %(default)s)")
    parser.add_argument("--reference-dir", type=Path, default=EXERCISES_DIR, help="generated exercises notebooks (default %(default)s)")
    args = parser.parse_args(argv)
    if (args.notebook is None) == (args.batch is None):
        parser.error("give either one NOTEBOOK or --batch SUBMISSIONS_DIR")

    if args.batch is not None:
        if not args.batch.is_dir():
            print(f"error: submissions folder {args.batch} does not exist or is not a folder", file=sys.stderr)
            return 2
        if not find_submissions(args.batch):
            print(f"error: no .ipynb files under {args.batch}", file=sys.stderr)
            return 2
        results = grade_batch(
            args.batch, args.csv, feedback_dir=args.feedback_dir, workers=args.workers, timeout=args.timeout,
            cell_timeout=args.cell_timeout, reference_dir=args.reference_dir,
        )
        complete = sum(r.all_passed for r in results)
        print(f"graded {len(results)} submission(s), {complete} fully correct; wrote {args.csv}")
        return 0

    if not args.notebook.is_file():
        print(f"error: {args.notebook} does not exist or is not a file", file=sys.stderr)
        return 2
    result = grade_notebook(args.notebook, reference_dir=args.reference_dir, timeout=args.timeout, cell_timeout=args.cell_timeout)
    print(scorecard(result))
    if result.status in (S_MALFORMED, S_UNKNOWN):
        return 2
    return 0 if result.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
