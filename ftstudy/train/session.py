"""The training session: what `setup` builds before the first step (Accelerator, the splits' blocks or
examples, the model, AdamW and its schedule, the validation sample) and the checks on the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from ftstudy import loss, runtime
from ftstudy.config import ConfigError, TrainParams
from ftstudy.data import batches, token_files
from ftstudy.train import launching, memory, tracking


MIN_VAL_UNITS = 20  # a validation sample smaller than this gives no standard error worth the name


def validation_units(n_units: int, unit_tokens: float, trained_tokens: float, budget: float, seed: int) -> np.ndarray:
    """The validation units every pass during training scores: all of them, or, where that would
    cost more than `budget` of the training between two passes (`trained_tokens`; scoring a token
    costs about a third of training on it: one forward against forward and backward), the same
    seeded sample of as many as fit, at least MIN_VAL_UNITS. The whole split is scored by evaluate."""
    fit = int(budget * 3 * trained_tokens // max(unit_tokens, 1))
    if budget == 0 or fit >= n_units:
        return np.arange(n_units)
    keep = min(n_units, max(MIN_VAL_UNITS, fit))
    return np.sort(np.random.default_rng(seed).choice(n_units, size=keep, replace=False))


def check_schedule(train: TrainParams, block_size: int, n_blocks: int, world: int) -> int:
    """Optimizer steps per epoch; errors name the params keys when the data cannot fill the schedule."""
    global_batch = train.batch_size * train.grad_accum * world
    steps = n_blocks // global_batch
    if steps == 0:
        raise ConfigError(f"train.batch_size x train.grad_accum x processes = {global_batch} blocks per step, "
                          f"but the training split has only {n_blocks} blocks of data.block_size="
                          f"{block_size}; lower them")
    if train.warmup_steps >= steps * train.epochs:
        raise ConfigError(f"train.warmup_steps: {train.warmup_steps} is not shorter than training "
                          f"({steps * train.epochs} optimizer steps); lower it")
    return steps



@dataclass
class Session:
    """Everything `setup` builds and the later pieces use."""
    accelerator: object
    model: torch.nn.Module        # the model with its loss, as prepared by Accelerate (maybe compiled, DDP-wrapped)
    trained: torch.nn.Module      # the model build() returned: what is scored and saved
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_units: object           # ftstudy.batches: the training split's blocks or examples
    val_units: object
    steps_per_epoch: int
    total_steps: int
    global_batch: int             # blocks (or examples) per optimizer step, over all processes
    compiled: bool
    own_forward: bool             # validation scores through the model's own forward (ftstudy.loss.check_fast_path)
    val_scored: np.ndarray = None  # the validation units each pass scores (validation_units)
    val_targets: np.ndarray = None  # their target counts, in the same order
    memory_plan: object = None    # ftstudy.memory.Plan, made before the weights loaded


def warmup_linear(warmup: int, total: int, step: int) -> float:
    """The learning-rate factor at `step`: linear from 0 to 1 over `warmup` steps, then linear to 0
    at `total`. (transformers' get_linear_schedule_with_warmup is the same; importing it imports peft.)"""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def setup(seed: int, block_size: int, train: TrainParams, lr: float, build: Callable[[], torch.nn.Module],
          data_dir: Path, live_dir: Path, train_on_prompt: bool = False, memory_plan: Callable | None = None,
          label: str = "train") -> Session:
    """Accelerator (with train.trackers, writing under live_dir), the splits' blocks or examples
    (`train_on_prompt`: data.train_on_prompt), the model `build()` returns, AdamW and the
    warmup-linear schedule. `memory_plan(device type, mixed precision, FSDP shards)` gives the
    memory plan, printed and checked against the GPU before build() loads any weight."""
    tracking.require(train.trackers)
    accelerator = Accelerator(mixed_precision=runtime.resolve_precision(train.precision),
                              log_with=tracking.log_with(train.trackers, live_dir), project_dir=str(live_dir))
    launching.require_asked_distribution(accelerator)
    set_seed(seed)
    device = accelerator.device
    if accelerator.mixed_precision == "fp16" and device.type != "cuda":
        # Accelerate applies neither fp16 autocast nor loss scaling on a CPU: it would train in fp32
        # while the metrics said fp16.
        raise ConfigError(f"train.precision: fp16 needs a CUDA GPU (this run is on {device.type}); "
                          "use bf16 or fp32 on a CPU")
    meta = token_files.read_meta(data_dir)
    train_units = batches.for_split(data_dir, "train", meta, block_size, train_on_prompt)
    val_units = batches.for_split(data_dir, "validation", meta, block_size, False)  # scored on answers alone
    world = accelerator.num_processes
    steps_per_epoch = check_schedule(train, block_size, len(train_units), world)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    shards = accelerator.num_processes if accelerator.distributed_type == DistributedType.FSDP else 1
    planned = memory_plan(device.type, accelerator.mixed_precision, shards) if memory_plan is not None else None
    if planned is not None:
        if accelerator.is_main_process:
            print(f"{label}: memory plan: {planned.line()}")
        memory.refuse_if_too_big(planned, memory.capacity(device), label.removeprefix("train_"))
    model = build()
    runtime.use_cpu_threads(device, train.cpu_threads)  # after loading: by-load measures the load over it
    if train.gradient_checkpointing:
        # Non-reentrant: no input needs requires_grad, so a frozen embedding (LoRA) is no problem.
        # transformers 5.2x names it activation_checkpointing_enable; earlier ones, gradient_...
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = model
    decay = [q for q in model.parameters() if q.requires_grad and q.ndim >= 2]
    no_decay = [q for q in model.parameters() if q.requires_grad and q.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))
    total_steps = steps_per_epoch * train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_linear, train.warmup_steps, total_steps))
    model = loss.with_loss(model, train.loss)  # the loss inside the module: DDP, FSDP and compile see it whole
    compiled = train.compile is True or (train.compile == "auto" and device.type == "cuda")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if compiled and not fsdp:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if compiled and fsdp:  # FSDP shards first, then compile sees the sharded modules
        model = torch.compile(model)
    accelerator.register_for_checkpointing(scheduler)
    # One block through body + head and through the model's own forward, both through the prepared
    # module (FSDP gathers the weights there): the chunked loss and validation assume they agree.
    why, _ = loss.check_fast_path(trained, to_device(train_units.batch(np.arange(1)), device)["input_ids"], root=model)
    if why is not None and train.loss == "chunked":
        raise ConfigError(f"train.loss: chunked cannot train {loss.causal_lm_of(trained).config.model_type}: {why}; "
                          "set train.loss: model")
    global_batch = train.batch_size * train.grad_accum * world
    between = (train.eval_every or steps_per_epoch) * global_batch * batches.mean_tokens(train_units)
    scored = validation_units(len(val_units), batches.mean_tokens(val_units), between, train.eval_budget, seed)
    targets = np.array([val_units.counts(np.array([i]))[0] for i in scored], dtype=np.float64)
    return Session(accelerator, model, trained, optimizer, scheduler, train_units, val_units, steps_per_epoch,
                   total_steps, global_batch, compiled, own_forward=why is not None, val_scored=scored,
                   val_targets=targets, memory_plan=planned)


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for name, array in arrays.items():
        tensor = torch.from_numpy(array)
        if device.type == "cuda":
            tensor = tensor.pin_memory()
        out[name] = tensor.to(device, non_blocking=True)
    return out

