"""Benchmarks through lm-evaluation-harness (stage tasks): real lm-eval on the demo's local tasks,
its per-item scores paired between models, and the adapter checked against its merged model."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, run_main
from ftstudy import modeling
from ftstudy.config import load_params
from ftstudy.errors import StudyError
from ftstudy.measure import answers, benchmarks
from ftstudy.measure.stats import MIN_CHUNKS, mean_metrics, paired_mean_difference

TASKS = ("tasks/tiny_cloze.yaml", "tasks/tiny_complete.yaml")


# ---------------------------------------------------------------- statistics over items
def test_a_score_and_its_interval_resample_items():
    scores = np.array([1.0] * 30 + [0.0] * 10)
    m = mean_metrics(scores, 1000, 0)
    assert m["score"] == 0.75 and m["items"] == 40 and m["lo"] < 0.75 < m["hi"]
    f1 = np.linspace(0, 1, MIN_CHUNKS - 1)  # not a proportion: bootstrapped, so too few for an interval
    assert set(mean_metrics(f1, 1000, 0)) == {"score", "items"}


def test_a_paired_difference_cancels_what_both_models_share():
    a = np.array([1.0, 0.0] * 20)
    same = paired_mean_difference(a, a, 1000, 0)
    assert same["diff"] == 0 and "lo" not in same and same["a_only"] == same["b_only"] == 0  # nothing to test
    better = a.copy()
    better[1:17:2] = 1.0  # eight items more right, none less: McNemar's exact p = 2 / 2**8 (five would give 0.06)
    d = paired_mean_difference(better, a, 1000, 0)
    assert d["diff"] == pytest.approx(8 / 40) and d["lo"] > 0 and d["p"] == pytest.approx(2 / 2**8)
    with pytest.raises(ValueError, match="same items"):
        paired_mean_difference(a, a[:-1], 100, 0)


# ---------------------------------------------------------------- answer metrics, by hand
def test_answer_metrics_equal_hand_computed_values():
    # SQuAD's normalisation: case, punctuation and the articles a/an/the do not count.
    assert answers.exact_match("The Vell Valley.", "vell valley") == 1.0
    assert answers.exact_match("the Vell Valley river", "vell valley") == 0.0
    # F1: "cat sat on mat" against "cat sat on red mat": 4 words shared, precision 4/4, recall 4/5.
    assert answers.f1("The cat sat on the mat.", "a cat sat on a red mat") == pytest.approx(8 / 9)
    # Shared words count with multiplicity: x once and y once; precision 2/3, recall 2/3.
    assert answers.f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert answers.f1("", "") == 1.0 and answers.f1("the", "x") == 0.0 and answers.f1("x", "y") == 0.0
    # ROUGE-L: longest common subsequence of words (articles kept): cat sat on mat, 4 of the answer's
    # 6 words and the reference's 7: F = 2PR / (P + R) = 8/13.
    assert answers.rouge_l("The cat sat on the mat.", "a cat sat on a red mat") == pytest.approx(8 / 13)
    assert answers.rouge_l("x y z", "x y z") == 1.0 and answers.rouge_l("x", "y") == 0.0
    assert answers.chrf("same words", "same words") == pytest.approx(1.0) and 0 < answers.chrf("same word", "same words") < 1
    assert answers.score("x y", "x y", ("exact_match", "f1")) == {"exact_match": 1.0, "f1": 1.0}


def test_only_per_item_means_are_scored_and_paired():
    """LAMBADA logs each item's log-likelihood under "perplexity", which lm-eval turns into a
    perplexity only over the whole set: a mean of those is no perplexity, so it is left out."""
    config = {"metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                              {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    samples = [{"doc_id": i, "filter": "none", "metrics": ["perplexity", "acc"], "perplexity": -2.5 * i,
                "acc": float(i % 2), "resps": [[(-2.5 * i, True)]], "filtered_resps": [(-2.5 * i, True)]} for i in (1, 0)]
    results = {"samples": {"lambada": samples}, "configs": {"lambada": config},
               "higher_is_better": {"lambada": {"perplexity": False, "acc": True}}}
    items = benchmarks.per_item(results)["lambada"]
    assert set(items) == {"doc_id", "doc_hash", "acc,none", "loglik", "requests"}
    assert list(items["doc_id"]) == [0, 1] and list(items["acc,none"]) == [0.0, 1.0]


# ---------------------------------------------------------------- the stage on the local tasks
@pytest.fixture
def task_project(project):
    """A demo project holding the repo's tasks/ folder (local tasks read their data from the cwd)."""
    root = project(**{"tasks.names": list(TASKS), "tasks.merge_check": 30})
    shutil.copytree(ROOT / "tasks", root / "tasks")
    return root


