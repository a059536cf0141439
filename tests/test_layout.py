"""The library's tree reads as the pipeline: rooms in the order the data flows (data, then train and
measure, then report) over a shared ground, each importing only the ground and the rooms before it,
and no module too long to read whole."""

import ast

from conftest import ROOT

ROOMS = {"data": set(), "train": {"data"}, "measure": {"data"}, "report": {"data", "measure"}}
MAX_LINES = 400


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "ground"


def library_files():
    return sorted((ROOT / "ftstudy").rglob("*.py"))


def imported_rooms(path) -> set[str]:
    """The rooms (or the ground) that a library file imports, module level or inside functions."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ftstudy":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "ftstudy" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "ftstudy"]
        else:
            continue
        rooms |= {room_of(n) for n in names}
    return rooms


def test_each_room_imports_only_the_ground_and_the_rooms_before_it():
    wrong = []
    for path in library_files():
        rel = path.relative_to(ROOT / "ftstudy")
        own = rel.parts[0] if len(rel.parts) > 1 else "ground"
        allowed = {"ground", own} | ROOMS.get(own, set())
        if bad := imported_rooms(path) - allowed:
            wrong.append(f"{rel} imports {sorted(bad)}")
    assert wrong == []


def test_every_room_is_a_package_the_install_ships():
    for room in ROOMS:
        assert (ROOT / "ftstudy" / room / "__init__.py").is_file()
    assert 'include = ["ftstudy", "ftstudy.*"]' in (ROOT / "pyproject.toml").read_text()


def test_no_library_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in library_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
