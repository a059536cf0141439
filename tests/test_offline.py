"""Without the Hugging Face Hub, the real study's prepare fails with one helpful message, before
any client retries (how fast is for the README, not a test: it would flake on a busy machine); and
the demo, which the README calls offline, opens no connection whatever the caller exported."""

import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from conftest import PREPARE_ARGS, ROOT

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
@pytest.mark.early
def test_the_demo_opens_no_connection_whatever_the_caller_exported(tmp_path):
    """`make demo` as a newcomer runs it: none of the Hub's offline variables (nor DVC's analytics
    switch) exported, behind a network that hangs: every proxy variable and the Hub's endpoint point
    at a local socket that accepts and never answers. The demo completes and that socket sees no
    connection (one would have hung a stage behind a firewall)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    seen = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            seen.append(conn)  # held open and never answered, as a silent firewall would

    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE", "DVC_NO_ANALYTICS")) and k.lower() != "no_proxy"}
    env |= {name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")}
    env |= {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home")}
    try:
        proc = subprocess.run([sys.executable, "-m", "scripts.sandbox", str(tmp_path / "demo"), "--repro"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.close()
        listener.join(5)
        for conn in seen:
            conn.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "demo/metrics/report.md").is_file()
    assert seen == [], f"{len(seen)} connection(s) to the hanging network"
