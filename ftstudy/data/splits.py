"""Rows -> token files: prepare's splitting, deduplicating and tokenizing (ftstudy.data.sources reads).

Rows become a split's text by what the source is (ftstudy.data.sources.SplitRows.documents), never by
what a row ends in: a text file's lines (WikiText's, any .txt file's) are a running text, joined as
written, with one BOS at the start of the split where the tokenizer adds one; a folder's .txt
files and the records of structured data (JSONL, JSON, CSV, parquet) are documents, each followed
by a blank line (its own trailing newlines dropped) and, for a BOS-adding tokenizer, preceded by
BOS, as the scoring expects; only documents are deduplicated across splits. A Hub dataset's rows are
a running text's lines when each is one line ending in its newline (WikiText's shape), else
documents. No EOS is inserted: the
stream is scored as the text it is, and an EOS would be a token the text does not hold.

Splits: a source without validation or test (one file, a folder of documents, a Hub dataset with
only `train`) gets them carved out of its training rows, row by row, by a keyed hash of each row's
text keyed by data.split_seed (not `seed`: a study's training seeds all meet one test split): data.validation_fraction and data.test_fraction of the rows on average,
the same split for the same params and text next year, and an exact duplicate always in the
split of its twin. A source that has its own splits keeps them, and an exact duplicate of a
training document in validation or test (or of a validation document in test) is removed there,
counted and reported: no document is in two splits. Each split records its document count and a
hash of its documents in order.

Rows are tokenized in batches of bounded size and streamed to disk, so the corpus is never held
whole: a 1 GB JSON Lines file prepares in well under 1 GiB (make bench).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ftstudy.data import examples
from ftstudy.data.sources import general_rows, source_splits, text_field
from ftstudy.data.token_files import SPLITS, DataError, general_split, token_dtype

PASSAGE_SEPARATOR = "\n\n"
# A WikiText article's title line (" = Title = "); its sections' (" = = History = = ") do not match.
ARTICLE_TITLE = re.compile(r" = [^=].* = \n")


# -- tokenizing into split files --------------------------------------------------------------

def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before a text with its special tokens (Llama's do,
    GPT-2's, GPT-NeoX's and Qwen2's do not), else None."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else None


def _lines_shaped(batch: list[str]) -> bool:
    """Whether rows look like a text file read line by line: each one line ending in its newline."""
    return all(r.endswith("\n") and r.count("\n") == 1 for r in batch if r)


def join_rows(rows: Iterator[list[str]], documents: bool | None = None) -> tuple[str, Iterator[list[str]]]:
    """(the separator, the rows to tokenize in order): a running text's lines (`documents` False)
    are joined as written; documents each get PASSAGE_SEPARATOR after them in place of their own
    trailing newlines, so that no two read as one and no word loses its leading space, and empty
    ones are dropped. `documents` None (a Hub dataset): lines when the first batch is lines-shaped."""
    rows = iter(rows)
    first = next(rows, None)
    while first is not None and not first:
        first = next(rows, None)
    if first is None:
        return "", iter(())
    if documents is None:
        documents = not _lines_shaped(first)
    batches = itertools.chain([first], rows)
    if not documents:
        return "", batches
    return PASSAGE_SEPARATOR, ([r.rstrip("\n") + PASSAGE_SEPARATOR for r in batch if r.strip()] for batch in batches)


class SplitWriter:
    """One token file being written: ids appended document by document, with counts, a hash of
    the documents in order, and where each independent unit starts (<split>.units.npy): each
    document, or, in a running text, each WikiText article (at its title line; the first takes in
    what comes before it). A running text without article titles has none: its intervals resample
    chunks of tokens (ftstudy.measure.stats)."""

    def __init__(self, path: Path, dtype: np.dtype, bos: int | None):
        self.path, self.dtype, self.bos = path, dtype, bos
        self.file = open(path, "wb")
        self.tokens = self.bytes = self.documents = self.duplicates = 0
        self.digest = hashlib.sha256()
        self.started = False
        self.starts: list[int] = []

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
        offset = self.tokens
        for row, text in zip(ids, texts):
            if self.per_document or ARTICLE_TITLE.fullmatch(text):
                self.starts.append(offset)
            offset += len(row)
        self._put(np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype))
        self.bytes += sum(len(t.encode("utf-8")) for t in texts)
        self.documents += len(texts)
        for d in digests:
            self.digest.update(d)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        units = "documents" if self.per_document else "articles" if self.starts else "chunks"
        if self.starts:
            self.starts[0] = 0  # the first unit takes in what precedes it (a blank line, the split's BOS)
            np.save(self.path.with_suffix(".units.npy"), np.asarray(self.starts, dtype=np.int64))
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents,
                "documents_sha256": self.digest.hexdigest(), "duplicates_removed": self.duplicates,
                "units": units, "unit_count": len(self.starts)}


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


BATCH_CHARS = 1 << 22  # characters tokenized at once: long documents make few rows a batch


def _sized(batches: Iterator[list[str]]) -> Iterator[list[str]]:
    """The rows in batches of at most BATCH_CHARS characters (and ROWS_PER_BATCH rows), so that a
    batch of long documents never holds a whole file's encodings."""
    for batch in batches:
        start, size = 0, 0
        for i, row in enumerate(batch):
            size += len(row)
            if size > BATCH_CHARS and i > start:
                yield batch[start:i]
                start, size = i, len(row)
        if start < len(batch):
            yield batch[start:]


