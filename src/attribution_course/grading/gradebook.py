"""Scorecards, the CSV gradebook and its totals (per student, per chapter)."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .notebooks import writable_text
from .verdicts import V_PASSED, ExerciseResult

# status of a whole notebook
S_GRADED, S_MALFORMED, S_UNKNOWN, S_TIMEOUT, S_CRASHED, S_ERROR = (
    "graded", "malformed", "unknown notebook", "timeout", "kernel crashed", "grader error",
)

CSV_COLUMNS = ("student", "chapter", "exercise", "verdict", "points", "max_points", "detail", "submission")
TOTALS_COLUMNS = ("student", "chapter", "points", "max_points")
AUDIT_COLUMNS = ("student", "chapter", "submission", "finding")
UNKNOWN_CHAPTER = "(unknown)"


@dataclass
class NotebookResult:
    submission: str  # path relative to the batch folder (or as given)
    notebook: str | None  # the course notebook (chapter) it was graded as
    status: str
    detail: str = ""
    exercises: list[ExerciseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    audit: list[str] = field(default_factory=list)  # for the instructor only (--audit)

    @property
    def all_passed(self) -> bool:
        return self.status == S_GRADED and bool(self.exercises) and all(e.verdict == V_PASSED for e in self.exercises)

    @property
    def points(self) -> int:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> int:
        return sum(e.max_points for e in self.exercises)

    @property
    def student(self) -> str:
        """The submission's first folder (``alice/02_task_and_metric.ipynb``), else its file name."""
        parts = Path(self.submission).parts
        return parts[0] if len(parts) > 1 else Path(self.submission).stem


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
        lines.append(f"Score: {result.points}/{result.max_points} points; {passed} of {len(result.exercises)} exercises passed.")
    return writable_text("\n".join(lines))


def csv_rows(result: NotebookResult) -> list[dict]:
    """One row per exercise; a notebook that was not graded normally also gets a '(notebook)' row."""
    base = dict(student=result.student, chapter=result.notebook or UNKNOWN_CHAPTER, submission=result.submission)
    rows = []
    if result.status != S_GRADED:
        rows.append(dict(base, exercise="(notebook)", verdict=result.status, points=0, max_points=0, detail=result.detail))
    for e in result.exercises:
        rows.append(dict(base, exercise=e.exercise, verdict=e.verdict, points=e.points, max_points=e.max_points, detail=e.detail))
    return [{k: writable_text(str(v)) for k, v in row.items()} for row in rows]


def totals(results: list[NotebookResult]) -> list[dict]:
    """Points per (student, chapter), per student (chapter '(all)') and per chapter (student '(all)')."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        chapter = r.notebook or UNKNOWN_CHAPTER
        for key in ((r.student, chapter), (r.student, "(all)"), ("(all)", chapter)):
            sums[key][0] += r.points
            sums[key][1] += r.max_points
    return [dict(student=writable_text(s), chapter=c, points=p, max_points=m) for (s, c), (p, m) in sorted(sums.items())]


def totals_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + "-totals.csv")


def audit_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + "-audit.csv")


def write_gradebook(results: list[NotebookResult], csv_path: Path, feedback_dir: Path, *, audit: bool = False) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerows(csv_rows(result))
    with open(totals_path(csv_path), "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=TOTALS_COLUMNS)
        writer.writeheader()
        writer.writerows(totals(results))
    if audit:
        with open(audit_path(csv_path), "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=AUDIT_COLUMNS)
            writer.writeheader()
            writer.writerows(
                {k: writable_text(str(v)) for k, v in dict(student=r.student, chapter=r.notebook or UNKNOWN_CHAPTER,
                                                           submission=r.submission, finding=finding).items()}
                for r in results for finding in r.audit
            )
    feedback_dir.mkdir(parents=True, exist_ok=True)
    for result in results:
        name = writable_text(result.submission).replace(os.sep, "__").removesuffix(".ipynb") + ".txt"
        (feedback_dir / name).write_text(scorecard(result) + "\n", encoding="utf-8")
