"""The one training loop behind train_full and train_lora, run through Accelerate.

prepared token files + a model to train -> the trained model (save_pretrained folder), numeric
metrics, descriptive facts and loss curves. The pieces, in order: `session.setup` (Accelerator,
data, optimizer, schedule), `loop.fit` (the loop, resumable), `finish.summarize` (metrics) and
`finish.save`. `run` chains them for a stage; full and LoRA differ only in the model `build`
returns and LoRA's `check`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ftstudy import curves, modeling, runtime
from ftstudy.config import Params
from ftstudy.data import batches, token_files
from ftstudy.outputs import write_json
from ftstudy.train import checkpoints, memory, tracking
from ftstudy.train.finish import save, summarize
from ftstudy.train.loop import fit
from ftstudy.train.session import setup


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
        info |= {"format": token_files.read_meta(paths.data)["format"], "train_on_prompt": p.data.train_on_prompt}
    metrics |= save(s, paths.out, paths.base, check, saver)
    if s.accelerator.is_main_process:
        curves.write(paths.plots, progress.train_curve, progress.val_curve)
        write_json(paths.info, info)
        write_json(paths.metrics, {method: metrics})  # keyed by the method: `dvc exp show` reads lora.train_s
        ckpt.clear()
        print(f"train_{method}: {info['steps']} steps, {info['tokens']:,} tokens in {metrics['train_s']:.1f} s "
              f"({metrics['tokens_per_s']:,.0f} tok/s), val_loss {metrics['val_loss']:.4f}; "
              f"wrote {paths.out}, {paths.metrics}, {paths.info}, {paths.plots}")
    end(s.accelerator)
    return metrics


# The last barrier's work, held until the process exits (see `end`).
_LAST_WORK: list = []


def end(acc) -> None:
    """Close the trackers and the process group, after every process got here. Under gloo, a
    finished collective's work is released by gloo's own thread, which takes the GIL to free its
    tensor; the process group is freed with the DDP model, when `run` returns, by a thread that
    holds the GIL and waits for gloo's threads: a deadlock when the last barrier's work is still
    being released then (a 2-process run on one core hung after writing its outputs, about 1 in 8).
    Holding that work here leaves gloo's thread nothing to free."""
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        work = torch.distributed.barrier(async_op=True)
        work.wait()
        _LAST_WORK.append(work)
    acc.end_training()  # closes the trackers too
