"""The study across experiments: its summary from synthetic runs (fast), and a small real grid
through the DVC queue (`dvc exp run --queue`, `dvc queue start`) in a copy of the demo build
(slow), run twice: the second trains nothing."""

import json
import subprocess
import sys

import pytest

from scripts import sandbox, study

GRID = {"full_lr": [1e-3, 2e-3], "lora_lr": [5e-3, 1e-2], "seeds": [1, 2, 3]}


def fake_runs() -> dict:
    """full is best at 2e-3, LoRA at 5e-3; full beats LoRA by 1.0 +- a little on every seed."""
    runs = {}
    for i, (f, l) in enumerate(zip(GRID["full_lr"], GRID["lora_lr"])):
        for s in GRID["seeds"]:
            jitter = 0.01 * s
            runs[study._key(s, f, l)] = {
                "full.val_ppl": 4.0 - i + jitter, "lora.val_ppl": 5.0 + i + jitter,
                "full.test_ppl": 4.2 - i + jitter, "lora.test_ppl": 5.2 + i + 0.5 * jitter,
                "full.train_s": 5.0, "lora.train_s": 4.0, "full.peak_mem_gib": 0.5, "lora.peak_mem_gib": 0.4,
                "full.general.g-test.ppl": 8.0, "lora.general.g-test.ppl": 4.4, "pretrained.general.g-test.ppl": 4.0}
    return runs


def test_summary_chooses_rates_on_validation_and_pairs_seeds():
    s = study.summarize(fake_runs(), GRID)
    full, lora = s["methods"]["full"], s["methods"]["lora"]
    assert (full["chosen_lr"], lora["chosen_lr"]) == (2e-3, 5e-3)
    assert full["val_ppl_by_lr"]["0.002"]["mean"] == pytest.approx(3.02)
    assert full["val_ppl_by_lr"]["0.002"]["sd"] == pytest.approx(0.01)
    assert full["test_ppl"]["mean"] == pytest.approx(3.22) and lora["test_ppl"]["mean"] == pytest.approx(5.21)
    d = s["full_minus_lora_test_ppl"]
    assert d["mean"] == pytest.approx(-1.99) and d["lo"] < d["mean"] < d["hi"] < 0 and d["n"] == 3
    assert full["general_change"] == {"g-test": pytest.approx(100.0)} and lora["general_change"]["g-test"] == pytest.approx(10.0)
    text = " ".join(study.findings(s))
    assert "full fine-tuning's advantage survives tuning and seeds: it is lower by 1.99" in text
    assert "LoRA keeps more of the pretrained model's general ability" in text
    # Both chosen rates sit at an edge of their two-rate grids: the study says so and how to extend them.
    assert ("full.lr's chosen rate 0.002 is its grid's largest: the best may lie beyond it; extend the grid "
            "(--full-lr with 0.006 added") in text
    assert "lora.lr's chosen rate 0.005 is its grid's smallest" in text and "(--lora-lr with 0.002 added" in text


def test_the_general_text_verdict_needs_its_interval_over_seeds():
    """+4.2% against +5.2% with about 3 points of spread across seeds once read "full fine-tuning
    keeps more"; the verdict now follows the t interval of the difference paired by seed."""
    runs = fake_runs()
    for (seed, f, l), row in runs.items():
        row["full.general.g-test.ppl"] = 4.0 * (1.042 + 0.03 * (seed - 2))
        row["lora.general.g-test.ppl"] = 4.0 * (1.052 - 0.03 * (seed - 2))
    s = study.summarize(runs, GRID)
    d = s["full_minus_lora_general_change"]["g-test"]
    assert d["mean"] == pytest.approx(-1.0) and d["lo"] < 0 < d["hi"]
    text = " ".join(study.findings(s))
    assert "which includes 0): neither method is shown to keep more." in text and "keeps more of" not in text


def test_a_difference_inside_the_seed_spread_is_a_tie():
    runs = fake_runs()
    for (seed, f, l), row in runs.items():  # LoRA as good as full, but seed-to-seed noise of +-1
        row["lora.test_ppl"] = row["full.test_ppl"] + (1.0 if seed % 2 else -1.2)
        row["lora.val_ppl"] = row["full.val_ppl"]
    text = " ".join(study.findings(study.summarize(runs, GRID)))
    assert "the difference does not survive tuning and seeds" in text and "which includes 0" in text


def test_only_experiments_of_the_same_setup_are_reused():
    params = {"seed": 42, "full.lr": 2e-3, "lora.lr": 1e-2, "lora.r": 8, "train.epochs": 2,
              "data.general": [{"name": "assets/tiny-general", "revision": None, "config": None, "split": "test"}]}
    # As dvc.api.exp_show gives a row: ints as floats, lists as their repr, metrics beside params.
    row = {"seed": 1.0, "full.lr": 1e-3, "lora.lr": 5e-3, "lora.r": 8.0, "train.epochs": 2.0, "lora.test_ppl": 7.0,
           "data.general": "[{'name': 'assets/tiny-general', 'revision': None, 'config': None, 'split': 'test'}]"}
    assert study.same_setup(row, params)  # seed and rates are the swept keys
    assert not study.same_setup(row | {"lora.r": 16.0}, params)  # an earlier `-S lora.r=16 -S seed=1`
    assert not study.same_setup(row | {"data.general": "[]"}, params)


