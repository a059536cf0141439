"""The end of a run: its metrics and facts (`summarize`), and the trained model saved and checked
(`save`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType

from ftstudy import loss, modeling, runtime
from ftstudy.data import batches
from ftstudy.outputs import atomic_dir
from ftstudy.train import memory
from ftstudy.train.loop import Progress
from ftstudy.train.session import Session, to_device


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
    batch = to_device(s.val_units.batch(np.arange(min(2, len(s.val_units)))), acc.device)
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


