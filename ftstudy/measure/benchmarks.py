"""Benchmarks through lm-evaluation-harness (params `tasks:`), scored item by item.

Each model is run by lm-eval's own evaluator (`simple_evaluate`) on an already-loaded model, the
one `evaluate` scores: a full model folder, or the pretrained snapshot with the LoRA adapter
applied, unmerged (PEFT). lm-eval's per-item records (`log_samples`) are kept as arrays, one per
task metric, in lm-eval's item order, so that stage compare can resample the same items for two
models (a paired bootstrap over items), as it does examples and documents for perplexity.

Local tasks are lm-eval task YAML files (lm-eval's new_task_guide, "Using Local Datasets") in the
project's `tasks/` folder, with their data files: the folder is a DVC dependency of the stage,
so editing a task reruns it. Their data paths are read from the working directory (the repo root,
where dvc runs stages). Hub tasks are lm-eval's own task names, optionally pinned to a dataset
commit as `name@commit`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from ftstudy.errors import StudyError
from ftstudy.measure.task_metrics import is_number, metric_facts, metric_specs, our_name

TASKS_DIR = "tasks"  # local task YAML files and their data: a dependency of stage tasks (dvc.yaml)
# datasets' packaged loaders, which read local data_files: no Hub dataset to pin
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


class TaskError(StudyError):
    """A task in params `tasks.names` cannot be found, read or loaded."""


def local_task_name(path: str | Path) -> str:
    """The lm-eval task name a local task YAML file defines (its `task:` key)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"tasks.names: {path} not found; local task files live in {TASKS_DIR}/ (with their data)")
    if Path(os.path.relpath(path.resolve(), Path.cwd().resolve())).parts[:1] != (TASKS_DIR,):
        raise TaskError(f"tasks.names: {path} is outside {TASKS_DIR}/; move it and its data files there, so that "
                        "DVC reruns the tasks when they change")
    try:
        name = yaml.safe_load(path.read_text(encoding="utf-8")).get("task")
    except (yaml.YAMLError, AttributeError) as e:
        raise TaskError(f"tasks.names: {path} is not an lm-eval task YAML file (a mapping with a `task:` key): {e}") from e
    if not isinstance(name, str):
        raise TaskError(f"tasks.names: {path} has no `task:` name; lm-eval task files name their task there")
    return name


# lm-eval's output types (lm_eval.api.task.ALL_OUTPUT_TYPES, asked only when a file names another)
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until", "multiple_choice")


def local_task_problems(entries: tuple[str, ...]) -> list[str]:
    """What is wrong with the local task files params `tasks.names` lists, one sentence each: a file
    missing or outside tasks/, not YAML, a key lm-eval's TaskConfig does not have (a misspelled
    field, which lm-eval would report in a long traceback naming neither file nor field), or an
    output_type lm-eval does not know. Checked by stage check_params before any stage runs."""
    import dataclasses

    problems = []
    for entry in (e for e in entries if is_local(e)):
        try:
            local_task_name(entry)
            config = yaml.safe_load(Path(entry).read_text(encoding="utf-8"))
        except (TaskError, yaml.YAMLError) as e:
            problems.append(str(e).splitlines()[0])
            continue
        from lm_eval.config.task import TaskConfig

        known = {f.name for f in dataclasses.fields(TaskConfig)} | {"include", "class", "group"}
        for key in sorted(set(config) - known):
            near = difflib.get_close_matches(key, known, n=1)
            problems.append(f"tasks.names: {entry} has the key {key!r}, which lm-eval task files do not have"
                            + (f" (did you mean {near[0]!r}?)" if near else ""))
        kind = config.get("output_type")
        if kind is not None and kind not in OUTPUT_TYPES:
            from lm_eval.api.task import ALL_OUTPUT_TYPES

            if kind not in ALL_OUTPUT_TYPES:
                near = difflib.get_close_matches(str(kind), ALL_OUTPUT_TYPES, n=1)
                problems.append(f"tasks.names: {entry} has output_type {kind!r}, which lm-eval does not know; it takes "
                                + ", ".join(ALL_OUTPUT_TYPES) + (f" (did you mean {near[0]!r}?)" if near else ""))
    return problems


