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

import numpy as np
import pandas as pd

from cellarena import tasks
from cellarena.analysis import intervals
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
    "includes which cells were drawn); each run's n_train and n_test are in the runs table. Every "
    "number comes with the seeds behind it and a 95 % interval (from the spread over seeds and from "
    "resampling the test cells or queries of each split: docs/statistics.md); rankings compare like "
    "with like (each table ranks its entries on the same dataset, split and seed cells) and give each "
    "rank its interval; each model is set against the best tuned baseline with a paired verdict."
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
    that column; ``label`` is written next to
    each point; ``tooltip`` lists the fields shown on hover; ``caption`` says how to read it.
    ``x_err`` / ``y_err`` name the (low, high) columns of an interval drawn as a whisker along that
    axis; ``diagonal`` draws the line x = y (point charts, on a common ``domain`` of both axes)."""

    kind: Literal["bar", "point"]
    frame: pd.DataFrame
    x: str
    y: str
    x_title: str
    y_title: str
    caption: str
    order: tuple[str, ...] = ()
    facet: str = ""
    label: str = ""
    tooltip: tuple[str, ...] = ()
    x_err: tuple[str, str] | tuple[()] = ()
    y_err: tuple[str, str] | tuple[()] = ()
    diagonal: bool = False
    domain: tuple[float, float] | None = None


# Colours of the model kinds, shared by both renderers: controls in grey, so they read as reference
# points rather than competitors.
KIND_COLORS = {"baseline": "#4c78a8", "control": "#9d9d9d", "transformer": "#e45756", "adapter": "#f58518"}


@dataclasses.dataclass(frozen=True)
class Choice:
    """Parts that depend on an option the reader picks (a metric): ``options`` maps each option,
    in display order, to its parts. The app shows a select box labelled ``label`` (widget ``key``)
    starting at ``default``; the static page shows the ``default`` option, or every option one after
    the other when ``static_all``."""

    label: str
    key: str
    options: dict[str, tuple[Part, ...]]
    default: str
    static_all: bool = False


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
    claims: TaskSection | None = None  # the "Published claims" tab, when claims were given

    def section(self, task: str) -> TaskSection | None:
        """The section of ``task``; None when the table has no results for it."""
        return next((s for s in self.sections if s.task == task), None)


def tabs(page: Page) -> list[tuple[str, TaskSection | None]]:
    """Every task in :data:`cellarena.tasks.TASK_IDS` order, with its title and its section (None
    when the table has no results for it), then the published claims when the page has them: the
    app shows one tab each."""
    out = [(tasks.get(t).title, page.section(t)) for t in tasks.TASK_IDS]
    return out + ([(page.claims.title, page.claims)] if page.claims else [])


# --- the page --------------------------------------------------------------------------------


def build_page(df: pd.DataFrame, *, policy: str = "show", datasets: Iterable[str] | None = None,
               variants: Iterable[str] | None = None, imputed_ranking: bool = False,
               claims: list | None = None) -> Page:
    """The page of the long results table ``df``.

    The leakage ``policy`` (:func:`~cellarena.leaderboard.data.apply_leakage`) applies to the whole
    table, then values are scaled between controls, and only then are the ``datasets`` and
    ``variants`` filters applied (None: all), so hiding a model never moves the control range of
    the others. With ``imputed_ranking``, each task with leaked results also shows its
    leakage-imputed ranking (for the static page, which has no policy switch). ``claims``
    (:class:`cellarena.cards.claim.Claim` cards) are judged on the whole table, whatever the
    filters, in a section of their own.
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
    return Page(title=TITLE, intro=INTRO, sections=sections, qc_flags=data.qc_flags(scaled),
                claims=claims_section(df, claims) if claims else None)


