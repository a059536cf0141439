"""Stage train_full: prepared data + pretrained snapshot -> fully fine-tuned model folder and metrics.

Every weight trains; the model is saved with save_pretrained (safetensors, config, tokenizer).
Run through `accelerate launch`, so a user's `accelerate config` applies.
"""

from __future__ import annotations

from stages import modeling, training


def build(p, base_dir: str):
    return modeling.load_causal_lm(base_dir)


def main() -> None:
    training.run("full", build)


if __name__ == "__main__":
    main()
