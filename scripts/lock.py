"""The install's lock: requirements.in (the bounds a person edits) -> requirements.txt (every
package pinned), and the check that the newest versions the bounds admit still pass.

    python -m scripts.lock                   # make lock: resolve requirements.in into requirements.txt
    python -m scripts.lock --upgrade-check   # make upgrade-check: newest versions in a throwaway venv, quick tier

The lock is resolved by uv (`pip install uv`) for every Python the project supports (3.10 on,
`--universal`), from the package index alone: no local paths or extra indexes are written into it.
torch is left out of the resolution (it is installed first, by its own pinned line: the CPU build
here, the CUDA build or the image's torch on a GPU), and so is this project (`pip install -e .
--no-deps` comes after).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
BOUNDS, LOCK = ROOT / "requirements.in", ROOT / "requirements.txt"
TORCH = "torch==2.13.0"  # the pinned line README and .ci/run install first
LOWEST_PYTHON = "3.10"

HEADER = f"""\
# The lock: every package pinned, generated from requirements.in by `make lock` (python -m scripts.lock:
# uv pip compile requirements.in --universal --python-version {LOWEST_PYTHON}, torch excluded); do not edit.
# Install torch first, by its own pinned line ({TORCH}: the CPU build; a GPU machine keeps its
# CUDA build or the image's torch), then this file, then the project itself:
#   pip install {TORCH} && pip install -r requirements.txt && pip install --no-deps -e .
# torch and the project are left out on purpose. Moving the lock: docs/development.md.
"""


def uv() -> str:
    found = shutil.which("uv")
    if found is None:
        sys.exit("lock: uv is not installed; pip install uv (it resolves the lock for every supported Python)")
    return found


def lock() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        excludes = Path(tmp) / "excludes.txt"
        excludes.write_text("torch\n")
        out = Path(tmp) / "requirements.txt"
        if LOCK.is_file():  # uv keeps the versions an existing output pins: a new bound moves only what it must
            shutil.copy(LOCK, out)
        subprocess.run([uv(), "pip", "compile", str(BOUNDS.relative_to(ROOT)), "--universal",
                        "--python-version", LOWEST_PYTHON, "--excludes", str(excludes), "--no-header",
                        "--annotation-style", "line", "--quiet", "-o", str(out)],
                       cwd=ROOT, check=True, env=os.environ | {"UV_CUSTOM_COMPILE_COMMAND": "make lock"})
        body = out.read_text()
    LOCK.write_text(HEADER + body)
    pinned = sum(1 for line in body.splitlines() if "==" in line and not line.startswith("#"))
    print(f"lock: {pinned} pins from {BOUNDS.name}; wrote {LOCK.name}")


def locked_versions() -> dict[str, str]:
    """The lock's version of each package for this Python (its markers evaluated here)."""
    from packaging.requirements import Requirement

    out = {}
    for line in LOCK.read_text().splitlines():
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith("#"):
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate():
                out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return out


def upgrade_check() -> int:
    """The newest versions requirements.in admits, in a fresh venv, then the quick tier there."""
    venv = Path(tempfile.mkdtemp(prefix="ftstudy-upgrade-check-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [TORCH], check=True)
        subprocess.run(pip + ["--upgrade", "-r", str(BOUNDS)], check=True, cwd=ROOT)
        subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
        freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                                check=True, capture_output=True, text=True).stdout
        locked = locked_versions()
        moved = [f"{name} {locked[name]} -> {version}" for name, version in
                 (line.split("==", 1) for line in freeze.splitlines() if "==" in line)
                 if canonicalize_name(name) in locked and locked[canonicalize_name(name)] != version]
        print("upgrade-check: newer than the lock: " + (", ".join(moved) if moved else "nothing"))
        rc = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=os.environ | {"FTSTUDY_UPGRADE_CHECK": "1"}).returncode
        print(f"upgrade-check: the quick tier {'passed' if rc == 0 else 'FAILED'} on the newest versions; "
              + ("`make lock` moves the lock to them" if rc == 0 else "keep the lock, and fix or bound the package"))
        return rc
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upgrade-check", action="store_true",
                    help="install the newest versions the bounds admit into a throwaway venv and run the quick tier")
    args = ap.parse_args(argv)
    if args.upgrade_check:
        return upgrade_check()
    lock()
    return 0


if __name__ == "__main__":
    sys.exit(main())
