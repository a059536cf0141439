"""Per-token negative log-likelihood under the two perplexity protocols.

- sliding window (the Hugging Face perplexity guide): windows of `block` tokens moved by `stride`;
  each window scores only the tokens no earlier window scored, so every token but the first is
  predicted exactly once, with up to block-1 tokens of context. At stride == block each window
  re-reads one token, so none is skipped.
- blocks (run_clm): non-overlapping blocks of `block` tokens, the tail dropped; each block predicts
  its last block-1 tokens from the tokens before them in the block.

Both return an array of per-token NLL (nats) for the scored target positions, in order, so the
caller can sum, count or bootstrap them (ftstudy.measure.stats). Scoring goes through the model's body and
output projection (ftstudy.loss.position_nll: the projection and log-softmax in fp32), or through
the model's own forward where ftstudy.loss.check_fast_path found the two would differ.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ftstudy.loss import check_fast_path, position_nll
from ftstudy.measure.stats import bits_per_byte, perplexity, ppl_metrics


def window_plan(n_tokens: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: the window reads tokens[begin:end] and scores
    targets first_target..end-1."""
    if n_tokens < 2:
        return []
    step = min(stride, block - 1)
    end = min(block, n_tokens)
    plan = [(0, end, 1)]
    while end < n_tokens:
        new_end = min(end + step, n_tokens)
        plan.append((new_end - block, new_end, end))
        end = new_end
    return plan


def choose_path(model, tokens: np.ndarray, block: int, device) -> dict:
    """How `model` is scored: {"own_forward", "path", "reason" (None when the fast path serves),
    "checked_max_nll_diff"}, from ftstudy.loss.check_fast_path on the first window of `tokens`."""
    window = torch.from_numpy(np.asarray(tokens[:block]).astype(np.int64))[None].to(device)
    why, diff = check_fast_path(model, window)
    return {"own_forward": why is not None, "path": "model forward" if why else "body + head", "reason": why,
            "checked_max_nll_diff": diff}


