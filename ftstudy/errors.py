"""The errors a user can act on, and how a stage reports them: one line naming the key or file
and the fix, no traceback (set STUDY_TRACEBACK=1 to see one)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class StudyError(ValueError):
    """A problem in the params, the data or a model folder, with what to do about it."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a StudyError ends it with one line on stderr and exit status 1."""
    try:
        main()
    except StudyError as e:
        if os.environ.get("STUDY_TRACEBACK"):
            raise
        stage = os.path.basename(sys.argv[0]).removesuffix(".py")
        print(f"{stage}: error: {e}\n(set STUDY_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
