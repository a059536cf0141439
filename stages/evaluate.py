"""Stage evaluate@<model>: a model + prepared token files -> perplexity metrics and the protocol.

For validation and test, both protocols over whole splits, weighted by tokens: val_ppl/test_ppl
slide a block_size window by evaluate.stride (HF perplexity guide); *_ppl_blocks score
non-overlapping blocks (run_clm). Each sliding-window perplexity carries a seeded 95% bootstrap
interval and bits per byte; every data.general set that prepare tokenized (its general-* splits,
read from the prepared meta, so that evaluate reads no data.general key) is scored the same way,
to measure forgetting.
The numbers go to --out (a DVC metric); the protocol fingerprint, which the report uses to refuse
mixed protocols, goes to --info; the test split's per-token NLL to --nll, for the paired
comparisons of stage compare. A LoRA model is scored as base plus adapter.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ftstudy import data, modeling, runtime, scoring, stats
from ftstudy.config import load_params
from ftstudy.errors import run_stage
from ftstudy.outputs import write_array, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description="Score a model; run by dvc.yaml stage evaluate@<model>")
    ap.add_argument("--model", required=True, help="model folder (full model or PEFT adapter)")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--data", required=True, help="prepared token folder")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--info", required=True, help="protocol JSON to write")
    ap.add_argument("--nll", required=True, help="the test split's per-token NLL (.npy) to write")
    args = ap.parse_args()
    p = load_params()
    torch.manual_seed(p.seed)
    modeling.check_context(args.base, p.data.block_size)
    model, device = runtime.to_eval_device(modeling.load_for_eval(args.model, args.base, p.model.name))
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    meta = data.read_meta(args.data)
    block = p.data.block_size

    def split_metrics(split: str, desc: str) -> tuple[dict, object]:
        tokens = data.load_tokens(args.data, split, meta)
        return scoring.sliding_metrics(model, tokens, meta["splits"][split]["bytes"], block, p.evaluate, p.seed,
                                       device, desc=f"{desc} sliding")

    t0 = time.perf_counter()
    metrics: dict = {}
    nlls = {}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for split, short in (("validation", "val"), ("test", "test")):
            m, nlls[split] = split_metrics(split, split)
            metrics |= {f"{short}_{k}": v for k, v in m.items()}
            blocks = scoring.block_nll(model, data.load_tokens(args.data, split, meta), block, device,
                                       p.evaluate.batch_size, desc=f"{split} blocks")
            metrics[f"{short}_ppl_blocks"] = stats.perplexity(blocks)
        metrics["general"] = {label: split_metrics(split, label)[0] for split, label in data.general_splits(meta)}
    info = {
        "eval_time_s": round(time.perf_counter() - t0, 3),
        # Numbers are comparable only between runs with the same protocol.
        "protocol": {"model": p.model.name, "context": block, "stride": p.evaluate.stride,
                     "tokenizer": meta["tokenizer"], "source": meta["source"], "config": meta["config"],
                     "bos": meta.get("bos"), "val_tokens": metrics["val_tokens"],
                     "test_tokens": metrics["test_tokens"], "test_tokens_blocks": len(blocks),
                     "precision": "bf16" if bf16 else "fp32",
                     "bootstrap": f"{p.evaluate.bootstrap_samples} x {p.evaluate.bootstrap_chunk}-token chunks, "
                                  f"seed {p.seed}"},
    }
    write_array(args.nll, nlls["test"].astype("float32"))
    write_json(args.info, info)
    # Keyed by the model (the --out file's name), so `dvc exp show` columns read lora.test_ppl.
    write_json(args.out, {Path(args.out).stem: metrics})
    print(f"evaluate@{Path(args.out).stem}: test_ppl {metrics['test_ppl']:.3f} [{metrics['test_ppl_lo']:.3f}, {metrics['test_ppl_hi']:.3f}] "
          f"(blocks {metrics['test_ppl_blocks']:.3f}), {len(metrics['general'])} general set(s) "
          f"in {info['eval_time_s']:.1f} s; wrote {args.out}, {args.info}")


if __name__ == "__main__":
    run_stage(main)
