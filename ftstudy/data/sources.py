"""Corpus sources -> their splits' rows: prepare's reading (ftstudy.data.splits tokenizes them).

A source (data.name, each data.general name) is a Hub dataset id (through `datasets`), a local
folder, or one local file:
- a folder of split files: WikiText's raw files (wiki.{train,valid,test}.raw) or
  {train,validation,test}.{txt,jsonl,json,csv,parquet}, each optionally .gz or .zst;
- a folder of .txt files: each file is a document;
- one file (.txt, .jsonl, .json, .csv, .parquet, optionally .gz or .zst): a .txt's lines, or its
  records, are its rows.
Structured files and Hub datasets give the fields a format reads (data.text_column for text); a
missing field is refused before any work, naming the fields there are. Everything streams, in
batches of rows. Offline, a Hub dataset is read from the Hub cache's snapshot at its resolved
commit (ftstudy.hub.local_snapshot): `datasets` alone would take the most recently cached copy,
whatever its commit.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ftstudy import hub
from ftstudy.config import is_local
from ftstudy.data.token_files import SPLITS, DataError

ROWS_PER_BATCH = 20000
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
    per-line Python work would cost as much as the tokenizer itself. A UTF-8 byte-order mark at the
    start (Windows editors write one) is no text and is dropped."""
    with _stream(path) as f:
        tail, lineno = b"", 0
        first = f.read(chunk_bytes)
        chunks = itertools.chain([first.removeprefix(b"\xef\xbb\xbf")], iter(lambda: f.read(chunk_bytes), None))
        while True:
            chunk = next(chunks)
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


# The fields a format reads, each as (field name, the params key that names it), for the errors.
Fields = tuple[tuple[str, str], ...]


def text_field(column: str) -> Fields:
    return ((column, "data.text_column"),)


def _fields(record, fields: Fields, where: str):
    """The record's values of `fields`: the value itself for one field (text), a tuple for several."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is {type(record).__name__}, not an object with fields; "
                        "give one JSON object per line")
    for name, key in fields:
        if name not in record:
            raise DataError(f"{where}: no field {name!r} ({key}); its fields are {', '.join(map(str, record))}; "
                            f"set {key} to the field that holds it")
    return record[fields[0][0]] if len(fields) == 1 else tuple(record[name] for name, _ in fields)


def _jsonl_rows(path: Path, fields: Fields) -> Iterator[list]:
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
            batch.append(_fields(record, fields, f"{path}, line {lineno}"))
        yield batch


def _json_rows(path: Path, fields: Fields) -> Iterator[list]:
    """A .json file: a JSON array of objects (read whole), else JSON Lines (streamed)."""
    with _stream(path) as f:
        start = f.read(4096).lstrip()
    if not start.startswith(b"["):
        yield from _jsonl_rows(path, fields)
        return
    with _stream(path) as f:
        try:
            records = json.load(io.TextIOWrapper(f, encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    for i in range(0, len(records), ROWS_PER_BATCH):
        yield [_fields(r, fields, f"{path}, record {i + j + 1}") for j, r in enumerate(records[i:i + ROWS_PER_BATCH])]


def _missing(where, names, fields: Fields) -> None:
    for name, key in fields:
        if name not in names:
            raise DataError(f"{where}: no column {name!r} ({key}); its columns are "
                            f"{', '.join(names) or 'none (an empty file)'}")


def _csv_rows(path: Path, fields: Fields) -> Iterator[list]:
    csv.field_size_limit(2**31 - 1)  # a document may be long
    with _stream(path) as f:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would stick to the first column's name
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
        _missing(path, reader.fieldnames or [], fields)
        for rows in iter(lambda: list(itertools.islice(reader, ROWS_PER_BATCH)), []):
            yield [_fields(row, fields, str(path)) for row in rows]


def _parquet_rows(path: Path, fields: Fields) -> Iterator[list]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _missing(path, pf.schema_arrow.names, fields)
    for batch in pf.iter_batches(columns=[name for name, _ in fields], batch_size=ROWS_PER_BATCH):
        yield [_fields(row, fields, str(path)) for row in batch.to_pylist()]


def _texts(batches: Iterator[list], where: str, fields: Fields) -> Iterator[list[str]]:
    """Rows of one text field: None counts as empty, anything but text is refused."""
    (column, key), = fields
    for batch in batches:
        for value in batch:
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: field {column!r} holds {type(value).__name__}, not text; set {key} to a "
                                "text field")
        yield [value or "" for value in batch]


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


def file_records(path: Path, fields: Fields) -> Iterator[list]:
    """The records of one structured local file (.jsonl, .json, .csv, .parquet), by its format: each
    the value of the one field asked for, or a tuple of the fields' values."""
    fmt = file_format(path)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if fmt in readers:
        return readers[fmt](path, fields)
    if fmt in (".txt", ".raw"):
        raise DataError(f"{path}: a text file holds no fields; prompt/completion and messages data must be .jsonl, "
                        ".json, .csv or .parquet (or a Hub dataset)")
    raise DataError(f"{path}: not a format prepare reads; use .txt, .jsonl, .json, .csv or .parquet "
                    "(each also .gz or .zst)")


