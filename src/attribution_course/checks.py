"""``from attribution_course.checks import check``, as the exercise notebooks write it.

The checks live in :mod:`attribution_course.grading.checks`; this module only keeps the
import path the notebooks use.
"""

from .grading.checks import NOT_ATTEMPTED, PASSED, WRONG, Verdict, check  # noqa: F401
from .grading.compare import compare  # noqa: F401
