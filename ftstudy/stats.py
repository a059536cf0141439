"""Statistics over per-token NLL arrays, numpy only (the compare stage imports no torch):
perplexity, bits per byte, and chunk-bootstrap intervals, single and paired."""

from __future__ import annotations

import numpy as np


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