@pytest.mark.parametrize("df,published", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (11, 2.2010),
                                          (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_for_any_number_of_seeds(df, published):
    assert study.t_quantile(0.975, df) == pytest.approx(published, abs=1e-4)


@pytest.mark.slow
def test_study_demo_runs_a_small_grid_and_reuses_it(demo_build, tmp_path):
    import shutil

    src, *_ = demo_build
    repo = tmp_path / "sandbox"
    shutil.copytree(src, repo, symlinks=True)
    # The baseline (seed 42 at the demo's rates) is reused; a second LoRA rate runs through the
    # queue (only the LoRA stages rerun: the full rate is the baseline's).
    args = [sys.executable, "-m", "scripts.study", "--demo", "--dir", str(repo),
            "--full-lr", "2e-3,2e-3", "--lora-lr", "1e-2,5e-3", "--seeds", "42"]
    first = subprocess.run(args, cwd=sandbox.ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    result = json.loads((repo / "study.json").read_text())
    assert (result["ran"], result["reused"]) == (1, 1)
    assert set(result["methods"]["lora"]["val_ppl_by_lr"]) == {"0.01", "0.005"}
    assert "## At the chosen rates" in (repo / "study.md").read_text()
    # The task scores over seeds, and their rank correlation with perplexity over both runs' models.
    assert {"tasks.tiny_cloze.acc", "tasks.tiny_complete.exact_match_strip"} <= set(result["methods"]["full"]["tasks"])
    # 2 runs of each method: too few for a correlation, and the study says so
    assert result["ppl_vs_tasks"]["tasks.tiny_complete.exact_match_strip"]["runs"] == {"full": 2, "lora": 2}
    assert "no correlation is stated from 2 full runs and 2 lora runs" in (repo / "study.md").read_text()
    assert "## Task scores at the chosen rates" in (repo / "study.md").read_text()
    assert "Intruder dimensions, summed over the matrices LoRA wraps" in (repo / "study.md").read_text()
    second = subprocess.run(args, cwd=sandbox.ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((repo / "study.json").read_text())["ran"] == 0
    assert "study: 0 experiment(s) ran, 2 reused" in second.stdout


def test_intruder_dimensions_are_summarized_over_seeds_with_a_paired_interval():
    """Stage updates' intruder counts at the chosen rates: each method's mean over seeds, and LoRA
    minus full paired by seed with a t interval; a study of runs without that stage says nothing."""
    runs = fake_runs()
    assert "intruders" not in study.summarize(runs, GRID)
    for (seed, *_), row in runs.items():
        row["updates.full.intruders"], row["updates.lora.intruders"] = 1 + seed % 2, 30 + seed
    s = study.summarize(runs, GRID)
    assert s["intruders"]["lora"]["mean"] == pytest.approx(32.0) and s["intruders"]["full"]["sd"] > 0
    d = s["lora_minus_full_intruders"]
    assert d["n"] == 3 and 0 < d["lo"] < d["mean"] < d["hi"]
    text = " ".join(study.findings(s))
    assert "after LoRA (mean ± sd over seeds); LoRA minus full, paired by seed: +30.3" in text
    assert "LoRA gains more" in text
    for (seed, *_), row in runs.items():  # no systematic difference: the interval includes 0
        row["updates.lora.intruders"] = row["updates.full.intruders"] + (1 if seed == 1 else -1 if seed == 2 else 0)
    assert "neither method is shown to gain more" in " ".join(study.findings(study.summarize(runs, GRID)))


def test_task_scores_are_summarized_over_seeds_and_rank_correlated_with_perplexity():
    """Each run's models score higher the lower their perplexity, and within each method too (with
    noise): full beats LoRA by about 0.2 on every seed, and the rank correlation within methods,
    over the 6 runs each has (the minimum), is negative and called."""
    runs = fake_runs()
    noise = dict(zip(runs, [0.004, -0.006, 0.001, 0.007, -0.002, 0.0]))
    for key, row in runs.items():
        row["pretrained.test_ppl"] = 9.0
        for m in ("pretrained", "full", "lora"):
            row[f"{m}.tasks.cloze.acc"] = 1.0 - row[f"{m}.test_ppl"] / 10 + noise[key]
            row[f"{m}.tasks.cloze.acc_lo"] = 0.0  # an interval's bound: not a score of its own
    s = study.summarize(runs, GRID)
    assert set(s["methods"]["full"]["tasks"]) == {"tasks.cloze.acc"}
    d = s["full_minus_lora_tasks"]["tasks.cloze.acc"]
    assert d["n"] == 3 and d["lo"] > 0 and d["mean"] == pytest.approx(0.2, abs=0.01)
    c = s["ppl_vs_tasks"]["tasks.cloze.acc"]
    assert c["runs"] == {"full": 6, "lora": 6} and c["rho"] < -0.7 and c["hi"] < 0 and not c["items_resampled"]
    text = " ".join(study.findings(s))
    assert "full fine-tuning scores higher" in text and "lower perplexity went with a higher score" in text
    assert "item noise is not in it" in text
    assert "## Task scores at the chosen rates" in study.render(s, GRID, 0, len(runs), "test")


# The study's bookkeeping on a real DVC queue: a repo with one tiny stage that fails when `fail` is set.
STEP = """import json, sys, yaml
p = yaml.safe_load(open("params.yaml"))
if p["fail"]:
    sys.exit("failing on purpose: fail is set")
json.dump({"seed": p["seed"]}, open("out.json", "w"))
"""
STAGE = """stages:
  step:
    cmd: python step.py
    deps: [step.py]
    params: [fail, seed, full.lr, lora.lr]
    metrics:
      - out.json:
          cache: false
"""


def queue_repo(root):
    """A committed git and DVC repo in `root`/repo whose one stage fails when params `fail` is set."""
    repo = root / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("fail: 0\nseed: 1\nfull:\n  lr: 0.001\nlora:\n  lr: 0.01\n")
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(STAGE)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.name", "t"],
                ["git", "config", "user.email", "t@localhost"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "baseline"]):
        sandbox.run(cmd, repo)
    return repo


def stop_queue_workers(repo) -> None:
    """Stop the DVC queue workers of `repo` (each idles 10 s before it leaves) by their process ids."""
    import os
    import signal
    import time
    from pathlib import Path

    for info in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.json"):
        pid = json.loads(info.read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline")
        if not (cmdline.exists() and b"queue-worker" in cmdline.read_bytes()):
            continue  # gone already (the pid may be another process's by now)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while cmdline.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if cmdline.exists():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_study_after_an_earlier_failed_experiment_counts_only_its_own(tmp_path, monkeypatch):
    """DVC keeps a failed task until `dvc queue remove --failed`: neither another experiment's nor
    an earlier failure of the very name a study queues again fails a later study (which then writes
    study.md); the study's own failure does, named with the command that shows its log."""
    import re

    repo = queue_repo(tmp_path)
    try:
        # One run with two failures: another experiment's, and one of the very name queued again below;
        # each is named with the command that shows its log.
        named = r"(other|s2) \(dvc queue logs ([0-9a-f]{7})\)"
        own = rf"^2 of 2 experiment\(s\) failed, `dvc queue logs <task>` says why: {named}, {named}$"
        with pytest.raises(sandbox.DvcError, match=own) as failed:
            sandbox.run_queue(repo, {"other": ["-S", "fail=1"], "s2": ["-S", "fail=1", "-S", "seed=2"]}, poll_s=0.2)
        found = re.search(own, str(failed.value))
        assert {found[1], found[3]} == {"other", "s2"}
        assert "failing on purpose" in sandbox.dvc(repo, "queue", "logs", found[2]).stdout
        assert sorted(row[-1] for row in sandbox.queue_tasks(repo).values()) == ["Failed", "Failed"]
        # And the worker of the run before may leave just as this run's tasks arrive, after `dvc queue
        # start` saw it and started none: the run starts one again once its tasks sit queued, nothing running.
        stop_queue_workers(repo)
        starts, polls = [], []
        start, tasks = sandbox.start_queue, sandbox.queue_tasks

        def start_but_the_first(repo):
            starts.append(repo)
            if len(starts) > 1:
                start(repo)

        def tasks_a_while(repo):
            polls.append(repo)
            assert len(polls) < 100, "the queue never moved"
            return tasks(repo)

        monkeypatch.setattr(sandbox, "start_queue", start_but_the_first)
        monkeypatch.setattr(sandbox, "queue_tasks", tasks_a_while)
        monkeypatch.setattr(sandbox, "STALLED_S", 3.0)
        assert sandbox.run_queue(repo, {"s2": ["-S", "seed=2"]}, poll_s=0.2) == {"s2": "Success"}
        assert len(starts) >= 2  # more when the worker took longer than 3 s to come up: no harm
    finally:
        stop_queue_workers(repo)


def test_a_dirty_workspace_is_refused_in_one_line_before_anything_is_queued(tmp_path):
    repo = queue_repo(tmp_path)
    (repo / "study.md").write_text("untracked, as the study's own report is: not a change\n")
    sandbox.refuse_uncommitted(repo, "study", "why")
    (repo / "step.py").write_text(STEP + "# a change not committed\n")
    one_line = (r"^study: the workspace has uncommitted changes, and the DVC queue would run them under names and "
                r"params that stand for the last commit \(.*\); commit them \(or stash them\) and run again$")
    with pytest.raises(SystemExit, match=one_line) as refused:
        study.run_missing(repo, [(2, 0.001, 0.01)])
    assert "\n" not in str(refused.value)
    # Nothing queued (the queue keeps its tasks under refs/exps/celery) and nothing run.
    assert subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True).stdout == ""
