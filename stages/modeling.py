"""Loading models and tokenizers, the pretrained snapshot, and the LoRA wrapping.

Only `prepare` loads weights from `model.name` (hub id or local folder); it saves a snapshot that
every later stage loads, so after `prepare` the pipeline runs offline and the snapshot pins the
exact weights.
"""

from __future__ import annotations

import json
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
        check_weights(Path(name))
    return AutoModelForCausalLM.from_pretrained(str(name), dtype=torch.float32, attn_implementation="sdpa")


def check_weights(folder: Path) -> None:
    """A save_pretrained or PEFT folder must hold complete, readable safetensors weights."""
    from safetensors import safe_open

    _check_local_model(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{folder}: no weights (*.safetensors); the folder is incomplete, rebuild it "
                         "(dvc repro -f <the stage that writes it>)")
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                for key in f.keys():  # reading every tensor catches truncation past the header
                    f.get_slice(key)[:]
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ModelError(f"{w}: truncated or corrupt ({e}); rebuild it "
                             "(dvc repro -f <the stage that writes it>)") from None


def check_context(name: str | Path, block_size: int) -> None:
    """Refuse data.block_size beyond the model's context, reading only its config."""
    from transformers import AutoConfig

    from stages.config import ConfigError
    from stages.data import is_local

    if is_local(str(name)):
        _check_local_model(Path(name))
    config = AutoConfig.from_pretrained(str(name))
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if context is not None and block_size > context:
        raise ConfigError(f"data.block_size: {block_size} exceeds the context of {name} ({context} tokens); "
                          f"set it to at most {context}")


def snapshot(name: str, out_dir: Path) -> None:
    """Save `name`'s model and tokenizer to out_dir (already a fresh folder)."""
    model = load_causal_lm(name)
    tok = load_tokenizer(name)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def skeleton(name: str | Path) -> torch.nn.Module:
    """The model's architecture on the meta device: its layers without loading any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(name)))


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
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    # The weights come from the local snapshot of model.name; the adapter records model.name itself,
    # so it loads anywhere that base is available (the hub id, for the real study).
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def expected_lora_params(model: torch.nn.Module, lora) -> int:
    """r x (fan_in + fan_out) per wrapped layer: the adapter's A and B matrices."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for m in lora_targets(model, lora.target_modules).values():
        fan_in, fan_out = (m.weight.shape if isinstance(m, Conv1D) else m.weight.shape[::-1])
        total += lora.r * (fan_in + fan_out)
    return total


def load_for_eval(model_dir: str | Path, base_dir: str | Path, base_name: str):
    """A model ready to score: a full model folder, or base plus a PEFT adapter folder whose
    recorded base must be `base_name` (params model.name)."""
    model_dir = Path(model_dir)
    _check_local_model(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        recorded = json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if recorded != base_name:
            raise ModelError(f"{model_dir}: adapter was trained on base {recorded!r}, but model.name is "
                             f"{base_name!r}; retrain it (dvc repro train_lora) or set model.name back")
        check_weights(model_dir)
        model = PeftModel.from_pretrained(load_causal_lm(base_dir), str(model_dir))
    else:
        model = load_causal_lm(model_dir)
    return model.eval()


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
