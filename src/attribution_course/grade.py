"""``python -m attribution_course.grade``: the grader's command (see
:mod:`attribution_course.grading.grader`)."""

import sys

from .grading.grader import main

if __name__ == "__main__":
    sys.exit(main())
