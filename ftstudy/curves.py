"""Loss curves as DVC plots (CSV), and what they tell: when a run first reached a quality.

train_loss.csv: step,loss. val_loss.csv: step,seconds,tokens,loss, where seconds and tokens are
the training time and tokens up to that step (validation time left out).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ftstudy.outputs import write_text

TRAIN_CSV, VAL_CSV = "train_loss.csv", "val_loss.csv"


def write(plots: Path, train_curve: list, val_curve: list) -> None:
    for name, header, rows in ((TRAIN_CSV, "step,loss", train_curve), (VAL_CSV, "step,seconds,tokens,loss", val_curve)):
        write_text(Path(plots) / name, header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))


def read_val(plots: Path) -> list[dict]:
    with open(Path(plots) / VAL_CSV, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def time_to_reach(curve: list[dict], target: float) -> dict:
    """The training seconds, tokens and step at which `curve` first reached validation loss
    <= target; only the target when it never did."""
    for point in curve:
        if point["loss"] <= target:
            return {"target": target, "seconds": point["seconds"], "tokens": int(point["tokens"]),
                    "step": int(point["step"])}
    return {"target": target}
