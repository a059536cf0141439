"""The study across experiments: each method's learning rate over a grid, times several seeds.

    python -m scripts.study [--dir .] [--full-lr 2e-5,5e-5,1e-4] [--lora-lr 1e-4,2e-4,5e-4] [--seeds 1,2,3]
    python -m scripts.study --demo [--dir .demo]        # the tiny assets, sized for 2 CPU cores

Grid point i sets full.lr to the i-th full rate and lora.lr to the i-th LoRA rate, so one
experiment trains both methods (each method's results depend only on its own rate and the seed);
every point runs under every seed. Experiments are queued with `dvc exp run --queue` and run with
`dvc queue start`, or, with --backend dask, run as Dask tasks in clones and gathered through `dvc
exp push/pull` (scripts/cluster.py); an experiment whose seed and rates already ran with every other params key as
params.yaml has it (an earlier study, or the committed baseline) is reused, so a second run of the
same study trains nothing, and an experiment of another setup (`-S lora.r=16`) is never counted. Results are read
through DVC's Python API (dvc.api.exp_show). Each method's rate is chosen on validation perplexity
(mean over seeds); at the chosen rates the study reports test perplexity (mean ± sd, range), the
full-vs-LoRA difference with a t interval over seeds, training time, peak memory, the change
on general text, and each task score (stage tasks; held-out answers for instruction data) with
its full-vs-LoRA t interval; within each method over its runs, the rank correlation between test
perplexity and each task score (correlation: never pooled across methods, its interval over runs and
items, no call from fewer than MIN_RUNS runs a method). Writes <dir>/study.md and <dir>/study.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from scripts.cluster import set_args
from scripts.sandbox import MARKER, DvcError, make_sandbox, refuse_uncommitted, repro_and_commit, run_queue

# LoRA's best rate is about 10x full fine-tuning's ("LoRA Without Regret", Thinking Machines 2025;
# docs/measurement.md): each grid brackets its method's usual best, and the two grids span 1x to 100x.
GRID = {"full_lr": [1e-5, 3e-5, 1e-4], "lora_lr": [1e-4, 3e-4, 1e-3], "seeds": [1, 2, 3]}
# The demo: two rates per method around the demo's own (full 2e-3, LoRA 1e-2), two seeds; the
# point (2e-3, 1e-2, seed 42) is the demo's committed baseline, so 3 experiments run.
DEMO_GRID = {"full_lr": [1e-3, 2e-3], "lora_lr": [5e-3, 1e-2], "seeds": [42, 7]}
METHODS = ("full", "lora")


def points(grid: dict) -> list[tuple[int, float, float]]:
    if len(grid["full_lr"]) != len(grid["lora_lr"]):
        raise SystemExit("study: --full-lr and --lora-lr need as many rates each (grid point i uses the i-th of both)")
    return [(seed, f, l) for f, l in zip(grid["full_lr"], grid["lora_lr"]) for seed in grid["seeds"]]


def _key(seed, full_lr, lora_lr) -> tuple:
    return int(seed), round(float(full_lr), 12), round(float(lora_lr), 12)


SWEPT = ("seed", "full.lr", "lora.lr")
PRESENTATION = ("model.label",)  # read by the report alone: a run under another label is the same run


def _normal(value):
    """A params value as exp_show gives it, comparable: ints as floats, and a column whose rows mix
    types stringified (None as 'None', false as 'False', lists as their Python repr). Both sides of
    a comparison go through here."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        if isinstance(value, str):
            return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def same_setup(row: dict, params: dict) -> bool:
    """Whether an experiment ran with `params` (flattened params.yaml) in every key but the swept
    ones: an earlier `-S lora.r=16 -S seed=1` is not a grid point of a study at lora.r=8."""
    return all(_normal(row.get(k)) == _normal(v) for k, v in params.items() if k not in SWEPT + PRESENTATION)


