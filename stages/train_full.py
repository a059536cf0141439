"""Stage train_full: prepared data + pretrained snapshot -> fully fine-tuned model folder and metrics.

Every weight trains, in model.dtype (auto: fp32 master weights); the model is saved with
save_pretrained (safetensors, config, tokenizer).
Started by ftstudy.train.launching: plain python for one process, `accelerate launch` for several GPUs or
a user's `accelerate config`.
"""

from __future__ import annotations

from ftstudy import modeling, runtime
from ftstudy.config import load_params
from ftstudy.errors import run_stage
from ftstudy.train import training


def build(p, base_dir, dtype: str):
    return modeling.load_causal_lm(base_dir, dtype=dtype)


def main() -> None:
    paths = training.TrainPaths.from_cli("full")
    p = load_params()
    dtype = runtime.base_dtype(p.model.dtype, "full")
    training.run("full", p, paths, build=lambda: build(p, paths.base, dtype), dtype=dtype, facts={"base_dtype": dtype})


if __name__ == "__main__":
    run_stage(main)
