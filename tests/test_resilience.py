"""Nothing lost, nothing silent: guarded numerics, model errors, atomic outputs."""

import pytest
import torch

from conftest import TINY_MODEL, TRAIN_ARGS, demo_params, prepare_in, run_main
from stages import checkpoints, generate, modeling, prepare, train_full, training
from stages.data import DataError
from stages.config import ConfigError, load_params, parse_params

@pytest.fixture
def prepared(project):
    return prepare_in(project, **{"train.epochs": 1})


def test_non_finite_loss_stops_training_and_writes_no_model(prepared, monkeypatch):
    original = train_full.build

    def build(p, base_dir):
        model = original(p, base_dir)
        calls = {"n": 0}

        def poison(module, inputs, output):  # the real model, whose 3rd forward pass yields NaN
            calls["n"] += 1
            if calls["n"] == 3:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(train_full, "build", build)
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 3 \(nan\)"):
        run_main(train_full, *TRAIN_ARGS, "--out", "models/full", "--metrics", "m/full.json", "--plots", "m/plots")
    assert not (prepared / "models/full").exists() and not (prepared / "m/full.json").exists()


def test_oom_advice_keeps_the_global_batch(project):
    project(**{"train.batch_size": 8, "train.grad_accum": 2})
    msg = training.oom_advice(load_params())
    assert "train.batch_size=8, train.grad_accum=2" in msg and "train.batch_size=4, train.grad_accum=4" in msg


def test_block_size_beyond_the_context_is_refused_before_tokenizing(project, tmp_path):
    project(**{"data.block_size": 512})
    with pytest.raises(ConfigError, match=r"data.block_size: 512 exceeds the context of .*tiny-gpt2 \(128 tokens\); set it to at most 128"):
        run_main(prepare, "--out", "prep", "--pretrained", "pre", "--metrics", "m/prepare.json")
    assert not (tmp_path / "prep").exists()


def test_model_folder_without_config_or_weights(tmp_path):
    with pytest.raises(modeling.ModelError, match="no config.json; this is not a save_pretrained folder"):
        modeling.load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(modeling.ModelError, match=r"no weights \(\*.safetensors\); the folder is incomplete"):
        modeling.load_causal_lm(tmp_path)
    with pytest.raises(modeling.ModelError, match="not a directory"):
        modeling.load_causal_lm(tmp_path / "missing")


def test_truncated_safetensors_is_named(prepared):
    weights = prepared / "pre" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(modeling.ModelError, match=r"pre/model.safetensors: truncated or corrupt"):
        modeling.load_causal_lm(prepared / "pre")


def test_adapter_trained_on_another_base_is_refused(prepared):
    import json

    from stages import train_lora

    run_main(train_lora, *TRAIN_ARGS, "--out", "models/lora", "--metrics", "m/lora.json", "--plots", "m/plots")
    p = load_params()
    model = modeling.load_for_eval(prepared / "models/lora", prepared / "pre", p.model.name)
    assert model is not None
    with pytest.raises(modeling.ModelError, match=r"adapter was trained on base '.*tiny-gpt2', but model.name is 'gpt2'; retrain it"):
        modeling.load_for_eval(prepared / "models/lora", prepared / "pre", "gpt2")
    cfg = json.loads((prepared / "models/lora/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == p.model.name


def test_greedy_temperature_zero_and_empty_split(project, tmp_path):
    g = parse_params(demo_params(**{"generate.temperature": 0.0, "generate.max_new_tokens": 8})).generate
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    with torch.no_grad():
        panel, _ = generate.generate(model, modeling.load_tokenizer(TINY_MODEL), g, 0, torch.device("cpu"))
    assert all(p["samples"] == [p["greedy"]] * 2 for p in panel)

    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "validation", "test"):
        (empty / f"{split}.txt").write_text("" if split == "validation" else "word " * 400)
    project(**{"data.name": str(empty)})
    with pytest.raises(DataError, match=r"validation.txt: split 'validation' is empty; give it text"):
        run_main(prepare, "--out", "prep", "--pretrained", "pre", "--metrics", "m/prepare.json")


def test_checkpoint_key_and_partial_checkpoints(prepared):
    from accelerate import Accelerator

    p = load_params()
    key = checkpoints.run_key(p, "full", prepared / "prep", 1, "no")
    assert key == checkpoints.run_key(p, "full", prepared / "prep", 1, "no")
    changed = parse_params(demo_params(**{"train.epochs": 1, "full.lr": 1e-4}))
    assert checkpoints.run_key(changed, "full", prepared / "prep", 1, "no") != key
    assert checkpoints.run_key(p, "full", prepared / "prep", 2, "no") != key

    ckpt = checkpoints.Checkpointer(prepared / "ckpt", "full", key, Accelerator(cpu=True))
    assert ckpt.latest() is None
    (ckpt.dir / "step-30.tmp").mkdir(parents=True)   # killed while saving
    (ckpt.dir / "step-20").mkdir()                   # renamed but never completed
    (ckpt.dir / "step-10").mkdir()
    (ckpt.dir / "step-10" / checkpoints.PROGRESS).write_text("{}")
    assert ckpt.latest() == ckpt.dir / "step-10"
    assert not (ckpt.dir / "step-30.tmp").exists()
    ckpt.clear()
    assert not (prepared / "ckpt").exists() or not any((prepared / "ckpt").iterdir())
