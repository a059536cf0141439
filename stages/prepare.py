"""Stage prepare: data.* and model.name -> token files, their meta, a pretrained snapshot, token counts.

Writes --out/{train,validation,test}.bin, one general-<name>.bin per data.general source, meta.json, --pretrained (save_pretrained snapshot of
model.name, so later stages never reach the hub) and --metrics (token counts per split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2study import data, hub, modeling
from gpt2study.config import load_params
from gpt2study.errors import run_stage
from gpt2study.outputs import atomic_dir, write_json


def prepare(p, out: Path, tokenizer) -> dict:
    """Tokenize every split of the source into `out` (a fresh folder); return meta."""
    dtype = data.token_dtype(len(tokenizer))
    splits = {}
    jobs = [(split, p.data.name, p.data.config, split) for split in data.SPLITS]
    jobs += [(data.general_split(g), g.name, g.config, g.split) for g in p.data.general]
    for split, name, config, source_split in jobs:
        source, rows = data.iter_rows(name, config, source_split)
        counts = data.tokenize_to_file(rows, tokenizer, out / f"{split}.bin", dtype)
        if counts["tokens"] == 0:
            raise data.DataError(f"{source}: split '{split}' is empty; give it text")
        if counts["tokens"] < p.data.block_size:
            raise data.DataError(
                f"{source}: split '{split}' has {counts['tokens']} tokens, fewer than one block "
                f"(data.block_size={p.data.block_size}); give it more text or lower data.block_size")
        splits[split] = {"source": source, **counts}
        print(f"prepare: {split}: {counts['tokens']:,} tokens from {source}")
    return {"dtype": dtype.str, "vocab_size": len(tokenizer), "tokenizer": p.model.name,
            "source": p.data.name, "config": p.data.config, "splits": splits}


def main() -> None:
    ap = argparse.ArgumentParser(description="Tokenize the corpus; run by dvc.yaml stage prepare")
    ap.add_argument("--out", required=True, help="folder for the token files")
    ap.add_argument("--pretrained", required=True, help="folder for the pretrained snapshot")
    ap.add_argument("--metrics", required=True, help="token-count metrics JSON")
    args = ap.parse_args()
    p = load_params()
    sources = [("model.name", p.model.name, "model"), ("data.name", p.data.name, "dataset")]
    sources += [(f"data.general[{i}].name", g.name, "dataset") for i, g in enumerate(p.data.general)]
    hub.require([s for s in sources if not data.is_local(s[1])])
    modeling.check_context(p.model.name, p.data.block_size)
    tokenizer = modeling.load_tokenizer(p.model.name)
    with atomic_dir(args.out) as tmp:
        meta = prepare(p, tmp, tokenizer)
        write_json(tmp / data.META_FILE, meta)
    with atomic_dir(args.pretrained) as tmp:
        modeling.snapshot(p.model.name, tmp)
    write_json(args.metrics, {"corpus": {s: {"tokens": v["tokens"], "bytes": v["bytes"]} for s, v in meta["splits"].items()}})
    total = sum(v["tokens"] for v in meta["splits"].values())
    print(f"prepare: {total:,} tokens ({meta['dtype']}); wrote {args.out}, {args.pretrained}, {args.metrics}")


if __name__ == "__main__":
    run_stage(main)
