"""The one training loop behind train_full and train_lora, run through Accelerate.

prepared token files + a model to train -> the trained model (save_pretrained folder), numeric
metrics, descriptive facts and loss curves. The pieces, in order: `setup` (Accelerator, data,
optimizer, schedule), `fit` (the loop, resumable), `summarize` (metrics) and `save`. `run` chains
them for a stage; full and LoRA differ only in the model `build` returns and LoRA's `check`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ftstudy import batches, checkpoints, curves, data, launching, loss, memory, modeling, runtime, tracking
from ftstudy.config import ConfigError, Params, TrainParams
from ftstudy.errors import StudyError
from ftstudy.outputs import atomic_dir, write_json


@dataclass(frozen=True)
class TrainPaths:
    """Where a training stage reads and writes; dvc.yaml passes each on the command line."""
    data: Path          # prepared token folder
    base: Path          # pretrained snapshot folder
    out: Path           # model folder to write
    metrics: Path       # numeric metrics JSON (a DVC metric)
    info: Path          # descriptive facts JSON (device, versions, precision)
    plots: Path         # folder for loss curves (CSV, DVC plots)
    live: Path          # folder for the live curves of train.trackers (DVCLive's files)
    checkpoints: Path   # resumable checkpoints, outside the DVC outputs

    @classmethod
    def from_cli(cls, method: str, argv: list[str] | None = None) -> TrainPaths:
        ap = argparse.ArgumentParser(description=f"Fine-tune ({method}); run by dvc.yaml stage train_{method}")
        for name in cls.__dataclass_fields__:
            ap.add_argument(f"--{name}", required=True, type=Path)
        return cls(**vars(ap.parse_args(argv)))


def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block order of one epoch: a permutation drawn from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_blocks, generator=g).numpy()


def micro_batch_slice(step_in_epoch: int, micro: int, micro_batch: int, grad_accum: int, world: int,
                      rank: int) -> slice:
    """The positions of the epoch's block order that process `rank` reads at micro-step `micro`.

    An optimizer step covers micro_batch x grad_accum x world consecutive positions; each
    micro-step takes world consecutive slices of micro_batch, one per process, so every block of
    the step is read exactly once whatever the process count (the DDP test relies on this)."""
    start = step_in_epoch * micro_batch * grad_accum * world + (micro * world + rank) * micro_batch
    return slice(start, start + micro_batch)


def validation_due(step: int, steps_per_epoch: int, total_steps: int, eval_every: int) -> bool:
    """Whether validation loss is scored after optimizer step `step` (1-based): every eval_every
    steps and at the last, or at each epoch's end when eval_every is 0."""
    if eval_every:
        return step % eval_every == 0 or step == total_steps
    return step % steps_per_epoch == 0


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


