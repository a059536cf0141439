"""Loading models and tokenizers, the pretrained snapshot, and the LoRA wrapping.

Only `prepare` reads `model.name` (hub id or local folder); it saves a snapshot that every later
stage loads, so after `prepare` the pipeline runs offline and the snapshot pins the exact weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"


class ModelError(ValueError):
    """A model folder is missing files, corrupt, or does not fit the params."""


def _check_local_model(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory; model.name must be a hub id or a local folder "
                         "written by save_pretrained")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{path}: no config.json; this is not a save_pretrained folder")


def load_tokenizer(name: str | Path):
    from transformers import AutoTokenizer

    from stages.data import is_local

    if is_local(str(name)):
        _check_local_model(Path(name))
    tok = AutoTokenizer.from_pretrained(str(name))
    if not getattr(tok, "is_fast", True):
        raise ModelError(f"{name}: only a slow tokenizer is available; this project needs a fast one "
                         "(tokenizer.json)")
    return tok


def load_causal_lm(name: str | Path):
    """A causal LM in fp32 from a hub id or a save_pretrained folder, with errors that name the file."""
    from transformers import AutoModelForCausalLM

    from stages.data import is_local

    if is_local(str(name)):
        _check_local_model(Path(name))
        weights = list(Path(name).glob("*.safetensors")) + list(Path(name).glob("*.bin"))
        if not weights:
            raise ModelError(f"{name}: no weights (*.safetensors); the folder is incomplete, rebuild it "
                             "(dvc repro -f <stage that writes it>)")
    try:
        return AutoModelForCausalLM.from_pretrained(str(name), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        if not is_local(str(name)):
            raise
        raise ModelError(f"{name}: could not be loaded ({type(e).__name__}: {e}); a weights file is "
                         "truncated or corrupt, rebuild it (dvc repro -f <stage that writes it>)") from e


def snapshot(name: str, out_dir: Path) -> None:
    """Save `name`'s model and tokenizer to out_dir (already a fresh folder)."""
    model = load_causal_lm(name)
    tok = load_tokenizer(name)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the layers LoRA can wrap (Linear and GPT-2's Conv1D), sorted."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and n})


def lora_targets(model: torch.nn.Module, target_modules) -> dict[str, torch.nn.Module]:
    """Modules matched by target_modules; every entry must match at least one."""
    valid = module_names(model)
    missing = [t for t in target_modules if t not in valid]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(map(repr, missing))} match no layer of this model; "
                         f"valid names: {', '.join(valid)}")
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in target_modules}


def wrap_lora(model: torch.nn.Module, lora, base_name: str):
    """Wrap model with a PEFT LoRA adapter built from the lora params."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, lora.target_modules)
    # GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear: PEFT must know.
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in targets.values())
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), fan_in_fan_out=fan_in_fan_out,
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    return get_peft_model(model, config)


def expected_lora_params(model: torch.nn.Module, lora) -> int:
    """r x (fan_in + fan_out) per wrapped layer: the adapter's A and B matrices."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for m in lora_targets(model, lora.target_modules).values():
        fan_in, fan_out = (m.weight.shape if isinstance(m, Conv1D) else m.weight.shape[::-1])
        total += lora.r * (fan_in + fan_out)
    return total


def load_for_eval(model_dir: str | Path, base_dir: str | Path):
    """A model ready to score: a full model folder, or base plus a PEFT adapter folder."""
    model_dir = Path(model_dir)
    _check_local_model(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(base_dir), str(model_dir))
    else:
        model = load_causal_lm(model_dir)
    return model.eval()


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
