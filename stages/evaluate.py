"""Stage evaluate@<model>: a model + prepared validation/test tokens -> perplexity metrics JSON.

Both protocols over whole splits, weighted by tokens: val_ppl/test_ppl slide a block_size window
by evaluate.stride (HF perplexity guide); *_ppl_blocks score non-overlapping blocks (run_clm).
A LoRA model is scored as base plus adapter.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stages import data, modeling, scoring
from stages.config import load_params
from stages.outputs import write_json


def evaluate(model, data_dir: str, block: int, stride: int, batch_size: int, device) -> dict:
    metrics: dict = {}
    for split, short in (("validation", "val"), ("test", "test")):
        tokens = data.load_tokens(data_dir, split)
        sliding = scoring.sliding_window_nll(model, tokens, block, stride, device, batch_size, desc=f"{split} sliding")
        blocks = scoring.block_nll(model, tokens, block, device, batch_size, desc=f"{split} blocks")
        metrics |= {
            f"{short}_ppl": scoring.perplexity(sliding),
            f"{short}_ppl_blocks": scoring.perplexity(blocks),
            f"{short}_tokens": int(len(sliding)),
            f"{short}_tokens_blocks": int(len(blocks)),
        }
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description="Score a model; run by dvc.yaml stage evaluate@<model>")
    ap.add_argument("--model", required=True, help="model folder (full model or PEFT adapter)")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--data", required=True, help="prepared token folder")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    args = ap.parse_args()
    p = load_params()
    torch.manual_seed(p.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modeling.check_context(args.base, p.data.block_size)
    model = modeling.load_for_eval(args.model, args.base, p.model.name).to(device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    t0 = time.perf_counter()
    with autocast:
        metrics = evaluate(model, args.data, p.data.block_size, p.evaluate.stride, p.evaluate.batch_size, device)
    metrics |= {
        "tokens": metrics["val_tokens"] + metrics["test_tokens"],
        "block_size": p.data.block_size,
        "stride": p.evaluate.stride,
        "tokenizer": data.read_meta(args.data)["tokenizer"],
        "eval_time_s": round(time.perf_counter() - t0, 3),
        "precision": "bf16" if bf16 else "fp32",
    }
    write_json(args.out, metrics)
    print(f"evaluate: test_ppl {metrics['test_ppl']:.3f} (blocks {metrics['test_ppl_blocks']:.3f}), "
          f"val_ppl {metrics['val_ppl']:.3f} in {metrics['eval_time_s']:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
