"""Stage train_lora: prepared data + pretrained snapshot -> PEFT LoRA adapter folder and metrics.

Only the adapter trains and only the adapter (plus tokenizer) is saved; its config names
model.name as the base. The layers it wraps (lora.target_modules, `auto` resolved to the family's
default) are checked on the weightless skeleton before anything loads, and recorded in the info.
Before the folder is committed, the adapter's integrity is checked and recorded (ftstudy.train.lora):
the trainable count equals r x (in + out) over the wrapped layers (plus DoRA's magnitudes), the
saved adapter loaded on a fresh base scores a batch as the trained model did, and its merge scores
it the same again. The variant (lora.use_dora, lora.use_rslora, lora.init_lora_weights; a 4-bit
base with lora.quantize) is PEFT's; PiSSA and OLoRA adapters are saved converted to plain LoRA on the
original base. The base loads in model.dtype (auto: bf16 on a GPU that has it). With lora.merge
the merged model is also saved, loadable with plain transformers, at <out>/merged (its size apart,
as merged_mb: artifact_mb counts the adapter folder alone). Started by ftstudy.train.launching, as
train_full is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ftstudy import modeling, runtime
from ftstudy.config import load_params
from ftstudy.data import token_files
from ftstudy.errors import run_stage
from ftstudy.train import lora, training


def build(p, base_dir, planned, base_revision, dtype: str, initial: Path):
    model = lora.build(base_dir, p.lora, p.model.name, planned, base_revision, dtype, p.train.gradient_checkpointing)
    if lora.reshapes_base(p.lora):  # PiSSA, OLoRA: the state to convert the trained adapter against
        lora.save_initial(model, initial, p.lora)
    return model


def check(p, base_dir: Path, out: Path, batch, reference, dtype: str, sixteen_bit: bool) -> dict:
    sizes = {"artifact_mb": round(modeling.dir_size_mb(out), 3),  # the adapter folder, before merged/ joins it
             "adapter_mb": round((out / "adapter_model.safetensors").stat().st_size / 2**20, 4),
             "base_model_mb": round(modeling.dir_size_mb(base_dir), 3)}
    diffs, merged = lora.check(out, base_dir, p.lora, dtype, batch, reference, sixteen_bit)
    if p.lora.merge:
        merged.save_pretrained(out / "merged")
        modeling.load_tokenizer(base_dir).save_pretrained(out / "merged")
        sizes["merged_mb"] = round(modeling.dir_size_mb(out / "merged"), 3)
    return diffs | sizes


def main() -> None:
    paths = training.TrainPaths.from_cli("lora")
    p = load_params()
    modeling.leave_out_bitsandbytes(paths.base, needed=p.lora.quantize == "nf4")
    planned = lora.plan(paths.base, p.lora)  # a lora.target_modules that matches nothing fails here, in seconds
    commit = token_files.read_meta(paths.data)["inputs"]["model.name"]["commit"]  # what prepare loaded
    dtype = runtime.base_dtype(p.model.dtype, "lora")
    with tempfile.TemporaryDirectory() as initial, lora.quantized_path_errors(p.lora):
        training.run("lora", p, paths, build=lambda: build(p, paths.base, planned, commit, dtype, Path(initial)),
                     dtype=dtype, trainable=planned[1],
                     saver=lambda model, folder, state: lora.save(model, folder, p.lora, Path(initial), state),
                     check=lambda out, batch, reference: check(p, paths.base, out, batch, reference, dtype,
                                                               runtime.resolve_precision(p.train.precision) != "no"),
                     facts={"lora_target_modules": planned[0], "variant": lora.variant(p.lora), "base_dtype": dtype,
                            "lora_init": p.lora.init_lora_weights})


if __name__ == "__main__":
    run_stage(main)
