"""The report's Tasks section and findings, from stage tasks' scores and stage compare's paired
differences (numbers only: nothing is recomputed).

A task score is a mean over items (accuracy, exact match, ...). Between two models, the
difference is called only when its paired 95% interval over items excludes 0; from fewer than
ftstudy.measure.stats.MIN_CHUNKS items, no call at all.
"""

from __future__ import annotations

import re

from ftstudy.report.findings import NAMES, _cap

MODELS = ("pretrained", "full", "lora")


def metrics_of(row: dict) -> list[str]:
    """A task row's metric names, in order ("acc", "exact_match_strip")."""
    return [k for k in row if k != "items" and not k.endswith(("_lo", "_hi"))]


def score_text(row: dict, metric: str) -> str:
    """'0.995 [0.980, 1.000]', or the score alone where there were too few items for an interval."""
    v = row[metric]
    return f"{v:.3f} [{row[metric + '_lo']:.3f}, {row[metric + '_hi']:.3f}]" if metric + "_lo" in row else f"{v:.3f}"


def diff_verdict(pair: dict) -> str:
    """'higher', 'lower' or 'tie' for a's score against b's; 'too few' without an interval."""
    if "lo" not in pair:
        return "too few"
    return "higher" if pair["lo"] > 0 else "lower" if pair["hi"] < 0 else "tie"


def diff_brief(pair: dict) -> str:
    """'+0.183, 95% paired CI +0.067 to +0.300', for inside parentheses."""
    return f"{pair['diff'] + 0.0:+.3f}" + (f", 95% paired CI {pair['lo'] + 0.0:+.3f} to {pair['hi'] + 0.0:+.3f}"
                                           if "lo" in pair else "")


def diff_text(pair: dict) -> str:
    """'+0.183 (95% paired CI +0.067 to +0.300)'."""
    value, _, interval = diff_brief(pair).partition(", ")
    return value + (f" ({interval})" if interval else "")


def tasks_section(tasks: dict, compare_tasks: dict, labels: dict, picture: list[str]) -> list[str]:
    """Per model, each task's score with its interval; per pair, the paired difference and a verdict."""
    if not tasks["pretrained"]:
        return []
    names = list(tasks["pretrained"])
    rows = [[f"{task} ({metric})", str(tasks["pretrained"][task]["items"]), *(score_text(tasks[m][task], metric) for m in MODELS)]
            for task in names for metric in metrics_of(tasks["pretrained"][task])]
    verdicts = {"higher": "a scores higher", "lower": "a scores lower", "tie": "cannot tell",
                "too few": "no call: too few items"}
    pairs = [[f"{task} ({metric})", f"{labels[a]} − {labels[b]}", diff_text(pair), verdicts[diff_verdict(pair)]]
             for task in names for metric, by_pair in compare_tasks.get(task, {}).items()
             for name, pair in by_pair.items() for a, b in [name.split("_vs_")]]
    return ["## Tasks", "",
            "Benchmarks through lm-evaluation-harness (params `tasks:`): each score is a mean over the task's items "
            "with its 95% bootstrap interval over items.", "",
            table(rows, ["Task (metric)", "Items", *(labels[m] for m in MODELS)]), "", *picture,
            table(pairs, ["Task (metric)", "Difference (a − b)", "Score difference [95% paired CI]", "Verdict"]), "",
            "Paired: both models answer the same items, and each bootstrap resample draws the same items for both; "
            "a difference is called only when its interval excludes 0.", ""]


def table(rows, headers) -> str:
    """A GitHub markdown table, cells as given (the report's tables all come from here)."""
    from tabulate import tabulate

    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def task_findings(tasks: dict, compare_tasks: dict, best: str | None) -> list[str]:
    """Per task metric: each fine-tuned model against the pretrained one (learning, or forgetting on
    a general benchmark), and whether the model with the lowest test perplexity (`best`, where the
    paired intervals name one) also scores higher than each other model."""
    said = {"higher": "higher", "lower": "lower", "tie": "cannot tell", "too few": "too few items to call"}
    out = []
    for task, by_metric in compare_tasks.items():
        for metric, pairs in by_metric.items():
            what = f"{task} ({metric})"
            out.append(f"On {what}, against the pretrained model: " + "; ".join(
                f"{NAMES[m]} {diff_text(pairs[f'{m}_vs_pretrained'])}, {said[diff_verdict(pairs[f'{m}_vs_pretrained'])]}"
                for m in ("full", "lora")) + ".")
            if best is None:
                continue
            parts, worse = [], False
            for other in (m for m in MODELS if m != best):
                name = f"{best}_vs_{other}" if f"{best}_vs_{other}" in pairs else f"{other}_vs_{best}"
                pair = pairs[name] if name.startswith(best) else _flip(pairs[name])
                verdict = diff_verdict(pair)
                worse |= verdict == "lower"
                parts.append({"higher": "scores higher than", "lower": "scores lower than", "tie": "cannot be told from",
                              "too few": "has too few items to compare with"}[verdict] + f" {NAMES[other]} ({diff_brief(pair)})")
            out.append(f"{_cap(NAMES[best])}, which has the lowest test perplexity, on {what}: " + "; ".join(parts) + "."
                       + (" Here a lower perplexity did not mean a better score." if worse else ""))
    return out


def _flip(pair: dict) -> dict:
    """The difference b − a from a − b."""
    out = dict(pair, diff=-pair["diff"])
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