def _section(task: Task, rows: pd.DataFrame, scaled: pd.DataFrame, changes: pd.DataFrame, policy: str,
             imputed: tuple[pd.DataFrame, pd.DataFrame] | None) -> TaskSection:
    """``changes``: what the leakage ``policy`` changed; ``imputed``: the rows and the changes of
    the leakage-imputed ranking, when the page shows one."""
    task_rows = data.filter_scores(rows, task=task.id)
    runs = data.run_table(task_rows)
    scaled = scaled[scaled["task"] == task.id]
    # the ok overall rows with their decoded resamples, read once for every interval of the section
    prepared = intervals.overall(task_rows)
    groups = [(about, data.with_setting(table, task.id))
              for about, table in data.ranked_groups(rows, task.id, prepared=prepared)]
    ranking = pd.concat([t.assign(group=i) for i, (_, t) in enumerate(groups, start=1)], ignore_index=True)
    agg = data.aggregate_scaled(scaled, task.id)
    metrics = sorted(task_rows.loc[task_rows["status"] == "ok", "metric_id"].unique())
    blocks = [
        _opening(task, runs, _task_changes(changes, task), policy),
        _raw_ranking(task, groups, prepared),
        _imputed_ranking(task, imputed[0], _task_changes(imputed[1], task)) if imputed else None,
        _versus_baseline(task, prepared),
        _scaled_ranking(task, agg),
        _qc(task, data.qc_flags(scaled)),
        _per_metric(task, prepared, metrics),
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

RAW_CAPTION = ("mean_rank: rank 1 = best, averaged over metrics, then over datasets, splits and seeds; "
               "rank_low–rank_high: its 95 % interval when the table is drawn anew (seeds with replacement "
               "and, within each, a resample of the test cells or queries shared by every entry). n_seeds: "
               "seeds behind every number of the row. Metric columns: mean over successful runs. Failed runs "
               "are not scored, only counted in the status column.")
GROUPS_CAPTION = ("Like with like: every entry is ranked only on the (dataset, split, seed) cells that "
                  "every entry of its table has. The first table ranks the entries with the widest "
                  "results; an entry with fewer (a tuned variant run on fewer datasets, a model that "
                  "failed or does not apply on one) is ranked in a further table, on its cells, with "
                  "every entry that has them.")


def _group_heading(about: dict, first: bool) -> str:
    what = "Main ranking" if first else "Ranked on fewer results"
    return (f"{what}: {about['n_cells']} (dataset, split, seed) cells of {about['datasets']}, "
            f"{about['n_seeds']} seed(s)")


def _multi_dataset_parts(task: Task, prepared: pd.DataFrame) -> list[Part]:
    """The Friedman test and the Wilcoxon–Holm tests of the main ranking, or why there are none
    (``prepared``: the task's :func:`cellarena.analysis.intervals.overall` rows)."""
    tests = intervals.multi_dataset_tests(prepared, task.id)
    if tests["reason"]:
        return [Caption(f"No test across datasets: {tests['reason']}.")]
    return [
        Caption(f"Across the {tests['n_blocks']} (dataset, split) blocks of the main ranking, controls "
                f"left out: Friedman test of the {tests['n_entries']} entries' ranks, χ² = "
                f"{tests['friedman_stat']:.2f}, p = {tests['friedman_p']:.3g}. Below, each entry against "
                f"the best-ranked one ({tests['best']}) by a Wilcoxon signed-rank test over the blocks, "
                "p Holm-corrected for the number of comparisons (scipy, statsmodels); with few blocks "
                "these tests have little power."),
        Table(tests["posthoc"], key=f"posthoc_{task.id}", heading="Wilcoxon–Holm against the best-ranked entry"),
    ]


def _raw_ranking(task: Task, groups: list[tuple[dict, pd.DataFrame]], prepared: pd.DataFrame) -> Block:
    parts: list[Part] = []
    for i, (about, table) in enumerate(groups):
        key = f"raw_{task.id}" if i == 0 else f"raw_{task.id}_{i + 1}"
        parts.append(Table(table, key=key, heading=_group_heading(about, i == 0) if about["n_cells"] else ""))
    parts.append(Caption(RAW_CAPTION))
    if len(groups) > 1:
        parts.append(Caption(GROUPS_CAPTION))
    return Block("Ranking: raw metric values", (*parts, *_multi_dataset_parts(task, prepared)))


# --- model vs the best tuned baseline ---------------------------------------------------------------

VERSUS_CAPTION = (
    "Each point is one dataset and split scheme: the entry's mean over seeds (y) against the best tuned "
    "baseline's (x) on the task's primary metric; on the diagonal they tie. Whiskers: 95 % intervals of "
    "each mean (seeds, and resampled test cells or queries). The verdict comes from the paired "
    "difference (same splits, seeds and resampled test units for both): better or worse when its 95 % "
    "interval excludes 0, else indistinguishable.")


def _versus_frame(task: Task, prepared: pd.DataFrame):
    """The comparisons of every entry (:func:`cellarena.analysis.intervals.compare`) with the
    intervals of both means (:func:`~cellarena.analysis.intervals.summarize`), from the task's
    :func:`~cellarena.analysis.intervals.overall` rows."""
    cmp = intervals.compare(prepared, task.id)
    if cmp.empty:
        return cmp, None
    summary = intervals.summarize(prepared)
    summary = summary[summary["metric_id"] == cmp["metric_id"].iloc[0]]
    keys = ["dataset_id", "scheme", "model_id", "variant"]
    own = summary.set_index(keys)[["ci_low", "ci_high", "n_seeds"]]
    ref = summary.set_index(keys)[["ci_low", "ci_high"]].rename(columns=lambda c: f"against_{c}")
    cmp = cmp.rename(columns={"ci_low": "diff_low", "ci_high": "diff_high", "n_seeds": "n_paired_seeds"})
    cmp = cmp.join(own, on=keys).join(ref, on=["dataset_id", "scheme", "against_model", "against_variant"])
    cmp["where"] = cmp["dataset_id"] + " · " + cmp["scheme"]
    cmp["entry"] = _entry_label(cmp)
    return cmp, cmp["metric_id"].iloc[0]


def _versus_baseline(task: Task, prepared: pd.DataFrame) -> Block | None:
    cmp, metric = _versus_frame(task, prepared)
    if metric is None:
        return None
    best = cmp[cmp["against"] != "own default"]
    if best.empty:  # no baseline ran on these datasets: nothing to set the entries against
        return None
    counts = (best.groupby(["entry", "model_kind"], sort=True)["verdict"].value_counts().unstack(fill_value=0)
              .reindex(columns=["better", "indistinguishable", "worse"], fill_value=0).reset_index())
    counts.columns.name = None
    lo = float(np.nanmin(best[["ci_low", "against_ci_low", "value", "against_value"]].to_numpy()))
    hi = float(np.nanmax(best[["ci_high", "against_ci_high", "value", "against_value"]].to_numpy()))
    pad = 0.05 * (hi - lo or 1.0)
    options = {}
    for entry, g in best.groupby("entry", sort=False):
        chart = Chart("point", g.reset_index(drop=True), x="against_value", y="value",
                      x_title=f"best tuned baseline: {metric}", y_title=f"{entry}: {metric}",
                      label="where", x_err=("against_ci_low", "against_ci_high"), y_err=("ci_low", "ci_high"),
                      diagonal=True, domain=(lo - pad, hi + pad),
                      tooltip=("where", "against_model", "against_variant", "value", "against_value",
                               "difference", "diff_low", "diff_high", "n_seeds", "verdict"),
                      caption=VERSUS_CAPTION)
        shown = cmp[cmp["entry"] == entry][["dataset_id", "scheme", "against", "against_model", "against_variant",
                                             "value", "against_value", "difference", "diff_low", "diff_high",
                                             "n_paired_seeds", "verdict"]].reset_index(drop=True)
        options[entry] = (chart, Table(shown, key=f"versus_{task.id}"))
    rank = {"transformer": 0, "adapter": 1, "baseline": 2, "control": 3}
    kinds = dict(zip(best["entry"], best["model_kind"]))
    order = sorted(options, key=lambda e: (rank.get(kinds[e], 4), e))  # the foundation models first
    options = {e: options[e] for e in order}
    return Block("Model vs best tuned baseline", (
        Caption(f"Verdicts on {metric} against the best tuned baseline of each dataset and split scheme "
                "(the baseline with the best mean among the tuned ones; where none was tuned, among all "
                "baselines, and the table says so), and of each tuned variant against its own default."),
        Table(counts, key=f"verdicts_{task.id}", heading="Verdicts against the best tuned baseline (count of "
                                                         "dataset and split schemes)"),
        Choice("Entry", f"versus_entry_{task.id}", options, order[0], static_all=True),
    ))


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
            "control, 1 = best control (lower-is-better metrics flipped), not clipped: below 0 is worse than "
            "the worst control, above 1 better than the best; then "
            f"averaged over metrics, then over datasets, splits and seeds.{overall} <score>_low / _high: "
            "its 95 % interval over the n_seeds seeds (Student's t over each seed's score). n_metrics: scaled "
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
            y_title=f"{y} score (scaled between controls)", label="model",
            x_err=(f"{x}_low", f"{x}_high"), y_err=(f"{y}_low", f"{y}_high"),
            tooltip=("model", "model_kind", y, x, "overall", "n_seeds", "n_metrics", "n_missing"),
            caption=f"Top right is best: {y} and {x} scores at 1 are at the best control's level (beyond 1: "
                    "better than it, below 0: worse than the worst control). Whiskers: "
                    "95 % intervals over seeds (none with one seed). Models without both scores are not "
                    "drawn.")
    bars = agg.dropna(subset=["mean_scaled"])
    if bars.empty:
        return None
    return Chart(
        "bar", bars, x="mean_scaled", y="model", x_title="mean score scaled between controls",
        y_title="", order=tuple(bars.sort_values("mean_scaled", ascending=False, kind="mergesort")["model"]),
        x_err=("mean_scaled_low", "mean_scaled_high"),
        tooltip=("model", "model_kind", "mean_scaled", "n_seeds", "n_metrics", "n_missing"),
        caption="Mean score scaled between controls (1 = best control, 0 = worst control); whiskers: its "
                "95 % interval over seeds (none with one seed).")


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
                  "the controls do not bracket the methods, and scaled scores leave [0, 1]):",
            lead="Flagged metrics",
            items=tuple(_flag_item(r) for r in flagged.itertuples()))]
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


