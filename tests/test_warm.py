"""The warm start (ftstudy/warm.py): a stage forked from the server writes what it writes cold, exits
as it would, takes signals as it would, and a process that differs from the server starts cold."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PREPARE_ARGS, ROOT, prepare_in, train_args
from scripts.sandbox import warm_server

# Each test starts a server and stages of its own: seconds (pytest.ini, early).
pytestmark = pytest.mark.early

EVALUATE = ("-m", "stages.evaluate", "--model", "pre", "--base", "pre", "--data", "prep", "--out", "m/e.json", "--info",
            "m/e.info.json", "--nll", "nll.npz")


def _log(address: str) -> str:
    return (Path(address).parent / "log").read_text()


def _worker(address: str, stage: str, nth: int = 1, deadline_s: float = 60.0) -> int:
    """The pid of the `nth` worker the server started for `stage`."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        lines = [line for line in _log(address).splitlines() if f"warm: stages.{stage} in" in line]
        if len(lines) >= nth:
            return int(lines[nth - 1].rsplit(" ", 1)[-1])
        time.sleep(0.05)
    raise AssertionError(f"no warm worker for {stage}:\n{_log(address)}")


def _gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server():
    """One server for the two tests that start it with this process's settings (its preload is
    seconds of CPU), fresh for the first; stopped by its handle, its socket and variable gone."""
    with warm_server(os.environ | {"PYTHONPATH": str(ROOT)}) as address:
        yield address
    assert "FTSTUDY_WARM" not in os.environ or os.environ["FTSTUDY_WARM"] != address
    assert not Path(address).exists()


@pytest.mark.xdist_group("warm")  # one worker, one server
def test_a_warm_stage_writes_a_cold_ones_bytes_and_fails_as_it_would_and_a_differing_one_starts_cold(server, project):
    address = server
    assert address and os.environ["FTSTUDY_WARM"] == address
    # It listens before it imports torch (a second or more): the first asker comes meanwhile and waits.
    assert "serving" not in _log(address)
    root = prepare_in(project)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    # One variable more than the server has: declined, started cold, named in the log.
    cold = subprocess.run([sys.executable, *EVALUATE], cwd=root, env=env | {"STUDY_EXTRA": "1"},
                          capture_output=True, text=True)
    assert cold.returncode == 0, cold.stderr[-2000:]
    assert "declined stages.evaluate: its env (STUDY_EXTRA) differ" in _log(address)
    written = {p: (root / p).read_bytes() for p in ("m/e.json", "nll.npz")}
    for p in written:
        (root / p).unlink()
    # Variables a parent process leaves, which no library reads at import: served all the same.
    left = {"_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR": "94000000000000",  # a process that ran compiled code
            "__DASK_PARENT_PID": "1",  # a Dask worker's
            "COLUMNS": "237", "LINES": "61"}  # a terminal's size, as a shell or a tool sets it
    hot = subprocess.run([sys.executable, *EVALUATE], cwd=root, env=env | left, capture_output=True, text=True)
    assert hot.returncode == 0, hot.stderr[-2000:]
    _worker(address, "evaluate")
    assert {p: (root / p).read_bytes() for p in written} == written
    untimed = [re.sub(r" in [\d.]+ s;", ";", proc.stdout) for proc in (cold, hot)]
    assert untimed[0] == untimed[1] and untimed[0].startswith("evaluate@e: test_ppl")
    # A usage error: its status and message through the asker's own streams.
    bad = subprocess.run([sys.executable, "-m", "stages.evaluate", "--model", "pre"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "evaluate.py: error: the following arguments are required" in bad.stderr
    assert _log(address).count("warm: stages.evaluate in") == 2


@pytest.mark.xdist_group("warm")  # one worker, one server
def test_a_signal_reaches_the_worker_and_an_asker_killed_outright_takes_its_worker_along(server, project):
    root, address = prepare_in(project), server
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for nth, (sent, expected) in enumerate(((signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)), 1):
        asker = subprocess.Popen([sys.executable, "-m", "stages.train_full", *train_args("full")], cwd=root,
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = _worker(address, "train_full", nth)
        time.sleep(1.0)
        assert asker.poll() is None, "the training ended before the signal"
        asker.send_signal(sent)
        assert asker.wait(30) == expected
        assert _gone(worker), f"worker {worker} outlived its asker ({sent.name})"


def test_a_stage_that_needs_a_fresh_interpreter_runs_once_cold_and_a_killed_worker_kills_its_asker(project):
    """A stage that sets what a preloaded library read at its import (prepare, offline mode, when
    the Hub cannot be reached) calls start_cold: its worker hands it back and the asker runs it
    itself, once. A worker killed outright (as the OOM killer does) takes its asker down by the same
    signal."""
    root = prepare_in(project)
    # A Hub model id, and the Hub stand-in's address where nothing listens: unreachable, so the
    # stage switches the Hub clients offline and then fails on the empty cache, in one line.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"] |= {"name": "openai-community/gpt2", "revision": "main"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with warm_server(os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}) as address:
        env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
        proc = subprocess.run([sys.executable, "-m", "stages.prepare", *PREPARE_ARGS], cwd=root, env=env,
                              capture_output=True, text=True)
        assert _gone(_worker(address, "prepare"))
        assert "stages.prepare: started cold, for offline mode" in proc.stderr, proc.stderr[-2000:]
        assert proc.returncode == 1 and proc.stderr.count("prepare: error:") == 1, proc.stderr[-2000:]
        project()
        asker = subprocess.Popen([sys.executable, "-m", "stages.train_full", *train_args("full")], cwd=root, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.kill(_worker(address, "train_full"), signal.SIGKILL)
        assert asker.wait(30) == -signal.SIGKILL
