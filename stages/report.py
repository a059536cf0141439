"""Stage report: metrics, their facts and the generations only -> metrics/report.md.

Nothing is recomputed: every number comes from a file another stage wrote (ftstudy.reporting).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftstudy.errors import run_stage
from ftstudy.outputs import write_text
from ftstudy.reporting import render


def main() -> None:
    ap = argparse.ArgumentParser(description="Render the report; run by dvc.yaml stage report")
    ap.add_argument("--metrics", required=True, help="metrics folder")
    ap.add_argument("--generations", required=True, help="generations folder")
    ap.add_argument("--out", required=True, help="markdown file to write")
    args = ap.parse_args()
    write_text(args.out, render(Path(args.metrics), Path(args.generations)))
    print(f"report: wrote {args.out}")


if __name__ == "__main__":
    run_stage(main)
