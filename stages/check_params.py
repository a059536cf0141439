"""Stage check_params: the whole params.yaml (and the model's config, where this machine has it) ->
nothing; fails naming every problem, before any stage runs and so before DVC deletes any output.

Every other stage reads only its own params keys, so a new misspelled section (`trian:`) would
change no stage and pass silently; this stage depends on the whole file, so any edit reruns it.
Where the model's config is on this machine (a local folder, the Hub cache, or the pretrained
snapshot an earlier prepare made of the same model.name and revision), it also checks what
depends on the model: data.block_size against its context, a chat template for data.format:
messages, and a list of lora.target_modules against its layers (the model's skeleton on the meta
device: torch and transformers are imported for that alone). The config is read, not declared a
dependency: the stages themselves check again, for a model whose files change under the same
params. It checks the local task files params tasks.names lists too (found under tasks/, and of
the keys and output types lm-eval knows). It writes no output, and nothing depends on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from ftstudy.config import PARAMS_FILE, ConfigError, flatten, load_params
from ftstudy.errors import run_stage

DEMO = Path("assets/demo-params.yaml")  # the demo sandbox's overrides, sized for its tiny model


def demo_settings_left(p) -> str | None:
    """A warning when model.name is not the demo's but the rates are still the demo's (a sandbox
    made by make demo, then -S model.name=...): they suit a 64-wide random model, and train a real
    one at about 40x its rate."""
    if not DEMO.is_file():
        return None
    demo = flatten(yaml.safe_load(DEMO.read_text(encoding="utf-8")))
    mine = {"full.lr": p.full.lr, "lora.lr": p.lora.lr, "train.checkpoint_every": p.train.checkpoint_every}
    kept = [f"{k} {v}" for k, v in mine.items() if v == demo.get(k)]
    if p.model.name == demo.get("model.name") or len(kept) < 2:
        return None
    return (f"check_params: warning: model.name is {p.model.name}, but {', '.join(kept)} are the demo's settings for "
            f"its tiny model ({DEMO}), many times a real model's rate; set them (-S full.lr=... -S lora.lr=...), or "
            "make a sandbox of the shipped params for your model: python -m scripts.sandbox DIR --shipped "
            "-S model.name=... (README, \"Your own model\")")


def model_problems(p, folder: Path) -> list[str]:
    """What in the params does not fit the model whose config.json is in `folder`."""
    from ftstudy import modeling
    from ftstudy.data import examples

    config = json.loads((folder / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("n_positions")
    problems = [e for e in [modeling.context_error(p.model.name, p.data.block_size, context)] if e]
    if p.data.format == "messages" and not examples.has_chat_template(folder):
        problems.append(examples.no_chat_template(p.model.name))
    if isinstance(p.lora.target_modules, tuple):  # auto and all-linear resolve on any model
        from ftstudy.train import lora

        try:
            lora.resolve_targets(modeling.skeleton(folder), p.lora.target_modules)
        except modeling.ModelError as e:
            problems.append(str(e))
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description="Check params.yaml; run by dvc.yaml stage check_params")
    ap.add_argument("--snapshot", required=True, type=Path, help="the pretrained snapshot, if prepare made one (read only)")
    ap.add_argument("--prepared", required=True, type=Path, help="the prepared folder, whose meta names that snapshot")
    args = ap.parse_args()
    p = load_params()
    from ftstudy.measure import benchmarks

    # Local task files are checked here, before any stage runs and DVC deletes an output: else a
    # typo stops tasks@pretrained after both trainings and every evaluation.
    if problems := benchmarks.local_task_problems(p.tasks.names):
        raise ConfigError(f"{PARAMS_FILE}: " + "; ".join(problems))
    from ftstudy import modeling

    if warning := demo_settings_left(p):
        print(warning, flush=True)
    folder = modeling.config_on_this_machine(p.model.name, p.model.revision, args.snapshot, args.prepared / "meta.json")
    if folder is not None and (problems := model_problems(p, folder)):
        raise ConfigError(f"{PARAMS_FILE} does not fit {p.model.name}: " + "; ".join(problems))
    print(f"check_params: {PARAMS_FILE} is valid" + (f", and fits {p.model.name}" if folder is not None else
                                                     " (the model's config is not on this machine yet)"))


if __name__ == "__main__":
    run_stage(main)
