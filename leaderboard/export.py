"""Static export of the leaderboard: per-task ranking CSVs (raw and scaled between controls), the
QC flags, and one self-contained HTML page.

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
.qc-note { background: #fdecea; border-left: 4px solid #d9534f; padding: 0.5em 1em; }
.explain { color: #555; max-width: 60em; }
"""


def _silver_datasets(runs: pd.DataFrame) -> list[str]:
    return sorted(runs.loc[runs["label_quality"] == "silver", "dataset_id"].unique())


def _label_list(runs: pd.DataFrame) -> str:
    pairs = runs[["dataset_id", "label_quality"]].drop_duplicates().sort_values("dataset_id")
    return ", ".join(f"{d} ({q})" for d, q in pairs.itertuples(index=False))


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.3f}", border=0)


def _qc_html(qc: pd.DataFrame) -> str:
    flagged = qc[qc["flagged"]]
    if flagged.empty and not (qc["n_methods"] > 0).any():
        note = "<p>No method value could be compared with a control range.</p>"
    elif flagged.empty:
        note = (f"<p>No metric has more than {data.QC_MAX_OUTSIDE_PERCENT} % of its non-control "
                "values outside the control range.</p>")
    else:
        items = "".join(
            f"<li>{html.escape(r.metric_id)} on {html.escape(r.dataset_id)}: {r.n_outside} of "
            f"{r.n_methods} method values outside the control range ({r.n_above_best} above the "
            f"best control, {r.n_below_worst} below the worst)</li>"
            for r in flagged.itertuples())
        note = (f'<div class="qc-note"><b>Flagged metrics</b> (more than '
                f"{data.QC_MAX_OUTSIDE_PERCENT} % of the non-control values outside the control "
                f"range; clipped scaled scores hide differences there):<ul>{items}</ul></div>")
    return note + _table_html(qc)


def _section(df: pd.DataFrame, task: str, scaled: pd.DataFrame) -> str:
    ranking = data.with_setting(data.rank_models(df, task), task)
    runs = data.run_table(data.filter_scores(df, task=task))
    task_scaled = scaled[scaled["task"] == task]
    parts = [f'<h2 id="{task}">{html.escape(task)}</h2>',
             f"<p>Datasets and label quality: {html.escape(_label_list(runs))}</p>"]
    silver = _silver_datasets(runs)
    if silver:
        parts.append(
            f'<p class="silver-note"><b>Silver labels</b> on {html.escape(", ".join(silver))}: '
            "these cell-type labels were derived by a documented procedure (see the dataset "
            "card), not curated by experts, so scores on these datasets are indicative.</p>"
        )
    synthetic = data.synthetic_datasets(runs)
    if synthetic:
        parts.append(
            f'<p class="silver-note"><b>Synthetic data</b> in {html.escape(", ".join(synthetic))}: a '
            "simulated response on real background cells, used to check the pipeline against a "
            "known truth; its scores say nothing about biology.</p>"
        )
    submitted = data.submitted_models(runs)
    if not submitted.empty:
        items = "; ".join(f"{r.model_id} ({r.n_runs} runs on {r.ran_on}, commit {r.git_commit})"
                          for r in submitted.itertuples())
        parts.append(f'<p class="silver-note"><b>Submitted results</b>: {html.escape(items)}. Supplied with '
                     "the model's pull request and checked against this suite's results schema, dataset "
                     "versions and split hashes; not re-run here.</p>")
    if task == "zero_shot":
        refs = sorted(runs.loc[runs["model_kind"] == "baseline", "model_id"].unique())
        if refs:
            parts.append(f"<p><b>References, not zero-shot:</b> {html.escape(', '.join(refs))} "
                         "are trained on the evaluation data itself (see the setting column).</p>")
    overall = ""
    if task in data.OVERALL_WEIGHTS:
        weights = " + ".join(f"{w:g} &times; {g}" for g, w in data.OVERALL_WEIGHTS[task].items())
        overall = f" overall = {weights}, NaN when a group has no scaled metric."
    parts += ["<h3>Ranking: raw metric values</h3>", _table_html(ranking), *_leakage_html(df, task),
              "<h3>Ranking: scaled between controls</h3>",
              _table_html(data.aggregate_scaled(task_scaled, task)),
              '<p class="explain">Each value is scaled between the controls of its dataset, split, '
              "seed and metric (0 = worst control, 1 = best control, lower-is-better metrics "
              "flipped, clipped to [0, 1]), then averaged over metrics and over datasets, splits "
              f"and seeds.{overall} n_metrics: scaled values used; n_missing: values left out "
              "(failed, not applicable, not reported, or controls too close to scale), never counted "
              "as 0.</p>",
              "<h3>QC: metric values outside the control range</h3>",
              _qc_html(data.qc_flags(task_scaled)),
              *(_category_html(df, task) if task == "perturbation" else []),
              *_tuning_html(df, task),
              "<h3>Compute cost</h3>",
              "<p>Seconds of each model's own work (fit + predict, or embed; metrics excluded), "
              "summed over its successful runs; pretrain_s is the one-off pretraining of an "
              "in-suite model; attention is the kernel its runs reported.</p>",
              _table_html(data.compute_cost(df, task)),
              "<h3>Runs and provenance</h3>", _table_html(runs)]
    return "\n".join(parts)


