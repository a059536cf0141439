"""scripts/gpu_check.py --dry-run: the GPU check's own code at tiny sizes, so it works on the day a
GPU comes."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_dry_run_measures_every_path_and_times_every_stage(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True
    paths = {row["path"]: row for row in r["training"]}
    assert set(paths) == {"ours, full", "ours, lora", "ours, full, eager", "ours, full, model's own loss",
                          "HF Trainer defaults"}
    assert paths["ours, full"]["loss"] == "chunked" and paths["ours, full, model's own loss"]["loss"] == "model"
    # One compile warm-up in a dry run: full compiled; LoRA (compiled on a GPU) and full eager are not.
    assert paths["ours, full"]["compiled"] and not paths["ours, lora"]["compiled"]
    assert not paths["ours, full, eager"]["compiled"]
    assert all(row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0 for row in r["training"])
    assert r["compiled_vs_eager_final_loss_rel_diff"] < 1e-3
    stages = [p["stage"] for p in r["pipeline"]]
    assert stages[:4] == ["check_params", "prepare", "train_lora", "train_full"] and stages[-1] == "total"
    assert {"evaluate@lora", "generate@pretrained", "report"} <= set(stages)
    assert r["pipeline"][-1]["train_tokens"] > 4_000 and "## Findings" in r["report"]
    assert set(r["targets"]) == {"full_tokens_per_s", "full_over_hf", "lora_over_full_tokens_per_s",
                                 "lora_over_full_peak_mem", "pipeline_s"}
    assert "| path / stage" in proc.stdout and "gpu_check: wrote" in proc.stdout
