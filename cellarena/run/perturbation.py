"""The perturbation driver: one job per (dataset, split, model); a split may hold several folds. Each
fold's model is fit on its training cells and predicts the mean profile of each query (a held-out
perturbation in a context); metrics compare the predictions with the held-out cells, which the
model never sees (except a control whose card sets ``uses_solution``)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from cellarena.cards.dataset import CONTROL
from cellarena.run.checks import check_profiles
from cellarena.run.setup import (Job, Started, plugin_instance, precheck, reason_error, sandbox, shared, start,
                                  status_of)

log = logging.getLogger(__name__)


def _dense_lognorm(panel) -> np.ndarray:
    return np.asarray(panel.X.toarray(), dtype=np.float64)


def _fold_truth(adata, fold, ctx_all, top_de, train_view):
    """Per query of ``fold``: observed profile, control, reference, top DE genes, and the true cells."""
    from cellarena.data.perturbation import TrainingProfiles  # noqa: PLC0415
    from cellarena.metrics.perturbation import top_de_genes  # noqa: PLC0415

    profiles = TrainingProfiles(train_view)
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    test = adata.obs_names.isin(fold["test"])
    train_ctrl = adata.obs_names.isin(fold["train"]) & (pert == CONTROL)
    controls = {c: _dense_lognorm(adata[train_ctrl & (ctx_all == c)])  # once per context, not per query
                for c in sorted({q["context"] for q in fold["queries"]})}
    out = []
    for q in fold["queries"]:
        cells = test & (pert == q["perturbation"]) & (ctx_all == q["context"])
        x = _dense_lognorm(adata[cells])
        ctrl_x = controls[q["context"]]
        # the control profile is the one models get from the same training view, bit for bit, so a
        # no-change prediction has exactly zero change
        out.append({"truth": x.mean(axis=0), "ctrl": profiles.control(q["context"]), "cells": x,
                    "ref": profiles.reference(q["context"]), "de": top_de_genes(x, ctrl_x, top_de),
                    "category": q["category"]})
    return out


def _why_not(task, s: Started) -> tuple[str, str] | None:
    reason = precheck(s.card, s.info, s.split, s.adata, role=task.label_role)
    if reason is None and task.id not in s.card.tasks:
        reason = ("not_applicable", f"model {s.card.id} does not support {task.id}")
    return reason


def _predict_folds(s: Started, job: Job) -> tuple[list[dict], float]:
    """Every fold's queries with the model's prediction, and the model's wall seconds.
    Raises what the plug-in or the output checks raise."""
    from cellarena.data.perturbation import PerturbationSplitSpec, contexts, panel_data  # noqa: PLC0415

    spec = PerturbationSplitSpec.model_validate(s.split["scheme"])
    n_genes = int(job.options.get("n_genes", 2000))
    adata = shared(("panel", id(s.adata), n_genes), lambda: panel_data(s.adata, n_genes))  # once per batch
    ctx_all = contexts(adata.obs, spec)
    queries, wall, summed = [], 0.0, {}
    with sandbox(s.card, job) as box:
        for fold in s.split["folds"]:
            wall += _predict_fold(box, s, job, adata, ctx_all, fold, queries, summed)
    return queries, wall


def _predict_fold(box, s: Started, job: Job, adata, ctx_all, fold, queries: list, summed: dict) -> float:
    """One fold: fit a new instance on its training cells, predict its queries (appended to
    ``queries``); returns the model's wall seconds."""
    from cellarena.data.perturbation import model_view  # noqa: PLC0415

    card, run, split = s.card, s.run, s.split
    is_train = adata.obs_names.isin(fold["train"])
    train = model_view(adata[is_train], ctx_all[is_train])
    truth = _fold_truth(adata, fold, ctx_all, int(job.options.get("top_de", 20)), train)
    asked = pd.DataFrame([{"context": q["context"], "perturbation": q["perturbation"]}
                          for q in fold["queries"]])
    kwargs = {"solution": [t["cells"] for t in truth]} if card.uses_solution else {}
    with plugin_instance(box, run.params, run) as model:
        t0 = time.perf_counter()
        model.fit_perturbation(train)
        pred = check_profiles(model.predict_perturbation(asked, **kwargs), len(asked), adata.n_vars)
        wall = time.perf_counter() - t0
    runtime = json.loads(run.columns["runtime_json"])  # this fold's; counters add up over folds
    for key in ("finetune_s", "finetune_steps"):
        if key in runtime:
            summed[key] = summed.get(key, 0) + runtime[key]
    run.columns["runtime_json"] = json.dumps({**runtime, **summed, "folds": len(split["folds"])},
                                             sort_keys=True, default=str)
    for t, p in zip(truth, pred):
        t.pop("cells")
        queries.append(dict(t, pred=p))
    return wall


