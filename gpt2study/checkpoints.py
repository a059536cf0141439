"""Resumable training: periodic, atomic Accelerate checkpoints outside the DVC outputs.

A run's checkpoints live in <root>/<method>-<key>/step-<n>/, where the key hashes everything that
determines the run (params, the prepared data, the code, the process count and precision), so
changed params never resume from an old checkpoint. Each checkpoint is written to a temp folder
and renamed when complete; partial ones are deleted, never used. After success the method's
checkpoints are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

PROGRESS = "progress.json"


class _SharedTensorNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def _quiet_shared_tensors():
    """GPT-2 ties lm_head.weight to the embedding; save_state stores the tensor once and warns each
    time. Harmless: load_state restores the tie (the kill-and-resume test ends with identical
    weights), so the note is dropped rather than printed with every checkpoint."""
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


def run_key(params, method: str, data_dir: str | Path, processes: int, precision: str) -> str:
    """A hash of what determines the trained weights."""
    h = hashlib.sha256()
    relevant = {"seed": params.seed, "model": asdict(params.model), "data": asdict(params.data),
                "train": asdict(params.train), method: asdict(getattr(params, method)),
                "processes": processes, "precision": precision}
    h.update(json.dumps(relevant, sort_keys=True, default=list).encode())
    for split in ("meta.json", "train.bin", "validation.bin"):
        _hash_file(h, Path(data_dir) / split)
    for source in sorted(Path(__file__).parent.glob("*.py")):
        _hash_file(h, source)
    return h.hexdigest()[:16]


class Checkpointer:
    def __init__(self, root: str | Path, method: str, key: str, accelerator):
        self.root, self.method, self.acc = Path(root), method, accelerator
        self.dir = self.root / f"{method}-{key}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run; partial ones are deleted."""
        if not self.dir.is_dir():
            return None
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            for partial in self.dir.glob("*.tmp"):
                shutil.rmtree(partial, ignore_errors=True)
        self.acc.wait_for_everyone()
        done = [d for d in self.dir.glob("step-*") if (d / PROGRESS).is_file()]
        return max(done, key=lambda d: int(d.name.split("-")[1]), default=None)

    def save(self, step: int, progress: dict) -> None:
        tmp = self.dir / f"step-{step}.tmp"
        self.acc.wait_for_everyone()
        with _quiet_shared_tensors():
            self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / PROGRESS).write_text(json.dumps(progress))
            final = self.dir / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.dir.glob("step-*"):
                if old != final and not old.name.endswith(".tmp"):
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def load(self, path: Path) -> dict:
        self.acc.load_state(str(path))
        return json.loads((path / PROGRESS).read_text())

    def clear(self) -> None:
        """After success: remove every checkpoint of this method, this run's and stale ones."""
        if self.acc.is_main_process:
            for d in self.root.glob(f"{self.method}-*"):
                shutil.rmtree(d, ignore_errors=True)