def finished_runs(repo: Path) -> dict[tuple, dict]:
    """(seed, full.lr, lora.lr) -> that run's flattened params and metrics, for the committed
    baseline and every successful experiment (dvc.api.exp_show) whose other params equal the
    repo's params.yaml."""
    import dvc.api
    import yaml

    from ftstudy.config import flatten

    params = flatten(yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8")))
    runs = {}
    for row in dvc.api.exp_show(repo=str(repo)):
        if row.get("Experiment") == "workspace" or row.get("State") not in (None, "Success"):
            continue
        if row.get("lora.test_ppl") is None or row.get("full.test_ppl") is None or not same_setup(row, params):
            continue
        runs.setdefault(_key(row["seed"], row["full.lr"], row["lora.lr"]), row)
    return runs


def exp_name(seed, full_lr, lora_lr) -> str:
    """A grid point's experiment name, the same on every run of the study (so a rerun or a retry finds it)."""
    return re.sub(r"[^A-Za-z0-9-]", "", f"s{seed}-f{full_lr:g}-l{lora_lr:g}".replace(".", "p").replace("+", ""))


def run_missing(repo: Path, wanted: list[tuple], dask: dict | None = None) -> tuple[int, dict[tuple, dict]]:
    """Run the experiments not run yet, through the DVC queue, or on Dask when `dask` holds
    scripts.cluster.run_trials' options; returns how many ran, and every finished run (read once
    more only when something ran: collecting experiments costs DVC seconds)."""
    done = finished_runs(repo)
    missing = [p for p in wanted if _key(*p) not in done]
    if not missing:
        return 0, done
    sets = {exp_name(*p): {"seed": p[0], "full.lr": p[1], "lora.lr": p[2]} for p in missing}
    if dask is not None:
        from scripts.cluster import run_trials

        print(f"study: {len(missing)} experiment(s) missing; running them on Dask", flush=True)
        ran, failures = run_trials(repo, sets, **dask)
        if failures:
            raise SystemExit(f"study: {len(failures)} trial(s) failed, each reported above; the others are pushed "
                             "and are reused by the next run")
        return ran, finished_runs(repo)
    # Reuse compares params alone, and the names stand for seed and rates alone: an experiment of
    # uncommitted code would pass for the commit's, and a second setup at one commit would clash.
    refuse_uncommitted(repo, "study", "the DVC queue would run them under names and params that stand for the "
                                      "last commit (a later study would reuse their results as its own)")
    print(f"study: running {len(missing)} experiment(s) through the DVC queue", flush=True)
    run_queue(repo, {name: set_args(values) for name, values in sets.items()})
    return len(missing), finished_runs(repo)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for any degrees of freedom: bisection on the CDF, itself Simpson's rule
    over the density (within 1e-4 of the published tables; 1.96 is only the limit)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        y = c * (1 + x * x / df) ** (-(df + 1) / 2)
        return 0.5 + t / 12000 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: dict[tuple, dict], grid: dict, items: dict[tuple, dict] | None = None) -> dict:
    """The study's numbers from the runs of every grid point (pure: no DVC, testable); `items`: each
    run's per-item task scores (run_items), for the correlation's interval over items."""
    seeds = grid["seeds"]
    out: dict = {"seeds": seeds, "grid": grid, "methods": {}}
    at_chosen: dict = {}  # method -> its runs at the chosen rate, one a seed
    for m in METHODS:
        by_lr = {}
        for i, lr in enumerate(grid[f"{m}_lr"]):
            rows = [runs[_key(s, grid["full_lr"][i], grid["lora_lr"][i])] for s in seeds]
            val = [r[f"{m}.val_ppl"] for r in rows]
            by_lr[lr] = {"val_ppl": mean_sd(val), "rows": rows}
        chosen = min(by_lr, key=lambda lr: by_lr[lr]["val_ppl"][0])
        rows = by_lr[chosen]["rows"]
        test = [r[f"{m}.test_ppl"] for r in rows]
        general = [k.split(".", 1)[1] for k in rows[0] if k.startswith(f"{m}.general.") and k.endswith(".ppl")]
        out["methods"][m] = {
            "val_ppl_by_lr": {f"{lr:g}": {"mean": v["val_ppl"][0], "sd": v["val_ppl"][1]} for lr, v in by_lr.items()},
            "chosen_lr": chosen,
            "test_ppl": dict(zip(("mean", "sd"), mean_sd(test))) | {"min": min(test), "max": max(test)},
            "test_ppl_by_seed": dict(zip(map(str, seeds), test)),
            "train_s": mean_sd([r[f"{m}.train_s"] for r in rows])[0],
            "peak_mem_gib": mean_sd([r[f"{m}.peak_mem_gib"] for r in rows])[0],
        }
        by_seed = {g.removeprefix("general.").removesuffix(".ppl"): [100 * (r[f"{m}.{g}"] / r[f"pretrained.{g}"] - 1)
                                                                    for r in rows] for g in general}
        out["methods"][m] |= {"general_change": {g: mean_sd(v)[0] for g, v in by_seed.items()},
                              "general_change_by_seed": by_seed}
        out["methods"][m]["tasks"] = {k: dict(zip(("mean", "sd"), mean_sd([r[f"{m}.{k}"] for r in rows])))
                                      for k in task_keys(rows[0], m)}
        at_chosen[m] = rows
    full, lora = (out["methods"][m]["test_ppl_by_seed"] for m in METHODS)
    out["full_minus_lora_test_ppl"] = t_interval([full[s] - lora[s] for s in map(str, seeds)])  # paired by seed
    out["full_minus_lora_tasks"] = {
        k: t_interval([a[f"full.{k}"] - b[f"lora.{k}"] for a, b in zip(at_chosen["full"], at_chosen["lora"])])
        for k in out["methods"]["full"]["tasks"] if k in out["methods"]["lora"]["tasks"]}
    ordered = points(grid)
    out["ppl_vs_tasks"] = rank_correlations([runs[_key(*p)] for p in ordered], grid["seeds"][0],
                                            None if items is None else [items[_key(*p)] for p in ordered])
    # Stage updates' intruder dimensions (dvc exp show gives None where a run has none): a mean over seeds
    # each, and LoRA minus full paired by seed.
    if all(r.get(f"updates.{m}.intruders") is not None for m in METHODS for r in at_chosen[m]):
        by_seed = {m: [r[f"updates.{m}.intruders"] for r in at_chosen[m]] for m in METHODS}
        out["intruders"] = {m: dict(zip(("mean", "sd"), mean_sd(v))) for m, v in by_seed.items()}
        out["lora_minus_full_intruders"] = t_interval([b - a for a, b in zip(by_seed["full"], by_seed["lora"])])
    out["full_minus_lora_general_change"] = {
        g: t_interval([a - b for a, b in zip(*(out["methods"][m]["general_change_by_seed"][g] for m in METHODS))])
        for g in out["methods"]["full"]["general_change"]}
    return out


