"""params.yaml -> typed, frozen config objects, validated before any model or data is loaded.

Every problem (unknown key, missing key, wrong type, bad range) is collected and reported in one
ConfigError that names each key, so a run never starts on a typo: DVC refuses `-S lora.rr=16`,
but `-S +lora.rr=16` or a hand edit adds a key without a word.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

import yaml

from ftstudy.errors import StudyError

PARAMS_FILE = "params.yaml"


class ConfigError(StudyError):
    """Raised with one line per problem, each naming the params key."""


# PEFT's init_lora_weights values that need no data pass (besides true, false and pissa_niter_<n>).
LORA_INITS = ("gaussian", "orthogonal", "pissa", "olora")
# Answer metrics (ftstudy.measure.answers.METRICS), without importing it.
ANSWER_METRICS = ("exact_match", "f1", "rouge_l", "chrf")
# Accelerate's tracker names (accelerate.utils.LoggerType), without importing it.
TRACKERS = {"aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb"}


def _check(predicate, message):
    return {"check": (predicate, message)}


_positive = _check(lambda v: v > 0, "must be > 0")
_finite_positive = _check(lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_non_negative = _check(lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
_non_empty = _check(lambda v: len(v) > 0, "must not be empty")


_revision = _check(lambda v: v is None or v.strip() != "", "must be a commit sha, tag or branch, or null")


@dataclass(frozen=True)
class ModelParams:
    name: str = field(metadata=_non_empty)
    revision: str | None = field(metadata=_revision)
    label: str | None = field(metadata=_check(lambda v: v is None or v.strip() != "", "must not be empty (null: the name's last part)"))
    dtype: Literal["auto", "fp32", "bf16", "fp16"]


_fraction = _check(lambda v: 0 < v < 1, "must be in (0, 1)")


@dataclass(frozen=True)
class SourceParams:
    name: str = field(metadata=_non_empty)
    revision: str | None = field(metadata=_revision)
    config: str | None
    split: str = field(metadata=_non_empty)
    text_column: str = field(metadata=_non_empty)

    @property
    def label(self) -> str:
        """Its short name in metrics and the report: <last part of its name>-<split>."""
        return f"{Path(self.name.rstrip('/')).name}-{self.split}"


@dataclass(frozen=True)
class DataParams:
    name: str = field(metadata=_non_empty)
    revision: str | None = field(metadata=_revision)
    config: str | None
    format: Literal["text", "prompt_completion", "messages"]
    text_column: str = field(metadata=_non_empty)
    prompt_column: str = field(metadata=_non_empty)
    completion_column: str = field(metadata=_non_empty)
    messages_column: str = field(metadata=_non_empty)
    train_on_prompt: bool
    validation_fraction: float = field(metadata=_fraction)
    test_fraction: float = field(metadata=_fraction)
    split_seed: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0"))
    block_size: int = field(metadata=_check(lambda v: v >= 2, "must be >= 2 (one context token, one target)"))
    general: list[SourceParams]


@dataclass(frozen=True)
class TrainParams:
    epochs: int = field(metadata=_positive)
    batch_size: int = field(metadata=_positive)
    grad_accum: int = field(metadata=_positive)
    warmup_steps: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0"))
    weight_decay: float = field(metadata=_non_negative)
    max_grad_norm: float = field(metadata=_finite_positive)
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    compile: Literal["auto"] | bool
    gradient_checkpointing: bool
    loss: Literal["chunked", "model"]
    trackers: list[str] = field(metadata=_check(lambda v: set(v) <= TRACKERS,
                                                f"must list trackers Accelerate knows: {', '.join(sorted(TRACKERS))}"))
    log_every: int = field(metadata=_positive)
    eval_every: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0 (0 scores validation once per epoch)"))
    checkpoint_every: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0 (0 turns checkpoints off)"))
    eval_budget: float = field(metadata=_check(lambda v: 0 <= v <= 10, "must be in [0, 10] (0 scores the whole split)"))
    cpu_threads: Literal["auto", "by-load"] | int = field(metadata=_check(
        lambda v: not isinstance(v, int) or v > 0, "must be auto, by-load or a thread count > 0"))


@dataclass(frozen=True)
class FullParams:
    lr: float = field(metadata=_finite_positive)


@dataclass(frozen=True)
class LoraParams:
    r: int = field(metadata=_positive)
    alpha: float = field(metadata=_finite_positive)
    dropout: float = field(metadata=_check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    target_modules: Literal["auto", "all-linear"] | list[str] = field(metadata=_check(
        lambda v: isinstance(v, str) or len(v) > 0, "must not be an empty list (auto picks the family's default)"))
    lr: float = field(metadata=_finite_positive)
    merge: bool
    use_dora: bool
    use_rslora: bool
    init_lora_weights: bool | str = field(metadata=_check(
        lambda v: v in (True, False) or v in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", str(v)) is not None,
        "must be true, false, gaussian, orthogonal, pissa, pissa_niter_<n> or olora (PEFT's names; eva, corda, "
        "loftq and lora_ga need a data pass or a config of their own, which this study does not run)"))
    quantize: Literal["none", "nf4"]


@dataclass(frozen=True)
class EvaluateParams:
    stride: int = field(metadata=_positive)
    batch_size: int = field(metadata=_positive)
    bootstrap_samples: int = field(metadata=_check(lambda v: v >= 100, "must be >= 100"))
    bootstrap_chunk: int = field(metadata=_positive)


@dataclass(frozen=True)
class UpdatesParams:
    energy: float = field(metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    top_k: int = field(metadata=_positive)
    epsilon: float = field(metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))


@dataclass(frozen=True)
class GenerateParams:
    prompt: str = field(metadata=_check(lambda v: v.strip() != "", "must not be empty"))
    extra_prompts: list[str] = field(metadata=_check(lambda v: all(t.strip() for t in v), "must not hold an empty prompt"))
    max_new_tokens: int = field(metadata=_positive)
    num_samples: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0"))
    temperature: float = field(metadata=_check(lambda v: math.isfinite(v) and v >= 0,
                                                "must be >= 0 (0 means greedy)"))
    top_k: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0 (0 turns top-k off)"))
    top_p: float = field(metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    test_prompts: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0"))
    answer_examples: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0 (0 scores no answers)"))
    batch_size: int = field(metadata=_positive)
    answer_metrics: list[str] = field(metadata=_check(
        lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(ANSWER_METRICS),
        f"must list some of {', '.join(ANSWER_METRICS)}, each once"))


def _task_entry(v: str) -> bool:
    name, _, commit = v.partition("@")
    return name.strip() != "" and name == name.strip() and (commit == "" or re.fullmatch(r"[0-9a-f]{7,40}", commit) is not None)


@dataclass(frozen=True)
class TasksParams:
    names: list[str] = field(metadata=_check(lambda v: all(_task_entry(t) for t in v) and len(set(v)) == len(v),
                                              "must be lm-eval task names (pinned as name@<dataset commit sha>) or "
                                              "tasks/<file>.yaml, each once"))
    num_fewshot: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0"))
    batch_size: int = field(metadata=_positive)
    limit: int | None = field(metadata=_check(lambda v: v is None or v > 0, "must be > 0, or null for every item"))
    chat_template: bool
    merge_check: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0 (0 turns the check off)"))
    merge_tolerance: float = field(metadata=_finite_positive)


@dataclass(frozen=True)
class Params:
    seed: int = field(metadata=_check(lambda v: v >= 0, "must be >= 0"))
    model: ModelParams
    data: DataParams
    train: TrainParams
    full: FullParams
    lora: LoraParams
    evaluate: EvaluateParams
    generate: GenerateParams
    tasks: TasksParams
    updates: UpdatesParams


def _is_union(tp) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(tp, value):
    """Return (ok, value). YAML gives ints for floats like `1`, which we accept as floats."""
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp), value
    if _is_union(tp):
        for arg in typing.get_args(tp):
            ok, v = (value is None, None) if arg is type(None) else _coerce(arg, value)
            if ok:
                return True, v
        return False, value
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        pairs = [_coerce(item, v) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp}")


def _build(cls, raw, prefix: str, errors: list[str]):
    if not isinstance(raw, dict):
        errors.append(f"{prefix or 'params'}: expected a mapping of keys, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(prefix + n for n in names)}"
            errors.append(f"{prefix}{key}: unknown key{hint}")
    values = {}
    for f in fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if f.name not in raw:
            errors.append(f"{key}: missing; add it to {PARAMS_FILE} (the shipped file lists every key)")
            continue
        if is_dataclass(tp):
            sub = _build(tp, raw[f.name], key + ".", errors)
            if sub is not None:
                values[f.name] = sub
            continue
        if typing.get_origin(tp) is list and is_dataclass(item := typing.get_args(tp)[0]):
            if not isinstance(raw[f.name], list):
                errors.append(f"{key}: expected a list of mappings, got {raw[f.name]!r}")
                continue
            subs = [_build(item, v, f"{key}[{i}].", errors) for i, v in enumerate(raw[f.name])]
            if all(sub is not None for sub in subs):
                values[f.name] = tuple(subs)
            continue
        ok, value = _coerce(tp, raw[f.name])
        if not ok:
            errors.append(f"{key}: expected {_type_name(tp)}, got {raw[f.name]!r}")
            continue
        predicate, message = f.metadata.get("check", (None, None))
        if predicate is not None and not predicate(value):
            errors.append(f"{key}: {message}, got {value!r}")
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    if len(values) != len(names):
        return None
    return cls(**values)


def _cross_checks(p: Params) -> list[str]:
    errors = []
    if p.evaluate.stride > p.data.block_size:
        errors.append(f"evaluate.stride: must be <= data.block_size ({p.data.block_size}), got {p.evaluate.stride}")
    labels: dict[str, int] = {}
    for i, g in enumerate(p.data.general):
        if (first := labels.setdefault(g.label, i)) != i:
            errors.append(f"data.general[{i}]: its label {g.label!r} (the name's last part and the split) is that of "
                          f"data.general[{first}], and its scores would overwrite those; give one of the two files "
                          "or folders another name")
    if 0 < p.generate.answer_examples < p.generate.test_prompts:
        errors.append(f"generate.answer_examples: {p.generate.answer_examples} is fewer than generate.test_prompts "
                      f"({p.generate.test_prompts}), and the report shows a few of the scored answers; raise it, or 0 "
                      "to score none")
    if p.data.validation_fraction + p.data.test_fraction >= 1:
        errors.append(f"data.validation_fraction + data.test_fraction: {p.data.validation_fraction} + "
                      f"{p.data.test_fraction} leaves no training data; keep their sum under 1")
    return errors


def parse_params(raw) -> Params:
    errors: list[str] = []
    params = _build(Params, raw, "", errors)
    if params is not None:
        errors += _cross_checks(params)
    if errors:
        raise ConfigError(f"{PARAMS_FILE} has {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return params


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root, where {PARAMS_FILE} lives")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_params(raw)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'epochs': 2}} -> {'train.epochs': 2}; lists stay values."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_keys(tree: dict, overrides: dict) -> dict:
    """Set dotted keys (`train.epochs`) in a params mapping, in place, as `dvc exp run -S` does; a key
    or section that the mapping lacks is refused, so a typo in an override never passes silently."""
    for dotted, value in overrides.items():
        node = tree
        *parents, last = dotted.split(".")
        for k in parents:
            if not isinstance(node, dict) or k not in node:
                raise KeyError(f"{dotted}: no section {k!r} in the params")
            node = node[k]
        if last not in node:
            raise KeyError(f"{dotted}: no key {last!r} in the params")
        node[last] = value
    return tree


def override_file(path: str | Path, overrides: dict) -> None:
    """Apply dotted overrides to a params YAML file, keeping its comments and layout."""
    from ruamel.yaml import YAML

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text(encoding="utf-8"))
    set_keys(doc, overrides)
    with open(path, "w", encoding="utf-8") as f:
        rt.dump(doc, f)


def is_local(name: str) -> bool:
    """Whether a model or data name is a local path rather than a Hub id."""
    return Path(name).exists() or name.startswith((".", "/", "~"))
