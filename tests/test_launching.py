"""How the training stages start and how many CPU threads a stage takes: the user's choices win
(an Accelerate config, OMP_NUM_THREADS, train.cpu_threads), else one plain process on the usable cores."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from ftstudy import cores
from ftstudy.train import launching


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


def test_several_slurm_nodes_start_one_accelerate_launch_per_node_from_slurms_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    assert launching.launcher() == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                                    "python", "-m", "ftstudy.train.launching", "node"]
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # already inside an srun step (a Dask worker's): no srun within it
    assert launching.launcher()[0] != "srun"
    monkeypatch.delenv("SLURM_STEP_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.delenv("SLURM_NODEID", raising=False)
    with pytest.raises(SystemExit, match="SLURM_NODEID not set; it runs under srun inside a Slurm allocation"):
        launching.node_launch()
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert launching.node_launch() == ["accelerate", "launch", "--num_machines", "2", "--machine_rank", "1",
                                       "--main_process_ip", "gpu07", "--main_process_port", "29500",
                                       "--num_processes", "16", "--mixed_precision", "no", "--dynamo_backend", "no",
                                       "--multi_gpu"]
    # A user's Accelerate config (FSDP, precision) applies; the launch adds only this machine's values.
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "default_config.yaml").write_text("distributed_type: FSDP\n")
    monkeypatch.setenv("MASTER_PORT", "31000")
    assert launching.node_launch()[-4:] == ["--main_process_port", "31000", "--num_processes", "16"]
    # A config that leaves the distributed type at NO would start each node's stage alone: multi-node is asked for.
    (tmp_path / "accelerate" / "default_config.yaml").write_text("mixed_precision: bf16\n")
    assert launching.node_launch()[-3:] == ["--num_processes", "16", "--multi_gpu"]
    assert [launching.first_host(n) for n in ("gpu[03-05,9]-ib,login1", "a1,a2", "127.0.0.1")] == ["gpu03-ib", "a1", "127.0.0.1"]


def test_cpu_threads_by_default_ignore_the_load_and_by_load_leaves_busy_cores(monkeypatch):
    """auto: the usable cores, however busy (the thread count changes the trained bytes); by-load, an
    opt-in: the cores others leave idle; a number, or the user's OMP_NUM_THREADS, wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "affinity_cores", lambda: [0, 1])
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: None)
    for busy, threads in ((0.0, 2), (0.7, 2), (0.8, 1), (1.0, 1), (1.6, 1), (5.0, 1)):
        monkeypatch.setattr(cores, "busy_cores", lambda busy=busy: busy)
        assert cores.cpu_threads("by-load") == threads, busy
        assert cores.cpu_threads() == cores.cpu_threads("auto") == 2, busy
    assert cores.cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores.cpu_threads() == cores.cpu_threads("by-load") == 3
    assert cores.cpu_threads(1) == 1


def test_a_cgroup_quota_caps_the_threads_and_the_load_counts_only_our_cores(monkeypatch):
    # A container on a 64-core host, allowed 2.5 cores: 30 busy host cores take none of its quota.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "affinity_cores", lambda: list(range(64)))
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: 2.5)
    monkeypatch.setattr(cores, "busy_cores", lambda: 30.0)
    assert cores.cpu_threads() == 2 and cores.usable_cores() == 2
    assert cores.cpu_threads("by-load") == 2
    monkeypatch.setattr(cores, "busy_cores", lambda: 63.0)
    assert cores.cpu_threads("by-load") == 1 and cores.cpu_threads() == 2


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_cgroup_quota_is_read_from_either_hierarchy(tmp_path, version):
    membership = tmp_path / "cgroup"
    if version == "v2":
        membership.write_text("0::/docker/abc\n")
        (tmp_path / "docker/abc").mkdir(parents=True)
        (tmp_path / "docker/abc/cpu.max").write_text("250000 100000\n")
    else:
        membership.write_text("4:memory:/x\n1:cpu,cpuacct:/docker/abc\n")
        folder = tmp_path / "cpu,cpuacct/docker/abc"
        folder.mkdir(parents=True)
        (folder / "cpu.cfs_quota_us").write_text("150000\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.cgroup_cpu_limit(tmp_path, membership) == (2.5 if version == "v2" else 1.5)
    if version == "v2":  # no quota: "max"
        (tmp_path / "docker/abc/cpu.max").write_text("max 100000\n")
        assert cores.cgroup_cpu_limit(tmp_path, membership) is None
    assert cores.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


@pytest.mark.serial  # measures the machine's load: another test beside it would count
def test_a_busy_neighbour_is_measured_and_the_stages_own_work_is_not():
    import time

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        since = cores.load_sample()
        deadline = time.perf_counter() + 0.4
        while time.perf_counter() < deadline:  # this process busy too, as a stage is while it imports
            pass
        busy = cores.busy_cores(since)
        # At least the neighbour's core (more if others run), and not this process's own.
        assert 0.7 <= busy <= (os.cpu_count() or 1) - 0.5, busy
    finally:
        hog.kill()


@pytest.mark.parametrize("stage", ["check_params", "compare", "report"])
def test_light_stages_import_no_torch(stage):
    code = f"import sys, stages.{stage}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
