"""The accelerate launch options the training stages get: none with a user's own Accelerate
config, explicit defaults (and every usable core on a CPU) without one."""

from gpt2study import launching


def test_a_users_accelerate_config_applies_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "default_config.yaml").write_text("num_processes: 4\n")
    assert launching.launch_args() == []


def test_without_a_config_the_defaults_are_explicit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launching.launch_args() == ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                       "--dynamo_backend", "no", "--num_cpu_threads_per_process",
                                       str(launching.usable_cores())]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own thread count wins
    assert launching.launch_args()[-1] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launching.launch_args() == ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                       "--dynamo_backend", "no", "--multi_gpu"]
