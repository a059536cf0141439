"""Stage generate: each model + generate.* -> its continuations (JSON) and their quality metrics.

One stage for every model, where evaluate has one per model: generating is a second's work a
model, and a process a model cost more than that (about 4 s of imports each). A retrained model
reruns the others' generation too, which comes out the same (each prompt and sample is seeded).
For each model folder, the texts go to <--out>/<model>.json and distinct-n, repetition, length
and EOS rate to <--metrics>/<model>.json (a DVC metric), <model> being the folder's name. For
instruction data (the prepared meta's format), each model also answers generate.test_prompts
held-out test prompts (a sample seeded by `seed`, the same for every model), kept beside their
reference answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ftstudy import data, examples, generation, modeling, runtime
from ftstudy.config import load_params
from ftstudy.errors import run_stage
from ftstudy.outputs import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description="Continue the prompts with each model; run by dvc.yaml stage generate")
    ap.add_argument("--model", required=True, action="append", help="a model folder (full model or PEFT adapter); "
                    "repeat for each model")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--data", required=True, help="prepared token folder (its test examples, for instruction data)")
    ap.add_argument("--out", required=True, help="folder for each model's generated texts (<model>.json)")
    ap.add_argument("--metrics", required=True,
                    help="folder for each model's generation-quality metrics (<model>.json)")
    args = ap.parse_args()
    p = load_params()
    prompts = (p.generate.prompt, *p.generate.extra_prompts)
    tokenizers = {m: modeling.load_tokenizer(m) for m in args.model}
    context = modeling.context_length(args.base)
    for tokenizer in tokenizers.values():  # every model checked before any generates
        generation.check_room({t: len(tokenizer(t)["input_ids"]) for t in prompts}, p.generate.max_new_tokens, context)
    meta = data.read_meta(args.data)
    test = examples.load(args.data, "test", meta) if data.is_instruct(meta) else None
    picked = generation.heldout(len(test), p.generate.test_prompts, p.seed) if test is not None else []
    for folder, tokenizer in tokenizers.items():
        name = Path(folder).name
        model, device = runtime.to_eval_device(modeling.load_for_eval(folder, args.base, p.model.name))
        with torch.no_grad():
            panel, ids = generation.generate(model, tokenizer, p.generate, p.seed, device)
            answers = generation.answer_heldout(model, tokenizer, test, picked, p.generate.max_new_tokens, context,
                                                device) if picked else []
        quality = generation.text_quality(ids, tokenizer.eos_token_id)
        write_json(Path(args.out) / f"{name}.json", {"prompts": panel, "heldout": answers})
        write_json(Path(args.metrics) / f"{name}.json", {name: quality})  # keyed by the model, as evaluate's
        print(f"generate: {name}: {quality['texts']} distinct continuations of up to {p.generate.max_new_tokens} "
              f"tokens for {len(panel)} prompt(s), distinct-2 {quality['distinct_2']:.3f}")
    print(f"generate: wrote {len(tokenizers)} models' texts to {args.out}/ and metrics to {args.metrics}/")


if __name__ == "__main__":
    run_stage(main)
