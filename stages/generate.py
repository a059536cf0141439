"""Stage generate@<model>: a model + generate.* -> its continuations (JSON) and their quality metrics.

One stage entry per model, as evaluate has: a retrained model (`-S lora.r=16`) regenerates its
own texts alone. On a real model answering held-out examples is minutes a model (1,059 s for three
once, one example at a time, on a 135M model on 2 CPU cores; they are answered generate.batch_size
at a time now); on the demo a process a model costs a second or two warm.
The command takes one --model or several. For each model folder, the texts go to
<--out>/<model>.json and distinct-n, repetition, length and EOS rate to <--metrics>/<model>.json
(a DVC metric), <model> being the folder's name. For
instruction data (the prepared meta's format), each model also answers generate.answer_examples
held-out test examples (a sample drawn by data.split_seed, the same for every model and every
training seed; greedy, each stopped at EOS, end of turn or twice its reference's tokens), each kept
beside its reference with its generate.answer_metrics scores (ftstudy.measure.answers), whose means and 95%
intervals over examples (resampled by `seed`) go to the metrics ("answers"); stage compare pairs them
between models. An example whose reference data.block_size cut is never drawn (a whole, correct
answer would score below 1 against it): the metrics count them ("answers_truncated_left_out"). The
report shows the first generate.test_prompts of them. generate.prompt: auto prompts with the user's
own held-out data: the openings of test documents drawn by data.split_seed (articles, or evenly
spaced points of a running text), or the held-out prompts of instruction data; every answer stops at
EOS or the chat template's end of turn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ftstudy import modeling, runtime
from ftstudy.config import load_params
from ftstudy.data import examples, token_files
from ftstudy.errors import run_stage
from ftstudy.measure import generation
from ftstudy.measure.answers import score
from ftstudy.measure.stats import score_row
from ftstudy.outputs import write_json

CUT = ("their reference (the last answer) was cut to data.block_size tokens, and a whole, correct answer scores "
       "below 1 against it; raise data.block_size to score them")


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
    modeling.leave_out_bitsandbytes(args.base)
    tokenizers = {m: modeling.load_tokenizer(m) for m in args.model}
    tokenizer = next(iter(tokenizers.values()))  # the snapshot's, saved with every model
    context = modeling.context_length(args.base)
    meta = token_files.read_meta(args.data)
    test = examples.load(args.data, "test", meta) if token_files.is_instruct(meta) else None
    g = p.generate
    # Drawn by data.split_seed: a study's seeds vary training alone, and every run answers the same examples.
    scored = (generation.heldout(len(test), max(g.answer_examples, g.test_prompts), p.data.split_seed, test.cut)
              if test is not None else [])
    left_out = len(test.cut) if test is not None else 0  # examples whose reference data.block_size cut: none drawn
    shown = scored[:g.test_prompts]  # the report's few are the first of the scored ones
    prompts = panel_prompts(p, args.data, meta, tokenizer, test, shown)
    generation.check_room({t: len(ids) for t, ids in prompts}, p.generate.max_new_tokens, context)
    for folder, tokenizer in tokenizers.items():
        name = Path(folder).name
        model, device = runtime.to_eval_device(modeling.load_for_eval(folder, args.base, p.model.name),
                                               p.train.cpu_threads)
        with torch.no_grad():
            panel, ids = generation.generate(model, tokenizer, p.generate, p.seed, device, prompts)
            answers = (generation.answer_heldout(model, tokenizer, test, scored, context, device, g.batch_size)
                       if scored else [])
        quality = generation.text_quality(ids, tokenizer.eos_token_id)
        if g.answer_examples and answers:
            for a in answers:
                a["scores"] = score(a["answer"], a["reference"], g.answer_metrics)
            quality["answers"] = score_row({m: [a["scores"][m] for a in answers] for m in g.answer_metrics},
                                           p.evaluate.bootstrap_samples, p.seed)
        texts = {"prompts": panel, "heldout": answers, "shown": len(shown)}
        if test is not None:
            quality["answers_truncated_left_out"] = left_out
            texts["left_out"] = {"answers_truncated": left_out, "why": CUT}
        write_json(Path(args.out) / f"{name}.json", texts)
        write_json(Path(args.metrics) / f"{name}.json", {name: quality})  # keyed by the model, as evaluate's
        print(f"generate: {name}: {quality['texts']} distinct continuations of up to {p.generate.max_new_tokens} "
              f"tokens for {len(panel)} prompt(s), distinct-2 {quality['distinct_2']:.3f}")
    print(f"generate: wrote {len(tokenizers)} models' texts to {args.out}/ and metrics to {args.metrics}/"
          + (f"; {left_out} held-out example(s) left out of answer scoring: {CUT}" if left_out else ""))


def panel_prompts(p, data_dir, meta: dict, tokenizer, test, picked: list[int]) -> list[tuple[str, list[int]]]:
    """The panel's prompts, (text, ids) each: generate.prompt and generate.extra_prompts; with
    generate.prompt auto, in its place the openings of generate.test_prompts held-out test
    documents (drawn by data.split_seed), or for instruction data the held-out prompts themselves."""
    g = p.generate
    if g.prompt != "auto":
        own = [(g.prompt, tokenizer(g.prompt)["input_ids"])]
    elif test is not None:
        own = generation.heldout_prompts(tokenizer, test, picked)
    else:
        own = generation.openings(tokenizer, token_files.load_tokens(data_dir, "test", meta),
                                  token_files.unit_starts(data_dir, "test", meta), max(1, g.test_prompts),
                                  p.data.split_seed)
    return own + [(t, tokenizer(t)["input_ids"]) for t in g.extra_prompts]


if __name__ == "__main__":
    run_stage(main)