def _values(queries: list[dict], specs: dict, per_query: dict | None = None) -> dict:
    """Each metric averaged over the queries (subgroup '') and over the queries of each category
    (``per_query``: the metrics of each query, when already computed)."""
    from cellarena.metrics.perturbation import score_queries  # noqa: PLC0415

    per_query = per_query if per_query is not None else score_queries(queries, specs)
    categories = np.array([q["category"] for q in queries])
    values = {}
    for mid, arr in per_query.items():
        finite = np.isfinite(arr)
        entry = {"": float(arr[finite].mean()) if finite.any() else None}
        for c in sorted(set(categories)):
            sel = finite & (categories == c)
            if sel.any():
                entry[c] = float(arr[sel].mean())
        values[mid] = entry
    return values


def run(task, job: Job) -> pd.DataFrame:
    """Fit on each fold's training cells, predict its queries' profiles, score against the held-out cells.

    Options: ``n_genes`` (panel size, default 2000) and ``top_de`` (N of the top-N DE metrics,
    default 20). Metrics are averaged over queries (subgroup '') and over the queries of each
    category (subgroup = category: the held-out cell type, or single_unseen / double_seenK).
    """
    specs = task.metric_specs(job.options)
    s = start(task.id, job)
    reason = _why_not(task, s)
    if reason is not None:
        return s.run.status_rows(specs, *reason)
    try:
        queries, wall = _predict_folds(s, job)
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        return s.run.status_rows(specs, *status_of(exc, s.card, s.info, s.split))
    from cellarena.metrics.perturbation import score_queries  # noqa: PLC0415

    per_query = score_queries(queries, specs)
    values = _values(queries, specs, per_query)
    s.run.columns.update(wall_s=wall, n_train=int(s.split["n_train"]), n_test=int(s.split["n_test"]))
    missing = [m for m, v in values.items() if v[""] is None]
    if missing:
        log.warning("metrics %s undefined on this split (e.g. centroid accuracy with one query)", missing)
    return s.run.rows({m: v for m, v in values.items() if v[""] is not None}, specs,
                      bootstrap=_bootstrap(task, s.run, per_query, job.options))


def _bootstrap(task, run, per_query: dict[str, np.ndarray], options: dict) -> dict[str, str]:
    """Each metric's mean over the split's resamples of its queries. A query's own value is kept as
    it is on every resample (centroid accuracy ranks a query against all the others of the split;
    its resampled mean treats those ranks as fixed)."""
    from cellarena.metrics.bootstrap import encode, replicate_mean  # noqa: PLC0415

    n_queries = len(next(iter(per_query.values()), []))
    index = run.resamples(n_queries, options)
    if index is None:
        return {}
    return {mid: encode(task.bootstrap_unit, n_queries, replicate_mean(arr, index)) for mid, arr in per_query.items()}


def probe(task, job: Job) -> np.ndarray:
    """The metric values from the predicted profiles, raising what the plug-in or the checks raise
    (``cellarena validate``)."""
    specs = task.metric_specs(job.options)
    s = start(task.id, job)
    reason = _why_not(task, s)
    if reason is not None:
        raise reason_error(*reason)
    values = _values(_predict_folds(s, job)[0], specs)
    rows = s.run.rows({m: v for m, v in values.items() if v[""] is not None}, specs)
    return rows.sort_values(["metric_id", "subgroup"])["value"].to_numpy()
