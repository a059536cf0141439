import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PREPARE_ARGS, TINY_MODEL, TINY_WIKI, run_main
from ftstudy import data, modeling, sources
from ftstudy.config import ConfigError
from ftstudy.outputs import read_json
from stages import prepare


@pytest.fixture(scope="module")
def tokenizer():
    return modeling.load_tokenizer(TINY_MODEL)


def test_token_counts_equal_direct_tokenization(project, tokenizer):
    run_main(prepare, *PREPARE_ARGS)
    meta = read_json("prep/meta.json")
    for split, raw in (("train", "wiki.train.raw"), ("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        lines = (TINY_WIKI / raw).read_text(encoding="utf-8").splitlines(keepends=True)
        direct = [i for row in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in row]
        tokens = data.load_tokens("prep", split)
        assert tokens.dtype == np.dtype("<u2")
        assert tokens.tolist() == direct
        assert meta["splits"][split]["tokens"] == len(direct)
        assert meta["splits"][split]["bytes"] == len("".join(lines).encode("utf-8"))
        assert meta["splits"][split]["separator"] == ""  # WikiText rows keep their own newlines
    assert meta["bos"] is None  # GPT-2's tokenizer adds no BOS: its token ids are unchanged
    assert read_json("m/prepare.json")["corpus"]["test"]["tokens"] == meta["splits"]["test"]["tokens"]
    assert (project() / "pre" / "model.safetensors").is_file()
    assert meta["vocab_size"] == len(tokenizer) and meta["dtype"] == "<u2"


@pytest.mark.parametrize("vocab,dtype", [(1024, "<u2"), (50257, "<u2"), (65536, "<u2"), (65537, "<u4"), (151_936, "<u4")])
def test_dtype_rule(vocab, dtype):
    assert data.token_dtype(vocab) == np.dtype(dtype)


def _direct(tokenizer, path):
    rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [i for r in tokenizer(rows, add_special_tokens=False)["input_ids"] for i in r]


@pytest.mark.parametrize("fmt", ["txt", "parquet"])
def test_one_file_per_split_formats(tmp_path, tokenizer, fmt):
    for split, raw in (("train", "wiki.train.raw"), ("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        rows = (TINY_WIKI / raw).read_text(encoding="utf-8").splitlines(keepends=True)
        if fmt == "txt":
            (tmp_path / f"{split}.txt").write_text("".join(rows), encoding="utf-8")
        else:
            pq.write_table(pa.table({"text": rows}), tmp_path / f"{split}.parquet")
    for split, raw in (("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        source, rows = sources.iter_rows(str(tmp_path), None, split)
        assert source.endswith(f"{split}.{fmt}")
        counts = sources.tokenize_to_file(rows, tokenizer, tmp_path / "out.bin", np.dtype("<u2"))
        assert np.fromfile(tmp_path / "out.bin", dtype="<u2").tolist() == _direct(tokenizer, TINY_WIKI / raw)
        assert counts["tokens"] == len(_direct(tokenizer, TINY_WIKI / raw))


def test_missing_split_file_names_the_choices(tmp_path):
    (tmp_path / "train.txt").write_text("hello\n")
    with pytest.raises(data.DataError, match="no file for split 'validation'; expected one of wiki.valid.raw"):
        sources.iter_rows(str(tmp_path), None, "validation")


def test_non_utf8_text_names_the_file(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_bytes(b"fine line\n\xff\xfe broken\n")
    _, rows = sources.iter_rows(str(tmp_path), None, "train")
    with pytest.raises(data.DataError, match=r"train.txt: line 2 is not UTF-8"):
        sources.tokenize_to_file(rows, tokenizer, tmp_path / "x.bin", np.dtype("<u2"))


def test_too_short_split_is_refused_and_old_outputs_survive(project, tmp_path):
    run_main(prepare, *PREPARE_ARGS)
    before = (tmp_path / "prep" / "train.bin").read_bytes()
    short = tmp_path / "short"
    short.mkdir()
    for split in ("train", "validation", "test"):
        (short / f"{split}.txt").write_text("The town of Marven . \n" * (1 if split == "test" else 50))
    project(**{"data.name": str(short)})
    with pytest.raises(data.DataError, match=r"test.txt: split 'test' has \d+ tokens, fewer than one block \(data.block_size=128\)"):
        run_main(prepare, *PREPARE_ARGS)
    assert (tmp_path / "prep" / "train.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_truncated_token_file_is_detected(project, tmp_path):
    run_main(prepare, *PREPARE_ARGS)
    path = tmp_path / "prep" / "test.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(data.DataError, match="the file is truncated"):
        data.load_tokens(tmp_path / "prep", "test")


def test_block_size_beyond_the_context_is_refused_before_tokenizing(project, tmp_path):
    project(**{"data.block_size": 512})
    with pytest.raises(ConfigError, match=r"data.block_size: 512 exceeds the context of .*tiny-gpt2 \(128 tokens\); set it to at most 128"):
        run_main(prepare, *PREPARE_ARGS)
    assert not (tmp_path / "prep").exists()


def test_empty_split_is_refused(project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "validation", "test"):
        (empty / f"{split}.txt").write_text("" if split == "validation" else "word " * 400)
    project(**{"data.name": str(empty)})
    with pytest.raises(data.DataError, match=r"validation.txt: split 'validation' is empty; give it text"):
        run_main(prepare, *PREPARE_ARGS)


def test_passages_are_joined_with_a_blank_line_and_wikitext_rows_as_written(tmp_path, tokenizer):
    passages = ["He ate the cake", "Her friend left early", "", "The river rose"]  # LAMBADA-shaped
    for split in ("train", "validation", "test"):
        pq.write_table(pa.table({"text": passages}), tmp_path / f"{split}.parquet")
    _, rows = sources.iter_rows(str(tmp_path), None, "test")
    separator, rows = sources.join_rows(rows)
    assert separator == "\n\n"
    sources.tokenize_to_file(rows, tokenizer, tmp_path / "out.bin", np.dtype("<u2"))
    text = tokenizer.decode(np.fromfile(tmp_path / "out.bin", dtype="<u2").tolist())
    assert text == "He ate the cake\n\nHer friend left early\n\nThe river rose\n\n"
    assert "cakeHer" not in text and "earlyThe" not in text
    # Rows that end in their own newline (WikiText) are joined as written: the tokens do not change.
    _, wiki = sources.iter_rows(str(TINY_WIKI), None, "test")
    separator, wiki = sources.join_rows(wiki)
    assert separator == ""
    sources.tokenize_to_file(wiki, tokenizer, tmp_path / "wiki.bin", np.dtype("<u2"))
    assert np.fromfile(tmp_path / "wiki.bin", dtype="<u2").tolist() == _direct(tokenizer, TINY_WIKI / "wiki.test.raw")
