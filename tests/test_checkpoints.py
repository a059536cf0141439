"""Resumable training: the checkpoint key and partial checkpoints."""

import json
import shutil

import pytest

from conftest import demo_params, prepare_in
from ftstudy.config import load_params, parse_params
from ftstudy.train import checkpoints


@pytest.fixture
def prepared(project):
    return prepare_in(project, **{"train.epochs": 1})


def test_checkpoint_key_and_partial_checkpoints(prepared, capsys):
    from accelerate import Accelerator

    p = load_params()
    setup = {"processes": 1, "precision": "no", "versions": {"torch": "2.13.0", "peft": "0.21.2"}}

    def key_of(params=p, **other):
        return checkpoints.run_key(checkpoints.run_identity(params, "full", prepared / "prep", prepared / "pre",
                                                            setup | other))

    identity = checkpoints.run_identity(p, "full", prepared / "prep", prepared / "pre", setup)
    key = checkpoints.run_key(identity)
    assert key == key_of()
    assert key_of(parse_params(demo_params(**{"train.epochs": 1, "full.lr": 1e-4}))) != key
    # Keys that change neither the weights nor the curves keep the checkpoints.
    for same in ({"train.log_every": 3}, {"train.checkpoint_every": 7}, {"train.trackers": []}):
        assert key_of(parse_params(demo_params(**{"train.epochs": 1} | same))) == key, same
    assert key_of(parse_params(demo_params(**{"train.epochs": 1, "train.eval_every": 3}))) != key
    # Another process count, precision or library version writes other weights: never resumed.
    for other in ({"processes": 2}, {"precision": "bf16"}, {"versions": {"torch": "2.13.0", "peft": "0.22.0"}}):
        assert key_of(**other) != key, other
    # So does another base model: the snapshot's weights are part of the identity.
    (prepared / "pre" / "config.json").write_text((prepared / "pre" / "config.json").read_text() + " ")
    assert key_of() != key

    ckpt = checkpoints.Checkpointer(prepared / "ckpt", "full", identity, Accelerator(cpu=True))
    assert ckpt.latest() is None
    # Killed after writing its progress, before the rename: partial, removed with a line that says so.
    (ckpt.dir / "step-10.tmp").mkdir(parents=True)
    (ckpt.dir / "step-10.tmp" / checkpoints.PROGRESS).write_text("{}")
    assert checkpoints.complete(ckpt.dir) == []
    capsys.readouterr()
    assert ckpt.latest() is None
    assert capsys.readouterr().out.strip() == (f"train_full: removed the partial checkpoint {ckpt.dir / 'step-10.tmp'} "
                                               "(its run stopped while writing it)")
    (ckpt.dir / "step-30.tmp").mkdir(parents=True)   # killed while saving
    (ckpt.dir / "step-20").mkdir()                   # renamed but never completed
    (ckpt.dir / "step-10").mkdir()
    (ckpt.dir / "step-10" / checkpoints.PROGRESS).write_text("{}")
    assert checkpoints.complete(ckpt.dir) == [ckpt.dir / "step-10"]
    assert ckpt.latest() == ckpt.dir / "step-10"
    assert not (ckpt.dir / "step-30.tmp").exists()
    ckpt.clear()
    assert not (prepared / "ckpt").exists() or not any((prepared / "ckpt").iterdir())


def test_a_checkpoint_of_other_versions_or_code_is_not_resumed_and_says_why(prepared, capsys):
    from accelerate import Accelerator

    p, acc = load_params(), Accelerator(cpu=True)
    setup = {"processes": 1, "precision": "no", "versions": {"torch": "2.13.0", "peft": "0.21.2"}}
    ours = checkpoints.run_identity(p, "full", prepared / "prep", prepared / "pre", setup)
    for theirs, why in ((ours | {"versions": {"torch": "2.13.0", "peft": "0.20.0"}}, "library versions"),
                        (ours | {"code": "0123456789abcdef"}, "training code")):
        old = checkpoints.Checkpointer(prepared / "ckpt", "full", theirs, acc)
        (old.dir / "step-10").mkdir(parents=True)
        (old.dir / "step-10" / checkpoints.PROGRESS).write_text("{}")
        (old.dir / checkpoints.IDENTITY).write_text(json.dumps(theirs))
        assert checkpoints.Checkpointer(prepared / "ckpt", "full", ours, acc).latest() is None
        line = capsys.readouterr().out.strip()
        assert line == f"train_full: not resuming {old.dir}: it was written with other {why}; starting fresh"
        old.clear()


def test_the_training_code_is_what_the_loop_imports():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; from stages import train_lora; from ftstudy.train import checkpoints; "
            "print('\\n'.join(p.name for p in checkpoints.training_code('lora')))")
    names = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert {"training.py", "session.py", "loop.py", "finish.py", "loss.py", "lora.py", "token_files.py", "train_lora.py"} <= set(names)
    assert not {"reporting.py", "findings.py", "generation.py", "hub.py"} & set(names)  # their edits keep checkpoints


def test_a_checkpoint_keeps_the_live_curves_that_dvc_removes_before_a_rerun(tmp_path):
    from accelerate import Accelerator

    live = tmp_path / "live"
    (live / "plots").mkdir(parents=True)
    (live / "plots" / "loss.tsv").write_text("step\tloss\n1\t2.5\n")
    ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", "full", {"params": {}}, Accelerator(cpu=True))
    ckpt.save(1, {"step": 1}, {"live": live})
    (live / "plots" / "loss.tsv").write_text("step\tloss\n1\t2.5\n2\t2.4\n")  # logged after the checkpoint
    shutil.rmtree(live)  # DVC removes the stage's outputs before it reruns
    assert ckpt.load(ckpt.latest(), {"live": live}) == {"step": 1}
    assert (live / "plots" / "loss.tsv").read_text() == "step\tloss\n1\t2.5\n"
