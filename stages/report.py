"""Stage report: metrics, their facts, the validation curves and the generations only ->
metrics/report.md, its pictures (ftstudy.report.figures), the trained models' Hugging Face cards
(ftstudy.report.cards) and metrics/headline.json, the few figures a decision reads, flat and named so that
one `dvc exp show --keep` pattern shows them (README).

Nothing is recomputed: every number comes from a file another stage wrote (ftstudy.report.reporting).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ftstudy.config import load_params
from ftstudy.errors import run_stage
from ftstudy.outputs import write_json, write_text
from ftstudy.report import cards
from ftstudy.report.inputs import Inputs
from ftstudy.report.reporting import headline_metrics, render


def main() -> None:
    ap = argparse.ArgumentParser(description="Render the report; run by dvc.yaml stage report")
    ap.add_argument("--metrics", required=True, help="metrics folder")
    ap.add_argument("--generations", required=True, help="generations folder")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--figures", required=True, help="folder for the report's pictures (PNG)")
    ap.add_argument("--cards", required=True, help="folder for the models' Hugging Face cards (<model>/README.md)")
    ap.add_argument("--headline", required=True, help="the headline metrics JSON to write (for dvc exp show)")
    args = ap.parse_args()
    link = os.path.relpath(args.figures, Path(args.out).parent) + "/"
    inputs = Inputs.read(Path(args.metrics), Path(args.generations), load_params().model.label)
    write_text(args.out, render(inputs, Path(args.figures), link))
    for model in ("full", "lora"):
        write_text(Path(args.cards) / model / "README.md", cards.card(inputs, model))
    write_json(args.headline, headline_metrics(inputs))
    print(f"report: wrote {args.out}, its pictures in {args.figures}, the model cards in {args.cards} and the "
          f"headline figures in {args.headline}")


if __name__ == "__main__":
    run_stage(main)
