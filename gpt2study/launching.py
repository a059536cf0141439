"""The `accelerate launch` options for the training stages: python -m gpt2study.launching

dvc.yaml runs `accelerate launch $(python -m gpt2study.launching) -m stages.train_...`. With an
Accelerate config of the user's own (`accelerate config`), this prints nothing and that config
applies unchanged. Without one, it prints the values accelerate would otherwise fill in with a
seven-line warning, chosen as accelerate would (one process per GPU, several GPUs as multi-GPU),
except CPU threads: accelerate gives a CPU process one thread unless OMP_NUM_THREADS says
otherwise, so on a machine without a GPU the process gets every core this process may use.
Precision is not decided here but by train.precision (gpt2study.runtime.resolve_precision).
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or taskset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def user_config_file() -> Path | None:
    """The user's Accelerate config, where `accelerate config` writes it (accelerate's own lookup:
    $HF_HOME/accelerate, else $XDG_CACHE_HOME/huggingface/accelerate, else ~/.cache/...), or None.
    Found without importing accelerate or torch, which would cost seconds per stage."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    folder = Path(os.path.expanduser(home)) / "accelerate"
    return next((f for f in (folder / "default_config.yaml", folder / "default_config.json") if f.is_file()), None)


def gpu_count() -> int:
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def launch_args() -> list[str]:
    if user_config_file() is not None:
        return []
    gpus = gpu_count()
    args = ["--num_processes", str(max(gpus, 1)), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]
    if gpus > 1:
        args.append("--multi_gpu")
    if gpus == 0:
        args += ["--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS") or str(usable_cores())]
    return args


if __name__ == "__main__":
    print(" ".join(launch_args()))
