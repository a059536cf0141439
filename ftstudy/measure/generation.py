"""Seeded text generation for the prompt panel, answers to held-out test prompts (instruction
data), and token-level quality of what was generated.

For each prompt: one greedy continuation plus num_samples sampled ones (none at temperature 0,
where sampling is greedy), each sample seeded from (seed, prompt, sample), so the same params give
the same text on the same machine. The quality metrics count each distinct continuation of a
prompt once: a sample that repeats the greedy text or another sample adds nothing.
"""

from __future__ import annotations

import re

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


def _special_ids(tokenizer) -> set[int]:
    """Every special token's id: the named ones (EOS, BOS, ...) and the added ones a chat template
    uses (<|eot_id|>, <|start_header_id|>, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def stop_ids(tokenizer) -> list[int]:
    """The ids a generated answer stops at: EOS, and where the tokenizer has a chat template, the
    special token that ends an assistant turn (Llama 3's <|eot_id|>, ChatML's <|im_end|>), found by
    rendering one exchange."""
    stops = {tokenizer.eos_token_id} - {None}
    if getattr(tokenizer, "chat_template", None):
        asked = [{"role": "user", "content": "x"}]
        before = tokenizer.apply_chat_template(asked, tokenize=True, add_generation_prompt=True, return_dict=False)
        whole = tokenizer.apply_chat_template(asked + [{"role": "assistant", "content": "y"}], tokenize=True,
                                              return_dict=False)
        special = _special_ids(tokenizer)
        turn = [t for t in list(whole)[len(before):] if t in special]
        stops |= set(turn[:1])
    return sorted(stops)


ROLE = re.compile(r"(system|user|assistant)\b[:\s]*(.*)", re.S)


def readable_prompt(tokenizer, ids) -> str:
    """A chat-templated prompt as people read it: 'user: How many…?' per turn, the template's
    special tokens dropped and its role names set apart from the text (decoding with special tokens
    skipped glued them: 'user How many…?assistant'); the trailing generation prompt left out.
    A plain prompt decodes as it is."""
    special = _special_ids(tokenizer)
    parts, current = [], []
    for t in list(ids) + [None]:
        if t is None or t in special:
            if current:
                parts.append(tokenizer.decode(current).strip())
            current = []
        else:
            current.append(t)
    turns, role = [], None  # a role name alone (Llama 3's header) labels the part after it
    for part in filter(None, parts):
        m = ROLE.fullmatch(part)
        if m and not m.group(2).strip():
            role = m.group(1)
        elif m:
            turns.append(f"{m.group(1)}: {m.group(2).strip()}")
        else:
            turns.append(f"{role}: {part}" if role else part)
            role = None
    return " / ".join(turns)  # a trailing role alone (the generation prompt) is left out


def openings(tokenizer, tokens: np.ndarray, starts: np.ndarray | None, count: int, split_seed: int,
             n_tokens: int = 16) -> list[tuple[str, list[int]]]:
    """(text shown, ids) of the openings, their first n_tokens tokens as the data holds them, of a
    sample of `count` held-out units (documents, articles; `starts`: where each begins) drawn by
    data.split_seed, the same for every training seed, or of as many evenly spaced points of a
    running text without them: own-data prompts, instead of an encyclopedia's."""
    points = (np.asarray(starts) if starts is not None
              else np.linspace(0, max(0, len(tokens) - n_tokens), num=max(count, 1), dtype=np.int64))
    chosen = sorted(np.random.default_rng(split_seed).choice(len(points), size=min(count, len(points)), replace=False))
    out = []
    for i in chosen:
        ids = [int(t) for t in tokens[int(points[i]):int(points[i]) + n_tokens]]
        text = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
        if text:
            out.append((text, ids))
    return out


def generate(model, tokenizer, g: GenerateParams, seed: int, device,
             prompts: list[tuple[str, list[int]]] | None = None) -> tuple[list[dict], list[list[int]]]:
    """Per prompt {'prompt', 'greedy', 'samples'}, and the generated token ids of each prompt's
    distinct continuations; each stops at EOS or a chat template's end of turn. `prompts`: (text
    shown, ids) each, by default generate.prompt and generate.extra_prompts tokenized."""
    panel, ids = [], []
    if prompts is None:
        prompts = [(t, tokenizer(t)["input_ids"]) for t in (g.prompt, *g.extra_prompts)]
    stops = stop_ids(tokenizer)
    for pi, (prompt, prompt_ids) in enumerate(tqdm(prompts, desc="prompts", leave=False, disable=None)):
        inputs = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        n_in = inputs.shape[1]

        def continuation(**kw) -> list[int]:
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=g.max_new_tokens,
                                 eos_token_id=stops, pad_token_id=stops[0] if stops else 0, **kw)
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


