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

Scores of 0 or 1 per item (accuracy, exact match) are not bootstrapped: a percentile bootstrap of
a proportion at 0 or 1 has no width, and a paired one called +0.004 [+0.001, +0.008] over 1,000
items where one model alone got 4 right, which McNemar's exact test gives p = 0.125. A proportion
gets Wilson's score interval, which keeps its width at 0 and 1 (200 of 200: lower bound 0.981),
and a paired difference of two proportions an exact interval built on McNemar's test: only the
items where the two models differ carry information, and the share of them that favours a is
binomial. Both are exact or near it at any size, so they need no minimum count.
"""

from __future__ import annotations

import math

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


def is_binary(values) -> bool:
    """Whether every per-item score is 0 or 1 (accuracy, exact match): a proportion."""
    values = np.asarray(values, dtype=np.float64)
    return len(values) > 0 and bool(np.isin(values, (0.0, 1.0)).all())


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf((1 + level) / 2)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of k in n: never of zero width, also at 0 and 1."""
    z2 = _z(level) ** 2
    centre, half = (k + z2 / 2) / (n + z2), _z(level) * np.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for any n here)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1)))))
    i = np.arange(k + 1)
    return float(np.exp(log_fact[n] - log_fact[i] - log_fact[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)).sum())


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for a binomial proportion of k in n, by bisection: the
    inversion of two one-sided exact tests at (1 - level) / 2 each."""
    alpha = (1 - level) / 2

    def solve(f) -> float:  # f rises with p from negative to positive
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2
    lower = 0.0 if k == 0 else solve(lambda p: (1 - _binom_cdf(k - 1, n, p)) - alpha)
    upper = 1.0 if k == n else solve(lambda p: alpha - _binom_cdf(k, n, p))
    return lower, upper


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """McNemar's exact test: two-sided p of a_only items won by a alone against b_only by b alone,
    under no difference (each such item as likely either way)."""
    d = a_only + b_only
    return min(1.0, 2 * _binom_cdf(min(a_only, b_only), d, 0.5)) if d else 1.0


def mean_metrics(values: np.ndarray, samples: int, seed: int, level: float = 0.95) -> dict:
    """{"score" (the mean of per-item scores: accuracy, exact match, F1), "items"} and its 95%
    interval {"lo", "hi"}: Wilson's for scores of 0 or 1, else, from MIN_CHUNKS items on, a
    percentile bootstrap over items."""
    out = {"score": float(np.mean(values)) if len(values) else float("nan"), "items": len(values)}
    if is_binary(values):
        interval = wilson_interval(int(np.sum(values)), len(values), level)
    else:
        interval = _mean_bootstrap(values, samples, seed, level)
    return out | ({} if interval is None else {"lo": interval[0], "hi": interval[1]})


def paired_mean_difference(a: np.ndarray, b: np.ndarray, samples: int, seed: int, level: float = 0.95) -> dict:
    """mean(a) - mean(b) for two models' per-item scores on the very same items, with a paired
    interval over items ("lo", "hi"). Scores of 0 or 1: paired_binary_difference. Others: a paired
    bootstrap (left out below MIN_CHUNKS items), each resample drawing the same items for both, so
    item difficulty cancels; identical scores give 0 with [0, 0]."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    if is_binary(a) and is_binary(b):
        return paired_binary_difference(a, b, level)
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out = {"diff": float(diff.mean()) if len(diff) else float("nan"), "items": len(diff)}
    interval = _mean_bootstrap(diff, samples, seed, level)
    return out | ({} if interval is None else {"lo": interval[0], "hi": interval[1]})


def paired_binary_difference(a, b, level: float = 0.95) -> dict:
    """mean(a) - mean(b) for 0/1 scores on the same items, with "a_only" and "b_only" (the items
    each model alone got right), McNemar's exact p, and an interval built on that test: given the
    d = a_only + b_only items that differ, the share won by a has an exact Clopper-Pearson interval
    [q_lo, q_hi], and the difference is d / n * (2q - 1). The interval excludes 0 exactly when the
    test gives p < 1 - level. With no item differing there is nothing to test: no interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n, a_only, b_only = len(a), int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    d = a_only + b_only
    out = {"diff": (a_only - b_only) / n if n else float("nan"), "items": n, "a_only": a_only, "b_only": b_only,
           "p": mcnemar_exact_p(a_only, b_only)}
    if d == 0:
        return out
    q_lo, q_hi = clopper_pearson(a_only, d, level)
    return out | {"lo": d / n * (2 * q_lo - 1), "hi": d / n * (2 * q_hi - 1)}


def score_row(per_item_scores: dict, samples: int, seed: int) -> dict:
    """{"<metric>": mean, "<metric>_lo", "<metric>_hi" (its 95% interval: mean_metrics), "items"} from
    each metric's per-item scores: a task's row in the metrics."""
    row: dict = {}
    for metric, values in per_item_scores.items():
        m = mean_metrics(values, samples, seed)
        row[metric] = m["score"]
        if "lo" in m:
            row[f"{metric}_lo"], row[f"{metric}_hi"] = m["lo"], m["hi"]
        row["items"] = m["items"]
    return row
