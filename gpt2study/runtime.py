"""What the training runs on: precision choice, device name, peak memory, FLOPs and versions."""

from __future__ import annotations

import os
import platform
import resource

import torch


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
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_FLOPS[key]
    return None


def flops_per_token(model_config, n_params: int, block_size: int, full: bool) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T (PaLM's convention); a frozen base needs no weight
    gradients, so LoRA counts 4N."""
    return (6 if full else 4) * n_params + 12 * model_config.n_layer * model_config.n_embd * block_size


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
    import accelerate
    import peft
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


def eval_device() -> torch.device:
    """Where evaluation and generation run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
