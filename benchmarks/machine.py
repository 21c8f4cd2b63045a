"""What machine a benchmark ran on, for the tables the scripts print."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from cellarena.run.environment import cpu_model


def describe() -> str:
    """CPU model, cores, memory, Python version and load average."""
    try:
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
        mem = f"{mem_kb / 1024**2:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = "? RAM"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), {mem}, "
            f"Python {platform.python_version()}, load average {load:.1f}")
