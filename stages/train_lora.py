"""Stage train_lora: prepared data + pretrained snapshot -> PEFT LoRA adapter folder and metrics.

Only the adapter trains and only the adapter (plus tokenizer) is saved; its config names
model.name as the base. Integrity checks, recorded in the metrics: the trainable parameter count
equals r x (in + out) over the wrapped layers, and the merged model (merge_and_unload) gives the
same logits as base plus adapter. With lora.merge the merged model is also saved, loadable with
plain transformers, at <out>/merged. Run through `accelerate launch`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from stages import modeling, training


def build(p, base_dir: str):
    # Checked on the weightless skeleton first, so a bad lora.target_modules fails in seconds.
    expected = modeling.expected_lora_params(modeling.skeleton(base_dir), p.lora)
    model = modeling.wrap_lora(modeling.load_causal_lm(base_dir), p.lora, p.model.name)
    trainable, _ = modeling.count_params(model)
    if trainable != expected:
        raise modeling.ModelError(f"LoRA has {trainable} trainable parameters, but lora.r x (in + out) over "
                                  f"the wrapped layers gives {expected}; lora.target_modules matched "
                                  "layers PEFT wrapped differently")
    return model


@torch.no_grad()
def merge_check(peft_model, batch: torch.Tensor):
    """(max |logits(base + adapter) - logits(merged)|, merged model); raises if they differ."""
    was_training, tf32 = peft_model.training, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in true fp32
    try:
        peft_model.eval()
        adapted = peft_model(input_ids=batch).logits.float()
        try:
            merged = copy.deepcopy(peft_model).merge_and_unload()
            diff = (adapted - merged(input_ids=batch).logits.float()).abs().max().item()
        except RuntimeError as e:  # shapes that do not fit: the adapter's layout is wrong
            raise modeling.ModelError(f"LoRA merge check failed: merging the adapter raised {e}") from e
    finally:
        peft_model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tolerance = 1e-4 * max(1.0, adapted.abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise modeling.ModelError(f"LoRA merge check failed: merged and base+adapter logits differ by {diff:.3g} "
                                  f"(tolerance {tolerance:.3g}); the adapter is corrupt or wrongly oriented")
    return diff, merged


def finalize(model, out: Path, p, args, batch: torch.Tensor) -> dict:
    diff, merged = merge_check(model, batch)
    if p.lora.merge:
        merged.save_pretrained(out / "merged")
        modeling.load_tokenizer(args.base).save_pretrained(out / "merged")
    return {"lora_expected_trainable": modeling.expected_lora_params(modeling.skeleton(args.base), p.lora),
            "merge_max_abs_diff": diff,
            "adapter_mb": round((out / "adapter_model.safetensors").stat().st_size / 2**20, 4),
            "base_model_mb": round(modeling.dir_size_mb(Path(args.base)), 3)}


def main() -> None:
    training.run("lora", build, finalize)


if __name__ == "__main__":
    main()
