"""make demo on a quiet machine and beside one competing CPU-bound process, side by side:

    python -m scripts.contention [--rounds 1] [--out contention.json]

Each round builds the demo sandbox twice (quiet, then with a busy-looping Python process running
the whole time) and reports both wall times and their ratio (the target: at most 2x). Then, in the
quiet round's sandbox, the demo's train_full stage alone, quiet and beside the busy process, with
every core, with one thread and with the threads the stage picks by itself (ftstudy.train.launching):
the measurements behind the CPU thread rule.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftstudy.cores import usable_cores

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FULL = ["-m", "stages.train_full", "--data", "data/prepared", "--base", "models/pretrained", "--out", "tf/model",
              "--metrics", "tf/m.json", "--info", "tf/i.json", "--plots", "tf/plots", "--live", "tf/live",
              "--checkpoints", "tf/ckpt"]


@contextlib.contextmanager
def busy_neighbour(on: bool = True):
    """One CPU-bound process running beside the block, when `on`."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        time.sleep(0.5 if on else 0)  # let it start spinning
        yield
    finally:
        if hog is not None:
            hog.kill()


def demo_seconds(dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scripts.sandbox", str(dest), "--repro"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_seconds(sandbox: Path, threads: str | None) -> float:
    """The training loop's seconds of the demo's train_full, with OMP_NUM_THREADS=threads (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ({"OMP_NUM_THREADS": threads} if threads else {})
    subprocess.run([sys.executable, *TRAIN_FULL], cwd=sandbox, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return json.loads((sandbox / "tf/m.json").read_text())["full"]["train_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("contention.json"))
    ap.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    args = ap.parse_args()
    rows, threads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            quiet = demo_seconds(Path(tmp) / f"quiet-{i}")
            with busy_neighbour():
                loaded = demo_seconds(Path(tmp) / f"loaded-{i}")
            rows.append({"quiet_s": round(quiet, 1), "loaded_s": round(loaded, 1), "ratio": round(loaded / quiet, 2)})
            print(f"round {i + 1}: make demo quiet {quiet:.1f} s, beside one busy process {loaded:.1f} s "
                  f"({loaded / quiet:.2f}x)", flush=True)
        for busy in (False, True):
            with busy_neighbour(busy):
                for label, value in ((f"{usable_cores()} threads", str(usable_cores())), ("1 thread", "1"),
                                     ("chosen by the stage", None)):
                    seconds = train_seconds(Path(tmp) / "quiet-0", value)
                    threads.append({"busy": busy, "threads": label, "train_s": seconds})
                    print(f"train_full {'beside one busy process' if busy else 'quiet'}, {label}: {seconds:.1f} s",
                          flush=True)
    args.out.write_text(json.dumps({"rounds": rows, "train_full": threads}, indent=2) + "\n")
    print(f"contention: wrote {args.out}")
    if not args.no_docs:
        write_docs(rows, threads, "python -m scripts.contention" + (f" --rounds {args.rounds}" if args.rounds != 1 else ""))


def write_docs(rows: list[dict], threads: list[dict], command: str) -> None:
    """The two tables into docs/performance.md, stamped with the machine, date and command."""
    from tabulate import tabulate

    from scripts.docs_tables import stamp, write_block

    demo = tabulate([[i + 1, f"{r['quiet_s']}", f"{r['loaded_s']}", f"{r['ratio']:.2f}x"] for i, r in enumerate(rows)],
                    ["round", "make demo quiet, s", "beside one busy process, s", "ratio"], tablefmt="github",
                    disable_numparse=True)
    by = {(t["busy"], t["threads"]): t["train_s"] for t in threads}
    labels = list(dict.fromkeys(t["threads"] for t in threads))
    train = tabulate([["beside one busy process" if busy else "quiet", *(f"{by[(busy, lab)]:.1f}" for lab in labels)]
                      for busy in (False, True)], ["train_full's training seconds", *labels], tablefmt="github",
                     disable_numparse=True)
    print(f"contention: wrote {write_block('performance.md', 'contention', stamp(command) + chr(10) * 2 + demo + chr(10) * 2 + train)}")


if __name__ == "__main__":
    main()
