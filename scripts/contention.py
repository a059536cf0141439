"""make demo on a quiet machine and beside one competing CPU-bound process, side by side:

    python -m scripts.contention [--rounds 1] [--out contention.json]

Each round builds the demo sandbox twice (quiet, then with a busy-looping Python process running
the whole time) and reports both wall times and their ratio. The issue's target: at most 2x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_seconds(dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scripts.sandbox", str(dest), "--repro"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("contention.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            quiet = demo_seconds(Path(tmp) / f"quiet-{i}")
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                loaded = demo_seconds(Path(tmp) / f"loaded-{i}")
            finally:
                hog.kill()
            rows.append({"quiet_s": round(quiet, 1), "loaded_s": round(loaded, 1), "ratio": round(loaded / quiet, 2)})
            print(f"round {i + 1}: make demo quiet {quiet:.1f} s, beside one busy process {loaded:.1f} s "
                  f"({loaded / quiet:.2f}x)", flush=True)
    args.out.write_text(json.dumps({"rounds": rows}, indent=2) + "\n")
    print(f"contention: wrote {args.out}")


if __name__ == "__main__":
    main()
