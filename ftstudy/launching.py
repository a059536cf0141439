"""How the training stages start, and how many CPU threads a stage uses. Imports neither torch nor
accelerate, which would cost seconds per stage.

dvc.yaml runs `$(python -m ftstudy.launching) -m stages.train_...`; this module prints the
launcher:
- `accelerate launch`, bare, when the user has an Accelerate config of their own (`accelerate
  config`): that config applies unchanged;
- `accelerate launch` with the values accelerate would otherwise fill in with a seven-line warning
  (one process per GPU, several GPUs as multi-GPU), when there are several GPUs;
- plain `python` for one process on one GPU or a CPU: Accelerate runs the same loop without the
  launcher, which would start a second interpreter and import torch twice (seconds per stage);
- in the batch script of a Slurm allocation of several nodes (`sbatch --nodes 2`,
  docs/several-gpus.md; not inside an srun step, such as a Dask worker's): `srun`,
  one task a node, each running `python -m ftstudy.launching node`, which starts Accelerate's own
  multi-node launch with that node's values from Slurm's environment: the number of machines
  (SLURM_JOB_NUM_NODES), this machine's rank (SLURM_NODEID), the main address (the allocation's
  first host) and port (MASTER_PORT, else 29500); one process per GPU of the node, one on a
  CPU-only node. A user's Accelerate config still applies there (FSDP, precision): the launch gives
  only the machine's own values. Only global rank 0 writes outputs (Accelerate's main process), so
  the nodes need the repo on a shared file system, as Slurm clusters have.

CPU threads (`cpu_threads`, train.cpu_threads for the training stages): a number given there; else
the user's OMP_NUM_THREADS when set (as `accelerate launch` sets it from
--num_cpu_threads_per_process); else (auto) the cores this process may use: its affinity, at most
its cgroup's CPU quota (a container's --cpus). Never their load: the thread count changes the last
bits of trained weights, so a count chosen by the load would make the same params give different
models on a busy machine and a quiet one (docs/reproducibility.md, "Determinism"). Workers sharing
a machine each get their own count from their affinity (taskset, a scheduler's CPU binding).
`by-load` opts into leaving out the cores other processes keep busy, measured while the stage
imported transformers and loaded its model (its own CPU time left out, so the measurement costs
nothing): a CPU-bound neighbour costs a two-thread run on two cores far more than the core it
takes, since OpenMP's threads wait on each other at every parallel region (docs/performance.md,
"Busy machines"), but the result then depends on the load. Precision is not decided here but by
train.precision (ftstudy.runtime.resolve_precision).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path


def affinity_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, as a container or taskset sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", membership: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup, in cores (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us
    over cpu.cfs_period_us, as a container's --cpus sets them); None when there is none."""
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            candidates = [(Path(root) / path.lstrip("/") / "cpu.max", None)]
        elif "cpu" in controllers.split(","):
            base = next((Path(root) / d for d in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (Path(root) / d).is_dir()), None)
            if base is None:
                continue
            folder = base / path.lstrip("/")
            candidates = [(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")]
        else:
            continue
        for quota_file, period_file in candidates:
            try:
                if period_file is None:
                    quota, period = quota_file.read_text().split()[:2]
                else:
                    quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            except (OSError, ValueError):
                continue
            if quota not in ("max", "-1") and int(period) > 0:
                return int(quota) / int(period)
    return None


def usable_cores() -> int:
    """How many cores this process can keep busy: its affinity cores, at most its cgroup quota."""
    limit = cgroup_cpu_limit()
    cores = len(affinity_cores())
    return cores if limit is None else max(1, min(cores, math.floor(limit)))


def _cpu_times(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies since boot of the cores `cpus`, from /proc/stat's per-core lines; None
    elsewhere."""
    wanted, busy, total = {f"cpu{c}" for c in cpus}, 0, 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *values = line.split()
                if name not in wanted:
                    continue
                fields = [int(v) for v in values]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
                core_total = sum(fields[:8])  # guest time is already counted in user time
                busy, total = busy + core_total - idle, total + core_total
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's ticks per second


def load_sample() -> tuple[float, float] | None:
    """(busy, total) CPU seconds since boot of the cores this process may run on, from /proc/stat,
    with this process's own CPU seconds left out of busy; None where there is no /proc/stat."""
    times = _cpu_times(affinity_cores())
    if times is None:
        return None
    own = os.times()
    return times[0] / _HZ - own.user - own.system, times[1] / _HZ


# by-load: the load is measured from when a stage imports this module (after torch, which ftstudy.runtime
# imports first) to when it sets its threads, after loading its model: that work makes the window
# (its own CPU time left out), so the measurement costs the stage nothing.
_IMPORTED = load_sample()


def busy_cores(since: tuple[float, float] | None = None, window_s: float = 0.15) -> float:
    """How many of this process's cores (its affinity) other processes keep busy, measured from
    `since` (default: when this module was imported) to now, sleeping until the window is at
    least `window_s`; the 1-minute load average where there is no /proc/stat."""
    before = since or _IMPORTED
    if before is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = len(affinity_cores())
    after = load_sample()
    if (short := window_s - (after[1] - before[1]) / cores) > 0:
        time.sleep(short)
        after = load_sample()
    total = after[1] - before[1]
    return max(0.0, after[0] - before[0]) / total * cores if total > 0 else 0.0


def cpu_threads(policy: str | int = "auto") -> int:
    """Threads for a stage's CPU work under `policy` (train.cpu_threads): a number is taken as it
    is; else OMP_NUM_THREADS if the user (or accelerate launch) set it; else, for auto, the usable
    cores (affinity, cgroup quota) whatever their load; for by-load, the affinity cores less each
    of them that other processes keep at least 3/4 busy, at most the quota, at least one."""
    if isinstance(policy, int):
        return policy
    if (given := os.environ.get("OMP_NUM_THREADS", "").strip()).isdigit() and int(given) > 0:
        return int(given)
    if policy == "auto":
        return usable_cores()
    free = len(affinity_cores()) - math.floor(busy_cores() + 0.25)
    limit = cgroup_cpu_limit()
    return max(1, free if limit is None else min(free, math.floor(limit)))


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
        raise SystemExit(f"ftstudy.launching node: {', '.join(missing)} not set; it runs under srun inside a Slurm "
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
                "python", "-m", "ftstudy.launching", "node"]
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
