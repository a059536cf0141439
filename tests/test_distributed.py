"""Several processes through Accelerate: 2 CPU processes (gloo) match 1 process at the same global
batch, under DDP and under FSDP2 (full and LoRA; tests/fsdp_on_cpu.py switches Accelerate's
distributed type to FSDP on CPU, which Accelerate itself does only on GPUs), and 2 simulated nodes
on 127.0.0.1 (machine ranks 0 and 1 through ftstudy.train.launching's Slurm path) match 1 process too.
Dropout is switched
off in the snapshot so the runs differ only by reduction order. When FSDP is asked for and
Accelerate runs anything else, the stage stops in one line."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, no_dropout, once, params_writer, prepare_at, prepare_in, process_group, train_args
from ftstudy.outputs import read_json

# One pytest-xdist worker runs this file: its launches use fixed ports on 127.0.0.1.
pytestmark = pytest.mark.xdist_group("distributed")


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def launch_within(cmd: list[str], cwd, env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run a launch in a session of its own: its exit code and stderr. If it outlives `timeout`,
    every process of its tree prints its threads' Python stacks (faulthandler, on SIGABRT), the
    tree is killed, and the test fails with those stacks: where a hang was."""
    import signal

    import psutil

    proc = subprocess.Popen(cmd, cwd=cwd, env=env | {"PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        pass
    # The launcher's tree and whatever else is left in its session, as psutil handles (which check
    # that a pid is still the same process before they signal it).
    tree = [other for other in psutil.process_iter() if process_group(other.pid) == proc.pid]
    try:
        tree += psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass

    def signal_all(sig) -> None:
        for other in tree:
            try:
                other.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    signal_all(signal.SIGABRT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out, err = "", "(no stacks: its streams stayed open 30 s after SIGABRT)"
    signal_all(signal.SIGKILL)
    proc.wait()
    pytest.fail(f"{' '.join(cmd[2:5])} ... outlived {timeout:.0f} s; its processes' stacks:\n{err[-12000:]}"
                f"\nstdout:\n{out[-2000:]}")


def train(root, processes: int, batch_size: int, tag: str, method: str = "full", fsdp: bool = False,
          port: int = 29517) -> tuple[dict, list[float]]:
    params_writer(root)(**{"train.epochs": 1, "train.batch_size": batch_size, "lora.dropout": 0.0})
    launch = ["--num_processes", "1"] if processes == 1 else ["--multi_gpu", "--num_processes", str(processes)]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = ["-m", f"stages.train_{method}"]
    if fsdp:
        env |= FSDP_ENV
        script = [str(ROOT / "tests" / "fsdp_on_cpu.py"), f"stages.train_{method}"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(port), *script,
           *train_args(tag)]
    code, err = launch_within(cmd, root, env)
    assert code == 0, err[-3000:]
    curve = [float(line.split(",")[1]) for line in (root / f"m/plots/{tag}/train_loss.csv").read_text().splitlines()[1:]]
    return read_json(root / f"m/{tag}.json")[method] | read_json(root / f"m/{tag}.info.json"), curve


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The demo data prepared once (dropout off in the snapshot), and one process's training of each
    method at global batch 8: the reference every multi-process run below is checked against.
    Returns (its folder, method -> (metrics, loss curve)); its models are models/one-<method>."""
    return once("distributed-single", lambda: train_single(tmp_path_factory.mktemp("single")))


def train_single(root):
    prepare_at(root)
    no_dropout(root / "pre")
    return root, {m: train(root, 1, 8, f"one-{m}", m) for m in ("full", "lora")}


def beside(single, tmp_path):
    """A folder of the test's own holding the reference's data and models (linked, not copied)."""
    root, refs = single
    for name in ("prep", "pre"):
        (tmp_path / name).symlink_to(root / name)
    (tmp_path / "models").mkdir()
    for m in refs:
        (tmp_path / "models" / f"one-{m}").symlink_to(root / "models" / f"one-{m}")
    return tmp_path, refs


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(single, tmp_path):
    root, refs = beside(single, tmp_path)
    one, curve_one = refs["full"]
    two, curve_two = train(root, 2, 4, "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["global_batch"] == two["global_batch"] == 8 and one["steps"] == two["steps"]
    assert curve_two == pytest.approx(curve_one, rel=2e-3)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=2e-3)
    assert curve_one[-1] < curve_one[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_fsdp_processes_match_one_at_the_same_global_batch(single, tmp_path, method):
    """FSDP2 shards the weights over 2 processes; the chunked loss runs inside the root module's
    forward, validation and the checks score through it, and the full state dict is gathered to
    save: the same curve and the same saved model as one process."""
    root, refs = beside(single, tmp_path)
    one, curve_one = refs[method]
    two, curve_two = train(root, 2, 4, "two", method, fsdp=True, port=29519)
    assert two["processes"] == 2 and one["global_batch"] == two["global_batch"] == 8
    assert curve_two == pytest.approx(curve_one, rel=2e-3)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=2e-3)
    if method == "lora":
        assert two["reload_max_abs_diff"] <= two["check_tolerance"] and two["merge_max_abs_diff"] <= two["check_tolerance"]
        saved = [json.loads((root / f"models/{t}/adapter_config.json").read_text())["r"] for t in (f"one-{method}", "two")]
        assert saved == [8, 8]
    saved_models_agree(root, f"one-{method}", "two")


def saved_models_agree(root, a: str, b: str) -> None:
    import torch

    from ftstudy import modeling

    models = [modeling.load_for_eval(root / f"models/{t}", root / "pre", str(ROOT / "assets/tiny-gpt2")) for t in (a, b)]
    batch = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        logits = [m(input_ids=batch).logits for m in models]
    assert torch.allclose(logits[0], logits[1], atol=5e-3, rtol=1e-3)
    assert sorted(p.name for p in (root / f"models/{b}").iterdir()) == sorted(p.name for p in (root / f"models/{a}").iterdir())


def train_on_two_nodes(root, tag: str, method: str, port: int) -> tuple[dict, list[float]]:
    """Two Accelerate launches as `srun` starts them on two nodes of a Slurm allocation (machine
    ranks 0 and 1, one CPU process each, gloo on the loopback), both in `root` as on a shared file
    system; each is stopped by its process group if it outlives the test's wait."""
    import signal
    import time

    params_writer(root)(**{"train.epochs": 1, "train.batch_size": 4, "lora.dropout": 0.0})
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
                        "GLOO_SOCKET_IFNAME": "lo", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
                        "MASTER_PORT": str(port)}
    cmd = [sys.executable, "-m", "ftstudy.train.launching", "node", "-m", f"stages.train_{method}", *train_args(tag)]
    logs = [root / f"node{rank}.log" for rank in (0, 1)]
    nodes = [subprocess.Popen(cmd, cwd=root, env=env | {"SLURM_NODEID": str(rank)}, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True) for rank, log in zip((0, 1), logs)]
    try:
        deadline = time.monotonic() + 600
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    curve = [float(line.split(",")[1]) for line in (root / f"m/plots/{tag}/train_loss.csv").read_text().splitlines()[1:]]
    return read_json(root / f"m/{tag}.json")[method] | read_json(root / f"m/{tag}.info.json"), curve


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_nodes_match_one_process_at_the_same_global_batch(single, tmp_path, method):
    """Multi-node training through ftstudy.train.launching's Slurm path: `python -m ftstudy.train.launching node`
    on each of two simulated nodes starts Accelerate's multi-node launch (num_machines 2, machine
    rank from SLURM_NODEID, main address from SLURM_JOB_NODELIST): the same curve and saved model as
    one process, within the DDP test's tolerance."""
    root, refs = beside(single, tmp_path)
    one, curve_one = refs[method]
    two, curve_two = train_on_two_nodes(root, "two", method, port=29522)
    assert two["processes"] == 2 and one["global_batch"] == two["global_batch"] == 8 and one["steps"] == two["steps"]
    assert curve_two == pytest.approx(curve_one, rel=2e-3)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=2e-3)
    saved_models_agree(root, f"one-{method}", "two")


def test_fsdp_asked_for_but_not_given_stops_in_one_line(project, monkeypatch):
    """On a CPU, Accelerate runs no FSDP whatever was asked: the stage says so instead of training
    on something else."""
    from conftest import run_main
    from ftstudy.config import ConfigError
    from stages import train_full

    prepare_in(project, **{"train.epochs": 1})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"^FSDP was asked for \(ACCELERATE_USE_FSDP\), but Accelerate runs NO on cpu "
                                          r"with 1 process: it enables FSDP only on GPUs"):
        run_main(train_full, *train_args("full"))
