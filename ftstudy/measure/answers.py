"""Answer quality on held-out instruction examples: each model's greedy answer against the
reference, per example, so that compare can pair two models over examples.

- exact_match: 1 when the answer equals the reference after SQuAD's normalisation (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed), else 0;
- f1: SQuAD's token F1 over the normalised words (the words both share, counted with
  multiplicity; 1 when both are empty);
- rouge_l: ROUGE-L F-measure (rouge-score, Google's implementation, no stemming): the longest
  common subsequence of words;
- chrf: chrF (sacrebleu), character n-gram F-score, on a 0–1 scale.

All are computed locally: nothing is downloaded at run time.
"""

from __future__ import annotations

import re
import string
from collections import Counter

METRICS = ("exact_match", "f1", "rouge_l", "chrf")
TASK = "held-out answers"  # their name among the benchmarks (compare's pairs, the report's Tasks section)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def f1(answer: str, reference: str) -> float:
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(answer, [reference]).score) / 100


SCORERS = {"exact_match": exact_match, "f1": f1, "rouge_l": rouge_l, "chrf": chrf}


def score(answer: str, reference: str, metrics: tuple[str, ...]) -> dict[str, float]:
    return {m: SCORERS[m](answer, reference) for m in metrics}
