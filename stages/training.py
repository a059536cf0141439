"""The one training loop behind train_full and train_lora, run through Accelerate.

prepared token files + pretrained snapshot -> model folder, metrics JSON, loss curves (CSV).
Only how the model is built (and its learning rate) differs between the two methods.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from stages import checkpoints, data, modeling, scoring
from stages.hardware import device_name, flops_per_token, library_versions, peak_flops, peak_memory, resolve_precision
from stages.config import ConfigError, Params, load_params
from stages.outputs import atomic_dir, write_json, write_text


def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block order of one epoch: a permutation drawn from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_blocks, generator=g).numpy()


def check_schedule(p: Params, n_blocks: int, world: int) -> int:
    """Optimizer steps per epoch; errors name the params keys when the data cannot fill the schedule."""
    global_batch = p.train.batch_size * p.train.grad_accum * world
    steps = n_blocks // global_batch
    if steps == 0:
        raise ConfigError(f"train.batch_size x train.grad_accum x processes = {global_batch} blocks per step, "
                          f"but the training split has only {n_blocks} blocks of data.block_size="
                          f"{p.data.block_size}; lower them")
    if p.train.warmup_steps >= steps * p.train.epochs:
        raise ConfigError(f"train.warmup_steps: {p.train.warmup_steps} is not shorter than training "
                          f"({steps * p.train.epochs} optimizer steps); lower it")
    return steps


def validation_loss(model, accelerator, val_blocks: np.ndarray, batch_size: int) -> float:
    """Mean NLL over the validation blocks (run_clm protocol), sharded across processes."""
    model.eval()
    shard = val_blocks[accelerator.process_index::accelerator.num_processes]
    nll = scoring.block_nll(model, shard.reshape(-1), val_blocks.shape[1], accelerator.device, batch_size)
    model.train()
    totals = torch.tensor([nll.sum(), len(nll)], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1])


def oom_advice(p: Params) -> str:
    b, ga = p.train.batch_size, p.train.grad_accum
    if b == 1:
        return ("out of GPU memory at train.batch_size=1; lower data.block_size or use a larger GPU")
    half = max(1, b // 2)
    return (f"out of GPU memory at train.batch_size={b}, train.grad_accum={ga}; keep the same global batch "
            f"with train.batch_size={half}, train.grad_accum={ga * b // half}")


def run(method: str, build: Callable[[Params, str], torch.nn.Module],
        finalize: Callable[..., dict] | None = None) -> dict:
    """Train the model `build(params, snapshot_dir)` returns, at params.<method>.lr; save it with
    save_pretrained (a PEFT model saves its adapter only) beside the snapshot's tokenizer.
    `finalize(model, out_dir, params, args, check_batch)`, if given, runs on the trained model
    before the output folder is committed and returns extra metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    args = _cli(method)
    p = load_params()
    modeling.check_context(args.base, p.data.block_size)
    accelerator = Accelerator(mixed_precision=resolve_precision(p.train.precision))
    set_seed(p.seed)
    device = accelerator.device

    train_blocks = data.blocks(data.load_tokens(args.data, "train"), p.data.block_size)
    val_blocks = data.blocks(data.load_tokens(args.data, "validation"), p.data.block_size)
    spe = check_schedule(p, len(train_blocks), accelerator.num_processes)  # optimizer steps per epoch
    total_steps = spe * p.train.epochs

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    model = build(p, args.base)
    if p.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = modeling.count_params(model)
    config = getattr(model, "get_base_model", lambda: model)().config
    compiled = p.train.compile is True or (p.train.compile == "auto" and device.type == "cuda")
    decay = [q for q in model.parameters() if q.requires_grad and q.ndim >= 2]
    no_decay = [q for q in model.parameters() if q.requires_grad and q.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=getattr(p, method).lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))
    scheduler = get_linear_schedule_with_warmup(optimizer, p.train.warmup_steps, total_steps)
    if compiled:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    micro, ga, world, rank = p.train.batch_size, p.train.grad_accum, accelerator.num_processes, accelerator.process_index
    global_batch = micro * ga * world
    tokens_per_step = global_batch * p.data.block_size
    # warmup_*: the first log interval (compilation, allocator and cache warm-up), kept apart from
    # the steady state that tokens_per_s measures.
    progress = {"step": 0, "train_time": 0.0, "warmup_time": None, "warmup_steps": 0, "train_curve": [], "val_curve": []}
    ckpt = checkpoints.Checkpointer(
        args.checkpoints, method,
        checkpoints.run_key(p, method, args.data, world, accelerator.mixed_precision), accelerator)
    if (latest := ckpt.latest()) is not None:
        progress = ckpt.load(latest)
        if accelerator.is_main_process:
            print(f"train_{method}: resuming from {latest} (step {progress['step']} of {total_steps})")
    loss_buf = torch.zeros(p.train.log_every, device=device)
    pending = 0  # steps whose loss sits in loss_buf, not yet read on the host

    def flush(step: int) -> float:
        """Read the buffered step losses (one host sync) and stop on the first non-finite one."""
        nonlocal pending
        values = accelerator.reduce(loss_buf[:pending].clone(), reduction="mean").tolist()
        first = step - pending + 1
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(f"non-finite loss at step {first + i} ({v}); lower the learning "
                                         "rate or train.max_grad_norm, or use train.precision: fp32")
            progress["train_curve"].append((first + i, v))
        pending = 0
        return values[-1]

    bar = tqdm(total=total_steps, initial=progress["step"], desc=f"train_{method}", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    order, t0 = None, time.perf_counter()
    try:
        for step in range(progress["step"] + 1, total_steps + 1):
            epoch, s = divmod(step - 1, spe)
            if order is None or s == 0:
                order = epoch_order(len(train_blocks), p.seed, epoch)
            step_loss = torch.zeros((), device=device)
            for m in range(ga):
                start = s * global_batch + (m * world + rank) * micro
                batch = torch.from_numpy(train_blocks[np.sort(order[start:start + micro])].astype(np.int64))
                if device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                with accelerator.no_sync(model) if m < ga - 1 else nullcontext():
                    loss = model(input_ids=batch, labels=batch).loss
                    accelerator.backward(loss / ga)
                step_loss += loss.detach()
            loss_buf[pending] = step_loss / ga
            accelerator.clip_grad_norm_(model.parameters(), p.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending += 1
            bar.update(1)
            epoch_end = s == spe - 1
            checkpoint = p.train.checkpoint_every and step % p.train.checkpoint_every == 0 and step < total_steps
            if pending == p.train.log_every or epoch_end or checkpoint:
                last = flush(step)
                now = time.perf_counter()  # flush synced the device, so this time is real
                progress["train_time"] += now - t0
                if progress["warmup_time"] is None:
                    progress["warmup_time"], progress["warmup_steps"] = progress["train_time"], step
                bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{step * tokens_per_step / progress['train_time']:,.0f}")
                if epoch_end:
                    val = validation_loss(model, accelerator, val_blocks, micro)
                    progress["val_curve"].append((epoch + 1, val))
                    if accelerator.is_main_process:
                        bar.write(f"epoch {epoch + 1}: val_loss {val:.4f} (ppl {math.exp(val):.2f})")
                if checkpoint:
                    ckpt.save(step, progress | {"step": step})
                t0 = time.perf_counter()
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(oom_advice(p)) from e
    finally:
        bar.close()

    steps, train_time = total_steps, progress["train_time"]
    steady_steps, steady_time = steps - progress["warmup_steps"], train_time - progress["warmup_time"]
    if steady_steps == 0:  # a run shorter than one log interval has no steady state to measure
        steady_steps, steady_time = steps, train_time
    tokens_per_s = steady_steps * tokens_per_step / steady_time
    name = device_name(device)
    metrics = {
        "method": method,
        "train_time_s": round(train_time, 3),
        "warmup_s": round(progress["warmup_time"], 3),
        "tokens": steps * tokens_per_step,
        "tokens_per_s": round(tokens_per_s, 1),
        "steps": steps,
        "global_batch": global_batch,
        "processes": world,
        **peak_memory(device),
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": progress["train_curve"][-1][1],
        "val_loss": progress["val_curve"][-1][1],
        "val_ppl": math.exp(progress["val_curve"][-1][1]),
        "precision": {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision),
        "device": name,
        "compiled": compiled,
        "seed": p.seed,
        "versions": library_versions(),
    }
    if (peak := peak_flops(name)) is not None:
        full = trainable == total
        fpt = flops_per_token(config, total if full else total - trainable, p.data.block_size, full)
        metrics["mfu"] = round(tokens_per_s * fpt / (peak * world), 4)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(args.out) as tmp:
            trained = accelerator.unwrap_model(model)
            trained.save_pretrained(tmp)
            modeling.load_tokenizer(args.base).save_pretrained(tmp)
            if finalize is not None:
                check_batch = torch.from_numpy(val_blocks[:2].astype(np.int64)).to(device)
                metrics |= finalize(trained, tmp, p, args, check_batch)
        metrics["artifact_mb"] = round(modeling.dir_size_mb(args.out), 3)
        curves = {"train_loss.csv": ("step", progress["train_curve"]), "val_loss.csv": ("epoch", progress["val_curve"])}
        for name, (x, curve) in curves.items():
            write_text(Path(args.plots) / name, f"{x},loss\n" + "".join(f"{a},{v}\n" for a, v in curve))
        write_json(args.metrics, metrics)
        ckpt.clear()
        print(f"train_{method}: {steps} steps, {metrics['tokens']:,} tokens in {train_time:.1f}s "
              f"({metrics['tokens_per_s']:,.0f} tok/s), val_loss {metrics['val_loss']:.4f}; "
              f"wrote {args.out}, {args.metrics}, {args.plots}")
    accelerator.end_training()
    return metrics


def _cli(method: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"Fine-tune ({method}); run by dvc.yaml stage train_{method}")
    ap.add_argument("--data", required=True, help="prepared token folder")
    ap.add_argument("--base", required=True, help="pretrained snapshot folder")
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--plots", required=True, help="folder for loss curves (CSV)")
    ap.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (not a DVC output)")
    return ap.parse_args()
