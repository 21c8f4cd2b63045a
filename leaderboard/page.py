"""The leaderboard page, built once: every table, note and caption the two renderers show.

:func:`build_page` turns the long results table into a :class:`Page`: one :class:`TaskSection`
per task present, each an ordered list of :class:`Block` (a heading and its parts). A part is a
:class:`Note`, a :class:`Caption`, a :class:`Table`, a :class:`Chart` (a declarative spec the
Streamlit app draws with Altair; the static page leaves charts out) or a :class:`Choice` (parts
that depend on a metric the reader picks). ``app.py`` (Streamlit) and ``export.py`` (static HTML)
only lay these parts out, so both say the same words.

Pure functions: no Streamlit, no HTML, no plotting library, no I/O. The numbers come from
:mod:`cellarena.leaderboard.data`, the task facts from :mod:`cellarena.tasks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import pandas as pd

from cellarena import tasks
from cellarena.leaderboard import data
from cellarena.tasks import Task

TITLE = "cellarena leaderboard"
INTRO = (
    "Single-cell foundation models compared with simple baselines and controls on the same datasets, "
    "splits and seeds, one task family per section. Models are ranked per dataset, split and seed on "
    "every metric (rank 1 = best, metric direction respected, ties share the average rank); mean_rank "
    "averages over metrics and then over datasets, splits and seeds. Metric columns are means of "
    "successful runs. Failed or not-applicable runs are not scored; they are counted in the status "
    "column and listed with their reason in the runs table. The second ranking of each task scales "
    "every value between the controls run on the same dataset, split, seed and metric (0 = worst "
    "control, 1 = best control), so that metrics can be averaged; the QC table says how often methods "
    "fall outside that control range. A plan may draw a subsample of a dataset's cells for a split "
    "(the default plan: at most 2,500 per dataset, drawn anew by each seed, so the spread over seeds "
    "includes which cells were drawn); each run's n_train and n_test are in the runs table."
)
NO_RESULTS = "No results yet."
NO_TASK_RESULTS = "No results for this task yet."

NoteKind = Literal["warning", "silver", "synthetic", "leakage", "qc", "info"]


@dataclasses.dataclass(frozen=True)
class Note:
    """A sentence set apart from the tables. ``kind`` says what it is about (``info`` is plain
    text, every other kind a call-out); ``lead`` holds the opening words shown in bold, ``items``
    a bulleted list after ``text``."""

    kind: NoteKind
    text: str
    lead: str = ""
    items: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Caption:
    """The small print under a table or a chart: how to read it."""

    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    """One table. ``key`` names it (the Streamlit container key the browser tests look for);
    ``heading`` is a bold line above it; ``precision`` the decimals shown; a ``browsable`` table
    is a long detail table the app shows scrollable and sortable."""

    frame: pd.DataFrame
    key: str = ""
    heading: str = ""
    precision: int = 3
    browsable: bool = False


@dataclasses.dataclass(frozen=True)
class Chart:
    """A chart spec: ``kind`` bar or point marks of ``frame`` (one row per mark, coloured by its
    ``model_kind`` column) at fields ``x`` and ``y``; a numeric field is a quantitative axis, any
    other a categorical one, its categories in ``order``. ``facet`` draws one panel per value of
    that column; ``unit_interval`` fixes quantitative axes to [0, 1]; ``label`` is written next to
    each point; ``tooltip`` lists the fields shown on hover; ``caption`` says how to read it."""

    kind: Literal["bar", "point"]
    frame: pd.DataFrame
    x: str
    y: str
    x_title: str
    y_title: str
    caption: str
    order: tuple[str, ...] = ()
    facet: str = ""
    unit_interval: bool = False
    label: str = ""
    tooltip: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Choice:
    """Parts that depend on an option the reader picks (a metric): ``options`` maps each option,
    in display order, to its parts. The app shows a select box labelled ``label`` (widget ``key``)
    starting at ``default``; the static page shows the ``default`` option."""

    label: str
    key: str
    options: dict[str, tuple[Part, ...]]
    default: str


Part = Note | Caption | Table | Chart | Choice


@dataclasses.dataclass(frozen=True)
class Block:
    """A heading (``title``; empty for the notes that open a section) and its parts, in order.
    A ``folded`` block is a detail the app keeps in a closed expander."""

    title: str
    parts: tuple[Part, ...]
    folded: bool = False


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """One task's part of the page: its id, its title (from :mod:`cellarena.tasks`) and its
    blocks. ``ranking`` and ``scaled`` are the raw and the control-scaled ranking tables shown in
    those blocks (the static export also writes them as CSV)."""

    task: str
    title: str
    blocks: tuple[Block, ...]
    ranking: pd.DataFrame
    scaled: pd.DataFrame


@dataclasses.dataclass(frozen=True)
class Page:
    """The whole leaderboard: ``title``, ``intro``, one section per task present in the table
    (in :data:`cellarena.tasks.TASK_IDS` order), and ``qc_flags``, the QC table of every task."""

    title: str
    intro: str
    sections: tuple[TaskSection, ...]
    qc_flags: pd.DataFrame

    def section(self, task: str) -> TaskSection | None:
        """The section of ``task``; None when the table has no results for it."""
        return next((s for s in self.sections if s.task == task), None)


def tabs(page: Page) -> list[tuple[str, TaskSection | None]]:
    """Every task in :data:`cellarena.tasks.TASK_IDS` order, with its title and its section (None
    when the table has no results for it): the app shows one tab per task."""
    return [(tasks.get(t).title, page.section(t)) for t in tasks.TASK_IDS]


# --- the page --------------------------------------------------------------------------------


def build_page(df: pd.DataFrame, *, policy: str = "show", datasets: Iterable[str] | None = None,
               variants: Iterable[str] | None = None, imputed_ranking: bool = False) -> Page:
    """The page of the long results table ``df``.

    The leakage ``policy`` (:func:`~cellarena.leaderboard.data.apply_leakage`) applies to the whole
    table, then values are scaled between controls, and only then are the ``datasets`` and
    ``variants`` filters applied (None: all), so hiding a model never moves the control range of
    the others. With ``imputed_ranking``, each task with leaked results also shows its
    leakage-imputed ranking (for the static page, which has no policy switch).
    """
    def keep(table: pd.DataFrame) -> pd.DataFrame:
        return data.filter_scores(table, datasets=datasets, variants=variants, include_subgroups=True)

    ranked, changes = data.apply_leakage(df, policy)
    rows, scaled = keep(ranked), keep(data.scale_by_controls(ranked))
    imputed = None
    if imputed_ranking:
        imputed_rows, imputed_changes = data.apply_leakage(df, "impute")
        imputed = (keep(imputed_rows), imputed_changes)
    present = set(data.filter_scores(rows)["task"])
    sections = tuple(_section(tasks.get(t), rows, scaled, changes, policy, imputed)
                     for t in tasks.TASK_IDS if t in present)
    return Page(title=TITLE, intro=INTRO, sections=sections, qc_flags=data.qc_flags(scaled))


def _section(task: Task, rows: pd.DataFrame, scaled: pd.DataFrame, changes: pd.DataFrame, policy: str,
             imputed: tuple[pd.DataFrame, pd.DataFrame] | None) -> TaskSection:
    """``changes``: what the leakage ``policy`` changed; ``imputed``: the rows and the changes of
    the leakage-imputed ranking, when the page shows one."""
    task_rows = data.filter_scores(rows, task=task.id)
    runs = data.run_table(task_rows)
    scaled = scaled[scaled["task"] == task.id]
    ranking = data.with_setting(data.rank_models(rows, task.id), task.id)
    agg = data.aggregate_scaled(scaled, task.id)
    metrics = sorted(task_rows.loc[task_rows["status"] == "ok", "metric_id"].unique())
    blocks = [
        _opening(task, runs, _task_changes(changes, task), policy),
        _raw_ranking(task, ranking),
        _imputed_ranking(task, imputed[0], _task_changes(imputed[1], task)) if imputed else None,
        _scaled_ranking(task, agg),
        _qc(task, data.qc_flags(scaled)),
        _per_metric(task, rows, metrics),
        _categories(task, rows, metrics),
        _tuning(task, rows),
        _cost(task, rows),
        _runs(runs),
    ]
    return TaskSection(task=task.id, title=task.title, blocks=tuple(b for b in blocks if b),
                       ranking=ranking, scaled=agg)


def _task_changes(changes: pd.DataFrame, task: Task) -> pd.DataFrame:
    """The rows of a :func:`data.apply_leakage` changes table that concern ``task``."""
    return changes[changes["task"] == task.id].drop(columns=["task"]).reset_index(drop=True)


# --- the notes under a task's title ------------------------------------------------------------


def _datasets(runs: pd.DataFrame, quality: str) -> str:
    return ", ".join(sorted(runs.loc[runs["label_quality"] == quality, "dataset_id"].unique()))


def label_note(runs: pd.DataFrame) -> Note:
    """The datasets of a run table with their label quality."""
    pairs = runs[["dataset_id", "label_quality"]].drop_duplicates().sort_values("dataset_id")
    return Note("info", ", ".join(f"{d} ({q})" for d, q in pairs.itertuples(index=False)),
                lead="Datasets and label quality:")


def silver_note(datasets: str) -> Note:
    """The warning about datasets with silver labels (comma-joined ``datasets``)."""
    return Note("silver", f"on {datasets}: these cell-type labels were derived by a documented "
                          "procedure (see the dataset card), not curated by experts, so scores on "
                          "these datasets are indicative only: less reliable than on expert labels.",
                lead="Silver labels")


def synthetic_note(datasets: str) -> Note:
    """The warning about datasets whose response is simulated (comma-joined ``datasets``)."""
    return Note("synthetic", f"in {datasets}: a simulated response on real background cells, used to "
                             "check the pipeline against a known truth; its scores say nothing about "
                             "biology.", lead="Synthetic data")


def submitted_note(submitted: pd.DataFrame) -> Note:
    """Where the submitted (not re-run) results of a :func:`data.submitted_models` table come from."""
    items = "; ".join(f"{r.model_id} ({r.n_runs} runs on {r.ran_on}, commit {r.git_commit})"
                      for r in submitted.itertuples())
    return Note("info", f"(variant submitted): {items}. Supplied with the model's pull request and "
                        "checked against this suite's results schema, dataset versions and split "
                        "hashes; not re-run here.", lead="Submitted results")


def task_notes(task: Task, runs: pd.DataFrame) -> list[Note]:
    """The task's own notes (:attr:`Task.notes`), ``{references}`` filled with the models that are
    references rather than entries here; a note about references is left out when there are none."""
    refs = ", ".join(sorted(runs.loc[runs["model_kind"].map(lambda k: _is_reference(task, k)),
                                     "model_id"].unique()))
    return [Note("info", text.format(references=refs)) for text in task.notes
            if refs or "{references}" not in text]


def _is_reference(task: Task, model_kind: str) -> bool:
    """Whether models of ``model_kind`` are references in ``task`` (:attr:`Task.kind_settings`)."""
    return task.kind_settings.get(model_kind, "").startswith("reference")


def leakage_note(task: Task, changes: pd.DataFrame, policy: str) -> Note:
    """What the leakage ``policy`` did with the results of models evaluated on cells of their own
    pretraining corpus (``changes``: the task's rows of :func:`data.apply_leakage`'s changes)."""
    done = ("hidden here" if policy == "hide" else
            f"replaced by those of the reference model {task.leakage_reference} on the same dataset, "
            "split, seed and metric (dropped where it has none)")
    return Note("leakage", f"(leakage = leaked). Their results are {done}:",
                lead=f"{changes['model_id'].nunique()} model(s) were evaluated on cells of their own "
                     "pretraining corpus")


def _leakage_parts(task: Task, changes: pd.DataFrame, policy: str) -> tuple[Part, ...]:
    return leakage_note(task, changes, policy), Table(changes, key=f"leakage_{task.id}")


def _opening(task: Task, runs: pd.DataFrame, changes: pd.DataFrame, policy: str) -> Block:
    parts: list[Part] = [label_note(runs)]
    if silver := _datasets(runs, "silver"):
        parts.append(silver_note(silver))
    if synthetic := ", ".join(data.synthetic_datasets(runs)):
        parts.append(synthetic_note(synthetic))
    if not changes.empty:
        parts += _leakage_parts(task, changes, policy)
    if not (submitted := data.submitted_models(runs)).empty:
        parts.append(submitted_note(submitted))
    return Block("", (*parts, *task_notes(task, runs)))


# --- rankings ------------------------------------------------------------------------------------

RAW_CAPTION = ("mean_rank: rank 1 = best, averaged over metrics, then over datasets, splits and seeds. "
               "Metric columns: mean over successful runs. Failed runs are not scored, only counted in "
               "the status column.")


def _raw_ranking(task: Task, ranking: pd.DataFrame) -> Block:
    return Block("Ranking: raw metric values", (Table(ranking, key=f"raw_{task.id}"), Caption(RAW_CAPTION)))


def _imputed_ranking(task: Task, rows: pd.DataFrame, changes: pd.DataFrame) -> Block | None:
    if changes.empty:
        return None
    ranking = data.with_setting(data.rank_models(rows, task.id), task.id)
    return Block("Leakage-imputed ranking", (*_leakage_parts(task, changes, "impute"),
                                             Table(ranking, key=f"imputed_{task.id}"), Caption(RAW_CAPTION)))


def scaled_caption(task: Task) -> str:
    """How the control-scaled ranking of ``task`` is computed, with its overall formula if any."""
    weights = " + ".join(f"{w:g} × {g}" for g, w in task.overall_weights.items())
    overall = f" overall = {weights} (NaN when a group has no scaled metric)." if weights else ""
    return ("Each value is scaled between the controls of its dataset, split, seed and metric: 0 = worst "
            "control, 1 = best control (lower-is-better metrics flipped), clipped to [0, 1]; then "
            f"averaged over metrics, then over datasets, splits and seeds.{overall} n_metrics: scaled "
            "values used; n_missing: values left out (failed, not applicable, not reported, or not "
            "scalable), never counted as 0.")


def _entry_label(df: pd.DataFrame) -> pd.Series:
    """Model id, with the variant appended when it is not the default one."""
    return df["model_id"].where(df["variant"] == "default", df["model_id"] + " (" + df["variant"] + ")")


def _scaled_chart(task: Task, agg: pd.DataFrame) -> Chart | None:
    """Two weighted groups: one against the other; otherwise the mean scaled score per model."""
    refs = agg["model_kind"].map(lambda k: _is_reference(task, k))
    agg = agg.assign(model=_entry_label(agg).where(~refs, _entry_label(agg) + " (reference)"))
    groups = list(task.overall_weights)
    if len(groups) == 2 and set(groups) <= set(agg.columns):
        y, x = groups
        points = agg.dropna(subset=groups)
        if points.empty:
            return None
        return Chart(
            "point", points, x=x, y=y, x_title=f"{x} score (scaled between controls)",
            y_title=f"{y} score (scaled between controls)", unit_interval=True, label="model",
            tooltip=("model", "model_kind", y, x, "overall", "n_metrics", "n_missing"),
            caption=f"Top right is best: {y} and {x} scores both at the best control's level. Models "
                    "without both scores are not drawn.")
    bars = agg.dropna(subset=["mean_scaled"])
    if bars.empty:
        return None
    return Chart(
        "bar", bars, x="mean_scaled", y="model", x_title="mean score scaled between controls",
        y_title="", order=tuple(bars.sort_values("mean_scaled", ascending=False, kind="mergesort")["model"]),
        unit_interval=True, tooltip=("model", "model_kind", "mean_scaled", "n_metrics", "n_missing"),
        caption="Mean score scaled between controls (1 = best control, 0 = worst control).")


def _scaled_ranking(task: Task, agg: pd.DataFrame) -> Block:
    chart = _scaled_chart(task, agg)
    return Block("Ranking: scaled between controls",
                 (Table(agg, key=f"scaled_{task.id}"), Caption(scaled_caption(task)), *([chart] if chart else [])))


# --- QC ------------------------------------------------------------------------------------------


def qc_parts(qc: pd.DataFrame) -> list[Part]:
    """What the QC table says: the flagged metrics, or that none is; the metrics not scaled."""
    limit = data.QC_MAX_OUTSIDE_PERCENT
    flagged = qc[qc["flagged"]]
    if not flagged.empty:
        parts: list[Part] = [Note(
            "qc", f"(more than {limit} % of the non-control values fall outside the control range, so "
                  "the controls do not bracket the methods and clipped scaled scores hide differences):",
            lead="Flagged metrics",
            items=tuple(f"{r.metric_id} on {r.dataset_id}: {r.n_outside} of {r.n_methods} method values "
                        f"outside the control range ({r.fraction_outside:.0%}; {r.n_above_best} above the "
                        f"best control, {r.n_below_worst} below the worst)" for r in flagged.itertuples()))]
    elif (qc["n_methods"] > 0).any():
        parts = [Caption(f"No metric has more than {limit} % of its non-control values outside the "
                         "control range.")]
    else:
        parts = [Caption("No method value could be compared with a control range.")]
    unscalable = qc[qc["n_unscalable"] > 0]
    if not unscalable.empty:
        pairs = ", ".join(f"{r.metric_id} on {r.dataset_id}" for r in unscalable.itertuples())
        parts.append(Caption(f"Not scaled (fewer than two distinct control values): {pairs}. These values "
                             "are left out of the scaled scores and counted in n_missing / n_unscalable."))
    return parts


def _qc(task: Task, qc: pd.DataFrame) -> Block:
    return Block("QC: metric values outside the control range",
                 (*qc_parts(qc), Table(qc, key=f"qc_{task.id}", browsable=True)))


# --- per metric and per subgroup -------------------------------------------------------------------


def _metric_chart(long: pd.DataFrame, metric_id: str) -> Chart:
    """Bars of one metric: the mean over splits and seeds per model, one panel per dataset."""
    long = long.assign(model=_entry_label(long),
                       dataset=long["dataset_id"] + " (" + long["label_quality"] + " labels)")
    higher = bool(long["higher_is_better"].iloc[0])
    bars = long.groupby(["dataset", "model", "model_kind", "dataset_id", "label_quality"], sort=True).agg(
        value=("value", "mean"), n_runs=("value", "size")).reset_index()
    order = long.groupby("model")["value"].mean().sort_values(ascending=not higher, kind="mergesort")
    return Chart("bar", bars, x="model", y="value", x_title="",
                 y_title=f"{metric_id} ({'higher' if higher else 'lower'} is better)",
                 order=tuple(order.index), facet="dataset",
                 tooltip=("model", "model_kind", "dataset_id", "label_quality", "value", "n_runs"),
                 caption="Bars: mean over splits and seeds of successful runs (n_runs).")


def _per_metric(task: Task, rows: pd.DataFrame, metrics: list[str]) -> Block | None:
    if not metrics:
        return None
    charts = {m: (_metric_chart(data.metric_long(rows, task.id, m), m),) for m in metrics}
    return Block("Per-metric scores", (Choice("Metric", f"metric_{task.id}", charts, metrics[0]),))


CATEGORY_CAPTION = ("Mean over the queries of each category: single_unseen = a target never seen in "
                    "training; double_seenK = a pair of which K singles were seen; on held-out cell-type "
                    "splits, the category is the held-out cell type.")


def _categories(task: Task, rows: pd.DataFrame, metrics: list[str]) -> Block | None:
    """The metrics broken down by subgroup, starting at the task's :attr:`Task.subgroup_metric`."""
    if not task.subgroup_metric:
        return None
    tables = {m: data.subgroup_table(rows, task.id, m) for m in metrics}
    options = {m: (Table(t, key=f"categories_{task.id}"), Caption(CATEGORY_CAPTION))
               for m, t in tables.items() if not t.empty}
    if not options:
        return None
    default = task.subgroup_metric if task.subgroup_metric in options else next(iter(options))
    return Block("By query category", (Choice("Metric by category", f"category_metric_{task.id}",
                                              options, default),))


