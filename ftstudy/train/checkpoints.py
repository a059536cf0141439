"""Resumable training: periodic, atomic Accelerate checkpoints outside the DVC outputs.

A run's checkpoints live in <root>/<method>-<key>/step-<n>/, where the key hashes everything that
determines the trained weights and curves (run_identity: the params the loop reads for them, the
prepared data, the base, the training code the loop imports, the process count, precision and
library versions), so a changed run never resumes an old checkpoint, and says which of these differ.
What changes neither (train.log_every, train.checkpoint_every, train.trackers, an edit of the
report's code) keeps the checkpoints; so does the CPU thread count, which a busy machine may lower
between a run and its resume: that changes the last bits of the weights, as any run on another
thread count would, and the info records each segment's threads. Each checkpoint is written to a
temp folder and renamed when complete; partial ones are deleted with a line that says so, never
used. After success the method's checkpoints are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

PROGRESS = "progress.json"


class _SharedTensorNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def _quiet_shared_tensors():
    """save_state stores a tensor shared by several names once and warns each time: GPT-2 ties
    lm_head.weight to the embedding. Harmless: load_state restores the tie (the kill-and-resume
    test ends with identical weights), so the note is dropped rather than printed with every
    checkpoint."""
    log = logging.getLogger("accelerate.utils.other")
    note = _SharedTensorNote()
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        _hash_file(h, path)
    return h.hexdigest()[:16]


# What a part of the identity is called in the line that explains a fresh start.
PARTS = {"params": "params", "data": "prepared data", "base": "base model", "code": "training code",
         "processes": "process count", "precision": "precision", "versions": "library versions"}
# train.* keys that change neither the weights nor the curves: a resume may change them.
NOT_IN_IDENTITY = ("log_every", "checkpoint_every", "trackers")


def training_code(method: str) -> list[Path]:
    """The project files the training loop runs: every module of this package imported so far (the
    loop and what it imports, not the report's, nor the warm start's), and the method's stage."""
    package = Path(__file__).resolve().parents[1]  # ftstudy/, above this train/
    # ftstudy/warm.py starts the process, warm or cold, and is loaded in some runs only.
    loaded = {Path(m.__file__).resolve() for name, m in list(sys.modules.items())
              if name.split(".")[0] == package.name and name != "ftstudy.warm" and getattr(m, "__file__", None)}
    return sorted(loaded) + [package.parent / "stages" / f"train_{method}.py"]


def run_identity(params, method: str, data_dir: str | Path, base_dir: str | Path, setup: dict) -> dict:
    """What determines the trained weights and curves, part by part: the params keys the loop reads
    for them, the prepared data, the base model's snapshot (its config and weights), the training
    code (training_code), and `setup` (process count, precision, library versions). Plain JSON
    values, as a checkpoint stores them."""
    base = sorted(Path(base_dir).glob("*.json")) + sorted(Path(base_dir).glob("*.safetensors"))
    train = {k: v for k, v in asdict(params.train).items() if k not in NOT_IN_IDENTITY}
    identity = {"params": {"seed": params.seed, "model.name": params.model.name, "model.dtype": params.model.dtype,
                           "data.block_size": params.data.block_size,
                           "data.train_on_prompt": params.data.train_on_prompt, "train": train,
                           method: asdict(getattr(params, method))},
                "data": _hash_files(Path(data_dir) / f for f in ("meta.json", "train.bin", "validation.bin")),
                "base": _hash_files(base), "code": _hash_files(training_code(method)), **setup}
    return json.loads(json.dumps(identity, sort_keys=True, default=list))  # tuples become lists, as stored


def run_key(identity: dict) -> str:
    """A short hash of a run's identity: the name of its checkpoint folder."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]


IDENTITY = "identity.json"


def complete(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints: renamed from their temp folder, their progress written."""
    return [d for d in Path(run_dir).glob("step-*") if not d.name.endswith(".tmp") and (d / PROGRESS).is_file()]


class Checkpointer:
    def __init__(self, root: str | Path, method: str, identity: dict, accelerator):
        self.root, self.method, self.acc, self.identity = Path(root), method, accelerator, identity
        self.dir = self.root / f"{method}-{run_key(identity)}"

    def _explain_others(self) -> None:
        """One line per checkpoint of this method that another run wrote, saying what differs."""
        for other in sorted(self.root.glob(f"{self.method}-*")):
            try:
                theirs = json.loads((other / IDENTITY).read_text())
            except (OSError, ValueError):
                continue
            differ = [name for part, name in PARTS.items() if theirs.get(part) != self.identity.get(part)]
            print(f"train_{self.method}: not resuming {other}: it was written with other {', '.join(differ)}; "
                  "starting fresh")

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run; partial ones are deleted. Checkpoints of
        other runs (other params, data, code, setup or versions) are never resumed: a line says why."""
        if not self.dir.is_dir():
            if self.acc.is_main_process:
                self._explain_others()
            return None
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            for partial in sorted(self.dir.glob("*.tmp")):
                shutil.rmtree(partial, ignore_errors=True)
                print(f"train_{self.method}: removed the partial checkpoint {partial} (its run stopped while writing it)")
        self.acc.wait_for_everyone()
        return max(complete(self.dir), key=lambda d: int(d.name.split("-")[1]), default=None)

    def save(self, step: int, progress: dict, folders: dict[str, Path] | None = None) -> None:
        """Checkpoint the training state and `progress`, with a copy of each of `folders` (name ->
        the main process's folder: the live curves, which DVC removes with the stage's outputs
        before a rerun)."""
        tmp = self.dir / f"step-{step}.tmp"
        self.acc.wait_for_everyone()
        with _quiet_shared_tensors():
            self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            for name, folder in (folders or {}).items():
                if Path(folder).is_dir():
                    shutil.copytree(folder, tmp / "folders" / name)
            (tmp / PROGRESS).write_text(json.dumps(progress))
            (self.dir / IDENTITY).write_text(json.dumps(self.identity, sort_keys=True, default=list))
            final = self.dir / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.dir.glob("step-*"):
                if old != final and not old.name.endswith(".tmp"):
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def load(self, path: Path, folders: dict[str, Path] | None = None) -> dict:
        """Restore the training state of checkpoint `path`, and each of `folders` as it was saved."""
        self.acc.load_state(str(path))
        if self.acc.is_main_process:
            for name, folder in (folders or {}).items():
                if (path / "folders" / name).is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                    shutil.copytree(path / "folders" / name, folder)
        self.acc.wait_for_everyone()
        return json.loads((path / PROGRESS).read_text())

    def clear(self) -> None:
        """After success: remove every checkpoint of this method, this run's and stale ones."""
        if self.acc.is_main_process:
            for d in self.root.glob(f"{self.method}-*"):
                shutil.rmtree(d, ignore_errors=True)