def task_keys(row: dict, model: str) -> list[str]:
    """A run's task scores for `model`, as exp show names them without the model: tasks.<task>.<metric>
    (stage tasks) and answers.<metric> (held-out answers, instruction data)."""
    return sorted(k.split(".", 1)[1] for k, v in row.items()
                  if k.startswith((f"{model}.tasks.", f"{model}.answers.")) and isinstance(v, (int, float))
                  and not k.endswith(("_lo", "_hi", ".items")))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0 along the last axis, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    less = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)
    return less + (equal - 1) / 2


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray | float:
    """Spearman's rho along the last axis (nan where either side never varies)."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)
    return float(rho) if np.ndim(rho) == 0 else rho


# A correlation over runs is stated only from this many runs of each method. The runs that make it
# meaningful differ in more than the seed: the shipped study's 3 rates x 3 seeds give 9 a method;
# the demo's 2 x 2 give 4, too few, and a study at one tuned point varies the seed alone.
MIN_RUNS = 6


def _stratified_z(ppl: dict, scores: dict) -> tuple[np.ndarray, int]:
    """Fisher's z of Spearman's rho within each method (ppl[m]: its runs' test perplexities;
    scores[m]: their scores, runs on the last axis, resamples before it), averaged with weights
    n - 3: the gap between the two methods never enters. Methods whose score never varies are left
    out. Returns the z (per resample) and the summed weights."""
    zs, weights = [], []
    for m in ppl:
        rho = spearman(np.broadcast_to(ppl[m], np.shape(scores[m])), scores[m])
        if np.all(np.isnan(rho)):
            continue
        zs.append(np.arctanh(np.clip(np.nan_to_num(rho), -0.9999, 0.9999)))
        weights.append(len(ppl[m]) - 3)
    if not zs:
        return np.full(np.shape(next(iter(scores.values())))[:-1], np.nan), 0
    return sum(w * z for w, z in zip(weights, zs)) / sum(weights), sum(weights)


def correlation(ppl: dict, scores: dict, items: dict | None, seed: int, min_runs: int = MIN_RUNS,
                samples: int = 500) -> dict:
    """Spearman's rho between test perplexity and a task score within each method (ppl[m], scores[m]:
    one value a run), combined across methods in Fisher's z (weights n - 3), never pooled: pooled,
    the gap between full fine-tuning and LoRA alone made the call. Its 95% interval, in z: the
    variance over runs (Fieller, Hartley and Pearson's 1.06 / (n - 3) for Spearman's rho) plus the
    variance over items, from bootstrap resamples of the items, the same resample for every run,
    each run's score recomputed from its per-item scores (items[m]: runs x items; None where the
    runs' items could not be read, and then the interval holds the runs' variance alone). No call
    from fewer than `min_runs` runs of each method."""
    runs = {m: len(v) for m, v in ppl.items()}
    if min(runs.values()) < min_runs:
        return {"rho": None, "runs": runs, "min_runs": min_runs, "why": "too few runs"}
    ppl = {m: np.asarray(v, dtype=np.float64) for m, v in ppl.items()}
    z, weight = _stratified_z(ppl, {m: np.asarray(v, dtype=np.float64) for m, v in scores.items()})
    if weight == 0:
        return {"rho": None, "runs": runs, "min_runs": min_runs, "why": "the score never varies"}
    within = {m: spearman(ppl[m], np.asarray(scores[m], dtype=np.float64)) for m in ppl}
    var, item_var = 1.06 / weight, 0.0
    if items is not None:
        n_items = next(iter(items.values())).shape[1]
        idx = np.random.default_rng(seed).integers(0, n_items, size=(samples, n_items))
        boot, _ = _stratified_z(ppl, {m: np.asarray(a, dtype=np.float64)[:, idx].mean(-1).T for m, a in items.items()})
        item_var = float(np.nanvar(boot))
    half = 1.959964 * math.sqrt(var + item_var)
    return {"rho": float(np.tanh(z)), "lo": float(np.tanh(z - half)), "hi": float(np.tanh(z + half)), "runs": runs,
            "min_runs": min_runs, "items_resampled": items is not None,
            **{f"rho_{m}": (None if math.isnan(r) else float(r)) for m, r in within.items()}}


def rank_correlations(rows: list[dict], seed: int, items: list[dict] | None = None) -> dict:
    """For each task score: correlation() over the study's runs (every grid point and seed) of each
    fine-tuned method. The pretrained model is left out: the same model in every run. `items`:
    each run's per-item scores, {method: {score key: array}}, in the order of `rows` (run_items)."""
    out = {}
    for key in task_keys(rows[0], "full"):
        have = [m for m in METHODS if all(f"{m}.{key}" in r for r in rows)]
        ppl = {m: [r[f"{m}.test_ppl"] for r in rows] for m in have}
        scores = {m: [r[f"{m}.{key}"] for r in rows] for m in have}
        per_item = None
        if items is not None and all(key in run.get(m, {}) for run in items for m in have):
            per_item = {m: np.array([run[m][key] for run in items]) for m in have}
        out[key] = correlation(ppl, scores, per_item, seed)
    return out


