"""Streamlit leaderboard: renders results/scores.parquet, computes nothing but display tables.

Run:  streamlit run leaderboard/app.py -- --scores results/scores.parquet
The scores path comes from ``--scores``, else $CELLARENA_SCORES, else results/scores.parquet.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

# `streamlit run leaderboard/app.py` puts leaderboard/ (not the repo root) on sys.path; make the
# package importable when the project is not pip-installed.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cellarena import results  # noqa: E402
from leaderboard import data  # noqa: E402

DEFAULT_SCORES = "results/scores.parquet"
# Controls in grey so they read as reference points rather than competitors.
KIND_COLORS = {"baseline": "#4c78a8", "control": "#9d9d9d", "transformer": "#e45756",
               "adapter": "#f58518"}
TASK_TITLES = {
    "annotation": "Cell-type annotation",
    "integration": "Batch integration",
    "zero_shot": "Zero-shot embedding",
    "perturbation": "Perturbation response",
}


def scores_path(argv: list[str]) -> Path:
    """``--scores`` from the script arguments, else $CELLARENA_SCORES, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scores", default=None)
    args, _ = parser.parse_known_args(argv)
    return Path(args.scores or os.environ.get("CELLARENA_SCORES") or DEFAULT_SCORES)


@st.cache_data(show_spinner=False)
def _load(path: str, mtime: float) -> pd.DataFrame:
    # mtime is part of the cache key so a rewritten file is re-read.
    return data.load_scores(path)


@st.cache_data(show_spinner=False)
def _scale(path: str, mtime: float, leakage: str) -> pd.DataFrame:
    # Scaled on the whole file, before the sidebar filters, so that hiding a variant or a model
    # never changes the control range of the others; after the leakage policy, so that an imputed
    # value is scaled like any other.
    return data.scale_by_controls(data.apply_leakage(_load(path, mtime), leakage)[0])


LEAKAGE_LABELS = {"show": "show them", "hide": "hide them",
                  "impute": "replace by the task's reference model (leakage-imputed ranking)"}


def _leakage_note(changes: pd.DataFrame, task: str) -> None:
    rows = changes[changes["task"] == task]
    if rows.empty:
        return
    with st.container(key=f"leakage_{task}"):
        st.warning(f"**{rows['model_id'].nunique()} model(s) were evaluated on cells of their own "
                   "pretraining corpus** (leakage = leaked). Their results are "
                   f"{'hidden' if (rows['action'] == 'hidden').all() else 'replaced as listed'} here:",
                   icon="🔒")
        st.table(rows.drop(columns=["task"]), hide_index=True)


def _entry_label(df: pd.DataFrame) -> pd.Series:
    """Model id, with the variant appended when it is not the default one."""
    return df["model_id"].where(df["variant"] == "default",
                                df["model_id"] + " (" + df["variant"] + ")")


def _silver_note(runs: pd.DataFrame) -> None:
    silver = sorted(runs.loc[runs["label_quality"] == "silver", "dataset_id"].unique())
    if silver:
        st.warning(
            f"**Silver labels** on {', '.join(silver)}: these cell-type labels were not curated by "
            "experts, so scores on these datasets are less reliable.",
            icon="⚠️",
        )
    synthetic = data.synthetic_datasets(runs)
    if synthetic:
        st.warning(
            f"**Synthetic data** in {', '.join(synthetic)}: a simulated response on real background "
            "cells, used to check the pipeline against a known truth. Its scores say nothing about "
            "biology.",
            icon="🧪",
        )


