"""The test suite's time, this checkout beside an older commit, one after the other in one sitting.

    python -m scripts.suite_bench --before REF [--tier quick|whole]     (make bench-suite)

Runs the tier (quick: `pytest -m "not slow"`; whole: `pytest`) in a temporary `git worktree` of REF
(removed after) with that commit's own pytest settings, then here, each as its README says, and
writes both wall times and test counts into docs/performance.md (block `suite-<tier>`), stamped
with the machine and date. REF's check that the installed packages are its lock is left out: they
are this checkout's. A failure here is reported and nothing is written; REF's failures (a test of
it that fails on this machine) stand in its row's counts, and its time still counts.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.docs_tables import ROOT, stamp, write_block

TIERS = {"quick": ["-m", "not slow"], "whole": []}


# The older commit's own check that the installed packages are its lock: they are this checkout's.
OWN_LOCK_CHECK = "tests/test_lock.py::test_the_installed_packages_are_the_locked_ones"


def run_tier(code: Path, tier: str, *extra: str, must_pass: bool = True) -> tuple[float, str]:
    """(wall seconds, pytest's summary line) of the tier run in the checkout at `code`; a failure
    stops the bench unless not `must_pass` (the older commit: a reference whose time counts, its
    failures shown in its summary, as a test of it that fails on this machine would be)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIERS[tier], *extra],
                          cwd=code, capture_output=True, text=True)
    wall = time.perf_counter() - started
    summary = next((line.strip("= ") for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ passed", line)),
                   "no summary")
    if proc.returncode != 0 and (must_pass or "passed" not in summary):
        raise SystemExit(f"suite_bench: the {tier} tier failed in {code} ({summary}):\n{proc.stdout[-3000:]}")
    return wall, re.sub(r" in [\d.]+s.*$", "", summary)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{round(seconds % 60):02d}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the older commit (a ref or hash) to time beside this checkout")
    ap.add_argument("--tier", choices=list(TIERS), default="quick")
    args = ap.parse_args()
    ref = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ftstudy-suite-") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), ref], cwd=ROOT, check=True)
        try:
            print(f"suite_bench: the {args.tier} tier at {ref}", file=sys.stderr)
            before = run_tier(old, args.tier, "--deselect", OWN_LOCK_CHECK, must_pass=False)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    print(f"suite_bench: the {args.tier} tier here", file=sys.stderr)
    after = run_tier(ROOT, args.tier)
    text = ("| | commit | tests | time |\n|---|---|---|---:|\n"
            f"| before | {ref} | {before[1]} | {minutes(before[0])} |\n"
            f"| after | this checkout | {after[1]} | {minutes(after[0])} |\n\n"
            f"After / before: {after[0] / before[0]:.2f}.")
    print(text)
    command = f"python -m scripts.suite_bench --before {args.before} --tier {args.tier}"
    print(f"suite_bench: wrote {write_block('performance.md', f'suite-{args.tier}', stamp(command) + chr(10) * 2 + text)}")


if __name__ == "__main__":
    main()
