"""What the training runs on: precision choice, device name, peak memory, FLOPs and versions."""

from __future__ import annotations

import os
import platform
import resource

import torch

from ftstudy.launching import cpu_threads


def resolve_precision(requested: str) -> str:
    """params precision -> Accelerate's mixed_precision ('no', 'fp16', 'bf16').

    auto keeps a precision chosen in the user's `accelerate config`, else picks by hardware."""
    if requested != "auto":
        return {"fp32": "no"}.get(requested, requested)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no":
        return launched
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# Dense bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device_name: str) -> float | None:
    """A listed GPU's dense bf16 peak, from its name; None for any other device."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_FLOPS[key]
    return None


def measured_peak_flops(device: torch.device, size: int = 1024, seconds: float = 0.2) -> float:
    """What this device's matmuls reach right now, in FLOP/s: square fp32 matmuls (bf16 on a GPU)
    repeated for about `seconds`, the best of them kept. The MFU of a device without a listed peak
    (a CPU) is taken against this: a utilization of what the threads the run had could do."""
    import time

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        (a @ a).sum().item()  # .item() waits for the device
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def flops_per_token(model_config, n_params: int, block_size: int, full: bool) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T (PaLM's convention); a frozen base needs no weight
    gradients, so LoRA counts 4N. L and d are read by their generic names, which every
    transformers config answers (GPT-2's n_layer and n_embd included)."""
    return (6 if full else 4) * n_params + 12 * model_config.num_hidden_layers * model_config.hidden_size * block_size


def peak_memory(device: torch.device) -> dict:
    """The GPU's peak allocation and reservation on CUDA, else the process's peak RSS (GiB)."""
    if device.type == "cuda":
        return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 4),
                "peak_mem_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 4),
                "peak_mem_kind": "cuda_max_allocated"}
    return {"peak_mem_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 4),
            "peak_mem_kind": "cpu_peak_rss"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def library_versions() -> dict:
    """Installed versions, read from package metadata: importing peft only to ask would cost a
    training stage that never uses it about 1.5 s."""
    from importlib.metadata import version

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            **{name: version(name) for name in ("transformers", "peft", "accelerate")},
            "python": platform.python_version()}


def use_cpu_threads(device: torch.device) -> None:
    """On a CPU, run torch's parallel work on ftstudy.launching.cpu_threads() threads: the
    user's OMP_NUM_THREADS, else the cores other processes leave idle."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())


def to_eval_device(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.device]:
    """A loaded model moved to where evaluation and generation run: the GPU when there is one, else
    the CPU with the threads use_cpu_threads chooses (after loading, so that the machine's load is
    measured over the loading)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cpu_threads(device)
    return model.to(device), device
