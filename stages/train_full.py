"""Stage train_full: prepared data + pretrained snapshot -> fully fine-tuned model folder and metrics.

Every weight trains; the model is saved with save_pretrained (safetensors, config, tokenizer).
Started by ftstudy.launching: plain python for one process, `accelerate launch` for several GPUs or
a user's `accelerate config`.
"""

from __future__ import annotations

from ftstudy import modeling, training
from ftstudy.config import load_params
from ftstudy.errors import run_stage


def build(p, base_dir):
    return modeling.load_causal_lm(base_dir)


def main() -> None:
    paths = training.TrainPaths.from_cli("full")
    p = load_params()
    training.run("full", p, paths, build=lambda: build(p, paths.base))


if __name__ == "__main__":
    run_stage(main)
