"""Seeded text generation for the prompt panel, answers to held-out test prompts (instruction
data), and token-level quality of what was generated.

For each prompt: one greedy continuation plus num_samples sampled ones (none at temperature 0,
where sampling is greedy), each sample seeded from (seed, prompt, sample), so the same params give
the same text on the same machine. The quality metrics count each distinct continuation of a
prompt once: a sample that repeats the greedy text or another sample adds nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ftstudy.config import ConfigError, GenerateParams


def check_room(prompt_lengths: dict[str, int], max_new_tokens: int, context: int | None) -> None:
    """Refuse, before any generation, a prompt that leaves no room for max_new_tokens in the
    model's context."""
    if context is None:
        return
    for prompt, n in prompt_lengths.items():
        if n + max_new_tokens > context:
            raise ConfigError(f"generate.max_new_tokens: {max_new_tokens} new tokens after the {n}-token prompt "
                              f"{prompt[:40]!r} exceed the model's context ({context} tokens); set it to at most "
                              f"{max(context - max(prompt_lengths.values()), 0)} or shorten the prompt")


def text_quality(continuations: list[list[int]], eos_id: int) -> dict:
    """Token-level quality of generated continuations (each a list of generated ids)."""
    cut = [c[:c.index(eos_id)] if eos_id in c else c for c in continuations]

    def distinct(n: int) -> float:
        grams = [tuple(c[i:i + n]) for c in cut for i in range(len(c) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0

    repeated = total = 0
    for c in cut:  # 4-grams that repeat an earlier 4-gram of the same text
        seen: set = set()
        for i in range(len(c) - 3):
            gram = tuple(c[i:i + 4])
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return {"distinct_1": distinct(1), "distinct_2": distinct(2),
            "repetition_4gram": repeated / total if total else 0.0,
            "mean_length": float(np.mean([len(c) for c in cut])) if cut else 0.0,
            "eos_rate": float(np.mean([eos_id in c for c in continuations])) if continuations else 0.0,
            "texts": len(continuations)}


def generate(model, tokenizer, g: GenerateParams, seed: int, device) -> tuple[list[dict], list[list[int]]]:
    """Per prompt {'prompt', 'greedy', 'samples'}, and the generated token ids of each prompt's
    distinct continuations."""
    panel, ids = [], []
    prompts = (g.prompt, *g.extra_prompts)
    for pi, prompt in enumerate(tqdm(prompts, desc="prompts", leave=False, disable=None)):
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        n_in = inputs["input_ids"].shape[1]

        def continuation(**kw) -> list[int]:
            out = model.generate(**inputs, max_new_tokens=g.max_new_tokens, pad_token_id=tokenizer.eos_token_id, **kw)
            return out[0, n_in:].tolist()

        greedy = continuation(do_sample=False)
        samples = []
        for i in range(g.num_samples if g.temperature > 0 else 0):  # at temperature 0 a sample is the greedy text
            torch.manual_seed(seed + 1000 * pi + i)
            samples.append(continuation(do_sample=True, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p))
        decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        panel.append({"prompt": prompt, "greedy": decode(greedy), "samples": [decode(s) for s in samples]})
        ids += [list(c) for c in dict.fromkeys(tuple(c) for c in (greedy, *samples))]  # distinct, in order
    return panel, ids


def heldout(n_examples: int, count: int, seed: int) -> list[int]:
    """A seeded sample of `count` test examples (in order): the held-out prompts the models answer."""
    if count == 0 or n_examples == 0:
        return []
    return sorted(np.random.default_rng(seed).choice(n_examples, size=min(count, n_examples), replace=False).tolist())


def answer_heldout(model, tokenizer, ex, indices: list[int], max_new_tokens: int, context: int | None,
                   device) -> list[dict]:
    """Per held-out example: its prompt (everything before its last answer), the reference answer
    and the model's greedy answer, stopping at EOS or at the token that ends the reference (a chat
    template's end of turn); at most max_new_tokens, within the model's context."""
    out = []
    for i in indices:
        tokens, _ = ex.example(i)
        start, end = ex.last_answer(i)
        prompt = torch.from_numpy(np.asarray(tokens[:start], dtype=np.int64))[None].to(device)
        stop = sorted({t for t in (tokenizer.eos_token_id, int(tokens[end - 1])) if t is not None})
        room = max_new_tokens if context is None else max(1, min(max_new_tokens, context - start))
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=room,
                                   do_sample=False, eos_token_id=stop, pad_token_id=stop[0])[0, start:].tolist()
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
        out.append({"example": i, "prompt": decode(tokens[:start].tolist()), "reference": decode(tokens[start:end].tolist()),
                    "answer": decode(generated)})
    return out
