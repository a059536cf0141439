"""The pipeline end to end: real DVC in a sandbox made by scripts/sandbox.py, offline, on CPU.

One demo build is made for the whole test run; each test that changes a sandbox works in its own
copy of it, so no test depends on what another left behind."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import SETTINGS, dvc, outcome
from gpt2study.config import override_file
from gpt2study.outputs import read_json
from scripts import sandbox

pytestmark = pytest.mark.slow

LORA_STAGES = {"check_params", "train_lora", "evaluate@lora", "generate@lora", "compare", "report"}
ALL_STAGES = {"check_params", "prepare", "train_full", "train_lora", "compare", "report"} | {
    f"{s}@{m}" for s in ("evaluate", "generate") for m in ("pretrained", "full", "lora")}


# Floating-point metrics that two runs may give differently in the last bits (README, "Determinism").
FLOAT_RTOL = 1e-6


def stages_run(proc) -> set[str]:
    out = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return set(re.findall(r"Running stage '([^']+)'", out))


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two outcomes: hashes exactly, floats beyond FLOAT_RTOL, the rest exactly."""
    out = [f"{k}: {a['hashes'].get(k)} vs {b['hashes'].get(k)}" for k in a["hashes"] | b["hashes"]
           if a["hashes"].get(k) != b["hashes"].get(k)]
    for k in sorted(a["metrics"].keys() | b["metrics"].keys()):
        x, y = a["metrics"].get(k), b["metrics"].get(k)
        if isinstance(x, float) and isinstance(y, float):
            if x != pytest.approx(y, rel=FLOAT_RTOL, abs=1e-12):
                out.append(f"{k}: {x!r} vs {y!r}")
        elif x != y:
            out.append(f"{k}: {x!r} vs {y!r}")
    return out


@pytest.fixture
def repo(demo_build, tmp_path):
    """This test's own copy of the demo build (git, DVC cache and outputs included)."""
    src, first, result = demo_build
    dest = tmp_path / "sandbox"
    shutil.copytree(src, dest, symlinks=True)
    return dest, first, result


def test_repro_runs_every_stage_and_writes_every_output(demo_build):
    dest, first, _ = demo_build
    assert stages_run(first) == ALL_STAGES
    for path in ("data/prepared/train.bin", "data/prepared/meta.json", "models/pretrained/model.safetensors",
                 "models/full/model.safetensors", "models/full/tokenizer.json",
                 "models/lora/adapter_model.safetensors", "metrics/prepare.json", "metrics/train_full.json",
                 "metrics/train_lora.json", "metrics/plots/train_full/train_loss.csv",
                 "metrics/plots/train_lora/val_loss.csv", "metrics/report.md", "metrics/compare.json",
                 *[f"data/nll/{m}.npy" for m in ("pretrained", "full", "lora")],
                 *[f"metrics/evaluate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"metrics/generate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"generations/{m}.json" for m in ("pretrained", "full", "lora")]):
        assert (dest / path).is_file(), path
    assert not (dest / "models/lora/model.safetensors").exists()


def test_fine_tuning_beats_the_pretrained_model(demo_build):
    dest, *_ = demo_build
    ppl = {m: read_json(dest / f"metrics/evaluate/{m}.json")[m]["test_ppl"] for m in ("pretrained", "full", "lora")}
    assert ppl["full"] < ppl["pretrained"] and ppl["lora"] < ppl["pretrained"], ppl
    report = (dest / "metrics/report.md").read_text()
    assert f"{ppl['full']:.2f}" in report and "| Model" in report
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings == ["## Efficiency", "## Quality", "## Generation quality", "## Findings", "## Environment"]
    assert "### Validation during training" in report and "Test ppl ratio [95% paired CI]" in report
    assert "tiny-general-test ppl [95% CI]" in report and "LoRA integrity" in report


def test_plots_render_both_methods(demo_build):
    dest, *_ = demo_build
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
    before = read_json(dest / "metrics/train_lora.json")["lora"]["trainable_params"]
    exp = dvc(dest, "exp", "run", "-S", "lora.r=16")
    assert stages_run(exp) == LORA_STAGES
    assert read_json(dest / "metrics/train_lora.json")["lora"]["trainable_params"] == 2 * before
    diff = json.loads(dvc(dest, "metrics", "diff", "--json").stdout)
    assert diff["metrics/train_lora.json"]["lora.trainable_params"]["diff"] == before
    assert "lora.test_ppl" in diff["metrics/evaluate/lora.json"]
    changed = {f for f, keys in diff.items() if keys}
    assert changed <= {"metrics/train_lora.json", "metrics/evaluate/lora.json", "metrics/generate/lora.json",
                       "metrics/compare.json"}, changed
    # Only comparisons that involve LoRA (and time to quality, measured against LoRA) may move.
    assert not [k for k in diff.get("metrics/compare.json", {}) if k.startswith("paired.full_vs_pretrained")]


