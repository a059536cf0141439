"""The docs' generated tables: a script that measures or computes a table writes it into its page
itself, between markers, with the machine, the date and the command that made it, so no figure is
typed by hand and each says where it comes from.

    <!-- begin: NAME -->
    ...written by the script...
    <!-- end: NAME -->
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def machine() -> str:
    """'AMD EPYC 7B13, 2 cores' (the CPU model from /proc/cpuinfo), and the GPU where there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            text = f"{torch.cuda.get_device_name()} ({text})"
    except ImportError:
        pass
    return text


def stamp(command: str, note: str = "") -> str:
    return f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, by `{command}`{'; ' + note if note else ''}."


def write_block(page: str, name: str, text: str) -> Path:
    """Replace the block NAME of docs/<page> (or of README.md) with `text` (the block must exist:
    the page says where the table goes)."""
    path = ROOT / page if page == "README.md" else DOCS / page
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- begin: {re.escape(name)} -->\n).*?(<!-- end: {re.escape(name)} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: no block '{name}' (<!-- begin: {name} --> ... <!-- end: {name} -->)")
    path.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), doc), encoding="utf-8")
    return path
