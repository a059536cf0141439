"""Token files -> blocks, and what every stage knows of the prepared data: its splits, its meta,
where a source is local. (Reading sources is ftstudy.data.sources and tokenizing them ftstudy.data.splits,
prepare's alone.)

Token files are flat little-endian arrays: uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ftstudy.errors import StudyError
from ftstudy.outputs import read_json

SPLITS = ("train", "validation", "test")
META_FILE = "meta.json"


class DataError(StudyError):
    """A data source or token file is missing, empty, too short or unreadable."""


def general_split(source) -> str:
    """The prepared split (token file general-<label>.bin) holding a data.general source
    (ftstudy.config.SourceParams.label)."""
    return f"general-{source.label}"


def general_splits(meta: dict) -> list[tuple[str, str]]:
    """(prepared split, label) of every data.general source in a prepared meta, in params order."""
    return [(split, split.removeprefix("general-")) for split in meta["splits"] if split.startswith("general-")]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def content_hash(name: str | Path) -> str:
    """sha256 of a local file, or of a folder's files (their paths and bytes, in path order): what
    a local source held when it was read."""
    import hashlib

    path = Path(name).expanduser()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def read_meta(data_dir: str | Path) -> dict:
    return read_json(Path(data_dir) / META_FILE)


def is_instruct(meta: dict) -> bool:
    """Whether the prepared data (its meta, or a protocol naming its format) is instruction data."""
    return meta.get("format", "text") != "text"


def load_tokens(data_dir: str | Path, split: str, meta: dict | None = None) -> np.ndarray:
    """The split's token ids as a read-only memmap (`meta`: data_dir's meta.json, if already read)."""
    meta = meta or read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro prepare`")
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) != meta["splits"][split]["tokens"]:
        raise DataError(f"{path}: holds {len(tokens)} tokens but {META_FILE} says "
                        f"{meta['splits'][split]['tokens']}; the file is truncated, rerun `dvc repro -f prepare`")
    return tokens


def unit_starts(data_dir: str | Path, split: str, meta: dict) -> np.ndarray | None:
    """Where each independent unit (document, WikiText article) of a running-text split starts, in
    tokens; None where the split has none (ftstudy.data.splits.SplitWriter)."""
    if meta["splits"][split].get("units", "chunks") == "chunks":
        return None
    starts = np.load(Path(data_dir) / f"{split}.units.npy")
    if len(starts) != meta["splits"][split]["unit_count"]:
        raise DataError(f"{data_dir}: {split}.units.npy does not match {META_FILE}; rerun `dvc repro -f prepare`")
    return starts


def blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """Non-overlapping blocks of `block_size` tokens, as a (n_blocks, block_size) view; the tail is dropped."""
    n = len(tokens) // block_size
    return tokens[: n * block_size].reshape(n, block_size)
