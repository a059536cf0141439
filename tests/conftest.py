"""Shared fixtures: the bundled tiny assets, and demo params written into a temp project folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from gpt2study.config import flatten, set_keys

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
TINY_MODEL = ASSETS / "tiny-gpt2"
TINY_WIKI = ASSETS / "tiny-wikitext"
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def demo_params(**overrides) -> dict:
    """params.yaml with assets/demo-params.yaml and dotted `overrides` applied, as a dict."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    set_keys(params, flatten(yaml.safe_load((ASSETS / "demo-params.yaml").read_text())) | overrides)
    for section in (params["model"], params["data"], *params["data"]["general"]):  # absolute: any cwd works
        section["name"] = str(ROOT / section["name"])
    return params


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A temp working folder holding a demo params.yaml; returns a writer for more overrides."""
    monkeypatch.chdir(tmp_path)

    def write(**overrides) -> Path:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(demo_params(**overrides)))
        return tmp_path

    write()
    return write


def run_main(module, *argv: str) -> None:
    """Run a stage's main() in-process with the given command-line arguments."""
    old = sys.argv
    sys.argv = [module.__name__, *argv]
    try:
        module.main()
    finally:
        sys.argv = old


TRAIN_ARGS = ("--data", "prep", "--base", "pre", "--checkpoints", "ckpt")


def train_args(method: str) -> tuple[str, ...]:
    """A training stage's command line in a `project` folder: models/<method>, m/<method>.json, ..."""
    return (*TRAIN_ARGS, "--out", f"models/{method}", "--metrics", f"m/{method}.json",
            "--info", f"m/{method}.info.json", "--plots", f"m/plots/{method}")


def prepare_in(project, **overrides) -> Path:
    """Write demo params with `overrides` and run the prepare stage into prep/ and pre/."""
    from stages import prepare

    root = project(**overrides)
    run_main(prepare, "--out", "prep", "--pretrained", "pre", "--metrics", "m/prepare.json")
    return root


def reset_accelerate() -> None:
    """Accelerate keeps its state per process; each in-process stage run starts from none, as a
    launched stage does."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()
