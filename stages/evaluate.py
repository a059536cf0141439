"""Stage evaluate@<model>: a model + prepared token files -> perplexity metrics JSON.

For validation and test, both protocols over whole splits, weighted by tokens: val_ppl/test_ppl
slide a block_size window by evaluate.stride (HF perplexity guide); *_ppl_blocks score
non-overlapping blocks (run_clm). Each sliding-window perplexity carries a seeded 95% bootstrap
interval and bits per byte; every data.general set is scored the same way, to measure forgetting.
The protocol fingerprint is stored so that the report never mixes protocols. A LoRA model is
scored as base plus adapter.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stages import data, modeling, scoring
from stages.config import load_params
from stages.outputs import write_json


def sliding_metrics(model, tokens, n_bytes: int, p, device, desc: str) -> dict:
    """ppl, its interval, bits per byte and token count of one split under the sliding window."""
    nll = scoring.sliding_window_nll(model, tokens, p.data.block_size, p.evaluate.stride, device,
                                     p.evaluate.batch_size, desc=f"{desc} sliding")
    lo, hi = scoring.bootstrap_ppl_interval(nll, p.evaluate.bootstrap_chunk, p.evaluate.bootstrap_samples, p.seed)
    return {"ppl": scoring.perplexity(nll), "ppl_lo": lo, "ppl_hi": hi,
            "bpb": scoring.bits_per_byte(nll, n_bytes), "tokens": int(len(nll))}


def evaluate(model, data_dir: str, p, device) -> dict:
    meta = data.read_meta(data_dir)

    def split_metrics(split: str) -> tuple[dict, np.ndarray]:
        tokens = data.load_tokens(data_dir, split, meta)
        return sliding_metrics(model, tokens, meta["splits"][split]["bytes"], p, device, split), tokens

    metrics: dict = {}
    for split, short in (("validation", "val"), ("test", "test")):
        m, tokens = split_metrics(split)
        blocks = scoring.block_nll(model, tokens, p.data.block_size, device, p.evaluate.batch_size,
                                   desc=f"{split} blocks")
        metrics |= {f"{short}_{k}": v for k, v in m.items()}
        metrics |= {f"{short}_ppl_blocks": scoring.perplexity(blocks), f"{short}_tokens_blocks": int(len(blocks))}
    metrics["general"] = {data.general_label(g): split_metrics(data.general_split(g))[0] for g in p.data.general}
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
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        metrics = evaluate(model, args.data, p, device)
    meta = data.read_meta(args.data)
    metrics |= {
        "tokens": metrics["val_tokens"] + metrics["test_tokens"],
        "eval_time_s": round(time.perf_counter() - t0, 3),
        # Numbers are comparable only between runs with the same fingerprint.
        "protocol": {"context": p.data.block_size, "stride": p.evaluate.stride, "tokenizer": meta["tokenizer"],
                     "source": meta["source"], "val_tokens": metrics["val_tokens"],
                     "test_tokens": metrics["test_tokens"], "precision": "bf16" if bf16 else "fp32",
                     "bootstrap": f"{p.evaluate.bootstrap_samples} x {p.evaluate.bootstrap_chunk}-token chunks, seed {p.seed}"},
    }
    write_json(args.out, metrics)
    print(f"evaluate: test_ppl {metrics['test_ppl']:.3f} [{metrics['test_ppl_lo']:.3f}, {metrics['test_ppl_hi']:.3f}] "
          f"(blocks {metrics['test_ppl_blocks']:.3f}), {len(metrics['general'])} general set(s) "
          f"in {metrics['eval_time_s']:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
