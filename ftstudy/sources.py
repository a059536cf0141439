"""Corpus sources -> token files: prepare's reading, splitting and tokenizing.

A source (data.name, each data.general name) is a Hub dataset id (through `datasets`), a local
folder, or one local file:
- a folder of split files: WikiText's raw files (wiki.{train,valid,test}.raw) or
  {train,validation,test}.{txt,jsonl,json,csv,parquet}, each optionally .gz or .zst;
- a folder of .txt files: each file is a document;
- one file (.txt, .jsonl, .json, .csv, .parquet, optionally .gz or .zst): a .txt's lines, or its
  records, are its documents.
Structured files and Hub datasets give the text of `text_column` (data.text_column); a missing
column is refused before any work, naming the columns there are.

Rows become a split's text by the separator rule: rows that end in their own newline (WikiText's
lines, a .txt file's) are a running text, joined as written, with one BOS at the start of the
split where the tokenizer adds one; other rows are documents, each followed by a blank line and,
for a BOS-adding tokenizer, preceded by BOS, as the scoring expects. No EOS is inserted: the
stream is scored as the text it is, and an EOS would be a token the text does not hold.

Splits: a source without validation or test (one file, a folder of documents, a Hub dataset with
only `train`) gets them carved out of its training rows, row by row, by a keyed hash of each row's
text seeded by `seed`: data.validation_fraction and data.test_fraction of the rows on average,
the same split for the same params and text next year, and an exact duplicate always in the
split of its twin. A source that has its own splits keeps them, and an exact duplicate of a
training document in validation or test (or of a validation document in test) is removed there,
counted and reported: no document is in two splits. Each split records its document count and a
hash of its documents in order.

Rows are read, tokenized in batches and streamed to disk, so the corpus is never held whole: a
1 GB JSON Lines file prepares in well under 1 GiB (make bench). Offline, a Hub dataset is read
from the Hub cache's snapshot at its resolved commit (ftstudy.hub.local_snapshot): `datasets`
alone would take the most recently cached copy, whatever its commit.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftstudy import hub
from ftstudy.data import SPLITS, DataError, general_split, is_local, token_dtype

ROWS_PER_BATCH = 20000
PASSAGE_SEPARATOR = "\n\n"
FORMATS = (".txt", ".raw", ".jsonl", ".json", ".csv", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")
# Split files a folder may hold, per split, in order of preference (each also .gz or .zst).
SPLIT_STEMS = {"train": ("wiki.train.raw", "train"), "validation": ("wiki.valid.raw", "validation", "valid"),
               "test": ("wiki.test.raw", "test")}
# How a Hub dataset may name its validation split.
HUB_VALIDATION = ("validation", "valid", "dev", "val")


def file_format(path: Path) -> str:
    """'.txt', '.jsonl', ... of a file name, under any .gz or .zst ('' for another kind)."""
    name = path.name.lower()
    for compression in (".gz", ".zst"):
        name = name.removesuffix(compression)
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), "")


def _stream(path: Path):
    """The file's bytes, decompressed where its name ends in .gz or .zst (pyarrow's codecs)."""
    import pyarrow as pa

    return pa.input_stream(str(path), compression="detect")


# -- reading rows -----------------------------------------------------------------------------

def _text_rows(path: Path, chunk_bytes: int = 1 << 22) -> Iterator[list[str]]:
    """The file's lines (newlines kept), in batches; read and decoded in large chunks, since
    per-line Python work would cost as much as the tokenizer itself."""
    with _stream(path) as f:
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


def _field(record, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is {type(record).__name__}, not an object with fields; "
                        "give one JSON object per line")
    if column not in record:
        raise DataError(f"{where}: no field {column!r} (data.text_column); its fields are "
                        f"{', '.join(map(str, record))}; set data.text_column to the one holding the text")
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {column!r} holds {type(value).__name__}, not text; set "
                        "data.text_column to a text field")
    return value


def _jsonl_rows(path: Path, column: str) -> Iterator[list[str]]:
    lineno = 0
    for lines in _text_rows(path):
        batch = []
        for line in lines:
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as e:  # e.msg: "Expecting value", "Unterminated string starting at", ...
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg.removesuffix(' at')} at column "
                                f"{e.colno}); fix or remove that line") from None
            batch.append(_field(record, column, f"{path}, line {lineno}"))
        yield batch


def _json_rows(path: Path, column: str) -> Iterator[list[str]]:
    """A .json file: a JSON array of objects (read whole), else JSON Lines (streamed)."""
    with _stream(path) as f:
        start = f.read(4096).lstrip()
    if not start.startswith(b"["):
        yield from _jsonl_rows(path, column)
        return
    with _stream(path) as f:
        try:
            records = json.load(io.TextIOWrapper(f, encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    for i in range(0, len(records), ROWS_PER_BATCH):
        yield [_field(r, column, f"{path}, record {i + j + 1}") for j, r in enumerate(records[i:i + ROWS_PER_BATCH])]


def _csv_rows(path: Path, column: str) -> Iterator[list[str]]:
    csv.field_size_limit(2**31 - 1)  # a document may be long
    with _stream(path) as f:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        if column not in (reader.fieldnames or []):
            raise DataError(f"{path}: no column {column!r} (data.text_column); its columns are "
                            f"{', '.join(reader.fieldnames or []) or 'none (an empty file)'}")
        for rows in iter(lambda: list(itertools.islice(reader, ROWS_PER_BATCH)), []):
            yield [row[column] or "" for row in rows]


def _parquet_rows(path: Path, column: str) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r} (data.text_column); its columns are "
                        f"{', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[column], batch_size=ROWS_PER_BATCH):
        yield [t or "" for t in batch.column(column).to_pylist()]


def _document_rows(paths: list[Path]) -> Iterator[list[str]]:
    """Each .txt file of a folder as one document."""
    for i in range(0, len(paths), ROWS_PER_BATCH):
        batch = []
        for path in paths[i:i + ROWS_PER_BATCH]:
            try:
                batch.append(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
        yield batch


def file_rows(path: Path, column: str) -> Iterator[list[str]]:
    """The rows of one local file, by its format."""
    fmt = file_format(path)
    if fmt in (".txt", ".raw"):
        return _text_rows(path)
    if fmt == ".jsonl":
        return _jsonl_rows(path, column)
    if fmt == ".json":
        return _json_rows(path, column)
    if fmt == ".csv":
        return _csv_rows(path, column)
    if fmt == ".parquet":
        return _parquet_rows(path, column)
    raise DataError(f"{path}: not a format prepare reads; use .txt, .jsonl, .json, .csv or .parquet "
                    "(each also .gz or .zst)")


# -- a source's splits ------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitRows:
    """One split of a source as it is: where it is read from, and a way to read its rows."""
    where: str
    rows: Callable[[], Iterator[list[str]]]


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_STEMS[split]:
        names = [stem] if stem.endswith(".raw") else [stem + fmt for fmt in FORMATS if fmt != ".raw"]
        for name in names:
            for compression in COMPRESSIONS:
                if (folder / (name + compression)).is_file():
                    return folder / (name + compression)
    return None


def _local_splits(name: str, column: str) -> dict[str, SplitRows]:
    path = Path(name).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; give it text")
        if not file_format(path):
            file_rows(path, column)  # raises, naming the formats
        return {"train": SplitRows(str(path), lambda: file_rows(path, column))}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; data.name must be a Hub dataset id, a local folder or "
                        "a local file")
    found = {split: f for split in SPLITS if (f := _split_file(path, split)) is not None}
    if found:
        if "train" not in found:
            raise DataError(f"{path}: split files for {', '.join(found)} but none for train; add "
                            f"{', '.join(SPLIT_STEMS['train'])} (.txt, .jsonl, .json, .csv or .parquet)")
        return {split: SplitRows(str(f), lambda f=f: file_rows(f, column)) for split, f in found.items()}
    documents = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if documents:
        return {"train": SplitRows(f"{path} ({len(documents):,} .txt documents)", lambda: _document_rows(documents))}
    raise DataError(f"{path}: no split files and no .txt documents; expected train.jsonl (or .txt, .json, .csv, "
                    ".parquet, WikiText's wiki.train.raw), optionally with validation and test files, or a folder "
                    "of .txt documents")


def _hub_splits(name: str, config: str | None, revision: str | None, column: str) -> dict[str, SplitRows]:
    import datasets

    if hub.offline():  # the snapshot at exactly `revision`, from the Hub cache
        dd = datasets.load_dataset(hub.local_snapshot(name, "dataset", revision), config)
    else:
        dd = datasets.load_dataset(name, config, revision=revision)
    names = {"train": "train", "test": "test",
             "validation": next((s for s in HUB_VALIDATION if s in dd), "validation")}
    out = {}
    for split, theirs in names.items():
        if theirs not in dd:
            continue
        ds = dd[theirs]
        if column not in ds.column_names:
            raise DataError(f"{name} ({config}), split {theirs}: no column {column!r} (data.text_column); its columns "
                            f"are {', '.join(ds.column_names)}")
        out[split] = SplitRows(f"{name}@{revision}:{config}:{theirs}",
                               lambda ds=ds: (b[column] for b in ds.iter(batch_size=ROWS_PER_BATCH)))
    if "train" not in out:
        raise DataError(f"{name} ({config}) has no train split (its splits: {', '.join(dd)})")
    return out


def source_splits(name: str, config: str | None, revision: str | None, column: str) -> dict[str, SplitRows]:
    """The splits a source has (train always; validation and test where it has them)."""
    if is_local(name):
        return _local_splits(name, column)
    return _hub_splits(name, config, revision, column)


def general_rows(name: str, config: str | None, revision: str | None, column: str, split: str) -> SplitRows:
    """A data.general source's split: a Hub dataset's or a folder's split `split`; a single file
    or a folder of documents whole."""
    if is_local(name) and (Path(name).is_file() or not _split_file(Path(name), "train")):
        return _local_splits(name, column)["train"]
    if not is_local(name):
        import datasets

        source = hub.local_snapshot(name, "dataset", revision) if hub.offline() else name
        ds = datasets.load_dataset(source, config, split=split, **({} if hub.offline() else {"revision": revision}))
        if column not in ds.column_names:
            raise DataError(f"{name} ({config}), split {split}: no column {column!r}; its columns are "
                            f"{', '.join(ds.column_names)}")
        return SplitRows(f"{name}@{revision}:{config}:{split}",
                         lambda: (b[column] for b in ds.iter(batch_size=ROWS_PER_BATCH)))
    splits = _local_splits(name, column)
    if split not in splits:
        raise DataError(f"{name}: no file for split {split!r} (data.general split); it has {', '.join(splits)}")
    return splits[split]


# -- tokenizing into split files --------------------------------------------------------------

def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before a text with its special tokens (Llama's do,
    GPT-2's, GPT-NeoX's and Qwen2's do not), else None."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else None


def join_rows(rows: Iterator[list[str]]) -> tuple[str, Iterator[list[str]]]:
    """(the separator, the rows to tokenize in order) for a source, inferred from its first batch:
    rows that end in their own newline (WikiText, text files) are joined as written; rows that do
    not (documents, passages, records) each get PASSAGE_SEPARATOR after them, so that no two read
    as one and no word loses its leading space. Empty rows of documents are dropped."""
    rows = iter(rows)
    first = next(rows, None)
    while first is not None and not first:
        first = next(rows, None)
    if first is None:
        return "", iter(())
    separator = "" if all(r.endswith("\n") for r in first if r) else PASSAGE_SEPARATOR
    batches = itertools.chain([first], rows)
    if not separator:
        return separator, batches
    return separator, ([r + separator for r in batch if r.strip()] for batch in batches)


class SplitWriter:
    """One token file being written: ids appended document by document, with counts and a hash of
    the documents in order."""

    def __init__(self, path: Path, dtype: np.dtype, bos: int | None):
        self.path, self.dtype, self.bos = path, dtype, bos
        self.file = open(path, "wb")
        self.tokens = self.bytes = self.documents = self.duplicates = 0
        self.digest = hashlib.sha256()
        self.started = False

    def start(self, per_document: bool) -> None:
        """A running text gets its BOS once, here; documents get one each (write)."""
        self.per_document, self.started = per_document, True
        if self.bos is not None and not per_document:
            self._put([self.bos])

    def _put(self, ids) -> None:
        flat = np.asarray(ids, dtype=self.dtype)
        flat.tofile(self.file)
        self.tokens += len(flat)

    def write(self, ids: list[list[int]], texts: list[str], digests: list[bytes]) -> None:
        if self.bos is not None and self.per_document:
            ids = [[self.bos, *row] for row in ids]
        self._put(np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype))
        self.bytes += sum(len(t.encode("utf-8")) for t in texts)
        self.documents += len(texts)
        for d in digests:
            self.digest.update(d)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents,
                "documents_sha256": self.digest.hexdigest(), "duplicates_removed": self.duplicates}


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Carver:
    """Which split a training row goes to when validation and test are carved out of it: a keyed
    hash of its text, so the same text always lands in the same split for the same seed."""

    def __init__(self, seed: int, fractions: dict[str, float]):
        self.key = f"ftstudy-split-{seed}".encode()
        self.bounds = []
        total = 0.0
        for split, fraction in fractions.items():
            total += fraction
            self.bounds.append((total, split))

    def __call__(self, text: str) -> str:
        u = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=self.key).digest(), "big") / 2**64
        return next((split for bound, split in self.bounds if u < bound), "train")


def tokenize_stream(rows: Iterator[list[str]], tokenizer, route: Callable[[str, bytes, bool], SplitWriter | None],
                    writers: list[SplitWriter]) -> str:
    """Tokenize the rows of one source split into the writers `route(text, digest, documents)`
    picks for each row (None: dropped as a duplicate, counted by route); returns the separator
    rule used ("" for a running text).

    The Rust backend is called directly (the Python wrapper's BatchEncoding costs ~40% more for the
    same ids; encode_batch_fast skips offsets), and the next batch is encoded on a worker thread
    (the backend releases the GIL) while this one is written."""
    separator, rows = join_rows(rows)
    documents = bool(separator)
    for writer in writers:
        if not writer.started:
            writer.start(per_document=bool(separator))
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def routed(batch: list[str]):
        digests = [_digest(t) for t in batch]
        targets = [route(t, d, documents) for t, d in zip(batch, digests)]
        kept = [(t, d, w) for t, d, w in zip(batch, digests, targets) if w is not None]
        return kept, encode([t for t, _, _ in kept], add_special_tokens=False)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in itertools.chain(rows, [None]):
            upcoming = pool.submit(routed, batch) if batch is not None else None
            if pending is not None:
                kept, encodings = pending.result()
                by_writer: dict[int, tuple[SplitWriter, list, list, list]] = {}
                for (text, digest, writer), enc in zip(kept, encodings):
                    slot = by_writer.setdefault(id(writer), (writer, [], [], []))
                    slot[1].append(enc.ids)
                    slot[2].append(text)
                    slot[3].append(digest)
                for writer, ids, texts, digests in by_writer.values():
                    writer.write(ids, texts, digests)
            pending = upcoming
    return separator


def _check_size(split: str, counts: dict, block_size: int, where: str, carved: dict | None) -> None:
    fix = (f"raise data.{split}_fraction (now {carved[split]}) or give the source more text" if carved and split in carved
           else "give it more text")
    if counts["bytes"] == 0:
        raise DataError(f"{where}: split '{split}' came out empty (0 documents); {fix}")
    if counts["tokens"] < block_size:
        raise DataError(f"{where}: split '{split}' has {counts['tokens']:,} tokens in {counts['documents']:,} document(s), "
                        f"fewer than one block (data.block_size={block_size}); {fix}, or lower data.block_size")


def tokenize_sources(p, out: Path, tokenizer, commits: dict) -> dict:
    """Tokenize every split of every source of params `p` into `out` (a fresh folder), each at its
    commit, carving validation and test out of training where the source lacks them; return the
    meta (dtype, vocabulary, BOS, how the splits were made, each split's source, separator,
    counts and document hash)."""
    d = p.data
    dtype = token_dtype(len(tokenizer))
    bos = bos_id(tokenizer)
    have = source_splits(d.name, d.config, commits["data.name"], d.text_column)
    general = [(general_split(g), general_rows(g.name, g.config, commits[f"data.general[{i}].name"], g.text_column,
                                               g.split)) for i, g in enumerate(d.general)]
    for rows in [*have.values(), *(r for _, r in general)]:  # every source opened, its columns checked, first
        next(iter(rows.rows()), None)
    carved = {s: getattr(d, f"{s}_fraction") for s in ("validation", "test") if s not in have}
    writers = {s: SplitWriter(out / f"{s}.bin", dtype, bos) for s in SPLITS}
    carver = Carver(p.seed, carved)
    earlier: set[bytes] = set()  # documents of the splits already written
    wheres = {}
    try:
        for split in (s for s in SPLITS if s in have):
            current: set[bytes] = set()

            def route(text: str, digest: bytes, documents: bool, split=split, current=current):
                target = carver(text) if split == "train" else split
                if documents:
                    if split != "train" and digest in earlier:
                        writers[split].duplicates += 1
                        return None
                    current.add(digest)
                return writers[target]

            separator = tokenize_stream(have[split].rows(), tokenizer, route,
                                        [writers[split]] + ([writers[s] for s in carved] if split == "train" else []))
            earlier |= current
            for target in [split] + (list(carved) if split == "train" else []):
                wheres[target] = (have[split].where, separator)
        for name, rows in general:
            writers[name] = SplitWriter(out / f"{name}.bin", dtype, bos)
            wheres[name] = (rows.where, tokenize_stream(rows.rows(), tokenizer, lambda t, g, docs, w=writers[name]: w,
                                                        [writers[name]]))
    finally:
        counts = {name: w.close() for name, w in writers.items()}
    splits = {}
    for name, c in counts.items():
        where, separator = wheres[name]
        _check_size(name, c, d.block_size, where, carved)
        made = (f"carved from train: the rows whose keyed hash (seed {p.seed}) falls in its {carved[name]:.0%}"
                if name in carved else "the source's training rows left after carving" if name == "train" and carved
                else "the source's own")
        splits[name] = {"source": where, "separator": separator, "made": made, **c}
        print(f"prepare: {name}: {c['tokens']:,} tokens, {c['documents']:,} rows from {where}"
              + (f" ({made})" if name in carved else "")
              + (f"; {c['duplicates_removed']:,} duplicate(s) of earlier splits removed" if c["duplicates_removed"] else ""))
    return {"dtype": dtype.str, "vocab_size": len(tokenizer), "tokenizer": p.model.name,
            "bos": {"token": tokenizer.bos_token, "id": bos,
                    "where": "start of each split's running text, and of each document"} if bos is not None else None,
            "source": d.name, "config": d.config, "text_column": d.text_column,
            "split": {"carved": list(carved), "seed": p.seed, "validation_fraction": d.validation_fraction,
                      "test_fraction": d.test_fraction} if carved else {"carved": []},
            "splits": splits}
