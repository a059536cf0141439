"""What the report reads: every metrics file the other stages wrote, each with the descriptive facts
beside it (<name>.info.json), the generations and the validation curves -> Inputs. Nothing is
recomputed; perplexities measured under different protocols are refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftstudy import curves
from ftstudy.errors import StudyError
from ftstudy.measure import answers
from ftstudy.outputs import read_json

MODELS = ("pretrained", "full", "lora")
LABELS = {"pretrained": "Pretrained {}", "full": "Fully fine-tuned {}", "lora": "{variant} fine-tuned {}"}


class ReportError(StudyError):
    """The metrics cannot be put side by side."""



def info_path(metrics_file: Path) -> Path:
    """Where a metrics file's descriptive facts live: beside it, as <name>.info.json."""
    return metrics_file.with_suffix(".info.json")


def _metrics(metrics_file: Path) -> dict:
    """A metrics file's numbers: each file keys them by its model or method (its own name)."""
    return read_json(metrics_file)[metrics_file.stem.removeprefix("train_")]


def _with_info(metrics_file: Path) -> dict:
    return _metrics(metrics_file) | read_json(info_path(metrics_file))


def _with_units(compare: dict, info: dict) -> dict:
    """compare's pairs, each with the unit its split's interval resamples (from compare.info.json:
    a metrics file holds numbers only), as the report's sentences name it."""
    units = info["units"]
    return compare | {"paired": {k: v | {"unit": units["test"]} for k, v in compare["paired"].items()},
                      "forgetting": {g: {k: v | {"unit": units[g]} for k, v in pairs.items()}
                                     for g, pairs in compare["forgetting"].items()}}


def _updates(metrics_file: Path) -> dict:
    """Stage updates' metrics with their per-layer facts as "info"; {} where the stage did not run
    (a report rendered from an older run's metrics)."""
    if not metrics_file.is_file():
        return {}
    return _metrics(metrics_file) | {"info": read_json(info_path(metrics_file))}


def _check_protocols(ev: dict) -> dict:
    protocols = {m: ev[m]["protocol"] for m in MODELS}
    if any(p != protocols["pretrained"] for p in protocols.values()):
        raise ReportError("metrics/evaluate/*.json were measured under different protocols "
                          f"({protocols}); rerun the evaluate stages (dvc repro -f -s evaluate) before the report")
    return protocols["pretrained"]


def short_name(name: str) -> str:
    """A hub id's or folder's last part: 'openai-community/gpt2' -> 'gpt2', 'assets/tiny-gpt2' -> 'tiny-gpt2'."""
    return Path(str(name).rstrip("/")).name or str(name)


@dataclass(frozen=True)
class Inputs:
    """Everything the report reads; each metrics file (numbers) has its facts beside it in <name>.info.json."""
    ev: dict         # model -> evaluate metrics and info
    gq: dict         # model -> generation-quality metrics
    gen: dict        # model -> the generation panel
    heldout: dict    # model -> its answers to the held-out test prompts (instruction data; else empty)
    tr: dict         # method -> training metrics and info
    corpus: dict     # split -> token, byte, document and removed-duplicate counts
    prepared: dict   # prepare's facts: inputs (name, revision asked, commit served), text column, split made
    compare: dict    # paired test ratios, forgetting (paired, per general set), time to quality, bootstrap
    protocol: dict   # the evaluation protocol, the same for every model
    curves: dict     # method -> its validation curve (step, seconds, tokens, loss), from the plots
    tasks: dict      # model -> task -> benchmark scores with intervals (stage tasks), and the held-out answers' (generate)
    task_info: dict  # model -> stage tasks' facts: settings, versions, each task's few-shot count and data source
    name: str        # the model's name in the report: params model.label, else model.name's last part
    updates: dict    # stage updates: per method, effective ranks, intruders and update sizes, with "info" (per layer); {} without it

    @classmethod
    def read(cls, metrics_dir: Path, generations_dir: Path, label: str | None = None) -> Inputs:
        """Every metrics file under `metrics_dir`; `label` (params model.label) names the model."""
        ev = {m: _with_info(metrics_dir / "evaluate" / f"{m}.json") for m in MODELS}
        protocol = _check_protocols(ev)
        compare = _with_units(read_json(metrics_dir / "compare.json"), read_json(metrics_dir / "compare.info.json"))
        gq = {m: _metrics(metrics_dir / "generate" / f"{m}.json") for m in MODELS}
        gen = {m: read_json(generations_dir / f"{m}.json") for m in MODELS}
        return cls(ev=ev, gq=gq, gen={m: gen[m]["prompts"] for m in MODELS},
                   heldout={m: gen[m].get("heldout", [])[:gen[m].get("shown")] for m in MODELS},
                   tr={m: _with_info(metrics_dir / f"train_{m}.json") for m in ("full", "lora")},
                   corpus=read_json(metrics_dir / "prepare.json")["corpus"],
                   prepared=read_json(metrics_dir / "prepare.info.json"), compare=compare,
                   protocol=protocol, name=label or short_name(protocol["model"]),
                   curves={m: curves.read_val(metrics_dir / "plots" / f"train_{m}") for m in ("full", "lora")},
                   tasks={m: _metrics(metrics_dir / "tasks" / f"{m}.json")["tasks"]
                          | ({answers.TASK: gq[m]["answers"]} if "answers" in gq[m] else {}) for m in MODELS},
                   task_info={m: read_json(metrics_dir / "tasks" / f"{m}.info.json") for m in MODELS},
                   updates=_updates(metrics_dir / "updates.json"))

    def label(self, model: str) -> str:
        """'LoRA fine-tuned gpt2-medium': the model's own name (model.label, else model.name's last
        part), never an assumed one."""
        return LABELS[model].format(self.name, variant=self.tr["lora"].get("variant", "LoRA"))
