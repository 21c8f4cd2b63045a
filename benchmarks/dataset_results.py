"""Print each dataset's results from a finished run: every entry's mean over seeds with its interval,
and whether the controls bracket the methods (the leaderboard's QC table).

    .venv/bin/python benchmarks/dataset_results.py --dataset wang2018_starmap_mpfc [--dataset ...]
        [--results results]

For each dataset and task: one line per model (and variant) with the mean and 95 % interval of the
task's headline metrics (`cellarena.tasks`), plus hierarchical F1 and subclass accuracy where the
card maps its labels to Cell Ontology terms and iLISI where the dataset has batches; the models
that are not applicable with their reason; and the QC line: how many method values fall outside
the controls' range.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

from cellarena import results
from cellarena.analysis.intervals import summarize
from cellarena.leaderboard import data
from cellarena.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent
# beside each task's headline metrics, where the task reports them: the Cell-Ontology metrics
# (annotation) and the batch mixing of datasets with batches (zero-shot)
EXTRA_METRICS = ("hierarchical_f1", "subclass_accuracy", "ilisi")


def _cell(row) -> str:
    if pd.isna(row["mean"]):
        return "-"
    if pd.isna(row["ci_low"]):
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def table(df: pd.DataFrame, summary: pd.DataFrame, task: str, dataset: str, metrics: list[str]) -> str:
    s = summary[(summary["task"] == task) & (summary["dataset_id"] == dataset)]
    metrics = [m for m in metrics if m in set(s["metric_id"])]
    if s.empty or not metrics:
        return ""
    s = s[s["metric_id"].isin(metrics)].copy()
    s["entry"] = s["model_id"] + s["variant"].map(lambda v: "" if v in ("", "default") else f" ({v})")
    wide = s.assign(cell=s.apply(_cell, axis=1)).pivot_table(index=["entry", "model_kind"], columns="metric_id",
                                                             values="cell", aggfunc="first")
    wide = wide[metrics]
    order = s[s["metric_id"] == metrics[0]].set_index("entry")["mean"]
    wide = wide.reset_index().assign(_order=lambda w: w["entry"].map(order)).sort_values(
        "_order", ascending=False).drop(columns="_order")
    lines = [wide.to_markdown(index=False)]
    runs = df[(df["task"] == task) & (df["dataset_id"] == dataset) & (df["subgroup"] == "")]
    na = runs[runs["status"] != "ok"].drop_duplicates("model_id")
    for row in na.itertuples():
        reason = row.status_reason if len(row.status_reason) <= 110 else row.status_reason[:107] + "..."
        lines.append(f"- {row.model_id}: {row.status}: {reason}")
    qc = data.qc_flags(runs)
    qc = qc[qc["metric_id"].isin(metrics)]
    if not qc.empty:
        outside = int(qc["n_outside"].sum())
        lines.append(f"QC: {outside} of {int(qc['n_methods'].sum())} method values outside the controls' range "
                     f"on {', '.join(metrics)}"
                     + "".join(f"; {r.metric_id}: above best {r.above_best or '-'}, below worst {r.below_worst or '-'}"
                               for r in qc.itertuples() if r.n_outside))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--dataset", action="append", required=True)
    args = ap.parse_args()
    print(describe())
    df = results.read(args.results / "scores.parquet")
    summary = summarize(df)
    for dataset in args.dataset:
        cells = df[df["dataset_id"] == dataset]
        print(f"\n## {dataset} (version {', '.join(map(str, sorted(cells['dataset_version'].unique())))})")
        for task in TASKS:
            metrics = list(dict.fromkeys([*TASKS[task].headline_metrics, *EXTRA_METRICS]))
            text = table(df, summary, task, dataset, metrics)
            if text:
                print(f"\n{task}\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
