"""Grade exercise notebooks: one learner's notebook, or a folder of submissions.

Learner::

    python -m attribution_course.grade exercises/03_exact_ablation.ipynb

prints a scorecard, one line per exercise (passed / not attempted / wrong, with what
was expected and what came), and exits 0 only if every exercise passed. It uses the
sandbox when bubblewrap works here, and otherwise runs unsandboxed with a warning (it is
the learner's own code).

Instructor::

    python -m attribution_course.grade --batch SUBMISSIONS_DIR --csv grades.csv

grades every ``*.ipynb`` under SUBMISSIONS_DIR, each in its own bubblewrap sandbox
(:mod:`.sandbox`; refused without one unless ``--unsafe-no-sandbox``), writes the CSV
gradebook (student, chapter, exercise, verdict, points, max_points, detail, submission),
``grades-totals.csv`` (per student, per chapter) and one feedback file per submission.

How a notebook is graded. The learner's file is only ever read. Two copies run with
nbval, each in a fresh kernel in its own sandbox (:mod:`.notebooks`): the learner's
cells with the graded cells restored from ``exercises/`` and reduced to saving what the
learner's function returns, and, in a separate process, the solutions notebook saving
the expected values. The grader compares the two in its own process (:mod:`.verdicts`),
so nothing the learner's code does in its kernel can decide a verdict.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import secrets
import sys
import threading
import time
from pathlib import Path

from . import sandbox
from .hidden import SEED_ENV
from .audit import audit_notebook, reference_implementations
from .generation import EXERCISES_DIR, GRADED_TAG, METADATA_KEY, NOTEBOOK_STEMS, SOLUTIONS_DIR, NotebookFormatError, read_notebook
from .gradebook import (
    S_CRASHED, S_ERROR, S_GRADED, S_MALFORMED, S_TIMEOUT, S_UNKNOWN, NotebookResult, scorecard, write_gradebook,
)
from .notebooks import (
    identify, load_reference, prepare_learner_copy, prepare_reference_copy, restart_copy, writable_text,
)
from .requirement_probe import observe_outside
from .requirements import REQUIREMENTS
from .runner import run_nbval
from .verdicts import (
    DEAD_BEFORE, DIED_HERE, NOT_INTERRUPTIBLE, V_NOT_GRADED, V_PASSED, ExerciseResult, apply_requirements, decide,
    exception_summary, short, valid_reference,
)

DEFAULT_TIMEOUT = 300  # least wall-clock seconds per notebook run, unless given
WALL_SCALE = 4  # ... or this many times the reference run's wall-clock time, if more (it ran on the same machine)
DEFAULT_CELL_TIMEOUT = 60  # least CPU seconds per cell (wall clock: 10 times that); then the kernel is interrupted
CPU_SCALE = 5  # a learner's cell may use this many times the CPU time of the reference run's heaviest cell
REFERENCE_TIMEOUT = 900  # seconds for a reference run (trusted code; a slow machine must not fail it)
PROBE_CPU_SECONDS = 60  # the requirement probe's set-up (model, prompts), plus three calls' worth of cell limits
MAX_RESTARTS = 3  # fresh kernels after a cell killed or hung one, so that later exercises are still graded


class ReferenceRuns:
    """The expected values of each chapter, from one run of its solutions notebook
    (in a sandbox of its own), shared by every submission of a batch."""

    def __init__(self, solutions_dir: Path = SOLUTIONS_DIR, *, timeout: float = REFERENCE_TIMEOUT, sandboxed: bool = True):
        self.solutions_dir, self.timeout, self.sandboxed = solutions_dir, timeout, sandboxed
        # one draw of hidden inputs for the whole batch (hidden.py), shared with every learner run
        self.env = {SEED_ENV: str(secrets.randbelow(10**9))}
        self._done: dict[str, dict[str, dict] | Exception] = {}
        self._heaviest_cell: dict[str, float] = {}  # CPU seconds of each chapter's heaviest graded reference cell
        self._wall: dict[str, float] = {}  # wall-clock seconds of each chapter's reference run
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def expected(self, stem: str) -> dict[str, dict]:
        with self._guard:
            lock = self._locks.setdefault(stem, threading.Lock())
        with lock:
            if stem not in self._done:
                try:
                    self._done[stem] = self._run(stem)
                except Exception as err:  # noqa: BLE001 - every submission of this chapter reports it
                    self._done[stem] = err
            done = self._done[stem]
        if isinstance(done, Exception):
            raise done
        return done

    def _run(self, stem: str) -> dict[str, dict]:
        solution = read_notebook(self.solutions_dir / f"{stem}.ipynb")
        copy = prepare_reference_copy(solution)
        start = time.monotonic()
        outcome = run_nbval(copy, timeout=self.timeout, cell_timeout=self.timeout,
                            sandboxed=self.sandboxed, extra_env=self.env)
        records = {ex: r for ex, rec in outcome.records.items() if (r := valid_reference(rec)) is not None}
        if not records:
            raise RuntimeError(f"the reference run of {stem} recorded nothing: {short(outcome.output[-2000:])}")
        graded = [n for n, cell in enumerate(copy.cells) if GRADED_TAG in cell.metadata.get("tags", [])]
        self._heaviest_cell[stem] = max((outcome.cell_cpu_seconds[n] for n in graded if n < len(outcome.cell_cpu_seconds)),
                                        default=0.0)
        self._wall[stem] = time.monotonic() - start
        return records

    def cell_limit(self, stem: str, least: float) -> float:
        """CPU seconds a learner's cell of chapter ``stem`` may use: ``CPU_SCALE`` times the reference
        run's heaviest graded cell, and at least ``least`` (which also covers the setup cell). CPU time, not wall time: a loaded machine slows a
        correct solution down without making it use more CPU time."""
        self.expected(stem)
        return max(float(least), CPU_SCALE * self._heaviest_cell.get(stem, 0.0))

    def notebook_timeout(self, stem: str, given: float | None) -> float:
        """Wall-clock seconds for one run of a learner's notebook: ``given``, else ``WALL_SCALE`` times the
        reference run's (on this machine, under its present load) and at least ``DEFAULT_TIMEOUT``."""
        if given is not None:
            return float(given)
        self.expected(stem)
        return max(float(DEFAULT_TIMEOUT), WALL_SCALE * self._wall.get(stem, 0.0))


