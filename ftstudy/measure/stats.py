"""Statistics over per-token NLL arrays, numpy only (the compare stage imports no torch):
perplexity, bits per byte, and bootstrap intervals, single and paired, over the independent units
(`sizes`: each example's, document's or article's scored tokens) or, for running text without
them, chunks of consecutive tokens.

An interval is given only from at least MIN_CHUNKS units. With fewer, a percentile bootstrap has
a handful of distinct resamples and claims more certainty than the data hold (one chunk: every
resample is the same, and the "interval" has zero width). Measured by the coverage test
(tests/test_scoring.py: 300 trials of correlated synthetic NLL with a known ratio, 1,024-token
chunks), the 95% paired interval covered the truth in 80% of trials from 5 chunks, 87% from 10,
92% from 20 and 94% from 60 or 100: 20 is the smallest count that stays above 90%.
"""

from __future__ import annotations

import numpy as np

MIN_CHUNKS = 20


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


def bits_per_byte(nll: np.ndarray, n_bytes: int) -> float:
    """Total NLL in bits over the text's UTF-8 bytes: comparable across tokenizers."""
    return float(nll.sum() / (np.log(2) * n_bytes))


def chunk_count(n_tokens: int, chunk: int) -> int:
    """How many chunks of ~`chunk` tokens the bootstrap resamples from `n_tokens` scored tokens."""
    return n_tokens // chunk


def enough_tokens(chunk: int) -> int:
    """Scored tokens an interval needs at this chunk size."""
    return MIN_CHUNKS * chunk


def _chunks(values: np.ndarray, chunk: int, sizes: np.ndarray | None) -> list[np.ndarray]:
    """The units the bootstrap resamples: consecutive chunks of ~`chunk` tokens, or, with `sizes`
    (each example's token count), whole examples."""
    if sizes is not None:
        return np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else []
    n = chunk_count(len(values), chunk)
    return np.array_split(values, n) if n else []


def _chunk_bootstrap(values: np.ndarray, chunk: int, samples: int, seed: int, level: float,
                     sizes: np.ndarray | None = None) -> tuple[float, float] | None:
    """Percentile interval of exp(mean of `values`), resampling consecutive chunks of ~`chunk`
    tokens (not single tokens, whose losses are correlated with their neighbours') or whole
    examples (`sizes`); None from fewer than MIN_CHUNKS of them."""
    parts = _chunks(values, chunk, sizes)
    n_chunks = len(parts)
    if n_chunks < MIN_CHUNKS:
        return None
    sums = np.array([p.sum() for p in parts])
    counts = np.array([len(p) for p in parts])
    idx = np.random.default_rng(seed).integers(0, n_chunks, size=(samples, n_chunks))
    resampled = np.exp(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    lo, hi = np.percentile(resampled, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def ppl_metrics(nll: np.ndarray, chunk: int, samples: int, seed: int, level: float = 0.95,
                sizes: np.ndarray | None = None) -> dict:
    """{"ppl", "chunks"} and, from MIN_CHUNKS chunks on, the percentile chunk-bootstrap interval
    {"ppl_lo", "ppl_hi"}; chunks are whole examples where `sizes` gives their token counts."""
    out = {"ppl": perplexity(nll), "chunks": chunk_count(len(nll), chunk) if sizes is None else len(sizes)}
    interval = _chunk_bootstrap(nll, chunk, samples, seed, level, sizes)
    return out | ({} if interval is None else {"ppl_lo": interval[0], "ppl_hi": interval[1]})


def paired_ppl_ratio(nll_a: np.ndarray, nll_b: np.ndarray, chunk: int, samples: int, seed: int,
                     level: float = 0.95, sizes: np.ndarray | None = None) -> dict:
    """ppl(a) / ppl(b) for two models scored on the very same tokens, with a paired chunk-bootstrap
    interval ("lo", "hi"; left out below MIN_CHUNKS chunks): each resample draws the same chunks for
    both models, so what the two share (hard passages, easy ones) cancels and only their difference
    varies. Identical models give 1 with the interval [1, 1]; a constant per-token shift c gives
    exp(c). With `sizes` (each example's answer-token count) the resampled units are examples."""
    if len(nll_a) != len(nll_b):
        raise ValueError(f"paired scores need the same tokens: {len(nll_a)} vs {len(nll_b)} scored positions")
    diff = np.asarray(nll_a, dtype=np.float64) - np.asarray(nll_b, dtype=np.float64)
    out = {"ratio": float(np.exp(diff.mean())), "chunks": chunk_count(len(diff), chunk) if sizes is None else len(sizes)}
    interval = _chunk_bootstrap(diff, chunk, samples, seed, level, sizes)  # exp(mean difference) = the ratio
    return out | ({} if interval is None else {"lo": interval[0], "hi": interval[1]})


def _mean_bootstrap(values: np.ndarray, samples: int, seed: int, level: float) -> tuple[float, float] | None:
    """Percentile interval of the mean of per-item `values`, resampling items; None from fewer than
    MIN_CHUNKS of them."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < MIN_CHUNKS:
        return None
    idx = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    lo, hi = np.percentile(values[idx].mean(axis=1), [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def mean_metrics(values: np.ndarray, samples: int, seed: int, level: float = 0.95) -> dict:
    """{"score" (the mean of per-item scores: accuracy, exact match, F1), "items"} and, from MIN_CHUNKS
    items on, its percentile bootstrap interval over items {"lo", "hi"}."""
    out = {"score": float(np.mean(values)) if len(values) else float("nan"), "items": len(values)}
    interval = _mean_bootstrap(values, samples, seed, level)
    return out | ({} if interval is None else {"lo": interval[0], "hi": interval[1]})


def paired_mean_difference(a: np.ndarray, b: np.ndarray, samples: int, seed: int, level: float = 0.95) -> dict:
    """mean(a) - mean(b) for two models' per-item scores on the very same items, with a paired
    bootstrap interval over items ("lo", "hi"; left out below MIN_CHUNKS items): each resample draws
    the same items for both, so item difficulty cancels. Identical scores give 0 with [0, 0]."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out = {"diff": float(diff.mean()) if len(diff) else float("nan"), "items": len(diff)}
    interval = _mean_bootstrap(diff, samples, seed, level)
    return out | ({} if interval is None else {"lo": interval[0], "hi": interval[1]})


def score_row(per_item_scores: dict, samples: int, seed: int) -> dict:
    """{"<metric>": mean, "<metric>_lo", "<metric>_hi" (its 95% bootstrap interval over items, from
    MIN_CHUNKS items on), "items"} from each metric's per-item scores: a task's row in the metrics."""
    row: dict = {}
    for metric, values in per_item_scores.items():
        m = mean_metrics(values, samples, seed)
        row[metric] = m["score"]
        if "lo" in m:
            row[f"{metric}_lo"], row[f"{metric}_hi"] = m["lo"], m["hi"]
        row["items"] = m["items"]
    return row
