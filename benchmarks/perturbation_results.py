"""Print the perturbation task's results and job costs from a finished run (e.g. `make run`).

    .venv/bin/python benchmarks/perturbation_results.py [--results results]

Tables: the main metrics per dataset (mean over queries), one metric by query category, the mean
score scaled between the controls, and each perturbation run_model job's seconds and peak memory (from
Snakemake's benchmark files).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

from cellarena import results
from cellarena.leaderboard import data

REPO = Path(__file__).resolve().parent.parent
MAIN = ["pearson_delta", "pearson_delta_top20", "mse_top20", "direction_error_top20",
        "pearson_delta_reference", "centroid_accuracy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--category-metric", default="pearson_delta_top20")
    args = ap.parse_args()
    print(describe())
    df = results.read(args.results / "scores.parquet")
    pert = df[df["task"] == "perturbation"]
    print(f"\nruns: {pert.drop_duplicates(['dataset_id', 'split_id', 'model_id']).shape[0]}, "
          f"statuses: {pert.drop_duplicates(['dataset_id', 'split_id', 'model_id'])['status'].value_counts().to_dict()}")
    overall = pert[(pert["subgroup"] == "") & (pert["status"] == "ok")]
    for dataset, rows in overall.groupby("dataset_id"):
        table = rows.pivot_table(index="model_id", columns="metric_id", values="value")
        table = table[[m for m in MAIN if m in table.columns]].sort_values(MAIN[1], ascending=False)
        print(f"\n{dataset} (mean over queries)\n{table.round(3).to_markdown()}")
    cats = data.subgroup_table(df, "perturbation", args.category_metric)
    for dataset, rows in cats.groupby("dataset_id"):
        shown = rows.drop(columns=["dataset_id", "variant"]).dropna(axis=1, how="all")
        print(f"\n{dataset}: {args.category_metric} by query category\n"
              f"{shown.round(3).to_markdown(index=False)}")
    scaled = data.aggregate_scaled(data.scale_by_controls(df).query("task == 'perturbation'"), "perturbation")
    print("\nmean score scaled between the controls\n"
          + scaled[["model_id", "model_kind", "mean_scaled", "n_metrics", "n_missing"]].round(3).to_markdown(index=False))
    jobs = []
    for tsv in sorted((args.results / "benchmarks" / "run_perturbation").glob("*/*/*.tsv")):
        bench = pd.read_csv(tsv, sep="\t")
        jobs.append({"dataset": tsv.parent.parent.name, "split": tsv.parent.name, "model": tsv.stem,
                     "seconds": round(float(bench["s"].iloc[0]), 1),
                     "max_rss_mb": round(float(bench["max_rss"].iloc[0]))})
    if jobs:
        print("\nperturbation run_model jobs\n" + pd.DataFrame(jobs).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