def run_items(repo: Path, rows: list[dict], keys: list[tuple]) -> dict[tuple, dict] | None:
    """Each run's per-item task scores, key -> {method: {"tasks.<task>.<metric>": array}}, read at
    its experiment's commit through DVC (from the local cache, or the DVC remote a Dask study pushed
    to); None, said in one line, where a run's cannot be read: the correlation's interval then
    resamples runs alone, and the findings say so."""
    import io

    import dvc.api
    import yaml

    from ftstudy.measure import benchmarks

    folder = next(v["task_items"] for v in yaml.safe_load((repo / "dvc.yaml").read_text())["vars"] if "task_items" in v)
    out = {}
    for key, row in zip(keys, rows):
        out[key] = {}
        for m in METHODS:
            try:
                with dvc.api.open(f"{folder}/{m}.npz", repo=str(repo), rev=row["rev"], mode="rb") as f:
                    items = benchmarks.read_items(np.load(io.BytesIO(f.read())))
            except Exception as e:  # noqa: BLE001 - any failure to read means: no item noise, said so
                print(f"study: the per-item scores of run {key} could not be read at {row.get('rev')} "
                      f"({type(e).__name__}); the correlation's interval resamples runs alone", flush=True)
                return None
            out[key][m] = {f"tasks.{task}.{name}": arrays[k] for task, arrays in items.items()
                           for k, name in benchmarks.metric_keys(arrays).items()}
    return out


