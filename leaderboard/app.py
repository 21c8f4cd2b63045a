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


def _task_tab(df: pd.DataFrame, task: str) -> None:
    rows = data.filter_scores(df, task=task)
    if rows.empty:
        st.info("No results for this task yet.")
        return
    runs = data.run_table(rows)
    _silver_note(runs)

    st.subheader("Ranking")
    ranking = data.rank_models(df, task)
    st.table(ranking.style.format(precision=3, na_rep="–"), hide_index=True)
    st.caption("mean_rank: rank 1 = best, averaged over metrics, then over datasets, splits and "
               "seeds. Metric columns: mean over successful runs. Failed runs are not scored, "
               "only counted in the status column.")

    st.subheader("Per-metric scores")
    metrics = sorted(rows.loc[rows["status"] == "ok", "metric_id"].unique())
    if metrics:
        metric = st.selectbox("Metric", metrics, key=f"metric_{task}")
        st.altair_chart(_metric_chart(data.metric_long(df, task, metric), metric))
        st.caption("Bars: mean over splits and seeds of successful runs.")
    else:
        st.info("No successful runs to plot.")

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
        df = _load(str(path), path.stat().st_mtime)
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
        st.caption(f"Scores: `{path}` ({len(df)} rows)")

    shown = data.filter_scores(df, datasets=datasets, variants=variants, include_subgroups=True)
    for tab, task in zip(st.tabs([TASK_TITLES[t] for t in results.TASKS]), results.TASKS):
        with tab:
            _task_tab(shown, task)


if __name__ == "__main__":  # streamlit runs the script as __main__; importing it renders nothing
    main()
