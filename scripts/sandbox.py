"""Make a self-contained copy of the project, its own git and DVC repo, pointed at the tiny assets.

    python -m scripts.sandbox DIR [--repro [--cold]] [--shipped] [-S key=value ...]

Copies the pipeline (dvc.yaml, params.yaml, stages/, ftstudy/, assets/, tasks/) to DIR, applies
assets/demo-params.yaml and any -S overrides to DIR/params.yaml (comments kept), then runs
git init, dvc init and a first commit, so `dvc repro`, `dvc exp run -S ...`, `dvc metrics diff`
and `dvc exp show` work there. The project's own params, lock file and outputs are never touched.
DIR is rebuilt from scratch if it is an earlier sandbox; any other existing folder is refused.
With --shipped, params.yaml keeps the shipped settings (the demo's tiny-model rates would train a
real model at many times its rate) and only the -S overrides apply: a sandbox for one's own model.
With --repro, the stages start warm, from a server that imports torch and transformers while the
sandbox is built (ftstudy/warm.py); --cold starts each of them as `dvc repro` alone does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ftstudy import warm
from ftstudy.config import flatten, override_file
from ftstudy.synthetic import demo_overrides

ROOT = Path(__file__).resolve().parent.parent
COPY = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "stages", "ftstudy", "assets", "tasks")
MARKER = ".sandbox"
# Belt and braces for the sandbox's own commands: its params point at local folders only, so
# nothing reaches for the Hub anyway. CPU threads are chosen by the stages themselves
# (ftstudy.train.launching), so a command typed in the sandbox behaves as make demo does.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}


class DvcError(RuntimeError):
    """A dvc command failed; the message holds its output."""


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, env=os.environ | ENV)


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `repo`, its output captured; raises DvcError when it fails and `check` is on."""
    proc = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=os.environ | ENV)
    if check and proc.returncode != 0:
        raise DvcError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def refuse_uncommitted(repo: Path, who: str, why: str) -> None:
    """Stop with one line when `repo`'s tracked files differ from its last commit: `who` is the
    command, `why` what committed work it relies on. Untracked files (the study's own study.md and
    study.json) do not count."""
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{who}: git status failed in {repo}: {(proc.stderr.strip() or '?').splitlines()[-1]}")
    if proc.stdout.strip():
        raise SystemExit(f"{who}: the workspace has uncommitted changes, and {why}; commit them (or stash them) "
                         "and run again")


def queue_tasks(repo: Path) -> dict[str, list[str]]:
    """`dvc queue status`'s tasks: task id (its stash commit's first 7 hex digits) -> the rest of its
    row's words, Name first (for an unnamed task, Created's first word stands there) and Status last."""
    rows = {}
    for line in dvc(repo, "queue", "status").stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and re.fullmatch(r"[0-9a-f]{7}", words[0]):
            rows[words[0]] = words[1:]
    return rows