def t_interval(diff: list[float]) -> dict:
    """Mean, sd and the 95% Student-t interval of differences paired by seed (none from one seed)."""
    mean, sd = mean_sd(diff)
    half = t_quantile(0.975, len(diff) - 1) * sd / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": len(diff)}


def grid_edge(s: dict, grid: dict) -> list[str]:
    """A sentence for each method whose chosen rate is its grid's smallest or largest: the best may
    lie beyond, and how to extend the grid."""
    out = []
    for m in METHODS:
        rates, chosen = sorted(grid[f"{m}_lr"]), s["methods"][m]["chosen_lr"]
        if len(rates) < 2 or rates[0] < chosen < rates[-1]:
            continue
        side, beyond = ("largest", chosen * 3) if chosen == rates[-1] else ("smallest", chosen / 3)
        flag = "--full-lr" if m == "full" else "--lora-lr"
        out.append(f"{m}.lr's chosen rate {chosen:g} is its grid's {side}: the best may lie beyond it; extend the grid "
                   f"({flag} with {beyond:.1g} added, or make study {m.upper()}_LR=...) and run the study again.")
    return out


def findings(s: dict) -> list[str]:
    from ftstudy.report.task_report import signed

    full, lora, d = s["methods"]["full"], s["methods"]["lora"], s["full_minus_lora_test_ppl"]
    n = d["n"]
    if n < 2:
        verdict = "with one seed there is no interval over seeds; run more (--seeds)"
    elif d["hi"] < 0:
        verdict = (f"full fine-tuning's advantage survives tuning and seeds: it is lower by {-d['mean']:.2f} "
                   f"(95% t interval over {n} seeds {-d['hi']:.2f} to {-d['lo']:.2f})")
    elif d["lo"] > 0:
        verdict = (f"LoRA is better after tuning: lower by {d['mean']:.2f} (95% t interval over {n} seeds "
                   f"{d['lo']:.2f} to {d['hi']:.2f})")
    else:
        verdict = (f"the difference does not survive tuning and seeds: {d['mean']:+.2f} with a 95% t interval over "
                   f"{n} seeds of {d['lo']:+.2f} to {d['hi']:+.2f}, which includes 0")
    out = [f"At the rates chosen on validation (full {full['chosen_lr']:g}, LoRA {lora['chosen_lr']:g}), test "
           f"perplexity is {full['test_ppl']['mean']:.2f} ± {full['test_ppl']['sd']:.2f} for full fine-tuning and "
           f"{lora['test_ppl']['mean']:.2f} ± {lora['test_ppl']['sd']:.2f} for LoRA; {verdict}."]
    out.append(f"Full fine-tuning trains in {full['train_s']:.1f} s at {full['peak_mem_gib']:.2f} GiB peak memory, "
               f"LoRA in {lora['train_s']:.1f} s at {lora['peak_mem_gib']:.2f} GiB (means over seeds, same machine).")
    for g, d in s["full_minus_lora_general_change"].items():
        text = (f"On general text ({g}) perplexity changes {full['general_change'][g]:+.1f}% after full "
                f"fine-tuning and {lora['general_change'][g]:+.1f}% after LoRA (means over seeds); full minus LoRA, "
                f"paired by seed: {d['mean']:+.1f} points")
        if d["n"] < 2:
            text += ": with one seed there is no interval over seeds, so no method is said to keep more."
        elif d["lo"] > 0 or d["hi"] < 0:
            keeps = "LoRA" if d["lo"] > 0 else "full fine-tuning"
            text += (f" (95% t interval over {d['n']} seeds {d['lo']:+.1f} to {d['hi']:+.1f}): {keeps} keeps more of "
                     "the pretrained model's general ability.")
        else:
            text += (f" (95% t interval over {d['n']} seeds {d['lo']:+.1f} to {d['hi']:+.1f}, which includes 0): "
                     "neither method is shown to keep more.")
        out.append(text)
    for k, d in s.get("full_minus_lora_tasks", {}).items():
        text = (f"On {k}, full fine-tuning scores {full['tasks'][k]['mean']:.3f} ± {full['tasks'][k]['sd']:.3f} and LoRA "
                f"{lora['tasks'][k]['mean']:.3f} ± {lora['tasks'][k]['sd']:.3f} (mean ± sd over seeds); full minus LoRA, "
                f"paired by seed: {signed(d['mean'])}")
        if d["n"] < 2:
            text += ": with one seed there is no interval over seeds."
        elif d["sd"] == 0:
            text += f": the same on every one of {d['n']} seeds, which gives no interval, so no method is said to score higher."
        elif d["lo"] > 0 or d["hi"] < 0:
            text += (f" (95% t interval over {d['n']} seeds {signed(d['lo'])} to {signed(d['hi'])}): "
                     f"{'full fine-tuning' if d['lo'] > 0 else 'LoRA'} scores higher.")
        else:
            text += f" (95% t interval over {d['n']} seeds {signed(d['lo'])} to {signed(d['hi'])}, which includes 0)."
        out.append(text)
    if "intruders" in s:
        out.append(intruder_finding(s["intruders"], s["lora_minus_full_intruders"]))
    for k, c in s.get("ppl_vs_tasks", {}).items():
        out.append(correlation_finding(k, c))
    return out + grid_edge(s, s["grid"])