def file_rows(path: Path, fields: Fields, text: bool = True) -> Iterator[list]:
    """The rows of one local file, by its format: for text, a text file's lines or a structured
    file's text field; else its records (a field's value, or a tuple of the fields' values)."""
    if text and file_format(path) in (".txt", ".raw"):
        return _text_rows(path)
    records = file_records(path, fields)
    return _texts(records, str(path), fields) if text else records


# -- a source's splits ------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitRows:
    """One split of a source as it is: where it is read from, a way to read its rows, and whether
    its rows are documents (each file of a folder of .txt files, each record of structured data)
    or a running text's lines (a text file's); None for a Hub dataset, whose rows' shape decides
    (ftstudy.data.splits.join_rows)."""
    where: str
    rows: Callable[[], Iterator[list[str]]]
    documents: bool | None = None


def _rows_are_documents(path: Path, text: bool) -> bool:
    """A text file's rows are its lines; a structured file's are its records."""
    return not (text and file_format(path) in (".txt", ".raw"))


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_STEMS[split]:
        names = [stem] if stem.endswith(".raw") else [stem + fmt for fmt in FORMATS if fmt != ".raw"]
        for name in names:
            for compression in COMPRESSIONS:
                if (folder / (name + compression)).is_file():
                    return folder / (name + compression)
    return None


def _local_splits(name: str, fields: Fields, text: bool = True) -> dict[str, SplitRows]:
    path = Path(name).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; give it text")
        if not file_format(path):
            file_rows(path, fields, text)  # raises, naming the formats
        return {"train": SplitRows(str(path), lambda: file_rows(path, fields, text), _rows_are_documents(path, text))}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; a source (data.name, data.general[].name) is a Hub "
                        "dataset id, a local folder or a local file")
    found = {split: f for split in SPLITS if (f := _split_file(path, split)) is not None}
    if found:
        if "train" not in found:
            raise DataError(f"{path}: split files for {', '.join(found)} but none for train; add "
                            f"{', '.join(SPLIT_STEMS['train'])} (.txt, .jsonl, .json, .csv or .parquet)")
        return {split: SplitRows(str(f), lambda f=f: file_rows(f, fields, text), _rows_are_documents(f, text))
                for split, f in found.items()}
    documents = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if documents and text:
        return {"train": SplitRows(f"{path} ({len(documents):,} .txt documents)", lambda: _document_rows(documents),
                                   documents=True)}
    raise DataError(f"{path}: no split files and no .txt documents; expected train.jsonl (or .txt, .json, .csv, "
                    ".parquet, WikiText's wiki.train.raw), optionally with validation and test files, or a folder "
                    "of .txt documents")


def _hub_rows(ds, where: str, fields: Fields, text: bool = True) -> SplitRows:
    _missing(where, ds.column_names, fields)
    names = [name for name, _ in fields]

    def rows():
        for b in ds.iter(batch_size=ROWS_PER_BATCH):
            yield b[names[0]] if len(names) == 1 else list(zip(*(b[n] for n in names)))

    return SplitRows(where, (lambda: _texts(rows(), where, fields)) if text else rows)


def _hub_dataset(name: str, config: str | None, revision: str | None, split: str | None = None):
    import datasets

    if hub.offline():  # the snapshot at exactly `revision`, from the Hub cache
        return datasets.load_dataset(hub.local_snapshot(name, "dataset", revision), config, split=split)
    return datasets.load_dataset(name, config, split=split, revision=revision)


def _hub_splits(name: str, config: str | None, revision: str | None, fields: Fields,
                text: bool = True) -> dict[str, SplitRows]:
    dd = _hub_dataset(name, config, revision)
    names = {"train": "train", "test": "test",
             "validation": next((s for s in HUB_VALIDATION if s in dd), "validation")}
    out = {split: _hub_rows(dd[theirs], f"{name}@{revision}:{config}:{theirs}", fields, text)
           for split, theirs in names.items() if theirs in dd}
    if "train" not in out:
        raise DataError(f"{name} ({config}) has no train split (its splits: {', '.join(dd)}); set data.config to "
                        "a config that has one, or data.name to another source")
    return out


def source_splits(name: str, config: str | None, revision: str | None, fields: Fields,
                  text: bool = True) -> dict[str, SplitRows]:
    """The splits a source has (train always; validation and test where it has them): rows of
    text, or (text=False) records of the fields."""
    if is_local(name):
        return _local_splits(name, fields, text)
    return _hub_splits(name, config, revision, fields, text)


def general_rows(name: str, config: str | None, revision: str | None, fields: Fields, split: str) -> SplitRows:
    """A data.general source's split: a Hub dataset's or a folder's split `split`; a single file
    or a folder of documents whole."""
    if not is_local(name):
        return _hub_rows(_hub_dataset(name, config, revision, split), f"{name}@{revision}:{config}:{split}", fields)
    if Path(name).is_file() or not _split_file(Path(name), "train"):
        return _local_splits(name, fields)["train"]
    splits = _local_splits(name, fields)
    if split not in splits:
        raise DataError(f"{name}: no file for split {split!r}; set data.general[].split to one it has: "
                        f"{', '.join(splits)}")
    return splits[split]
