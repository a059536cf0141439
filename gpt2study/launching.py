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


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or taskset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launch_args(config_file: str | None = None) -> list[str]:
    from accelerate.commands.config.config_args import default_config_file

    if os.path.isfile(config_file or default_config_file):
        return []
    import torch

    gpus = torch.cuda.device_count()
    args = ["--num_processes", str(max(gpus, 1)), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]
    if gpus > 1:
        args.append("--multi_gpu")
    if gpus == 0:
        args += ["--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS") or str(usable_cores())]
    return args


if __name__ == "__main__":
    print(" ".join(launch_args()))