def is_local(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def split_pin(entry: str) -> tuple[str, str | None]:
    """'name@commit' -> (name, commit); 'name' -> (name, None)."""
    name, _, commit = entry.partition("@")
    return name, commit or None


def task_names(entries: tuple[str, ...]) -> list[str]:
    """The lm-eval task names that params `tasks.names` asks for, in its order."""
    return [local_task_name(e) if is_local(e) else split_pin(e)[0] for e in entries]


def no_download_counts() -> None:
    """Switch off datasets' download counter. Unless the Hub is in offline mode, every
    `load_dataset` sends it a HEAD request to S3 first, even for a packaged loader reading local
    files (a local task's data): behind a firewall that drops packets, each waited its 3 s timeout,
    twice a task stage in the demo (tests/test_offline.py counts the connections). It is telemetry;
    a Hub task's data still downloads. datasets reads the switch at each load."""
    import datasets.config

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False


def quiet_lm_eval() -> None:
    """lm-eval's logs stay out of a stage's output but for its errors: its info and warnings are
    about its own machinery (a model passed as an object, few-shot defaults overridden), and what
    they would tell is recorded in the stage's info instead. Off a terminal, the Hub's and datasets'
    progress bars are off too (through their own switches, which count whenever they are imported;
    lm-eval's own bars: evaluate)."""
    os.environ["LMEVAL_LOG_LEVEL"] = "ERROR"  # lm-eval sets its logger's level from this at import
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # no progress bars in a log: a Hub task's downloads and dataset builds
        import datasets
        from huggingface_hub.utils import disable_progress_bars

        datasets.disable_progress_bars()
        disable_progress_bars()


def task_manager(entries: tuple[str, ...]):
    folders = tuple(sorted({str(Path(e).parent.resolve()) for e in entries if is_local(e)}))
    return _task_manager(folders, has_hub_tasks(entries))


@functools.cache
def _task_manager(folders: tuple[str, ...], defaults: bool):
    """lm-eval's index of the task files in `folders` and, with `defaults`, of its own thousands of
    them (12 s on a 2-core CPU: only when a task is theirs), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=defaults)


def has_hub_tasks(entries: tuple[str, ...]) -> bool:
    return any(not is_local(e) for e in entries)


def resolve_datasets(entries: tuple[str, ...], manager, reason: str | None) -> dict[str, dict]:
    """task -> {"dataset", "revision" (asked), "commit" (served), "from"} for every Hub task whose
    config names one dataset (a group of tasks, such as mmlu, is loaded as lm-eval says), like
    prepare's Hub inputs: asked from the Hub when it can be reached, else found complete in the
    local Hub cache, else a TaskError with the way on, before any model is loaded. lm-eval's own
    task files pin no dataset revision; the run then loads exactly these commits. A local task file
    that names a Hub dataset is pinned the same way. Groups and tags of tasks are refused: each
    task must be named, so that its dataset is pinned and its items paired. `reason`: why the Hub
    cannot be reached (ftstudy.hub.hub_unreachable), or None."""
    from ftstudy.hub import HubInput, cached_commit, served_commit

    out = {}
    for i, entry in enumerate(entries):
        name, pin = (local_task_name(entry), None) if is_local(entry) else split_pin(entry)
        if name not in manager.all_tasks:
            raise TaskError(f"tasks.names[{i}]: {name!r} is not an lm-eval task (`lm_eval ls tasks` lists them); for "
                            f"a task of your own, give its YAML file under {TASKS_DIR}/")
        kind = getattr(getattr(manager.task_index[name], "kind", None), "name", "TASK")
        if kind in ("GROUP", "TAG"):
            raise TaskError(f"tasks.names[{i}]: {name!r} is a {kind.lower()} of lm-eval tasks; list its tasks by name, "
                            "so that each one's dataset is pinned and its items paired between models")
        dataset = _registered_config(manager, name).get("dataset_path")
        if not dataset or dataset in LOCAL_BUILDERS or Path(dataset).exists():
            continue
        item = HubInput(f"tasks.names[{i}]", dataset, "dataset", pin)
        commit, how = (served_commit(item), "the Hub") if reason is None else cached_commit(item)
        if commit is None:
            raise TaskError(f"tasks.names[{i}]: task {name!r} reads the Hub dataset {dataset!r}, which could not be "
                            f"reached ({reason}) and is not complete in the local Hub cache at {pin or 'main'!r}; run "
                            "once with the network (or copy a cache that has it, HF_HOME), or drop the task")
        out[name] = {"dataset": dataset, "revision": item.asked, "commit": commit, "from": how}
    return out


def task_specs(entries: tuple[str, ...], manager, commits: dict[str, dict]) -> list:
    """lm-eval task specs: a local task's name, or a Hub task built with its dataset pinned to the
    resolved commit (lm-eval's task factory, its overrides merged into the task's own config: a
    dict spec would stand for a new task of that name)."""
    specs = []
    for entry in entries:
        name = local_task_name(entry) if is_local(entry) else split_pin(entry)[0]
        if name not in commits:
            specs.append(name)
        else:
            kwargs = dict(_registered_config(manager, name).get("dataset_kwargs") or {})
            specs.append(manager._factory.build(manager._entry(name), registry=manager._index,
                                                overrides={"dataset_kwargs": kwargs | {"revision": commits[name]["commit"]}}))
    return specs


def _registered_config(manager, name: str) -> dict:
    """A registered task's own YAML config (for the keys a pin must keep)."""
    entry = manager.task_index[name]
    path = getattr(entry, "yaml_path", None) or (entry.get("yaml_path") if isinstance(entry, dict) else None)
    if not path:
        return {}
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False) or {}


