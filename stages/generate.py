"""Stage generate@<model>: a model + generate.* -> its continuations (JSON) and their quality metrics.

The texts go to --out; distinct-n, repetition, length and EOS rate to --metrics (a DVC metric).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpt2study import generation, modeling, runtime
from gpt2study.config import load_params
from gpt2study.errors import run_stage
from gpt2study.outputs import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description="Continue the prompts; run by dvc.yaml stage generate@<model>")
    ap.add_argument("--model", required=True, help="model folder (full model or PEFT adapter)")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--out", required=True, help="JSON of generated texts to write")
    ap.add_argument("--metrics", required=True, help="generation-quality metrics JSON to write")
    args = ap.parse_args()
    p = load_params()
    tokenizer = modeling.load_tokenizer(args.model)
    prompts = (p.generate.prompt, *p.generate.extra_prompts)
    generation.check_room({t: len(tokenizer(t)["input_ids"]) for t in prompts}, p.generate.max_new_tokens,
                          modeling.context_length(args.base))
    model = modeling.load_for_eval(args.model, args.base, p.model.name)
    device = runtime.eval_device()  # after loading: the machine's load is measured over the loading
    model = model.to(device)
    with torch.no_grad():
        panel, ids = generation.generate(model, tokenizer, p.generate, p.seed, device)
    quality = generation.text_quality(ids, tokenizer.eos_token_id)
    write_json(args.out, {"prompts": panel})
    write_json(args.metrics, {Path(args.metrics).stem: quality})  # keyed by the model, as evaluate's
    print(f"generate@{Path(args.metrics).stem}: {quality['texts']} distinct continuations of up to {p.generate.max_new_tokens} tokens for "
          f"{len(panel)} prompt(s), distinct-2 {quality['distinct_2']:.3f}; wrote {args.out}, {args.metrics}")


if __name__ == "__main__":
    run_stage(main)
