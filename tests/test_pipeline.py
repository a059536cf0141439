"""The pipeline end to end: real DVC in a sandbox made by scripts/sandbox.py, offline, on CPU."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import yaml

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


SETTINGS = {"train.epochs": 1, "generate.num_samples": 1, "generate.max_new_tokens": 12}
TIMING = {"train_time_s", "warmup_s", "tokens_per_s", "mfu", "peak_mem_gib", "peak_mem_reserved_gib", "eval_time_s"}


def stages_run(proc) -> set[str]:
    out = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return set(re.findall(r"Running stage '([^']+)'", out))


def outcome(dest) -> dict:
    """Everything a run produced that must be reproducible: output hashes and non-timing metrics."""
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    hashes = {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
              if not o["path"].endswith((".json", ".md"))}
    metrics = {str(f.relative_to(dest)): {k: v for k, v in json.loads(f.read_text()).items() if k not in TIMING}
               for f in sorted((dest / "metrics").rglob("*.json"))}
    return {"hashes": hashes, "metrics": metrics}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dest = tmp_path_factory.mktemp("pipeline") / "sandbox"
    sandbox.make_sandbox(dest, SETTINGS)
    first = dvc(dest, "repro")
    # As a user would: commit the baseline, so that experiments and metrics diff compare against it.
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=dest, check=True)
    return dest, first, outcome(dest)


def test_repro_runs_every_stage_and_writes_every_output(repo):
    dest, first, _ = repo
    assert stages_run(first) == ALL_STAGES
    for path in ("data/prepared/train.bin", "data/prepared/meta.json", "models/pretrained/model.safetensors",
                 "models/full/model.safetensors", "models/full/tokenizer.json",
                 "models/lora/adapter_model.safetensors", "metrics/prepare.json", "metrics/train_full.json",
                 "metrics/train_lora.json", "metrics/plots/train_full/train_loss.csv",
                 "metrics/plots/train_lora/val_loss.csv", "metrics/report.md",
                 *[f"metrics/evaluate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"metrics/generate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"generations/{m}.json" for m in ("pretrained", "full", "lora")]):
        assert (dest / path).is_file(), path
    assert not (dest / "models/lora/model.safetensors").exists()


def test_fine_tuning_beats_the_pretrained_model(repo):
    dest, *_ = repo
    ppl = {m: read_json(dest / f"metrics/evaluate/{m}.json")["test_ppl"] for m in ("pretrained", "full", "lora")}
    assert ppl["full"] < ppl["pretrained"] and ppl["lora"] < ppl["pretrained"], ppl
    report = (dest / "metrics/report.md").read_text()
    assert f"{ppl['full']:.2f}" in report and "| Model" in report
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings == ["## Efficiency", "## Quality", "## Generation quality", "## Findings", "## Environment"]
    assert "tiny-general-test ppl [95% CI]" in report and "LoRA integrity" in report


def test_plots_render_both_methods(repo):
    dest, *_ = repo
    plots = json.loads(dvc(dest, "plots", "show", "--json").stdout)["data"]
    assert {"Training loss", "Validation loss"} <= set(plots)
    sources = json.dumps(plots["Training loss"])
    assert "train_full/train_loss.csv" in sources and "train_lora/train_loss.csv" in sources


def test_second_repro_runs_nothing(repo):
    dest, *_ = repo
    again = dvc(dest, "repro")
    assert stages_run(again) == set()
    assert "up to date" in again.stdout


def test_exp_run_reruns_only_the_lora_stages_and_metrics_diff_shows_it(repo):
    dest, *_ = repo
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
    dest, *_ = repo
    lock, adapter = (dest / "dvc.lock").read_bytes(), (dest / "models/lora/adapter_model.safetensors").read_bytes()
    # DVC refuses `-S lora.rr=16` itself, but `+lora.rr=16` (or a hand edit) adds the key silently.
    proc = dvc(dest, "exp", "run", "-S", "+lora.rr=16", check=False)
    assert proc.returncode != 0
    assert "lora.rr: unknown key; did you mean lora.r?" in proc.stdout + proc.stderr
    assert stages_run(proc) == {"train_lora"}
    assert (dest / "dvc.lock").read_bytes() == lock
    assert (dest / "models/lora/adapter_model.safetensors").read_bytes() == adapter
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=dest, check=True)


def _repro_killed_when(dest, seen) -> str:
    """Start `dvc repro`, SIGKILL its whole process group once seen(output so far) is true."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=os.environ | sandbox.ENV, start_new_session=True)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(64), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if seen(b"".join(chunks).decode(errors="replace")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    reader.join(5)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return b"".join(chunks).decode(errors="replace")