def grade_notebook(
    path: Path,
    *,
    references: ReferenceRuns | None = None,
    exercises_dir: Path = EXERCISES_DIR,
    timeout: float | None = None,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    sandboxed: bool = True,
    name: str | None = None,
    audit: bool = False,
    solutions_dir: Path = SOLUTIONS_DIR,
) -> NotebookResult:
    """Grade one notebook. ``path`` is only read, never written. ``audit``: also list calls
    of reference implementations and mentions of the solutions (:mod:`.audit`)."""
    start = time.monotonic()
    submission = name or str(path)
    try:
        learner = read_notebook(path)
    except NotebookFormatError as err:
        return _ungraded(submission, identify({}, path)[0], S_MALFORMED, str(err), exercises_dir, start)
    stem, identity_note = identify(learner, path)
    if stem is None:
        return NotebookResult(
            submission, None, S_UNKNOWN,
            f"{path}: cannot tell which exercise notebook this is (no '{METADATA_KEY}' metadata, no check cells "
            f"and no known name such as {NOTEBOOK_STEMS[1]} in the file name)", seconds=time.monotonic() - start,
        )
    try:
        reference = load_reference(stem, exercises_dir)
    except NotebookFormatError as err:
        return NotebookResult(submission, stem, S_ERROR, f"cannot read the exercises notebook ({err}); pass --exercises-dir")
    try:
        graded_nb, graded_cells, missing = prepare_learner_copy(learner, reference)
    except Exception as err:  # noqa: BLE001 - JSON that is valid but odd
        return _ungraded(submission, stem, S_MALFORMED, f"{path}: unexpected notebook structure ({err})", exercises_dir, start)

    references = references or ReferenceRuns(sandboxed=sandboxed)
    expected = references.expected(stem)  # first: the learner's cell limit scales with the reference run
    cell_limit = references.cell_limit(stem, cell_timeout)
    timeout = references.notebook_timeout(stem, timeout)
    run = functools.partial(run_nbval, timeout=timeout, cell_timeout=cell_limit, sandboxed=sandboxed,
                            extra_env=references.env)
    outcome, records, reports, run_notes = _run_with_restarts(run, graded_nb, graded_cells)
    results = [decide(r, expected.get(r.id), records.get(r.id), reports.get(r.id), cell_limit) for r in reference]
    # stated requirements, for exercises whose values are right, in a run with only the learner's definitions
    pending = {r.exercise: r.name for r in results if r.exercise in REQUIREMENTS and r.verdict == V_PASSED}
    if pending:
        apply_requirements(results, observe_outside(
            learner, read_notebook(exercises_dir / f"{stem}.ipynb"), pending, timeout=timeout,
            cpu_seconds=PROBE_CPU_SECONDS + 3 * cell_limit, sandboxed=sandboxed, extra_env=references.env))
    notes = [identity_note] if identity_note else []
    notes += [f"the graded cell of exercise {m} was missing; the reference check was appended at the end" for m in missing]
    for number, (status, message) in sorted(outcome.cells.items()):
        if number not in graded_cells and status in ("failure", "error") and DEAD_BEFORE not in message:
            notes.append(f"a code cell (not graded) raised {exception_summary(message)}")
    notes += run_notes
    status, detail = _notebook_status(outcome, timeout, cell_limit, results)
    result = NotebookResult(submission, stem, status, detail, results, notes, time.monotonic() - start)
    if audit:
        result.audit = audit_notebook(learner, reference, _implementations(stem, exercises_dir, solutions_dir))
    return result


