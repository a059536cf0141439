"""The shared loop, run in-process through real Accelerate and PEFT on the tiny assets."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN_ARGS, prepare_in, run_main
from stages import data, modeling, scoring, train_full, train_lora, training
from stages.config import load_params
from stages.outputs import read_json

@pytest.fixture
def prepared(project):
    return prepare_in(project, **{"train.epochs": 2})


def pretrained_val_loss(root) -> float:
    model = modeling.load_causal_lm(root / "pre").eval()
    with torch.no_grad():
        return float(scoring.block_nll(model, data.load_tokens(root / "prep", "validation"), 128, torch.device("cpu")).mean())


def test_full_fine_tuning_lowers_the_loss(prepared):
    run_main(train_full, *TRAIN_ARGS, "--out", "models/full", "--metrics", "m/full.json", "--plots", "m/plots/full")
    m = read_json("m/full.json")
    curve = (prepared / "m/plots/full/train_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) - 1 == m["steps"]
    first, last = float(curve[1].split(",")[1]), float(curve[-1].split(",")[1])
    assert last < first
    assert m["val_loss"] < pretrained_val_loss(prepared)
    assert m["trainable_params"] == m["total_params"] > 0
    assert m["tokens"] == m["steps"] * 8 * 128 and m["peak_mem_kind"] == "cpu_peak_rss"
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (prepared / "models/full" / f).is_file()
    for key in ("train_time_s", "tokens_per_s", "peak_mem_gib", "final_train_loss", "device", "artifact_mb"):
        assert key in m


def test_lora_trains_only_the_adapter(prepared, monkeypatch):
    built, original = {}, train_lora.build

    def build(p, base_dir):
        built["model"] = original(p, base_dir)
        return built["model"]

    monkeypatch.setattr(train_lora, "build", build)
    run_main(train_lora, *TRAIN_ARGS, "--out", "models/lora", "--metrics", "m/lora.json", "--plots", "m/plots/lora")
    m = read_json("m/lora.json")
    # c_attn in each of the 2 layers: in 64, out 3 x 64.
    assert m["trainable_params"] == 8 * (64 + 192) * 2
    assert m["val_loss"] < pretrained_val_loss(prepared)

    base = load_file(prepared / "pre" / "model.safetensors")
    state = built["model"].state_dict()
    for name, tensor in base.items():
        peft_name = "base_model.model." + name.replace("c_attn.weight", "c_attn.base_layer.weight").replace("c_attn.bias", "c_attn.base_layer.bias")
        if peft_name in state:
            assert torch.equal(state[peft_name], tensor), name
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in state.items())

    files = {f.name for f in (prepared / "models/lora").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    cfg = json.loads((prepared / "models/lora/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].endswith("tiny-gpt2") and cfg["fan_in_fan_out"] is True


def test_lora_target_that_matches_nothing_lists_valid_names(prepared):
    p = modeling.load_causal_lm(prepared / "pre")
    lora = type("L", (), {"target_modules": ("c_attn", "q_proj"), "r": 8, "alpha": 16.0, "dropout": 0.0})
    with pytest.raises(modeling.ModelError, match=r"lora.target_modules: 'q_proj' match no layer of this model; valid names: c_attn, c_fc, c_proj, lm_head"):
        modeling.wrap_lora(p, lora, "x")


def test_epoch_order_is_a_seeded_permutation():
    a, b = training.epoch_order(100, 42, 0), training.epoch_order(100, 42, 1)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, training.epoch_order(100, 42, 0)) and not np.array_equal(a, b)


def test_schedule_errors_name_the_keys(project):
    from stages.config import ConfigError, load_params

    project(**{"train.warmup_steps": 1000})
    with pytest.raises(ConfigError, match="train.warmup_steps: 1000 is not shorter than training"):
        training.check_schedule(load_params(), 100, 1)
    with pytest.raises(ConfigError, match="only 5 blocks"):
        training.check_schedule(load_params(), 5, 1)


def test_mfu_inputs():
    from transformers import GPT2Config

    from stages import hardware

    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("NVIDIA A10G") == 70e12 and hardware.peak_flops("NVIDIA A10") == 125e12
    assert hardware.peak_flops("cpu (x86_64, 2 threads)") is None
    # GPT-2 124M at 1024 context: about 855 MFLOP per trained token, the figure.
    assert hardware.flops_per_token(GPT2Config(), 124_439_808, 1024, full=True) == pytest.approx(855e6, rel=0.01)
    assert hardware.resolve_precision("fp32") == "no" and hardware.resolve_precision("auto") == "no"  # no GPU here


def test_lora_merge_exports_a_plain_transformers_model(project):
    from transformers import AutoModelForCausalLM

    root = prepare_in(project, **{"train.epochs": 1, "lora.merge": True})
    run_main(train_lora, *TRAIN_ARGS, "--out", "models/lora", "--metrics", "m/lora.json", "--plots", "m/plots/lora")
    merged = AutoModelForCausalLM.from_pretrained(root / "models/lora/merged").eval()
    p = load_params()
    adapted = modeling.load_for_eval(root / "models/lora", root / "pre", p.model.name)
    batch = torch.from_numpy(data.blocks(data.load_tokens(root / "prep", "test"), 128)[:2].astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=batch).logits, adapted(input_ids=batch).logits, atol=1e-4)
    m = read_json(root / "m/lora.json")
    assert m["merge_max_abs_diff"] < 1e-4 and m["lora_expected_trainable"] == m["trainable_params"]
    assert (root / "models/lora/merged/model.safetensors").is_file()