def tokenize_stream(source, tokenizer, route: Callable[[str, bytes, bool], SplitWriter | None],
                    writers: list[SplitWriter]) -> str:
    """Tokenize the rows of one source split (ftstudy.data.sources.SplitRows) into the writers
    `route(text, digest, documents)` picks for each row (None: dropped as a duplicate, counted by
    route); returns the separator rule used ("" for a running text).

    The Rust backend is called directly (the Python wrapper's BatchEncoding costs ~40% more for the
    same ids; encode_batch_fast skips offsets), and the next batch is encoded on a worker thread
    (the backend releases the GIL) while this one is written."""
    separator, rows = join_rows(_sized(source.rows()), source.documents)
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


def examples_stream(batches: Iterator[list], d, tokenizer, bos: int | None, route, where: str) -> None:
    """Render each record of an instruction source (ftstudy.data.examples.render) into the writer `route`
    picks for it (None: dropped as a duplicate)."""
    index = 0
    for batch in batches:
        for record in batch:
            index += 1
            key = examples.canonical(record)
            digest = _digest(key)
            writer = route(key, digest, True)
            if writer is not None:
                ids, mask = examples.render(d, tokenizer, record, f"{where}, row {index}", bos)
                writer.write(ids, mask, digest, len(key.encode("utf-8")))


def _check_size(split: str, counts: dict, block_size: int, where: str, carved: dict, instruct: bool) -> None:
    fix = (f"raise data.{split}_fraction (now {carved[split]}) or give the source more text" if split in carved
           else "give it more text")
    if counts["documents"] == 0:
        dropped = (f"; {counts['dropped_no_answer']:,} dropped with no answer token within data.block_size={block_size}"
                   if counts.get("dropped_no_answer") else "")
        raise DataError(f"{where}: split '{split}' came out empty (0 {'examples' if instruct else 'documents'}"
                        f"{dropped}); {fix}" + (", or raise data.block_size" if dropped else ""))
    if not instruct and counts["tokens"] < block_size:
        raise DataError(f"{where}: split '{split}' has {counts['tokens']:,} tokens in {counts['documents']:,} document(s), "
                        f"fewer than one block (data.block_size={block_size}); {fix}, or lower data.block_size")


def _made(name: str, carved: dict, seed: int) -> str:
    if name in carved:
        return f"carved from train: the rows whose keyed hash (data.split_seed {seed}) falls in its {carved[name]:.0%}"
    return "the source's training rows left after carving" if name == "train" and carved else "the source's own"


