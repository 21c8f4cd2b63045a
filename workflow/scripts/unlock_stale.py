"""Unlock what a killed Snakemake run left locked, so that `make run` continues where it stopped.

Snakemake locks a run's files in ``.snakemake/locks`` and removes the lock when the run ends. A run
killed with SIGKILL (or a power cut) leaves it behind, and the next run refuses to start until
``snakemake --unlock``. This script runs that unlock only when the lock is stale: when no Snakemake
process is running in this directory. ``make run`` calls it before Snakemake:

    python workflow/scripts/unlock_stale.py .venv/bin/snakemake --profile workflow/profiles/default

The arguments are the Snakemake command the workflow runs with; ``--unlock`` is added to it. When
a Snakemake process runs here, nothing is unlocked: its pid is printed, and Snakemake itself then
says whether its lock conflicts with the next run (runs of other result folders do not). The jobs
the killed run left unfinished are re-run by the next run (the profiles set ``rerun-incomplete``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

LOCKS = Path(".snakemake") / "locks"


def is_snakemake(cmdline: list[str]) -> bool:
    """``snakemake ...``, ``python .../bin/snakemake ...`` or ``python -m snakemake ...``."""
    names = [os.path.basename(part) for part in cmdline[:2]]
    return bool(names) and (names[0] == "snakemake" or names[1:] == ["snakemake"]
                            or cmdline[1:3] == ["-m", "snakemake"])


def snakemake_processes(directory: Path) -> list[psutil.Process]:
    """The Snakemake processes running in ``directory`` (other than this script and its callers)."""
    here = directory.resolve()
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in mine or not is_snakemake(proc.info["cmdline"] or []):
            continue
        try:
            if Path(proc.cwd()).resolve() == here:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or another user's (not in this checkout)
            continue
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if not LOCKS.is_dir() or not any(LOCKS.iterdir()):
        return 0
    live = snakemake_processes(Path.cwd())
    if live:  # their locks are not stale; Snakemake says whether they conflict with the next run
        print(f"not unlocking {LOCKS.resolve()}: Snakemake process(es) {', '.join(str(p.pid) for p in live)} run here "
              "(if the next run cannot lock its files, wait for them to finish, or stop them)", file=sys.stderr)
        return 0
    print(f"unlocking {LOCKS.resolve()}, left by a Snakemake run that was stopped (no Snakemake process runs here)")
    return subprocess.run([*argv, "--unlock"]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
