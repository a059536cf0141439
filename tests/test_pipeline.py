"""The pipeline end to end: real DVC in a sandbox made by scripts/sandbox.py, offline, on CPU."""

import json
import os
import re
import subprocess

import pytest

import sandbox
from stages.outputs import read_json

LORA_STAGES = {"train_lora", "evaluate@lora", "generate@lora", "report"}
ALL_STAGES = {"prepare", "train_full", "train_lora", "report"} | {
    f"{s}@{m}" for s in ("evaluate", "generate") for m in ("pretrained", "full", "lora")}


def dvc(repo, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=os.environ | sandbox.ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def stages_run(proc) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dest = tmp_path_factory.mktemp("pipeline") / "sandbox"
    sandbox.make_sandbox(dest, {"train.epochs": 1, "generate.num_samples": 1, "generate.max_new_tokens": 12})
    first = dvc(dest, "repro")
    # As a user would: commit the baseline, so that experiments and metrics diff compare against it.
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=dest, check=True)
    return dest, first


def test_repro_runs_every_stage_and_writes_every_output(repo):
    dest, first = repo
    assert stages_run(first) == ALL_STAGES
    for path in ("data/prepared/train.bin", "data/prepared/meta.json", "models/pretrained/model.safetensors",
                 "models/full/model.safetensors", "models/full/tokenizer.json",
                 "models/lora/adapter_model.safetensors", "metrics/prepare.json", "metrics/train_full.json",
                 "metrics/train_lora.json", "metrics/plots/train_full/train_loss.csv",
                 "metrics/plots/train_lora/val_loss.csv", "metrics/report.md",
                 *[f"metrics/evaluate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"generations/{m}.json" for m in ("pretrained", "full", "lora")]):
        assert (dest / path).is_file(), path
    assert not (dest / "models/lora/model.safetensors").exists()


def test_fine_tuning_beats_the_pretrained_model(repo):
    dest, _ = repo
    ppl = {m: read_json(dest / f"metrics/evaluate/{m}.json")["test_ppl"] for m in ("pretrained", "full", "lora")}
    assert ppl["full"] < ppl["pretrained"] and ppl["lora"] < ppl["pretrained"], ppl
    report = (dest / "metrics/report.md").read_text()
    assert f"{ppl['full']:.2f}" in report and "| Model" in report


def test_second_repro_runs_nothing(repo):
    dest, _ = repo
    again = dvc(dest, "repro")
    assert stages_run(again) == set()
    assert "up to date" in again.stdout


def test_exp_run_reruns_only_the_lora_stages_and_metrics_diff_shows_it(repo):
    dest, _ = repo
    before = read_json(dest / "metrics/train_lora.json")["trainable_params"]
    exp = dvc(dest, "exp", "run", "-S", "lora.r=16")
    assert stages_run(exp) == LORA_STAGES
    assert read_json(dest / "metrics/train_lora.json")["trainable_params"] == 2 * before
    diff = json.loads(dvc(dest, "metrics", "diff", "--json").stdout)
    assert diff["metrics/train_lora.json"]["trainable_params"]["diff"] == before
    assert "test_ppl" in diff["metrics/evaluate/lora.json"]
    assert "metrics/train_full.json" not in diff or not diff["metrics/train_full.json"].get("val_loss")
    shown = dvc(dest, "exp", "show", "--json").stdout
    assert "lora.r" in shown or '"r": 16' in shown


def test_misspelled_param_fails_before_training(repo):
    dest, _ = repo
    # DVC refuses `-S lora.rr=16` itself, but `+lora.rr=16` (or a hand edit) adds the key silently.
    proc = dvc(dest, "exp", "run", "-S", "+lora.rr=16", check=False)
    assert proc.returncode != 0
    assert "lora.rr: unknown key; did you mean lora.r?" in proc.stdout + proc.stderr
    assert stages_run(proc) == {"train_lora"}
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=dest, check=True)
