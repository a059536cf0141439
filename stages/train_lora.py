"""Stage train_lora: prepared data + pretrained snapshot -> PEFT LoRA adapter folder and metrics.

Only the adapter trains and only the adapter (plus tokenizer) is saved; its config names
model.name as the base. The layers it wraps (lora.target_modules, `auto` resolved to the family's
default) are checked on the weightless skeleton before anything loads, and recorded in the info.
Before the folder is committed, the adapter's integrity is checked and recorded (ftstudy.lora):
the trainable count equals r x (in + out) over the wrapped layers, and merged and base+adapter
logits agree. With lora.merge the merged model is also saved, loadable with plain transformers, at
<out>/merged (its size apart, as merged_mb: artifact_mb counts the adapter folder alone). Started
by ftstudy.launching, as train_full is.
"""

from __future__ import annotations

from pathlib import Path

from ftstudy import data, lora, modeling, training
from ftstudy.config import load_params
from ftstudy.errors import run_stage


def build(p, base_dir, planned, base_revision):
    return lora.build(base_dir, p.lora, p.model.name, planned, base_revision)


def check(p, base_dir: Path, model, out: Path, batch) -> dict:
    diff, merged = lora.merge_check(model, batch)
    sizes = {"artifact_mb": round(modeling.dir_size_mb(out), 3),  # the adapter folder, before merged/ joins it
             "adapter_mb": round((out / "adapter_model.safetensors").stat().st_size / 2**20, 4),
             "base_model_mb": round(modeling.dir_size_mb(base_dir), 3)}
    if p.lora.merge:
        merged.save_pretrained(out / "merged")
        modeling.load_tokenizer(base_dir).save_pretrained(out / "merged")
        sizes["merged_mb"] = round(modeling.dir_size_mb(out / "merged"), 3)
    return {"merge_max_abs_diff": diff, **sizes}


def main() -> None:
    paths = training.TrainPaths.from_cli("lora")
    p = load_params()
    planned = lora.plan(paths.base, p.lora)  # a lora.target_modules that matches nothing fails here, in seconds
    commit = data.read_meta(paths.data)["inputs"]["model.name"]["commit"]  # what prepare loaded
    training.run("lora", p, paths, build=lambda: build(p, paths.base, planned, commit),
                 check=lambda model, out, batch: check(p, paths.base, model, out, batch),
                 facts={"lora_target_modules": planned[0]})


if __name__ == "__main__":
    run_stage(main)