def adapter(folder, seed: int = 0):
    """A LoRA adapter on the tiny GPT-2 with non-zero weights (B = 0 would make merging trivial)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True)
    with modeling.peft_attribute_note_silenced():
        model = get_peft_model(modeling.load_causal_lm(TINY_MODEL), config)
    model.peft_config["default"].base_model_name_or_path = str(TINY_MODEL)
    model.save_pretrained(folder)
    return folder


def test_the_stage_scores_every_item_and_checks_the_adapter_against_its_merged_model(task_project, capsys):
    from stages import tasks

    adapter(task_project / "lora")
    run_main(tasks, "--model", "lora", "--base", str(TINY_MODEL), "--out", "m/lora.json", "--info", "m/lora.info.json",
             "--items", "items/lora.npz")
    scores = json.loads((task_project / "m/lora.json").read_text())["lora"]["tasks"]
    info = json.loads((task_project / "m/lora.info.json").read_text())
    items = benchmarks.read_items(np.load(task_project / "items/lora.npz"))
    assert set(scores) == {"tiny_cloze", "tiny_complete"}
    assert scores["tiny_cloze"]["items"] == 200 and scores["tiny_complete"]["items"] == 60
    assert scores["tiny_cloze"]["acc"] == pytest.approx(items["tiny_cloze"]["acc,none"].mean())
    assert "acc_lo" in scores["tiny_cloze"] and "exact_match_strip_lo" in scores["tiny_complete"]
    assert len(items["tiny_cloze"]["loglik"]) == 4 * 200  # four choices an item
    check = info["merge_check"]
    assert check["items"] == {"tiny_cloze": 30, "tiny_complete": 30}
    assert check["max_loglik_diff"] <= check["tolerance"] == 1e-3 and check["texts_differ"] == 0
    assert info["settings"] == {"num_fewshot": 0, "batch_size": 16, "limit": None, "chat_template": False, "seed": 42}
    assert info["tasks"]["tiny_cloze"]["version"] == 1.0 and info["lm_eval"]
    assert info["tasks"]["tiny_complete"]["source"]["data_files"] == {"test": "tasks/tiny_complete.jsonl"}
    out = capsys.readouterr()
    assert "merged model agrees" in out.out and "WARNING" not in out.err and "it/s" not in out.err


def test_a_corrupted_merged_model_fails_the_check(task_project):
    """The same check, on the merged model with one weight nudged: it must fail, naming the gap."""
    p = load_params()
    model = modeling.load_for_eval(adapter(task_project / "lora"), TINY_MODEL, str(TINY_MODEL))
    tok = modeling.load_tokenizer(TINY_MODEL)
    manager = benchmarks.task_manager(p.tasks.names)
    results = benchmarks.evaluate(model, tok, p.tasks, p.seed, p.data.split_seed, manager, {})
    # lm-eval's survey of the machine (pip list, compilers: seconds of subprocesses) is skipped: nothing keeps it
    assert "pretty_env_info" not in results and results["samples"]
    items = benchmarks.per_item(results)
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged.transformer.h[0].attn.c_attn.weight[0] += 0.05
    with pytest.raises(StudyError, match=r"adapter and its merged model disagree: log-likelihoods up to .* nats apart"):
        benchmarks.merge_check(items, lambda samples: benchmarks.per_item(
            benchmarks.evaluate(merged, tok, p.tasks, p.seed, p.data.split_seed, manager, {}, samples)), 30, p.tasks.merge_tolerance)


# lm-eval's index of its own tasks (6 s) is built once per process: one worker runs these.
@pytest.mark.xdist_group("lm_eval_index")
@pytest.mark.parametrize("names,message", [
    (["tasks/nowhere.yaml"], "tasks/nowhere.yaml not found"),
    (["elsewhere/task.yaml"], "elsewhere/task.yaml not found"),
    (["no_such_task_anywhere"], "'no_such_task_anywhere' is not an lm-eval task"),
    (["mmlu"], "'mmlu' is a group of lm-eval tasks; list its tasks by name"),
])
def test_a_task_that_cannot_be_found_is_refused_in_one_line_before_any_model_loads(task_project, project, names,
                                                                                   message):
    from stages import tasks

    project(**{"tasks.names": names})
    with pytest.raises(StudyError, match=message):
        run_main(tasks, "--model", "missing-model", "--base", "missing-base", "--out", "m/x.json", "--info",
                 "m/x.info.json", "--items", "items/x.npz")


def test_a_local_task_file_outside_the_tasks_folder_is_refused(task_project):
    (task_project / "elsewhere").mkdir()
    shutil.copy(task_project / "tasks/tiny_cloze.yaml", task_project / "elsewhere/tiny_cloze.yaml")
    with pytest.raises(StudyError, match="is outside tasks/; move it and its data files there"):
        benchmarks.local_task_name(task_project / "elsewhere/tiny_cloze.yaml")


@pytest.mark.early
def test_a_hub_task_with_a_cold_cache_stops_with_one_line_of_advice(task_project, project):
    """Offline (as every test is) and with the run's own empty HF_HOME: no retries, no traceback."""
    project(**{"tasks.names": ["tasks/tiny_cloze.yaml", "lambada_openai"]})
    proc = subprocess.run([sys.executable, "-m", "stages.tasks", "--model", str(TINY_MODEL), "--base", str(TINY_MODEL),
                           "--out", "m/x.json", "--info", "m/x.info.json", "--items", "items/x.npz"],
                          cwd=task_project, capture_output=True, text=True, env=_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("tasks: error: tasks.names[1]: task 'lambada_openai' reads the Hub dataset "
                            "'EleutherAI/lambada_openai', which could not be reached (HF_HUB_OFFLINE is set)"), first
    assert "run once with the network" in first and not (task_project / "m").exists()


def _env() -> dict:
    import os

    return os.environ | {"PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- agreement with lm-eval's own CLI
@pytest.mark.slow
def test_the_pipelines_scores_are_lm_evals_own_to_the_item(demo_build, tmp_path):
    """`lm_eval` through its own CLI on the demo's fully fine-tuned model and the local tasks gives
    the same score on every item as stage tasks@full."""
    dest, *_ = demo_build
    proc = subprocess.run(["lm_eval", "--model", "hf", "--model_args", f"pretrained={dest / 'models/full'},dtype=float32",
                           "--device", "cpu", "--tasks", "tiny_cloze,tiny_complete", "--include_path", str(dest / "tasks"),
                           "--batch_size", "16", "--output_path", str(tmp_path / "out"), "--log_samples"],
                          cwd=dest, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = benchmarks.read_items(np.load(dest / "data/tasks/full.npz"))
    for task, key, metric in (("tiny_cloze", "acc,none", "acc"), ("tiny_complete", "exact_match,strip", "exact_match")):
        (samples,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        rows = sorted((json.loads(line) for line in samples.open()), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in rows] == list(ours[task]["doc_id"])
        assert [float(s[metric]) for s in rows] == list(ours[task][key]), task


# ---------------------------------------------------------------- a Hub task, pinned, through the stand-in
@pytest.mark.slow
def test_a_hub_named_task_runs_at_its_pinned_revision_then_offline_from_the_cache(task_project, project, tmp_path):
    """lm-eval's own lambada_openai, its dataset pinned as name@commit and served by the local Hub
    stand-in (tests/hub_standin.py); then, the stand-in stopped, offline from the cache it filled."""
    from hub_standin import COMMITS, LAMBADA, HubStandIn, study_repos

    pin = COMMITS[LAMBADA]
    project(**{"tasks.names": [f"lambada_openai@{pin}"], "tasks.limit": 40})
    home = tmp_path / "hf-home"
    args = [sys.executable, "-m", "stages.tasks", "--model", str(TINY_MODEL), "--base", str(TINY_MODEL),
            "--out", "m/x.json", "--info", "m/x.info.json", "--items", "items/x.npz"]
    env = {k: v for k, v in _env().items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))} | {"HF_HOME": str(home)}
    with HubStandIn(study_repos(tmp_path / "repos")) as standin:
        online = subprocess.run(args, cwd=task_project, capture_output=True, text=True, env=env | {"HF_ENDPOINT": standin.url})
    assert online.returncode == 0, online.stderr[-3000:]
    source = json.loads((task_project / "m/x.info.json").read_text())["tasks"]["lambada_openai"]["source"]
    assert source == {"dataset": LAMBADA, "config": "default", "split": "test", "revision": pin, "commit": pin,
                      "from": "the Hub"}
    scores = json.loads((task_project / "m/x.json").read_text())["x"]["tasks"]["lambada_openai"]
    assert scores["items"] == 40 and 0 <= scores["acc"] <= 1
    offline = subprocess.run(args, cwd=task_project, capture_output=True, text=True,
                             env=env | {"HF_ENDPOINT": standin.url, "HF_HUB_OFFLINE": "1"})  # nothing listens there now
    assert offline.returncode == 0 and "Traceback" not in offline.stderr, offline.stderr[-3000:]
    again = json.loads((task_project / "m/x.info.json").read_text())["tasks"]["lambada_openai"]["source"]
    assert again["commit"] == pin and json.loads((task_project / "m/x.json").read_text())["x"]["tasks"]["lambada_openai"] == scores


def test_a_loglikelihood_task_reports_lm_evals_perplexity_the_right_way_round(project, tmp_path):
    """A local output_type: loglikelihood task without metric_list: lm-eval scores acc (a mean) and
    perplexity (lower is better, exp of minus the mean log-likelihood over the set). A model whose
    log-likelihood is higher on every item (the tiny GPT-2 with its logits doubled, on targets that
    are its own greedy next tokens) is reported with the lower perplexity, lm-eval's own value."""
    from stages import tasks
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = modeling.load_causal_lm(TINY_MODEL).eval()
    contexts = [json.loads(line)["context"] for line in (ROOT / "tasks/tiny_cloze.jsonl").open()][:40]
    with torch.no_grad():
        nexts = [tok.decode(model(**tok(c, return_tensors="pt")).logits[0, -1].argmax()) for c in contexts]
    rows = [{"context": c, "target": t} for c, t in zip(contexts, nexts) if t.startswith(" ") and t[1:].isalpha()]
    (project() / "tasks").mkdir()
    (tmp_path / "tasks/ll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks/ll.yaml").write_text("task: ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            "    test: tasks/ll.jsonl\ntest_split: test\noutput_type: loglikelihood\n"
                                            "doc_to_text: context\ndoc_to_target: target\n")
    with torch.no_grad():  # ln_f's weight and bias doubled: every logit doubled, the greedy token likelier
        model.transformer.ln_f.weight.mul_(2)
        model.transformer.ln_f.bias.mul_(2)
    model.save_pretrained(tmp_path / "sharp")
    project(**{"tasks.names": ["tasks/ll.yaml"], "tasks.merge_check": 0})
    got = {}
    for name, folder in (("plain", str(TINY_MODEL)), ("sharp", "sharp")):
        run_main(tasks, "--model", folder, "--base", str(TINY_MODEL), "--out", f"m/{name}.json",
                 "--info", f"m/{name}.info.json", "--items", f"items/{name}.npz")
        got[name] = (json.loads((tmp_path / f"m/{name}.json").read_text())[name]["tasks"]["ll"],
                     benchmarks.read_items(np.load(tmp_path / f"items/{name}.npz"))["ll"],
                     json.loads((tmp_path / f"m/{name}.info.json").read_text())["tasks"]["ll"]["metrics"])
    (plain, plain_items, facts), (sharp, sharp_items, _) = got["plain"], got["sharp"]
    assert facts == {"acc": {"higher_is_better": True, "aggregation": "mean", "paired": True},
                     "perplexity": {"higher_is_better": False, "aggregation": "perplexity", "paired": False}}
    assert (sharp_items["loglik"] > plain_items["loglik"]).all() and len(rows) >= 10
    for row, items in ((plain, plain_items), (sharp, sharp_items)):
        assert row["perplexity"] == pytest.approx(np.exp(-items["loglik"].mean()))  # lm-eval's, not a mean of scores
        assert "perplexity_lo" not in row and set(items) >= {"acc,none", "doc_hash"} and "perplexity,none" not in items
    assert sharp["perplexity"] < plain["perplexity"]
    # Both models ace acc (each target is the greedy token): its interval keeps Wilson's width, not [1, 1].
    from ftstudy.measure.stats import wilson_interval

    for row in (plain, sharp):
        assert row["acc"] == 1.0 and row["acc_lo"] == pytest.approx(wilson_interval(len(rows), len(rows))[0])
        assert row["acc_lo"] < 0.95 and row["acc_hi"] == 1.0
    from ftstudy.report import task_report

    section = "\n".join(task_report.tasks_section({"pretrained": {"ll": plain}, "full": {"ll": sharp}, "lora": {"ll": sharp}},
                                                  {}, {"pretrained": "P", "full": "F", "lora": "L"}, [],
                                                  {"ll": {k: v["higher_is_better"] for k, v in facts.items()}}))
    assert "ll (perplexity, lower is better)" in section and "perplexity as lm-eval aggregates it" in section