def intruder_finding(means: dict, d: dict) -> str:
    """Each method's intruder dimensions over seeds (stage updates), and whether LoRA's excess holds."""
    text = (f"Intruder dimensions, summed over the matrices LoRA wraps: {means['full']['mean']:.1f} ± "
            f"{means['full']['sd']:.1f} after full fine-tuning and {means['lora']['mean']:.1f} ± {means['lora']['sd']:.1f} "
            f"after LoRA (mean ± sd over seeds); LoRA minus full, paired by seed: {d['mean']:+.1f}")
    if d["n"] < 2:
        return text + ": with one seed there is no interval over seeds."
    if d["sd"] == 0:
        return text + f", the same on every one of {d['n']} seeds, which gives no interval."
    interval = f" (95% t interval over {d['n']} seeds {d['lo']:+.1f} to {d['hi']:+.1f}"
    if d["lo"] > 0 or d["hi"] < 0:
        return text + interval + f"): {'LoRA' if d['lo'] > 0 else 'full fine-tuning'} gains more, on every reading of the interval."
    return text + interval + ", which includes 0): neither method is shown to gain more."


def correlation_finding(k: str, c: dict) -> str:
    """What a correlation() says, and no more: an association over runs within each method, no cause."""
    if c["rho"] is None:
        if c["why"] == "too few runs":
            return (f"Test perplexity and {k}: no correlation is stated from "
                    f"{' and '.join(f'{n} {m} runs' for m, n in c['runs'].items())}; it needs {c['min_runs']} runs of "
                    "each method that differ in more than the seed (a grid of rates, make study).")
        return f"{k} took one value in every run of each method: no rank correlation with perplexity."
    said = ("lower perplexity went with a higher score" if c["hi"] < 0 else
            "lower perplexity went with a lower score" if c["lo"] > 0 else "the interval includes 0: no relation shown")
    noise = ("runs and items" if c["items_resampled"]
             else "runs (the runs' items could not be read, so item noise is not in it)")
    return (f"Within each method over the study's runs ({', '.join(f'{n} {m}' for m, n in c['runs'].items())}), test "
            f"perplexity and {k} have Spearman's rho {c['rho']:+.2f} (full {_rho(c.get('rho_full'))}, LoRA "
            f"{_rho(c.get('rho_lora'))}; 95% interval over {noise} {c['lo']:+.2f} to {c['hi']:+.2f}): {said}. An "
            "association across runs, not a cause.")


