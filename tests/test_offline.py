"""Without the Hugging Face Hub, the real study's prepare fails fast with one helpful message."""

import os
import shutil
import subprocess
import sys
import time

from conftest import ROOT

# An endpoint nothing listens on, and an empty cache: the Hub is unreachable here by construction.
OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}


def test_prepare_on_the_shipped_params_fails_fast_and_says_what_to_do(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STUDY_"))}
    env |= OFFLINE | {"HF_HOME": str(tmp_path / "hf-home")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--out", "prep", "--pretrained", "pre",
                           "--metrics", "m.json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1
    assert elapsed < 5, elapsed
    err = proc.stderr
    assert err.startswith("prepare: error: model.name: 'gpt2' is a Hugging Face Hub id, and the Hub could not be reached")
    assert "set model.name to a local folder (README: \"A local model or dataset\")" in err and "make demo" in err
    assert "Traceback" not in err and len(err.splitlines()) == 2
    assert not (tmp_path / "prep").exists()

    env["STUDY_TRACEBACK"] = "1"
    verbose = subprocess.run([sys.executable, "-m", "stages.prepare", "--out", "prep", "--pretrained", "pre",
                              "--metrics", "m.json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
