"""What each stage of the demo costs before it does its work: its import time, beside its whole
time, for this checkout and an older commit, side by side in one sitting.

    python -m scripts.startup --before REF [--dir DIR] [--repeats N]     (make bench-startup)

Builds the demo twice (`python -m scripts.sandbox DIR --repro`, timed: the demo's time), once from
this checkout and once from REF (a temporary `git worktree`, removed after), then runs every
stage's command as `dvc repro` would (taken from `dvc repro --dry -f`), each sandbox in turn, stage
by stage, N times, under PYTHONPROFILEIMPORTTIME: a stage's imports are the summed cumulative time
of its processes' top-level imports (the launcher's too), its time the command's wall time. The
median of the N runs goes into docs/performance.md (block `startup`), stamped with the machine and
date, with whether the two demos' results are identical (model hashes, metrics; timings aside).
This checkout's stages run a third way too: started warm, from a server (ftstudy/warm.py) that has
imported torch and transformers already, as `make demo` starts them. Outputs are rewritten in place
in the sandboxes, as a forced repro would.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftstudy import warm
from scripts.docs_tables import ROOT, stamp, write_block
from scripts.sandbox import ENV, outcome, warm_server

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")


def build(code: Path, dest: Path) -> float:
    """The demo sandbox from the checkout at `code`, repro'd; returns the seconds it took."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scripts.sandbox", str(dest), "--repro"], cwd=code, check=True,
                   env=os.environ | ENV | {"PYTHONPATH": str(code)}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def stage_commands(sandbox: Path) -> dict[str, str]:
    """Each stage's command, as `dvc repro` runs it (vars and foreach resolved), in its order."""
    out = subprocess.run(["dvc", "repro", "--dry", "-f"], cwd=sandbox, capture_output=True, text=True, check=True,
                         env=os.environ | ENV).stdout
    return dict(re.findall(r"Running stage '([^']+)':\n> (.+)", out))


def import_seconds(stderr: str) -> float:
    """The summed cumulative time of the top-level imports in PYTHONPROFILEIMPORTTIME's report."""
    return sum(int(m.group(1)) for line in stderr.splitlines()
               if (m := IMPORT_LINE.match(line)) and not m.group(2).startswith(" ")) / 1e6


def run_stage(sandbox: Path, command: str, started_warm: bool = False) -> tuple[float, float]:
    """(wall seconds, import seconds) of one stage command, run in its sandbox: cold, its imports
    profiled, or `started_warm` (the imports then are the server's, and not counted)."""
    env = os.environ | ENV
    if not started_warm:
        env = {k: v for k, v in env.items() if k != warm.ADDRESS_VAR} | {"PYTHONPROFILEIMPORTTIME": "1"}
    started = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=sandbox, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))[-2000:]
        raise SystemExit(f"startup: {command!r} failed in {sandbox}:\n{tail}")
    return wall, import_seconds(proc.stderr)


def same_results(before: Path, after: Path) -> str:
    """Whether the two demos produced the same results: every model and data hash in dvc.lock and
    every metric and fact but timings and memory (scripts.sandbox.outcome), as a sentence."""
    a, b = outcome(before), outcome(after)
    differ = sorted(k for part in ("hashes", "metrics") for k in a[part].keys() | b[part].keys()
                    if a[part].get(k) != b[part].get(k))
    if not differ:
        return (f"Both demos' results are identical: {len(a['hashes'])} output hashes and {len(a['metrics'])} metrics "
                "and facts (timings and memory left out).")
    return f"The demos' results differ in {len(differ)} places: {', '.join(differ[:8])}" + (" ..." if len(differ) > 8 else ".")


def table(stages: list[str], runs: dict, builds: dict, ref: str) -> str:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows = ["| stage | before: imports | before: whole | after, cold: imports | after, cold: whole | after, warm: whole |",
            "|---|---:|---:|---:|---:|---:|"]
    columns = [("before", 1), ("before", 0), ("after", 1), ("after", 0), ("warm", 0)]
    totals = [0.0] * len(columns)
    for stage in stages:
        cells = []
        for i, (name, part) in enumerate(columns):
            if stage in runs[name]:
                value = med([r[part] for r in runs[name][stage]])
                totals[i] += value
                cells.append(f"{value:.1f} s")
            else:
                cells.append("—")
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    rows.append("| **all stages** | " + " | ".join(f"**{v:.1f} s**" for v in totals) + " |")
    return ("\n".join(rows) + f"\n\nBefore: commit {ref}; after: this checkout, each stage started cold (as `dvc repro` "
            "alone starts it) and warm (as `make demo` does). The demo (`python -m scripts.sandbox DIR --repro`: the "
            f"sandbox, then `dvc repro` of every stage) took {builds['before']:.0f} s before and {builds['after']:.0f} s "
            "after, built one after the other in this sitting.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the older commit (a ref or hash) to measure beside this checkout")
    ap.add_argument("--dir", type=Path, default=None, help="where the two sandboxes go (default: a temp folder)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each stage per sandbox (the median is kept)")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave docs/performance.md alone")
    args = ap.parse_args()
    ref = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ftstudy-startup-") as tmp:
        base = (args.dir or Path(tmp)).resolve()
        old = Path(tmp) / "before-code"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), ref], cwd=ROOT, check=True)
        try:
            sandboxes = {"before": base / "before", "after": base / "after"}
            builds = {}
            for name, code in (("before", old), ("after", ROOT)):
                print(f"startup: building the demo from {name} ({ref if name == 'before' else 'this checkout'})",
                      file=sys.stderr)
                builds[name] = build(code, sandboxes[name])
            results = same_results(sandboxes["before"], sandboxes["after"])
            print(f"startup: {results}", file=sys.stderr)
            commands = {name: stage_commands(box) for name, box in sandboxes.items()}
            stages = list(commands["after"])
            runs: dict[str, dict[str, list]] = {"before": {}, "after": {}, "warm": {}}
            with warm_server(os.environ | ENV):
                # The server listens before it preloads: one unmeasured warm stage waits that out.
                run_stage(sandboxes["after"], commands["after"][stages[0]], started_warm=True)
                for i in range(args.repeats):
                    for stage in stages:
                        for name, code in (("before", "before"), ("after", "after"), ("warm", "after")):
                            if stage in commands[code]:
                                wall, imports = run_stage(sandboxes[code], commands[code][stage],
                                                          started_warm=name == "warm")
                                runs[name].setdefault(stage, []).append((wall, imports))
                                print(f"startup: {i + 1}/{args.repeats} {stage} {name}: {imports:.1f} s of imports, "
                                      f"{wall:.1f} s in all", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    text = table(stages, runs, builds, ref) + " " + results
    print(text)
    if not args.no_write:
        command = f"python -m scripts.startup --before {args.before} --repeats {args.repeats}"
        print(f"startup: wrote {write_block('performance.md', 'startup', stamp(command) + chr(10) * 2 + text)}")


if __name__ == "__main__":
    main()
