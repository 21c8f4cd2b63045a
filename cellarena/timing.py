"""Where a workflow job's time goes: starting its processes, reading its inputs, the work itself.

The guard that starts every job (cellarena/placeholder.py) puts the moment its own process was
created in ``$CELLARENA_JOB_T0``; the job's command then notes when it first reads its data, how long
reading takes, how many sandbox hosts and model processes it starts, and, as it ends, prints one
line to its log::

    cellarena timing: {"start_s": 3.1, "read_s": 0.4, "host_s": 2.2, "processes": 9, ...}

``benchmarks/time_dag.py`` adds these up per rule. Outside a workflow job (no ``$CELLARENA_JOB_T0``)
nothing is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

T0_ENV = "CELLARENA_JOB_T0"
PREFIX = "cellarena timing: "


def process_start() -> float:
    """When this process was created (Unix time, to about 10 ms: its start in clock ticks since boot
    against the uptime now, Linux /proc), else now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Clock:
    """The current job's figures (one per process: :data:`CLOCK`)."""

    def __init__(self):
        self.first_read: float | None = None
        self.command_start: float | None = None  # when the command's own work began
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def span(self, name: str):
        """Time a block under ``name`` (``read``: the first one also ends the job's start-up; a command
        that reads nothing through it ends its start-up when it begins, ``command_start``)."""
        t0 = time.time()
        if name == "read" and self.first_read is None:
            self.first_read = t0
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def report(self, stream=None) -> dict | None:
        """Print the job's timing line (only inside a workflow job) and return it."""
        t0 = os.environ.get(T0_ENV)
        if not t0:
            return None
        end = self.first_read or self.command_start or time.time()
        line = {"start_s": round(end - float(t0), 3), **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()},
                # the guard, the command, each sandbox host, each model process forked
                "processes": 2 + self.counts.get("hosts", 0) + self.counts.get("forks", 0),
                **self.counts}
        print(PREFIX + json.dumps(line, sort_keys=True), file=stream or sys.stdout, flush=True)
        return line


CLOCK = Clock()