def test_two_clean_runs_in_two_sandboxes_are_identical(repo, tmp_path):
    _, _, first = repo
    other = sandbox.make_sandbox(tmp_path / "again", SETTINGS)
    dvc(other, "repro")
    assert outcome(other) == first


def test_training_killed_mid_epoch_resumes_to_identical_results(repo, tmp_path):
    _, _, first = repo
    dest = sandbox.make_sandbox(tmp_path / "killed", SETTINGS)
    ckpts = dest / ".checkpoints"
    # Killed once a checkpoint of train_full (every 10 of its 53 steps) is complete, mid-epoch.
    _repro_killed_when(dest, lambda out: "train_full" in out and any(ckpts.glob("full-*/step-*/progress.json")))
    assert not (dest / "models/full").exists()
    rerun = dvc(dest, "repro")
    assert re.search(r"train_full: resuming from .*step-\d+ \(step \d+ of 53\)", rerun.stdout + rerun.stderr)
    assert outcome(dest) == first
    assert not any(ckpts.iterdir()), "checkpoints are removed after success"


def test_evaluate_killed_partway_leaves_old_metrics_and_reruns_only_from_there(repo):
    dest, *_ = repo
    subprocess.run(["git", "checkout", "-f", "main"], cwd=dest, check=True, capture_output=True)
    dvc(dest, "checkout", "--force")
    dvc(dest, "repro")  # a clean, up-to-date start whatever earlier tests left
    assert "up to date" in dvc(dest, "status").stdout
    old = (dest / "metrics/evaluate/pretrained.json").read_bytes()
    sandbox.apply_overrides(dest / "params.yaml", {"evaluate.stride": 32})
    _repro_killed_when(dest, lambda out: "sliding" in out)
    assert (dest / "metrics/evaluate/pretrained.json").read_bytes() == old
    assert not [f for f in (dest / "metrics").rglob("*") if f.name.endswith(".tmp")]
    rerun = dvc(dest, "repro")
    assert stages_run(rerun) == {"evaluate@pretrained", "evaluate@full", "evaluate@lora", "report"}


def test_queued_sweep_lists_three_experiments_with_perplexities(repo):
    dest, *_ = repo
    dvc(dest, "exp", "run", "--queue", "-S", "lora.r=4,8,16")
    dvc(dest, "queue", "start")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc(dest, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, status
    rows = json.loads(dvc(dest, "exp", "show", "--json").stdout)
    found = {}
    for commit in rows:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                r = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("lora", {}).get("r")
                ppl = data.get("metrics", {}).get("metrics/evaluate/lora.json", {}).get("data", {}).get("test_ppl")
                if r is not None and rev.get("name"):
                    found[r] = ppl
    assert {4, 8, 16} <= set(found), found
    assert all(isinstance(found[r], float) for r in (4, 8, 16)), found


def test_push_and_pull_restore_identical_models(repo, tmp_path):
    dest, *_ = repo
    dvc(dest, "remote", "add", "-d", "store", str(tmp_path / "store"))
    dvc(dest, "push")
    before = {p.relative_to(dest): p.read_bytes() for p in (dest / "models").glob("*/**/*") if p.is_file()}
    import shutil

    shutil.rmtree(dest / "models")
    shutil.rmtree(dest / ".dvc" / "cache")
    dvc(dest, "pull")
    after = {p.relative_to(dest): p.read_bytes() for p in (dest / "models").glob("*/**/*") if p.is_file()}
    assert after == before and any("adapter_model.safetensors" in str(p) for p in after)