def _metric_chart(long: pd.DataFrame, metric_id: str) -> alt.FacetChart:
    long = long.assign(model=_entry_label(long),
                       dataset=long["dataset_id"] + " (" + long["label_quality"] + " labels)")
    higher = bool(long["higher_is_better"].iloc[0])
    order = long.groupby("model")["value"].mean().sort_values(ascending=not higher).index.tolist()
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("model:N", sort=order, title=None, axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("mean(value):Q", title=f"{metric_id} ({'higher' if higher else 'lower'} is better)"),
        color=alt.Color("model_kind:N", title="model kind",
                        scale=alt.Scale(domain=list(KIND_COLORS), range=list(KIND_COLORS.values()))),
        tooltip=["model", "model_kind", "dataset_id", "label_quality",
                 alt.Tooltip("mean(value):Q", format=".3f", title=f"mean {metric_id}"),
                 alt.Tooltip("count(value):Q", title="splits x seeds")],
    ).properties(width=220, height=260)
    return bars.facet(column=alt.Column("dataset:N", title=None))


def _kind_color() -> alt.Color:
    return alt.Color("model_kind:N", title="model kind",
                     scale=alt.Scale(domain=list(KIND_COLORS), range=list(KIND_COLORS.values())))


def _scaled_chart(agg: pd.DataFrame, task: str) -> alt.Chart | alt.LayerChart | None:
    """Integration: bio vs batch scatter; other tasks: mean scaled score per model."""
    agg = agg.assign(model=_entry_label(agg))
    if task == "zero_shot":
        agg["model"] = agg["model"].where(agg["model_kind"] != "baseline",
                                          agg["model"] + " (reference)")
    scale01 = alt.Scale(domain=[0, 1])
    if {"bio", "batch", "overall"} <= set(agg.columns):
        pts = agg.dropna(subset=["bio", "batch"])
        if pts.empty:
            return None
        base = alt.Chart(pts).encode(
            x=alt.X("batch:Q", scale=scale01, title="batch correction (scaled between controls)"),
            y=alt.Y("bio:Q", scale=scale01, title="bio conservation (scaled between controls)"),
        )
        dots = base.mark_circle(size=120).encode(
            color=_kind_color(),
            tooltip=["model", "model_kind",
                     alt.Tooltip("bio:Q", format=".3f"), alt.Tooltip("batch:Q", format=".3f"),
                     alt.Tooltip("overall:Q", format=".3f"), "n_metrics", "n_missing"],
        )
        labels = base.mark_text(align="left", dx=8, fontSize=11).encode(text="model:N")
        return (dots + labels).properties(width=420, height=420)
    bars = agg.dropna(subset=["mean_scaled"])
    if bars.empty:
        return None
    return alt.Chart(bars).mark_bar().encode(
        y=alt.Y("model:N", sort="-x", title=None),
        x=alt.X("mean_scaled:Q", scale=scale01, title="mean score scaled between controls"),
        color=_kind_color(),
        tooltip=["model", "model_kind", alt.Tooltip("mean_scaled:Q", format=".3f"),
                 "n_metrics", "n_missing"],
    ).properties(width=520, height=max(120, 28 * len(bars)))


def _qc_note(qc: pd.DataFrame) -> None:
    """Warn about metrics whose non-control values often leave the control range."""
    flagged = qc[qc["flagged"]]
    if not flagged.empty:
        items = [f"`{r.metric_id}` on {r.dataset_id}: {r.n_outside} of {r.n_methods} method values "
                 f"outside the control range ({r.fraction_outside:.0%}; {r.n_above_best} above "
                 f"the best control, {r.n_below_worst} below the worst)"
                 for r in flagged.itertuples()]
        st.warning(
            f"**QC: metrics flagged** (more than {data.QC_MAX_OUTSIDE_PERCENT} % of the "
            "non-control values fall outside the control range, so the controls do not bracket "
            "the methods and clipped scaled scores hide differences):\n\n- " + "\n- ".join(items),
            icon="🔎",
        )
    elif (qc["n_methods"] > 0).any():
        st.caption(f"QC: no metric has more than {data.QC_MAX_OUTSIDE_PERCENT} % of its "
                   "non-control values outside the control range.")
    unscalable = qc[qc["n_unscalable"] > 0]
    if not unscalable.empty:
        pairs = ", ".join(f"`{r.metric_id}` on {r.dataset_id}" for r in unscalable.itertuples())
        st.caption(f"Not scaled (fewer than two distinct control values): {pairs}. These values "
                   "are left out of the scaled scores and counted in n_missing / n_unscalable.")


