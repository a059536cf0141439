"""How many CPU threads a stage uses. Imports neither torch nor accelerate, which would cost
seconds per stage.

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

