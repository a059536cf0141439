"""LoRA and its variants through PEFT: which layers to wrap, the wrapping (lora.use_dora,
lora.use_rslora, lora.init_lora_weights as LoraConfig spells them; a 4-bit base with
lora.quantize), saving, and the adapter's integrity checks.

Checks: the trainable parameter count equals r x (in + out) over the wrapped layers (plus DoRA's
magnitude per output); the saved adapter, loaded on a fresh base in the training's dtype and
quantization, scores a batch as the trained model did (per-target NLL); and the merged model
(merge_and_unload) scores it the same again.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch

from ftstudy import modeling
from ftstudy.config import LoraParams
from ftstudy.errors import StudyError
from ftstudy.modeling import ModelError


def module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the layers LoRA can wrap (Linear and GPT-2's Conv1D), sorted."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and n})


def _set_line(names) -> str:
    return f"-S 'lora.target_modules=[{','.join(names)}]'"


def _peft_defaults() -> dict:
    """PEFT's default LoRA layers per model type. Imported only when asked: importing PEFT costs
    seconds (bitsandbytes with it, where installed), and check_params checks an explicit list without it."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def resolve_targets(model: torch.nn.Module, target_modules) -> list[str]:
    """lora.target_modules as the short layer names to wrap: `auto` is PEFT's own default for the
    model's family (GPT-2 c_attn; Llama, Qwen2 q_proj and v_proj; GPT-NeoX query_key_value),
    `all-linear` every Linear layer but the output projection, as PEFT reads it; a list must match."""
    valid = module_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules == "auto":
        DEFAULTS = _peft_defaults()
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
                         f"{_set_line(_peft_defaults().get(model_type, valid[:2]))}, or use auto")
    return list(target_modules)


class QuantizedPathError(ModelError):
    """bitsandbytes' 4-bit path failed; names lora.quantize and the way around it."""


def _through_bitsandbytes(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if "bitsandbytes" in Path(tb.tb_frame.f_code.co_filename).parts:
            return True
        tb = tb.tb_next
    return False


@contextmanager
def quantized_path_errors(lora: LoraParams):
    """Under lora.quantize: nf4, an error raised through bitsandbytes' code (its layers, kernels,
    quantization) ends the stage in one line that names the key and the way out, not a traceback."""
    try:
        yield
    except StudyError:
        raise
    except Exception as e:
        if lora.quantize == "none" or not _through_bitsandbytes(e):
            raise
        from importlib.metadata import version

        detail = (str(e).strip().splitlines() or [""])[0]
        raise QuantizedPathError(
            f"lora.quantize: {lora.quantize}: the 4-bit path failed in bitsandbytes {version('bitsandbytes')} "
            f"({type(e).__name__}: {detail}); train LoRA on the full-precision base with -S lora.quantize=none, "
            "or install the bitsandbytes version requirements.txt pins") from e


def targets(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """The modules whose short name is in `names` (resolved by resolve_targets)."""
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}


def variant(lora: LoraParams) -> str:
    """The method's name as the literature gives it: LoRA, DoRA, rsLoRA, QLoRA, with a named init."""
    name = ("rs" if lora.use_rslora else "") + ("DoRA" if lora.use_dora else "LoRA")
    if lora.quantize == "nf4":
        name = "QLoRA" if name == "LoRA" else f"{name} on a 4-bit base"
    init = lora.init_lora_weights
    if init not in (True, False):
        name += f" ({'PiSSA' if str(init).startswith('pissa') else 'OLoRA' if init == 'olora' else init} init)"
    return name


def reshapes_base(lora: LoraParams) -> bool:
    """PiSSA and OLoRA move part of each wrapped weight into the adapter at init: the adapter is then
    saved converted to plain LoRA on the original base (PEFT's path_initial_model_for_weight_conversion)."""
    return str(lora.init_lora_weights).startswith("pissa") or lora.init_lora_weights == "olora"


def expected_params(model: torch.nn.Module, lora: LoraParams, names: list[str]) -> int:
    """r x (fan_in + fan_out) per wrapped layer, the adapter's A and B matrices; DoRA adds a
    magnitude per output."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for m in targets(model, names).values():
        fan_in, fan_out = (m.weight.shape if isinstance(m, Conv1D) else m.weight.shape[::-1])
        total += lora.r * (fan_in + fan_out) + (fan_out if lora.use_dora else 0)
    return total


def config(lora: LoraParams, names: list[str], fan_in_fan_out: bool):
    """PEFT's LoraConfig for the lora params, its own errors named by the key."""
    from peft import LoraConfig

    from ftstudy.config import ConfigError

    try:
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names,
                          fan_in_fan_out=fan_in_fan_out, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                          init_lora_weights=lora.init_lora_weights, task_type="CAUSAL_LM")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"lora: PEFT refuses these settings: {e}") from None


