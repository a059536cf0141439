"""Loading models and tokenizers, and the pretrained snapshot.

Only `prepare` loads weights from `model.name` (hub id or local folder); it saves a snapshot that
every later stage loads, so after `prepare` the pipeline runs offline and the snapshot pins the
exact weights.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ftstudy.errors import StudyError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"


class ModelError(StudyError):
    """A model folder is missing files, corrupt, or does not fit the params."""


def _check_local_model(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory; model.name must be a hub id or a local folder "
                         "written by save_pretrained")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{path}: no config.json; this is not a save_pretrained folder")


def load_tokenizer(name: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    from ftstudy.config import is_local

    if is_local(str(name)):
        folder = Path(name)
        if not folder.is_dir():
            raise ModelError(f"{folder}: not a directory; expected a hub id or a local save_pretrained folder")
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelError(f"{folder}: no tokenizer.json or tokenizer_config.json; save the tokenizer there "
                             "with save_pretrained")
    tok = AutoTokenizer.from_pretrained(str(name), revision=revision)
    if not getattr(tok, "is_fast", True):
        raise ModelError(f"{name}: only a slow tokenizer is available; this project needs a fast one "
                         "(tokenizer.json)")
    # A loading option, not the tokenizer's: transformers keeps it among the kwargs save_pretrained writes
    # to tokenizer_config.json, true or false as HF_HUB_OFFLINE was exported, so the snapshot's and the
    # models' bytes (and every stage after prepare) followed the caller's environment.
    tok.init_kwargs.pop("local_files_only", None)
    return tok


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_causal_lm(name: str | Path, revision: str | None = None, dtype: str = "fp32", quantize: str = "none"):
    """A causal LM from a hub id (at `revision`) or a save_pretrained folder, with errors that name
    the file: its weights in `dtype` (fp32, bf16, fp16), or in 4-bit NormalFloat (quantize nf4,
    through bitsandbytes, computing in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ftstudy.config import is_local

    if is_local(str(name)):
        check_weights(Path(name))
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load; our stages print one summary line
    extra = {}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(name), revision=revision, dtype=getattr(torch, DTYPES[dtype]),
                                                 attn_implementation="sdpa", **extra)
    if quantize == "nf4":
        keep_4bit_layout_for_training(model)
    # GPT-2 configs name no loss; transformers 5 then warns on every load and uses ForCausalLM,
    # the causal-LM loss, which is ours: say so, and the warning goes.
    model.loss_type = "ForCausalLM"
    return model


def keep_4bit_layout_for_training(model) -> None:
    """Keep bitsandbytes' 4-bit layers in the one weight layout that trains, on every CPU.

    On a CPU with AVX512-BF16, a Linear4bit's first forward in eval mode without gradients
    (validation, the fast-path check) repacks its weights for an inference kernel, for good: the
    next training step then runs through that kernel, which has no backward (bitsandbytes 0.50:
    "a view of a leaf Variable ... in-place operation" at `result += bias`). Our models switch
    between training and scoring, so the repack is switched off (`support_avx512bf16_for_cpu`,
    which Linear4bit reads at each forward); other CPUs and GPUs never take that path. The same
    layout everywhere also keeps a run's scores from depending on the CPU's instruction set."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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


def context_length(name: str | Path, revision: str | None = None) -> int | None:
    """The model's context in tokens, from its config alone (None when the config states none)."""
    from transformers import AutoConfig

    from ftstudy.config import is_local

    if is_local(str(name)):
        _check_local_model(Path(name))
    config = AutoConfig.from_pretrained(str(name), revision=revision)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def context_error(name, block_size: int, context: int | None) -> str | None:
    """Why data.block_size does not fit the model's context, or None."""
    if context is not None and block_size > context:
        return f"data.block_size: {block_size} exceeds the context of {name} ({context} tokens); set it to at most {context}"
    return None


def check_context(name: str | Path, block_size: int, revision: str | None = None) -> None:
    """Refuse data.block_size beyond the model's context, reading only its config."""
    from ftstudy.config import ConfigError

    if (error := context_error(name, block_size, context_length(name, revision))) is not None:
        raise ConfigError(error)


def config_on_this_machine(name: str, revision: str | None, pretrained: Path, prepared_meta: Path) -> Path | None:
    """The folder holding the model's config.json, where this machine has it without downloading:
    model.name itself (a local folder), the Hub cache at model.revision, or the pretrained snapshot
    an earlier prepare made of this very model.name and revision; None elsewhere."""
    from ftstudy.config import is_local

    if is_local(name):
        return Path(name) if (Path(name) / "config.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent
    try:
        made = json.loads(prepared_meta.read_text())["inputs"]["model.name"]
    except (OSError, ValueError, KeyError):
        return None
    same = made.get("name") == name and made.get("revision") == revision
    return pretrained if same and (pretrained / "config.json").is_file() else None


def snapshot(name: str, out_dir: Path, revision: str | None = None) -> None:
    """Save `name`'s model and tokenizer (at `revision`) to out_dir (already a fresh folder)."""
    model = load_causal_lm(name, revision)
    tok = load_tokenizer(name, revision)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def skeleton(name: str | Path) -> torch.nn.Module:
    """The model's architecture on the meta device: its layers without loading any weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(name)))


@contextmanager
def peft_attribute_note_silenced():
    """PEFT (up to 0.21 at least) reads `is_gradient_checkpointing`, which transformers 5 renamed and
    now reports with a FutureWarning on every wrap; harmless (PEFT only checks the flag), so it is
    not shown. Other warnings still are."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def leave_out_bitsandbytes(base_dir: str | Path, needed: bool = False) -> None:
    """In a stage's own process (`python -m stages...`), keep bitsandbytes from being imported unless
    `needed` (lora.quantize: nf4) or the base checkpoint is itself quantized: PEFT and transformers
    import it whenever it is installed, 1.4 s of a stage's start on a 2-core CPU, though nothing
    else uses it. Both ask importlib.util.find_spec whether it is installed, which answers no for a
    module set to None in sys.modules. Call it before anything imports PEFT; in any other process
    (a test's, a notebook's) it does nothing, so a later nf4 run there still finds bitsandbytes."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if needed or "bitsandbytes" in sys.modules or not getattr(main, "name", "").startswith("stages."):
        return
    config = Path(base_dir) / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return
    sys.modules["bitsandbytes"] = None


def is_adapter(model_dir: str | Path) -> bool:
    """Whether a model folder holds a PEFT adapter (else a full model)."""
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


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
        with peft_attribute_note_silenced():
            model = PeftModel.from_pretrained(load_causal_lm(base_dir), str(model_dir))
    else:
        model = load_causal_lm(model_dir)
    return model.eval()


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