# --- tuning, cost, runs ----------------------------------------------------------------------------


def _tuning(task: Task, rows: pd.DataFrame) -> Block | None:
    table = data.tuning_table(rows, task.id)
    if table.empty:
        return None
    return Block("Tuned vs default", (Table(table, key=f"tuning_{task.id}"), Caption(
        "Every tuned model had the same budget (n_trials, inner folds, cells). default and tuned: the "
        "test-set metric; gain = tuned − default (positive = tuning helped). inner_default / inner_best: "
        "the tuning objective (inner cross-validation on the training cells only, or a label-free "
        "held-out loss for embeddings) of the defaults and of the best trial. Tuning is done anew for "
        "every seed, on that seed's training cells: a study shared by the seeds would choose parameters "
        "with cells that are another seed's test cells.")))


def _cost(task: Task, rows: pd.DataFrame) -> Block:
    return Block("Compute cost", (Table(data.compute_cost(rows, task.id), key=f"cost_{task.id}", precision=1),
                                  Caption("Seconds of each model's own work (fit + predict, or embed; metrics "
                                          "excluded) summed over its successful runs, on the device shown; "
                                          "pretrain_s is the one-off pretraining of an in-suite model "
                                          "(with the plan's pretrain_seed, as in the default plan, one "
                                          "checkpoint that every seed fine-tunes, as a published model's "
                                          "single release is; the seed's spread then leaves out "
                                          "pretraining's); "
                                          "attention is the kernel its runs reported.")))


def _runs(runs: pd.DataFrame) -> Block:
    bad = runs[runs["status"] != "ok"]
    failed = [Table(bad[["dataset_id", "split_id", "model_id", "variant", "status", "status_reason"]],
                    heading="Runs that did not produce scores")] if not bad.empty else []
    return Block("Runs and provenance", (
        *failed, Table(runs, heading="All runs (dataset version, split hash, seed, model version, commit)",
                       browsable=True)), folded=True)
