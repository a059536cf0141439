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
its full-vs-LoRA t interval; over every run's two fine-tuned models, the rank correlation between
test perplexity and each task score, with a bootstrap interval over runs. Writes <dir>/study.md and
<dir>/study.json.
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
from scripts.sandbox import MARKER, DvcError, dvc, make_sandbox, repro_and_commit, run_queue

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
    return all(_normal(row.get(k)) == _normal(v) for k, v in params.items() if k not in SWEPT)


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
    for name, values in sets.items():
        dvc(repo, "exp", "run", "--queue", "-n", name, *set_args(values))
    print(f"study: running {len(missing)} experiment(s) through the DVC queue", flush=True)
    run_queue(repo)
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


def summarize(runs: dict[tuple, dict], grid: dict) -> dict:
    """The study's numbers from the runs of every grid point (pure: no DVC, testable)."""
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
    out["ppl_vs_tasks"] = rank_correlations([runs[_key(*p)] for p in points(grid)], grid["seeds"][0])
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
    """Ranks from 0, ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(np.asarray(x)), _ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_correlations(rows: list[dict], seed: int, samples: int = 2000) -> dict:
    """Over the study's runs (every grid point and seed) and their two fine-tuned models: Spearman's
    rank correlation between test perplexity and each task score, with a 95% percentile bootstrap
    interval that resamples runs (a run's two models share its data and seed). The pretrained model
    is left out: it is the same model in every run, and would count once per run. A negative
    correlation: lower perplexity, higher score. None where a score never varies."""
    out = {}
    for key in task_keys(rows[0], "full"):
        pts = [[(r[f"{m}.test_ppl"], r[f"{m}.{key}"]) for m in METHODS if f"{m}.{key}" in r] for r in rows]
        flat = np.array([p for run in pts for p in run])
        rho = spearman(flat[:, 0], flat[:, 1])
        if math.isnan(rho):
            out[key] = {"rho": None, "points": len(flat), "runs": len(rows)}
            continue
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(samples):
            pick = np.array([p for i in rng.integers(0, len(pts), len(pts)) for p in pts[i]])
            boot.append(spearman(pick[:, 0], pick[:, 1]))
        boot = np.array(boot)
        boot = boot[~np.isnan(boot)]
        out[key] = {"rho": rho, "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)),
                    "points": len(flat), "runs": len(rows)}
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
                f"paired by seed: {d['mean']:+.3f}")
        if d["n"] < 2:
            text += ": with one seed there is no interval over seeds."
        elif d["sd"] == 0:
            text += f": the same on every one of {d['n']} seeds, which gives no interval, so no method is said to score higher."
        elif d["lo"] > 0 or d["hi"] < 0:
            text += (f" (95% t interval over {d['n']} seeds {d['lo']:+.3f} to {d['hi']:+.3f}): "
                     f"{'full fine-tuning' if d['lo'] > 0 else 'LoRA'} scores higher.")
        else:
            text += f" (95% t interval over {d['n']} seeds {d['lo']:+.3f} to {d['hi']:+.3f}, which includes 0)."
        out.append(text)
    for k, c in s.get("ppl_vs_tasks", {}).items():
        if c["rho"] is None:
            out.append(f"{k} took one value over all runs: no rank correlation with perplexity.")
            continue
        said = ("lower perplexity went with a higher score" if c["hi"] < 0 else
                "lower perplexity went with a lower score" if c["lo"] > 0 else "the interval includes 0: no relation shown")
        out.append(f"Over the study's {c['runs']} runs and their fine-tuned models ({c['points']} points), test perplexity and {k} have "
                   f"Spearman's rho {c['rho']:+.2f} (95% bootstrap interval over runs {c['lo']:+.2f} to {c['hi']:+.2f}): "
                   f"{said}.")
    return out + grid_edge(s, s["grid"])


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
    s = summarize(runs, grid)
    md = render(s, grid, ran, len(wanted) - ran, "demo: tiny assets, CPU" if args.demo else "real study")
    (repo / "study.md").write_text(md + "\n")
    (repo / "study.json").write_text(json.dumps(s | {"ran": ran, "reused": len(wanted) - ran,
                                                     "wall_s": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
    print(md)
    print(f"study: {ran} experiment(s) ran, {len(wanted) - ran} reused, in {time.perf_counter() - start:.0f} s; "
          f"wrote {repo / 'study.md'}, {repo / 'study.json'}")


if __name__ == "__main__":
    main()
