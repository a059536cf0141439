"""The prepare stage on every kind of source: WikiText's split files as before, and one file or a
folder of documents in each format, split for the user by document, with no document in two
splits; bad input refused in one line before anything is written."""

import csv
import gzip
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PREPARE_ARGS, TINY_MODEL, TINY_WIKI, run_main
from ftstudy import modeling
from ftstudy.config import ConfigError, load_params
from ftstudy.data import sources, splits, token_files
from ftstudy.outputs import read_json
from ftstudy.synthetic import ASSETS
from stages import prepare

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("prepare")

ARTICLES = ASSETS / "tiny-jsonl" / "articles.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return modeling.load_tokenizer(TINY_MODEL)


def articles() -> list[str]:
    """The bundled one-file corpus's documents: 140 articles."""
    return [json.loads(line)["content"] for line in ARTICLES.read_text(encoding="utf-8").splitlines()]


def run_prepare(project, **overrides) -> dict:
    project(**overrides)
    run_main(prepare, *PREPARE_ARGS)
    return read_json("prep/meta.json")


def decoded(tokenizer, split: str) -> str:
    return tokenizer.decode(token_files.load_tokens("prep", split).tolist())


def test_token_counts_equal_direct_tokenization(project, tokenizer):
    meta = run_prepare(project, **{"data.name": str(TINY_WIKI)})  # the whole demo source
    for split, raw in (("train", "wiki.train.raw"), ("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        lines = (TINY_WIKI / raw).read_text(encoding="utf-8").splitlines(keepends=True)
        direct = [i for row in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in row]
        tokens = token_files.load_tokens("prep", split)
        assert tokens.dtype == np.dtype("<u2")
        assert tokens.tolist() == direct
        assert meta["splits"][split]["tokens"] == len(direct)
        assert meta["splits"][split]["bytes"] == len("".join(lines).encode("utf-8"))
        assert meta["splits"][split]["separator"] == ""  # WikiText rows keep their own newlines
        assert meta["splits"][split]["made"] == "the source's own" and meta["splits"][split]["duplicates_removed"] == 0
    assert meta["split"] == {"carved": []}
    assert meta["bos"] is None  # GPT-2's tokenizer adds no BOS: its token ids are unchanged
    assert read_json("m/prepare.json")["corpus"]["test"]["tokens"] == meta["splits"]["test"]["tokens"]
    assert (project() / "pre" / "model.safetensors").is_file()
    assert meta["vocab_size"] == len(tokenizer) and meta["dtype"] == "<u2"


@pytest.mark.parametrize("vocab,dtype", [(1024, "<u2"), (50257, "<u2"), (65536, "<u2"), (65537, "<u4"), (151_936, "<u4")])
def test_dtype_rule(vocab, dtype):
    assert token_files.token_dtype(vocab) == np.dtype(dtype)


def _write_source(kind: str, root, docs: list[str]):
    """The documents `docs` as a user might have them: (data.name, data.text_column)."""
    if kind == "folder with train.jsonl":
        (root / "export").mkdir()
        (root / "export/train.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
        return root / "export", "content"
    if kind == "one .csv":
        pa.csv.write_csv(pa.table({"id": list(range(len(docs))), "body": docs}), root / "rows.csv")
        return root / "rows.csv", "body"
    if kind == "one .txt":  # a document a line
        (root / "lines.txt").write_text("".join(d.replace("\n", " ") + "\n" for d in docs))
        return root / "lines.txt", "text"
    if kind == "folder of .txt":
        (root / "docs/sub").mkdir(parents=True)
        for i, d in enumerate(docs):
            (root / ("docs/sub" if i % 2 else "docs") / f"{i:04d}.txt").write_text(d)
        return root / "docs", "text"
    if kind == "one-split parquet":
        pq.write_table(pa.table({"article": docs}), root / "train.parquet")
        return root / "train.parquet", "article"
    if kind == ".jsonl.gz":
        with gzip.open(root / "export.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps({"content": d}) + "\n" for d in docs))
        return root / "export.jsonl.gz", "content"
    if kind == ".json array":
        (root / "export.json").write_text(json.dumps([{"content": d} for d in docs]))
        return root / "export.json", "content"
    raise ValueError(kind)


KINDS = ["folder with train.jsonl", "one .csv", "one .txt", "folder of .txt", "one-split parquet", ".jsonl.gz",
         ".json array"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_source_is_split_for_you_by_document(project, tmp_path, tokenizer, kind):
    import pyarrow.csv  # noqa: F401  (pa.csv)

    docs = articles()
    name, column = _write_source(kind, tmp_path, docs)
    meta = run_prepare(project, **{"data.name": str(name), "data.text_column": column})
    splits = {s: meta["splits"][s] for s in token_files.SPLITS}
    assert meta["split"] == {"carved": ["validation", "test"], "split_seed": 42, "validation_fraction": 0.05,
                             "test_fraction": 0.05}
    assert sum(s["documents"] for s in splits.values()) == len(docs)
    assert all(s["documents"] >= 3 for s in splits.values()), splits
    assert splits["validation"]["made"].startswith("carved from train: the rows whose keyed hash (data.split_seed 42)")
    # Nothing lost, nothing twice: every document's tokens land in exactly one split.
    kept = [d.replace("\n", " ") + "\n" for d in docs] if kind == "one .txt" else [d + "\n\n" for d in docs]
    per_doc = [len(ids) for ids in tokenizer(kept, add_special_tokens=False)["input_ids"]]
    assert sum(s["tokens"] for s in splits.values()) == sum(per_doc)
    text = {s: decoded(tokenizer, s) for s in token_files.SPLITS}
    for doc in kept[:20]:
        assert sum(t.count(doc) for t in text.values()) >= 1
        assert sum(doc in t for t in text.values()) == 1, doc[:40]


def test_the_same_params_give_the_same_split_whatever_the_training_seed(project, tmp_path):
    """A study's seeds vary training alone: every seed meets one test split; data.split_seed carves another."""
    name = str(ARTICLES)
    first = run_prepare(project, **{"data.name": name, "data.text_column": "content"})
    again = run_prepare(project, **{"data.name": name, "data.text_column": "content"})
    seed = run_prepare(project, **{"data.name": name, "data.text_column": "content", "seed": 7})
    other = run_prepare(project, **{"data.name": name, "data.text_column": "content", "data.split_seed": 7})
    digests = lambda meta: {s: meta["splits"][s]["documents_sha256"] for s in token_files.SPLITS}  # noqa: E731
    assert digests(again) == digests(first) == digests(seed)
    assert digests(other)["test"] != digests(first)["test"]
    assert read_json("m/prepare.info.json")["inputs"]["data.name"]["content_sha256"] == token_files.content_hash(ARTICLES)


@pytest.mark.parametrize("ending", ["", "\n"], ids=["rows-as-they-are", "rows-ending-in-a-newline"])
def test_planted_duplicates_never_cross_splits(project, tmp_path, tokenizer, ending):
    """Rows of structured data are documents, whatever they end in (JSONL, CSV, parquet and Hub text
    fields often end in a newline, which once made them read as running text: no dedup at all)."""
    docs = [d + ending for d in articles()]
    # The source's own splits, with 5 training documents planted in test and 2 in validation: removed there.
    (tmp_path / "own").mkdir()
    for split, rows in (("train", docs[:100]), ("validation", docs[100:120] + docs[:2]),
                        ("test", docs[120:] + docs[10:15])):
        (tmp_path / f"own/{split}.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in rows))
    meta = run_prepare(project, **{"data.name": str(tmp_path / "own"), "data.text_column": "content"})
    assert meta["split"] == {"carved": []}
    assert (meta["splits"]["validation"]["duplicates_removed"], meta["splits"]["test"]["duplicates_removed"]) == (2, 5)
    assert (meta["splits"]["validation"]["documents"], meta["splits"]["test"]["documents"]) == (20, 20)
    assert meta["splits"]["test"]["separator"] == "\n\n"
    assert docs[12].rstrip("\n") not in decoded(tokenizer, "test") and docs[12] in decoded(tokenizer, "train")
    # One file with a document 30 times over: carved by content, all its copies share one split.
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs + [docs[7]] * 30))
    meta = run_prepare(project, **{"data.name": str(tmp_path / "one.jsonl"), "data.text_column": "content"})
    holding = [s for s in token_files.SPLITS if docs[7] in decoded(tokenizer, s)]
    assert len(holding) == 1 and decoded(tokenizer, holding[0]).count(docs[7]) == 31


def test_a_folder_of_txt_documents_ending_in_a_newline_keeps_them_apart(project, tmp_path):
    """Each .txt file is a document, ending in a newline or not: a blank line after each, and a BOS
    before each for a tokenizer that adds one (they once ran together, joined as written)."""
    from ftstudy.synthetic import write_tiny_model

    docs = articles()
    (tmp_path / "docs").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "docs" / f"{i:04d}.txt").write_text(d + "\n")
    write_tiny_model("llama", tmp_path / "llama")
    meta = run_prepare(project, **{"model.name": str(tmp_path / "llama"), "data.name": str(tmp_path / "docs")})
    bos = meta["bos"]["id"]
    for split in token_files.SPLITS:
        tokens = token_files.load_tokens("prep", split)
        assert meta["splits"][split]["separator"] == "\n\n"
        assert int((tokens == bos).sum()) == meta["splits"][split]["documents"] >= 3


def test_a_bos_tokenizer_gets_bos_before_each_document(project, tmp_path):
    from ftstudy.synthetic import write_tiny_model

    write_tiny_model("llama", tmp_path / "llama")
    meta = run_prepare(project, **{"model.name": str(tmp_path / "llama"), "data.name": str(ARTICLES),
                                   "data.text_column": "content"})
    bos = meta["bos"]["id"]
    for split in token_files.SPLITS:
        tokens = token_files.load_tokens("prep", split)
        assert tokens[0] == bos and int((tokens == bos).sum()) == meta["splits"][split]["documents"]


def test_a_local_sources_revision_and_config_are_ignored_with_a_note(project, capsys):
    run_prepare(project, **{"data.name": str(ARTICLES), "data.text_column": "content",
                            "data.revision": "b08601e04326c79dfdd32d625aee71d232d685c3", "data.config": "wikitext-2-raw-v1"})
    assert (f"prepare: data.revision 'b08601e04326c79dfdd32d625aee71d232d685c3' and data.config 'wikitext-2-raw-v1' "
            f"ignored: {ARTICLES} is a local file") in capsys.readouterr().out


def test_a_general_set_may_be_one_local_file(project, tmp_path):
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in articles()[:30]))
    meta = run_prepare(project, **{"data.general": [{"name": str(tmp_path / "general.jsonl"), "revision": None,
                                                     "config": None, "split": "test", "text_column": "body"}]})
    assert meta["splits"]["general-general.jsonl-test"]["documents"] == 30


# -- bad input: one line naming the problem, before anything is written ---------------------

def _refused(project, tmp_path, error, pattern: str, **overrides) -> None:
    project(**overrides)
    with pytest.raises(error) as e:
        run_main(prepare, *PREPARE_ARGS)
    message = str(e.value)
    assert re.search(pattern, message), message
    assert "\n" not in message
    assert not (tmp_path / "prep").exists() and not (tmp_path / "pre").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_malformed_json_line_is_named_by_its_number(project, tmp_path):
    lines = [json.dumps({"content": d}) for d in articles()]
    lines[57] = '{"content": "cut off'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    _refused(project, tmp_path, token_files.DataError, r"bad.jsonl: line 58 is not valid JSON \(Unterminated string .*; fix "
             r"or remove that line$", **{"data.name": str(tmp_path / "bad.jsonl"), "data.text_column": "content"})


def test_a_missing_field_or_column_lists_the_ones_there(project, tmp_path):
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table({"id": [1, 2], "body": ["a", "b"]}), tmp_path / "rows.csv")
    _refused(project, tmp_path, token_files.DataError, r"rows.csv: no column 'text' \(data.text_column\); its columns are id, body$",
             **{"data.name": str(tmp_path / "rows.csv")})
    (tmp_path / "rows.jsonl").write_text('{"id": 1, "body": "a"}\n')
    _refused(project, tmp_path, token_files.DataError, r"rows.jsonl, line 1: no field 'content' \(data.text_column\); its "
             r"fields are id, body; set data.text_column", **{"data.name": str(tmp_path / "rows.jsonl"),
                                                              "data.text_column": "content"})


