"""GPT-2 124M's exact shapes, offline: a random-init model folder with the real tokenizer, and
WikiText-format corpora of a chosen size. Used by the real-shape tests, make bench and
scripts/gpu_check.py (the compute of random weights is the compute of the real ones)."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
TOKENIZER = ASSETS / "gpt2-tokenizer"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def write_gpt2_124m(out: Path, seed: int = 0, **config) -> Path:
    """A save_pretrained folder: GPT2Config() (124M, 1,024 context, 50,257 vocabulary; `config`
    overrides, e.g. n_layer=2 for a dry run) at seeded random init, beside the real tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, out / f)
    return out


def write_corpus(out: Path, split_bytes: dict[str, int]) -> Path:
    """wiki.{train,valid,test}.raw of about split_bytes[split] bytes each: the tiny WikiText-format
    corpus repeated, cut at a line end."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in split_bytes.items():
        piece = (ASSETS / "tiny-wikitext" / SPLIT_FILES[split]).read_bytes()
        text = piece * (n // len(piece) + 1)
        cut = text.rfind(b"\n", 0, n) + 1 or n
        (out / SPLIT_FILES[split]).write_bytes(text[:cut])
    return out