def _run_with_restarts(run, nb, graded: dict[int, str]):
    """Run the learner copy; if a cell kills or hangs the kernel, run the rest again in a fresh kernel.

    Returns the first run's outcome (its notebook status), what every run saved ``{exercise: record}``,
    nbval's report of each exercise's graded cell ``{exercise: (status, message)}`` (from the run
    that graded it) and notes naming the restarts. The restarted copy re-runs the setup and the
    learner's definitions but neither the cell that stopped the kernel nor the exercises already
    graded (:func:`~.notebooks.restart_copy`); an exercise that depends on the lost one fails on its own.
    """
    first = outcome = run(nb)
    records = dict(outcome.records)
    reports = {exercise: outcome.cells[number] for number, exercise in graded.items() if number in outcome.cells}
    notes = []
    for _ in range(MAX_RESTARTS):
        stop, dropped = _stopping_cell(outcome, graded, records)
        pending = [ex for number, ex in sorted(graded.items()) if number > stop and ex not in records] if stop is not None else []
        if not pending:
            break
        nb, graded = restart_copy(nb, graded, stop, set(records), dropped)
        outcome = run(nb)
        for number, exercise in graded.items():
            if exercise in pending:
                if exercise in outcome.records:
                    records[exercise] = outcome.records[exercise]
                if number in outcome.cells:
                    reports[exercise] = outcome.cells[number]
        notes.append(f"the kernel was stopped in cell {stop + 1} of the graded copy; exercises {', '.join(pending)} "
                     "were run again in a fresh kernel (setup and your definitions re-run)")
    return first, records, reports, notes


def _stopping_cell(outcome, graded: dict[int, str], records: dict) -> tuple[int | None, set[int]]:
    """The cell number after which the kernel was dead or stopped (None: it never was), and the
    learner cells to leave out with it (a notebook timeout: those since the last graded cell)."""
    numbers = sorted(outcome.cells)
    for index, number in enumerate(numbers):
        message = outcome.cells[number][1]
        if DIED_HERE in message or NOT_INTERRUPTIBLE in message or "waiting for output" in message:
            return number, set()
        if DEAD_BEFORE in message:
            return (numbers[index - 1] if index else None), set()
    if outcome.timed_out:  # killed from outside: no report; the first graded cell without a result stopped it
        for number, exercise in sorted(graded.items()):
            if exercise not in records:
                before = max((n for n in graded if n < number), default=0)  # cell 0, the setup, always stays
                return number, set(range(before + 1, number))
    return None, set()


