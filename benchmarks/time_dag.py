"""Time the default DAG of `make run` (installation excluded) and print a table per rule.

    .venv/bin/python benchmarks/time_dag.py [--cores 2] [--cold-cache] [--keep DIR] [--config seeds=[0]]
    .venv/bin/python benchmarks/time_dag.py --results results   # a run that already finished

Runs Snakemake with the default config into a fresh temporary results folder. By default the
download cache is the user's (downloads, once cached, are not timed again); --cold-cache uses an
empty one so that fetching is included. Per rule: jobs, their summed and longest seconds and peak
memory (Snakemake's benchmark files), the Python processes they started (the guard, the command,
sandbox hosts and the forked process of each model run) and the share of job time spent starting
(from the guard's start to the first read of data) and reading inputs, from the timing line each
job prints to its log (cellarena/timing.py); then the models whose runs took longest. --keep
writes the results to DIR and keeps them. --results prints the table for a results folder a
finished run left (e.g. after `make run`), without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent


def _rule(path: Path, root: Path) -> str:
    """The rule folder of a benchmark or log file (run_annotation and run_perturbation stay apart
    though one rule makes both; the embedding jobs of every dataset are one row, `embed`)."""
    return path.relative_to(root).parts[0].removesuffix(".tsv").removesuffix(".log")


def timings(results: Path) -> pd.DataFrame:
    """The timing line of every job's log (cellarena/timing.py), one row per job."""
    from cellarena.timing import PREFIX  # noqa: PLC0415

    rows = []
    for log in sorted((results / "logs").rglob("*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(PREFIX)]
        if lines:
            rows.append({"rule": _rule(log, results / "logs"), **json.loads(lines[-1][len(PREFIX):])})
    return pd.DataFrame(rows)


def per_rule(results: Path) -> pd.DataFrame:
    """Per rule: jobs, summed and longest seconds, peak memory, processes started, and the shares of
    job time spent starting processes and reading inputs."""
    rows = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": _rule(tsv, results / "benchmarks"), "s": float(b["s"].iloc[0]),
                     "max_rss_mb": float(b["max_rss"].iloc[0])})
    table = pd.DataFrame(rows).groupby("rule").agg(
        jobs=("s", "size"), total_s=("s", "sum"), max_s=("s", "max"), max_rss_mb=("max_rss_mb", "max"))
    t = timings(results)
    if not t.empty:
        for col in ("start_s", "read_s", "host_s", "processes"):
            if col not in t:
                t[col] = 0.0
        sums = t.fillna(0).groupby("rule")[["start_s", "read_s", "host_s", "processes"]].sum()
        table = table.join(sums, how="left")
        table["processes"] = table["processes"].fillna(0).astype(int)
        table["start_%"] = 100 * (table["start_s"] + table["host_s"]) / table["total_s"]
        table["read_%"] = 100 * table["read_s"] / table["total_s"]
        table = table.drop(columns=["start_s", "read_s", "host_s"])
    total = table.sum(numeric_only=True)
    table.loc["all"] = total
    table.loc["all", "max_s"] = table["max_s"].iloc[:-1].max()
    table.loc["all", "max_rss_mb"] = table["max_rss_mb"].iloc[:-1].max()
    if "start_%" in table:
        per = t.fillna(0)
        table.loc["all", "start_%"] = 100 * (per["start_s"].sum() + per["host_s"].sum()) / total["total_s"]
        table.loc["all", "read_%"] = 100 * per["read_s"].sum() / total["total_s"]
    return table


def per_model(results: Path, top: int = 15) -> pd.DataFrame:
    """The models that took longest: seconds of their runs (``wall_s``, the model's own process,
    one value per run) summed per task, model and variant (default or tuned), over datasets,
    splits and seeds."""
    scores = results / "scores.parquet"
    if not scores.exists():
        return pd.DataFrame()
    df = pd.read_parquet(scores, columns=["task", "dataset_id", "split_id", "seed", "model_id", "variant", "wall_s"])
    runs = df.drop_duplicates(["task", "dataset_id", "split_id", "seed", "model_id", "variant"])
    table = runs.groupby(["task", "model_id", "variant"])["wall_s"].agg(runs="size", wall_s="sum")
    return table.sort_values("wall_s", ascending=False).head(top)


def _report(results: Path) -> None:
    print(per_rule(results).round(1).to_string())
    models = per_model(results)
    if not models.empty:
        print("\nlongest models (seconds of their runs, summed over datasets, splits and seeds):")
        print(models.round(1).to_string())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--cold-cache", action="store_true")
    ap.add_argument("--results", type=Path, default=None, help="summarize this finished run instead")
    ap.add_argument("--keep", type=Path, default=None, help="write the run's results here and keep them")
    ap.add_argument("--config", nargs="*", default=[], help="Snakemake --config overrides, e.g. seeds=[0]")
    args = ap.parse_args()
    if args.results is not None:
        print(f"machine: {describe()}")
        _report(args.results)
        return 0
    with tempfile.TemporaryDirectory(prefix="cellarena-bench-") as tmp:
        env = dict(os.environ)
        if args.cold_cache:
            env["CELLARENA_CACHE"] = str(Path(tmp) / "cache")
        results = args.keep.resolve() if args.keep else Path(tmp) / "results"
        overrides = {"results_dir": str(results)}
        for item in args.config:  # KEY=VALUE, the value read as YAML (Snakemake's --config reads [0] as ['0'])
            key, _, value = item.partition("=")
            overrides[key] = yaml.safe_load(value)
        (Path(tmp) / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        t0, load = time.perf_counter(), []
        with open(Path(tmp) / "snakemake.log", "w+") as log:
            proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/default",
                                     "--cores", str(args.cores), "--configfile", str(Path(tmp) / "overrides.yaml")],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            while True:  # the 1-minute load average, every 15 s while the DAG runs
                load.append(os.getloadavg()[0])
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    pass
            wall = time.perf_counter() - t0
            log.seek(0)
            output = log.read()
        if proc.returncode != 0:
            print(output[-4000:], file=sys.stderr)
            return proc.returncode
        print(f"machine: {describe()}")
        print(f"cache: {'cold (downloads included)' if args.cold_cache else 'warm'}; cores: {args.cores}")
        _report(results)
        print(f"\nDAG wall time: {wall:.1f} s ({wall / 60:.1f} min); 1-minute load average while it ran: "
              f"min {min(load):.2f}, mean {sum(load) / len(load):.2f}, max {max(load):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
