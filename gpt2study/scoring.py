"""Per-token negative log-likelihood under the two perplexity protocols.

- sliding window (the Hugging Face perplexity guide): windows of `block` tokens moved by `stride`;
  each window scores only the tokens no earlier window scored, so every token but the first is
  predicted exactly once, with up to block-1 tokens of context. At stride == block each window
  re-reads one token, so none is skipped.
- blocks (run_clm): non-overlapping blocks of `block` tokens, the tail dropped; each block predicts
  its last block-1 tokens from the tokens before them in the block.

Both return an array of per-token NLL (nats) for the scored target positions, in order, so the
caller can sum, count or bootstrap them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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


@torch.no_grad()
def _score(model, windows: list[np.ndarray], first_offsets: list[int], device, batch_size: int,
           desc: str | None) -> np.ndarray:
    """NLL of tokens windows[i][j] for j >= first_offsets[i] (same-length windows, batched)."""
    out = []
    for s in tqdm(range(0, len(windows), batch_size), desc=desc, disable=desc is None, leave=False):
        x = torch.from_numpy(np.stack(windows[s:s + batch_size]).astype(np.int64)).to(device)
        logits = model(input_ids=x).logits[:, :-1]
        targets = x[:, 1:]
        mask = torch.zeros_like(targets, dtype=torch.bool)
        for i, first in enumerate(first_offsets[s:s + batch_size]):
            mask[i, first - 1:] = True
        # Only the scored positions are lifted to fp32, never the whole (batch, block, vocab) tensor.
        nll = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
        out.append(nll.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def sliding_window_nll(model, tokens: np.ndarray, block: int, stride: int, device, batch_size: int = 8,
                       desc: str | None = None) -> np.ndarray:
    plan = window_plan(len(tokens), block, stride)
    windows = [np.asarray(tokens[b:e]) for b, e, _ in plan]
    firsts = [f - b for b, _, f in plan]
    return _score(model, windows, firsts, device, batch_size, desc)


def block_nll(model, tokens: np.ndarray, block: int, device, batch_size: int = 8,
              desc: str | None = None) -> np.ndarray:
    n = len(tokens) // block
    windows = [np.asarray(tokens[i * block:(i + 1) * block]) for i in range(n)]
    return _score(model, windows, [1] * n, device, batch_size, desc)


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


def bits_per_byte(nll: np.ndarray, n_bytes: int) -> float:
    """Total NLL in bits over the text's UTF-8 bytes: comparable across tokenizers."""
    return float(nll.sum() / (np.log(2) * n_bytes))


def _chunk_bootstrap(values: np.ndarray, chunk: int, samples: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of exp(mean of `values`), resampling consecutive chunks of ~`chunk`
    tokens (not single tokens, whose losses are correlated with their neighbours')."""
    n_chunks = max(1, len(values) // chunk)
    parts = np.array_split(values, n_chunks)
    sums = np.array([p.sum() for p in parts])
    counts = np.array([len(p) for p in parts])
    idx = np.random.default_rng(seed).integers(0, n_chunks, size=(samples, n_chunks))
    resampled = np.exp(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    lo, hi = np.percentile(resampled, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ppl_interval(nll: np.ndarray, chunk: int, samples: int, seed: int,
                           level: float = 0.95) -> tuple[float, float]:
    """Percentile chunk-bootstrap interval of the perplexity."""
    return _chunk_bootstrap(nll, chunk, samples, seed, level)


def sliding_metrics(model, tokens: np.ndarray, n_bytes: int, block: int, ev, seed: int, device,
                    desc: str | None = None) -> tuple[dict, np.ndarray]:
    """(ppl, its bootstrap interval, bits per byte and token count; the per-token NLL) of one split
    under the sliding window (`ev`: the evaluate params)."""
    nll = sliding_window_nll(model, tokens, block, ev.stride, device, ev.batch_size, desc=desc)
    lo, hi = bootstrap_ppl_interval(nll, ev.bootstrap_chunk, ev.bootstrap_samples, seed)
    return {"ppl": perplexity(nll), "ppl_lo": lo, "ppl_hi": hi, "bpb": bits_per_byte(nll, n_bytes),
            "tokens": int(len(nll))}, nll


def paired_ppl_ratio(nll_a: np.ndarray, nll_b: np.ndarray, chunk: int, samples: int, seed: int,
                     level: float = 0.95) -> dict:
    """ppl(a) / ppl(b) for two models scored on the very same tokens, with a paired chunk-bootstrap
    interval: each resample draws the same chunks for both models, so what the two share (hard
    passages, easy ones) cancels and only their difference varies. Identical models give 1 with
    the interval [1, 1]; a constant per-token shift c gives exp(c)."""
    if len(nll_a) != len(nll_b):
        raise ValueError(f"paired scores need the same tokens: {len(nll_a)} vs {len(nll_b)} scored positions")
    diff = np.asarray(nll_a, dtype=np.float64) - np.asarray(nll_b, dtype=np.float64)
    lo, hi = _chunk_bootstrap(diff, chunk, samples, seed, level)  # exp(mean difference) = the ratio
    return {"ratio": float(np.exp(diff.mean())), "lo": lo, "hi": hi}