def test_readme_exp_show_command_fits_120_columns(repo):
    dest, *_ = repo
    dvc(dest, "exp", "run", "-n", "r16", "-S", "lora.r=16")
    readme = (sandbox.ROOT / "README.md").read_text()
    command = re.search(r"^(dvc exp show [^\n#]*?)\s*(#.*)?$", readme, re.M).group(1)
    proc = subprocess.run(command, shell=True, cwd=dest, capture_output=True, text=True,
                          env=os.environ | sandbox.ENV | {"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 120, proc.stdout
    assert "…" not in proc.stdout, proc.stdout
    table = proc.stdout
    assert "lora.r" in table and "16" in table and "8" in table
    for column in ("pretrained.test_ppl", "full.test_ppl", "lora.test_ppl", "full.train_s", "lora.train_s"):
        assert column in table, (column, table)


def test_misspelled_param_fails_before_training(repo):
    dest, *_ = repo
    lock, adapter = (dest / "dvc.lock").read_bytes(), (dest / "models/lora/adapter_model.safetensors").read_bytes()
    # DVC refuses `-S lora.rr=16` itself, but `+lora.rr=16` (or a hand edit) adds the key silently.
    proc = dvc(dest, "exp", "run", "-S", "+lora.rr=16", check=False)
    assert proc.returncode != 0
    assert "lora.rr: unknown key; did you mean lora.r?" in proc.stdout + proc.stderr
    assert stages_run(proc) <= {"check_params", "train_lora"}
    assert (dest / "dvc.lock").read_bytes() == lock
    assert (dest / "models/lora/adapter_model.safetensors").read_bytes() == adapter


def test_misspelled_section_added_by_hand_fails_in_seconds(repo):
    dest, *_ = repo
    lock = (dest / "dvc.lock").read_bytes()
    outputs = {p: p.read_bytes() for p in (dest / "metrics").rglob("*") if p.is_file()}
    with open(dest / "params.yaml", "a") as f:
        f.write("\ntrian:\n  epochs: 2\n")
    start = time.perf_counter()
    proc = dvc(dest, "repro", check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "trian: unknown key; did you mean train?" in proc.stdout + proc.stderr
    assert stages_run(proc) == {"check_params"}
    assert elapsed < 30, elapsed
    assert (dest / "dvc.lock").read_bytes() == lock
    assert {p: p.read_bytes() for p in (dest / "metrics").rglob("*") if p.is_file()} == outputs


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


def test_two_clean_runs_in_two_sandboxes_are_identical(demo_build, tmp_path):
    _, _, first = demo_build
    other = sandbox.make_sandbox(tmp_path / "again", SETTINGS)
    dvc(other, "repro")
    assert differences(outcome(other), first) == []


def test_training_killed_mid_epoch_resumes_to_identical_results(demo_build, tmp_path):
    _, _, first = demo_build
    dest = sandbox.make_sandbox(tmp_path / "killed", SETTINGS)
    ckpts = dest / ".checkpoints"
    # Killed once a checkpoint of train_full (every 10 of its 53 steps) is complete, mid-epoch.
    _repro_killed_when(dest, lambda out: "train_full" in out and any(ckpts.glob("full-*/step-*/progress.json")))
    assert not (dest / "models/full").exists()
    rerun = dvc(dest, "repro")
    assert re.search(r"train_full: resuming from .*step-\d+ \(step \d+ of 53\)", rerun.stdout + rerun.stderr)
    assert differences(outcome(dest), first) == []
    assert not any(ckpts.iterdir()), "checkpoints are removed after success"


def test_evaluate_killed_partway_leaves_old_metrics_and_reruns_only_from_there(repo):
    dest, *_ = repo
    assert "up to date" in dvc(dest, "status").stdout
    old = (dest / "metrics/evaluate/pretrained.json").read_bytes()
    override_file(dest / "params.yaml", {"evaluate.stride": 32})
    _repro_killed_when(dest, lambda out: "sliding" in out)
    assert (dest / "metrics/evaluate/pretrained.json").read_bytes() == old
    assert not [f for f in (dest / "metrics").rglob("*") if f.name.endswith(".tmp")]
    rerun = dvc(dest, "repro")
    # check_params finished before the kill, so only the evaluate stages and the report remain.
    assert stages_run(rerun) == {"evaluate@pretrained", "evaluate@full", "evaluate@lora", "compare", "report"}


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
                ppl = data.get("metrics", {}).get("metrics/evaluate/lora.json", {}).get("data", {}).get("lora", {}).get("test_ppl")
                if r is not None and rev.get("name"):
                    found[r] = ppl
    assert {4, 8, 16} <= set(found), found
    assert all(isinstance(found[r], float) for r in (4, 8, 16)), found


def test_push_and_pull_restore_identical_models(repo, tmp_path):
    dest, *_ = repo
    dvc(dest, "remote", "add", "-d", "store", str(tmp_path / "store"))
    dvc(dest, "push")
    before = {p.relative_to(dest): p.read_bytes() for p in (dest / "models").glob("*/**/*") if p.is_file()}
    shutil.rmtree(dest / "models")
    shutil.rmtree(dest / ".dvc" / "cache")
    dvc(dest, "pull")
    after = {p.relative_to(dest): p.read_bytes() for p in (dest / "models").glob("*/**/*") if p.is_file()}
    assert after == before and any("adapter_model.safetensors" in str(p) for p in after)

    # As the README says: a model straight from the repo and its remote, without a clone.
    subprocess.run(["git", "commit", "-qam", "remote"], cwd=dest, check=True)
    dvc(tmp_path, "get", str(dest), "models/lora", "-o", str(tmp_path / "got"))
    assert (tmp_path / "got/adapter_model.safetensors").read_bytes() == before[
        (dest / "models/lora/adapter_model.safetensors").relative_to(dest)]


def test_readme_model_loading_snippets_run(demo_build, tmp_path):
    dest, *_ = demo_build
    readme = (sandbox.ROOT / "README.md").read_text()
    section = readme.split("### Use the trained models", 1)[1].split("\n### ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 2
    outputs = []
    for code in snippets:
        proc = subprocess.run([sys.executable, "-c", code], cwd=dest, capture_output=True, text=True,
                              env=os.environ | sandbox.ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert outputs[0].startswith("The history of the city begins") and len(outputs[0].split()) > 10