def _category_section(df: pd.DataFrame, task: str, metrics: list[str]) -> None:
    st.subheader("By query category")
    default = metrics.index("pearson_delta_top20") if "pearson_delta_top20" in metrics else 0
    metric = st.selectbox("Metric by category", metrics, index=default, key=f"category_metric_{task}")
    table = data.subgroup_table(df, task, metric)
    with st.container(key=f"categories_{task}"):
        st.table(table.style.format(precision=3, na_rep="–"), hide_index=True)
    st.caption("Mean over the queries of each category: single_unseen = a target never seen in "
               "training; double_seenK = a pair of which K singles were seen; on held-out cell-type "
               "splits, the category is the held-out cell type.")


def _task_tab(df: pd.DataFrame, scaled: pd.DataFrame, task: str, changes: pd.DataFrame) -> None:
    rows = data.filter_scores(df, task=task)
    if rows.empty:
        st.info("No results for this task yet.")
        return
    runs = data.run_table(rows)
    _silver_note(runs)
    _leakage_note(changes, task)
    submitted = data.submitted_models(runs)
    if not submitted.empty:
        st.markdown("**Submitted results** (variant `submitted`): "
                    + "; ".join(f"{r.model_id} ({r.n_runs} runs on {r.ran_on}, commit {r.git_commit})"
                                for r in submitted.itertuples())
                    + ". Supplied with the model's pull request and checked against this suite's results "
                      "schema, dataset versions and split hashes; not re-run here.")
    if task == "zero_shot":
        refs = sorted(runs.loc[runs["model_kind"] == "baseline", "model_id"].unique())
        if refs:
            st.markdown(f"**References, not zero-shot:** {', '.join(refs)} are trained on the "
                        "evaluation data itself; they show what a dataset-specific model reaches "
                        "and are labelled in the `setting` column.")

    st.subheader("Ranking: raw metric values")
    ranking = data.with_setting(data.rank_models(df, task), task)
    with st.container(key=f"raw_{task}"):
        st.table(ranking.style.format(precision=3, na_rep="–"), hide_index=True)
    st.caption("mean_rank: rank 1 = best, averaged over metrics, then over datasets, splits and "
               "seeds. Metric columns: mean over successful runs. Failed runs are not scored, "
               "only counted in the status column.")

    st.subheader("Ranking: scaled between controls")
    task_scaled = scaled[scaled["task"] == task]
    agg = data.aggregate_scaled(task_scaled, task)
    with st.container(key=f"scaled_{task}"):
        st.table(agg.style.format(precision=3, na_rep="–"), hide_index=True)
    overall = ""
    if task in data.OVERALL_WEIGHTS:
        weights = " + ".join(f"{w:g} × {g}" for g, w in data.OVERALL_WEIGHTS[task].items())
        overall = f" overall = {weights} (NaN when a group has no scaled metric)."
    st.caption("Each value is scaled between the controls of its dataset, split, seed and metric: "
               "0 = worst control, 1 = best control (lower-is-better metrics flipped), clipped to "
               "[0, 1]; then averaged over metrics, then over datasets, splits and seeds."
               f"{overall} n_metrics: scaled values used; n_missing: values left out (failed, not "
               "applicable, not reported, or not scalable), never counted as 0.")
    _qc_note(data.qc_flags(task_scaled))
    chart = _scaled_chart(agg, task)
    if chart is not None:
        st.altair_chart(chart)
        st.caption("Top right is best: bio conservation and batch correction both at the best "
                   "control's level. Models without both totals are not drawn."
                   if task in data.OVERALL_WEIGHTS else
                   "Mean score scaled between controls (1 = best control, 0 = worst control).")

    st.subheader("Per-metric scores")
    metrics = sorted(rows.loc[rows["status"] == "ok", "metric_id"].unique())
    if metrics:
        metric = st.selectbox("Metric", metrics, key=f"metric_{task}")
        st.altair_chart(_metric_chart(data.metric_long(df, task, metric), metric))
        st.caption("Bars: mean over splits and seeds of successful runs.")
    else:
        st.info("No successful runs to plot.")

    if task == "perturbation" and metrics:
        _category_section(df, task, metrics)

    tuning = data.tuning_table(df, task)
    if not tuning.empty:
        st.subheader("Tuned vs default")
        with st.container(key=f"tuning_{task}"):
            st.table(tuning.style.format(precision=3, na_rep="–"), hide_index=True)
        st.caption("Every tuned model had the same budget (n_trials, inner folds, cells). default and "
                   "tuned: the test-set metric; gain = tuned − default (positive = tuning helped). "
                   "inner_default / inner_best: the tuning objective (inner cross-validation on the "
                   "training cells only, or a label-free held-out loss for embeddings) of the defaults "
                   "and of the best trial.")

    st.subheader("Compute cost")
    cost = data.compute_cost(df, task)
    with st.container(key=f"cost_{task}"):
        st.table(cost.style.format(precision=1, na_rep="–"), hide_index=True)
    st.caption("Seconds of each model's own work (fit + predict, or embed; metrics excluded) summed "
               "over its successful runs, on the device shown; pretrain_s is the one-off "
               "pretraining of an in-suite model; attention is the kernel its runs reported.")

    with st.expander("Runs and provenance"):
        bad = runs[runs["status"] != "ok"]
        if not bad.empty:
            st.markdown("**Runs that did not produce scores**")
            st.table(bad[["dataset_id", "split_id", "model_id", "variant", "status",
                          "status_reason"]], hide_index=True)
        st.markdown("**All runs** (dataset version, split hash, seed, model version, commit)")
        st.dataframe(runs, hide_index=True)


