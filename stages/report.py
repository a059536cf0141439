"""Stage report: metrics and generations only -> metrics/report.md (GitHub markdown, via tabulate).

Nothing is recomputed here: every number is read from a metrics file the other stages wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from stages.outputs import read_json, write_text

MODELS = ("pretrained", "full", "lora")
LABELS = {"pretrained": "Pretrained GPT-2", "full": "Fully fine-tuned GPT-2", "lora": "LoRA fine-tuned GPT-2"}


def _num(v, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def _minutes(seconds) -> str:
    if seconds is None:
        return "no training"
    m, s = divmod(seconds, 60)
    return f"{int(m)}:{s:04.1f} min"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(metrics_dir: Path, generations_dir: Path) -> str:
    ev = {m: read_json(metrics_dir / "evaluate" / f"{m}.json") for m in MODELS}
    tr = {m: read_json(metrics_dir / f"train_{m}.json") for m in ("full", "lora")}
    gen = {m: read_json(generations_dir / f"{m}.json") for m in MODELS}
    prep = read_json(metrics_dir / "prepare.json")
    any_eval = ev["pretrained"]

    study = [[LABELS[m], _one_line(gen[m]["prompt"] + gen[m]["greedy"]), _num(ev[m]["test_ppl"]),
              _minutes(tr[m]["train_time_s"]) if m in tr else "no training",
              f"{tr[m]['peak_mem_gib']:.2f} GiB" if m in tr else "–"] for m in MODELS]
    efficiency = [[LABELS[m], _num(tr[m]["tokens_per_s"], ",.0f"), f"{tr[m]['trainable_params']:,}",
                   f"{tr[m]['total_params']:,}", _num(tr[m]["artifact_mb"], ",.2f"),
                   _num(tr[m]["final_train_loss"], ".4f"), _num(tr[m]["val_loss"], ".4f")] for m in tr]
    quality = [[LABELS[m], _num(ev[m]["val_ppl"]), _num(ev[m]["test_ppl"]), _num(ev[m]["val_ppl_blocks"]),
                _num(ev[m]["test_ppl_blocks"])] for m in MODELS]
    samples = [f"**{LABELS[m]}**, sample {i + 1}: {_one_line(gen[m]['prompt'] + s)}"
               for m in MODELS for i, s in enumerate(gen[m]["samples"])]

    lines = [
        "# GPT-2 on WikiText-2: pretrained vs full fine-tuning vs LoRA", "",
        f"Prompt: *{gen['pretrained']['prompt']}*; greedy continuation. Perplexity: test split, "
        f"sliding window (lower is better). Peak memory: {tr['full']['peak_mem_kind'].replace('_', ' ')}.", "",
        tabulate(study, ["Model", "Generated text", "Test perplexity", "Training time", "Peak memory"],
                 tablefmt="github", disable_numparse=True), "",
        "## Efficiency", "",
        tabulate(efficiency, ["Model", "Tokens/s", "Trainable params", "Total params", "Artifact (MB)",
                              "Final train loss", "Val loss"], tablefmt="github", disable_numparse=True), "",
        "## Perplexity, both protocols", "",
        tabulate(quality, ["Model", "Val (sliding)", "Test (sliding)", "Val (blocks)", "Test (blocks)"],
                 tablefmt="github", disable_numparse=True), "",
        f"Sliding window: {any_eval['block_size']}-token windows moved by {any_eval['stride']} tokens, every "
        f"token but the first scored once ({any_eval['test_tokens']:,} test tokens). Blocks: non-overlapping "
        f"{any_eval['block_size']}-token blocks, tail dropped ({any_eval['test_tokens_blocks']:,} test tokens). "
        f"Tokenizer: `{any_eval['tokenizer']}`. Corpus tokens: "
        + ", ".join(f"{s} {v['tokens']:,}" for s, v in prep.items()) + ".", "",
        "## Sampled text", "",
        *[s + "\n" for s in samples],
        "## Environment", "",
        f"Training device: {tr['full']['device']}; precision {tr['full']['precision']}; "
        f"{tr['full']['processes']} process(es), global batch {tr['full']['global_batch']} blocks.", "",
        "Versions: " + ", ".join(f"{k} {v or 'none'}" for k, v in tr["full"]["versions"].items()) + ".", "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="Render the report; run by dvc.yaml stage report")
    ap.add_argument("--metrics", required=True, help="metrics folder")
    ap.add_argument("--generations", required=True, help="generations folder")
    ap.add_argument("--out", required=True, help="markdown file to write")
    args = ap.parse_args()
    write_text(args.out, render(Path(args.metrics), Path(args.generations)))
    print(f"report: wrote {args.out}")


if __name__ == "__main__":
    main()
