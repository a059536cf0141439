"""The GPU defaults, run on CPU through the real training stages, against fp32 eager: bf16
(Accelerate's CPU autocast) for both methods, torch.compile for both (full with bf16, LoRA in fp32).

For each: the loss curve stays within LOSS_RTOL of fp32 eager's; the saved model reloads with
plain transformers or PEFT and gives the trained model's logits; LoRA's integrity check (reload
and merge; test_lora.py shows it failing on corrupt adapters) passes within the precision's
tolerance. fp16 cannot run on a CPU (test_training.py checks that it is refused there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import no_dropout, params_writer, prepare_at, reset_accelerate, run_main, train_args
from ftstudy import modeling
from ftstudy.data import token_files
from ftstudy.train import lora
from stages import train_full, train_lora

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("precision")

STAGES = {"full": train_full, "lora": train_lora}
# Measured over the whole demo's 53 steps (dropout off): bf16 vs fp32 eager, mean relative gap of
# the loss curve 0.03%, largest 0.1%; compiled fp32 vs eager below 1e-4. The tolerances leave 10x
# room. These tests train on the stage tests' shorter split (conftest.SHORT_WIKI), 13 steps.
LOSS_MEAN_RTOL, LOSS_MAX_RTOL = 0.003, 0.01
VARIANTS = {
    "bf16": {"train.precision": "bf16"},
    "compile": {"train.compile": True},
    "bf16+compile": {"train.precision": "bf16", "train.compile": True},
}


SETTINGS = {"train.epochs": 1, "train.checkpoint_every": 0, "lora.dropout": 0.0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = prepare_at(tmp_path_factory.mktemp("precision"), **SETTINGS)
    # No dropout: compiled code draws its dropout masks from another RNG stream than eager code,
    # so with dropout the curves would differ by the masks, not by the numerics under test.
    no_dropout(root / "pre")
    return root


def _write(root, **overrides):
    return params_writer(root)(**SETTINGS | overrides)


def train(root, method: str, tag: str, monkeypatch, **overrides):
    """Run the stage in-process; return (the trained model object, its loss curve, its metrics)."""
    monkeypatch.chdir(root)
    _write(root, **overrides)
    stage, built = STAGES[method], {}
    original = stage.build
    monkeypatch.setattr(stage, "build", lambda p, base, *planned: built.setdefault("model", original(p, base, *planned)))
    try:
        run_main(stage, *train_args(f"{method}-{tag}"))
    finally:
        reset_accelerate()
    curve = np.loadtxt(root / f"m/plots/{method}-{tag}/train_loss.csv", delimiter=",", skiprows=1)[:, 1]
    from ftstudy.outputs import read_json

    return built["model"], curve, read_json(root / f"m/{method}-{tag}.json")[method] | read_json(
        root / f"m/{method}-{tag}.info.json")


@pytest.fixture(scope="module")
def fp32_curves(workdir):
    mp = pytest.MonkeyPatch()
    try:
        return {m: train(workdir, m, "fp32", mp)[1] for m in STAGES}
    finally:
        mp.undo()


def check_variant(workdir, fp32_curves, method, variant, monkeypatch):
    model, curve, m = train(workdir, method, variant, monkeypatch, **VARIANTS[variant])
    assert m["precision"] == ("bf16" if "bf16" in variant else "fp32")
    assert m["compiled"] is ("compile" in variant)
    gap = np.abs(curve / fp32_curves[method] - 1)
    assert gap.mean() < LOSS_MEAN_RTOL and gap.max() < LOSS_MAX_RTOL, (gap.mean(), gap.max())

    batch = torch.from_numpy(token_files.blocks(token_files.load_tokens(workdir / "prep", "test"), 128)[:2].astype(np.int64))
    saved = modeling.load_for_eval(workdir / f"models/{method}-{variant}", workdir / "pre", _model_name())
    model.eval()
    with torch.no_grad():
        trained_logits, saved_logits = model(input_ids=batch).logits, saved(input_ids=batch).logits
    assert trained_logits.dtype == torch.float32  # the handed-over model runs plain fp32 again
    torch.testing.assert_close(saved_logits, trained_logits, rtol=1e-5, atol=1e-5)

    if method == "lora":  # the stage's integrity check ran, within the tolerance of the run's precision
        assert m["check_tolerance"] >= lora.TOLERANCE["bf16" if "bf16" in variant else "fp32"]
        assert m["reload_max_abs_diff"] <= m["check_tolerance"] and m["merge_max_abs_diff"] <= m["check_tolerance"]


def _model_name() -> str:
    from ftstudy.config import load_params

    return load_params().model.name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_trains_like_fp32_and_saves_a_sound_model(workdir, fp32_curves, method, monkeypatch):
    check_variant(workdir, fp32_curves, method, "bf16", monkeypatch)


# Each method compiled once, and compile with bf16 once: every compile costs a warm-up of its own.
@pytest.mark.slow
@pytest.mark.parametrize("method,variant", [("full", "bf16+compile"), ("lora", "compile")])
def test_compiled_trains_like_eager_and_saves_a_sound_model(workdir, fp32_curves, method, variant, monkeypatch):
    check_variant(workdir, fp32_curves, method, variant, monkeypatch)
