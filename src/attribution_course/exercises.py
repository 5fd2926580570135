"""``python -m attribution_course.exercises generate | check | sync-book``.

The generator lives in :mod:`attribution_course.grading.generation`; this module keeps
the command (and ``from attribution_course.exercises import NOTEBOOK_STEMS``) working.
"""

import sys

from .grading.generation import NOTEBOOK_STEMS, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
