"""Which way each lm-eval metric is better and how lm-eval aggregates it, from lm-eval's own task
config and results: a mean over items is scored per item, with an interval, and paired between
models (ftstudy.measure.benchmarks); any other aggregate (a perplexity, corpus BLEU) is reported
as lm-eval aggregates it."""

from __future__ import annotations

import numpy as np


def is_number(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer))


def metric_specs(results: dict, task: str) -> dict[str, dict]:
    """metric -> {"higher_is_better", "aggregation"}, as lm-eval itself scores `task`: the direction
    from lm-eval's results (the task's metric_list where it says, else lm-eval's registry) and the
    aggregation from the metric_list entry, else lm-eval's default for that metric. Ours never
    replace lm-eval's: a log-likelihood task without metric_list has `perplexity` (lower is better,
    aggregated as a perplexity) beside `acc` (a mean, higher is better)."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY, get_metric_aggregation

    names = {fn: name for name, fn in AGGREGATION_REGISTRY.items()}
    listed = {m["metric"]: m for m in results["configs"].get(task, {}).get("metric_list") or []
              if isinstance(m, dict) and isinstance(m.get("metric"), str)}
    out = {}
    for metric, better in results.get("higher_is_better", {}).get(task, {}).items():
        agg = listed.get(metric, {}).get("aggregation")
        if agg is None:
            try:
                agg = get_metric_aggregation(metric)
            except (KeyError, ValueError):  # a metric of the task's own process_results
                agg = None
        name = agg if isinstance(agg, str) or agg is None else names.get(agg, getattr(agg, "__name__", None))
        out[metric] = {"higher_is_better": better, "aggregation": name}
    return out


def our_name(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric}_{filt}"


def _reported(results: dict):
    """(task, our metric name, its spec, lm-eval's aggregate) for every metric lm-eval reports."""
    for task, values in results["results"].items():
        specs = metric_specs(results, task)
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt and metric in specs:
                yield task, our_name(metric, filt), specs[metric], value


def aggregated_scores(results: dict) -> dict[str, dict[str, float]]:
    """task -> {our metric name: lm-eval's own aggregate} for each metric not aggregated as a mean
    (a perplexity, corpus BLEU): reported as lm-eval reports it, with no interval and not paired."""
    out: dict = {}
    for task, name, spec, value in _reported(results):
        if spec["aggregation"] != "mean" and is_number(value):
            out.setdefault(task, {})[name] = float(value)
    return out


def metric_facts(results: dict) -> dict[str, dict[str, dict]]:
    """task -> {our metric name: {"higher_is_better", "aggregation", "paired"}} for the info file:
    which way is better, and whether the score is a mean over items (paired between models)."""
    out: dict = {}
    for task, name, spec, _ in _reported(results):
        out.setdefault(task, {})[name] = spec | {"paired": spec["aggregation"] == "mean"}
    return out