def _flag_item(r) -> str:
    """One flagged metric in words: how many values left the range, past which control, which entries."""
    sides = [f"{r.n_above_best} above the best control ({r.best_control}): {r.above_best}" if r.n_above_best else "",
             f"{r.n_below_worst} below the worst control ({r.worst_control}): {r.below_worst}"
             if r.n_below_worst else ""]
    return (f"{r.metric_id} on {r.dataset_id}: {r.n_outside} of {r.n_methods} method values outside the control "
            f"range ({r.fraction_outside:.0%}; " + "; ".join(s for s in sides if s) + ")")


def _qc(task: Task, qc: pd.DataFrame) -> Block:
    return Block("QC: metric values outside the control range",
                 (*qc_parts(qc), Table(qc, key=f"qc_{task.id}", browsable=True)))


# --- per metric and per subgroup -------------------------------------------------------------------


def _metric_chart(prepared: pd.DataFrame, metric_id: str) -> Chart:
    """Bars of one metric: the mean over seeds per model, one panel per dataset and split scheme,
    whiskers its 95 % interval (:func:`cellarena.analysis.intervals.summarize` of the task's
    :func:`~cellarena.analysis.intervals.overall` rows)."""
    summary = intervals.summarize(prepared[prepared["metric_id"] == metric_id])
    quality = prepared.drop_duplicates("dataset_id").set_index("dataset_id")["label_quality"]
    bars = summary.assign(model=_entry_label(summary), label_quality=summary["dataset_id"].map(quality),
                          value=summary["mean"])
    bars["dataset"] = bars["dataset_id"] + " · " + bars["scheme"] + " (" + bars["label_quality"] + " labels)"
    higher = bool(bars["higher_is_better"].iloc[0])
    order = bars.groupby("model")["value"].mean().sort_values(ascending=not higher, kind="mergesort")
    return Chart("bar", bars.reset_index(drop=True), x="model", y="value", x_title="",
                 y_title=f"{metric_id} ({'higher' if higher else 'lower'} is better)",
                 order=tuple(order.index), facet="dataset", y_err=("ci_low", "ci_high"),
                 tooltip=("model", "model_kind", "dataset_id", "scheme", "label_quality", "value", "ci_low",
                          "ci_high", "n_seeds", "interval_from"),
                 caption="Bars: mean over seeds of successful runs; whiskers: its 95 % interval (from the "
                         "seeds, or from resampled test cells or queries where those vary more: "
                         "interval_from); n_seeds on hover. Embedding metrics are computed on all cells "
                         "at once, so their interval comes from the seeds alone.")


