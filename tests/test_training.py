"""The shared loop, run in-process through real Accelerate and PEFT on the tiny assets."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import prepare_in, run_main, train_args
from ftstudy import modeling, runtime
from ftstudy.config import ConfigError, load_params
from ftstudy.data import token_files
from ftstudy.measure import scoring
from ftstudy.outputs import read_json
from ftstudy.train import loop, session
from stages import train_full, train_lora


# The stage tests' training split (conftest.SHORT_WIKI): 13,677 tokens, 106 blocks of 128, 13 steps of 8
# blocks an epoch.
STEPS = 13


@pytest.fixture
def prepared(project):
    return prepare_in(project, **{"train.epochs": 2})


def pretrained_val_loss(root) -> float:
    model = modeling.load_causal_lm(root / "pre").eval()
    with torch.no_grad():
        return float(scoring.block_nll(model, token_files.load_tokens(root / "prep", "validation"), 128, torch.device("cpu")).mean())


def test_full_fine_tuning_lowers_the_loss_and_writes_its_outputs(prepared, capfd):
    capfd.readouterr()
    run_main(train_full, *train_args("full"))
    out, err = capfd.readouterr()
    # Not a terminal (a log, CI): no progress bars, a line per epoch and the summary line.
    assert "step/s" not in out + err and "%|" not in out + err
    assert out.splitlines()[-1].startswith(f"train_full: {2 * STEPS} steps, 26,624 tokens in ")
    m, info = read_json("m/full.json")["full"], read_json("m/full.info.json")
    curve = (prepared / "m/plots/full/train_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) - 1 == info["steps"] == 2 * STEPS
    assert float(curve[-1].split(",")[1]) < float(curve[1].split(",")[1])
    assert m["val_loss"] < pretrained_val_loss(prepared)
    assert m["trainable_params"] == info["total_params"] == 173_824
    assert info["tokens"] == info["steps"] * 8 * 128 and info["peak_mem_kind"] == "cpu_peak_rss"
    assert info["precision"] == "fp32" and info["compiled"] is False and info["processes"] == 1
    assert all(isinstance(v, (int, float)) for v in m.values()), "metrics hold numbers only"
    assert sorted(f.name for f in (prepared / "models/full").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # The live curves (DVCLive, the default tracker): every step's loss, and the latest values.
    live = prepared / "m/live/full"
    steps = [int(line.split("\t")[0]) for line in (live / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(1, info["steps"] + 1))
    summary = read_json(live / "metrics.json")
    assert summary["step"] == info["steps"] and summary["val"]["loss"] == pytest.approx(m["val_loss"])
    assert not (live / "dvc.yaml").exists()  # dvc.yaml declares the folder; DVCLive writes none of its own


def test_no_trackers_leave_the_live_folder_empty(project):
    root = prepare_in(project, **{"train.epochs": 1, "train.trackers": []})
    run_main(train_full, *train_args("full"))
    assert (root / "m/live/full").is_dir() and not any((root / "m/live/full").iterdir())


def test_live_steps_reread_no_curve_when_studio_is_not_configured(tmp_path, monkeypatch):
    # DVCLive 3.49 rebuilds Studio's payload (params and every curve so far) at every step, Studio or
    # not, so a long run's steps got slower and slower; LiveTracker skips it without Studio.
    import dvclive.live

    from ftstudy.train.tracking import LiveTracker

    monkeypatch.setattr(dvclive.live, "get_dvc_studio_config", lambda live: {})  # whatever `dvc studio login` did

    def reread(live):
        raise AssertionError("a step reread the curves")

    monkeypatch.setattr(dvclive.live, "parse_metrics", reread)
    tracker = LiveTracker(tmp_path / "live")
    tracker.start()
    for step in (1, 2, 3):
        tracker.log({"train/loss": 1 / step}, step=step)
    assert read_json(tmp_path / "live/metrics.json")["train"]["loss"] == pytest.approx(1 / 3)


def test_the_schedule_is_transformers_warmup_linear():
    from transformers import get_linear_schedule_with_warmup

    for warmup, total in ((0, 7), (3, 10), (10, 11)):
        ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
        ours = torch.optim.lr_scheduler.LambdaLR(ours, lambda step: session.warmup_linear(warmup, total, step))
        theirs = get_linear_schedule_with_warmup(theirs, warmup, total)
        for _ in range(total + 2):
            assert ours.get_last_lr() == theirs.get_last_lr()
            for scheduler in (ours, theirs):
                scheduler.optimizer.step()
                scheduler.step()


def test_lora_trains_only_the_adapter(prepared, monkeypatch):
    built, original = {}, train_lora.build

    def build(p, base_dir, *planned):
        built["model"] = original(p, base_dir, *planned)
        return built["model"]

    monkeypatch.setattr(train_lora, "build", build)
    run_main(train_lora, *train_args("lora"))
    m = read_json("m/lora.json")["lora"]
    # Every linear layer of each of the 2 layers: c_attn (in 64, out 3 x 64), attention's c_proj
    # (64, 64), the MLP's c_fc (64, 4 x 64) and c_proj (4 x 64, 64).
    assert m["trainable_params"] == 8 * ((64 + 192) + (64 + 64) + 2 * (64 + 256)) * 2
    assert m["val_loss"] < pretrained_val_loss(prepared)
    assert 0 <= m["merge_max_abs_diff"] < 1e-4

    base = load_file(prepared / "pre" / "model.safetensors")
    state = built["model"].state_dict()
    for name, tensor in base.items():
        peft_name = "base_model.model." + re.sub(r"(c_attn|c_fc|c_proj)\.(weight|bias)$", r"\1.base_layer.\2", name)
        if peft_name in state:
            assert torch.equal(state[peft_name], tensor), name
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in state.items())

    files = {f.name for f in (prepared / "models/lora").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    cfg = json.loads((prepared / "models/lora/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].endswith("tiny-gpt2") and cfg["fan_in_fan_out"] is True


def test_epoch_order_is_a_seeded_permutation():
    a, b = loop.epoch_order(100, 42, 0), loop.epoch_order(100, 42, 1)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, loop.epoch_order(100, 42, 0)) and not np.array_equal(a, b)


@pytest.mark.parametrize("micro_batch,grad_accum,world", [(4, 1, 1), (2, 3, 1), (4, 1, 2), (2, 2, 3)])
def test_micro_batch_slices_cover_each_step_once(micro_batch, grad_accum, world):
    global_batch = micro_batch * grad_accum * world
    for step in range(3):
        read = [i for micro in range(grad_accum) for rank in range(world)
                for i in range(*loop.micro_batch_slice(step, micro, micro_batch, grad_accum, world, rank)
                               .indices(10**6))]
        assert sorted(read) == list(range(step * global_batch, (step + 1) * global_batch))
    # Two processes at half the micro-batch read, together, what one process reads alone.
    one = loop.micro_batch_slice(1, 0, 8, 1, 1, 0)
    halves = [loop.micro_batch_slice(1, 0, 4, 1, 2, r) for r in (0, 1)]
    assert (halves[0].start, halves[1].stop) == (one.start, one.stop) and halves[0].stop == halves[1].start


def test_step_losses_flush_in_order_and_name_the_first_non_finite_step():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    losses = loop.StepLosses(3, torch.device("cpu"))
    for v in (1.0, 2.0, 3.0):
        losses.add(torch.tensor(v))
    assert losses.full() and losses.flush(13, acc) == [(11, 1.0), (12, 2.0), (13, 3.0)]
    assert losses.pending == 0
    losses.add(torch.tensor(0.5))
    losses.add(torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 15 \(inf\)"):
        losses.flush(15, acc)


def test_schedule_errors_name_the_keys(project):
    project(**{"train.warmup_steps": 1000})
    train = load_params().train
    with pytest.raises(ConfigError, match="train.warmup_steps: 1000 is not shorter than training"):
        session.check_schedule(train, 128, 100, 1)
    with pytest.raises(ConfigError, match="only 5 blocks of data.block_size=128"):
        session.check_schedule(train, 128, 5, 1)


def test_oom_advice_keeps_the_global_batch(project):
    project(**{"train.batch_size": 8, "train.grad_accum": 2})
    msg = loop.oom_advice(load_params().train)
    assert "train.batch_size=8, train.grad_accum=2" in msg and "train.batch_size=4, train.grad_accum=4" in msg


# The names CUDA reports (torch.cuda.get_device_name) for the GPUs whose peaks must be told apart.
GPU_PEAKS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
             "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
             "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12,
             "NVIDIA A10G": 70e12, "NVIDIA A10": 125e12, "NVIDIA GeForce RTX 4090": 165e12,
             "Tesla V100-SXM2-16GB": 125e12, "Tesla T4": 65e12,
             "NVIDIA GeForce RTX 3090": None, "NVIDIA B200": None, "cpu (x86_64, 2 threads)": None}


@pytest.mark.parametrize("name", list(GPU_PEAKS))
def test_gpu_peaks_tell_every_listed_card_apart(name):
    assert runtime.peak_flops(name) == GPU_PEAKS[name]


def test_flops_count_the_head_once_and_no_embedding_table(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from ftstudy.synthetic import write_tiny_model

    # Tied GPT-2: N is every parameter but the position table; 6N + attention for full fine-tuning.
    tied = modeling.load_causal_lm(write_tiny_model("gpt2", tmp_path / "gpt2"))
    n_all = sum(q.numel() for q in tied.parameters())
    n = n_all - tied.transformer.wpe.weight.numel()
    assert runtime.matmul_params(tied) == (n, n)
    config = GPT2Config(n_layer=2, n_embd=64)
    assert runtime.flops_per_token(config, n, n, 128) == 6 * n + 12 * 2 * 64 * 128
    # Untied Llama: the input table is left out, the head counted as it is.
    model = AutoModelForCausalLM.from_pretrained(write_tiny_model("llama", tmp_path / "llama", tie=False))
    table = model.get_input_embeddings().weight.numel()
    assert runtime.matmul_params(model)[0] == sum(q.numel() for q in model.parameters()) - table


def test_precision_choice():
    assert runtime.resolve_precision("fp32") == "no" and runtime.resolve_precision("bf16") == "bf16"
    on_gpu = torch.cuda.is_available()
    expected_auto = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "no"
    assert runtime.resolve_precision("auto") == expected_auto


def test_non_finite_loss_stops_training_and_writes_no_model(project, monkeypatch):
    root = prepare_in(project, **{"train.epochs": 1})
    original = train_full.build

    def build(*args):
        model = original(*args)
        calls = {"n": 0}

        def poison(module, inputs, output):  # the real transformer, whose 3rd training forward pass yields NaN
            calls["n"] += module.training  # (the scoring check before training runs in eval mode)
            if calls["n"] == 3:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        model.transformer.register_forward_hook(poison)  # under the model's head and the loss
        return model

    monkeypatch.setattr(train_full, "build", build)
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 3 \(nan\)"):
        run_main(train_full, *train_args("full"))
    assert not (root / "models/full").exists() and not (root / "m/full.json").exists()


def test_fp16_on_a_cpu_is_refused_naming_the_key(project):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine's GPU")
    prepare_in(project, **{"train.epochs": 1, "train.precision": "fp16"})
    with pytest.raises(ConfigError, match=r"train.precision: fp16 needs a CUDA GPU .*use bf16 or fp32"):
        run_main(train_full, *train_args("full"))


def test_lora_merge_exports_a_plain_transformers_model(project):
    from transformers import AutoModelForCausalLM

    root = prepare_in(project, **{"train.epochs": 1, "lora.merge": True})
    run_main(train_lora, *train_args("lora"))
    merged = AutoModelForCausalLM.from_pretrained(root / "models/lora/merged").eval()
    adapted = modeling.load_for_eval(root / "models/lora", root / "pre", load_params().model.name)
    batch = torch.from_numpy(token_files.blocks(token_files.load_tokens(root / "prep", "test"), 128)[:2].astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=batch).logits, adapted(input_ids=batch).logits, atol=1e-4)
    m = read_json(root / "m/lora.json")["lora"]
    assert m["merge_max_abs_diff"] < 1e-4
    assert (root / "models/lora/merged/model.safetensors").is_file()
    # The adapter's artifact is the adapter folder alone; the merged model is counted apart.
    adapter_files = [f for f in (root / "models/lora").iterdir() if f.is_file()]
    assert m["artifact_mb"] == pytest.approx(sum(f.stat().st_size for f in adapter_files) / 2**20, abs=1e-3)
    assert m["merged_mb"] == pytest.approx(modeling.dir_size_mb(root / "models/lora/merged"), abs=1e-3)
    assert m["merged_mb"] > 5 * m["artifact_mb"]  # a full model vs an adapter (and the same tokenizer)


def test_a_tracker_that_is_not_installed_is_refused_naming_the_key(project):
    prepare_in(project, **{"train.epochs": 1, "train.trackers": ["dvclive", "aim"]})
    with pytest.raises(ConfigError, match=r"^train.trackers: aim is not installed; install it \(pip install aim\)"):
        run_main(train_full, *train_args("full"))


def _train(project, stage, method: str, tag: str, monkeypatch=None, **overrides) -> tuple[list[float], dict]:
    """Train `method` with demo params and `overrides` (on the prepared prep/ and pre/); (the
    curve's losses, the metrics)."""
    from conftest import reset_accelerate

    project(**{"train.epochs": 1, "lora.dropout": 0.0} | overrides)
    run_main(stage, *train_args(tag))
    reset_accelerate()
    curve = [float(line.split(",")[1]) for line in (Path(f"m/plots/{tag}/train_loss.csv")).read_text().splitlines()[1:]]
    return curve, read_json(f"m/{tag}.json")[method]


@pytest.fixture
def no_dropout_prepared(project):
    from conftest import no_dropout

    root = prepare_in(project, **{"train.epochs": 1})
    no_dropout(root / "pre")
    return root


@pytest.mark.parametrize("method", ["full", "lora"])
def test_grad_accum_equals_the_larger_batch(no_dropout_prepared, project, method):
    stage = train_full if method == "full" else train_lora
    one, m_one = _train(project, stage, method, f"{method}-b8", **{"train.batch_size": 8, "train.grad_accum": 1})
    two, m_two = _train(project, stage, method, f"{method}-b4x2", **{"train.batch_size": 4, "train.grad_accum": 2})
    assert read_json(f"m/{method}-b4x2.info.json")["global_batch"] == 8 and len(one) == len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-5)
    assert m_two["val_loss"] == pytest.approx(m_one["val_loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_recomputes_and_trains_to_the_same_loss(no_dropout_prepared, project, method,
                                                                       monkeypatch):
    stage = train_full if method == "full" else train_lora
    calls = {"n": 0}
    original = stage.build

    def build(*args):
        model = original(*args)
        # A layer inside GPT-2's first block, whose forward the backward pass reruns when
        # checkpointing (torch's recompute skips module hooks: the forward itself is counted).
        layer = next(m for name, m in model.named_modules() if name.endswith(".h.0.mlp.c_fc"))
        forward = layer.forward

        def counted(*a, **kw):
            calls["n"] += 1
            return forward(*a, **kw)

        layer.forward = counted
        return model

    monkeypatch.setattr(stage, "build", build)
    plain, m_plain = _train(project, stage, method, f"{method}-plain")
    forwards = calls["n"]
    calls["n"] = 0
    ckpt, m_ckpt = _train(project, stage, method, f"{method}-ckpt", **{"train.gradient_checkpointing": True})
    # Each training micro-batch runs the block a second time in the backward pass; validation does not.
    validation = forwards - STEPS
    assert calls["n"] - validation == 2 * STEPS, (forwards, calls["n"])
    assert ckpt == pytest.approx(plain, rel=1e-5)
    assert m_ckpt["val_loss"] == pytest.approx(m_plain["val_loss"], rel=1e-5)


def test_validation_in_proportion_scores_one_seeded_sample_sized_by_the_budget():
    """Validation during training costs at most about train.eval_budget of the training between two
    passes: a sample of as many units as fit (at least 20), the same every pass; all where they fit."""
    # 10 steps x 8 blocks x 128 tokens between passes; a quarter of that, at a third the cost a token.
    picked = session.validation_units(84, 128, 10 * 8 * 128, 0.25, seed=42)
    assert len(picked) == 60 and list(picked) == sorted(set(picked))
    assert list(session.validation_units(84, 128, 10 * 8 * 128, 0.25, seed=42)) == list(picked)
    assert len(session.validation_units(84, 128, 10 * 8 * 128, 0.0, seed=42)) == 84  # 0: the whole split
    assert len(session.validation_units(84, 128, 100 * 8 * 128, 0.25, seed=42)) == 84  # it all fits
    assert len(session.validation_units(5000, 1024, 8 * 1024, 0.25, seed=42)) == 20  # at least 20


def test_a_run_records_how_many_validation_units_each_pass_scored(project):
    prepare_in(project, **{"train.epochs": 1, "train.eval_every": 5})
    run_main(train_full, *train_args("full"))
    info = read_json("m/full.info.json")
    # 5 steps x 8 blocks x 128 tokens between passes: 0.25 x 3 x 5,120 tokens = 30 blocks of the 84.
    assert (info["val_units_scored"], info["val_units"]) == (30, 84)
