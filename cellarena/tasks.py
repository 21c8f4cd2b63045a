"""The task families, declared once.

Each task is one frozen :class:`Task` record: what a plug-in must implement for it, which obs role
holds what it is scored against, which split schemes fit it, where its metrics and its driver live,
how it is tuned, and what the leaderboard shows for it. The results schema, the runner, tuning,
``cellarena validate``, the CLI, the workflow's plan and the leaderboard all read these records;
none of them spells a task id list of its own.

Adding a task takes one record here, one driver module in ``cellarena/run/`` and one metrics module
in ``metrics/`` (each exposing ``metric_specs(options)``); see docs/architecture.md.

This module imports nothing heavy: metrics and drivers are named by module path and imported only
when a job needs them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How a task is tuned (cellarena/run/tuning.py): the objective the driver computes on the
    split's training side only, and the test-set metric the leaderboard sets tuned against default."""

    metric: str
    direction: Literal["maximize", "minimize"]
    description: str  # ``{k}`` is replaced by the number of inner folds
    report_metric: str


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    title: str  # the leaderboard's tab and section title
    methods: tuple[str, ...]  # the plug-in methods the task calls (cellarena/plugin.py BaseModel)
    label_role: str  # the obs role the metrics score against; a dataset without it is not_applicable
    split_schemes: tuple[str, ...]  # the split schemes of the task's config (`split: all` for embeddings)
    metrics_module: str  # exposes metric_specs(options) -> {metric_id: MetricSpec}
    driver: str  # exposes run(task, job), probe(task, job) and, for tuned tasks, tuning_objective(...)
    # (embedding tasks: the metrics module also exposes score_embedding(X, labels, batch, ...))
    scores_embeddings: bool = False  # one embedding per model and dataset serves every such task
    needs_batch: bool = False  # a dataset without two batches is not_applicable
    needs_corpus: bool = False  # a pretrained model is scored only when its pretraining corpus is declared
    needs_unintegrated: bool = False  # embedding metrics compare with a PCA of the log-normalized counts
    option_keys: tuple[str, ...] = ()  # config keys of the task's section handed to the job as options
    tuning: Tuning | None = None
    leakage_reference: str = ""  # the baseline whose score replaces a leaked one (leakage-imputed ranking)
    overall_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # metric group -> weight of the overall score
    headline_metrics: tuple[str, ...] = ()  # shown by `cellarena summary`
    subgroup_metric: str = ""  # broken down by subgroup on the leaderboard (e.g. query categories)
    kind_settings: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # model kind -> what kind of entry it is here
    notes: tuple[str, ...] = ()  # what the leaderboard says under the task's title
    ontology_metrics: bool = False  # a dataset card's labels.ontology adds the Cell-Ontology-aware metrics
    bootstrap_unit: str = ""  # what the driver resamples for a within-split interval (metrics/bootstrap.py); '' none

    def metrics(self):
        """The task's metrics module (imported on first use)."""
        return importlib.import_module(self.metrics_module)

    def metric_specs(self, options: Mapping[str, Any] | None = None) -> dict:
        """The metrics this task reports with ``options`` (the rows a failed run gets, too)."""
        return self.metrics().metric_specs(dict(options or {}))

    def driver_module(self):
        return importlib.import_module(self.driver)


_EMBEDDING = dict(methods=("embed",), label_role="cell_type", split_schemes=("all",),
                  driver="cellarena.run.embedding", scores_embeddings=True, option_keys=("include_kbet",))

TASKS: Mapping[str, Task] = MappingProxyType({t.id: t for t in (
    Task(
        id="annotation", title="Cell-type annotation", methods=("fit", "predict"), label_role="cell_type",
        split_schemes=("stratified", "heldout"), metrics_module="cellarena.metrics.annotation",
        driver="cellarena.run.annotation", bootstrap_unit="cells", ontology_metrics=True,
        tuning=Tuning("macro_f1", "maximize", "macro-F1 of a stratified {k}-fold CV on the split's training cells",
                      report_metric="macro_f1"),
        leakage_reference="logistic_regression", headline_metrics=("accuracy", "macro_f1"),
    ),
    Task(
        id="integration", title="Batch integration", metrics_module="cellarena.metrics.integration",
        needs_batch=True, needs_unintegrated=True,
        tuning=Tuning("held_out_loss", "minimize", "the model's held-out loss (e.g. negative ELBO per cell) "
                                                   "over {k} folds of the cells it embeds; no labels used",
                      report_metric="nmi"),
        leakage_reference="pca", overall_weights=MappingProxyType({"bio": 0.6, "batch": 0.4}),
        headline_metrics=("nmi", "silhouette_label", "ilisi", "graph_connectivity"), **_EMBEDDING,
    ),
    Task(
        id="zero_shot", title="Zero-shot embeddings", metrics_module="cellarena.metrics.zero_shot",
        needs_corpus=True, leakage_reference="pca", headline_metrics=("knn_accuracy", "knn_macro_f1", "nmi"),
        # baselines (PCA, scVI) are fit on the evaluation data itself: references, not zero-shot entries
        kind_settings=MappingProxyType({
            "baseline": "reference: trained on the evaluation data, not zero-shot",
            "control": "control", "transformer": "zero-shot", "adapter": "zero-shot"}),
        notes=("References, not zero-shot: {references} are trained on the evaluation data itself; they "
               "show what a dataset-specific model reaches and are labelled in the setting column.",),
        **_EMBEDDING,
    ),
    Task(
        id="perturbation", title="Perturbation response", methods=("fit_perturbation", "predict_perturbation"),
        bootstrap_unit="queries",
        label_role="perturbation", split_schemes=("heldout_context", "unseen_perturbations"),
        metrics_module="cellarena.metrics.perturbation", driver="cellarena.run.perturbation",
        option_keys=("n_genes", "top_de"), leakage_reference="train_mean",
        headline_metrics=("pearson_delta_top20", "pearson_delta", "mse_top20"),
        subgroup_metric="pearson_delta_top20",
    ),
)})

TASK_IDS: tuple[str, ...] = tuple(TASKS)
EMBEDDING_TASKS: tuple[str, ...] = tuple(t.id for t in TASKS.values() if t.scores_embeddings)
TUNED_TASKS: tuple[str, ...] = tuple(t.id for t in TASKS.values() if t.tuning is not None)
# The embedding task whose objective tunes embedding models: one embedding serves every embedding
# task, so at most one of them may be tuned.
TUNED_EMBEDDING_TASK: str | None = next((t.id for t in TASKS.values() if t.scores_embeddings and t.tuning), None)
assert sum(1 for t in TASKS.values() if t.scores_embeddings and t.tuning) <= 1, "one tuned embedding task at most"
EMBEDDING_SPLIT = "all"  # the reserved split name of the embedding tasks: every cell is scored


def get(task_id: str) -> Task:
    """The task ``task_id``; a ValueError naming the known ones otherwise."""
    try:
        return TASKS[task_id]
    except KeyError:
        raise ValueError(f"unknown task {task_id!r}; the tasks are {', '.join(TASK_IDS)}") from None
