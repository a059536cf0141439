"""Corpus sources -> token files: prepare's reading and tokenizing.

A source is a hub dataset id (through `datasets`) or a local directory holding either the raw
WikiText files (wiki.{train,valid,test}.raw) or one text or parquet file per split. A split's text
is its rows joined in order: as written where rows keep their own line ends (run_clm's convention
for WikiText), else with a blank line after each passage (join_rows). Rows are tokenized in
batches and streamed to disk, so the corpus is never held as Python lists. Offline, a Hub dataset
is read from the local Hub cache's snapshot at its resolved commit (ftstudy.hub.local_snapshot):
`datasets` alone would take the most recently cached copy, whatever its commit.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ftstudy import hub
from ftstudy.data import SPLITS, DataError, general_split, is_local, token_dtype

ROWS_PER_BATCH = 20000
# Local file names accepted per split, in order of preference.
LOCAL_FILES = {
    "train": ("wiki.train.raw", "train.txt", "train.parquet"),
    "validation": ("wiki.valid.raw", "validation.txt", "valid.txt", "validation.parquet", "valid.parquet"),
    "test": ("wiki.test.raw", "test.txt", "test.parquet"),
}

def local_split_file(directory: str | Path, split: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory; data.name must be a hub dataset id or a local folder")
    for candidate in LOCAL_FILES[split]:
        if (directory / candidate).is_file():
            return directory / candidate
    raise DataError(f"{directory}: no file for split '{split}'; expected one of {', '.join(LOCAL_FILES[split])}")

def _text_rows(path: Path, chunk_bytes: int = 1 << 22) -> Iterator[list[str]]:
    """The file's lines (newlines kept), in batches; read and decoded in large chunks, since
    per-line Python work would cost as much as the tokenizer itself."""
    with open(path, "rb") as f:
        tail, lineno = b"", 0
        while True:
            chunk = f.read(chunk_bytes)
            data = tail + chunk
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if cut == 0:  # no newline yet: keep reading
                tail = data
                continue
            block, tail = data[:cut], data[cut:]
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = lineno + block.count(b"\n", 0, e.start) + 1
                column = e.start - block.rfind(b"\n", 0, e.start) - 1
                raise DataError(f"{path}: line {bad} is not UTF-8 ({e.reason} at byte {column}); "
                                "re-encode the file as UTF-8") from None
            lineno += block.count(b"\n")
            parts = text.split("\n")  # lines end at \n only, as when iterating over the file
            lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
            for i in range(0, len(lines), ROWS_PER_BATCH):
                yield lines[i:i + ROWS_PER_BATCH]


def _parquet_rows(path: Path) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column; columns are {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=["text"], batch_size=ROWS_PER_BATCH):
        yield [t or "" for t in batch.column("text").to_pylist()]


def iter_rows(name: str, config: str | None, split: str,
              revision: str | None = None) -> tuple[str, Iterator[list[str]]]:
    """(description of where the rows come from, iterator over batches of rows); a Hub dataset at
    `revision`."""
    if is_local(name):
        path = local_split_file(name, split)
        return str(path), (_parquet_rows(path) if path.suffix == ".parquet" else _text_rows(path))
    import datasets

    if hub.offline():  # the snapshot at exactly `revision`, from the Hub cache
        ds = datasets.load_dataset(hub.local_snapshot(name, "dataset", revision), config, split=split)
    else:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    if "text" not in ds.column_names:
        raise DataError(f"{name} ({config}), split {split}: no 'text' column; columns are {ds.column_names}")
    return f"{name}@{revision}:{config}:{split}", (b["text"] for b in ds.iter(batch_size=ROWS_PER_BATCH))

def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before a text with its special tokens (Llama's do,
    GPT-2's, GPT-NeoX's and Qwen2's do not), else None."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else None


PASSAGE_SEPARATOR = "\n\n"


def join_rows(rows: Iterator[list[str]]) -> tuple[str, Iterator[list[str]]]:
    """(the separator, the rows to tokenize in order) for a source, inferred from its first batch:
    rows that end in their own newline (WikiText, text files) are joined as written; rows that do
    not (passages, as in LAMBADA or most parquet sets) each get PASSAGE_SEPARATOR after them, so
    that no two passages read as one and no word loses its leading space."""
    first = next(rows, None)
    if first is None:
        return "", iter(())
    separator = "" if all(r.endswith("\n") for r in first if r) else PASSAGE_SEPARATOR
    batches = itertools.chain([first], rows)
    if not separator:
        return separator, batches
    return separator, ([r + separator for r in batch if r] for batch in batches)

def tokenize_to_file(rows: Iterator[list[str]], tokenizer, path: Path, dtype: np.dtype,
                     prefix: list[int] = ()) -> dict:
    """Stream `prefix` (a BOS, say), then the tokenized rows, into `path`; return token and UTF-8
    byte counts.

    The Rust backend is called directly (the Python wrapper's BatchEncoding costs ~40% more for the
    same ids; encode_batch_fast skips offsets), and the next batch is encoded on a worker thread
    (the backend releases the GIL) while this one is written."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    n_tokens, n_bytes = len(prefix), 0
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
        np.asarray(prefix, dtype=dtype).tofile(f)
        pending = None
        for batch in itertools.chain(rows, [None]):
            upcoming = pool.submit(encode, batch, add_special_tokens=False) if batch is not None else None
            if pending is not None:
                flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in pending.result()), dtype=dtype)
                flat.tofile(f)
                n_tokens += len(flat)
            if batch is not None:
                n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            pending = upcoming
        f.flush()
        os.fsync(f.fileno())
    return {"tokens": n_tokens, "bytes": n_bytes}

def tokenize_sources(p, out: Path, tokenizer, commits: dict) -> dict:
    """Tokenize every split of every source of params `p` into `out` (a fresh folder), each at its
    commit; return the meta (dtype, vocabulary, BOS, each split's source, separator and counts)."""
    dtype = token_dtype(len(tokenizer))
    # Each split is one scored stream; it starts with BOS where the family's tokenizer adds one.
    bos = bos_id(tokenizer)
    splits = {}
    jobs = [(split, p.data.name, commits["data.name"], p.data.config, split) for split in SPLITS]
    jobs += [(general_split(g), g.name, commits[f"data.general[{i}].name"], g.config, g.split)
             for i, g in enumerate(p.data.general)]
    for split, name, commit, config, source_split in jobs:
        source, rows = iter_rows(name, config, source_split, commit)
        separator, rows = join_rows(rows)
        counts = tokenize_to_file(rows, tokenizer, out / f"{split}.bin", dtype, [bos] if bos is not None else [])
        if counts["bytes"] == 0:
            raise DataError(f"{source}: split '{split}' is empty; give it text")
        if counts["tokens"] < p.data.block_size:
            raise DataError(
                f"{source}: split '{split}' has {counts['tokens']} tokens, fewer than one block "
                f"(data.block_size={p.data.block_size}); give it more text or lower data.block_size")
        splits[split] = {"source": source, "separator": separator, **counts}
        print(f"prepare: {split}: {counts['tokens']:,} tokens from {source}")
    return {"dtype": dtype.str, "vocab_size": len(tokenizer), "tokenizer": p.model.name,
            "bos": {"token": tokenizer.bos_token, "id": bos, "where": "start of each split"} if bos is not None
            else None,
            "source": p.data.name, "config": p.data.config, "splits": splits}