@torch.no_grad()
def _score(model, windows: list[np.ndarray], first_offsets: list[int], device, batch_size: int,
           desc: str | None, own_forward: bool) -> np.ndarray:
    """NLL of tokens windows[i][j] for j >= first_offsets[i] (same-length windows, batched)."""
    out = []
    for s in tqdm(range(0, len(windows), batch_size), desc=desc, disable=True if desc is None else None, leave=False):
        x = torch.from_numpy(np.stack(windows[s:s + batch_size]).astype(np.int64)).to(device)
        mask = torch.zeros((x.shape[0], x.shape[1] - 1), dtype=torch.bool, device=device)
        for i, first in enumerate(first_offsets[s:s + batch_size]):
            mask[i, first - 1:] = True
        # Only the scored positions get logits, a chunk at a time: never the whole (batch, block, vocab).
        out.append(position_nll(model, x, mask, own_forward).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def sliding_window_nll(model, tokens: np.ndarray, block: int, stride: int, device, batch_size: int = 8,
                       desc: str | None = None, own_forward: bool = False) -> np.ndarray:
    plan = window_plan(len(tokens), block, stride)
    windows = [np.asarray(tokens[b:e]) for b, e, _ in plan]
    firsts = [f - b for b, _, f in plan]
    return _score(model, windows, firsts, device, batch_size, desc, own_forward)


def block_nll(model, tokens: np.ndarray, block: int, device, batch_size: int = 8,
              desc: str | None = None, own_forward: bool = False) -> np.ndarray:
    n = len(tokens) // block
    windows = [np.asarray(tokens[i * block:(i + 1) * block]) for i in range(n)]
    return _score(model, windows, [1] * n, device, batch_size, desc, own_forward)


@torch.no_grad()
def answer_nll(model, ex, device, batch_size: int = 8, desc: str | None = None, own_forward: bool = False,
               indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the NLL of every answer token of the examples `indices` (all by default), example by
    example in order; each example's answer-token count). Each example is scored alone, from its
    own tokens only: a batch pads its examples on the right, and an attention mask keeps padding
    out, as training does (ftstudy.data.batches)."""
    from ftstudy.data.batches import ExampleBatches

    units = ExampleBatches(ex, train_on_prompt=False)
    indices = np.arange(len(ex)) if indices is None else np.asarray(indices)
    out, counts = [], []
    for s in tqdm(range(0, len(indices), batch_size), desc=desc, disable=True if desc is None else None, leave=False):
        batch = {k: torch.from_numpy(v).to(device) for k, v in units.batch(indices[s:s + batch_size]).items()}
        out.append(position_nll(model, batch["input_ids"], batch["target_mask"], own_forward,
                                attention_mask=batch["attention_mask"]).double().cpu().numpy())
        counts.append(batch["target_mask"].sum(dim=1).cpu().numpy())
    if not out:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(out), np.concatenate(counts).astype(np.int64)


def answer_metrics(model, ex, n_bytes: int, ev, seed: int, device, desc: str | None = None,
                   own_forward: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """(answer-only perplexity, its interval resampling whole examples, bits per byte of the
    answers (`n_bytes`: the bytes their tokens spell), answer tokens and examples scored; the per-token NLL; the per-example counts)."""
    nll, counts = answer_nll(model, ex, device, ev.batch_size, desc, own_forward)
    metrics = ppl_metrics(nll, ev.bootstrap_chunk, ev.bootstrap_samples, seed, sizes=counts)
    return metrics | {"bpb": bits_per_byte(nll, n_bytes), "tokens": int(len(nll)), "examples": int(len(counts))}, nll, counts


def unit_sizes(starts: np.ndarray | None, n_tokens: int) -> np.ndarray | None:
    """How many of a running text's scored positions (every token but the first, ftstudy.measure.scoring's
    sliding window) fall in each unit starting at `starts`; units with none are left out. None
    where the text has no units (its intervals then resample chunks)."""
    if starts is None:
        return None
    edges = np.append(np.maximum(np.asarray(starts, dtype=np.int64), 1), n_tokens)
    sizes = np.diff(edges)
    return sizes[sizes > 0]


def sliding_metrics(model, tokens: np.ndarray, n_bytes: int, block: int, ev, seed: int, device,
                    desc: str | None = None, own_forward: bool = False,
                    sizes: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """(ppl, its bootstrap interval when there are enough units, the unit count, bits per byte and
    token count; the per-token NLL) of one split under the sliding window (`ev`: the evaluate
    params); `sizes`: each independent unit's scored positions (unit_sizes), else chunks."""
    nll = sliding_window_nll(model, tokens, block, ev.stride, device, ev.batch_size, desc, own_forward)
    return (ppl_metrics(nll, ev.bootstrap_chunk, ev.bootstrap_samples, seed, sizes=sizes)
            | {"bpb": bits_per_byte(nll, n_bytes), "tokens": int(len(nll))}), nll


def score_all(model, data_dir, meta: dict, block: int, ev, seed: int, device,
              label: str = "evaluate") -> tuple[dict, dict, dict]:
    """Everything evaluate scores, as (metrics, the arrays to keep for stage compare, the scoring
    path): validation and test under the sliding window and as run_clm's blocks, or, for
    instruction data, over their examples' answer tokens; and every general set (always text,
    sliding window). Intervals resample the independent units: examples, documents, WikiText
    articles, or chunks of a running text without them; the arrays kept hold, for the test split
    and each general set, the per-token NLL, the units' sizes (`<name>_sizes`) and the unit's name
    (`<name>_unit`). The fast path is checked first on one window (choose_path)."""
    from ftstudy.data import examples, token_files

    instruct = token_files.is_instruct(meta)
    splits = [s for s in meta["splits"] if s != "train"]
    tokens = {s: token_files.load_tokens(data_dir, s, meta) for s in splits}
    first = examples.load(data_dir, "test", meta).example(0)[0] if instruct else tokens["test"]
    path = choose_path(model, first, block, device)
    if path["own_forward"]:
        print(f"{label}: scoring through the model's own forward (whole logits), not body + head: {path['reason']}")

    def text_units(split: str) -> tuple[np.ndarray | None, str]:
        sizes = unit_sizes(token_files.unit_starts(data_dir, split, meta), len(tokens[split]))
        return sizes, meta["splits"][split].get("units", "chunks")

    metrics, keep = {}, {}
    for split, short in (("validation", "val"), ("test", "test")):
        if instruct:  # bits per byte over the bytes the answer tokens spell
            m, nll, sizes = answer_metrics(model, examples.load(data_dir, split, meta),
                                           meta["splits"][split]["answer_bytes"], ev, seed, device,
                                           f"{split} answers", path["own_forward"])
            unit = "examples"
        else:
            sizes, unit = text_units(split)
            m, nll = sliding_metrics(model, tokens[split], meta["splits"][split]["bytes"], block, ev, seed, device,
                                     f"{split} sliding", path["own_forward"], sizes)
            blocks = block_nll(model, tokens[split], block, device, ev.batch_size, f"{split} blocks", path["own_forward"])
            m["ppl_blocks"] = perplexity(blocks)
            metrics[f"{short}_tokens_blocks"] = len(blocks)
        if split == "test":  # compare pairs the test split's NLL; validation's is not kept
            keep |= _kept("test", nll, sizes, unit)
        metrics |= {f"{short}_{k}": v for k, v in m.items()}
    metrics["general"] = {}
    for split, name in token_files.general_splits(meta):
        sizes, unit = text_units(split)
        metrics["general"][name], nll = sliding_metrics(
            model, tokens[split], meta["splits"][split]["bytes"], block, ev, seed, device, f"{name} sliding",
            path["own_forward"], sizes)
        keep |= _kept(name, nll, sizes, unit)
    return metrics, keep, path


def _kept(name: str, nll: np.ndarray, sizes: np.ndarray | None, unit: str) -> dict:
    return {name: nll, f"{name}_unit": np.asarray(unit)} | ({} if sizes is None else {f"{name}_sizes": sizes})
