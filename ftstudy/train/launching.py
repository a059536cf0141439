"""How the training stages start. Imports neither torch nor accelerate, which would cost seconds
per stage.

dvc.yaml runs `$(python -m ftstudy.train.launching) -m stages.train_...`; this module prints the
launcher:
- `accelerate launch`, bare, when the user has an Accelerate config of their own (`accelerate
  config`): that config applies unchanged;
- `accelerate launch` with the values accelerate would otherwise fill in with a seven-line warning
  (one process per GPU, several GPUs as multi-GPU), when there are several GPUs;
- plain `python` for one process on one GPU or a CPU: Accelerate runs the same loop without the
  launcher, which would start a second interpreter and import torch twice (seconds per stage);
- in the batch script of a Slurm allocation of several nodes (`sbatch --nodes 2`,
  docs/several-gpus.md; not inside an srun step, such as a Dask worker's): `srun`,
  one task a node, each running `python -m ftstudy.train.launching node`, which starts Accelerate's own
  multi-node launch with that node's values from Slurm's environment: the number of machines
  (SLURM_JOB_NUM_NODES), this machine's rank (SLURM_NODEID), the main address (the allocation's
  first host) and port (MASTER_PORT, else 29500); one process per GPU of the node, one on a
  CPU-only node. A user's Accelerate config still applies there (FSDP, precision): the launch gives
  only the machine's own values. Only global rank 0 writes outputs (Accelerate's main process), so
  the nodes need the repo on a shared file system, as Slurm clusters have.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def fsdp_asked() -> bool:
    """Whether the launch asked for FSDP: `accelerate launch --use_fsdp`, or a user's Accelerate
    config with distributed_type FSDP, which accelerate launch turns into ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def require_asked_distribution(accelerator) -> None:
    """Stop, in one line, when FSDP was asked for and Accelerate runs something else: it enables FSDP
    on GPUs only, and otherwise runs DDP or independent single processes without a word."""
    from ftstudy.config import ConfigError

    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if fsdp_asked() and kind != "FSDP":
        raise ConfigError(f"FSDP was asked for (ACCELERATE_USE_FSDP), but Accelerate runs {kind} on "
                          f"{accelerator.device.type} with {accelerator.num_processes} "
                          f"process{'' if accelerator.num_processes == 1 else 'es'}: it enables FSDP only on GPUs; "
                          "launch on GPUs, or drop --use_fsdp (distributed_type: FSDP) from the Accelerate config")


def user_config_file() -> Path | None:
    """The user's Accelerate config, where `accelerate config` writes it (accelerate's own lookup:
    $HF_HOME/accelerate, else $XDG_CACHE_HOME/huggingface/accelerate, else ~/.cache/...), or None."""
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


def slurm_nodes() -> int:
    """The nodes of the Slurm allocation this runs in (1 outside Slurm)."""
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list in its compressed form (`gpu[03-05,9]-ib,login1` ->
    gpu03-ib), as `scontrol show hostnames` would list it first."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    prefix, ranges, suffix = head.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix if ranges else prefix


def _config_runs_one_process_per_machine(config: Path) -> bool:
    """Whether the user's Accelerate config leaves the distributed type out or at NO: `accelerate
    launch` would then start each machine's stage alone, not as one multi-node run."""
    import json

    import yaml

    text = config.read_text(encoding="utf-8")
    values = json.loads(text) if config.suffix == ".json" else yaml.safe_load(text)
    return str((values or {}).get("distributed_type", "NO")).upper() == "NO"


def node_launch() -> list[str]:
    """This node's `accelerate launch` in a multi-node Slurm run (the command `srun` starts once a
    node), from Slurm's environment; a user's Accelerate config supplies everything else."""
    nodes, env = slurm_nodes(), os.environ
    missing = [k for k in ("SLURM_NODEID", "SLURM_JOB_NODELIST") if not env.get(k)]
    if missing:
        raise SystemExit(f"ftstudy.train.launching node: {', '.join(missing)} not set; it runs under srun inside a Slurm "
                         "allocation (docs/several-gpus.md)")
    per_node = max(1, gpu_count())
    cmd = ["accelerate", "launch", "--num_machines", str(nodes), "--machine_rank", env["SLURM_NODEID"],
           "--main_process_ip", first_host(env["SLURM_JOB_NODELIST"]),
           "--main_process_port", env.get("MASTER_PORT") or "29500", "--num_processes", str(nodes * per_node)]
    config = user_config_file()
    if config is None:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if config is None or _config_runs_one_process_per_machine(config):
        cmd.append("--multi_gpu")  # Accelerate's multi-node path (torchrun); on CPUs too, with gloo
    return cmd


def launcher() -> list[str]:
    """The command that starts a training stage (followed by `-m stages.train_<method> ...`)."""
    if slurm_nodes() > 1 and "SLURM_STEP_ID" not in os.environ:  # the batch script, not inside an srun step already
        return ["srun", "--nodes", str(slurm_nodes()), "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                "python", "-m", "ftstudy.train.launching", "node"]
    if user_config_file() is not None:
        return ["accelerate", "launch"]
    gpus = gpu_count()
    if gpus <= 1:
        return ["python"]
    return ["accelerate", "launch", "--num_processes", str(gpus), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--multi_gpu"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"]:  # srun's task on each node: exec this node's launch, the stage after it
        command = node_launch() + sys.argv[2:]
        os.execvp(command[0], command)
    print(" ".join(launcher()))
