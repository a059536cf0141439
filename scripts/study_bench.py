"""make bench-study: the demo study (make study-demo's grid) through the DVC queue and through a
2-worker Dask LocalCluster, side by side in one run, on one demo build with train.cpu_threads 1
(so both backends train the same bytes: a Dask worker runs with OMP_NUM_THREADS=1). Writes the
table into docs/performance.md ("The study over Dask") and checks that both studies found the same.

    python -m scripts.study_bench [--dir /tmp/ftstudy-study-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.docs_tables import stamp, write_block
from scripts.sandbox import ROOT, make_sandbox, repro_and_commit

RUN_FACTS = ("wall_s", "ran", "reused", "train_s", "peak_mem_gib")


def same_findings(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(k in RUN_FACTS or same_findings(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_findings, a, b))
    return a == b or (a != a and b != b)  # NaN: an interval from one seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ftstudy-study-bench"))
    args = ap.parse_args()
    work = args.dir.resolve()
    if work.exists():
        if not (work / "base" / ".sandbox").is_file():
            raise SystemExit(f"study_bench: {work} exists and is not an earlier bench's folder; choose another --dir")
        shutil.rmtree(work)
    base = make_sandbox(work / "base", {"train.cpu_threads": 1})
    repro_and_commit(base)
    runs = {}
    for backend in ("queue", "dask"):
        repo = work / backend
        shutil.copytree(base, repo, symlinks=True)
        extra = []
        if backend == "dask":
            subprocess.run(["git", "init", "-q", "--bare", str(work / "remote.git")], check=True)
            subprocess.run(["git", "remote", "add", "origin", str(work / "remote.git")], cwd=repo, check=True)
            subprocess.run(["git", "push", "-q", "origin", "main"], cwd=repo, check=True)
            subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "store", str(work / "store")],
                           cwd=repo, check=True, capture_output=True)
            extra = ["--backend", "dask", "--workers", "2"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "scripts.study", "--demo", "--dir", str(repo), *extra], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        runs[backend] = (time.perf_counter() - start, json.loads((repo / "study.json").read_text()))
    (q_s, q), (d_s, d) = runs["queue"], runs["dask"]
    if not same_findings(q, d):
        raise SystemExit("study_bench: the two backends' studies differ beyond timings; see "
                         f"{work}/queue/study.json and {work}/dask/study.json")
    table = "\n".join([
        stamp("make bench-study", "the same demo build (train.cpu_threads 1) for both; their study.json "
              "files agree in every figure but timings and memory"), "",
        "| backend | experiments run | wall time |", "|---|---|---|",
        f"| DVC queue (`make study-demo`), one experiment at a time | {q['ran']} | {q_s:.0f} s |",
        f"| Dask LocalCluster, 2 single-slot workers (`--backend dask --workers 2`) | {d['ran']} | {d_s:.0f} s |"])
    path = write_block("performance.md", "study-backends", table)
    print(table)
    print(f"study_bench: queue {q_s:.0f} s, dask {d_s:.0f} s for {q['ran']} experiments each; wrote {path}")


if __name__ == "__main__":
    main()
