"""Stage tasks@<model>: a model + params `tasks:` -> benchmark scores through lm-evaluation-harness.

Each model has its own entry, so that changing the tasks reruns no training and no perplexity
scoring, and a retrained model reruns only its own tasks. The model is loaded as `evaluate` loads
it (a full folder, or the pretrained snapshot with the LoRA adapter applied, unmerged) and handed to
lm-eval's evaluator. Per task and metric, --out gets the score with a 95% bootstrap interval over
items (from ftstudy.measure.stats.MIN_CHUNKS items on); --items gets every item's score (.npz), which stage
compare pairs between models; --info gets what changes scores (few-shot count, batch size, seed,
chat template, lm-eval's and each task's version, each Hub task's dataset and commit) and, for an
adapter, the merged-versus-unmerged check: its first tasks.merge_check items of each task scored
again by the adapter merged into its base, every log-likelihood within tasks.merge_tolerance, or
the stage fails naming the largest gap.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ftstudy import warm
from ftstudy.config import load_params
from ftstudy.errors import run_stage
from ftstudy.outputs import write_arrays, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark a model through lm-eval; run by dvc.yaml stage tasks@<model>")
    ap.add_argument("--model", required=True, help="model folder (full model or PEFT adapter)")
    ap.add_argument("--base", required=True, help="pretrained snapshot, the base of an adapter")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--info", required=True, help="settings and versions JSON to write")
    ap.add_argument("--items", required=True, help="per-item scores (.npz) to write")
    args = ap.parse_args()
    p = load_params()
    name = Path(args.out).stem
    if not p.tasks.names:
        write_arrays(args.items, {})
        write_json(args.info, {"tasks": {}})
        write_json(args.out, {name: {"tasks": {}}})
        print(f"tasks@{name}: tasks.names is empty, nothing to run; wrote {args.out}")
        return
    from ftstudy import hub, modeling, runtime

    modeling.leave_out_bitsandbytes(args.base)
    from ftstudy.measure import benchmarks, task_metrics

    benchmarks.task_names(p.tasks.names)  # a missing or misplaced local file fails here, before any import
    unreachable = hub.hub_unreachable() if benchmarks.has_hub_tasks(p.tasks.names) else None  # one probe
    if unreachable is not None:
        # before the Hub clients are first imported (they read these once): the cache, no retries
        warm.start_cold("offline mode, which the Hub clients read at import", imported="huggingface_hub")
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    benchmarks.quiet_lm_eval()
    benchmarks.no_download_counts()
    manager = benchmarks.task_manager(p.tasks.names)
    commits = benchmarks.resolve_datasets(p.tasks.names, manager, unreachable)
    model, device = runtime.to_eval_device(modeling.load_for_eval(args.model, args.base, p.model.name),
                                           p.train.cpu_threads)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    tokenizer = modeling.load_tokenizer(args.base)
    t0 = time.perf_counter()
    results = benchmarks.evaluate(model, tokenizer, p.tasks, p.seed, p.data.split_seed, manager, commits)
    items = benchmarks.per_item(results)
    eval_s = time.perf_counter() - t0
    check = None
    if modeling.is_adapter(args.model) and p.tasks.merge_check:
        merged = model.merge_and_unload()
        check = benchmarks.merge_check(items, lambda samples: benchmarks.per_item(
            benchmarks.evaluate(merged, tokenizer, p.tasks, p.seed, p.data.split_seed, manager, commits, samples)),
            p.tasks.merge_check, p.tasks.merge_tolerance)
    benchmarks.stamp_commits(items, commits)
    scores = benchmarks.scores(items, p.evaluate.bootstrap_samples, p.seed)
    for task, aggregated in task_metrics.aggregated_scores(results).items():
        scores.setdefault(task, {}).update(aggregated)
    info = benchmarks.info(results, p.tasks, p.seed, commits) | {
        "device": runtime.device_name(device), "dtype": dtype,
        "eval_time_s": round(eval_s, 3)}
    if check is not None:
        info["merge_check"] = check
    write_arrays(args.items, benchmarks.flat_arrays(items))
    write_json(args.info, info)
    write_json(args.out, {name: {"tasks": scores}})  # `dvc exp show` columns read lora.tasks.<task>.<metric>
    print(f"tasks@{name}: " + "; ".join(f"{task} {benchmarks.describe(s)}" for task, s in scores.items())
          + (f"; merged model agrees within {check['tolerance']} nats" if check else "")
          + f" in {eval_s:.1f} s; wrote {args.out}, {args.info}, {args.items}")


if __name__ == "__main__":
    run_stage(main)