def _per_metric(task: Task, prepared: pd.DataFrame, metrics: list[str]) -> Block | None:
    if not metrics:
        return None
    charts = {m: (_metric_chart(prepared, m),) for m in metrics}
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


# --- published claims ----------------------------------------------------------------------------

CLAIMS_TITLE = "Published claims"
CLAIMS_INTRO = (
    "Each claim of a paper (claims/<id>.yaml) is re-judged from this results table: once as the paper "
    "made it (its datasets and models, which usually need the network, a published checkpoint or a GPU) "
    "and once by an offline proxy that tests the same statement on the suite's own data, labelled as "
    "such. Each comparison A vs B is judged on every dataset and split scheme from the paired difference "
    "A − B (positive = A better) and its 95 % interval: reproduced when the interval lies on the claimed "
    "side of the margin, not reproduced when it lies on the other side, inconclusive when it straddles "
    "the margin; not run, with the reason, when a dataset, a model or enough seeds are missing. A test is "
    "reproduced when every comparison is, not reproduced when any is.")


def claims_section(df: pd.DataFrame, cards: list) -> TaskSection:
    """The "Published claims" section: every claim's verdicts (original and proxy) beside the paper's
    numbers, then per claim its source and every comparison behind the verdicts."""
    from cellarena.analysis import claims as judged  # noqa: PLC0415
    from cellarena.cards.claim import DERIVED, RELATION_TEXT  # noqa: PLC0415

    summary, checks = judged.evaluate(df, cards)
    blocks = [Block("", (Note("info", CLAIMS_INTRO),
                         Table(summary.drop(columns=["claim", "source"]), key="claims_summary",
                               heading="Verdicts")))]
    for card in cards:
        parts: list[Part] = [Note("info", card.claim, lead="Claim:"),
                             Caption(f"Source: {card.source.citation}. doi:{card.source.doi} — {card.source.where}."
                                     + (f" Numbers from: {card.source.numbers_from}." if card.source.numbers_from
                                        else ""))]
        for which, test in (("original", card.original), ("proxy", card.proxy)):
            if test is None:
                continue
            rows = checks[(checks["claim_id"] == card.id) & (checks["test"] == which)]
            relations = "; ".join(dict.fromkeys(f"{c.relation}: {RELATION_TEXT[c.relation]}" for c in test.comparisons))
            metric = f"{test.metric}, {DERIVED[test.metric]}" if test.metric in DERIVED else test.metric
            about = f"on {metric} ({relations}; at least {test.min_seeds} seeds)"
            extra = (f"Proxy: {test.note}" if which == "proxy" else
                     " ".join(filter(None, (f"Needs: {test.needs}." if test.needs else "",
                                            f"Differs from the paper: {test.note}." if test.note else ""))))
            parts.append(Table(rows.drop(columns=["claim_id", "test"]).reset_index(drop=True),
                               key=f"claim_{card.id}_{which}", heading=f"{which.capitalize()} test {about}"))
            if extra.strip():
                parts.append(Caption(extra.strip()))
        blocks.append(Block(card.id, tuple(parts)))
    empty = pd.DataFrame()
    return TaskSection(task="claims", title=CLAIMS_TITLE, blocks=tuple(blocks), ranking=empty, scaled=empty)


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