@functools.lru_cache(maxsize=None)
def _implementations(stem: str, exercises_dir: Path, solutions_dir: Path) -> frozenset[str]:
    reference = load_reference(stem, exercises_dir)
    return frozenset(reference_implementations(
        read_notebook(exercises_dir / f"{stem}.ipynb"), reference, read_notebook(solutions_dir / f"{stem}.ipynb")))


def _notebook_status(outcome, timeout: float, cell_timeout: float, results: list[ExerciseResult]) -> tuple[str, str]:
    messages = [m for _, m in outcome.cells.values()]
    if outcome.timed_out:
        for r in results:
            if r.verdict == V_NOT_GRADED:
                r.detail = "not reached before the notebook timed out"
        return S_TIMEOUT, f"the notebook did not finish within {timeout:g} s and was stopped"
    if any(NOT_INTERRUPTIBLE in m for m in messages):
        return S_TIMEOUT, f"a cell ran longer than {cell_timeout:g} s and ignored the interrupt; the kernel was stopped"
    if any(DIED_HERE in m or DEAD_BEFORE in m for m in messages):
        return S_CRASHED, "the kernel died while running the notebook"
    if not outcome.cells:
        return S_ERROR, "nbval did not run: " + short(outcome.output[-2000:])
    return S_GRADED, ""


def _ungraded(submission: str, stem: str | None, status: str, detail: str, exercises_dir: Path, start: float) -> NotebookResult:
    """A notebook that could not be run keeps every exercise of its chapter (0 of full points)."""
    exercises = []
    if stem is not None:
        try:
            exercises = [ExerciseResult(r.id, r.name, V_NOT_GRADED, 0, r.points, "the notebook could not be graded")
                         for r in load_reference(stem, exercises_dir)]
        except NotebookFormatError:
            pass
    return NotebookResult(submission, stem, status, detail, exercises, seconds=time.monotonic() - start)


def find_submissions(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and p.is_file())


def grade_batch(
    folder: Path,
    csv_path: Path,
    *,
    feedback_dir: Path | None = None,
    workers: int | None = None,
    timeout: float | None = None,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    exercises_dir: Path = EXERCISES_DIR,
    solutions_dir: Path = SOLUTIONS_DIR,
    sandboxed: bool = True,
    progress: bool = True,
    audit: bool = False,
    references: ReferenceRuns | None = None,
) -> list[NotebookResult]:
    """Grade every notebook under ``folder`` in parallel; write the CSV, its totals and feedback files."""
    if sandboxed:
        sandbox.check_available()
    submissions = find_submissions(folder)
    workers = workers or max(1, min(len(submissions), 2))
    references = references or ReferenceRuns(solutions_dir, sandboxed=sandboxed)
    results: dict[Path, NotebookResult] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(
                grade_safely, path, name=str(path.relative_to(folder)), references=references,
                exercises_dir=exercises_dir, timeout=timeout, cell_timeout=cell_timeout, sandboxed=sandboxed,
                audit=audit, solutions_dir=solutions_dir,
            ): path
            for path in submissions
        }
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if progress:
                print(f"{writable_text(result.submission)}: {result.status}, {result.points}/{result.max_points} points "
                      f"({result.seconds:.0f} s)", flush=True)
    ordered = [results[p] for p in submissions]
    write_gradebook(ordered, csv_path, feedback_dir or csv_path.parent / "feedback", audit=audit)
    return ordered


