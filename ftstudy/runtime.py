"""What the training runs on: precision choice, device name, peak memory, FLOPs and versions."""

from __future__ import annotations

import os
import platform
import resource

import torch

from ftstudy.cores import cpu_threads


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


def base_dtype(requested: str, method: str) -> str:
    """model.dtype -> the dtype the base's weights load in for `method` (full, lora): auto keeps
    fp32 master weights for full fine-tuning and loads LoRA's frozen base in bf16 on a GPU that
    has it (fp32 elsewhere: a CPU without bf16 matrix units computes bf16 slower than fp32)."""
    from ftstudy.config import ConfigError

    if requested == "auto":
        return "bf16" if method == "lora" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype: fp16 needs a CUDA GPU (a CPU computes fp16 matmuls slowly, if at all); use "
                          "bf16 or fp32")
    return requested


# Dense bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets (no sparsity), by the
# name CUDA reports (torch.cuda.get_device_name), matched as whole words in this order: variants
# with their own peak (H100 PCIe, H100 NVL, L40S) before the plain name, and a word never matches a
# longer one (L4 is not L40, A10 not A100 or A10G, H200 not GH200).
PEAK_FLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756e12),      # H100 PCIe
    (r"\bH100\b.*\bNVL\b", 835e12),       # H100 NVL
    (r"\bH100\b", 989e12),                # H100 SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835e12),       # H200 NVL
    (r"\bH200\b", 989e12),                # H200 SXM
    (r"\bGH200\b", 989e12),
    (r"\bA100\b", 312e12),                # A100 40 GB and 80 GB, SXM and PCIe alike
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10G\b", 70e12),
    (r"\bA10\b", 125e12),
    (r"\bRTX 4090\b", 165e12),
    (r"\bV100\b", 125e12),
    (r"\bT4\b", 65e12),
)


def peak_flops(device_name: str) -> float | None:
    """A listed GPU's dense bf16 peak, from its name; None for any other device (a CPU, or a GPU
    not in the table, whose MFU is then taken against a measured matmul peak)."""
    import re

    return next((peak for pattern, peak in PEAK_FLOPS if re.search(pattern, device_name)), None)


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


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters a token's compute passes through: every parameter but the
    embedding tables (a lookup, no matmul), plus the output projection where it is tied to the
    input embedding (GPT-2's: counted once, as the head)."""
    embedding = {id(q) for m in model.modules() if isinstance(m, torch.nn.Embedding) for q in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = [] if head is None else [q for q in head.parameters() if id(q) in embedding]
    counted = [q for q in model.parameters() if id(q) not in embedding] + head_params
    return sum(q.numel() for q in counted), sum(q.numel() for q in counted if q.requires_grad)


def flops_per_token(model_config, n_matmul: int, n_trainable: int, block_size: int) -> float:
    """Training FLOPs per token: 2N forward and 2N backward through the activations for all N
    matmul parameters (ftstudy.runtime.matmul_params), 2N' more for the weight gradients of the
    N' trainable ones, and 12·L·d·T for attention (PaLM's convention): 6N + 12·L·d·T for full
    fine-tuning, about 4N for LoRA's frozen base. L and d are read by their generic names, which
    every transformers config answers (GPT-2's n_layer and n_embd included)."""
    attention = 12 * model_config.num_hidden_layers * model_config.hidden_size * block_size
    return 4 * n_matmul + 2 * n_trainable + attention


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
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def library_versions() -> dict:
    """Installed versions of what a result depends on, read from package metadata (importing peft
    only to ask would cost a training stage that never uses it about 1.5 s); None for one not
    installed (bitsandbytes is needed only for lora.quantize)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            **{name: installed(name) for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets")},
            "python": platform.python_version()}


def use_cpu_threads(device: torch.device, policy: str | int = "auto") -> None:
    """On a CPU, run torch's parallel work on ftstudy.cores.cpu_threads(policy) threads:
    train.cpu_threads for training, by default the cores this process may use, whatever their load."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(policy))


def to_eval_device(model: torch.nn.Module, policy: str | int) -> tuple[torch.nn.Module, torch.device]:
    """A loaded model moved to where evaluation and generation run: the GPU when there is one, else
    the CPU with the threads train.cpu_threads (`policy`) gives training too: one setting governs
    every stage that runs a model, so `by-load` or 1 beside other work reaches scoring as well."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cpu_threads(device, policy)
    return model.to(device), device
