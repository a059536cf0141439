"""LoRA through real PEFT: target matching, and the merge check on sound and corrupted adapters."""

import copy

import pytest
import torch

from conftest import TINY_MODEL, demo_params
from ftstudy import lora, modeling
from ftstudy.config import parse_params


def test_lora_target_that_matches_nothing_lists_valid_names():
    model = modeling.load_causal_lm(TINY_MODEL)
    params = parse_params(demo_params(**{"lora.target_modules": ["c_attn", "q_proj"]})).lora
    with pytest.raises(modeling.ModelError, match=r"lora.target_modules: 'q_proj' matches no layer of this model; "
                                                  r"valid names: c_attn, c_fc, c_proj, lm_head. Set them with "
                                                  r"-S 'lora.target_modules=\[c_attn\]', or use auto"):
        lora.wrap(model, params, "x")


def test_auto_and_all_linear_resolve_to_layer_names():
    model = modeling.load_causal_lm(TINY_MODEL)
    assert lora.resolve_targets(model, "auto") == ["c_attn"]  # PEFT's GPT-2 default
    assert lora.resolve_targets(model, "all-linear") == ["c_attn", "c_fc", "c_proj"]  # not the output layer


def test_expected_count_for_gpt2_c_attn_at_r8():
    from transformers import GPT2Config

    with torch.device("meta"):
        from transformers import GPT2LMHeadModel

        skeleton = GPT2LMHeadModel(GPT2Config())
    params = parse_params(demo_params()).lora
    assert params.r == 8 and lora.resolve_targets(skeleton, params.target_modules) == ["c_attn"]
    assert lora.expected_params(skeleton, 8, ["c_attn"]) == 294_912  # 12 layers x 8 x (768 + 2304)


@pytest.fixture
def lora_model():
    p = parse_params(demo_params(**{"lora.target_modules": ["c_proj"], "lora.dropout": 0.0}))
    model = lora.wrap(modeling.load_causal_lm(TINY_MODEL), p.lora, str(TINY_MODEL))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as after training: a non-zero update
            param.data.normal_(0, 0.2)
    return model, torch.randint(0, 1000, (2, 32))


def test_merge_check_passes_for_a_sound_adapter(lora_model):
    model, batch = lora_model
    model.eval()
    diff, merged = lora.merge_check(model, batch)
    assert diff < 1e-4
    assert torch.allclose(merged(input_ids=batch).logits, model(input_ids=batch).logits, atol=1e-4)


def test_merge_check_fails_on_a_corrupted_adapter(lora_model):
    model, batch = lora_model
    broken = copy.deepcopy(model)
    for module in broken.modules():  # a layout flag lost: GPT-2's Conv1D treated as nn.Linear
        if hasattr(module, "fan_in_fan_out"):
            module.fan_in_fan_out = False
    with pytest.raises(modeling.ModelError, match="LoRA merge check failed"):
        lora.merge_check(broken, batch)
    nan = copy.deepcopy(model)
    next(p for n, p in nan.named_parameters() if "lora_A" in n).data[0, 0] = float("nan")
    with pytest.raises(modeling.ModelError, match="LoRA merge check failed: merged and base\\+adapter logits differ by nan"):
        lora.merge_check(nan, batch)