def oom_advice(train: TrainParams) -> str:
    b, ga = train.batch_size, train.grad_accum
    if b == 1:
        return "out of GPU memory at train.batch_size=1; lower data.block_size or use a larger GPU"
    half = max(1, b // 2)
    return (f"out of GPU memory at train.batch_size={b}, train.grad_accum={ga}; keep the same global batch "
            f"with train.batch_size={half}, train.grad_accum={ga * b // half}")


class NonFiniteLoss(StudyError, FloatingPointError):
    """The loss became NaN or inf; names the step."""


class OutOfMemory(StudyError, RuntimeError):
    """The GPU ran out of memory; says how to keep the global batch with less memory."""


class StepLosses:
    """Step losses kept on the device and read on the host once per log interval (one sync),
    so the loop never waits for the GPU; a non-finite loss is reported with its exact step."""

    def __init__(self, capacity: int, device: torch.device):
        self.buffer = torch.zeros(capacity, device=device)
        self.pending = 0  # steps whose loss sits in the buffer, not yet read

    def add(self, loss: torch.Tensor) -> None:
        self.buffer[self.pending] = loss
        self.pending += 1

    def full(self) -> bool:
        return self.pending == len(self.buffer)

    def flush(self, step: int, accelerator) -> list[tuple[int, float]]:
        """(step, loss averaged over processes) for every pending step up to `step`."""
        values = accelerator.reduce(self.buffer[:self.pending].clone(), reduction="mean").tolist()
        first = step - self.pending + 1
        self.pending = 0
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise NonFiniteLoss(f"non-finite loss at step {first + i} ({v}); lower the learning "
                                    "rate or train.max_grad_norm, or use train.precision: fp32")
        return [(first + i, v) for i, v in enumerate(values)]


@dataclass
class Progress:
    """What a run has done so far; saved with each checkpoint, so a resumed run continues it."""
    step: int = 0
    train_time: float = 0.0
    warmup_time: float = 0.0  # the first log interval of each process (compilation, caches), kept apart
    warmup_steps: int = 0     # the steps those intervals hold
    warmup_tokens: int = 0    # and their input tokens
    tokens: int = 0           # input tokens trained on (padding left out)
    train_curve: list = field(default_factory=list)  # (step, loss)
    val_curve: list = field(default_factory=list)    # (step, training seconds, tokens, loss)
    val_loss_se: float = math.inf  # the last validation loss's standard error over the split's units
    eval_time: float = 0.0  # seconds spent on validation, kept out of train_time and tokens/s
    segments: list = field(default_factory=list)  # (first step, CPU threads) of each process that trained


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
    meta = data.read_meta(data_dir)
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
    why, _ = loss.check_fast_path(trained, _to_device(train_units.batch(np.arange(1)), device)["input_ids"], root=model)
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


def _to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for name, array in arrays.items():
        tensor = torch.from_numpy(array)
        if device.type == "cuda":
            tensor = tensor.pin_memory()
        out[name] = tensor.to(device, non_blocking=True)
    return out


def train_step(s: Session, train: TrainParams, order: np.ndarray, step_in_epoch: int) -> tuple[torch.Tensor, int]:
    """One optimizer step over train.grad_accum micro-batches; returns the step's mean loss over its
    targets (on the device) and its input tokens. Each micro-batch's summed loss is divided by the
    whole step's target count (over every process: DDP averages the gradients), so the step's
    gradient is that of the mean over its targets, however they fall into micro-batches."""
    acc, ga, world = s.accelerator, train.grad_accum, s.accelerator.num_processes
    whole = order[step_in_epoch * s.global_batch:(step_in_epoch + 1) * s.global_batch]
    targets, tokens = s.train_units.counts(whole)
    scale = world / targets
    step_loss = torch.zeros((), device=acc.device)
    for micro in range(ga):
        where = micro_batch_slice(step_in_epoch, micro, train.batch_size, ga, world, acc.process_index)
        batch = _to_device(s.train_units.batch(order[where]), acc.device)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        with acc.no_sync(s.model) if micro < ga - 1 else nullcontext():
            micro_loss = s.model(**batch) * scale
            acc.backward(micro_loss)
        step_loss += micro_loss.detach()
    acc.clip_grad_norm_(s.model.parameters(), train.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss, tokens


def _score(s: Session, units, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """Each target's NLL over the units `indices`, through the prepared module (ftstudy.loss):
    every next token of a text block, the answer tokens of an example."""
    path = "model" if s.own_forward else "body_head_fp32"
    out = [s.model(**_to_device(units.batch(indices[i:i + batch_size]), s.accelerator.device), nll=path)
           for i in range(0, len(indices), batch_size)]
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


@torch.no_grad()
def validation_loss(s: Session, batch_size: int) -> tuple[float, float]:
    """(mean NLL over the validation split, its standard error over the split's units), sharded
    across processes: over its blocks (run_clm's protocol) for running text, over the answer tokens
    of its examples for instruction data. The standard error is the ratio estimator's
    (sqrt(n/(n-1) Σ(s_i − L c_i)²) / Σc_i, unit i's NLL sum s_i and target count c_i): the noise a
    change in validation loss must exceed to mean anything."""
    acc = s.accelerator
    s.model.eval()
    scored = s.val_scored
    n = len(scored)
    # Under FSDP every process runs every forward (the weights are gathered collectively): the
    # shards are padded to the same number of batches, the padding left out of the sums.
    per = -(-n // acc.num_processes)
    share = slice(acc.process_index * per, min(n, (acc.process_index + 1) * per))
    mine = scored[share]
    nll = _score(s, s.val_units, mine, batch_size)
    if acc.distributed_type == DistributedType.FSDP:
        for _ in range(-(-per // batch_size) - -(-len(mine) // batch_size)):
            _score(s, s.val_units, scored[:min(batch_size, n)], batch_size)
    s.model.train()
    counts = s.val_targets[share]
    starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)
    sums = np.add.reduceat(nll, starts) if len(mine) else np.zeros(0)
    parts = [sums.sum(), counts.sum(), (sums**2).sum(), (sums * counts).sum(), (counts**2).sum(), len(mine)]
    total, count, ss, sc, cc, n = acc.reduce(torch.tensor(parts, dtype=torch.float64, device=acc.device),
                                             reduction="sum").tolist()
    mean = total / count
    spread = max(0.0, ss - 2 * mean * sc + mean**2 * cc)
    return mean, (math.sqrt(n / (n - 1) * spread) / count if n > 1 else math.inf)


def fit(s: Session, train: TrainParams, seed: int, ckpt: checkpoints.Checkpointer, label: str,
        live: tracking.LiveLog, config: dict) -> Progress:
    """Train to the end of the schedule, resuming from the newest complete checkpoint if any, with
    live curves through the trackers."""
    acc = s.accelerator
    progress = Progress()
    if (latest := ckpt.latest()) is not None:
        progress = Progress(**ckpt.load(latest, {"live": live.dir}))  # DVC removed the live curves before the rerun
        if acc.is_main_process:
            print(f"{label}: resuming from {latest} (step {progress.step} of {s.total_steps})")
    progress.segments.append((progress.step + 1, torch.get_num_threads()))
    live.start(label, config, resume=latest is not None)
    losses = StepLosses(train.log_every, acc.device)
    bar = tqdm(total=s.total_steps, initial=progress.step, desc=label, unit="step",
               disable=None if acc.is_main_process else True, dynamic_ncols=True)  # None: a terminal only
    s.model.train()
    order, t0, warm, started_at, tokens_at_start = None, time.perf_counter(), False, progress.step, progress.tokens
    try:
        for step in range(progress.step + 1, s.total_steps + 1):
            epoch, step_in_epoch = divmod(step - 1, s.steps_per_epoch)
            if order is None or step_in_epoch == 0:
                order = epoch_order(len(s.train_units), seed, epoch)
            step_loss, tokens = train_step(s, train, order, step_in_epoch)
            losses.add(step_loss)
            progress.tokens += tokens
            bar.update(1)
            validate = validation_due(step, s.steps_per_epoch, s.total_steps, train.eval_every)
            checkpoint = train.checkpoint_every and step % train.checkpoint_every == 0 and step < s.total_steps
            if not (losses.full() or validate or checkpoint):
                continue
            points = losses.flush(step, acc)
            progress.train_curve += points
            interval = time.perf_counter() - t0  # flush synced the device, so this time is real
            progress.train_time += interval
            if not warm:  # this process's first interval: compilation and caches, whether fresh or resumed
                progress.warmup_time += interval
                progress.warmup_steps += step - started_at
                progress.warmup_tokens += progress.tokens - tokens_at_start
                warm = True
            tokens_per_s = progress.tokens / progress.train_time
            bar.set_postfix(loss=f"{points[-1][1]:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            val = None
            if validate:
                started = time.perf_counter()
                val, progress.val_loss_se = validation_loss(s, train.batch_size)
                progress.eval_time += time.perf_counter() - started
                progress.val_curve.append((step, round(progress.train_time, 3), progress.tokens, val))
                if acc.is_main_process and step_in_epoch == s.steps_per_epoch - 1:
                    bar.write(f"epoch {epoch + 1}: val_loss {val:.4f} (ppl {math.exp(val):.2f})")
            live.log(points, s.scheduler.get_last_lr()[0], tokens_per_s, val)
            if checkpoint:
                progress.step = step
                ckpt.save(step, asdict(progress), {"live": live.dir})
            t0 = time.perf_counter()
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemory(oom_advice(train)) from e
    finally:
        bar.close()
    progress.step = s.total_steps
    return progress


def validation_summary(val_curve: list, se: float) -> dict:
    """Final and best validation loss, the step of the best, how far the loss rose after it (0 when
    the last point is the best), and the final loss's standard error over the validation units
    (`se`), which a rise must exceed to be called overfitting (ftstudy.findings)."""
    losses = [point[-1] for point in val_curve]
    best = min(range(len(losses)), key=losses.__getitem__)
    return {"val_loss": losses[-1], "val_loss_best": losses[best], "val_best_step": val_curve[best][0],
            "val_rise_after_best": losses[-1] - losses[best]} | ({"val_loss_se": se} if math.isfinite(se) else {})


def summarize(s: Session, progress: Progress, block_size: int, seed: int, method: str,
              eval_every: int, versions: dict) -> tuple[dict, dict]:
    """(numeric metrics, descriptive facts; `versions`: the libraries') of a finished run."""
    steps, train_time = progress.step, progress.train_time
    steady_tokens, steady_time = progress.tokens - progress.warmup_tokens, train_time - progress.warmup_time
    if steps == progress.warmup_steps:  # a run shorter than one log interval has no steady state to measure
        steady_tokens, steady_time = progress.tokens, train_time
    tokens_per_s = steady_tokens / steady_time
    trainable, total = modeling.count_params(s.trained)
    device, world = s.accelerator.device, s.accelerator.num_processes
    name = runtime.device_name(device)
    used = runtime.peak_memory(device)
    metrics = {"train_s": round(train_time, 3), "warmup_s": round(progress.warmup_time, 3),
               "tokens_per_s": round(tokens_per_s, 1),
               **{k: v for k, v in used.items() if k != "peak_mem_kind"},
               "trainable_params": trainable,
               "final_train_loss": progress.train_curve[-1][1],
               **validation_summary(progress.val_curve, progress.val_loss_se),
               "eval_s": round(progress.eval_time, 3)}
    # MFU against a data-sheet peak, or a GPU's measured one; none on a CPU, whose measured matmul
    # peak moved 2x between runs (the load, turbo, caches): a ratio over noise is noise.
    peak, peak_source = runtime.peak_flops(name), "data sheet, dense bf16"
    if peak is None and device.type != "cpu":
        peak, peak_source = runtime.measured_peak_flops(device), "measured, matmul probe"
    if peak is not None:
        causal_lm = loss.causal_lm_of(s.trained)
        fpt = runtime.flops_per_token(causal_lm.config, *runtime.matmul_params(causal_lm), block_size)
        metrics["mfu"] = round(tokens_per_s * fpt / (peak * world), 4)
    info = {"method": method, "steps": steps, "tokens": progress.tokens, "global_batch": s.global_batch,
            "processes": world, "total_params": total, "peak_mem_kind": used["peak_mem_kind"],
            "precision": {"no": "fp32"}.get(s.accelerator.mixed_precision, s.accelerator.mixed_precision),
            "compiled": s.compiled, "eval_every": eval_every, "device": name, "seed": seed,
            "val_units_scored": len(s.val_scored), "val_units": len(s.val_units),
            "segments": [{"from_step": first, "cpu_threads": threads} for first, threads in progress.segments],
            "peak_flops": peak, "peak_flops_source": peak_source if peak is not None else None,
            "versions": versions}
    if s.memory_plan is not None:
        info["memory_plan_gib"] = {k: round(v / memory.GiB, 4) for k, v in s.memory_plan.parts().items()} | {
            "total": round(s.memory_plan.total / memory.GiB, 4)}
    if isinstance(s.train_units, batches.ExampleBatches):  # padding's cost, measured over this process's batches
        info["padding_share"] = round(s.train_units.padding, 4)
    return metrics, info


def save(s: Session, out: Path, base_dir: Path, check: Callable | None = None,
         saver: Callable | None = None) -> dict:
    """Save the trained model (a PEFT model saves its adapter only) beside the snapshot's tokenizer,
    atomically, on the main process: `saver(model, folder, state_dict)`, default save_pretrained.
    Under FSDP the full state dict is gathered first, on every process. `check(folder, batch,
    reference)`, if given, runs on the saved folder before it is committed, against the trained
    model's per-target NLL on `batch` (`reference`, scored through the prepared module on every
    process), and returns extra metrics (artifact_mb among them, where the folder holds more than
    the artifact)."""
    acc = s.accelerator
    acc.wait_for_everyone()
    batch = _to_device(s.val_units.batch(np.arange(min(2, len(s.val_units)))), acc.device)
    reference = None
    if check is not None:
        s.model.eval()
        with torch.no_grad():
            reference = s.model(**batch, nll="model")  # the model's own forward: the checks compare like with like
        s.model.train()
    fsdp = acc.distributed_type == DistributedType.FSDP
    state = acc.get_state_dict(s.model) if fsdp else None  # collective: every process takes part
    extra: dict = {}
    if acc.is_main_process:
        trained = s.trained  # the module build() returned, outside the loss wrapper, compile and autocast
        if state is not None:  # the loss wrapper's names, less its prefix, are the trained model's
            state = {k.removeprefix("model."): v for k, v in state.items()}
            # Gathered, tied weights (GPT-2's head and embedding) come back as two copies: one
            # tensor again, so save_pretrained stores it once, as for an unsharded model.
            first: dict = {}
            for name, param in trained.named_parameters(remove_duplicate=False):
                if name in state:
                    state[name] = state[first.setdefault(id(param), name)]
        with atomic_dir(out) as tmp:
            (saver or (lambda model, folder, sd: model.save_pretrained(folder, state_dict=sd)))(trained, tmp, state)
            modeling.load_tokenizer(base_dir).save_pretrained(tmp)
            if check is not None:
                with acc.autocast():
                    extra = check(tmp, batch, reference)
        extra.setdefault("artifact_mb", round(modeling.dir_size_mb(out), 3))  # check may count it itself
    return extra


def tracker_config(p: Params, method: str) -> dict:
    """The run's settings as the trackers record them (their params): flat keys, scalar values."""
    return {"seed": p.seed, "model.name": p.model.name, "method": method, "lr": getattr(p, method).lr,
            **{f"train.{k}": v for k, v in asdict(p.train).items() if not isinstance(v, (list, tuple))}}


def run(method: str, p: Params, paths: TrainPaths, build: Callable[[], torch.nn.Module], dtype: str,
        trainable: int | None = None, check: Callable | None = None, facts: dict | None = None,
        saver: Callable | None = None) -> dict:
    """A training stage: its memory plan (`trainable` parameters, all by default; the base in
    `dtype`), setup, fit, save (`saver(model, folder)`, default save_pretrained), then metrics,
    facts (`facts` added) and curves; returns the metrics."""
    modeling.check_context(paths.base, p.data.block_size)
    skeleton = modeling.skeleton(paths.base)
    trainable = trainable or sum(q.numel() for q in skeleton.parameters())
    s = setup(p.seed, p.data.block_size, p.train, getattr(p, method).lr, build, paths.data, paths.live,
              p.data.train_on_prompt, label=f"train_{method}",
              memory_plan=lambda device, precision, shards: memory.for_stage(skeleton, p, method, trainable, dtype,
                                                                             precision, device, shards))
    identity = checkpoints.run_identity(p, method, paths.data, paths.base, {
        "processes": s.accelerator.num_processes, "precision": s.accelerator.mixed_precision,
        "versions": runtime.library_versions()})
    ckpt = checkpoints.Checkpointer(paths.checkpoints, method, identity, s.accelerator)
    live = tracking.LiveLog(s.accelerator, p.train.trackers, paths.live)
    progress = fit(s, p.train, p.seed, ckpt, f"train_{method}", live, tracker_config(p, method))
    metrics, info = summarize(s, progress, p.data.block_size, p.seed, method, p.train.eval_every,
                              identity["versions"])
    info |= {"loss": p.train.loss, "lr": getattr(p, method).lr, "epochs": p.train.epochs} | (facts or {})
    if isinstance(s.train_units, batches.ExampleBatches):
        info |= {"format": data.read_meta(paths.data)["format"], "train_on_prompt": p.data.train_on_prompt}
    metrics |= save(s, paths.out, paths.base, check, saver)
    if s.accelerator.is_main_process:
        curves.write(paths.plots, progress.train_curve, progress.val_curve)
        write_json(paths.info, info)
        write_json(paths.metrics, {method: metrics})  # keyed by the method: `dvc exp show` reads lora.train_s
        ckpt.clear()
        print(f"train_{method}: {info['steps']} steps, {info['tokens']:,} tokens in {metrics['train_s']:.1f} s "
              f"({metrics['tokens_per_s']:,.0f} tok/s), val_loss {metrics['val_loss']:.4f}; "
              f"wrote {paths.out}, {paths.metrics}, {paths.info}, {paths.plots}")
    s.accelerator.end_training()  # closes the trackers too
    return metrics
