"""The report: metrics, their descriptive facts and the generations -> GitHub markdown (tabulate).

Nothing is recomputed here: every number is read from a metrics file the other stages wrote, and
the findings are written from those numbers by fixed rules (stages/findings.py). Perplexities
measured under different protocols are never put in one column: the report refuses them.
"""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from gpt2study.errors import StudyError
from gpt2study.findings import findings, paired_verdict
from gpt2study.outputs import read_json

MODELS = ("pretrained", "full", "lora")
LABELS = {"pretrained": "Pretrained GPT-2", "full": "Fully fine-tuned GPT-2", "lora": "LoRA fine-tuned GPT-2"}


class ReportError(StudyError):
    """The metrics cannot be put side by side."""


def _table(rows, headers) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def info_path(metrics_file: Path) -> Path:
    """Where a metrics file's descriptive facts live: beside it, as <name>.info.json."""
    return metrics_file.with_suffix(".info.json")


def _metrics(metrics_file: Path) -> dict:
    """A metrics file's numbers: each file keys them by its model or method (its own name)."""
    return read_json(metrics_file)[metrics_file.stem.removeprefix("train_")]


def _with_info(metrics_file: Path) -> dict:
    return _metrics(metrics_file) | read_json(info_path(metrics_file))


def duration(seconds: float) -> str:
    """3.4 s under a minute, else 1:03 min (or 1:02:03 h)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}:{s:02d} min"
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d} h"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _ppl(m: dict, prefix: str) -> str:
    return f"{m[prefix]:.2f} [{m[f'{prefix}_lo']:.2f}, {m[f'{prefix}_hi']:.2f}]"


def _check_protocols(ev: dict) -> dict:
    protocols = {m: ev[m]["protocol"] for m in MODELS}
    if any(p != protocols["pretrained"] for p in protocols.values()):
        raise ReportError("metrics/evaluate/*.json were measured under different protocols "
                          f"({protocols}); rerun the evaluate stages (dvc repro -f -s evaluate) before the report")
    return protocols["pretrained"]


def render(metrics_dir: Path, generations_dir: Path) -> str:
    # Each metrics file (numbers) has its facts (protocol, device, versions) beside it in <name>.info.json.
    ev = {m: _with_info(metrics_dir / "evaluate" / f"{m}.json") for m in MODELS}
    gq = {m: _metrics(metrics_dir / "generate" / f"{m}.json") for m in MODELS}
    gen = {m: read_json(generations_dir / f"{m}.json")["prompts"] for m in MODELS}
    tr = {m: _with_info(metrics_dir / f"train_{m}.json") for m in ("full", "lora")}
    prep = read_json(metrics_dir / "prepare.json")["corpus"]
    compare = read_json(metrics_dir / "compare.json")
    paired, reach = compare["paired"], compare["time_to_quality"]
    protocol = _check_protocols(ev)
    lora = tr["lora"]

    study = [[LABELS[m], _one_line(gen[m][0]["prompt"] + gen[m][0]["greedy"]), f"{ev[m]['test_ppl']:.2f}",
              duration(tr[m]["train_s"]) if m in tr else "no training",
              f"{tr[m]['peak_mem_gib']:.2f} GiB" if m in tr else "–"] for m in MODELS]
    efficiency = [[LABELS[m], duration(tr[m]["train_s"]), f"{tr[m]['warmup_s']:.1f} s",
                   f"{tr[m]['tokens_per_s']:,.0f}", f"{tr[m]['mfu']:.1%}" if "mfu" in tr[m] else "–",
                   f"{tr[m]['peak_mem_gib']:.2f} GiB", f"{tr[m]['trainable_params']:,}", f"{tr[m]['total_params']:,}",
                   f"{tr[m]['artifact_mb']:,.2f}"] for m in tr]
    validation = [[LABELS[m], f"{tr[m]['val_loss_best']:.4f} (step {tr[m]['val_best_step']})",
                   f"{tr[m]['val_loss']:.4f}",
                   f"+{tr[m]['val_rise_after_best']:.4f}" if tr[m]["val_rise_after_best"] > 0 else "no",
                   duration(tr[m]["eval_s"]),
                   f"{duration(reach[m]['seconds'])}, {reach[m]['tokens']:,} tokens" if "seconds" in reach[m]
                   else "never",
                   ] for m in tr]
    validation_headers = ["Model", "Best val loss (step)", "Final val loss", "Rose after best", "Validation time",
                          "Reached the other's final val loss after"]
    general = list(ev["pretrained"]["general"])
    quality = []
    for m in MODELS:
        row = [LABELS[m], _ppl(ev[m], "val_ppl"), _ppl(ev[m], "test_ppl"), f"{ev[m]['test_bpb']:.4f}",
               f"{ev[m]['val_ppl_blocks']:.2f}", f"{ev[m]['test_ppl_blocks']:.2f}"]
        for g in general:
            change = 100 * (ev[m]["general"][g]["ppl"] / ev["pretrained"]["general"][g]["ppl"] - 1)
            row += [_ppl(ev[m]["general"][g], "ppl"), "–" if m == "pretrained" else f"{change:+.1f}%"]
        quality.append(row)
    quality_headers = ["Model", "Val ppl [95% CI]", "Test ppl [95% CI]", "Test bits/byte", "Val ppl (blocks)",
                       "Test ppl (blocks)"] + [h for g in general for h in (f"{g} ppl [95% CI]", f"{g} change")]
    text_quality = [[LABELS[m], f"{gq[m]['distinct_1']:.3f}", f"{gq[m]['distinct_2']:.3f}",
                     f"{gq[m]['repetition_4gram']:.3f}", f"{gq[m]['mean_length']:.1f}", f"{gq[m]['eos_rate']:.2f}"]
                    for m in MODELS]
    verdict_text = {"lower": "lower perplexity", "higher": "higher perplexity", "tie": "tie"}
    paired_rows = [[f"{LABELS[a]} / {LABELS[b]}", f"{v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]",
                    verdict_text[paired_verdict(v)]]
                   for name, v in paired.items() for a, b in [name.split("_vs_")]]
    samples = [f"- **{LABELS[m]}** ({'greedy' if i == 0 else f'sample {i}'}): {_one_line(p['prompt'] + t)}"
               for m in MODELS for p in gen[m] for i, t in enumerate([p["greedy"], *p["samples"]])]
    versions = ", ".join(f"{k} {v or 'none'}" for k, v in tr["full"]["versions"].items())

    return "\n".join([
        "# GPT-2 on WikiText-2: pretrained vs full fine-tuning vs LoRA", "",
        f"Prompt: *{gen['pretrained'][0]['prompt']}* (greedy continuation). Test perplexity: sliding window, "
        "lower is better.", "",
        _table(study, ["Model", "Generated text", "Test perplexity", "Training time", "Peak memory"]), "",
        "## Efficiency", "",
        _table(efficiency, ["Model", "Training time", "Warm-up", "Tokens/s (steady)", "MFU", "Peak memory",
                            "Trainable params", "Total params", "Artifact (MB)"]), "",
        f"Training time is the loop alone; warm-up is its first log interval (compilation included), "
        f"excluded from the steady-state tokens/s. MFU: 6N + 12·L·d·T FLOPs per token (4N for LoRA's frozen "
        f"base) over the GPU's dense bf16 peak; none on CPU. "
        f"Peak memory is {tr['full']['peak_mem_kind'].replace('_', ' ')}. LoRA integrity: "
        f"{lora['trainable_params']:,} trainable parameters, checked equal to r x (in + out) over the wrapped "
        f"layers; merged vs base+adapter logits differ by at most "
        f"{lora['merge_max_abs_diff']:.2e}; adapter {lora['adapter_mb']:.2f} MB vs full model "
        f"{lora['base_model_mb']:.2f} MB.", "",
        "### Validation during training", "",
        _table(validation, validation_headers), "",
        f"Validation loss (run_clm blocks) every {tr['full']['eval_every'] or 'epoch'}"
        f"{' optimizer steps' if tr['full']['eval_every'] else ''}; its time is reported apart and left out of "
        "training time and tokens/s. Curves: `dvc plots show` (against step and against training seconds).", "",
        "## Quality", "",
        _table(quality, quality_headers), "",
        f"Sliding window: {protocol['context']}-token windows moved by {protocol['stride']} tokens, every token "
        f"but the first scored once ({protocol['test_tokens']:,} test, {protocol['val_tokens']:,} validation tokens). "
        f"Blocks: non-overlapping {protocol['context']}-token blocks, tail dropped "
        f"({protocol['test_tokens_blocks']:,} test tokens). Intervals: percentile bootstrap, "
        f"{protocol['bootstrap']}. Changes on general text are relative to the pretrained model. Tokenizer "
        f"`{protocol['tokenizer']}`; corpus `{protocol['source']}`: "
        + ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in prep.items()) + ".", "",
        _table(paired_rows, ["Comparison", "Test ppl ratio [95% paired CI]", "Verdict"]), "",
        "Paired: both models are scored on the same test tokens, and each bootstrap resample draws the same "
        "chunks for both, so the interval covers their difference alone; a winner is called only when it "
        "excludes 1.", "",
        "## Generation quality", "",
        _table(text_quality, ["Model", "Distinct-1", "Distinct-2", "Repeated 4-grams", "Mean length (tokens)",
                              "Stops at EOS"]), "",
        f"Over {gq['pretrained']['texts']} continuations per model ({len(gen['pretrained'])} prompts, greedy "
        "plus seeded samples each).", "",
        "<details><summary>All generated texts</summary>", "", *samples, "", "</details>", "",
        "## Findings", "",
        *[f"- {f}" for f in findings(ev, tr, gq, paired, reach)], "",
        "## Environment", "",
        f"- Training device: {tr['full']['device']}; precision {tr['full']['precision']}; "
        f"{tr['full']['processes']} process(es), global batch {tr['full']['global_batch']} blocks",
        f"- Evaluation precision: {protocol['precision']}",
        f"- Versions: {versions}",
        f"- Seed: {tr['full']['seed']}", "",
    ])
