"""Pure table logic of the leaderboard: the long results table in, display tables out.

Everything here works on the long table of :mod:`cellarena.results` (one row per
run x metric x subgroup). Only :func:`rank_models` and :func:`wide` pivot to one column per
metric, and only at the very end, so a new metric never needs code changes here.
No Streamlit, no plotting, no I/O apart from :func:`load_scores`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cellarena import results, tasks

# One run = one model variant fit and evaluated on one split (split ids already contain the seed,
# but the seed is kept as its own key so it is visible in every table).
RUN_KEYS: list[str] = ["task", "dataset_id", "split_id", "seed", "model_id", "variant"]
# Ranks are computed among the models that share one of these groups.
GROUP_KEYS: list[str] = ["dataset_id", "split_id", "seed"]
ENTRY_KEYS: list[str] = ["model_id", "variant"]

PROVENANCE_COLUMNS: list[str] = [
    "model_kind", "model_version", "dataset_version", "label_quality", "leakage", "leaked_fraction",
    "status", "status_reason",
    "n_train", "n_test", "wall_s", "peak_rss_mb", "split_hash", "git_commit", "suite_version",
    "device", "runtime_json", "tuning_json", "environment_json", "created_utc",
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


LEAKAGE_POLICIES = ("show", "hide", "impute")
_MATCH_KEYS = ["task", "dataset_id", "split_id", "seed", "metric_id", "subgroup"]


def apply_leakage(df: pd.DataFrame, policy: str = "show",
                  references: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows to rank under a leakage ``policy``, and what was changed.

    - ``show``: every row as it is;
    - ``hide``: rows whose evaluation cells were in the model's pretraining corpus
      (``leakage == 'leaked'``) are dropped;
    - ``impute``: each leaked row takes the value of the task's reference model (``references``,
      by default each task's :attr:`~cellarena.tasks.Task.leakage_reference`: a baseline that every
      plan runs, the pattern fev uses for time-series foundation models) on the same dataset,
      split, seed, metric and subgroup; a leaked row without such a reference value is dropped.

    The second table has one row per changed run (``task, dataset_id, split_id, seed, model_id,
    variant``) with ``action`` (``hidden`` / ``imputed`` / ``dropped: no reference value``) and
    ``reference``.
    """
    if policy not in LEAKAGE_POLICIES:
        raise ValueError(f"unknown leakage policy {policy!r}; choose one of {LEAKAGE_POLICIES}")
    refs = {**{t.id: t.leakage_reference for t in tasks.TASKS.values()}, **(references or {})}
    changes_cols = ["task", "dataset_id", "split_id", "seed", "model_id", "variant", "action", "reference"]
    leaked = df["leakage"] == "leaked"
    if policy == "show" or not leaked.any():
        return df.reset_index(drop=True), pd.DataFrame(columns=changes_cols)
    run_keys = RUN_KEYS
    if policy == "hide":
        changes = df.loc[leaked, run_keys].drop_duplicates().assign(action="hidden", reference="")
        return df.loc[~leaked].reset_index(drop=True), changes.reset_index(drop=True)[changes_cols]
    ref_rows = df[(df["model_id"] == df["task"].map(refs)) & (df["variant"] == "default")
                  & (df["status"] == "ok")]
    ref_values = ref_rows.set_index(_MATCH_KEYS)["value"]
    out = df.copy()
    idx = out.index[leaked]
    keys = pd.MultiIndex.from_frame(out.loc[idx, _MATCH_KEYS])
    values = ref_values.reindex(keys).to_numpy()
    found = ~np.isnan(values)
    out.loc[idx[found], "value"] = values[found]
    out.loc[idx[found], "status"] = "ok"
    out.loc[idx[found], "status_reason"] = ""
    changed = out.loc[idx, run_keys].assign(
        action=np.where(found, "imputed", "dropped: no reference value"),
        reference=out.loc[idx, "task"].map(refs).to_numpy())
    out = out.drop(index=idx[~found])
    changes = changed.drop_duplicates(run_keys + ["action"]).reset_index(drop=True)[changes_cols]
    return out.reset_index(drop=True), changes


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


