"""The study's perplexity–score rank correlation at its edges (issue #49): within each method, never
pooled across the two; its interval over runs and items; no call from too few runs. Simulated
studies of 9 runs a method, as the shipped grid gives (3 rates x 3 seeds), each run scored on the
same 300 benchmark items."""

import numpy as np
import pytest

from scripts import study

ITEMS, RUNS = 300, 9


def simulated_study(rng, relation: float) -> tuple[dict, dict, dict]:
    """Each method's runs: a test perplexity, and 0/1 scores on the same ITEMS items (each item's
    difficulty shared by every run). Full fine-tuning has a far lower perplexity and a higher score
    than LoRA (the gap between methods); within a method a run's ability goes with its perplexity
    by `relation` (0: not at all)."""
    difficulty = rng.normal(0, 1.5, ITEMS)
    ppl, scores, items = {}, {}, {}
    for m, (base_ppl, base_ability) in {"full": (20.0, 1.0), "lora": (30.0, -0.5)}.items():
        z = rng.normal(0, 1, RUNS)
        ability = base_ability + 0.6 * (-relation * z + np.sqrt(1 - relation ** 2) * rng.normal(0, 1, RUNS))
        right = rng.random((RUNS, ITEMS)) < 1 / (1 + np.exp(difficulty - ability[:, None]))
        ppl[m], items[m] = base_ppl + 2.0 * z, right.astype(float)
        scores[m] = items[m].mean(1)
    return ppl, scores, items


def called(c: dict) -> bool:
    return c["rho"] is not None and (c["lo"] > 0 or c["hi"] < 0)


def test_no_relation_within_either_method_is_called_in_at_most_five_percent_of_studies():
    """Pooled over both methods, the gap between them alone gave about -0.72 [-0.85, -0.62] and a
    call in every one of 40 such studies; within each method, at most 5% of 200."""
    rng = np.random.default_rng(11)
    calls, pooled_calls = 0, 0
    for _ in range(200):
        ppl, scores, items = simulated_study(rng, relation=0.0)
        calls += called(study.correlation(ppl, scores, items, seed=0, samples=200))
        pooled = study.spearman(np.concatenate(list(ppl.values())), np.concatenate(list(scores.values())))
        pooled_calls += pooled < -0.5
    assert calls <= 10, calls
    assert pooled_calls >= 190  # what the pooled figure would have said: the gap, not a relation


def test_a_real_relation_within_each_method_is_called_in_at_least_eighty_percent():
    rng = np.random.default_rng(12)
    calls = sum(called(c := study.correlation(*simulated_study(rng, relation=0.8), seed=0, samples=200)) and c["hi"] < 0
                for _ in range(100))
    assert calls >= 80, calls


def test_item_noise_widens_the_interval():
    rng = np.random.default_rng(13)
    ppl, scores, items = simulated_study(rng, relation=0.5)
    with_items = study.correlation(ppl, scores, items, seed=0)
    runs_alone = study.correlation(ppl, scores, None, seed=0)
    assert with_items["rho"] == runs_alone["rho"] and with_items["items_resampled"]
    assert with_items["hi"] - with_items["lo"] > runs_alone["hi"] - runs_alone["lo"]


def test_too_few_runs_make_no_call_and_say_why():
    rng = np.random.default_rng(14)
    ppl, scores, items = simulated_study(rng, relation=0.9)
    few = {m: v[:4] for m, v in ppl.items()}, {m: v[:4] for m, v in scores.items()}, {m: v[:4] for m, v in items.items()}
    c = study.correlation(*few, seed=0)
    assert c["rho"] is None and c["runs"] == {"full": 4, "lora": 4} and c["min_runs"] == study.MIN_RUNS
    text = study.correlation_finding("tasks.t.acc", c)
    assert "no correlation is stated from 4 full runs and 4 lora runs" in text and f"needs {study.MIN_RUNS} runs" in text
    one = study.correlation({"full": [3.0], "lora": [4.0]}, {"full": [0.5], "lora": [0.4]}, None, seed=0)
    assert one["rho"] is None  # one run: once rho +-1 with an interval of zero width


def test_a_finding_states_an_association_within_methods_and_no_cause():
    rng = np.random.default_rng(15)
    c = study.correlation(*simulated_study(rng, relation=0.95), seed=0)
    text = study.correlation_finding("tasks.t.acc", c)
    assert called(c) and "lower perplexity went with a higher score" in text
    assert "Within each method" in text and "not a cause" in text and "runs and items" in text


@pytest.mark.parametrize("x,y,rho", [([1, 2, 3, 4], [10, 20, 30, 40], 1.0), ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
                                     ([1, 2, 2, 3], [1, 2, 3, 4], 0.9486833)])
def test_spearman_gives_ties_their_average_rank(x, y, rho):
    assert study.spearman(x, y) == pytest.approx(rho, abs=1e-6)
