"""dvc.yaml tells DVC the truth: each stage depends on every project file it imports, and
params.yaml as a whole is validated by a stage of its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PACKAGES = ("stages", "ftstudy")


def module_file(name: str) -> Path | None:
    """The project file behind a dotted module name, or None for anything outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_files(path: Path) -> set[Path]:
    """Project files that `path` imports anywhere, module level or inside functions, transitively."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a package's __init__ runs too
                    if (f := module_file(".".join(parts[:i]))) is not None and f not in seen:
                        todo.append(f)
    return seen


def stage_entries() -> list[tuple[str, list[str], set[str]]]:
    """(stage name, project modules its command runs, file deps) for every stage."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    out = []
    for name, stage in spec["stages"].items():
        modules = [m for m in re.findall(r"-m ([\w.]+)", stage["cmd"]) if module_file(m) is not None]
        deps = {d for d in stage.get("deps", []) if not d.startswith("$") and d.endswith(".py")}
        out.append((name, modules, deps))
    return out


def stage_files(modules: list[str]) -> set[str]:
    """Every project file that `python -m <module>` runs, for each module: its packages'
    __init__ files and everything they import."""
    files = set()
    for module in modules:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            files |= imported_files(module_file(".".join(parts[:i])))
    return {str(f.relative_to(ROOT)) for f in files}


def missing_deps(modules: list[str], deps: set[str]) -> list[str]:
    return sorted(stage_files(modules) - deps)


@pytest.mark.parametrize("name,modules,deps", stage_entries(), ids=[e[0] for e in stage_entries()])
def test_every_imported_project_file_is_a_dep(name, modules, deps):
    assert missing_deps(modules, deps) == [], f"dvc.yaml stage {name} imports files it does not depend on"


@pytest.mark.parametrize("name,modules,deps", stage_entries(), ids=[e[0] for e in stage_entries()])
def test_no_dep_is_a_file_the_stage_does_not_import(name, modules, deps):
    assert sorted(deps - stage_files(modules)) == [], f"dvc.yaml stage {name} depends on files it never imports"


def test_the_check_finds_a_removed_dep():
    name, modules, deps = next(e for e in stage_entries() if e[0] == "generate")
    assert "ftstudy/data/token_files.py" in deps  # imported through ftstudy/modeling.py
    assert missing_deps(modules, deps - {"ftstudy/data/token_files.py"}) == ["ftstudy/data/token_files.py"]
    _, modules, deps = next(e for e in stage_entries() if e[0] == "train_lora")
    assert modules == ["ftstudy.train.launching", "stages.train_lora"]  # the $(python -m ...) in its command counts
    assert missing_deps(modules, deps - {"ftstudy/train/launching.py"}) == ["ftstudy/train/launching.py"]


def test_stages_folder_holds_exactly_the_dvc_stages():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    files = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert files == set(spec["stages"])


def test_training_code_does_not_import_the_report():
    for module in ("stages.train_full", "stages.train_lora"):
        assert not {"ftstudy/report/reporting.py", "ftstudy/report/findings.py"} & stage_files([module])


REVISION_KEYS = ("model.revision", "data.revision", "data.general")  # each general set has its revision


def covers(listed: list, key: str) -> bool:
    """Whether a stage's params list covers a dotted key (a section covers its keys; `params.yaml:`, all)."""
    names = [p if isinstance(p, str) else next(iter(p)) for p in listed]
    return any(name == "params.yaml" or key == name or key.startswith(name + ".") for name in names)


def test_revision_keys_are_params_of_exactly_the_stages_that_read_them():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    readers = {p.stem for p in (ROOT / "stages").glob("*.py") if re.search(r"\.revision\b", p.read_text())}
    # prepare reads the revision keys, and check_params model.revision to find the model's config in
    # the Hub cache (train_lora reads the commit from the prepared meta)
    assert readers == {"prepare", "check_params"}
    for key in REVISION_KEYS:
        stages = {name for name, stage in spec["stages"].items() if covers(stage.get("params", []), key)}
        assert stages == {"check_params", "prepare"}, (key, stages)  # check_params validates the whole file
    # data.split_seed carves the splits of a source that has none (ftstudy.data.splits); the training seed
    # does not, so a study's seeds share prepare's outputs and its test split.
    assert covers(spec["stages"]["prepare"]["params"], "data.split_seed")
    assert not covers(spec["stages"]["prepare"]["params"], "seed")
    # generate draws its held-out examples by data.split_seed, and samples and resamples by seed.
    assert covers(spec["stages"]["generate"]["params"], "data.split_seed")
    assert covers(spec["stages"]["generate"]["params"], "seed")


# Command-line flags through which a stage is told where to write.
OUTPUT_FLAGS = ("--out", "--pretrained", "--metrics", "--info", "--plots", "--live", "--nll")


def test_every_path_a_stage_writes_is_a_declared_output():
    """Each path a stage's command tells it to write (the live tracker folder included) is one of
    its outs or metrics, as DVC resolves dvc.yaml; so nothing it writes goes untracked."""
    from dvc.repo import Repo

    with Repo(str(ROOT), config={"core": {"no_scm": True}}) as repo:
        for stage in repo.index.stages:
            args = stage.cmd.split()
            written = {args[i + 1] for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS}
            declared = {str(out.def_path) for out in stage.outs}
            # compare writes --nll as a folder it reads; only stages that write there must declare it.
            if stage.addressing == "compare":
                written -= {args[args.index("--nll") + 1]}
            # A path is declared itself, or lies in a declared folder, or is a folder that holds
            # the declared files (evaluate's --nll, generate's --out and --metrics).
            missing = {w for w in written if not any(w == d or w.startswith(d + "/") or d.startswith(w + "/")
                                                     for d in declared)}
            assert not missing, f"{stage.addressing} writes {sorted(missing)} without declaring it"
        assert "metrics/live/train_full" in {str(o.def_path) for s in repo.index.stages for o in s.outs}
