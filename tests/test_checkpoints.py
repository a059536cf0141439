"""Resumable training: the checkpoint key and partial checkpoints."""

import pytest

from conftest import demo_params, prepare_in
from gpt2study import checkpoints
from gpt2study.config import load_params, parse_params


@pytest.fixture
def prepared(project):
    return prepare_in(project, **{"train.epochs": 1})


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