def _rho(r) -> str:
    return "–" if r is None else f"{r:+.2f}"


def task_table(s: dict) -> list[str]:
    from tabulate import tabulate

    keys = list(s["methods"]["full"].get("tasks", {}))
    if not keys:
        return []
    rows = [[k, *(f"{s['methods'][m]['tasks'][k]['mean']:.3f} ± {s['methods'][m]['tasks'][k]['sd']:.3f}" for m in METHODS),
             (f"{c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]" if (c := s["ppl_vs_tasks"].get(k, {})).get("rho") is not None
              else "–")] for k in keys]
    return ["## Task scores at the chosen rates", "",
            tabulate(rows, ["task score", "full (mean ± sd)", "LoRA (mean ± sd)", "rank corr. with test ppl [95% CI]"],
                     tablefmt="github", disable_numparse=True), ""]


def render(s: dict, grid: dict, ran: int, reused: int, label: str) -> str:
    from tabulate import tabulate

    rows = []
    for m in METHODS:
        for lr, v in s["methods"][m]["val_ppl_by_lr"].items():
            chosen = "chosen" if float(lr) == s["methods"][m]["chosen_lr"] else ""
            rows.append([m, lr, f"{v['mean']:.3f} ± {v['sd']:.3f}", chosen])
    at = [[m, f"{s['methods'][m]['chosen_lr']:g}",
           f"{s['methods'][m]['test_ppl']['mean']:.3f} ± {s['methods'][m]['test_ppl']['sd']:.3f}",
           f"{s['methods'][m]['test_ppl']['min']:.3f} – {s['methods'][m]['test_ppl']['max']:.3f}",
           f"{s['methods'][m]['train_s']:.1f}", f"{s['methods'][m]['peak_mem_gib']:.2f}"] for m in METHODS]
    d = s["full_minus_lora_test_ppl"]
    return "\n".join([
        f"# Study: learning rate per method, over seeds ({label})", "",
        f"Grid: full.lr {', '.join(f'{x:g}' for x in grid['full_lr'])}; lora.lr "
        f"{', '.join(f'{x:g}' for x in grid['lora_lr'])}; seeds {', '.join(map(str, grid['seeds']))}. "
        f"{ran} experiment(s) ran now, {reused} reused.", "",
        "## Validation perplexity by rate (mean ± sd over seeds)", "",
        tabulate(rows, ["method", "lr", "val ppl", ""], tablefmt="github", disable_numparse=True), "",
        "## At the chosen rates", "",
        tabulate(at, ["method", "lr", "test ppl (mean ± sd)", "range over seeds", "train s", "peak mem GiB"],
                 tablefmt="github", disable_numparse=True), "",
        f"Full minus LoRA test perplexity, paired by seed: {d['mean']:+.3f} (sd {d['sd']:.3f}, 95% t interval "
        f"{d['lo']:+.3f} to {d['hi']:+.3f}, {d['n']} seeds).", "", *task_table(s),
        "## Findings", "", *[f"- {f}" for f in findings(s)], "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="the DVC repo (default: . ; with --demo: .demo)")
    ap.add_argument("--demo", action="store_true", help="a demo sandbox on the tiny assets, built if needed")
    ap.add_argument("--full-lr", help="comma-separated rates for full fine-tuning")
    ap.add_argument("--lora-lr", help="comma-separated rates for LoRA, as many as --full-lr")
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--backend", choices=("queue", "dask"), default="queue",
                    help="queue: DVC's local experiment queue; dask: one Dask task a grid point (scripts/cluster.py)")
    dk = ap.add_argument_group("dask backend (docs/experiments.md, 'On a cluster')")
    dk.add_argument("--scheduler", help="an existing Dask scheduler's address (default: a LocalCluster on 127.0.0.1)")
    dk.add_argument("--workers", type=int, default=2, help="the LocalCluster's workers, one trial each (default 2)")
    dk.add_argument("--resource", help="the worker resource one trial takes (default: GPU with --scheduler, else slots)")
    dk.add_argument("--git-remote", default="origin", help="the git remote the workers clone and push to (name or URL)")
    dk.add_argument("--dvc-remote", help="the DVC remote the trials share outputs through (default: the default remote)")
    dk.add_argument("--push-models", action="store_true", help="push each trial's model folders too (large)")
    args = ap.parse_args()
    if args.backend == "dask" and not args.scheduler and args.workers < 1:
        ap.error("--workers: a LocalCluster needs at least one worker")
    dask = None if args.backend == "queue" else {
        "git_remote": args.git_remote, "dvc_remote": args.dvc_remote, "scheduler": args.scheduler, "workers": args.workers,
        "resource": args.resource or ("GPU" if args.scheduler else "slots"), "push_models": args.push_models}
    grid = dict(DEMO_GRID if args.demo else GRID)
    for key, value in (("full_lr", args.full_lr), ("lora_lr", args.lora_lr), ("seeds", args.seeds)):
        if value:
            grid[key] = [int(v) if key == "seeds" else float(v) for v in value.split(",")]
    repo = (args.dir or Path(".demo" if args.demo else ".")).resolve()
    if args.demo and not ((repo / MARKER).is_file() and (repo / "dvc.lock").is_file()):
        make_sandbox(repo)
        repro_and_commit(repo)
    wanted = points(grid)
    start = time.perf_counter()
    try:
        ran, runs = run_missing(repo, wanted, dask)
    except DvcError as e:
        raise SystemExit(f"study: {e}") from None
    if missing := [p for p in wanted if _key(*p) not in runs]:
        raise SystemExit(f"study: no finished run for (seed, full.lr, lora.lr) {missing}")
    s = summarize(runs, grid, run_items(repo, [runs[_key(*p)] for p in wanted], [_key(*p) for p in wanted]))
    md = render(s, grid, ran, len(wanted) - ran, "demo: tiny assets, CPU" if args.demo else "real study")
    (repo / "study.md").write_text(md + "\n")
    (repo / "study.json").write_text(json.dumps(s | {"ran": ran, "reused": len(wanted) - ran,
                                                     "wall_s": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
    print(md)
    print(f"study: {ran} experiment(s) ran, {len(wanted) - ran} reused, in {time.perf_counter() - start:.0f} s; "
          f"wrote {repo / 'study.md'}, {repo / 'study.json'}")


if __name__ == "__main__":
    main()
