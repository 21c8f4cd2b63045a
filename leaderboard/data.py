"""Pure table logic of the leaderboard: the long results table in, display tables out.

Everything here works on the long table of :mod:`cellarena.results` (one row per
run x metric x subgroup). Only :func:`rank_models` and :func:`wide` pivot to one column per
metric, and only at the very end, so a new metric never needs code changes here.
No Streamlit, no plotting, no I/O apart from :func:`load_scores`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cellarena import results

# One run = one model variant fit and evaluated on one split (split ids already contain the seed,
# but the seed is kept as its own key so it is visible in every table).
RUN_KEYS: list[str] = ["task", "dataset_id", "split_id", "seed", "model_id", "variant"]
# Ranks are computed among the models that share one of these groups.
GROUP_KEYS: list[str] = ["dataset_id", "split_id", "seed"]
ENTRY_KEYS: list[str] = ["model_id", "variant"]

PROVENANCE_COLUMNS: list[str] = [
    "model_kind", "model_version", "dataset_version", "label_quality", "status", "status_reason",
    "n_train", "n_test", "wall_s", "peak_rss_mb", "split_hash", "git_commit", "suite_version",
    "device", "created_utc",
]

# Worst status first: a run with any failed metric row counts as failed.
_STATUS_SEVERITY = ("failed", "not_applicable", "ok")


def load_scores(path: str | Path) -> pd.DataFrame:
    """Read the results parquet at ``path`` and validate it against the results schema.

    Raises :class:`cellarena.results.SchemaError` if the file is missing or malformed.
    """
    return results.read(path)


def filter_scores(
    df: pd.DataFrame,
    *,
    task: str | None = None,
    datasets: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
    include_subgroups: bool = False,
) -> pd.DataFrame:
    """Return the rows of ``df`` that match the filters, index reset.

    ``None`` means "no filter"; an empty list keeps nothing. Rows with a non-empty ``subgroup``
    (per-class values) are dropped unless ``include_subgroups`` is true.
    """
    keep = pd.Series(True, index=df.index)
    if task is not None:
        keep &= df["task"] == task
    if datasets is not None:
        keep &= df["dataset_id"].isin(list(datasets))
    if variants is not None:
        keep &= df["variant"].isin(list(variants))
    if not include_subgroups:
        keep &= df["subgroup"] == ""
    return df.loc[keep].reset_index(drop=True)


def _run_status(statuses: pd.Series) -> str:
    present = set(statuses)
    return next(s for s in _STATUS_SEVERITY if s in present)


def _join_unique(values: pd.Series) -> str:
    return "; ".join(dict.fromkeys(v for v in values if v))


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (``RUN_KEYS``) with its provenance, sorted by the run keys.

    A run's status is its worst metric status (failed > not_applicable > ok) and its
    ``status_reason`` joins the distinct non-empty reasons of its rows.
    """
    cols = RUN_KEYS + PROVENANCE_COLUMNS
    if df.empty:
        return pd.DataFrame(columns=cols)
    grouped = df.groupby(RUN_KEYS, sort=True, dropna=False)
    first = [c for c in PROVENANCE_COLUMNS if c not in ("status", "status_reason")]
    out = grouped[first].first()
    out["status"] = grouped["status"].agg(_run_status)
    out["status_reason"] = grouped["status_reason"].agg(_join_unique)
    return out.reset_index()[cols]


def _ordered_join(values: Iterable[str], order: tuple[str, ...]) -> str:
    present = set(values)
    known = [v for v in order if v in present]
    return ", ".join(known + sorted(present - set(order)))


def _status_summary(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in results.STATUSES if s in counts)