def grade_safely(path: Path, **kwargs) -> NotebookResult:
    """A bug or surprise in one submission must not stop the batch: every file gets a row."""
    try:
        return grade_notebook(path, **kwargs)
    except Exception as err:  # noqa: BLE001
        stem = identify({}, path)[0]
        exercises_dir = kwargs.get("exercises_dir", EXERCISES_DIR)
        return _ungraded(kwargs.get("name") or str(path), stem, S_ERROR, f"{type(err).__name__}: {err}", exercises_dir,
                         time.monotonic())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attribution_course.grade",
        description="Grade exercise notebooks with nbval in bubblewrap sandboxes (the notebooks are never modified).",
    )
    parser.add_argument("notebook", nargs="?", type=Path, help="one learner notebook to grade")
    parser.add_argument("--batch", type=Path, metavar="SUBMISSIONS_DIR", help="grade every notebook in this folder")
    parser.add_argument("--csv", type=Path, default=Path("grades.csv"), help="gradebook to write in batch mode")
    parser.add_argument("--feedback-dir", type=Path, help="per-submission feedback files (default: feedback/ next to the CSV)")
    parser.add_argument("--workers", type=int, help="notebooks graded at once (default: 2)")
    parser.add_argument("--timeout", type=float,
                        help=f"wall-clock seconds per run of a notebook (default: {WALL_SCALE} times the reference "
                             f"run's on this machine, at least {DEFAULT_TIMEOUT})")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT,
                        help=f"least CPU seconds per cell (the limit is {CPU_SCALE} times the reference run's heaviest "
                             "cell if that is more); a cell that waits is stopped after 10 times the limit in "
                             "wall-clock time (default %(default)s)")
    parser.add_argument("--exercises-dir", "--reference-dir", type=Path, default=EXERCISES_DIR,
                        help="generated exercises notebooks (default %(default)s)")
    parser.add_argument("--solutions-dir", type=Path, default=SOLUTIONS_DIR, help="solution notebooks (default %(default)s)")
    parser.add_argument("--audit", action="store_true",
                        help="also report calls of the package's reference implementations and uses of the published "
                             "solutions (batch: written to <csv>-audit.csv)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="run learner code without bubblewrap (never for other people's notebooks)")
    args = parser.parse_args(argv)
    if (args.notebook is None) == (args.batch is None):
        parser.error("give either one NOTEBOOK or --batch SUBMISSIONS_DIR")

    sandboxed = not args.unsafe_no_sandbox
    if sandboxed:
        try:
            sandbox.check_available()
        except sandbox.SandboxUnavailable as err:
            if args.batch is not None:
                print(f"error: {err}\nBatch grading runs other people's code and needs the sandbox; "
                      "--unsafe-no-sandbox overrides this.", file=sys.stderr)
                return 2
            print(f"warning: {err}; grading your notebook without a sandbox", file=sys.stderr)
            sandboxed = False

    if args.batch is not None:
        if not args.batch.is_dir():
            print(f"error: submissions folder {args.batch} does not exist or is not a folder", file=sys.stderr)
            return 2
        if not find_submissions(args.batch):
            print(f"error: no .ipynb files under {args.batch}", file=sys.stderr)
            return 2
        results = grade_batch(
            args.batch, args.csv, feedback_dir=args.feedback_dir, workers=args.workers, timeout=args.timeout,
            cell_timeout=args.cell_timeout, exercises_dir=args.exercises_dir, solutions_dir=args.solutions_dir,
            sandboxed=sandboxed, audit=args.audit,
        )
        complete = sum(r.all_passed for r in results)
        print(f"graded {len(results)} submission(s), {complete} fully correct; wrote {args.csv}")
        return 0

    if not args.notebook.is_file():
        print(f"error: {args.notebook} does not exist or is not a file", file=sys.stderr)
        return 2
    references = ReferenceRuns(args.solutions_dir, sandboxed=sandboxed)
    result = grade_safely(args.notebook, references=references, exercises_dir=args.exercises_dir, timeout=args.timeout,
                          cell_timeout=args.cell_timeout, sandboxed=sandboxed, audit=args.audit,
                          solutions_dir=args.solutions_dir)
    print(scorecard(result))
    for finding in result.audit:
        print(f"  audit: {finding}")
    if result.status in (S_MALFORMED, S_UNKNOWN):
        return 2
    return 0 if result.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
