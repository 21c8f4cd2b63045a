"""Print tuned-vs-default gaps and the cost of tuning from a finished run (e.g. `make run`).

    .venv/bin/python benchmarks/tuning_results.py [--results results]

Tables: per task, each tuned model's test-set metric with its defaults and tuned (the leaderboard's
`tuning_table`), the inner objective of the defaults and of the best trial, and the best parameters;
then the seconds and peak memory of every tune_model job (Snakemake benchmark files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

from cellarena import results
from cellarena.tasks import TASKS, TUNED_TASKS
from cellarena.leaderboard import data

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    args = ap.parse_args()
    print(describe())
    df = results.read(args.results / "scores.parquet")
    pairs = [(t, m) for t in TUNED_TASKS for m in (TASKS[t].tuning.report_metric, *TASKS[t].headline_metrics)]
    for task, metric in dict.fromkeys(pairs):
        table = data.tuning_table(df, task, metric)
        if table.empty:
            continue
        table = table.drop(columns=["seed", "model_kind", "metric_id"])
        print(f"\n{task}: test-set {metric}, default vs tuned\n{table.round(4).to_markdown(index=False)}")
        print(f"mean gain over {len(table)} pairs: {table['gain'].mean():+.4f}; "
              f"tuning helped in {int((table['gain'] > 0).sum())}, hurt in {int((table['gain'] < 0).sum())}")
    records = []
    for path in sorted((args.results / "tuning").glob("*/*/*/*.json")):
        rec = json.loads(path.read_text())
        bench = (args.results / "benchmarks" / path.relative_to(args.results)).with_suffix(".tsv")
        cost = pd.read_csv(bench, sep="\t").iloc[0] if bench.exists() else {}
        records.append({"task": rec["task"], "dataset": rec["dataset_id"], "split": rec["split_id"],
                        "model": rec["model_id"], "status": rec["status"], "trials": rec.get("n_trials"),
                        "job_s": cost.get("s"), "max_rss_mb": cost.get("max_rss"),
                        "best_params": json.dumps(rec.get("best_params"), sort_keys=True)})
    if records:
        jobs = pd.DataFrame(records)
        print(f"\ntune_model jobs\n{jobs.round(1).to_markdown(index=False)}")
        print(f"total tune_model job time: {jobs['job_s'].sum():.0f} s over {len(jobs)} jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
