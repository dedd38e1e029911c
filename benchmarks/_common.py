"""Shared by the benchmark scripts: the machine line, library versions, writing a docs section."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"


def machine() -> str:
    """CPU model, logical CPUs and the load average now (the machine is shared: say how busy it was)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load:.1f} at the end"


def versions() -> str:
    import deepspeed
    import ray
    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, " \
           f"deepspeed {deepspeed.__version__}"


def write_section(start: str, end: str, title: str, command: str, text: str, doc: Path = DOC) -> None:
    """Replace (or append) the section between the ``start`` / ``end`` markers of docs/benchmarks.md."""
    section = (f"{start}\n## {title}\n\nMeasured {time.strftime('%Y-%m-%d')} with `{command}`.\n\n"
               f"{text}\n{end}\n")
    old = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if start in old and end in old:
        new = old[:old.index(start)] + section + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    doc.write_text(new)
    print(f"wrote the '{title}' section of {doc}")