def _runtime(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def compute_cost(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Compute cost of each (model_id, variant) on one task, from its successful runs.

    Columns: ``n_runs``; ``total_wall_s`` and ``median_wall_s`` of the model's own work (fit +
    predict, or embed); ``max_peak_rss_mb``; ``pretrain_s`` (one-off pretraining of an in-suite
    model, from the checkpoint its runs report; NaN for others); ``devices``; ``attention`` (the
    attention kernels the runs report, for transformers).
    """
    cols = ["model_id", "variant", "model_kind", "n_runs", "total_wall_s", "median_wall_s",
            "max_peak_rss_mb", "pretrain_s", "devices", "attention"]
    runs = run_table(filter_scores(df, task=task))
    runs = runs[runs["status"] == "ok"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    rt = runs["runtime_json"].map(_runtime)
    runs = runs.assign(pretrain_s=rt.map(lambda r: r.get("pretrain_s")).astype(float),
                       attention=rt.map(lambda r: r.get("attention") or ""))
    g = runs.groupby(["model_id", "variant"], sort=True)
    out = pd.DataFrame({
        "model_kind": g["model_kind"].first(),
        "n_runs": g.size(),
        "total_wall_s": g["wall_s"].sum(min_count=1),
        "median_wall_s": g["wall_s"].median(),
        "max_peak_rss_mb": g["peak_rss_mb"].max(),
        "pretrain_s": g["pretrain_s"].max(),
        "devices": g["device"].agg(lambda s: ", ".join(sorted(set(s)))),
        "attention": g["attention"].agg(lambda s: ", ".join(sorted(set(s) - {""}))),
    }).reset_index()
    return out.sort_values(["total_wall_s", "model_id"], ascending=[False, True],
                           na_position="last").reset_index(drop=True)[cols]


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
    - ``leakage``: leakage statuses of its runs, e.g. ``"clean, unknown"`` (see
      :func:`apply_leakage` for hiding or imputing leaked results).

    Failed / not_applicable runs are never scored: they get no rank and no value, and only show
    up in ``status``. Sorted by ``mean_rank`` (NaN last), then model_id and variant.
    """
    rows = filter_scores(df, task=task)
    # Sorting first fixes the summation order, so float means do not depend on input row order.
    ok = rows[rows["status"] == "ok"].sort_values(RUN_KEYS + ["metric_id"], kind="mergesort")
    metrics = sorted(ok["metric_id"].unique())
    head = ENTRY_KEYS + ["model_kind", "mean_rank"]
    tail = ["n_datasets", "status", "label_quality", "leakage"]
    if rows.empty:
        return pd.DataFrame(columns=head + metrics + tail)

    runs = run_table(rows)
    entries = runs.groupby(ENTRY_KEYS, sort=True).agg(
        model_kind=("model_kind", lambda s: _ordered_join(s, results.MODEL_KINDS)),
        status=("status", _status_summary),
        label_quality=("label_quality", lambda s: _ordered_join(s, results.LABEL_QUALITIES)),
        leakage=("leakage", lambda s: _ordered_join(s, results.LEAKAGE)),
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


def subgroup_table(df: pd.DataFrame, task: str, metric_id: str) -> pd.DataFrame:
    """One metric broken down by subgroup (perturbation: the query category, e.g. double_seen2, or
    the held-out cell type): one row per (dataset_id, model_id, variant), one column per subgroup,
    each the mean over splits and seeds of ``ok`` rows. Empty when the metric has no subgroups."""
    head = ["dataset_id", "model_id", "variant", "model_kind"]
    rows = filter_scores(df, task=task, include_subgroups=True)
    rows = rows[(rows["metric_id"] == metric_id) & (rows["status"] == "ok") & (rows["subgroup"] != "")]
    if rows.empty:
        return pd.DataFrame(columns=head)
    table = rows.pivot_table(index=head, columns="subgroup", values="value", aggfunc="mean", sort=True)
    table.columns.name = None
    return table.reset_index()


def tuning_table(df: pd.DataFrame, task: str, metric_id: str | None = None) -> pd.DataFrame:
    """Tuned next to default: one row per (dataset_id, split_id, seed, model_id) that has both an
    ``ok`` default and an ``ok`` tuned run, with the test-set ``metric_id`` of each, ``gain`` =
    tuned - default (sign flipped for lower-is-better metrics, so positive = tuning helped), and
    from the tuned run's record the trials used and the inner-CV objective of the defaults and of
    the best trial (the objective is on training cells only, so it can disagree with the test).
    ``metric_id`` defaults to the task's :attr:`~cellarena.tasks.Tuning.report_metric` (untuned
    tasks: an empty table). Sorted by dataset, split, seed, model."""
    tuning = tasks.get(task).tuning
    metric_id = metric_id or (tuning.report_metric if tuning else "")
    keys = ["dataset_id", "split_id", "seed", "model_id"]
    cols = keys + ["model_kind", "metric_id", "default", "tuned", "gain", "n_trials", "objective",
                   "inner_default", "inner_best"]
    rows = filter_scores(df, task=task)
    rows = rows[(rows["metric_id"] == metric_id) & (rows["status"] == "ok")]
    default = rows[rows["variant"] == "default"].set_index(keys)
    tuned = rows[rows["variant"] == "tuned"].set_index(keys)
    both = default.index.intersection(tuned.index)
    if both.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(index=both)
    out["model_kind"] = tuned.loc[both, "model_kind"]
    out["metric_id"] = metric_id
    out["default"] = default.loc[both, "value"]
    out["tuned"] = tuned.loc[both, "value"]
    sign = np.where(tuned.loc[both, "higher_is_better"].astype(bool), 1.0, -1.0)
    out["gain"] = sign * (out["tuned"] - out["default"])
    record = tuned.loc[both, "tuning_json"].map(_runtime)
    out["n_trials"] = record.map(lambda r: r.get("n_trials"))
    out["objective"] = record.map(lambda r: r.get("metric", ""))
    out["inner_default"] = record.map(lambda r: r.get("default_value"))
    out["inner_best"] = record.map(lambda r: r.get("best_value"))
    return out.reset_index().sort_values(keys, kind="mergesort")[cols].reset_index(drop=True)


def submitted_models(runs: pd.DataFrame) -> pd.DataFrame:
    """Models with submitted (not re-run) results in a run table: one row per model with its runs,
    where it ran (GPU, or CPU model, from environment_json) and its commits."""
    cols = ["model_id", "n_runs", "ran_on", "git_commit"]
    sub = runs[runs["variant"] == "submitted"]
    if sub.empty:
        return pd.DataFrame(columns=cols)

    def where(text: str) -> str:
        env = _runtime(text)
        return env.get("gpu") or env.get("cpu") or "not recorded"

    out = sub.assign(ran_on=sub["environment_json"].map(where)).groupby("model_id", sort=True).agg(
        n_runs=("split_id", "size"), ran_on=("ran_on", _join_unique), git_commit=("git_commit", _join_unique))
    return out.reset_index()[cols]


def synthetic_datasets(runs: pd.DataFrame) -> list[str]:
    """Datasets whose labels are simulated (label_quality 'synthetic'), for the warning notes."""
    return sorted(runs.loc[runs["label_quality"] == "synthetic", "dataset_id"].unique())


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


# --- scaling between controls ------------------------------------------------------------------
#
# Raw metric values are not comparable across metrics (an accuracy of 0.6 may be excellent on one
# dataset and trivial on another). Every value is therefore rescaled between the controls run on
# the same dataset, split, seed and metric: 0 = the worst control, 1 = the best control. Scores,
# group totals and the integration overall are computed here, at display time; nothing of this is
# ever written back to the results table.

# Values are scaled among the rows sharing these keys (overall rows only, subgroup == '').
SCALE_KEYS: list[str] = ["task", "dataset_id", "split_id", "seed", "metric_id"]
QC_KEYS: list[str] = ["task", "dataset_id", "metric_id"]
AGG_ENTRY_KEYS: list[str] = ["model_id", "variant", "model_kind"]

# scale_status of a row: why it has (or has no) scaled value.
SCALED = "scaled"
NO_VALUE = "no_value"  # status ok but the value is NaN / infinite (cannot happen after validate)
CONSTANT_CONTROLS = "constant_controls"  # the controls' best == worst: no range to scale into
NO_CONTROLS = "no_controls"  # no control has a value for this dataset / split / seed / metric
UNSCALABLE = (CONSTANT_CONTROLS, NO_CONTROLS)
# Failed and not_applicable rows keep their results status as scale_status.

# A metric is flagged when MORE than this percentage of the non-control values fall outside the
# control range (integer percent, so "exactly 10 %" is decided without floating-point error).
QC_MAX_OUTSIDE_PERCENT = 10

def _controls_equal(best: pd.Series, worst: pd.Series) -> pd.Series:
    """True where the control range is empty (up to floating-point noise)."""
    return pd.Series(np.isclose(best.to_numpy(float), worst.to_numpy(float), rtol=1e-9, atol=1e-12),
                     index=best.index)


def scale_by_controls(df: pd.DataFrame) -> pd.DataFrame:
    """Scale each overall value min-max between the worst and the best control.

    Within each ``SCALE_KEYS`` group (task, dataset_id, split_id, seed, metric_id), among rows with
    ``subgroup == ''``: the controls (``model_kind == 'control'``) with an ``ok`` value define the
    range. Lower-is-better metrics are flipped, so 1 = best control and 0 = worst control for every
    metric. Values beyond the range are **not clipped**: a method below the worst control scores
    below 0 (no_change at −0.21 on a perturbation metric), one above the best control above 1, and
    ``outside`` says so.

    Returns the overall rows of ``df`` (per-class subgroup rows are dropped, index reset) with the
    raw ``value`` kept and these columns added:

    - ``control_best`` / ``control_worst``: the range in raw metric units (NaN without controls).
    - ``n_controls``: controls with a value in the group.
    - ``scaled``: the score on the control scale (1 = best control, 0 = worst, beyond either when the
      value is); NaN unless ``scale_status == 'scaled'``.
    - ``outside``: ``'above_best'`` / ``'below_worst'`` when the raw value lies beyond the control
      range, else ``''``.
    - ``scale_status``: ``'scaled'``; ``'failed'`` / ``'not_applicable'`` (the row's status, value
      excluded, never scored as 0); ``'no_value'``; ``'constant_controls'`` (best == worst, the
      metric cannot be scaled); ``'no_controls'``.
    """
    rows = df[df["subgroup"] == ""].reset_index(drop=True).copy()
    value = rows["value"].astype(float)
    higher = rows["higher_is_better"].astype(bool)
    has_value = (rows["status"] == "ok") & np.isfinite(value)
    # Oriented score: larger is better for every metric.
    oriented = value.where(higher, -value)
    control_score = oriented.where(has_value & (rows["model_kind"] == "control"))
    grouped = control_score.groupby([rows[k] for k in SCALE_KEYS], sort=False)
    hi = grouped.transform("max")
    lo = grouped.transform("min")
    n_controls = grouped.transform("count").astype("int64")

    no_controls = n_controls == 0
    constant = ~no_controls & _controls_equal(hi, lo)
    scalable = has_value & ~no_controls & ~constant

    rows["control_best"] = hi.where(higher, -hi)
    rows["control_worst"] = lo.where(higher, -lo)
    rows["n_controls"] = n_controls
    rows["scaled"] = ((oriented - lo) / (hi - lo)).where(scalable)
    rows["outside"] = np.select([scalable & (oriented > hi), scalable & (oriented < lo)],
                                ["above_best", "below_worst"], default="")
    status = np.select(
        [rows["status"] != "ok", ~has_value, no_controls, constant],
        [rows["status"], NO_VALUE, NO_CONTROLS, CONSTANT_CONTROLS],
        default=SCALED,
    )
    rows["scale_status"] = pd.Series(status, index=rows.index, dtype=object)
    return rows


def _scaled(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` itself if it already went through :func:`scale_by_controls`, else scale it."""
    return df if "scale_status" in df.columns else scale_by_controls(df)


def qc_flags(df: pd.DataFrame) -> pd.DataFrame:
    """Per (task, dataset_id, metric_id): how often non-control methods leave the control range.

    ``df`` is the long results table (or the output of :func:`scale_by_controls`). Each
    non-control ``ok`` value is compared with the control range of its own
    split and seed. Columns:

    - ``n_methods``: non-control method values compared (one per model x variant x split x seed).
    - ``n_outside``: those above the best or below the worst control.
    - ``fraction_outside``: ``n_outside / n_methods`` (NaN when nothing could be compared).
    - ``flagged``: more than ``QC_MAX_OUTSIDE_PERCENT`` % outside (exactly 10 % is not flagged).
    - ``n_above_best``, ``n_below_worst``: the split of ``n_outside``.
    - ``n_unscalable``: non-control values not compared because the controls were constant or
      absent.
    - ``worst_control``, ``best_control``: the controls that set the two ends of the range (over
      the splits and seeds, each that did, most often first).
    - ``above_best``, ``below_worst``: the entries (``model_id`` or ``model_id (variant)``) with a
      value beyond that end, so a flag names what crossed which control.

    Sorted by task (in :data:`cellarena.tasks.TASK_IDS` order), dataset and metric.
    """
    cols = QC_KEYS + ["n_methods", "n_outside", "fraction_outside", "flagged", "n_above_best",
                      "n_below_worst", "n_unscalable", "worst_control", "best_control", "above_best",
                      "below_worst"]
    sc = _scaled(df)
    if sc.empty:
        return pd.DataFrame(columns=cols)
    method = sc["model_kind"] != "control"
    counts = pd.DataFrame({
        "n_methods": method & (sc["scale_status"] == SCALED),
        "n_above_best": method & (sc["outside"] == "above_best"),
        "n_below_worst": method & (sc["outside"] == "below_worst"),
        "n_unscalable": method & sc["scale_status"].isin(UNSCALABLE),
    }).astype("int64")
    out = counts.groupby([sc[k] for k in QC_KEYS], sort=True).sum().reset_index()
    out["n_outside"] = out["n_above_best"] + out["n_below_worst"]
    n = out["n_methods"]
    out["fraction_outside"] = (out["n_outside"] / n.where(n > 0)).astype(float)
    out["flagged"] = out["n_outside"] * 100 > QC_MAX_OUTSIDE_PERCENT * n
    names = _qc_names(sc, method)
    key = list(zip(*(out[k] for k in QC_KEYS)))
    for col in ("worst_control", "best_control", "above_best", "below_worst"):
        out[col] = [names[col].get(k, "") for k in key]
    out["_task"] = out["task"].map({t: i for i, t in enumerate(tasks.TASK_IDS)})
    out = out.sort_values(["_task", "dataset_id", "metric_id"], kind="mergesort")
    return out[cols].reset_index(drop=True)


def _qc_names(sc: pd.DataFrame, method: pd.Series) -> dict[str, dict[tuple, str]]:
    """Per QC key: the controls at each end of the range and the entries beyond it (see qc_flags)."""
    def joined(frame: pd.DataFrame, col: str) -> dict[tuple, str]:
        counts = frame.groupby(QC_KEYS + [col], sort=True).size().reset_index(name="n")
        counts = counts.sort_values(QC_KEYS + ["n", col], ascending=[True] * len(QC_KEYS) + [False, True],
                                    kind="mergesort")
        return {k: ", ".join(dict.fromkeys(g[col])) for k, g in counts.groupby(QC_KEYS, sort=False)}

    out: dict[str, dict[tuple, str]] = {}
    ok = (sc["model_kind"] == "control") & (sc["scale_status"] == SCALED)
    oriented = sc["value"].astype(float).where(sc["higher_is_better"].astype(bool), -sc["value"].astype(float))
    ctrl = sc[ok].assign(_o=oriented[ok])
    for col, pick in (("worst_control", "idxmin"), ("best_control", "idxmax")):
        ends = ctrl.loc[getattr(ctrl.groupby(SCALE_KEYS, sort=True)["_o"], pick)()] if not ctrl.empty else ctrl
        out[col] = joined(ends, "model_id") if not ends.empty else {}
    entry = sc["model_id"].where(sc["variant"].isin(["", "default"]), sc["model_id"] + " (" + sc["variant"] + ")")
    for side in ("above_best", "below_worst"):
        beyond = sc[method & (sc["outside"] == side)].assign(_entry=entry)
        out[side] = joined(beyond, "_entry") if not beyond.empty else {}
    return out


def setting_label(model_kind: str, task: str) -> str:
    """What kind of entry a model is in ``task``, from the task's
    :attr:`~cellarena.tasks.Task.kind_settings` ('' for a task without them). In zero_shot, for
    instance, baselines (PCA, scVI) are fit on the evaluation data itself: references, not
    zero-shot entries.

    ``model_kind`` may be a comma-joined list (as in :func:`rank_models`).
    """
    settings = tasks.get(task).kind_settings
    if not settings:
        return ""
    kinds = [k.strip() for k in model_kind.split(",")]
    return "; ".join(dict.fromkeys(settings.get(k, k) for k in kinds))


def with_setting(table: pd.DataFrame, task: str) -> pd.DataFrame:
    """Add a ``setting`` column (:func:`setting_label`) after ``model_kind`` for a task with
    :attr:`~cellarena.tasks.Task.kind_settings` (other tasks: unchanged)."""
    if not tasks.get(task).kind_settings or "setting" in table.columns:
        return table
    out = table.copy()
    pos = list(out.columns).index("model_kind") + 1
    out.insert(pos, "setting", [setting_label(k, task) for k in out["model_kind"]])
    return out


def _two_level_mean(rows: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Mean scaled score per entry: over metrics within each dataset/split/seed, then over those.

    Same averaging order as :func:`rank_models`, so a dataset with more metrics does not weigh
    more. Excluded (NaN) values are skipped, never counted as 0; no value at all gives NaN.
    """
    per_run = rows.groupby(keys + GROUP_KEYS, sort=True, dropna=False)["scaled"].mean()
    return per_run.groupby(level=list(range(len(keys))), sort=True).mean()


def _scaled_intervals(rows: pd.DataFrame, groups: list[str], names: dict[str, str],
                      weights) -> pd.DataFrame:
    """Per entry: ``n_seeds`` and the 95 % interval (``<score>_low``, ``<score>_high``) of every
    score of :func:`aggregate_scaled`. Each seed's score is the same two-level mean on that seed's
    cells alone; the interval is Student's t over seeds (a scaled score mixes metrics and datasets,
    so the seeds, each a full re-run of the plan, are its replicates). One seed: no interval."""
    from scipy import stats  # noqa: PLC0415

    keys = AGG_ENTRY_KEYS + ["seed"]
    per_seed = pd.DataFrame({"mean_scaled": _two_level_mean(rows, keys)})
    for g in groups:
        per_seed[names[g]] = _two_level_mean(rows[rows["metric_group"] == g], keys)
    if weights:
        per_seed["overall"] = sum(w * per_seed[names[g]] for g, w in weights.items())
    by_entry = per_seed.groupby(level=list(range(len(AGG_ENTRY_KEYS))), sort=True)
    out = pd.DataFrame({"n_seeds": by_entry.size().astype("int64")})
    for col in per_seed.columns:
        n = by_entry[col].count()
        half = stats.t.ppf(0.975, (n - 1).clip(lower=1)) * by_entry[col].std(ddof=1) / np.sqrt(n)
        half = half.where(n > 1)
        mean = by_entry[col].mean()
        out[f"{col}_low"], out[f"{col}_high"] = mean - half, mean + half
    return out


def aggregate_scaled(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Control-scaled leaderboard of one task: one row per (model_id, variant, model_kind).

    ``df`` is the long results table or the output of :func:`scale_by_controls`. Columns:

    - ``model_id``, ``variant``, ``model_kind``; for a task with kind settings (zero_shot) also
      ``setting`` (:func:`setting_label`: baselines are labelled references, not zero-shot).
    - for a task with :attr:`~cellarena.tasks.Task.overall_weights` (integration: ``overall =
      0.6 * bio + 0.4 * batch``), NaN when a weighted group has no scaled value for the model.
    - one column per non-empty ``metric_group`` of the task (integration always has ``bio`` and
      ``batch``): the mean scaled score of the group's metrics, NaN (not 0) if none.
    - ``mean_scaled``: mean scaled score over all metrics.
    - ``n_seeds`` and, for every score, its 95 % interval over seeds (``<score>_low``,
      ``<score>_high``; :func:`_scaled_intervals`).
    - ``n_metrics``: scaled values behind the scores; ``n_missing``: values excluded (failed, not
      applicable, not scalable, or no row at all for a metric that other models report on the
      same dataset/split/seed); ``n_unscalable``, ``n_not_applicable``: how many of the excluded
      ones were so because the controls were constant / absent, or not applicable.

    Means are taken over metrics within each (dataset_id, split_id, seed), then over those.
    Sorted by ``overall`` (tasks with weights) or ``mean_scaled``, best first, NaN last; then by
    model_id and variant.
    """
    record = tasks.get(task)
    weights = record.overall_weights
    setting = ["setting"] if record.kind_settings else []
    sc = _scaled(df)
    rows = sc[(sc["task"] == task) & (sc["subgroup"] == "")]
    rows = rows.sort_values(SCALE_KEYS + ENTRY_KEYS, kind="mergesort")
    present = set(rows["metric_group"]) - {""}
    groups = list(weights) + sorted(present - set(weights))
    reserved = {"overall", "mean_scaled", "setting", *AGG_ENTRY_KEYS}
    names = {g: (f"group_{g}" if g in reserved else g) for g in groups}

    head = AGG_ENTRY_KEYS + setting
    score_cols = (["overall"] if weights else []) + [names[g] for g in groups] + ["mean_scaled"]
    bounds = [f"{c}_{end}" for c in score_cols for end in ("low", "high")]
    tail = ["n_seeds", *bounds, "n_metrics", "n_missing", "n_unscalable", "n_not_applicable"]
    if rows.empty:
        return pd.DataFrame(columns=head + score_cols + tail)

    out = pd.DataFrame(index=pd.MultiIndex.from_frame(
        rows[AGG_ENTRY_KEYS].drop_duplicates().sort_values(AGG_ENTRY_KEYS)))
    out["mean_scaled"] = _two_level_mean(rows, AGG_ENTRY_KEYS)
    for g in groups:
        out[names[g]] = _two_level_mean(rows[rows["metric_group"] == g], AGG_ENTRY_KEYS)
    if weights:
        # A NaN group total propagates: no overall without both groups.
        out["overall"] = sum(w * out[names[g]] for g, w in weights.items())
    out = out.join(_scaled_intervals(rows, groups, names, weights))
    status = rows["scale_status"]
    counts = pd.DataFrame({
        "n_metrics": status == SCALED,
        "n_missing": status != SCALED,
        "n_unscalable": status.isin(UNSCALABLE),
        "n_not_applicable": status == "not_applicable",
    }).astype("int64")
    out = out.join(counts.groupby([rows[k] for k in AGG_ENTRY_KEYS]).sum())
    # A metric another model reports on the same dataset/split/seed but this run has no row for
    # is missing too (never silently dropped from the count).
    expected = rows.groupby(GROUP_KEYS)["metric_id"].nunique().rename("_expected")
    have = rows.groupby(AGG_ENTRY_KEYS + GROUP_KEYS)["metric_id"].nunique().rename("_have")
    have = have.reset_index().join(expected, on=GROUP_KEYS)
    absent = (have["_expected"] - have["_have"]).groupby([have[k] for k in AGG_ENTRY_KEYS]).sum()
    out["n_missing"] = out["n_missing"] + absent.reindex(out.index).astype("int64")
    out = out.reset_index()
    if setting:
        out["setting"] = [setting_label(k, task) for k in out["model_kind"]]
    primary = "overall" if weights else "mean_scaled"
    out = out.sort_values([primary, "model_id", "variant"], ascending=[False, True, True],
                          na_position="last", kind="mergesort")
    return out[head + score_cols + tail].reset_index(drop=True)


def ranked_groups(df: pd.DataFrame, task: str, *, prepared: pd.DataFrame | None = None
                  ) -> list[tuple[dict, pd.DataFrame]]:
    """The ranking of one task like with like: one :func:`rank_models` table per comparable group
    of entries (:func:`cellarena.analysis.intervals.comparable_groups`: every entry ranked only on
    the (dataset, split, seed) cells that every entry of its table has), each with ``rank_low`` /
    ``rank_high`` (the 95 % interval of ``mean_rank`` over redrawn seeds and test cells) and
    ``n_seeds``. The first table is the main ranking; an entry without any ``ok`` value is listed at
    its end (no rank). ``status`` counts all of an entry's runs, wherever they are.

    Returns ``(about, table)`` pairs: ``about`` holds ``n_cells``, ``n_seeds`` and ``datasets``
    (comma-joined) of the group. ``prepared``: the task's
    :func:`cellarena.analysis.intervals.overall` rows, when the caller has them already.
    """
    from cellarena.analysis import intervals  # noqa: PLC0415

    rows = filter_scores(df, task=task)
    full = rank_models(rows, task)
    if full.empty:
        return [({"n_cells": 0, "n_seeds": 0, "datasets": ""}, full.assign(rank_low=np.nan, rank_high=np.nan,
                                                                          n_seeds=0))]
    prepared = intervals.overall(rows) if prepared is None else prepared
    scheme = rows["split_id"].map(intervals.scheme_of)
    out = []
    for cells, members in intervals.comparable_groups(prepared, task):
        keep = (pd.Series(list(zip(rows["model_id"], rows["variant"])), index=rows.index).isin(members)
                & pd.Series(list(zip(rows["dataset_id"], scheme, rows["seed"])), index=rows.index).isin(cells))
        table = rank_models(rows[keep], task)
        if len(members) > 1:
            mean_rank, drawn = intervals.rank_draws(prepared, task, members, cells)
            low, high = np.nanpercentile(drawn, [2.5, 97.5], axis=1)
            bounds = pd.DataFrame({"rank_low": low, "rank_high": high}, index=mean_rank.index)
        else:
            bounds = pd.DataFrame({"rank_low": [np.nan], "rank_high": [np.nan]},
                                  index=pd.MultiIndex.from_tuples(members, names=ENTRY_KEYS))
        table = table.join(bounds, on=ENTRY_KEYS)
        seeds = sorted({s for _, _, s in cells})
        table["n_seeds"] = len(seeds)
        table["status"] = table[ENTRY_KEYS].apply(tuple, axis=1).map(
            full.set_index(ENTRY_KEYS)["status"]).to_numpy()
        out.append(({"n_cells": len(cells), "n_seeds": len(seeds),
                     "datasets": ", ".join(sorted({d for d, _, _ in cells}))}, table))
    ranked = {e for _, t in out for e in zip(t["model_id"], t["variant"])}
    unranked = full[[e not in ranked for e in zip(full["model_id"], full["variant"])]]
    if not out:
        out.append(({"n_cells": 0, "n_seeds": 0, "datasets": ""}, full.iloc[:0]))
    about, main = out[0]
    out[0] = (about, pd.concat([main, unranked.assign(n_seeds=0)], ignore_index=True) if len(unranked) else main)
    order = ["model_id", "variant", "model_kind", "mean_rank", "rank_low", "rank_high", "n_seeds"]
    return [(a, t[order + [c for c in t.columns if c not in order]].reset_index(drop=True)) for a, t in out]