def _fan_in_fan_out(model: torch.nn.Module, names: list[str]) -> bool:
    """GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear: PEFT must know."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in targets(model, names).values())


def wrap(model: torch.nn.Module, lora: LoraParams, base_name: str, names: list[str] | None = None,
         base_revision: str | None = None):
    """Wrap model with a PEFT adapter built from the lora params (on the layers `names`, resolved
    from lora.target_modules when not given); the adapter names its base and the base's commit."""
    from peft import get_peft_model

    names = names or resolve_targets(model, lora.target_modules)
    with modeling.peft_attribute_note_silenced():
        peft_model = get_peft_model(model, config(lora, names, _fan_in_fan_out(model, names)))
    # The weights come from the local snapshot of model.name; the adapter records model.name itself,
    # so it loads anywhere that base is available (the hub id, for the real study).
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.peft_config["default"].revision = base_revision  # the pinned commit; None for a local folder
    return peft_model


def plan(base_dir: str | Path, lora: LoraParams) -> tuple[list[str], int]:
    """(the layer names to wrap, the trainable count they give), from the weightless skeleton, so
    a bad lora.target_modules or a variant PEFT refuses fails in seconds, before any weight is
    loaded."""
    from ftstudy.config import ConfigError

    skeleton = modeling.skeleton(base_dir)
    names = resolve_targets(skeleton, lora.target_modules)
    fan_in_fan_out = _fan_in_fan_out(skeleton, names)
    config(lora, names, fan_in_fan_out)
    if lora.init_lora_weights == "olora" and fan_in_fan_out:
        raise ConfigError("lora.init_lora_weights: olora builds its factors for nn.Linear layers, and this model's "
                          "wrapped layers are Conv1D (GPT-2's, stored transposed): PEFT's OLoRA then fails on their "
                          "shapes; use pissa, or a family with Linear layers")
    if lora.quantize == "nf4":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("lora.quantize: nf4 needs bitsandbytes; pip install bitsandbytes, or set lora.quantize: none")
        if lora.merge:
            raise ConfigError("lora.merge: merging into a 4-bit base would round the merged weights to 4 bits; set "
                              "lora.merge: false with lora.quantize: nf4 (merge into the full-precision base yourself)")
    return names, expected_params(skeleton, lora, names)


def build(base_dir: str | Path, lora: LoraParams, base_name: str, planned: tuple[list[str], int],
          base_revision: str | None, dtype: str = "fp32", gradient_checkpointing: bool = False):
    """The snapshot (in `dtype`, or 4-bit with lora.quantize) wrapped on the layers `plan` gave,
    its trainable count checked against r x (in + out) (+ DoRA's magnitudes)."""
    names, expected = planned
    base = modeling.load_causal_lm(base_dir, dtype=dtype, quantize=lora.quantize)
    if lora.quantize == "nf4":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap(base, lora, base_name, names, base_revision)
    if lora.quantize == "nf4":
        # bitsandbytes loads GPT-2's Conv1D layers as (transposed) Linear4bit, so PEFT wrapped Linear
        # layers; the saved config describes the adapter on the original base, where evaluate, the
        # cards and users load it (PEFT would otherwise warn there and flip the flag itself).
        model.peft_config["default"].fan_in_fan_out = _fan_in_fan_out(modeling.skeleton(base_dir), names)
    trainable, _ = modeling.count_params(model)
    if trainable != expected:
        raise ModelError(f"{variant(lora)} has {trainable} trainable parameters, but lora.r x (in + out) over the "
                         f"wrapped layers{' plus a magnitude per output' if lora.use_dora else ''} gives {expected}; "
                         "lora.target_modules matched layers PEFT wrapped differently")
    return model