def _leakage_html(df: pd.DataFrame, task: str) -> list[str]:
    """When a model was evaluated on cells of its own pretraining corpus: the ranking again with
    those results replaced by the task's reference model, and what was replaced."""
    imputed, changes = data.apply_leakage(df, "impute")
    changes = changes[changes["task"] == task]
    if changes.empty:
        return []
    return ["<h3>Leakage-imputed ranking</h3>",
            '<p class="silver-note">Results marked <b>leaked</b> (evaluation cells in the model\'s '
            "pretraining corpus) are replaced by the reference model "
            f"<code>{html.escape(data.LEAKAGE_REFERENCE.get(task, ''))}</code> on the same dataset, split, "
            "seed and metric:</p>",
            _table_html(changes.drop(columns=["task"])),
            _table_html(data.with_setting(data.rank_models(imputed, task), task))]


def _tuning_html(df: pd.DataFrame, task: str) -> list[str]:
    table = data.tuning_table(df, task)
    if table.empty:
        return []
    return ["<h3>Tuned vs default</h3>",
            "<p>Every tuned model had the same budget. default / tuned: the test-set metric; gain = "
            "tuned − default (positive = tuning helped); inner_default / inner_best: the tuning "
            "objective on training cells only, for the defaults and the best trial.</p>",
            _table_html(table)]


def _category_html(df: pd.DataFrame, task: str, metric_id: str = "pearson_delta_top20") -> list[str]:
    table = data.subgroup_table(df, task, metric_id)
    if table.empty:
        return []
    return [f"<h3>By query category: {html.escape(metric_id)}</h3>",
            "<p>Mean over the queries of each category: single_unseen = a target never seen in "
            "training; double_seenK = a pair of which K singles were seen; on held-out cell-type "
            "splits, the held-out cell type.</p>", _table_html(table)]


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    table.to_csv(path, index=False, lineterminator="\n")
    return path


def export_static(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write per task present in ``df`` ``ranking_<task>.csv`` (raw) and ``scaled_<task>.csv``
    (scaled between controls), then ``qc_flags.csv`` (all tasks) and ``index.html``.

    Returns the written paths in that order (tasks in :data:`cellarena.results.TASKS` order).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in results.TASKS if t in set(df["task"])]
    scaled = data.scale_by_controls(df)
    written: list[Path] = []
    for task in tasks:
        written.append(_write_csv(data.with_setting(data.rank_models(df, task), task),
                                  out_dir / f"ranking_{task}.csv"))
        written.append(_write_csv(data.aggregate_scaled(scaled, task),
                                  out_dir / f"scaled_{task}.csv"))
    written.append(_write_csv(data.qc_flags(scaled), out_dir / "qc_flags.csv"))

    body = "\n".join(_section(df, t, scaled) for t in tasks) or "<p>No results yet.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>cellarena leaderboard</title><style>{_CSS}</style></head>
<body>
<h1>cellarena leaderboard</h1>
<p class="explain">Models are ranked per dataset, split and seed on every metric (rank 1 = best,
metric direction respected, ties share the average rank); mean_rank averages over metrics and then
over datasets/splits/seeds. Metric columns are means of successful runs. Failed or not-applicable
runs are not scored; they are counted in the status column and listed with their reason in the
runs table. The second table of each task scales every value between the controls run on the same
dataset, split, seed and metric (0 = worst control, 1 = best control), so that metrics can be
averaged; the QC table says how often methods fall outside that control range.</p>
{body}
</body>
</html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8", newline="\n")
    written.append(index)
    return written
