"""The report's Tasks section and findings, from stage tasks' scores and facts and stage compare's
paired differences (numbers only: nothing is recomputed).

A task score is a mean over items (accuracy, exact match, ...), or, where lm-eval aggregates a
metric otherwise (a perplexity), lm-eval's own aggregate, shown without an interval and not
paired. Which way is better is lm-eval's own (`higher_is_better` in the task's facts). Between
two models, a difference is called only when its paired 95% interval excludes 0: for 0/1 scores
an exact interval built on McNemar's test over the items where the two differ, for others a
bootstrap over items (from ftstudy.measure.stats.MIN_CHUNKS items on).
"""

from __future__ import annotations

import re

from ftstudy.report.findings import NAMES, _cap

MODELS = ("pretrained", "full", "lora")


def metrics_of(row: dict) -> list[str]:
    """A task row's metric names, in order ("acc", "exact_match_strip")."""
    return [k for k in row if k != "items" and not k.endswith(("_lo", "_hi"))]


def directions(task_info: dict) -> dict:
    """task -> metric -> lm-eval's higher_is_better (True, False, or None where lm-eval does not say),
    from stage tasks' facts; the held-out answers' scores (exact match, F1, ROUGE, chrF) are all
    higher-better and are not there."""
    return {task: {m: f.get("higher_is_better") for m, f in t.get("metrics", {}).items()}
            for task, t in task_info.get("tasks", {}).items()}


def signed(x: float) -> str:
    """A difference or a bound, with its sign always readable: '+0.012', '-0.0003' where three
    decimals would round it to zero, and '0' for exactly zero (never '-0.000')."""
    if x == 0:
        return "0"
    return f"{x:+.3f}" if abs(x) >= 0.0005 else f"{x:+.1g}"


def score_text(row: dict, metric: str) -> str:
    """'0.995 [0.980, 1.000]', or the score alone where it has no interval."""
    v = row[metric]
    return f"{v:.3f} [{row[metric + '_lo']:.3f}, {row[metric + '_hi']:.3f}]" if metric + "_lo" in row else f"{v:.3f}"


def diff_verdict(pair: dict) -> str:
    """'higher', 'lower' or 'tie' for a's score against b's; 'none differ' where no item's 0/1 score
    differs; 'too few' where there were too few items for an interval."""
    if "lo" not in pair:
        return "none differ" if pair.get("a_only") == 0 and pair.get("b_only") == 0 else "too few"
    return "higher" if pair["lo"] > 0 else "lower" if pair["hi"] < 0 else "tie"


def worse(verdict: str, better: bool | None) -> bool:
    """Whether `verdict` (diff_verdict) says a did worse, given which way is better."""
    return (verdict == "lower" and better is not False) or (verdict == "higher" and better is False)


def _judged(verdict: str, better: bool | None) -> str:
    """' (better)' or ' (worse)' after 'higher' or 'lower', where lm-eval says which way is better."""
    if verdict not in ("higher", "lower") or better is None:
        return ""
    return " (worse)" if worse(verdict, better) else " (better)"


def diff_brief(pair: dict) -> str:
    """'+0.183, 95% paired CI +0.067 to +0.300', for inside parentheses; 0/1 scores add the items
    each model alone got right."""
    alone = f", right alone on {pair['a_only']} vs {pair['b_only']} items" if "a_only" in pair else ""
    return f"{signed(pair['diff'])}" + (f", 95% paired CI {signed(pair['lo'])} to {signed(pair['hi'])}"
                                       if "lo" in pair else "") + alone


def diff_text(pair: dict) -> str:
    """'+0.183 (95% paired CI +0.067 to +0.300)'."""
    value, _, rest = diff_brief(pair).partition(", ")
    return value + (f" ({rest})" if rest else "")


def _label(task: str, metric: str, better: bool | None) -> str:
    return f"{task} ({metric}{', lower is better' if better is False else ''})"


