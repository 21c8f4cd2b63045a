"""Time the default DAG of `make run` (installation excluded) and print a table per rule.

    .venv/bin/python benchmarks/time_dag.py [--cores 2] [--cold-cache]
    .venv/bin/python benchmarks/time_dag.py --results results   # a run that already finished

Runs Snakemake with the default config into a fresh temporary results folder. By default the
download cache is the user's (downloads, once cached, are not timed again); --cold-cache uses an
empty one so that fetching is included. Per-rule figures come from Snakemake's benchmark files;
--results prints them for a results folder a finished run left (e.g. after `make run`), without
running anything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent


def per_rule(results: Path) -> pd.DataFrame:
    """Jobs, summed and longest seconds and peak memory per rule, from a run's benchmark files (one
    folder per rule: run_annotation and run_perturbation stay apart though one rule makes both)."""
    rows = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        b = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": rule, "s": float(b["s"].iloc[0]), "max_rss_mb": float(b["max_rss"].iloc[0])})
    return pd.DataFrame(rows).groupby("rule").agg(
        jobs=("s", "size"), total_s=("s", "sum"), max_s=("s", "max"), max_rss_mb=("max_rss_mb", "max"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--cold-cache", action="store_true")
    ap.add_argument("--results", type=Path, default=None, help="summarize this finished run instead")
    args = ap.parse_args()
    if args.results is not None:
        print(f"machine: {describe()}")
        print(per_rule(args.results).round(1).to_string())
        return 0
    with tempfile.TemporaryDirectory(prefix="cellarena-bench-") as tmp:
        env = dict(os.environ)
        if args.cold_cache:
            env["CELLARENA_CACHE"] = str(Path(tmp) / "cache")
        results = Path(tmp) / "results"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/default",
                               "--cores", str(args.cores), "--config", f"results_dir={results}"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        print(f"machine: {describe()}")
        print(f"cache: {'cold (downloads included)' if args.cold_cache else 'warm'}; cores: {args.cores}")
        print(per_rule(results).round(1).to_string())
        print(f"\nDAG wall time: {wall:.1f} s ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
