"""GPT-2's real byte-level BPE, bundled in assets/gpt2-tokenizer (built by assets/build_gpt2_tokenizer.py)."""

import numpy as np
import pytest

from conftest import ASSETS, TINY_WIKI
from ftstudy import modeling
from ftstudy.data import token_files

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("gpt2_tokenizer")

TOKENIZER = ASSETS / "gpt2-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(TOKENIZER)


def test_ids_are_gpt2s(tok):
    assert tok("GPT-2 is a language model")["input_ids"] == [38, 11571, 12, 17, 318, 257, 3303, 2746]
    assert tok(" = Valkyria Chronicles III = \n")["input_ids"] == [796, 569, 18354, 7496, 17740, 6711, 796, 220, 198]
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.eos_token == "<|endoftext|>"
    assert token_files.token_dtype(len(tok)) == np.dtype("<u2")


def test_round_trip_on_wikitext_style_text(tok):
    text = (TINY_WIKI / "wiki.valid.raw").read_text(encoding="utf-8")[:20_000]
    text += " café — naïve “quotes” 東京 🙂 @-@ 1 @,@ 000 \n\n"
    ids = tok(text)["input_ids"]
    assert max(ids) < 50257 and tok.decode(ids) == text


def test_asset_is_small_and_licensed():
    files = {f.name: f.stat().st_size for f in TOKENIZER.iterdir()}
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "LICENSE"}
    assert sum(files.values()) < 5 * 2**20
    assert "MIT License" in (TOKENIZER / "LICENSE").read_text()
