"""LoRA through PEFT: which layers to wrap, the wrapping, and the adapter's integrity checks.

Checks: the trainable parameter count equals r x (in + out) over the wrapped layers, and the
merged model (merge_and_unload) gives the same logits as base plus adapter, both in fp32.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ftstudy import modeling
from ftstudy.config import LoraParams
from ftstudy.modeling import ModelError


def module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the layers LoRA can wrap (Linear and GPT-2's Conv1D), sorted."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and n})


def _set_line(names) -> str:
    return f"-S 'lora.target_modules=[{','.join(names)}]'"


def resolve_targets(model: torch.nn.Module, target_modules) -> list[str]:
    """lora.target_modules as the short layer names to wrap: `auto` is PEFT's own default for the
    model's family (GPT-2 c_attn; Llama, Qwen2 q_proj and v_proj; GPT-NeoX query_key_value),
    `all-linear` every Linear layer but the output projection, as PEFT reads it; a list must match."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    valid = module_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules == "auto":
        if model_type not in DEFAULTS:
            raise ModelError(f"lora.target_modules: auto knows no default for model type {model_type!r}; list the "
                             f"layers to wrap, e.g. {_set_line(valid[:2])} (valid names: {', '.join(valid)}), "
                             "or use all-linear")
        return list(DEFAULTS[model_type])
    if target_modules == "all-linear":
        output = model.get_output_embeddings()
        head = next(name for name, m in model.named_modules() if m is output).rsplit(".", 1)[-1]
        return [n for n in valid if n != head]
    missing = [t for t in target_modules if t not in valid]
    if missing:
        verb = "matches" if len(missing) == 1 else "match"
        raise ModelError(f"lora.target_modules: {', '.join(map(repr, missing))} {verb} no layer of this model; "
                         f"valid names: {', '.join(valid)}. Set them with "
                         f"{_set_line(DEFAULTS.get(model_type, valid[:2]))}, or use auto")
    return list(target_modules)


def targets(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """The modules whose short name is in `names` (resolved by resolve_targets)."""
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}


def expected_params(model: torch.nn.Module, r: int, names: list[str]) -> int:
    """r x (fan_in + fan_out) per wrapped layer: the adapter's A and B matrices."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for m in targets(model, names).values():
        fan_in, fan_out = (m.weight.shape if isinstance(m, Conv1D) else m.weight.shape[::-1])
        total += r * (fan_in + fan_out)
    return total


def wrap(model: torch.nn.Module, lora: LoraParams, base_name: str, names: list[str] | None = None,
         base_revision: str | None = None):
    """Wrap model with a PEFT LoRA adapter built from the lora params (on the layers `names`,
    resolved from lora.target_modules when not given); the adapter names its base and the base's
    commit."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    names = names or resolve_targets(model, lora.target_modules)
    # GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear: PEFT must know.
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in targets(model, names).values())
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names,
                        fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    with modeling.peft_attribute_note_silenced():
        peft_model = get_peft_model(model, config)
    # The weights come from the local snapshot of model.name; the adapter records model.name itself,
    # so it loads anywhere that base is available (the hub id, for the real study).
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.peft_config["default"].revision = base_revision  # the pinned commit; None for a local folder
    return peft_model


def plan(base_dir: str | Path, lora: LoraParams) -> tuple[list[str], int]:
    """(the layer names to wrap, the trainable count they give), from the weightless skeleton, so
    a bad lora.target_modules fails in seconds, before any weight is loaded."""
    skeleton = modeling.skeleton(base_dir)
    names = resolve_targets(skeleton, lora.target_modules)
    return names, expected_params(skeleton, lora.r, names)


def build(base_dir: str | Path, lora: LoraParams, base_name: str, planned: tuple[list[str], int],
          base_revision: str | None):
    """The snapshot wrapped with LoRA on the layers `plan` gave, its trainable count checked
    against r x (in + out)."""
    names, expected = planned
    model = wrap(modeling.load_causal_lm(base_dir), lora, base_name, names, base_revision)
    trainable, _ = modeling.count_params(model)
    if trainable != expected:
        raise ModelError(f"LoRA has {trainable} trainable parameters, but lora.r x (in + out) over the wrapped "
                         f"layers gives {expected}; lora.target_modules matched layers PEFT wrapped differently")
    return model


@torch.no_grad()
def merge_check(peft_model, batch: torch.Tensor):
    """(max |logits(base + adapter) - logits(merged)|, merged model), both in fp32; raises if they differ.

    Both sides run outside any autocast: a model handed over still under a mixed-precision forward
    would compare bf16 logits with fp32 ones and fail on a sound adapter."""
    was_training, tf32 = peft_model.training, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in true fp32
    try:
        peft_model.eval()
        with torch.autocast(batch.device.type, enabled=False):
            adapted = peft_model(input_ids=batch).logits.float()
            try:
                merged = copy.deepcopy(peft_model).merge_and_unload()
                diff = (adapted - merged(input_ids=batch).logits.float()).abs().max().item()
            except RuntimeError as e:  # shapes that do not fit: the adapter's layout is wrong
                raise ModelError(f"LoRA merge check failed: merging the adapter raised {e}") from e
    finally:
        peft_model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tolerance = 1e-4 * max(1.0, adapted.abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise ModelError(f"LoRA merge check failed: merged and base+adapter logits differ by {diff:.3g} "
                         f"(tolerance {tolerance:.3g}); the adapter is corrupt or wrongly oriented")
    return diff, merged