def main() -> None:
    st.set_page_config(page_title="cellarena leaderboard", layout="wide")
    st.title("cellarena leaderboard")
    st.markdown(
        "Single-cell foundation models compared with simple baselines and controls on the same "
        "datasets, splits and seeds. Each tab is one task family; models are ranked per dataset, "
        "split and seed on every metric, then ranks are averaged."
    )
    path = scores_path(sys.argv[1:])
    if not path.exists():
        st.error(f"No results file at `{path}`. Run `make run` to produce it, or pass "
                 "`-- --scores PATH` / set `CELLARENA_SCORES`.")
        st.stop()
    try:
        mtime = path.stat().st_mtime
        df = _load(str(path), mtime)
    except results.SchemaError as exc:
        st.error(f"Cannot read the results file:\n\n```\n{exc}\n```")
        st.stop()

    with st.sidebar:
        st.header("Filters")
        labels = df[["dataset_id", "label_quality"]].drop_duplicates().sort_values("dataset_id")
        quality = dict(labels.itertuples(index=False))
        datasets = st.multiselect(
            "Datasets", list(quality), default=list(quality),
            format_func=lambda d: f"{d} ({quality[d]} labels)",
        )
        all_variants = [v for v in results.VARIANTS if v in set(df["variant"])]
        variants = st.multiselect("Variants", all_variants, default=all_variants)
        leakage = st.radio("Results on cells of the model's own pretraining corpus",
                           list(LEAKAGE_LABELS), format_func=LEAKAGE_LABELS.get, key="leakage_policy")
        st.caption(f"Scores: `{path}` ({len(df)} rows)")

    ranked, changes = data.apply_leakage(df, leakage)
    shown = data.filter_scores(ranked, datasets=datasets, variants=variants, include_subgroups=True)
    scaled = data.filter_scores(_scale(str(path), mtime, leakage), datasets=datasets, variants=variants)
    for tab, task in zip(st.tabs([TASK_TITLES[t] for t in results.TASKS]), results.TASKS):
        with tab:
            _task_tab(shown, scaled, task, changes)


if __name__ == "__main__":  # streamlit runs the script as __main__; importing it renders nothing
    main()
