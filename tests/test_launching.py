"""How the training stages start and how many CPU threads a stage takes: the user's choices win
(an Accelerate config, OMP_NUM_THREADS), else one plain process with the cores others leave idle."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from ftstudy import launching


def test_a_users_accelerate_config_applies_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "default_config.yaml").write_text("num_processes: 4\n")
    assert launching.launcher() == ["accelerate", "launch"]


def test_without_a_config_one_process_runs_plain_python_and_several_gpus_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for visible in ("", "0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert launching.launcher() == ["python"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launching.launcher() == ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1",
                                    "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]


def test_cpu_threads_leave_the_busy_cores_and_the_users_count_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launching, "usable_cores", lambda: 2)
    for busy, threads in ((0.0, 2), (0.7, 2), (0.8, 1), (1.0, 1), (1.6, 1), (5.0, 1)):
        monkeypatch.setattr(launching, "busy_cores", lambda busy=busy: busy)
        assert launching.cpu_threads() == threads, busy
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launching.cpu_threads() == 3


def test_a_busy_neighbour_is_measured_and_the_stages_own_work_is_not():
    import time

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        since = launching.load_sample()
        deadline = time.perf_counter() + 0.4
        while time.perf_counter() < deadline:  # this process busy too, as a stage is while it imports
            pass
        busy = launching.busy_cores(since)
        # At least the neighbour's core (more if others run), and not this process's own.
        assert 0.7 <= busy <= (os.cpu_count() or 1) - 0.5, busy
    finally:
        hog.kill()


@pytest.mark.parametrize("stage", ["check_params", "compare", "report"])
def test_light_stages_import_no_torch(stage):
    code = f"import sys, stages.{stage}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
