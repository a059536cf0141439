"""Stage train_lora: prepared data + pretrained snapshot -> PEFT LoRA adapter folder and metrics.

Only the adapter trains and only the adapter (plus tokenizer) is saved; its config names
model.name as the base. Run through `accelerate launch`, so a user's `accelerate config` applies.
"""

from __future__ import annotations

from stages import modeling, training


def build(p, base_dir: str):
    base = modeling.load_causal_lm(base_dir)
    expected = modeling.expected_lora_params(base, p.lora)
    model = modeling.wrap_lora(base, p.lora, p.model.name)
    trainable, _ = modeling.count_params(model)
    if trainable != expected:
        raise modeling.ModelError(f"LoRA has {trainable} trainable parameters, but lora.r x (in + out) over "
                                  f"the wrapped layers gives {expected}; lora.target_modules matched "
                                  "layers PEFT wrapped differently")
    return model


def main() -> None:
    training.run("lora", build)


if __name__ == "__main__":
    main()
