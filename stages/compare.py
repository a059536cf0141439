"""Stage compare: per-token NLL and validation curves -> paired ratios, forgetting, time to quality.

For each pair (full vs pretrained, lora vs pretrained, full vs lora): the ratio of their test
perplexities with a 95% paired bootstrap interval over the split's independent units (examples,
documents, WikiText articles; chunks of a running text without them), named in each pair as
`unit`. The models are scored on the very same tokens, so the same resampled units are drawn for
both (ftstudy.measure.stats.paired_ppl_ratio): a tighter and more honest test than whether two separate
intervals overlap. The units go to --info (a metrics file holds numbers only). The report's findings
call a winner only when the paired interval excludes 1, and no winner at all from fewer than
ftstudy.measure.stats.MIN_CHUNKS units. The same pairs on each general set (data.general) measure
forgetting. Time to quality: the training seconds and tokens each method needed to reach the
other's final validation loss (none when it never did). Benchmarks (stage tasks): for each task
metric and pair, the difference of their mean scores with a 95% paired interval over the task's items
(ftstudy.measure.stats.paired_mean_difference: exact, on McNemar's test, for 0/1 scores; else a paired
bootstrap), only once every model is shown to have scored the very same documents (same_items); the
same for the held-out answers' scores of instruction data (stage generate), over examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ftstudy import curves
from ftstudy.config import load_params
from ftstudy.errors import StudyError, run_stage
from ftstudy.measure import answers, benchmarks
from ftstudy.measure.stats import MIN_CHUNKS, paired_mean_difference, paired_ppl_ratio
from ftstudy.outputs import read_json, write_json

PAIRS = (("full", "pretrained"), ("lora", "pretrained"), ("full", "lora"))


def main() -> None:
    ap = argparse.ArgumentParser(description="Paired model comparisons; run by dvc.yaml stage compare")
    ap.add_argument("--nll", required=True, type=Path, help="folder of <model>.npz per-token NLL (test, general sets)")
    ap.add_argument("--tasks", required=True, type=Path, help="folder of <model>.npz per-item benchmark scores")
    ap.add_argument("--generations", required=True, type=Path,
                    help="folder of <model>.json generations (held-out answers and their scores, instruction data)")
    ap.add_argument("--curves", required=True, type=Path, help="folder of train_<method>/val_loss.csv")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--info", required=True, help="facts JSON to write: the unit each split's intervals resample")
    args = ap.parse_args()
    p = load_params()
    nll = {m: np.load(args.nll / f"{m}.npz") for m in {m for pair in PAIRS for m in pair}}
    ev = p.evaluate

    units: dict[str, str] = {}  # split -> the unit its intervals resample, for the info file (metrics are numbers)

    def pairs(split: str) -> dict:
        # The resampled units: whole examples, documents or articles (their scored-token counts), else chunks.
        files = nll["pretrained"].files
        sizes = nll["pretrained"][f"{split}_sizes"] if f"{split}_sizes" in files else None
        units[split] = str(nll["pretrained"][f"{split}_unit"]) if f"{split}_unit" in files else "chunks"
        return {f"{a}_vs_{b}": paired_ppl_ratio(nll[a][split], nll[b][split], ev.bootstrap_chunk,
                                                ev.bootstrap_samples, p.seed, sizes=sizes)
                for a, b in PAIRS}

    paired = pairs("test")
    forgetting = {label: pairs(label) for label in nll["pretrained"].files
                  if label != "test" and not label.endswith(("_sizes", "_unit"))}
    val = {m: curves.read_val(args.curves / f"train_{m}") for m in ("full", "lora")}
    # Time to quality: when each method first reached the other's final validation loss.
    reach = {m: curves.time_to_reach(val[m], val[other][-1]["loss"]) for m, other in (("full", "lora"), ("lora", "full"))}
    items = {m: benchmarks.read_items(np.load(args.tasks / f"{m}.npz")) | answer_items(args.generations / f"{m}.json")
             for m in nll}
    tasks = task_pairs(items, ev.bootstrap_samples, p.seed)
    bootstrap = {"chunk": ev.bootstrap_chunk, "min_chunks": MIN_CHUNKS}
    write_json(args.info, {"units": units})
    write_json(args.out, {"paired": paired, "forgetting": forgetting, "tasks": tasks, "time_to_quality": reach,
                          "bootstrap": bootstrap})
    print("compare: test perplexity ratios " + ", ".join(f"{k} {_ratio(v, units['test'])}" for k, v in paired.items())
          + f"; {len(forgetting)} general set(s), {len(tasks)} task(s); wrote {args.out}, {args.info}")


def answer_items(path: Path) -> dict:
    """The held-out answers' per-example scores as one more task, keyed as lm-eval's per-item metrics."""
    scored = [a for a in read_json(path).get("heldout", []) if "scores" in a]
    if not scored:
        return {}
    return {answers.TASK: {"doc_id": np.array([a["example"] for a in scored]),
                      **{f"{m},none": np.array([a["scores"][m] for a in scored]) for m in scored[0]["scores"]}}}


def task_pairs(items: dict[str, dict], samples: int, seed: int) -> dict:
    """task -> metric -> "<a>_vs_<b>" -> the paired difference of mean scores over the task's items."""
    out: dict = {}
    for task, arrays in items["pretrained"].items():
        same_items(items, task)
        for key, metric in benchmarks.metric_keys(arrays).items():
            if missing := [m for m in items if key not in items[m].get(task, {})]:
                raise StudyError(f"tasks: {', '.join(missing)} have no {metric} scores on {task}, which the pretrained "
                                 "model has; rerun every model's tasks (dvc repro tasks)")
            for a, b in PAIRS:
                out.setdefault(task, {}).setdefault(metric, {})[f"{a}_vs_{b}"] = paired_mean_difference(
                    items[a][task][key], items[b][task][key], samples, seed)
    return out


def same_items(items: dict[str, dict], task: str) -> None:
    """Stop unless every model scored the very same documents of `task`: the same ids, the same
    lm-eval document hashes and the same dataset commit. An unpinned Hub task resolves its dataset
    when each tasks@<model> runs, so a model retrained after the dataset moved would otherwise be
    paired item by item with another revision's items. The odd one out is named to rerun."""
    def signature(m: str) -> tuple:
        arrays = items[m].get(task, {})
        return tuple(np.asarray(arrays.get(k, [])).tobytes() for k in ("doc_id", "doc_hash", "dataset_commit"))

    groups: dict[tuple, list[str]] = {}
    for m in items:
        groups.setdefault(signature(m), []).append(m)
    if len(groups) == 1:
        return
    sizes = sorted((len(g) for g in groups.values()), reverse=True)
    majority = max(groups.values(), key=len) if sizes[0] > sizes[1] else []  # with no majority, rerun them all
    odd = [m for m in items if m not in majority]
    commits = sorted({str(items[m][task].get("dataset_commit", "")) or "local" for m in items if task in items[m]})
    what = f"dataset commits {', '.join(commits)}" if len(commits) > 1 else "documents that differ"
    raise StudyError(f"tasks: the models were scored on different items of {task} ({what}), which cannot be paired; "
                     f"rerun {' and '.join(f'`dvc repro -s -f tasks@{m}`' for m in odd)} so that every model reads the "
                     f"same data (pin a Hub task as {task}@<commit> in tasks.names to keep it fixed)")


def _ratio(v: dict, unit: str) -> str:
    return f"{v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" if "lo" in v else f"{v['ratio']:.3f} (too few {unit})"


if __name__ == "__main__":
    run_stage(main)
