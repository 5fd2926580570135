"""How long grading a class takes: generate N learners x 7 notebooks and grade them as one batch.

    python -m attribution_course.grading.scale --learners 4 --out scale-output
    make grade-scale LEARNERS=4

Learner ``i`` submits all seven notebooks, of one kind (``i`` modulo 5): every exercise
correct; the first half solved and the rest not attempted; all correct but the first exercise
(``return None``); a cheat (``compare`` replaced, every function returns 0); the untouched
exercises notebooks. The submissions go to ``OUT/submissions``, the gradebook to
``OUT/grades.csv`` and the measurement to ``OUT/scale.json`` and ``OUT/scale.md``: wall-clock
time of the reference runs (once per chapter, a fixed cost) and of the learners' notebooks,
throughput, the machine's load average before and after (other work on the machine slows
grading down and is reported, not hidden), and the time extrapolated to 200 learners x 7
notebooks on this machine (fixed cost + 1400 x the measured time per notebook).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import nbformat

from . import generation as ex
from .gradebook import S_GRADED
from .grader import DEFAULT_CELL_TIMEOUT, ReferenceRuns, grade_batch
from .synthetic import exercise_cells, filled, learner_notebook

KINDS = ("correct", "half", "one_wrong", "cheat", "untouched")
CLASS_SIZE = 200  # the class the issue asks about


def submission(kind: str, stem: str) -> nbformat.NotebookNode:
    ids = list(exercise_cells(stem))
    if kind == "correct":
        return filled(stem)
    if kind == "half":
        return learner_notebook(stem, {e: None for e in ids[: (len(ids) + 1) // 2]})
    if kind == "one_wrong":
        return learner_notebook(stem, {e: (["return None"] if e == ids[0] else None) for e in ids})
    if kind == "cheat":
        nb = learner_notebook(stem, {e: ["return 0"] for e in ids})
        nb.cells.insert(1, nbformat.v4.new_code_cell(
            "import attribution_course.grading.compare as c, attribution_course.grading.checks as k\n"
            "c.compare = k.compare = lambda *a, **kw: (True, '')"))
        return nb
    return ex.read_notebook(ex.exercise_path(stem))


def write_class(folder: Path, learners: int) -> int:
    count = 0
    for i in range(learners):
        kind = KINDS[i % len(KINDS)]
        for stem in ex.NOTEBOOK_STEMS:
            path = folder / f"learner{i:03d}-{kind}" / f"{stem}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(submission(kind, stem), str(path))
            count += 1
    return count


def measure(learners: int, out: Path, workers: int = 2) -> dict:
    submissions = out / "submissions"
    notebooks = write_class(submissions, learners)
    load_before = os.getloadavg()
    references = ReferenceRuns()
    start = time.monotonic()
    for stem in ex.NOTEBOOK_STEMS:  # the fixed cost, once per batch, measured apart
        references.expected(stem)
    reference_seconds = time.monotonic() - start
    start = time.monotonic()
    results = grade_batch(submissions, out / "grades.csv", workers=workers, references=references)
    batch_seconds = time.monotonic() - start
    per_notebook = batch_seconds / notebooks
    report = {
        "learners": learners, "notebooks": notebooks, "workers": workers, "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "reference_seconds": round(reference_seconds, 1), "batch_seconds": round(batch_seconds, 1),
        "seconds_per_notebook": round(per_notebook, 2), "notebooks_per_minute": round(60 / per_notebook, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "graded_normally": sum(r.status == S_GRADED for r in results),
        "by_kind": {kind: sum(r.points for r in results if f"-{kind}/" in r.submission.replace(os.sep, "/"))
                    for kind in KINDS},
        "extrapolated_class_hours": round((reference_seconds + CLASS_SIZE * 7 * per_notebook) / 3600, 2),
        # what the learners' runs were allowed: CPU seconds per cell, wall-clock seconds per notebook run
        "cell_limits": {stem: references.cell_limit(stem, DEFAULT_CELL_TIMEOUT) for stem in ex.NOTEBOOK_STEMS},
        "notebook_timeouts": {stem: round(references.notebook_timeout(stem, None)) for stem in ex.NOTEBOOK_STEMS},
    }
    (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    return (
        f"| learners x notebooks | workers / CPUs | reference runs | learners' notebooks | per notebook | "
        f"notebooks per minute | load average before -> after (1, 5, 15 min) | 200 x 7 extrapolated |\n"
        f"|---|---|---|---|---|---|---|---|\n"
        f"| {r['learners']} x 7 = {r['notebooks']} | {r['workers']} / {r['cpus']} | {r['reference_seconds']:.0f} s | "
        f"{r['batch_seconds']:.0f} s | {r['seconds_per_notebook']:.1f} s | {r['notebooks_per_minute']:.2f} | "
        f"{', '.join(map(str, r['load_average_before']))} -> {', '.join(map(str, r['load_average_after']))} | "
        f"{r['extrapolated_class_hours']:.1f} h |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attribution_course.grading.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--learners", type=int, default=5, help="learners, 7 notebooks each (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("scale-output"), help="output folder (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="notebooks graded at once (default %(default)s)")
    args = parser.parse_args(argv)
    if args.learners < 1:
        parser.error("--learners must be at least 1")
    report = measure(args.learners, args.out, args.workers)
    print(markdown(report), end="")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
