"""Static export of the leaderboard: per-task ranking CSVs and one self-contained HTML page.

The page uses no JavaScript and no external CSS, so it can be attached to a report or served
from any static host. Given the same results table the output is byte-for-byte identical.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from cellarena import results
from leaderboard import data

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
.silver-note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
.explain { color: #555; max-width: 60em; }
"""


def _silver_datasets(runs: pd.DataFrame) -> list[str]:
    return sorted(runs.loc[runs["label_quality"] == "silver", "dataset_id"].unique())


def _label_list(runs: pd.DataFrame) -> str:
    pairs = runs[["dataset_id", "label_quality"]].drop_duplicates().sort_values("dataset_id")
    return ", ".join(f"{d} ({q})" for d, q in pairs.itertuples(index=False))


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.3f}", border=0)


def _section(df: pd.DataFrame, task: str) -> str:
    ranking = data.rank_models(df, task)
    runs = data.run_table(data.filter_scores(df, task=task))
    parts = [f'<h2 id="{task}">{html.escape(task)}</h2>',
             f"<p>Datasets and label quality: {html.escape(_label_list(runs))}</p>"]
    silver = _silver_datasets(runs)
    if silver:
        parts.append(
            f'<p class="silver-note"><b>Silver labels</b> on {html.escape(", ".join(silver))}: '
            "these cell-type labels were derived by a documented procedure (see the dataset "
            "card), not curated by experts, so scores on these datasets are indicative.</p>"
        )
    parts += ["<h3>Ranking</h3>", _table_html(ranking),
              "<h3>Runs and provenance</h3>", _table_html(runs)]
    return "\n".join(parts)


def export_static(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write ``ranking_<task>.csv`` per task present in ``df`` and ``index.html``.

    Returns the written paths (CSVs in task order, then the HTML page).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in results.TASKS if t in set(df["task"])]
    written: list[Path] = []
    for task in tasks:
        path = out_dir / f"ranking_{task}.csv"
        data.rank_models(df, task).to_csv(path, index=False, lineterminator="\n")
        written.append(path)

    body = "\n".join(_section(df, t) for t in tasks) or "<p>No results yet.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>cellarena leaderboard</title><style>{_CSS}</style></head>
<body>
<h1>cellarena leaderboard</h1>
<p class="explain">Models are ranked per dataset, split and seed on every metric (rank 1 = best,
metric direction respected, ties share the average rank); mean_rank averages over metrics and then
over datasets/splits/seeds. Metric columns are means of successful runs. Failed or not-applicable
runs are not scored; they are counted in the status column and listed with their reason in the
runs table.</p>
{body}
</body>
</html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8", newline="\n")
    written.append(index)
    return written
