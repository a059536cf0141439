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
    assert result["ppl_vs_tasks"]["tasks.tiny_complete.exact_match_strip"]["points"] == 4  # 2 runs, 2 fine-tuned models
    assert "## Task scores at the chosen rates" in (repo / "study.md").read_text()
    second = subprocess.run(args, cwd=sandbox.ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((repo / "study.json").read_text())["ran"] == 0
    assert "study: 0 experiment(s) ran, 2 reused" in second.stdout


def test_task_scores_are_summarized_over_seeds_and_rank_correlated_with_perplexity():
    """Each run's models score higher the lower their perplexity: full beats LoRA by about 0.2 on every
    seed, and the rank correlation over every run's fine-tuned models is -1, its interval too."""
    runs = fake_runs()
    for row in runs.values():
        row["pretrained.test_ppl"] = 9.0
        for m in ("pretrained", "full", "lora"):
            row[f"{m}.tasks.cloze.acc"] = 1.0 - row[f"{m}.test_ppl"] / 10
            row[f"{m}.tasks.cloze.acc_lo"] = 0.0  # an interval's bound: not a score of its own
    s = study.summarize(runs, GRID)
    assert set(s["methods"]["full"]["tasks"]) == {"tasks.cloze.acc"}
    d = s["full_minus_lora_tasks"]["tasks.cloze.acc"]
    assert d["n"] == 3 and d["lo"] > 0 and d["mean"] == pytest.approx(0.2, abs=0.01)
    c = s["ppl_vs_tasks"]["tasks.cloze.acc"]
    assert c["rho"] == pytest.approx(-1.0) and c["hi"] == pytest.approx(-1.0) and c["points"] == 2 * len(runs)
    text = " ".join(study.findings(s))
    assert "full fine-tuning scores higher" in text and "lower perplexity went with a higher score" in text
    assert "## Task scores at the chosen rates" in study.render(s, GRID, 0, len(runs), "test")


def test_spearman_gives_ties_their_average_rank():
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x ranks 0, 1.5, 1.5, 3 and y ranks 0, 1, 2, 3: Pearson's r of the ranks.
    assert study.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
