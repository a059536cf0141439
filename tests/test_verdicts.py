"""Verdicts at their edges (issue #49): 0/1 differences on few differing items, proportions at 0
and 1, bounds at and around 0, the flip of every pair, numbers as printed, which way is better,
and pairing only the very same items."""

import numpy as np
import pytest

from ftstudy.errors import StudyError
from ftstudy.measure import benchmarks, task_metrics
from ftstudy.measure.stats import (clopper_pearson, mcnemar_exact_p, mean_metrics, paired_mean_difference,
                                   wilson_interval)
from ftstudy.report import task_report
from stages import compare


def discordant(n: int, a_only: int, b_only: int, both: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two models' 0/1 scores on n items: a alone right on a_only, b alone on b_only, both on `both`."""
    a, b = np.zeros(n), np.zeros(n)
    a[:a_only] = 1
    b[a_only:a_only + b_only] = 1
    a[a_only + b_only:a_only + b_only + both] = b[a_only + b_only:a_only + b_only + both] = 1
    return a, b


# ---------------------------------------------------------------- paired 0/1 scores: McNemar
def test_four_against_none_of_a_thousand_items_is_no_call():
    """The percentile bootstrap gave +0.004 [+0.001, +0.008], "a scores higher"; McNemar's exact
    test on 4 against 0 gives p = 0.125, and the interval built on it includes 0."""
    d = paired_mean_difference(*discordant(1000, 4, 0, both=600), samples=1000, seed=0)
    assert d["diff"] == pytest.approx(0.004) and (d["a_only"], d["b_only"]) == (4, 0)
    assert d["p"] == pytest.approx(0.125) and d["lo"] < 0 < d["hi"]
    assert task_report.diff_verdict(d) == "tie"


def test_thirty_against_five_is_called():
    d = paired_mean_difference(*discordant(1000, 30, 5, both=500), samples=1000, seed=0)
    assert d["diff"] == pytest.approx(0.025) and d["p"] < 0.001 and d["lo"] > 0
    assert task_report.diff_verdict(d) == "higher"
    assert task_report.diff_verdict(task_report._flip(d)) == "lower"


def test_the_interval_excludes_zero_exactly_when_the_exact_test_rejects():
    for a_only in range(0, 16):
        for b_only in range(0, 16):
            if a_only + b_only == 0:
                continue
            d = paired_mean_difference(*discordant(200, a_only, b_only), samples=10, seed=0)
            assert (d["lo"] > 0 or d["hi"] < 0) == (d["p"] < 0.05), (a_only, b_only)


def test_no_false_calls_above_five_percent_at_any_rate_of_differing_items():
    """Two models equally good: each item on which they differ is as likely won by either. Given d
    such items, the chance of a call is exact (the binomial weight of every split that is called);
    at any rate of differing items it is a mixture of these, so bounding each bounds them all.
    The percentile bootstrap called 4 against 0; this calls neither that nor more than 5% of ties."""
    from math import comb

    for d in (1, 4, 10, 20, 40, 100, 400, 1000):
        called = lambda a: task_report.diff_verdict(paired_mean_difference(  # noqa: E731
            *discordant(max(d, 1000), a, d - a), samples=10, seed=0)) in ("higher", "lower")
        k = -1  # splits a : d - a are called for a <= k (and their mirror images): bisection for k
        if called(0):
            lo, hi = 0, d // 2  # called(lo), not called(hi): a split of d // 2 is never called
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if called(mid) else (lo, mid)
            k = lo
        assert all(called(d - a) for a in range(k + 1)) and not called(k + 1) and not called(d - k - 1)
        false_calls = 2 * sum(comb(d, a) for a in range(k + 1)) / 2 ** d
        assert false_calls <= 0.05, (d, k, false_calls)


def test_a_real_difference_is_called_at_a_moderate_rate():
    rng = np.random.default_rng(3)
    calls = 0
    for _ in range(100):
        differ = rng.random(1000) < 0.1
        a_wins = rng.random(1000) < 0.75  # a wins three in four of the items that differ
        a = np.where(differ, a_wins, 1.0).astype(float)
        b = np.where(differ, ~a_wins, 1.0).astype(float)
        calls += task_report.diff_verdict(paired_mean_difference(a, b, 10, 0)) == "higher"
    assert calls >= 95


def test_no_item_differing_makes_no_call_and_no_zero_width_interval():
    a = np.ones(200)
    d = paired_mean_difference(a, a, 1000, 0)
    assert d["diff"] == 0 and "lo" not in d and task_report.diff_verdict(d) == "none differ"


def test_continuous_scores_keep_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(100)
    d = paired_mean_difference(a + 0.05, a, 1000, 0)
    assert "a_only" not in d and d["lo"] == pytest.approx(0.05) and d["hi"] == pytest.approx(0.05)


def test_exact_tails_match_published_values():
    assert mcnemar_exact_p(4, 0) == pytest.approx(0.125)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    lo, hi = clopper_pearson(3, 10)  # the textbook example: 0.0667 to 0.6525
    assert lo == pytest.approx(0.0667, abs=1e-4) and hi == pytest.approx(0.6525, abs=1e-4)


# ---------------------------------------------------------------- proportions at 0 and 1
def test_two_hundred_of_two_hundred_keeps_a_lower_bound_of_about_098():
    assert wilson_interval(200, 200)[0] == pytest.approx(0.981, abs=5e-4)
    assert clopper_pearson(200, 200)[0] == pytest.approx(0.982, abs=5e-4)
    m = mean_metrics(np.ones(200), 1000, 0)
    assert m["score"] == 1.0 and m["lo"] == pytest.approx(0.981, abs=5e-4) and m["hi"] == 1.0
    m = mean_metrics(np.zeros(200), 1000, 0)
    assert m["lo"] == 0.0 and m["hi"] == pytest.approx(0.019, abs=5e-4)


def test_a_proportion_has_an_interval_from_few_items_and_other_scores_need_twenty():
    assert {"lo", "hi"} <= set(mean_metrics(np.array([1.0, 0.0, 1.0]), 1000, 0))
    assert set(mean_metrics(np.linspace(0, 1, 19), 1000, 0)) == {"score", "items"}


# ---------------------------------------------------------------- verdicts at their boundaries
@pytest.mark.parametrize("lo,hi,verdict", [(0.0, 0.1, "tie"), (1e-12, 0.1, "higher"), (-1e-12, 0.1, "tie"),
                                           (-0.1, 0.0, "tie"), (-0.1, -1e-12, "lower"), (-0.1, 1e-12, "tie")])
def test_a_bound_at_just_above_and_just_below_zero(lo, hi, verdict):
    pair = {"diff": (lo + hi) / 2, "lo": lo, "hi": hi}
    assert task_report.diff_verdict(pair) == verdict
    flipped = {"higher": "lower", "lower": "higher", "tie": "tie"}[verdict]
    assert task_report.diff_verdict(task_report._flip(pair)) == flipped


def test_the_flip_of_every_pair_swaps_everything_it_should():
    pair = {"diff": 0.025, "lo": 0.014, "hi": 0.032, "items": 1000, "a_only": 30, "b_only": 5, "p": 2e-5}
    f = task_report._flip(pair)
    assert f == {"diff": -0.025, "lo": -0.032, "hi": -0.014, "items": 1000, "a_only": 5, "b_only": 30, "p": 2e-5}
    assert task_report._flip(f) == pair
    assert task_report.diff_verdict({"diff": 0.0, "items": 9}) == "too few"


def test_the_best_model_scoring_worse_on_a_lower_is_better_metric_is_said():
    """On a metric where lower is better, 'higher' is worse: the finding says so, and says the
    lower perplexity did not mean a better score."""
    pairs = {"full_vs_pretrained": {"diff": 0.5, "lo": 0.2, "hi": 0.8}, "lora_vs_pretrained": {"diff": 0.0, "lo": -0.1, "hi": 0.1},
             "full_vs_lora": {"diff": 0.4, "lo": 0.1, "hi": 0.7}}
    text = " ".join(task_report.task_findings({}, {"t": {"err": pairs}}, "full", {"t": {"err": False}}))
    assert "t (err, lower is better)" in text and "higher (worse)" in text
    assert "scores higher than the pretrained model (worse)" in text
    assert "Here a lower perplexity did not mean a better score." in text
    text = " ".join(task_report.task_findings({}, {"t": {"acc": pairs}}, "full", {"t": {"acc": True}}))
    assert "higher (better)" in text and "did not mean" not in text


# ---------------------------------------------------------------- numbers as printed
@pytest.mark.parametrize("x,text", [(0.0003, "+0.0003"), (-0.0003, "-0.0003"), (-0.0, "0"), (0.0, "0"),
                                    (0.0123, "+0.012"), (-0.0005, "-0.001"), (0.00004, "+4e-05")])
def test_a_bound_that_rounds_to_zero_keeps_its_sign(x, text):
    assert task_report.signed(x) == text


def test_a_printed_interval_agrees_with_its_verdict():
    pair = {"diff": 0.006, "lo": 0.0003, "hi": 0.012}
    assert task_report.diff_text(pair) == "+0.006 (95% paired CI +0.0003 to +0.012)"
    assert task_report.diff_text({"diff": 0.006, "lo": -0.0003, "hi": 0.012}) == "+0.006 (95% paired CI -0.0003 to +0.012)"


# ---------------------------------------------------------------- which way is better: lm-eval's own
def lm_eval_results(config: dict, higher_is_better: dict, values: dict) -> dict:
    return {"configs": {"t": config}, "higher_is_better": {"t": higher_is_better}, "results": {"t": values}}


def test_a_loglikelihood_task_without_metric_list_keeps_lm_evals_defaults():
    """lm-eval's defaults for output_type loglikelihood: perplexity (lower is better, aggregated as
    a perplexity) and acc (a mean). Ours once read every metric as a mean, higher better."""
    results = lm_eval_results({"output_type": "loglikelihood"}, {"perplexity": False, "acc": True},
                              {"perplexity,none": 12.5, "acc,none": 0.4, "acc_stderr,none": 0.05, "alias": "t"})
    specs = task_metrics.metric_specs(results, "t")
    assert specs == {"perplexity": {"higher_is_better": False, "aggregation": "perplexity"},
                     "acc": {"higher_is_better": True, "aggregation": "mean"}}
    assert task_metrics.aggregated_scores(results) == {"t": {"perplexity": 12.5}}
    assert task_metrics.metric_facts(results)["t"]["perplexity"] == {"higher_is_better": False,
                                                                   "aggregation": "perplexity", "paired": False}


def test_a_metric_list_entry_without_aggregation_takes_lm_evals_default_not_a_mean():
    results = lm_eval_results({"metric_list": [{"metric": "perplexity"}, {"metric": "acc", "higher_is_better": False}]},
                              {"perplexity": False, "acc": False}, {"perplexity,none": 3.0, "acc,none": 0.2})
    specs = task_metrics.metric_specs(results, "t")
    assert specs["perplexity"]["aggregation"] == "perplexity"
    assert specs["acc"] == {"higher_is_better": False, "aggregation": "mean"}
    samples = [{"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "metrics": ["perplexity", "acc"],
                "perplexity": -2.5 * i, "acc": float(i % 2), "resps": [[(-2.5 * i, True)]],
                "filtered_resps": [(-2.5 * i, True)]} for i in (1, 0)]
    items = benchmarks.per_item(results | {"samples": {"t": samples}})["t"]
    assert set(items) == {"doc_id", "doc_hash", "acc,none", "loglik", "requests"}  # perplexity is not a mean
    assert list(items["doc_id"]) == [0, 1] and list(items["doc_hash"]) == ["h0", "h1"]


# ---------------------------------------------------------------- pairing only the same items
def task_items(hashes, commit: str = "") -> dict:
    return {"t": {"doc_id": np.arange(len(hashes)), "doc_hash": np.array(hashes), "dataset_commit": np.array(commit),
                  "acc,none": np.ones(len(hashes))}}


def test_one_changed_document_stops_compare_naming_the_stage_to_rerun():
    items = {"pretrained": task_items(["a", "b", "c"]), "full": task_items(["a", "B", "c"]), "lora": task_items(["a", "b", "c"])}
    with pytest.raises(StudyError, match=r"different items of t .*rerun `dvc repro -s -f tasks@full`") as e:
        compare.task_pairs(items, 100, 0)
    assert "\n" not in str(e.value)
    items["full"] = task_items(["a", "b", "c"])
    assert compare.task_pairs(items, 100, 0)["t"]["acc"]["full_vs_lora"]["diff"] == 0


def test_another_dataset_commit_stops_compare_and_names_both_commits():
    items = {"pretrained": task_items(["a"], "c0ffee"), "full": task_items(["a"], "beef"), "lora": task_items(["a"], "beef")}
    with pytest.raises(StudyError, match=r"dataset commits beef, c0ffee.*tasks@pretrained`"):
        compare.task_pairs(items, 100, 0)
