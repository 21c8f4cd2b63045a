"""What starting a plug-in's sandbox costs: the child process and one plug-in instance.

    .venv/bin/python benchmarks/sandbox_start.py [--model models/majority_class] [--repeats 5]

Times `Sandbox(...)` entered, one instance made and the sandbox closed, in a plain child process and
(where bubblewrap can run here) under bubblewrap, and prints the median, min and max seconds of each.
Every model job pays this once; a tuning study once for all its trials.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from machine import describe  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cellarena.run.sandbox import Sandbox, bubblewrap  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "majority_class"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {describe()}")
    print("| isolation | median s | min s | max s |")
    print("|---|---|---|---|")
    modes = ["process"] + (["bubblewrap"] if bubblewrap() else [])
    for mode in modes:
        if mode == "process":
            os.environ["CELLARENA_SANDBOX"] = "process"
        else:
            os.environ.pop("CELLARENA_SANDBOX", None)
        times = []
        for _ in range(args.repeats):
            t0 = time.monotonic()
            with Sandbox(Path(args.model), seed=0, threads=1, time_limit_s=300) as box:
                box.instance({}).close()
            times.append(time.monotonic() - t0)
        print(f"| {mode} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
