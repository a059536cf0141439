"""The errors a user can act on, and how a stage reports them: one line naming the key or file
and the fix, no traceback (set STUDY_TRACEBACK=1 to see one)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable


class StudyError(ValueError):
    """A problem in the params, the data or a model folder, with what to do about it."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a StudyError ends it with one line on stderr and exit status 1. Then
    the process ends without the collector's last sweeps over every object the libraries made
    (gc.freeze): with PEFT loaded they took 1.5 s of a stage's exit on a 2-core CPU, and by then
    the stage has written and closed its outputs. Exit functions and flushes still run."""
    try:
        main()
    except StudyError as e:
        if os.environ.get("STUDY_TRACEBACK"):
            raise
        stage = os.environ.get("DVC_STAGE") or os.path.basename(sys.argv[0]).removesuffix(".py")
        print(f"{stage}: error: {e}\n(set STUDY_TRACEBACK=1 for the traceback){back(stage)}", file=sys.stderr)
        sys.exit(1)
    finally:
        gc.freeze()


def back(stage: str) -> str:
    """Under DVC, how to get back the outputs DVC removed before running the failed stage (it
    removes a stage's outputs first; check_params has none, and fails before any other stage runs)."""
    if not os.environ.get("DVC_STAGE") or stage == "check_params":
        return ""
    return ("\n(DVC removed this stage's previous outputs before running it: `dvc checkout` brings back the cached "
            "ones and `git checkout -- metrics` the metrics, or undo the change and `dvc repro` restores them from "
            "the run-cache)")
