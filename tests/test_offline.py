"""Without the Hugging Face Hub, the real study's prepare fails with one helpful message, before
any client retries (how fast is for the README, not a test: it would flake on a busy machine); and
the demo, which the README calls offline, opens no connection whatever the caller exported."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import PREPARE_ARGS, ROOT, demo_record

# An endpoint nothing listens on, and an empty cache: the Hub is unreachable here by construction.
OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}


def test_prepare_on_the_shipped_params_fails_fast_and_says_what_to_do(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STUDY_"))}
    env |= OFFLINE | {"HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", *PREPARE_ARGS], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    err = proc.stderr
    assert err.startswith("prepare: error: model.name: 'openai-community/gpt2' is a Hugging Face Hub id, and the Hub "
                          "could not be reached")
    assert "nor is it complete in the local cache at model.revision '607a30d783dfa663caf39e06633721c8d4cfcd7e'" in err
    assert "set model.name to a local folder or file (README: \"Your own model\", \"Your own data\")" in err and "make demo" in err
    assert "Traceback" not in err and len(err.splitlines()) == 2
    assert not (tmp_path / "prep").exists()

    env["STUDY_TRACEBACK"] = "1"
    verbose = subprocess.run([sys.executable, "-m", "stages.prepare", *PREPARE_ARGS], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_the_demo_opens_no_connection_whatever_the_caller_exported(demo_build, tmp_path_factory):
    """The demo build's `dvc repro` (conftest.demo_build: every stage, warm, as `make demo` runs them)
    ran as a newcomer's: none of the Hub's offline variables nor DVC's analytics switch exported,
    behind a network that hangs (every proxy variable and the Hub's endpoint at a local socket that
    accepts and never answers). It completed, and that socket saw no connection: one would have
    hung a stage behind a firewall."""
    dest, *_ = demo_build
    record = json.loads(demo_record(tmp_path_factory).read_text())
    assert (dest / "metrics/report.md").is_file()
    assert record["connections"] == 0, f"{record['connections']} connection(s) to the hanging network"
