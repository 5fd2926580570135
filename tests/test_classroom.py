"""GitHub Classroom autograding: the shipped workflow is the generated one, passes actionlint, and its
points are the scorecard's; the per-exercise verdict command follows the gradebook."""

from __future__ import annotations

import subprocess
import sys

import yaml

from attribution_course.grading import classroom, gradebook, notebooks, verdicts
from attribution_course.grading import generation as ex
from test_publishing import _actionlint


def test_shipped_workflow_is_the_generated_one_and_passes_actionlint():
    assert classroom.WORKFLOW_PATH.read_text() == classroom.workflow_text(), (
        "classroom/.github/workflows/classroom.yml is stale: "
        "python -m attribution_course.grading.classroom workflow > classroom/.github/workflows/classroom.yml")
    result = _actionlint(classroom.WORKFLOW_PATH)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_a_broken_classroom_workflow(tmp_path):
    broken = tmp_path / "classroom.yml"
    broken.write_text(classroom.workflow_text().replace("steps.ex-2-1.outputs.result", "step.ex-2-1.outputs.result"))
    assert _actionlint(broken).returncode == 1


def test_points_map_to_the_scorecard():
    workflow = yaml.safe_load(classroom.WORKFLOW_PATH.read_text())
    steps = workflow["jobs"]["run-autograding-tests"]["steps"]
    graders = [s for s in steps if s.get("uses", "").startswith("classroom-resources/autograding-command-grader")]
    exercises = [r for stem in ex.NOTEBOOK_STEMS for r in notebooks.load_reference(stem, ex.EXERCISES_DIR)]
    assert [(s["with"]["command"].split()[-1], s["with"]["max-score"]) for s in graders] == [(r.id, r.points) for r in exercises]
    reporter = steps[-1]
    assert reporter["with"]["runners"].split(",") == [s["id"] for s in graders]
    assert set(reporter["env"]) == {f"{s['id'].upper()}_RESULTS" for s in graders}


def test_verdict_command_passes_exactly_the_passed_exercises(tmp_path):
    results = [verdicts.ExerciseResult("2.1", "logit_diff_per_prompt", verdicts.V_PASSED, 1, 1),
               verdicts.ExerciseResult("2.2", "top1_accuracy", verdicts.V_WRONG, 0, 1, "on hidden input 1 of 1: off")]
    notebook = gradebook.NotebookResult("learner/02_task_and_metric.ipynb", "02_task_and_metric", gradebook.S_GRADED,
                                        exercises=results)
    csv_path = tmp_path / "grades.csv"
    gradebook.write_gradebook([notebook], csv_path, tmp_path / "feedback")

    def verdict(*args):
        return subprocess.run([sys.executable, "-m", "attribution_course.grading.classroom", "verdict", *map(str, args)],
                              capture_output=True, text=True)

    passed, wrong, absent, no_csv = verdict(csv_path, "2.1"), verdict(csv_path, "2.2"), verdict(csv_path, "3.1"), \
        verdict(tmp_path / "none.csv", "2.1")
    assert passed.returncode == 0 and "passed" in passed.stdout
    assert wrong.returncode == 1 and "hidden input" in wrong.stdout
    assert absent.returncode == 1 and "no row" in absent.stdout
    assert no_csv.returncode == 1 and "grading step failed" in no_csv.stdout