def test_an_empty_file_is_refused(project, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    _refused(project, tmp_path, token_files.DataError, r"empty.jsonl: the file is empty; give it text$",
             **{"data.name": str(tmp_path / "empty.jsonl")})


def test_a_split_that_comes_out_too_small_says_what_it_has_and_needs(project, tmp_path):
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in articles()[:12]))
    _refused(project, tmp_path, token_files.DataError,
             r"few.jsonl: split '(validation|test)' (came out empty \(0 documents\)|has [\d,]+ tokens in \d+ document\(s\), "
             r"fewer than one block \(data.block_size=128\)); raise data.(validation|test)_fraction \(now 0.05\) or give "
             r"the source more text", **{"data.name": str(tmp_path / "few.jsonl")})


@pytest.mark.parametrize("overrides,message", [
    ({"data.validation_fraction": 0.0}, "data.validation_fraction: must be in (0, 1), got 0.0"),
    ({"data.test_fraction": 1.5}, "data.test_fraction: must be in (0, 1), got 1.5"),
    ({"data.validation_fraction": 0.5, "data.test_fraction": 0.5},
     "data.validation_fraction + data.test_fraction: 0.5 + 0.5 leaves no training data; keep their sum under 1"),
])
def test_fractions_outside_their_range_are_refused_naming_the_key(project, overrides, message):
    project(**overrides)
    with pytest.raises(ConfigError) as e:
        load_params()
    assert message in str(e.value)