def rank_models(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Ranking table of one task: one row per (model_id, variant).

    Only overall rows (``subgroup == ''``) are used. Columns:

    - ``model_id``, ``variant``, ``model_kind``
    - ``mean_rank``: within each (dataset_id, split_id, seed) the ``ok`` rows of every metric are
      ranked across models (1 = best, ``higher_is_better`` respected, ties share the average
      rank); a model's ranks are averaged over metrics within each group, then over groups.
    - one column per metric_id: the mean of the ``ok`` values over all datasets/splits/seeds.
    - ``n_datasets``: datasets with at least one ``ok`` value.
    - ``status``: run counts per status, e.g. ``"1 ok, 1 failed"``.
    - ``label_quality``: label qualities of the datasets this model was run on, e.g.
      ``"expert, silver"``.

    Failed / not_applicable runs are never scored: they get no rank and no value, and only show
    up in ``status``. Sorted by ``mean_rank`` (NaN last), then model_id and variant.
    """
    rows = filter_scores(df, task=task)
    # Sorting first fixes the summation order, so float means do not depend on input row order.
    ok = rows[rows["status"] == "ok"].sort_values(RUN_KEYS + ["metric_id"], kind="mergesort")
    metrics = sorted(ok["metric_id"].unique())
    head = ENTRY_KEYS + ["model_kind", "mean_rank"]
    tail = ["n_datasets", "status", "label_quality"]
    if rows.empty:
        return pd.DataFrame(columns=head + metrics + tail)

    runs = run_table(rows)
    entries = runs.groupby(ENTRY_KEYS, sort=True).agg(
        model_kind=("model_kind", lambda s: _ordered_join(s, results.MODEL_KINDS)),
        status=("status", _status_summary),
        label_quality=("label_quality", lambda s: _ordered_join(s, results.LABEL_QUALITIES)),
    )

    # Rank per group and metric. Flipping the sign makes "smaller is better" hold for every row.
    ok = ok.assign(_score=ok["value"].where(~ok["higher_is_better"], -ok["value"]))
    ok["_rank"] = ok.groupby(GROUP_KEYS + ["metric_id"])["_score"].rank(method="average")
    per_group = ok.groupby(GROUP_KEYS + ENTRY_KEYS)["_rank"].mean()
    entries["mean_rank"] = per_group.groupby(ENTRY_KEYS).mean()

    means = ok.pivot_table(index=ENTRY_KEYS, columns="metric_id", values="value", aggfunc="mean")
    entries = entries.join(means, how="left")
    entries["n_datasets"] = ok.groupby(ENTRY_KEYS)["dataset_id"].nunique()
    entries["n_datasets"] = entries["n_datasets"].fillna(0).astype("int64")

    out = entries.reset_index()[head + metrics + tail]
    out = out.sort_values(["mean_rank", "model_id", "variant"], na_position="last", kind="mergesort")
    out.columns.name = None
    return out.reset_index(drop=True)


def metric_long(df: pd.DataFrame, task: str, metric_id: str) -> pd.DataFrame:
    """Tidy ``ok`` overall rows of one task and metric, for plotting.

    Columns: model_id, variant, model_kind, dataset_id, label_quality, split_id, seed, value,
    higher_is_better. Sorted by dataset, model, variant, split.
    """
    cols = ["model_id", "variant", "model_kind", "dataset_id", "label_quality", "split_id", "seed",
            "value", "higher_is_better"]
    rows = filter_scores(df, task=task)
    rows = rows[(rows["metric_id"] == metric_id) & (rows["status"] == "ok")]
    rows = rows.sort_values(["dataset_id", "model_id", "variant", "split_id"], kind="mergesort")
    return rows[cols].reset_index(drop=True)


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """Pivot long rows to one row per run (plus subgroup) and one column per metric_id.

    The index columns are ``RUN_KEYS``, plus ``subgroup`` when any row has a non-empty one.
    Values of non-ok rows stay NaN. Metric columns are sorted by name.
    """
    index = RUN_KEYS + (["subgroup"] if (df["subgroup"] != "").any() else [])
    if df.empty:
        return pd.DataFrame(columns=index)
    out = df.pivot(index=index, columns="metric_id", values="value")
    out = out.sort_index().reindex(sorted(out.columns), axis=1)
    out.columns.name = None
    return out.reset_index()
