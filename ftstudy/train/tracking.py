"""Live curves while a run trains, through Accelerate's tracker API (train.trackers).

The default tracker is DVCLive, DVC's own logger: every step's training loss, and at each log
interval the learning rate, tokens/s and (when scored) the validation loss, written on the main
process to <live dir>/metrics.json (the latest values and step) and <live dir>/plots/metrics/*.tsv
(one row per step), so `cat` or `dvc plots show`, VS Code's DVC extension or DVC Studio follow a
run as it goes. DVCLive writes no dvc.yaml of its own and makes no experiment: dvc.yaml declares
the folder, and `dvc exp run` makes the experiment. Other trackers Accelerate knows (tensorboard,
wandb, mlflow, ...) work the same way when installed. The final metrics and CSV curves are still
written atomically at the end, whatever the trackers.

A resumed run continues the live files and never logs a step twice: each checkpoint keeps a copy
of them (DVC removes a stage's outputs before it reruns) and the resume restores it; steps the
copy already holds (they come out the same) are skipped.

DVCLive runs as `LiveTracker`, Accelerate's DVCLive tracker on a `Live` that assembles DVC Studio's
payload only when Studio is configured: DVCLive 3.49 assembles it at every step regardless, rereading
the run's params and every curve, so each step cost time in proportion to the steps before it
(`python -m scripts.bench --live`: 2.4 ms a step over the first 100 steps, 5.1 ms over steps
1,001-4,000; under 1 ms throughout without it).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

from accelerate.tracking import DVCLiveTracker, on_main_process

from ftstudy.config import ConfigError

# The module a tracker's package installs, where its name differs.
MODULES = {"tensorboard": "torch.utils.tensorboard"}


def require(trackers) -> None:
    """Refuse, before any work, a tracker that is not installed (Accelerate would drop it silently)."""
    missing = [t for t in trackers if importlib.util.find_spec(MODULES.get(t, t)) is None]
    if missing:
        raise ConfigError(f"train.trackers: {', '.join(missing)} is not installed; install it "
                          f"(pip install {' '.join(missing)}) or leave it out of train.trackers")


@functools.cache
def _live_class() -> type:
    """dvclive.Live, assembling Studio's per-step payload only when Studio is configured (imported
    when a run first starts DVCLive: `train.trackers: []` does not pay for the import)."""
    from dvclive import Live

    class StudioOnlyWhenConfigured(Live):
        def post_data_to_studio(self):
            if getattr(self, "_dvc_studio_config", True):  # a later DVCLive without it: its own behaviour
                super().post_data_to_studio()

    return StudioOnlyWhenConfigured


class LiveTracker(DVCLiveTracker):
    """Accelerate's DVCLive tracker writing to `live_dir` (continuing the files found there:
    LiveLog.start empties the folder for a fresh run), with no dvc.yaml of its own and no
    experiment, and no per-step Studio payload unless Studio is configured."""

    def __init__(self, live_dir: Path):
        super().__init__(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, resume=True)

    @on_main_process  # accelerate.tracking's own decorator for its trackers' start, as DVCLiveTracker's
    def start(self):
        self.live = _live_class()(**self.init_kwargs)


def log_with(trackers: tuple[str, ...], live_dir: Path) -> list | None:
    """Accelerator's log_with for train.trackers: DVCLive as a LiveTracker writing to live_dir."""
    return [LiveTracker(live_dir) if t == "dvclive" else t for t in trackers] or None


def last_logged_step(live_dir: Path) -> int:
    """The last step DVCLive logged in live_dir (0 if none)."""
    try:
        return int(json.loads((live_dir / "metrics.json").read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


class LiveLog:
    """The run's trackers: started by `start`, fed by `log`, closed with the run
    (Accelerator.end_training)."""

    def __init__(self, accelerator, trackers: tuple[str, ...], live_dir: Path):
        self.acc, self.trackers, self.dir = accelerator, tuple(trackers), Path(live_dir)
        self.skip_through = 0

    def start(self, label: str, config: dict, resume: bool) -> None:
        """Start the trackers (resuming DVCLive's files when the run resumes); with none, leave the
        declared folder empty, so no stale curve of an earlier run is left in it."""
        if self.acc.is_main_process and (not self.trackers or not resume):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        if not self.trackers:
            return
        if resume:
            self.skip_through = last_logged_step(self.dir)
        self.acc.init_trackers(label, config=config)

    def log(self, points: list[tuple[int, float]], lr: float, tokens_per_s: float, val: float | None) -> None:
        """Each step's training loss; at the last step of `points` also lr, tokens/s and val loss."""
        if not self.trackers:
            return
        last = points[-1][0]
        for step, value in points:
            if step <= self.skip_through:
                continue
            values = {"train/loss": value}
            if step == last:
                values |= {"lr": lr, "tokens_per_s": tokens_per_s} | ({} if val is None else {"val/loss": val})
            self.acc.log(values, step=step)