def test_a_folder_without_training_data_says_what_it_expected(project, tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only/test.jsonl").write_text('{"text": "x"}\n')
    _refused(project, tmp_path, token_files.DataError, r"only: split files for test but none for train",
             **{"data.name": str(tmp_path / "only")})
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing/notes.md").write_text("x")
    _refused(project, tmp_path, token_files.DataError, r"nothing: no split files and no .txt documents; expected train.jsonl",
             **{"data.name": str(tmp_path / "nothing")})


def test_non_utf8_text_names_the_file_and_line(project, tmp_path):
    (tmp_path / "src").mkdir()
    for split in token_files.SPLITS:
        (tmp_path / f"src/{split}.txt").write_bytes(b"fine line\n" * 300 + (b"\xff\xfe broken\n" if split == "train" else b""))
    _refused(project, tmp_path, token_files.DataError, r"train.txt: line 301 is not UTF-8", **{"data.name": str(tmp_path / "src")})


def test_too_short_split_is_refused_and_old_outputs_survive(project, tmp_path):
    run_main(prepare, *PREPARE_ARGS)
    before = (tmp_path / "prep" / "train.bin").read_bytes()
    short = tmp_path / "short"
    short.mkdir()
    for split in ("train", "validation", "test"):
        (short / f"{split}.txt").write_text("The town of Marven . \n" * (1 if split == "test" else 50))
    project(**{"data.name": str(short)})
    with pytest.raises(token_files.DataError, match=r"test.txt: split 'test' has \d+ tokens in 1 document\(s\), fewer than one "
                                             r"block \(data.block_size=128\); give it more text, or lower data.block_size"):
        run_main(prepare, *PREPARE_ARGS)
    assert (tmp_path / "prep" / "train.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_truncated_token_file_is_detected(project, tmp_path):
    run_main(prepare, *PREPARE_ARGS)
    path = tmp_path / "prep" / "test.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(token_files.DataError, match="the file is truncated"):
        token_files.load_tokens(tmp_path / "prep", "test")


def test_block_size_beyond_the_context_is_refused_before_tokenizing(project, tmp_path):
    project(**{"data.block_size": 512})
    with pytest.raises(ConfigError, match=r"data.block_size: 512 exceeds the context of .*tiny-gpt2 \(128 tokens\); set it to at most 128"):
        run_main(prepare, *PREPARE_ARGS)
    assert not (tmp_path / "prep").exists()


def test_empty_split_file_is_refused(project, tmp_path):
    (tmp_path / "empty").mkdir()
    for split in ("train", "validation", "test"):
        (tmp_path / f"empty/{split}.txt").write_text("" if split == "validation" else "word " * 400)
    _refused(project, tmp_path, token_files.DataError, r"validation.txt: split 'validation' came out empty \(0 documents\); "
             r"give it more text", **{"data.name": str(tmp_path / "empty")})


def test_passages_are_joined_with_a_blank_line_and_wikitext_rows_as_written(tmp_path, tokenizer):
    passages = ["He ate the cake", "Her friend left early", "", "The river rose"]  # LAMBADA-shaped
    pq.write_table(pa.table({"text": passages}), tmp_path / "test.parquet")
    source = sources.source_splits(str(tmp_path / "test.parquet"), None, None, sources.text_field("text"))["train"]
    separator, rows = splits.join_rows(source.rows(), source.documents)
    assert separator == "\n\n"
    ids = tokenizer([r for batch in rows for r in batch], add_special_tokens=False)["input_ids"]
    text = tokenizer.decode([i for row in ids for i in row])
    assert text == "He ate the cake\n\nHer friend left early\n\nThe river rose\n\n"
    # Rows that end in their own newline (WikiText) are joined as written.
    wikitext = sources.source_splits(str(TINY_WIKI), None, None, sources.text_field("text"))["test"]
    separator, wiki = splits.join_rows(wikitext.rows(), wikitext.documents)
    assert separator == "" and "".join(r for batch in wiki for r in batch) == (TINY_WIKI / "wiki.test.raw").read_text()
    # A Hub dataset's rows: one line each, ending in its newline (WikiText on the Hub), is a running
    # text; documents, ending in a newline or not, get their blank line.
    assert splits.join_rows(iter([[" = Title = \n", "", " Some text .\n"]]))[0] == ""
    separator, docs = splits.join_rows(iter([["First doc.\nIts second line.\n", "Second doc.\n"]]))
    assert separator == "\n\n" and next(docs) == ["First doc.\nIts second line.\n\n", "Second doc.\n\n"]


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_its_first_column(project, tmp_path, tokenizer):
    """Excel's "CSV UTF-8" starts with a BOM, which once stuck to the first column's name, invisibly:
    "no column 'content'; its columns are content, title". The same for JSON Lines and text."""
    docs = articles()
    with open(tmp_path / "rows.csv", "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["content", "title"])
        writer.writerows([d, f"t{i}"] for i, d in enumerate(docs))
    meta = run_prepare(project, **{"data.name": str(tmp_path / "rows.csv"), "data.text_column": "content"})
    assert sum(meta["splits"][s]["documents"] for s in token_files.SPLITS) == len(docs)
    (tmp_path / "rows.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"content": d}) + "\n" for d in docs).encode())
    meta = run_prepare(project, **{"data.name": str(tmp_path / "rows.jsonl"), "data.text_column": "content"})
    assert sum(meta["splits"][s]["documents"] for s in token_files.SPLITS) == len(docs)
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbf" + (TINY_WIKI / "wiki.train.raw").read_bytes())
    run_prepare(project, **{"data.name": str(tmp_path / "notes.txt")})
    assert "\ufeff" not in decoded(tokenizer, "train") + decoded(tokenizer, "test")
