"""make docs: the docs' computed tables and the committed demo report, written by code.

    python -m scripts.docs [--memory] [--demo-report] [--dir .demo]

--memory writes docs/models.md's memory table from ftstudy.train.memory (the plan each training stage
prints), for well-known model sizes built offline as weightless skeletons from their config
classes. --demo-report runs `make demo`'s sandbox at --dir (or reuses a built one) and copies its
report, pictures and the two model cards to docs/demo-report.md and docs/demo-report/. Both by
default.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from scripts.docs_tables import DOCS, ROOT, stamp, write_block

# Sizes as the models' published configs give them.
MODELS = {
    "GPT-2 124M": ("GPT2Config", {}),
    "GPT-2 medium 355M": ("GPT2Config", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "Qwen2.5-0.5B": ("Qwen2Config", {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                                     "tie_word_embeddings": True}),
    "Llama-3.2-1B": ("LlamaConfig", {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                                     "tie_word_embeddings": True}),
    "Llama-3.2-3B": ("LlamaConfig", {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                                     "tie_word_embeddings": True}),
    "Llama-3.1-8B": ("LlamaConfig", {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                                     "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                                     "tie_word_embeddings": False}),
}
# The columns: (label, method, model.dtype as resolved on a bf16 GPU, lora.quantize, checkpointing).
COLUMNS = [("full", "full", "fp32", "none", False), ("full, checkpointing", "full", "fp32", "none", True),
           ("LoRA (bf16 base)", "lora", "bf16", "none", False), ("LoRA, checkpointing", "lora", "bf16", "none", True),
           ("QLoRA, checkpointing", "lora", "bf16", "nf4", True)]


def memory_table(batch: int = 8, block: int = 1024) -> str:
    import torch
    import transformers
    from tabulate import tabulate

    from ftstudy.config import load_params
    from ftstudy.train import lora, memory

    params = load_params(ROOT / "params.yaml")
    rows = []
    for name, (config_class, sizes) in MODELS.items():
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**sizes))
        total = sum(q.numel() for q in skeleton.parameters())
        adapter = lora.expected_params(skeleton, params.lora, lora.resolve_targets(skeleton, params.lora.target_modules))
        row = [name, f"{total / 1e9:.2f}B"]
        for _, method, dtype, quantize, ckpt in COLUMNS:
            p = memory.plan(skeleton, method=method, dtype=dtype, quantize=quantize,
                            trainable=total if method == "full" else adapter, batch=batch, block=block,
                            precision="bf16", checkpointing=ckpt, loss="chunked", device="cuda")
            row.append(f"{p.total / memory.GiB:.1f}")
        rows.append(row)
    return tabulate(rows, ["model", "parameters", *(c[0] for c in COLUMNS)], tablefmt="github", disable_numparse=True)


def write_memory() -> None:
    from ftstudy.config import load_params

    params = load_params(ROOT / "params.yaml")
    text = (f"Computed by `python -m scripts.docs --memory` ({time.strftime('%Y-%m-%d')}) from `ftstudy.train.memory`, the plan "
            "each training stage prints: GiB on one GPU in bf16 mixed precision, `train.batch_size` 8 x 1,024 tokens, "
            f"the chunked loss, LoRA at the shipped `lora.r` {params.lora.r} on the shipped `lora.target_modules` "
            f"({params.lora.target_modules}); the integrity check's copies, which "
            "come after training, are within each figure.\n\n" + memory_table())
    print(f"docs: wrote {write_block('models.md', 'memory-table', text)} (memory table)")


def write_demo_report(folder: Path) -> None:
    from scripts import sandbox

    started = time.perf_counter()
    if not ((folder / sandbox.MARKER).is_file() and (folder / "metrics/report.md").is_file()):
        sandbox.make_sandbox(folder)
        sandbox.repro_and_commit(folder)
    seconds = time.perf_counter() - started
    out = DOCS / "demo-report"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder / "metrics/report-figures", out)
    for model in ("full", "lora"):
        shutil.copy(folder / f"cards/{model}/README.md", out / f"card-{model}.md")
    report = (folder / "metrics/report.md").read_text(encoding="utf-8").replace("](report-figures/", "](demo-report/")
    note = (f"> The report `make demo` prints, committed by `python -m scripts.docs --demo-report`: the bundled tiny assets "
            f"on CPU. {stamp('make demo', f'{seconds:.0f} s for the sandbox build' if seconds > 5 else 'the sandbox was already built')} "
            "The model cards the report stage wrote beside it: [full](demo-report/card-full.md), "
            "[LoRA](demo-report/card-lora.md).\n\n")
    (DOCS / "demo-report.md").write_text(note + report, encoding="utf-8")
    print(f"docs: wrote {DOCS / 'demo-report.md'} and {out}/")
    excerpt = excerpt_of(report.replace("](demo-report/", "](docs/demo-report/"))
    print(f"docs: wrote {write_block('README.md', 'demo-excerpt', stamp('make demo') + chr(10) * 2 + excerpt)}")


def excerpt_of(report: str) -> str:
    """The report's headline (title, table, greedy texts) and its findings, headings two levels down."""
    head = report.split("\n![", 1)[0].split("\n## ", 1)[0].rstrip()
    found = "## Findings" + report.split("\n## Findings", 1)[1].split("\n## ", 1)[0].rstrip()
    demote = lambda text: "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())  # noqa: E731
    return demote(head) + "\n\n" + demote(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--demo-report", action="store_true")
    ap.add_argument("--dir", type=Path, default=ROOT / ".demo")
    args = ap.parse_args()
    both = not (args.memory or args.demo_report)
    if args.memory or both:
        write_memory()
    if args.demo_report or both:
        write_demo_report(args.dir.resolve())


if __name__ == "__main__":
    main()
