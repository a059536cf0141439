"""Stage evaluate@<model>: a model + prepared token files -> perplexity metrics and the protocol.

For validation and test, both protocols over whole splits, weighted by tokens: val_ppl/test_ppl
slide a block_size window by evaluate.stride (HF perplexity guide); *_ppl_blocks score
non-overlapping blocks (run_clm). Each sliding-window perplexity carries a seeded 95% bootstrap
interval (from ftstudy.measure.stats.MIN_CHUNKS units on, resampling the split's independent units:
documents, WikiText articles, or chunks of a running text without them) and bits per byte; every data.general set that
prepare tokenized (its general-* splits, read from the prepared meta, so that evaluate reads no
data.general key) is scored the same way, to measure forgetting. Before scoring, the fast path
(body + output projection) is checked against the model's own forward on one window; where they
differ, the model's own forward scores everything, and a line says why.
The numbers go to --out (a DVC metric); the protocol fingerprint, which the report uses to refuse
mixed protocols, and the scoring path go to --info; the per-token NLL of the test split and of each
general set to --nll (.npz), for the paired comparisons of stage compare. A LoRA model is scored as
base plus adapter. Instruction data (data.format prompt_completion or messages) is scored on its
answer tokens alone, each example by itself, its interval resampling whole examples; the general
sets stay running text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ftstudy import modeling, runtime
from ftstudy.config import load_params
from ftstudy.data import token_files
from ftstudy.errors import run_stage
from ftstudy.measure import scoring, stats
from ftstudy.outputs import write_arrays, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description="Score a model; run by dvc.yaml stage evaluate@<model>")
    ap.add_argument("--model", required=True, help="model folder (full model or PEFT adapter)")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--data", required=True, help="prepared token folder")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--info", required=True, help="protocol JSON to write")
    ap.add_argument("--nll", required=True, help="per-token NLL of the test split and each general set (.npz) to write")
    args = ap.parse_args()
    p = load_params()
    modeling.leave_out_bitsandbytes(args.base)
    name = Path(args.out).stem
    torch.manual_seed(p.seed)
    modeling.check_context(args.base, p.data.block_size)
    model, device = runtime.to_eval_device(modeling.load_for_eval(args.model, args.base, p.model.name),
                                           p.train.cpu_threads)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    meta = token_files.read_meta(args.data)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        metrics, arrays, path = scoring.score_all(model, args.data, meta, p.data.block_size, p.evaluate, p.seed,
                                                  device, f"evaluate@{name}")
    instruct = token_files.is_instruct(meta)
    val_unit = "examples" if instruct else meta["splits"]["validation"].get("units", "chunks")
    info = {
        "eval_time_s": round(time.perf_counter() - t0, 3),
        # Numbers are comparable only between runs with the same protocol.
        "protocol": {"model": p.model.name, "format": meta.get("format", "text"),
                     "scored": "answer tokens, each example alone" if instruct else "sliding window",
                     "context": p.data.block_size, "stride": p.evaluate.stride,
                     "tokenizer": meta["tokenizer"], "source": meta["source"], "config": meta["config"],
                     "bos": meta.get("bos"), "val_tokens": metrics["val_tokens"], "test_tokens": metrics["test_tokens"],
                     **({"test_examples": metrics["test_examples"]} if instruct else
                        {"test_tokens_blocks": metrics.pop("test_tokens_blocks")}),
                     "precision": "bf16 autocast" if bf16 else "fp32",
                     "bootstrap": {"samples": p.evaluate.bootstrap_samples,
                                   "chunk": "example" if instruct else p.evaluate.bootstrap_chunk,
                                   "min_chunks": stats.MIN_CHUNKS, "seed": p.seed,
                                   # what each interval resamples: examples, documents, articles or chunks
                                   "units": {k.removesuffix("_unit"): str(v) for k, v in arrays.items()
                                             if k.endswith("_unit")} | {"validation": val_unit}}},
        "scoring": {k: v for k, v in path.items() if v is not None},
    }
    metrics.pop("val_tokens_blocks", None)
    write_arrays(args.nll, arrays)
    write_json(args.info, info)
    # Keyed by the model (the --out file's name), so `dvc exp show` columns read lora.test_ppl.
    write_json(args.out, {name: metrics})
    print(f"evaluate@{name}: test_ppl {_ppl(metrics, 'test_ppl')}"
          + (f" over {metrics['test_tokens']:,} answer tokens" if instruct else f" (blocks {metrics['test_ppl_blocks']:.3f})")
          + f", {len(metrics['general'])} general set(s) in {info['eval_time_s']:.1f} s; wrote {args.out}, "
          f"{args.info}, {args.nll}")


def _ppl(m: dict, key: str) -> str:
    interval = f"[{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]" if key + "_lo" in m else "(too few units for an interval)"
    return f"{m[key]:.3f} {interval}"


if __name__ == "__main__":
    run_stage(main)