def heldout(n_examples: int, count: int, split_seed: int, leave_out=()) -> list[int]:
    """The held-out prompts the models answer: a sample of `count` test examples (in order) drawn by
    data.split_seed, not the training seed, so that every seed's models answer the same ones; none
    of `leave_out` (those whose reference data.block_size cut)."""
    pool = np.setdiff1d(np.arange(n_examples), leave_out)
    if count == 0 or len(pool) == 0:
        return []
    return sorted(np.random.default_rng(split_seed).choice(pool, size=min(count, len(pool)), replace=False).tolist())


def heldout_prompts(tokenizer, ex, indices: list[int]) -> list[tuple[str, list[int]]]:
    """(readable text, ids) of each held-out example's prompt: everything before its last answer."""
    prompts = [ex.example(i)[0][:ex.last_answer(i)[0]].tolist() for i in indices]
    return [(readable_prompt(tokenizer, ids), ids) for ids in prompts]


def answer_room(start: int, end: int, context: int | None) -> int:
    """How many tokens a held-out answer may take: twice its reference's, within the context."""
    return 2 * (end - start) if context is None else max(1, min(2 * (end - start), context - start))


def _batches(order: list[int], lengths: list[int], rooms: list[int], size: int, context: int | None) -> list[list[int]]:
    """`order` cut into batches of at most `size` whose longest prompt plus largest answer limit fits
    the context: every row of a batch generates as many tokens as its largest limit."""
    out: list[list[int]] = []
    for k in order:
        last = out[-1] if out else []
        fits = context is None or max(lengths[j] for j in [*last, k]) + max(rooms[j] for j in [*last, k]) <= context
        if last and len(last) < size and fits:
            last.append(k)
        else:
            out.append([k])
    return out


def answer_heldout(model, tokenizer, ex, indices: list[int], context: int | None, device,
                   batch_size: int = 1) -> list[dict]:
    """Per held-out example: its prompt (everything before its last answer, as people read it), the
    reference answer and the model's greedy answer, stopping at EOS or the chat template's end of
    turn (never at the reference's last token, which for a cut example is wherever the cut fell), or
    at twice the reference's tokens, within the model's context.

    `batch_size` prompts at a time (generate.batch_size), left-padded, in order of length (the least
    padding); each answer is cut at its own limit and first stop, so a batch answers as one at a
    time does, up to float rounding between batch shapes (tests/test_instructions.py checks that the
    tiny models give the same answers)."""
    stops = stop_ids(tokenizer)
    prompts = heldout_prompts(tokenizer, ex, indices)
    rooms = [answer_room(*ex.last_answer(i), context) for i in indices]
    answers: dict[int, list[int]] = {}
    for batch in _batches(sorted(range(len(indices)), key=lambda k: len(prompts[k][1])),
                          [len(ids) for _, ids in prompts], rooms, batch_size, context):
        width = max(len(prompts[k][1]) for k in batch)
        ids = torch.full((len(batch), width), stops[0], dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, k in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[k][1]):] = torch.tensor(prompts[k][1])
            mask[row, width - len(prompts[k][1]):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max(rooms[k] for k in batch), do_sample=False, eos_token_id=stops,
                                   pad_token_id=stops[0])[:, width:].tolist()
        for row, k in enumerate(batch):
            mine = generated[row][:rooms[k]]
            cut = next((j for j, t in enumerate(mine) if t in stops), None)
            answers[k] = mine if cut is None else mine[:cut + 1]
    out = []
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    for k, (i, (text, _)) in enumerate(zip(indices, prompts)):
        tokens, _ = ex.example(i)
        start, end = ex.last_answer(i)
        out.append({"example": i, "prompt": text, "reference": decode(tokens[start:end].tolist()),
                    "answer": decode(answers[k])})
    return out
