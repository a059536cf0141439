"""Atomic writes of every output: a temp path in the same folder, then os.replace.

A stage that fails part-way leaves the previous file or folder as it was and no half-written one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ftstudy.errors import StudyError


@contextmanager
def _atomic_file(path: str | Path, mode: str):
    """Yield a temp file beside `path`, opened in `mode`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with _atomic_file(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_file(path, "wb") as f:
        f.write(data)


def _check_finite(obj, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise StudyError(f"metric {where or '<root>'} is {obj}; refusing to write a non-finite metric (a model that "
                         "diverged or scored nothing: see the stage's log)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def write_json(path: str | Path, obj) -> None:
    _check_finite(obj)
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_arrays(path: str | Path, arrays: dict) -> None:
    """Named numpy arrays as one .npz file, atomically (np.load(path)[name] reads one); floats as
    float32, integers and text kept."""
    import numpy as np

    def stored(a):
        a = np.asarray(a)
        return a if np.issubdtype(a.dtype, np.integer) or a.dtype.kind == "U" else a.astype(np.float32)

    with _atomic_file(path, "wb") as f:
        np.savez(f, **{name: stored(a) for name, a in arrays.items()})


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: not found; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temp folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
