"""Several processes through Accelerate: 2 CPU processes (gloo DDP) match 1 process at the same
global batch. Dropout is switched off in the snapshot so the two differ only by reduction order."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, demo_params, no_dropout, prepare_in, train_args
from ftstudy.outputs import read_json


def train(root, processes: int, batch_size: int, tag: str) -> tuple[dict, list[float]]:
    (root / "params.yaml").write_text(yaml.safe_dump(demo_params(**{"train.epochs": 1, "train.batch_size": batch_size})))
    launch = ["--num_processes", "1"] if processes == 1 else ["--multi_gpu", "--num_processes", str(processes)]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "29517",
           "-m", "stages.train_full", *train_args(tag)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = [float(line.split(",")[1]) for line in (root / f"m/plots/{tag}/train_loss.csv").read_text().splitlines()[1:]]
    return read_json(root / f"m/{tag}.json")["full"] | read_json(root / f"m/{tag}.info.json"), curve


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(project, tmp_path):
    prepare_in(project)
    no_dropout(tmp_path / "pre")

    one, curve_one = train(tmp_path, 1, 8, "one")
    two, curve_two = train(tmp_path, 2, 4, "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["global_batch"] == two["global_batch"] == 8 and one["steps"] == two["steps"]
    assert curve_two == pytest.approx(curve_one, rel=2e-3)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=2e-3)
    assert curve_one[-1] < curve_one[0]
