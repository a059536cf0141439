"""Stage generate@<model>: a model + generate.* -> its continuations of the prompt (JSON).

One greedy continuation plus generate.num_samples sampled ones, sample i seeded with seed + i, so
the same params give the same text on the same machine.
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from stages import modeling
from stages.config import load_params
from stages.outputs import write_json


def generate(model, tokenizer, g, seed: int, device) -> dict:
    """{'prompt', 'greedy', 'samples'} for the generate params g."""
    inputs = tokenizer(g.prompt, return_tensors="pt").to(device)
    common = dict(max_new_tokens=g.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                  attention_mask=inputs["attention_mask"])

    def continuation(**kw) -> str:
        out = model.generate(input_ids=inputs["input_ids"], **common, **kw)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    greedy = continuation(do_sample=False)
    samples = []
    for i in tqdm(range(g.num_samples), desc="samples", leave=False):
        torch.manual_seed(seed + i)
        if g.temperature == 0:  # greedy: every "sample" is the greedy text
            samples.append(greedy)
        else:
            samples.append(continuation(do_sample=True, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p))
    return {"prompt": g.prompt, "greedy": greedy, "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description="Continue the prompt; run by dvc.yaml stage generate@<model>")
    ap.add_argument("--model", required=True, help="model folder (full model or PEFT adapter)")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--out", required=True, help="JSON of generated texts to write")
    args = ap.parse_args()
    p = load_params()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = modeling.load_for_eval(args.model, args.base, p.model.name).to(device)
    tokenizer = modeling.load_tokenizer(args.model)
    with torch.no_grad():
        texts = generate(model, tokenizer, p.generate, p.seed, device)
    write_json(args.out, texts)
    print(f"generate: greedy + {len(texts['samples'])} samples of {p.generate.max_new_tokens} tokens; wrote {args.out}")


if __name__ == "__main__":
    main()
