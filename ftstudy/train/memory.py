"""The memory a training stage will need, planned before any weight loads, from the model's
weightless skeleton and the params: weights, gradients, optimizer state, the activations the
backward pass keeps, the loss's logits, the LoRA integrity check's copies, and the process's own.

Activations follow Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
Transformer Models"): per layer and micro-batch of b sequences of s tokens with width h and a
heads, 34·s·b·h bytes at 16 bits, plus 5·a·s²·b where attention keeps its probabilities (on a
CPU under attention dropout, whose fused kernels do not take dropout; GPU kernels and CPU ones
without dropout keep none), doubled for fp32; with gradient checkpointing each layer keeps its
input alone (2·s·b·h) and one layer is recomputed at a time. It is an estimate: tests compare it
with measured peaks at GPT-2's real shapes (TOLERANCE). The training stages print and record the
plan, and refuse, before loading weights, a plan that exceeds the GPU's memory, with the ways out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GiB = 2**30
TOLERANCE = 0.25  # |plan - measured peak| / measured, at the real-shape tier (tests/test_real_shapes.py)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 4 / 64  # 4 bits a weight and an fp32 absmax per 64-weight block
PROCESS = {"cpu": 0.45 * GiB, "cuda": 0.0}  # the interpreter with torch and transformers (CPU RSS); CUDA peaks count tensors only
CHUNK_LOGITS = 2**25  # as ftstudy.loss: logits a chunk of the chunked loss holds


@dataclass(frozen=True)
class Plan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    check: float        # LoRA's integrity check: a fresh base and a merged copy, after training
    process: float
    device: str = "cuda"

    @property
    def total(self) -> float:
        """The peak: on a GPU the check reuses what training freed (PyTorch's caching allocator); on
        a CPU the process's resident memory keeps the training's pages, and the check comes on top."""
        training = self.gradients + self.optimizer + self.activations + self.logits
        after = training + self.check if self.device == "cpu" else max(training, self.check)
        return self.weights + after + self.process

    def parts(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "device"}

    def line(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.parts().items() if value)
        return (f"{self.total / GiB:.2f} GiB ({parts} GiB; an estimate, within ±{TOLERANCE:.0%} of the measured "
                "peaks at GPT-2 124M's shapes)")


def _sizes(skeleton) -> dict:
    import torch
    from transformers.pytorch_utils import Conv1D

    config = skeleton.config
    head = skeleton.get_output_embeddings()
    matrices = sum(m.weight.numel() for m in skeleton.modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head)
    dropout = max((v for k, v in config.to_dict().items() if k in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")
                   and isinstance(v, float)), default=0.0)
    return {"params": sum(q.numel() for q in skeleton.parameters()), "matrices": matrices,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
            "vocab": head.weight.shape[0], "attention_dropout": dropout}


def plan(skeleton, *, method: str, dtype: str, quantize: str, trainable: int, batch: int, block: int,
         precision: str, checkpointing: bool, loss: str, device: str, shards: int = 1) -> Plan:
    """The plan for one process. `dtype`: the base's weights (ftstudy.runtime.base_dtype);
    `precision`: Accelerate's mixed precision ('no', 'bf16', 'fp16'); `trainable`: the trainable
    parameters (all for full fine-tuning; the adapter's for LoRA); `shards`: the processes FSDP
    shards weights, gradients and optimizer state over (1 without FSDP)."""
    z = _sizes(skeleton)
    weight = BYTES[dtype]
    if quantize == "nf4":
        weights = z["matrices"] * NF4_BYTES + (z["params"] - z["matrices"]) * weight
    else:
        weights = z["params"] * weight
    state = weight if method == "full" else 4  # an adapter trains in fp32 (PEFT upcasts it)
    if method == "lora":
        weights += trainable * 4
    act = 2 if precision in ("bf16", "fp16") or dtype != "fp32" else 4  # bytes of an activation
    s, b, h, a, L = block, batch, z["hidden"], z["heads"], z["layers"]
    keeps_probs = device == "cpu" and z["attention_dropout"] > 0
    layer = act / 2 * (34 * s * b * h + (5 * a * s * s * b if keeps_probs else 0))
    activations = (L * act * s * b * h + layer) if checkpointing else L * layer
    if loss == "chunked":  # a chunk's fp32 logits and their gradient, and the hidden state's gradient
        logits = 2 * 4 * min(CHUNK_LOGITS, b * s * z["vocab"]) + 4 * b * s * h
    else:  # the whole micro-batch's logits, an fp32 copy and their gradient
        logits = b * s * z["vocab"] * (act + 4 + 4)
    # LoRA's integrity check: a fresh base and a merged copy (a 4-bit base is not merged).
    check = (1 if quantize == "nf4" else 2) * weights if method == "lora" else 0.0
    weights, trainable = weights / shards, trainable / shards
    return Plan(weights=weights, gradients=trainable * state, optimizer=2 * trainable * state,
                activations=activations, logits=logits, check=check, process=PROCESS.get(device, 0.0), device=device)


def capacity(device) -> float | None:
    """The GPU's memory in bytes; None off a GPU (a CPU's plan is printed, never refused)."""
    import torch

    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def refuse_if_too_big(p: Plan, capacity: float | None, method: str) -> None:
    """Stop, naming the numbers and the ways out, when a GPU clearly cannot hold the plan."""
    from ftstudy.config import ConfigError

    if capacity is None or p.total <= capacity:
        return
    ways = ["lower train.batch_size (and raise train.grad_accum to keep the global batch)",
            "train.gradient_checkpointing: true", "model.dtype: bf16"]
    if method == "full":
        ways.insert(0, "LoRA (stage train_lora) instead of full fine-tuning")
    else:
        ways.append("lora.quantize: nf4")
    ways.append("more GPUs with FSDP (docs/several-gpus.md)")
    raise ConfigError(f"memory: this run needs about {p.line()}, and the GPU holds {capacity / GiB:.1f} GiB; "
                      f"ways out: {'; '.join(ways)}")


def resident() -> float | None:
    """This process's resident memory now, in bytes (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def for_stage(skeleton, p, method: str, trainable: int, dtype: str, precision: str, device: str,
              shards: int = 1) -> Plan:
    """The plan of one process of a training stage, from its params. On a CPU the process's own
    part is measured, not assumed: its resident memory before any weight loads (what it imported
    differs by stage: PEFT and bitsandbytes add to LoRA's), which the peak RSS includes."""
    planned = plan(skeleton, method=method, dtype=dtype, quantize=p.lora.quantize if method == "lora" else "none",
                   trainable=trainable, batch=p.train.batch_size, block=p.data.block_size, precision=precision,
                   checkpointing=p.train.gradient_checkpointing, loss=p.train.loss, device=device, shards=shards)
    if device == "cpu" and (now := resident()) is not None:
        planned = replace(planned, process=float(now))
    return planned
