"""The step loop: the block order of each epoch, one optimizer step, validation, and `fit`, which
trains to the end of the schedule, resumable from checkpoints, with live curves.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from ftstudy.config import TrainParams
from ftstudy.errors import StudyError
from ftstudy.train import checkpoints, tracking
from ftstudy.train.session import Session, to_device


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
        batch = to_device(s.train_units.batch(order[where]), acc.device)
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
    out = [s.model(**to_device(units.batch(indices[i:i + batch_size]), s.accelerator.device), nll=path)
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