def save(model, folder: Path, lora: LoraParams, initial: Path | None, state_dict: dict | None = None) -> None:
    """The adapter, as plain LoRA on the original base: PiSSA and OLoRA adapters are converted
    against their initial state (`initial`, saved by save_initial before training). `state_dict`:
    the full model's, gathered under FSDP."""
    import warnings

    with modeling.peft_attribute_note_silenced(), warnings.catch_warnings():
        # PEFT advises converting a PiSSA/OLoRA adapter to plain LoRA: that is what this call does.
        warnings.filterwarnings("ignore", message=r"(PiSSA|OLoRA) changes the base weights", category=UserWarning)
        if reshapes_base(lora):
            model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial), state_dict=state_dict)
        else:
            model.save_pretrained(folder, state_dict=state_dict)
    # PEFT writes its empty card template: the study's card comes from the report (ftstudy.report.cards).
    (Path(folder) / "README.md").unlink(missing_ok=True)
    sort_targets(Path(folder) / modeling.ADAPTER_CONFIG)


def sort_targets(config_file: Path) -> None:
    """PEFT keeps target_modules as a set and saves it in the set's order, which changes with
    Python's string hashing from run to run: the same training then saved different bytes. Sorted,
    the same params give the same adapter folder."""
    import json

    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_initial(model, folder: Path, lora: LoraParams) -> None:
    """A PiSSA or OLoRA adapter's state before training, as PEFT's conversion needs it."""
    model.peft_config["default"].init_lora_weights = True  # so that it loads as plain LoRA
    model.save_pretrained(folder)
    model.peft_config["default"].init_lora_weights = lora.init_lora_weights


# The largest per-target NLL difference the integrity check accepts, relative to the largest NLL
# (at least 1 nat), by the weights' dtype (and 16-bit when the run computes under a 16-bit autocast):
# the same operations on the same weights, up to a merge's rounding (bf16 keeps 8 bits of mantissa).
# bf16: 2e-2, since a merge rounded to bf16 reached 1.004e-2 of the largest NLL on the tiny GPT-2 with
# one CPU thread (Intel Xeon, 2026-12-07; 1e-2 failed a sound adapter there); a corrupt or wrongly
# oriented adapter is off by whole nats, far beyond either.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-3}


def nll(model, batch: dict) -> torch.Tensor:
    """Each target's NLL on `batch` (ftstudy.data.batches) through the model's own forward."""
    from ftstudy.loss import position_nll

    mask = batch.get("target_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)
    return position_nll(model, batch["input_ids"], mask, own_forward=True, attention_mask=batch.get("attention_mask"))


@torch.no_grad()
def check(folder: Path, base_dir: Path, lora: LoraParams, dtype: str, batch: dict, reference: torch.Tensor,
          sixteen_bit: bool = False) -> tuple[dict, object]:
    """The saved adapter, loaded on a fresh copy of the base as evaluate loads it (in the training
    dtype and quantization), scores `batch` as the trained model did (`reference`: its per-target
    NLL through the model's own forward); and its merge (merge_and_unload) scores it the same
    again (not for a 4-bit base, which a merge would round). Run under the training's autocast;
    within TOLERANCE. Returns (the largest differences, the merged model or None)."""
    from peft import PeftModel

    device = batch["input_ids"].device
    base = modeling.load_causal_lm(base_dir, dtype=dtype, quantize=lora.quantize)
    if lora.quantize != "nf4":
        base = base.to(device)
    with modeling.peft_attribute_note_silenced():
        reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
    scored = nll(reloaded, batch)
    out, merged = {"reload_max_abs_diff": (scored - reference).abs().max().item()}, None
    if lora.quantize != "nf4":
        try:
            merged = copy.deepcopy(reloaded).merge_and_unload()
            out["merge_max_abs_diff"] = (nll(merged, batch) - scored).abs().max().item()
        except RuntimeError as e:  # shapes that do not fit: the adapter's layout is wrong
            raise ModelError(f"LoRA merge check failed: merging the adapter raised {e}; its shapes do not fit the "
                             "base, so the adapter was saved wrongly (a bug: report it with the variant)") from e
    tolerance = TOLERANCE["bf16" if sixteen_bit else dtype] * max(1.0, reference.abs().max().item())
    for key, what in (("reload_max_abs_diff", "the saved adapter on a fresh base and the trained model"),
                      ("merge_max_abs_diff", "merged and base+adapter")):
        if key in out and not out[key] <= tolerance:  # also catches NaN
            raise ModelError(f"LoRA integrity check failed: {what} score the same tokens {out[key]:.3g} nats apart "
                             f"(tolerance {tolerance:.3g}); the adapter is corrupt, wrongly oriented or wrongly saved")
    return out | {"check_tolerance": tolerance}, merged
