"""Grading of the exercise notebooks, in its own subpackage.

``generation``
    solutions/ -> exercises/ and the book pages (``python -m attribution_course.exercises``).
``checks``
    the learner's ``check()`` and the recorders the grader puts in its copies.
``compare``
    comparison of a result with the reference, with explanations of wrong answers.
``hidden``
    the inputs every exercise is also run on, drawn at grading time.
``requirements``
    stated requirements besides the return value (5.1 no graph kept, 5.2 gradients cleared).
``notebooks``
    which course notebook a file is, and the copies the grader runs (learner and reference).
``sandbox``
    the bubblewrap sandbox each run happens in.
``runner``
    nbval in the sandbox; what it left behind, read back safely.
``verdicts``
    one exercise's verdict, decided in the grader's process.
``gradebook``
    scorecards, the CSV gradebook and its totals.
``grader``
    grading one notebook or a folder; the command ``python -m attribution_course.grade``.
``classroom``
    the GitHub Classroom workflow and its per-exercise verdicts.
``synthetic``, ``scale``
    submissions built from the course's notebooks; the class-size measurement.
"""
