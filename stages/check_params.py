"""Stage check_params: the whole params.yaml -> nothing; fails naming every problem in it.

Every other stage reads only its own params keys, so a new misspelled section (`trian:`) would
change no stage and pass silently; this stage depends on the whole file, so any edit reruns it.
It writes no output, and nothing depends on it: a bad file stops `dvc repro` before anything
changes.
"""

from __future__ import annotations

from ftstudy.config import PARAMS_FILE, load_params
from ftstudy.errors import run_stage


def main() -> None:
    load_params()
    print(f"check_params: {PARAMS_FILE} is valid")


if __name__ == "__main__":
    run_stage(main)