def start_queue(repo: Path) -> None:
    """`dvc queue start` one experiment at a time. Its output goes to a file, not through dvc()'s pipes:
    the worker it spawns inherits them, which would hold this process until the worker leaves (within
    10 s of the queue's emptying)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                              text=True, env=os.environ | ENV)
        if proc.returncode != 0:
            out.seek(0)
            raise DvcError(f"dvc queue start -j 1 failed ({proc.returncode}):\n{out.read()}")


# A worker that finds the queue empty leaves (it looks every 10 s); one of an earlier run may do so
# just as new tasks arrive, after `dvc queue start` saw it and started none. Tasks of ours queued with
# nothing running for this long: start a worker again (a no-op when one is there).
STALLED_S = 30.0


def run_queue(repo: Path, experiments: dict[str, list[str]], poll_s: float = 2.0) -> dict[str, str]:
    """Queue `experiments` (name -> `dvc exp run` arguments), `dvc queue start` one at a time, and wait
    until each of them is done; raises DvcError naming those that failed. Returns name -> status.

    Only these tasks count: the queue also keeps every earlier failure until `dvc queue remove
    --failed`, of other experiments or of these names (a study's names repeat from run to run), and
    may hold another's. They are told apart by task id: the tasks that queueing added."""
    before = set(queue_tasks(repo))
    for name, args in experiments.items():
        dvc(repo, "exp", "run", "--queue", "-n", name, *args)
    rows = queue_tasks(repo)
    ours = {task: row[0] for task, row in rows.items() if task not in before and row[0] in experiments}
    if lost := set(experiments) - set(ours.values()):
        raise DvcError(f"queued {', '.join(sorted(lost))}, which `dvc queue status` does not show:\n"
                       f"{dvc(repo, 'queue', 'status').stdout}")
    start_queue(repo)
    moving = time.monotonic()  # when a task last ran (or a worker was started)
    while {"Queued", "Running"} & set(mine := [rows.get(task, [""])[-1] for task in ours]):
        if any(row[-1] == "Running" for row in rows.values()):
            moving = time.monotonic()
        elif "Queued" in mine and time.monotonic() - moving > STALLED_S:
            start_queue(repo)
            moving = time.monotonic()
        time.sleep(poll_s)
        rows = queue_tasks(repo)
    status = {name: rows.get(task, ["gone from the queue"])[-1] for task, name in ours.items()}
    if failed := [f"{name} (dvc queue logs {task})" for task, name in ours.items() if status[name] == "Failed"]:
        raise DvcError(f"{len(failed)} of {len(ours)} experiment(s) failed, `dvc queue logs <task>` says why: "
                       + ", ".join(failed))
    return status


@contextlib.contextmanager
def warm_server(env: dict, ready_s: float = 120.0, export: bool = True):
    """A warm server (ftstudy/warm.py) started with `env` on a fresh socket, for the duration:
    with `export`, FTSTUDY_WARM names it in this process's environment, so the stages' processes
    started meanwhile with os.environ ask it (without, whoever starts them names it). Yields the
    address, or None (and stages start cold) when it is not up within `ready_s`; stopped by its
    handle. Its log (a line a request) is `log` beside the socket."""
    folder = Path(tempfile.mkdtemp(prefix="ftstudy-warm-"))
    address = str(folder / "socket")
    with open(folder / "log", "w") as log:
        # `python` as dvc.yaml's commands name it, through the same PATH (and any shim's settings).
        proc = subprocess.Popen(["python", "-m", "ftstudy.warm", "serve", "--socket", address], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    earlier = os.environ.get(warm.ADDRESS_VAR)
    try:
        deadline = time.monotonic() + ready_s
        while not os.path.exists(address) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        up = os.path.exists(address)
        if up and export:
            os.environ[warm.ADDRESS_VAR] = address
        yield address if up else None
    finally:
        if earlier is None:
            os.environ.pop(warm.ADDRESS_VAR, None)
        else:
            os.environ[warm.ADDRESS_VAR] = earlier
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def make_sandbox(dest: Path, overrides: dict | None = None, demo: bool = True) -> Path:
    """The sandbox at `dest`: the demo's params (assets/demo-params.yaml) and `overrides` applied to
    params.yaml; without `demo`, params.yaml as shipped (GPT-2 on WikiText-2 from the Hub) and the
    overrides alone, for a sandbox of one's own model and data."""
    dest = Path(dest).resolve()
    if dest.exists():
        if not (dest / MARKER).is_file():
            raise SystemExit(f"{dest}: exists and is not a sandbox made by this script; choose another DIR")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    override_file(dest / "params.yaml", (demo_overrides() if demo else {}) | (overrides or {}))
    (dest / MARKER).write_text("made by scripts/sandbox.py; `make demo` rebuilds this folder\n")
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.name", "sandbox"], dest)
    run(["git", "config", "user.email", "sandbox@localhost"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "sandbox of the GPT-2 fine-tuning study"], dest)
    return dest


def repro_and_commit(dest: Path) -> None:
    """dvc repro, then commit the result as the baseline that experiments and `dvc metrics diff`
    compare against."""
    # --quiet: DVC's own lines (five per stage) go; each stage still prints its one-line summary,
    # and a failing stage its error.
    run(["dvc", "repro", "--quiet"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "demo baseline: dvc repro on the tiny assets"], dest)


# Timings, throughput and memory differ from run to run (time_to_quality.*.seconds too), and so does
# a run's history (the processes a resumed run took: segments).
TIMING = {"train_s", "warmup_s", "tokens_per_s", "mfu", "peak_flops", "peak_mem_gib", "peak_mem_reserved_gib",
          "eval_s", "eval_time_s", "seconds", "segments", "full_train_s", "lora_train_s", "full_peak_gib",
          "lora_peak_gib"}  # the last four: metrics/headline.json's


def outcome(dest) -> dict:
    """Everything a run produced that must be reproducible: model and data hashes, and the
    non-timing metrics and facts, flattened."""
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    # Loss curves carry training seconds (the live ones timestamps): their losses are compared
    # below, not their hash. The report's pictures (loss against seconds) and the model cards
    # (training time) carry seconds too, rendered from the metrics compared here.
    timed = ("metrics/plots", "metrics/live", "metrics/report-figures", "cards")
    hashes = {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
              if not o["path"].endswith((".json", ".md")) and not o["path"].startswith(timed)}
    metrics = {}
    for f in sorted((dest / "metrics").rglob("*.json")):
        for k, v in flatten(json.loads(f.read_text())).items():
            # The memory plan's process part is measured (the process's RSS before loading weights).
            if k.split(".")[-1] not in TIMING and k != "versions.python" and not k.startswith("memory_plan_gib"):
                metrics[f"{f.relative_to(dest)}:{k}"] = v
    for f in sorted((dest / "metrics/plots").rglob("*.csv")):
        for line in f.read_text().splitlines()[1:]:
            step, *_, loss = line.split(",")
            metrics[f"{f.relative_to(dest)}:{step}"] = float(loss)
    return {"hashes": hashes, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--repro", action="store_true", help="run dvc repro in the sandbox")
    ap.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra params override, as for dvc exp run -S")
    ap.add_argument("--shipped", action="store_true",
                    help="keep params.yaml as shipped (not the demo's tiny settings): a sandbox for your own model and "
                         "data, set with -S")
    ap.add_argument("--cold", action="store_true",
                    help="start every stage's process cold, without the warm server (ftstudy/warm.py)")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)  # as dvc exp run -S parses values
    if args.shipped and args.repro:
        ap.error("--shipped makes a sandbox of the shipped params, for your own model and data: run dvc repro in it "
                 "yourself (its prepare reaches the Hub unless model.name and data.name are local), not --repro")
    if not args.repro:
        print(f"sandbox: {make_sandbox(args.dir, overrides, demo=not args.shipped)}", file=sys.stderr)
        return
    # The server imports torch and transformers while the sandbox is built; the stages then start
    # from it in a fraction of a second each, with the same results as cold.
    with warm_server(os.environ | ENV) if not args.cold else contextlib.nullcontext():
        dest = make_sandbox(args.dir, overrides)
        print(f"sandbox: {dest}", file=sys.stderr)
        repro_and_commit(dest)


if __name__ == "__main__":
    main()
