"""Helpers shared by the benchmark scripts: machine facts, a service thread, and writing a section of
docs/benchmarks.md without touching the other sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine_facts() -> str:
    """One line: cores, CPU, torch version and threads, Python, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}, {platform.system()} {platform.release()}")


def write_section(path: Path, heading: str, body: str) -> None:
    """Put `## heading` + body into the markdown file `path`: replace that section if present, else append.

    Only the lines from `## heading` up to the next `## ` heading are replaced; every other section is
    left byte for byte as it was.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