def tokenize_sources(p, out: Path, tokenizer, commits: dict) -> dict:
    """Tokenize every split of every source of params `p` into `out` (a fresh folder), each at its
    commit, carving validation and test out of training where the source lacks them; return the
    meta (format, dtype, vocabulary, BOS, how the splits were made, each split's source,
    separator, counts and document hash)."""
    d = p.data
    instruct = d.format != "text"
    dtype, bos = token_dtype(len(tokenizer)), bos_id(tokenizer)
    # Texts longer than the model's context are what prepare expects: running text is cut into
    # blocks and windows later, examples to data.block_size here. transformers' warning that a
    # sequence is longer than the maximum (shown once per tokenizer) would only alarm.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    examples.check_tokenizer(d, tokenizer, p.model.name)
    have = source_splits(d.name, d.config, commits["data.name"],
                         examples.fields(d) if instruct else text_field(d.text_column), text=not instruct)
    general = [(general_split(g), general_rows(g.name, g.config, commits[f"data.general[{i}].name"],
                                               ((g.text_column, f"data.general[{i}].text_column"),), g.split))
               for i, g in enumerate(d.general)]
    for rows in [*have.values(), *(r for _, r in general)]:  # every source opened, its fields checked, first
        next(iter(rows.rows()), None)
    carved = {s: getattr(d, f"{s}_fraction") for s in ("validation", "test") if s not in have}
    writers = {s: examples.ExampleWriter(out, s, dtype, d.block_size, tokenizer) if instruct else SplitWriter(out / f"{s}.bin", dtype, bos)
               for s in SPLITS}
    carver, earlier, wheres = Carver(d.split_seed, carved), set(), {}  # earlier: documents of the splits already written
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

            targets = [split] + (list(carved) if split == "train" else [])
            if instruct:
                separator = examples_stream(have[split].rows(), d, tokenizer, bos, route, have[split].where)
            else:
                separator = tokenize_stream(have[split], tokenizer, route, [writers[t] for t in targets])
            earlier |= current
            wheres |= {target: (have[split].where, separator) for target in targets}
        for name, rows in general:  # scored as text, whatever data.format
            writers[name] = SplitWriter(out / f"{name}.bin", dtype, bos)
            wheres[name] = (rows.where, tokenize_stream(rows, tokenizer, lambda t, g, docs, w=writers[name]: w,
                                                        [writers[name]]))
    finally:
        counts = {name: w.close() for name, w in writers.items()}
    splits = {}
    for name, c in counts.items():
        (where, separator), made = wheres[name], _made(name, carved, d.split_seed)
        _check_size(name, c, d.block_size, where, carved, instruct and name in SPLITS)
        splits[name] = {"source": where, "separator": separator, "made": made, **c}
        print(f"prepare: {name}: {c['tokens']:,} tokens, {c['documents']:,} {'examples' if 'answer_tokens' in c else 'rows'} "
              f"from {where}" + (f" ({made})" if name in carved else "")
              + (f", {c['answer_tokens']:,} answer tokens" if "answer_tokens" in c else "")
              + (f"; {c['duplicates_removed']:,} duplicate(s) of earlier splits removed" if c["duplicates_removed"] else ""))
    return {"format": d.format, "dtype": dtype.str, "vocab_size": len(tokenizer), "tokenizer": p.model.name,
            "bos": {"token": tokenizer.bos_token, "id": bos,
                    "where": "start of each split's running text, and of each document"} if bos is not None else None,
            "source": d.name, "config": d.config,
            "columns": [name for name, _ in (examples.fields(d) if instruct else text_field(d.text_column))],
            "split": {"carved": list(carved), "split_seed": d.split_seed, "validation_fraction": d.validation_fraction,
                      "test_fraction": d.test_fraction} if carved else {"carved": []},
            "splits": splits}
