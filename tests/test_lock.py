"""The install's lock: requirements.txt pins every package requirements.in's bounds lead to, for
this Python, with no local paths, and leaves torch and the project to their own install lines; the
packages installed here are the ones it pins (make upgrade-check runs the quick tier on newer ones)."""

import os
import re
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def requirements(path):
    """(requirement, raw line) of each requirement line in `path`, comments and options left out."""
    out = []
    for line in path.read_text().splitlines():
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith("#"):
            out.append((Requirement(text), line))
    return out


def test_the_lock_pins_every_package_exactly_and_holds_no_local_paths():
    text = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"file:|--find-links|--index-url|--extra-index-url|^-e|/opt/|/tmp/", text, re.M)
    for req, line in requirements(ROOT / "requirements.txt"):
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", line
    names = {canonicalize_name(r.name) for r, _ in requirements(ROOT / "requirements.txt")}
    assert "torch" not in names and "ftstudy" not in names  # their own install lines, before and after
    bounds = {canonicalize_name(r.name) for r, _ in requirements(ROOT / "requirements.in")}
    assert bounds <= names, f"in requirements.in but not locked: {bounds - names}; run make lock"
    assert "make lock" in text.splitlines()[0]


def test_the_lock_holds_one_version_of_each_package_for_each_supported_python():
    for python in ("3.10", "3.11", "3.12"):
        env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
               "platform_machine": "x86_64", "platform_system": "Linux", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix"}
        seen = {}
        for req, line in requirements(ROOT / "requirements.txt"):
            if req.marker is None or Marker(str(req.marker)).evaluate(env):
                assert canonicalize_name(req.name) not in seen, f"Python {python}: {line} and {seen[req.name]}"
                seen[canonicalize_name(req.name)] = line
        assert {"transformers", "peft", "accelerate", "dvc", "bitsandbytes", "datasets"} <= set(seen)


@pytest.mark.skipif(bool(os.environ.get("FTSTUDY_UPGRADE_CHECK")), reason="make upgrade-check installs newer versions on purpose")
def test_the_installed_packages_are_the_locked_ones():
    wrong = []
    for req, line in requirements(ROOT / "requirements.txt"):
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            wrong.append(f"{req.name} not installed")
            continue
        if installed not in req.specifier:
            wrong.append(f"{req.name} {installed} (locked {req.specifier})")
    assert wrong == [], "install the lock: pip install -r requirements.txt"


@pytest.mark.early
def test_the_locked_pytest_xdist_pair_keeps_a_group_on_one_worker(tmp_path):
    """The suite's cost rests on `--dist loadgroup`: each file marked xdist_group runs on one worker,
    so its module fixtures (the real-shape build, the instruction runs, the cluster study) are built
    once. pytest 9.2 keeps a test's id where pytest-xdist 3.8 no longer writes its group, and every
    group was silently spread over both workers, built twice. A pair that breaks it fails here."""
    import os
    import subprocess
    import sys

    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\npytestmark = pytest.mark.xdist_group('one')\n"
        "@pytest.mark.parametrize('i', range(8))\n"
        "def test_unit(i):\n    pass\n")
    # The pair alone: no other plugin that happens to be installed is loaded (each of three processes
    # would import it; hypothesis alone takes half a second).
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "xdist", "-n", "2", "--dist", "loadgroup", "-p",
                           "no:cacheprovider", "-v"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    workers = set(re.findall(r"^\[(gw\d+)\] .*PASSED", proc.stdout, re.M))
    assert len(workers) == 1, f"an xdist_group ran on {sorted(workers)}: pin pytest and pytest-xdist to a pair that groups"
