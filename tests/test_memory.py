"""The memory plan: its parts for known shapes, and the refusal of a plan the GPU cannot hold,
before any weight loads. (How close it comes to measured peaks: tests/test_real_shapes.py.)"""

import pytest
import torch

from conftest import prepare_in, run_main, train_args
from ftstudy.config import ConfigError
from ftstudy.train import memory
from stages import train_full, train_lora

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("memory")

GiB = 2**30


@pytest.fixture(scope="module")
def gpt2_124m():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


def plan(skeleton, **kw):
    args = dict(method="full", dtype="fp32", quantize="none", trainable=124_439_808, batch=8, block=1024,
                precision="bf16", checkpointing=False, loss="chunked", device="cuda")
    return memory.plan(skeleton, **(args | kw))


def test_the_parts_for_gpt2_124m(gpt2_124m):
    full = plan(gpt2_124m)
    assert full.weights == full.gradients == 124_439_808 * 4 and full.optimizer == 2 * full.weights
    # 12 layers x 34·s·b·h bytes at 16 bits: GPU kernels keep no attention probabilities.
    assert full.activations == 12 * 34 * 1024 * 8 * 768
    assert full.logits == 2 * 4 * 2**25 + 4 * 8 * 1024 * 768 and full.process == 0
    # Gradient checkpointing keeps each layer's input and one layer's activations.
    ckpt = plan(gpt2_124m, checkpointing=True)
    assert ckpt.activations == 12 * 2 * 1024 * 8 * 768 + 34 * 1024 * 8 * 768 < full.activations / 5
    # LoRA: no gradients or optimizer state for the base; the integrity check's copies come after training.
    lora = plan(gpt2_124m, method="lora", trainable=294_912)
    assert lora.gradients == 294_912 * 4 and lora.check == 2 * lora.weights
    assert lora.total < full.total - full.optimizer
    # A 4-bit base: about an eighth of the fp32 matrices.
    q = plan(gpt2_124m, method="lora", trainable=294_912, quantize="nf4", dtype="bf16")
    assert q.weights < lora.weights / 3
    # The model's own loss keeps the whole batch's logits: 8 x 1,024 x 50,257 of them, three times over.
    assert plan(gpt2_124m, loss="model").logits == 8 * 1024 * 50257 * (2 + 4 + 4)
    # On a CPU under attention dropout, attention keeps its probabilities: 5·a·s²·b more per layer.
    cpu = plan(gpt2_124m, device="cpu", precision="no")
    assert cpu.activations == 12 * 2 * (34 * 1024 * 8 * 768 + 5 * 12 * 1024**2 * 8)


def test_a_plan_the_gpu_cannot_hold_is_refused_with_the_ways_out(gpt2_124m):
    p = plan(gpt2_124m)
    memory.refuse_if_too_big(p, 80 * GiB, "full")  # an H100 holds it
    with pytest.raises(ConfigError, match=r"^memory: this run needs about .*\), and the GPU holds 4.0 GiB; ways out: "
                                          r"LoRA \(stage train_lora\) instead of full fine-tuning; lower train.batch_size"):
        memory.refuse_if_too_big(p, 4 * GiB, "full")


@pytest.mark.parametrize("stage", [train_full, train_lora], ids=["full", "lora"])
def test_an_impossible_plan_stops_the_stage_before_any_weight_loads(project, monkeypatch, stage, capsys):
    prepare_in(project, **{"train.epochs": 1})
    monkeypatch.setattr(memory, "capacity", lambda device: 1024.0)  # a GPU of 1 KiB
    loaded = []
    original = stage.build
    monkeypatch.setattr(stage, "build", lambda *args: loaded.append(1) or original(*args))
    with pytest.raises(ConfigError, match=r"^memory: this run needs about .* and the GPU holds 0.0 GiB"):
        run_main(stage, *train_args("m"))
    assert loaded == [] and "memory plan: " in capsys.readouterr().out


def test_on_a_cpu_the_process_part_is_measured_not_assumed(gpt2_124m):
    """A stage's own resident memory before any weight loads (what it imported: PEFT and bitsandbytes
    add to LoRA's) is measured; the assumed 0.45 GiB once put full fine-tuning's plan at 0.48 GiB
    against a 0.73 GiB peak."""
    from conftest import demo_params
    from ftstudy.config import parse_params

    p = parse_params(demo_params())
    cpu = memory.for_stage(gpt2_124m, p, "full", 124_439_808, "fp32", "no", "cpu")
    now = memory.resident()
    assert now is not None and abs(cpu.process - now) < 0.05 * now
    assert memory.for_stage(gpt2_124m, p, "full", 124_439_808, "fp32", "bf16", "cuda").process == 0.0
