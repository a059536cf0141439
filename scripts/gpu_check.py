"""One script to run whenever a GPU is at hand: python -m scripts.gpu_check [--dry-run] [--out FILE]

Downloads nothing and needs no `datasets`: the stages run one by one from the commands DVC itself
resolves from dvc.yaml (its vars and matrix expanded by DVC's own code, so no templating feature is
re-implemented here). It needs `dvc` importable: on a GPU machine without it, carry dvc's wheels
(docs/performance.md, "The GPU check").

1. The training loop, side by side in one run, on GPT-2 124M at random init with 1,024-token
   blocks: ours (real stage code) for full and LoRA, compiled, at train.precision auto (bf16 on
   current GPUs); ours full eager (the compiled-vs-eager loss agreement); ours full with the
   model's own loss instead of the chunked one (train.loss), at batch 16 and at the largest batch
   that fits with each; DoRA, a bf16 LoRA base, QLoRA (nf4, where bitsandbytes is installed) and
   LoRA with gradient checkpointing, each against plain LoRA; the HF Trainer default path. For
   each: steady-state tokens/s, MFU, warm-up, peak allocated and reserved memory.
2. The whole pipeline, stage by stage, on a WikiText-2-sized synthetic corpus (about 2.4M training tokens, the real
   GPT-2 tokenizer), 3 epochs, with each stage's wall time.

It writes JSON (--out) and prints one table, with the targets checked. --dry-run runs the same
code at tiny sizes (the bundled tiny GPT-2, 128-token blocks), on a CPU in about a minute and a
half, with one compile warm-up (LoRA runs eager there); the test suite runs it so the script works
on the day a GPU comes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ftstudy.synthetic import ASSETS, ROOT, local_params, no_dropout, write_corpus, write_gpt2_124m, write_params
from scripts.bench import GPU_SHAPE, bench_params, hf_trainer, ours, setup

# Targets for an H100/H200 in bf16 (the GPU issue's figures).
TARGETS = {"full_tokens_per_s": 340_000, "full_over_hf": 8.0, "lora_over_full_tokens_per_s": 1.2,
           "lora_over_full_peak_mem": 0.7, "pipeline_s": 180}
# WikiText-2 (raw): about 2.4M training and 0.25M validation / 0.28M test GPT-2 tokens; the
# repeated tiny corpus runs about 3.55 bytes per GPT-2 token.
FULL_SIZES = {"train": 8_600_000, "validation": 880_000, "test": 1_000_000}
# The dry run: the same code on the bundled tiny GPT-2 and its tokenizer, 128-token blocks, so that
# a CPU runs it in about a minute and a half (the real tokenizer and shapes have tests of their own).
DRY = {"model": "tiny GPT-2 (assets/tiny-gpt2)", "config": None, "block": 128, "batch": 8, "hf_batch": 8,
       "tokens": 128 * 8 * 12, "epochs": 1, "sizes": {"train": 20_000, "validation": 5_000, "test": 5_000}}


def loop_rows(work: Path, shape: dict, dry: bool) -> list[dict]:
    """Our loop (full and LoRA compiled, full eager, full with the model's own loss instead of the
    chunked one) and the HF Trainer path, on the same tokens; on a GPU, the largest batch that fits
    with each loss. A dry run compiles full alone: one compile warm-up proves the path."""
    work.mkdir()
    setup(work, shape)
    no_dropout(work / "pre")  # compiled and eager then differ by their numerics alone
    bench_params(work, shape, compile_=True)
    rows = [ours(work, "full", "full")]
    bench_params(work, shape, compile_=False)
    rows.append(ours(work, "full", "full-eager"))
    bench_params(work, shape, compile_=not dry)
    rows.append(ours(work, "lora", "lora"))
    if not dry:  # the model's own loss beside the chunked one (the default): at this batch, and the largest
        bench_params(work, shape, compile_=True, loss="model")
        rows.append(ours(work, "full", "full-model-loss", "ours, full, model's own loss"))
        rows += [largest_batch(work, shape, loss) for loss in ("model", "chunked")]
    rows += method_rows(work, shape, dry, rows[2])
    rows.append(hf_trainer(work, shape))
    return rows


# The methods beside plain LoRA (params.yaml spellings), each compiled as plain LoRA is.
METHODS = {"DoRA": {"lora.use_dora": True}, "LoRA, bf16 base": {"model.dtype": "bf16"},
           "QLoRA (nf4 base)": {"lora.quantize": "nf4"}, "LoRA, gradient checkpointing": {"train.gradient_checkpointing": True}}


def method_rows(work: Path, shape: dict, dry: bool, lora: dict) -> list[dict]:
    """DoRA, a bf16 LoRA base, QLoRA and gradient checkpointing, each against plain LoRA's row
    (tokens/s and peak memory ratios); QLoRA only where bitsandbytes is installed; a dry run runs
    DoRA and gradient checkpointing, which prove the same code."""
    import importlib.util

    rows = []
    for label, overrides in METHODS.items():
        if dry and ("lora.quantize" in overrides or "model.dtype" in overrides):
            continue  # 16- and 4-bit bases are GPU measurements; the test suite runs them on a CPU itself
        if "lora.quantize" in overrides and importlib.util.find_spec("bitsandbytes") is None:
            rows.append({"path": f"ours, {label}", "error": "bitsandbytes is not installed"})
            continue
        bench_params(work, shape, compile_=not dry, **overrides)
        row = ours(work, "lora", "lora-" + label.split(",")[0].split(" ")[0].lower(), f"ours, {label}")
        rows.append(row | {"vs_lora_tokens_per_s": round(row["tokens_per_s"] / lora["tokens_per_s"], 3),
                           "vs_lora_peak_mem": round(row["peak_mem_gib"] / lora["peak_mem_gib"], 3)})
    return rows


def largest_batch(work: Path, shape: dict, loss: str, limit: int = 256) -> dict:
    """Full fine-tuning, compiled, at the largest power-of-two batch (from shape's) that fits: each
    try on its own prepared tokens (12 steps) and the snapshot loop_rows wrote (linked, not
    rebuilt); only running out of GPU memory ends the search."""
    best, batch = None, shape["batch"]
    while batch <= limit:
        tried = shape | {"batch": batch, "tokens": batch * shape["block"] * 12}
        folder = work / f"largest-{loss}-{batch}"
        folder.mkdir()
        setup(folder, tried, snapshot=work / "pre")
        bench_params(folder, tried, compile_=True, loss=loss)
        row = ours(folder, "full", "full", f"ours, full, {loss} loss, largest batch", check=False)
        if row is None:
            break
        best, batch = row, batch * 2
    return best or {"path": f"ours, full, {loss} loss, largest batch", "error": f"batch {shape['batch']} does not fit"}


def pipeline_commands() -> list[tuple[str, str]]:
    """(stage, shell command) for every dvc.yaml stage, as DVC resolves them, in file order (which
    dvc.yaml keeps a valid run order)."""
    from dvc.repo import Repo

    with Repo(str(ROOT), config={"core": {"no_scm": True}}) as repo:  # a copy without .git reads the same
        return [(stage.addressing, " ".join(stage.cmd.split())) for stage in repo.index.stages]


def pipeline_rows(work: Path, dry: bool) -> list[dict]:
    """Each stage's wall time on a WikiText-2-sized corpus with GPT-2 124M at random init and the
    real tokenizer (dry: a tiny corpus and the bundled tiny GPT-2)."""
    work.mkdir()
    if dry:
        shutil.copytree(ASSETS / "tiny-gpt2", work / "gpt2-random")
    else:
        write_gpt2_124m(work / "gpt2-random")
    write_corpus(work / "corpus", DRY["sizes"] if dry else FULL_SIZES)
    # The benchmarks stage on the demo's two local tasks: the check downloads nothing.
    shutil.copytree(ROOT / "tasks", work / "tasks")
    local_tasks = {"tasks.names": ["tasks/tiny_cloze.yaml", "tasks/tiny_complete.yaml"]}
    write_params(work, local_params(work / "gpt2-random", work / "corpus", **local_tasks, **(
        {"data.block_size": DRY["block"], "evaluate.stride": DRY["block"] // 2, "evaluate.bootstrap_chunk": DRY["block"],
         "train.epochs": DRY["epochs"], "train.warmup_steps": 2, "train.compile": False,
         "generate.max_new_tokens": 8, "generate.num_samples": 1} if dry else {})))
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    rows = []
    for stage, cmd in pipeline_commands():
        start = time.perf_counter()
        proc = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"gpu_check: stage {stage} failed:\n$ {cmd}\n{proc.stderr[-3000:]}")
        rows.append({"stage": stage, "wall_s": round(time.perf_counter() - start, 2)})
        print(f"gpu_check: {stage} {rows[-1]['wall_s']:.1f} s", flush=True)
    prepared = json.loads((work / "metrics/prepare.json").read_text())["corpus"]
    rows.append({"stage": "total", "wall_s": round(sum(r["wall_s"] for r in rows), 2),
                 "train_tokens": prepared["train"]["tokens"]})
    shutil.copy(work / "metrics/report.md", work.parent / "report.md")
    return rows


def verdicts(rows: list[dict], pipeline: list[dict]) -> dict:
    by = {r["path"]: r for r in rows}
    full, lora, hf = by["ours, full"], by["ours, lora"], by["HF Trainer defaults"]
    measured = {"full_tokens_per_s": full["tokens_per_s"], "full_over_hf": full["tokens_per_s"] / hf["tokens_per_s"],
                "lora_over_full_tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
                "lora_over_full_peak_mem": lora["peak_mem_gib"] / full["peak_mem_gib"]}
    if pipeline:
        measured["pipeline_s"] = pipeline[-1]["wall_s"]
    return {k: {"measured": round(v, 3), "target": TARGETS[k],
                "met": v <= TARGETS[k] if k in ("lora_over_full_peak_mem", "pipeline_s") else v >= TARGETS[k]}
            for k, v in measured.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, any device (a CPU in minutes)")
    ap.add_argument("--loop-only", action="store_true", help="the training loop rows only, not the pipeline's stages")
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = ap.parse_args()

    import torch
    from tabulate import tabulate

    from ftstudy import runtime

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA GPU here; run with --dry-run to check the script on a CPU")
    shape = DRY if args.dry_run else GPU_SHAPE | {"tokens": 16 * 1024 * 60}  # 60 steps of batch 16
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = loop_rows(Path(tmp) / "loop", shape, args.dry_run)
        pipeline = [] if args.loop_only else pipeline_rows(Path(tmp) / "pipeline", args.dry_run)
        report = "" if args.loop_only else (Path(tmp) / "report.md").read_text()
    eager = next(r for r in rows if r["path"] == "ours, full, eager")
    full = next(r for r in rows if r["path"] == "ours, full")
    results = {"device": runtime.device_name(torch.device("cuda" if cuda else "cpu")), "dry_run": args.dry_run,
               "date": time.strftime("%Y-%m-%d"), "versions": runtime.library_versions(),
               "model": shape["model"], "block": shape["block"], "training": rows,
               "compiled_vs_eager_final_loss_rel_diff": abs(full["final_loss"] / eager["final_loss"] - 1),
               "pipeline": pipeline, "targets": verdicts(rows, pipeline),
               "wall_s": round(time.perf_counter() - started, 1), "report": report}
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\ngpu_check on {results['device']} ({results['date']}; {shape['model']}, {shape['block']}-token blocks"
          f"{', DRY RUN' if args.dry_run else ''})")
    table = [[r["path"], r.get("batch", shape["hf_batch"]), r["precision"], "yes" if r["compiled"] else "no",
              f"{r['tokens_per_s']:,.0f}", "–" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['warmup_s']:.1f}",
              f"{r['peak_mem_gib']:.2f}",
              "–" if r.get("peak_mem_reserved_gib") is None else f"{r['peak_mem_reserved_gib']:.2f}"]
             for r in rows if "error" not in r]
    table += [[f"pipeline: {p['stage']}", "", "", "", "", "", "", "", f"{p['wall_s']:.1f} s"] for p in pipeline]
    table = tabulate(table, ["path / stage", "batch", "precision", "compiled", "tokens/s", "MFU", "warm-up s",
                             "peak alloc GiB", "reserved GiB / wall"], tablefmt="github")
    notes = [f"compiled vs eager final loss: relative difference {results['compiled_vs_eager_final_loss_rel_diff']:.2e}"]
    notes += [f"target {name}: {v['measured']:,} vs {v['target']:,} -> {'met' if v['met'] else 'NOT met'}"
              for name, v in results["targets"].items()]
    print(table, *notes, sep="\n")
    wrote = [args.out]
    if not args.dry_run:  # a real GPU's figures go into the docs, stamped; a dry run's are the script's test
        from scripts.docs_tables import stamp, write_block

        command = "python -m scripts.gpu_check" + (" --loop-only" if args.loop_only else "")
        body = "\n".join([stamp(command), "", table, "", *(f"- {n}" for n in notes)])
        wrote.append(write_block("performance.md", "gpu-check", body))
    print(f"gpu_check: wrote {', '.join(map(str, wrote))} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