def tasks_section(tasks: dict, compare_tasks: dict, labels: dict, picture: list[str], better: dict) -> list[str]:
    """Per model, each task's score with its interval; per pair, the paired difference and a verdict.
    `better`: directions(...)."""
    if not tasks["pretrained"]:
        return []
    names = list(tasks["pretrained"])
    way = lambda task, metric: better.get(task, {}).get(metric)  # noqa: E731
    rows = [[_label(task, metric, way(task, metric)), str(tasks["pretrained"][task]["items"]),
             *(score_text(tasks[m][task], metric) for m in MODELS)]
            for task in names for metric in metrics_of(tasks["pretrained"][task])]
    verdicts = {"higher": "a scores higher", "lower": "a scores lower", "tie": "cannot tell",
                "too few": "no call: too few items", "none differ": "no call: no item differs"}
    pairs = [[_label(task, metric, way(task, metric)), f"{labels[a]} − {labels[b]}", diff_text(pair),
              verdicts[v := diff_verdict(pair)] + _judged(v, way(task, metric))]
             for task in names for metric, by_pair in compare_tasks.get(task, {}).items()
             for name, pair in by_pair.items() for a, b in [name.split("_vs_")]]
    unpaired = sorted({metric for task in names for metric in metrics_of(tasks["pretrained"][task])
                       if metric not in compare_tasks.get(task, {})})
    return ["## Tasks", "",
            "Benchmarks through lm-evaluation-harness (params `tasks:`): each score is a mean over the task's items "
            "with its 95% interval over items (Wilson's for a proportion such as accuracy, else a bootstrap over items)"
            + (f"; {', '.join(unpaired)} as lm-eval aggregates it (not a mean over items: no interval, not paired)"
               if unpaired else "") + ". Which way is better is lm-eval's own for each metric.", "",
            table(rows, ["Task (metric)", "Items", *(labels[m] for m in MODELS)]), "", *picture,
            table(pairs, ["Task (metric)", "Difference (a − b)", "Score difference [95% paired CI]", "Verdict"]), "",
            "Paired: both models answer the same items (checked by lm-eval's document hashes). For 0/1 scores only the "
            "items where the two models differ count, and the interval is exact (McNemar's test); for other scores each "
            "bootstrap resample draws the same items for both. A difference is called only when its interval excludes 0.",
            ""]


def table(rows, headers) -> str:
    """A GitHub markdown table, cells as given (the report's tables all come from here)."""
    from tabulate import tabulate

    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def task_findings(tasks: dict, compare_tasks: dict, best: str | None, better: dict) -> list[str]:
    """Per task metric: each fine-tuned model against the pretrained one (learning, or forgetting on
    a general benchmark), and whether the model with the lowest test perplexity (`best`, where the
    paired intervals name one) also scores better than each other model. `better`: directions(...)."""
    said = {"higher": "higher", "lower": "lower", "tie": "cannot tell", "too few": "too few items to call",
            "none differ": "no item differs"}
    out = []
    for task, by_metric in compare_tasks.items():
        for metric, pairs in by_metric.items():
            way = better.get(task, {}).get(metric)
            what = _label(task, metric, way)
            out.append(f"On {what}, against the pretrained model: " + "; ".join(
                f"{NAMES[m]} {diff_text(pair)}, {said[v := diff_verdict(pair)]}{_judged(v, way)}"
                for m in ("full", "lora") for pair in [pairs[f"{m}_vs_pretrained"]]) + ".")
            if best is None:
                continue
            parts, any_worse = [], False
            for other in (m for m in MODELS if m != best):
                name = f"{best}_vs_{other}" if f"{best}_vs_{other}" in pairs else f"{other}_vs_{best}"
                pair = pairs[name] if name.startswith(best) else _flip(pairs[name])
                verdict = diff_verdict(pair)
                any_worse |= worse(verdict, way)
                parts.append({"higher": "scores higher than", "lower": "scores lower than", "tie": "cannot be told from",
                              "too few": "has too few items to compare with",
                              "none differ": "answers no item differently from"}[verdict]
                             + f" {NAMES[other]}{_judged(verdict, way)} ({diff_brief(pair)})")
            out.append(f"{_cap(NAMES[best])}, which has the lowest test perplexity, on {what}: " + "; ".join(parts) + "."
                       + (" Here a lower perplexity did not mean a better score." if any_worse else ""))
    return out


def _flip(pair: dict) -> dict:
    """The difference b − a from a − b."""
    out = dict(pair, diff=-pair["diff"])
    if "a_only" in pair:
        out |= {"a_only": pair["b_only"], "b_only": pair["a_only"]}
    if "lo" in pair:
        out |= {"lo": -pair["hi"], "hi": -pair["lo"]}
    return out


def headline_metrics(tasks: dict) -> dict:
    """'<model>_<task>_<metric>' (with _lo, _hi; the task's name in letters, digits and _) for the
    headline file `dvc exp show` reads."""
    out = {}
    for m in MODELS:
        for task, row in tasks[m].items():
            name = re.sub(r"\W+", "_", task)
            for metric in metrics_of(row):
                out |= {f"{m}_{name}_{metric}{end}": row[metric + end] for end in ("", "_lo", "_hi") if metric + end in row}
    return out
