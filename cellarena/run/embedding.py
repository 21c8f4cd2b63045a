"""The driver of the embedding tasks (integration, zero-shot): one job per model embeds a split's
cells (:func:`embed_cells`, written with cellarena/run/embedding_file.py), one job per task and
dataset scores every model's embedding in a single process (:func:`score_embeddings`), so imports,
the unintegrated PCA and JAX compilation are paid once per dataset. A model embeds a dataset once;
every embedding task scores the same embedding. Labels never reach the model.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellarena.data.prepare import provenance, read_cells, read_meta
from cellarena.data.splits import read_split
from cellarena.errors import DataError
from cellarena.results import COLUMNS
from cellarena.run.checks import check_embedding
from cellarena.run.embedding_file import EmbeddingRun
from cellarena.run.setup import (Job, Run, assigned, plugin_instance, precheck, reason_error, reason_of, sandbox,
                                  start, status_of, tuning_reason)
from cellarena.tasks import EMBEDDING_TASKS, get

log = logging.getLogger(__name__)


def embedding_view(cells: ad.AnnData, batch_role: str | None) -> ad.AnnData:
    """What an embedding model sees of ``cells``: the counts and, with ``batch_role``, that role as
    ``obs["batch"]``; never a label."""
    obs = pd.DataFrame(index=cells.obs_names.copy())
    if batch_role:
        obs["batch"] = pd.Categorical(cells.obs[batch_role].astype(str))
    return ad.AnnData(X=None, obs=obs, var=cells.var.copy(), layers={"counts": cells.layers["counts"]})


def embed_cells(job: Job, *, raise_errors: bool = False) -> EmbeddingRun:
    """Have the model embed every test cell of the split.

    The model's view holds the counts and, when the job's ``batch_role`` option is given,
    ``obs["batch"]``; never the labels (except for a control whose card sets ``uses_solution``).
    Failures and unfit inputs are recorded in the returned run's status, never raised
    (``raise_errors``, for ``cellarena validate``: they are raised instead).
    """
    batch_role = job.options.get("batch_role")
    s = start("", job)
    card, run = s.card, s.run
    out = EmbeddingRun(columns=run.columns, tasks=list(card.tasks), kind=card.kind,
                       has_corpus=card.pretraining is not None)
    reason = precheck(card, s.info, s.split, s.adata) or tuning_reason(job.tuning)
    if reason is None and not set(card.tasks) & set(EMBEDDING_TASKS):
        reason = ("not_applicable", f"model {card.id} does not embed cells (tasks: {card.tasks})")
    if reason is None and batch_role and batch_role not in s.adata.obs:
        reason = ("not_applicable", f"dataset has no {batch_role!r} role to use as the batch")
    if reason is not None:
        if raise_errors:
            raise reason_error(*reason)
        run.finish(*reason)
        return out
    cells = s.adata[s.split["test"]]
    solution = cells.obs["cell_type"].astype(str).to_numpy()
    view = embedding_view(cells, batch_role)
    kwargs = {"solution": solution} if card.uses_solution else {}
    try:
        with sandbox(card, job) as box, plugin_instance(box, run.params, run) as model:
            t0 = time.perf_counter()
            emb = check_embedding(model.embed(view, **kwargs), view.n_obs)
            run.columns["wall_s"] = time.perf_counter() - t0
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        if raise_errors:
            raise
        run.finish(*status_of(exc, card, s.info, s.split))
        return out
    out.embedding = emb
    out.obs_names = np.asarray(view.obs_names, dtype=str)
    run.finish("ok", "")
    return out


def run(task, job: Job) -> pd.DataFrame:
    """One model's rows for one embedding task: embed, then score (the workflow runs the two halves as
    separate jobs)."""
    return score_embeddings(task.id, job.prepared, job.split, [embed_cells(job)], seed=job.seed,
                            options=job.options)


def probe(task, job: Job) -> np.ndarray:
    """The embedding alone, raising what the plug-in or the checks raise (``cellarena validate``)."""
    return embed_cells(job, raise_errors=True).embedding


def score_embeddings(task_id: str, prepared: str | Path | ad.AnnData, split_path: str | Path,
                     runs: list[EmbeddingRun], *, seed: int, options: dict | None = None) -> pd.DataFrame:
    """Score every model's embedding of one (dataset, split) for the embedding task ``task_id``.
    ``prepared``: the prepared file (only the scored cells' counts are read from it), or its cells
    already in memory. Above ``options["max_cells"]`` cells, a seeded subsample stratified by cell
    type is scored, and the rows say so.

    Cells labelled ``unassigned`` are left out of every metric. A run that failed upstream, or whose
    scoring raises, gets status rows; the others are unaffected.
    """
    task = get(task_id)
    if not task.scores_embeddings:
        raise ValueError(f"{task_id!r} is not an embedding task; choose one of {EMBEDDING_TASKS}")
    options = dict(options or {})
    specs = task.metric_specs(options)
    metrics = task.metrics()
    role = options.get("batch_role")
    # a path: only the scored cells' counts are read (an atlas's other cells never are)
    adata = prepared if isinstance(prepared, ad.AnnData) else read_meta(prepared)
    info = provenance(adata)
    split = read_split(split_path)
    cells = labels = batch = unintegrated = None
    subsampled = ""
    if info.get("status") == "ok" and split.get("status") == "ok" and task.label_role in adata.obs:
        pos = adata.obs_names.get_indexer(pd.Index(split["test"]))
        if (pos < 0).any():
            raise DataError(f"{int((pos < 0).sum())} cells of split {split['split_id']} are not in the prepared file",
                            where=str(split_path), fix="re-make the split from this prepared file")
        pos = pos[assigned(adata.obs[task.label_role].iloc[pos])]
        pos, subsampled = _scored_cells(pos, adata.obs[task.label_role].iloc[pos], options.get("max_cells"), seed)
        cells = adata[pos].copy() if isinstance(prepared, ad.AnnData) else read_cells(prepared, pos, meta=adata)
        labels = cells.obs[task.label_role].astype(str).to_numpy()
        batch = cells.obs[role].astype(str).to_numpy() if role and role in cells.obs else None
    frames = []
    for emb_run in runs:
        run = Run(dict(emb_run.columns, task=task.id), json.loads(emb_run.columns["params_json"]))
        reason = _why_not(task, emb_run, role, batch, cells is not None)
        if reason is not None:
            frames.append(run.status_rows(specs, *reason, stamp=False))
            continue
        try:
            emb = _aligned(emb_run, cells)
            if task.needs_unintegrated and unintegrated is None:
                from cellarena.data.features import LogPCA  # noqa: PLC0415

                unintegrated = LogPCA(50, 2000, seed, exact=True).fit_transform(cells)
            values = metrics.score_embedding(emb, labels, batch, X_unintegrated=unintegrated, options=options,
                                             seed=seed)
        except Exception as exc:  # one model's scoring failure stays its own
            log.error("scoring %s failed:\n%s", emb_run.columns["model_id"], traceback.format_exc())
            frames.append(run.status_rows(specs, "failed", f"scoring failed: {reason_of(exc)}", stamp=False))
            continue
        run.columns["n_test"] = int(labels.size)
        frames.append(run.rows({mid: values.get(mid) for mid in specs if mid in values}, specs, reason=subsampled,
                               stamp=False))
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)


def _scored_cells(pos: np.ndarray, labels: pd.Series, max_cells: int | None, seed: int) -> tuple[np.ndarray, str]:
    """``pos``, or a seeded subsample of ``max_cells`` of them stratified by cell type, and the note
    its rows carry. The embedding metrics are superlinear in cells (silhouettes compare every pair of
    cells; the neighbour graphs, LISI and graph connectivity grow faster than linearly), so an atlas
    is scored on such a subsample; the embedding itself is of every cell."""
    if not max_cells or len(pos) <= max_cells:
        return pos, ""
    from cellarena.run.tuning import subsample  # noqa: PLC0415

    keep = subsample(len(pos), int(max_cells), seed, labels.astype(str).to_numpy())
    return pos[keep], (f"scored on {len(keep):,} of {len(pos):,} cells: a seeded subsample stratified by cell "
                       f"type (scoring_max_cells; the embedding metrics are superlinear in cells)")


def _why_not(task, emb_run: EmbeddingRun, role, batch, data_ok) -> tuple[str, str] | None:
    """Why ``emb_run`` gets no scores for ``task``, as (status, reason); None when it is scored."""
    cols = emb_run.columns
    if task.id not in emb_run.tasks:
        return "not_applicable", f"model {cols['model_id']} does not support {task.id}"
    if task.needs_corpus and emb_run.kind in ("transformer", "adapter") and not emb_run.has_corpus:
        return "not_applicable", f"{task.id.replace('_', '-')} needs the model's pretraining corpus declared"
    if data_ok and task.needs_batch and (batch is None or np.unique(batch).size < 2):
        what = f"the {role!r} role" if role else "no batch role"
        return "not_applicable", f"{task.id} needs a batch with at least two values; this plan gives {what}"
    if emb_run.status != "ok":
        return emb_run.status, cols["status_reason"]
    return None


def _aligned(emb_run: EmbeddingRun, cells: ad.AnnData) -> np.ndarray:
    """The embedding rows of the scored cells, matched by cell ID."""
    index = pd.Index(emb_run.obs_names)
    pos = index.get_indexer(cells.obs_names)
    if (pos < 0).any():
        raise DataError(f"{int((pos < 0).sum())} scored cells are missing from the embedding file",
                        fix="re-run the model's embedding job on this prepared dataset")
    return emb_run.embedding[pos]


def tuning_objective(task, card, job: Job, adata, split, select, box):
    """``evaluate(params) -> held-out loss``: the model's own label-free loss (``held_out_loss``, e.g.
    the negative ELBO of scVI) over the inner folds of the cells it will embed; the model sees counts
    (and the batch), never a label. ``select(n)`` gives the budget's subsample and its folds."""
    from cellarena.errors import NotApplicable  # noqa: PLC0415

    batch_role = job.options.get("batch_role")
    test = adata[split["test"]]
    if batch_role and batch_role not in test.obs:
        raise NotApplicable(f"dataset has no {batch_role!r} role to use as the batch")
    keep, folds = select(test.n_obs, None)
    view = embedding_view(test[keep], batch_role)

    def evaluate(params):
        losses = []
        for fit_idx, val_idx in folds:
            with plugin_instance(box, params) as model:
                if not model.implements("held_out_loss"):
                    raise NotApplicable(f"model {card.id} has no held_out_loss: it cannot be tuned for "
                                        "integration without labels")
                losses.append(float(model.held_out_loss(view[fit_idx].copy(), view[val_idx].copy())))
        return float(np.mean(losses))

    return evaluate