@contextlib.contextmanager
def _no_machine_survey():
    """simple_evaluate ends by surveying the machine into its results (torch.utils.collect_env: pip
    list, compilers, drivers; 22 subprocesses, 0.8-1.0 s a call on a 2-core AMD EPYC), which nothing
    here keeps: the stage's info records the versions that matter. Left out for the call."""
    import lm_eval.evaluator

    survey = getattr(lm_eval.evaluator, "add_env_info", None)
    if survey is None:  # a later lm-eval without it
        yield
        return
    lm_eval.evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = survey


def evaluate(model, tokenizer, p_tasks, seed: int, split_seed: int, manager, commits: dict,
             samples: dict | None = None) -> dict:
    """lm-eval's results for `model` on params tasks, Hub datasets at `commits` (resolve_datasets);
    `samples`: only these items of each task. The few-shot examples are drawn with `split_seed`
    (data.split_seed), not the training seed: every seed of a study is scored on the same prompts."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=p_tasks.batch_size)
    # lm-eval's progress bars go to a terminal only (its own tqdm calls ignore TQDM_DISABLE).
    bars = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        with bars, _no_machine_survey():
            return simple_evaluate(
                model=lm, tasks=task_specs(p_tasks.names, manager, commits), num_fewshot=p_tasks.num_fewshot,
                limit=None if samples is not None else p_tasks.limit, samples=samples,
                apply_chat_template=p_tasks.chat_template, log_samples=True, bootstrap_iters=0,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=split_seed,
                task_manager=manager)
    except FileNotFoundError as e:  # a local task's data file (a Hub task's dataset was resolved before)
        raise TaskError(f"tasks.names: a task's data file was not found ({e}); local tasks read their data_files "
                        f"from the repo root, under {TASKS_DIR}/") from e


def _logliks(resps) -> list[float]:
    """The log-likelihoods in one item's raw responses, one per request (a choice, a continuation);
    none for generated text."""
    out = []
    for resp in resps:
        first = resp[0] if isinstance(resp, (list, tuple)) and resp else resp
        if isinstance(first, (list, tuple)) and first:  # (log-likelihood, is_greedy)
            first = first[0]
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            out.append(float(first))
    return out


def per_item(results: dict) -> dict[str, dict[str, np.ndarray]]:
    """task -> {"doc_id", "doc_hash" (lm-eval's hash of each document: what pairing checks),
    "<metric>,<filter>" per-item scores of every metric lm-eval aggregates as a mean (those an
    interval over items and a paired difference describe; a perplexity or corpus BLEU is not a mean
    of per-item scores: task_metrics.aggregated_scores), "loglik" (every request's log-likelihood, in item
    order), "text" (each item's generated text, if any)} from lm-eval's logged samples, sorted by
    item. A task's filters (lm-eval's answer extractions) share items."""
    out = {}
    for task, samples in results["samples"].items():
        if not samples:
            raise TaskError(f"tasks.names: {task} logged no items; check its test split and tasks.limit")
        arrays: dict[str, np.ndarray] = {}
        filters = sorted({s.get("filter", "none") for s in samples})
        specs = metric_specs(results, task)
        for f in filters:
            rows = sorted((s for s in samples if s.get("filter", "none") == f), key=lambda s: s["doc_id"])
            arrays.setdefault("doc_id", np.array([s["doc_id"] for s in rows]))
            arrays.setdefault("doc_hash", np.array([str(s.get("doc_hash", "")) for s in rows]))
            for metric in rows[0].get("metrics", []):
                mean = specs.get(metric, {}).get("aggregation", "mean") == "mean"
                if mean and all(is_number(s.get(metric)) for s in rows):
                    arrays[f"{metric},{f}"] = np.array([float(s[metric]) for s in rows])
            if f == filters[0]:
                lls = [_logliks(s["resps"]) for s in rows]
                arrays["loglik"] = np.array([x for ll in lls for x in ll])
                arrays["requests"] = np.array([len(ll) for ll in lls])
                texts = [s["filtered_resps"][0] if isinstance(s.get("filtered_resps"), list) and s["filtered_resps"]
                         and isinstance(s["filtered_resps"][0], str) else None for s in rows]
                if all(t is not None for t in texts):
                    arrays["text"] = np.array(texts)
        out[task] = arrays
    return out


def stamp_commits(items: dict, commits: dict) -> None:
    """Each task's dataset commit ("" for local data) beside its items: what compare checks, with
    the documents' hashes, before pairing two models' items."""
    for task, arrays in items.items():
        arrays["dataset_commit"] = np.array(commits.get(task, {}).get("commit") or "")


def flat_arrays(items: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """For the .npz: "<task>::<key>" -> array."""
    return {f"{task}::{key}": a for task, arrays in items.items() for key, a in arrays.items()}


def read_items(npz) -> dict[str, dict[str, np.ndarray]]:
    """The .npz of flat_arrays back as task -> key -> array."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for flat in npz.files:
        task, _, key = flat.partition("::")
        out.setdefault(task, {})[key] = npz[flat]
    return out


def metric_keys(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """A task's per-item score arrays: lm-eval's "<metric>,<filter>" -> our name, the metric alone
    when unfiltered ("acc"), else "<metric>_<filter>" ("exact_match_strip")."""
    return {key: our_name(*key.split(",", 1)) for key in arrays if "," in key}


def scores(items: dict[str, dict[str, np.ndarray]], samples: int, seed: int) -> dict:
    """task -> {"<metric>": score, "<metric>_lo", "<metric>_hi" (a 95% bootstrap interval over
    items, from MIN_CHUNKS items on), "items"}."""
    from ftstudy.measure.stats import score_row

    return {task: score_row({metric: arrays[key] for key, metric in metric_keys(arrays).items()}, samples, seed)
            for task, arrays in items.items()}


def describe(row: dict) -> str:
    """'acc 0.995 [0.980, 1.000]' for each metric of a task's row, for the stage's summary line."""
    return ", ".join(f"{k} {v:.3f}" + (f" [{row[k + '_lo']:.3f}, {row[k + '_hi']:.3f}]" if k + "_lo" in row else "")
                     for k, v in row.items() if k != "items" and not k.endswith(("_lo", "_hi")))


def merge_check(items: dict, run_merged, n: int, tolerance: float) -> dict:
    """The adapter's first `n` items of each task against its merged model's, run by `run_merged`
    (samples -> per_item): every request's log-likelihood within `tolerance` nats, and at most 5%
    of generated texts different (greedy decoding may part at a near-tie); else TaskError."""
    samples = {task: [int(i) for i in arrays["doc_id"][:n]] for task, arrays in items.items()}
    merged = run_merged(samples)
    worst, worst_at, texts, differ = 0.0, None, 0, 0
    for task, arrays in items.items():
        k = len(samples[task])
        lls = arrays["loglik"][: int(arrays["requests"][:k].sum())]
        if len(lls) != len(merged[task]["loglik"]) or ("text" in arrays) != ("text" in merged[task]):
            raise TaskError(f"the merge check's second run of {task} gave other requests than the first; rerun "
                            "(dvc repro tasks@lora), or set tasks.merge_check: 0")
        gap = np.abs(lls - merged[task]["loglik"]) if len(lls) else np.zeros(0)
        if len(gap) and gap.max() > worst:
            worst, worst_at = float(gap.max()), task
        if "text" in arrays:
            texts += k
            differ += int((arrays["text"][:k] != merged[task]["text"]).sum())
    out = {"items": {t: len(s) for t, s in samples.items()}, "max_loglik_diff": worst, "tolerance": tolerance,
           "texts_compared": texts, "texts_differ": differ}
    if worst > tolerance or differ > 0.05 * texts:
        where = (f"log-likelihoods up to {worst:.3g} nats apart on {worst_at} (tolerance {tolerance})" if worst > tolerance
                 else f"{differ} of {texts} generated texts differ")
        raise TaskError(f"the LoRA adapter and its merged model disagree: {where}; the adapter folder may be corrupt or "
                        "not for this base (retrain: dvc repro train_lora), or raise tasks.merge_tolerance for a "
                        "lower-precision run")
    return out


def info(results: dict, p_tasks, seed: int, commits: dict) -> dict:
    """What the scores depend on: settings, versions, and each task's data source."""
    from importlib.metadata import version

    tasks, facts = {}, metric_facts(results)
    for task in results["configs"]:
        cfg = results["configs"][task]
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        source = {"dataset": cfg.get("dataset_path"), "config": cfg.get("dataset_name"),
                  "split": cfg.get("test_split") or cfg.get("validation_split")}
        if kwargs.get("data_files"):
            source["data_files"] = kwargs["data_files"]
        elif task in commits:
            source |= {k: commits[task][k] for k in ("revision", "commit", "from")}
        tasks[task] = {"version": results["versions"].get(task), "num_fewshot": results["n-shot"].get(task),
                       "output_type": cfg.get("output_type"), "items": results["n-samples"].get(task, {}).get("effective"),
                       "source": source, "metrics": facts.get(task, {})}
    return {"tasks": tasks, "settings": {"num_fewshot": p_tasks.num_fewshot, "batch_size": p_tasks.batch_size,
                                         "limit": p_tasks.limit, "chat_template": p_tasks.chat_template, "seed": seed},
            "lm_eval": version("lm_eval"), "chat_template": p_tasks.chat_template}
