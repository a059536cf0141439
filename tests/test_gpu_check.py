"""scripts/gpu_check.py --dry-run: the GPU check's own code at tiny sizes, so it works on the day a
GPU comes. The loop rows run for real (--loop-only); the pipeline half runs dvc.yaml's stage
commands one by one, which the demo build runs through DVC in test_pipeline.py, so here only their
resolution through DVC's API is checked, which is what the script adds."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_dry_run_measures_every_path(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--dry-run", "--loop-only", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True
    paths = {row["path"]: row for row in r["training"]}
    assert set(paths) == {"ours, full", "ours, lora", "ours, full, eager", "HF Trainer defaults", "ours, DoRA",
                          "ours, LoRA, gradient checkpointing"}  # (the 16- and 4-bit bases: on a GPU only)
    assert paths["ours, DoRA"]["vs_lora_tokens_per_s"] > 0 and paths["ours, LoRA, gradient checkpointing"]["vs_lora_peak_mem"] > 0
    assert paths["ours, full"]["loss"] == "chunked"  # the new loss, the default
    # One compile warm-up in a dry run: full compiled; LoRA (compiled on a GPU) and full eager are not.
    assert paths["ours, full"]["compiled"] and not paths["ours, lora"]["compiled"]
    assert not paths["ours, full, eager"]["compiled"]
    assert all(row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0 for row in r["training"] if "error" not in row)
    assert r["compiled_vs_eager_final_loss_rel_diff"] < 1e-3
    assert r["pipeline"] == [] and set(r["targets"]) == {"full_tokens_per_s", "full_over_hf",
                                                          "lora_over_full_tokens_per_s", "lora_over_full_peak_mem"}
    assert "| path / stage" in proc.stdout and "gpu_check: wrote" in proc.stdout


def test_the_pipeline_half_gets_every_stage_as_dvc_resolves_it():
    from scripts.gpu_check import pipeline_commands

    stages = dict(pipeline_commands())
    assert list(stages)[:4] == ["check_params", "prepare", "train_lora", "train_full"]
    assert {f"{stage}@{m}" for stage in ("evaluate", "generate") for m in ("pretrained", "full", "lora")} <= set(stages)
    assert list(stages)[-2:] == ["compare", "report"]
    assert not any("${" in cmd for cmd in stages.values())  # vars and matrix items expanded by DVC
    assert "--model models/lora --base models/pretrained" in stages["evaluate@lora"]
    assert stages["train_full"].startswith("$(python -m ftstudy.train.launching) -m stages.train_full")
