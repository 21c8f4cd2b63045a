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
    """Per query of ``fold``: observed profile, control, reference, top DE genes, the genes the
    discrimination score leaves out (its targets), the observed DE test and the baseline's DE
    overlap (metrics/perturbation.py), the true cells and the context's control cells."""
    from cellarena.data.perturbation import TrainingProfiles, targets  # noqa: PLC0415
    from cellarena.metrics.perturbation import de_overlap, profile_cells, top_de_genes, wilcoxon_de  # noqa: PLC0415

    profiles = TrainingProfiles(train_view)
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    test = adata.obs_names.isin(fold["test"])
    train_ctrl = adata.obs_names.isin(fold["train"]) & (pert == CONTROL)
    controls = {c: _dense_lognorm(adata[train_ctrl & (ctx_all == c)])  # once per context, not per query
                for c in sorted({q["context"] for q in fold["queries"]})}
    genes = pd.Index(adata.var_names)
    out = []
    for q in fold["queries"]:
        cells = test & (pert == q["perturbation"]) & (ctx_all == q["context"])
        x = _dense_lognorm(adata[cells])
        ctrl_x = controls[q["context"]]
        ref = profiles.reference(q["context"])
        real_de = wilcoxon_de(x, ctrl_x)
        exclude = [int(i) for i in genes.get_indexer(targets(q["perturbation"])) if i >= 0]
        # the control profile is the one models get from the same training view, bit for bit, so a
        # no-change prediction has exactly zero change
        out.append({"truth": x.mean(axis=0), "ctrl": profiles.control(q["context"]), "cells": x,
                    "ref": ref, "de": top_de_genes(x, ctrl_x, top_de), "category": q["category"],
                    "exclude": exclude, "real_de": real_de, "ctrl_cells": ctrl_x,
                    "des_ref": de_overlap(real_de, wilcoxon_de(profile_cells(ref, len(x)), ctrl_x))})
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
    top_de = int(job.options.get("top_de", 20))
    # the same for every model of the split: computed once per batch (never changed below)
    truth = shared(("fold_truth", id(adata), str(job.split), fold["name"], top_de),
                   lambda: _fold_truth(adata, fold, ctx_all, top_de, train))
    asked = pd.DataFrame([{"context": q["context"], "perturbation": q["perturbation"]}
                          for q in fold["queries"]])
    kwargs = {"solution": [t["cells"].copy() for t in truth]} if card.uses_solution else {}
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
    from cellarena.metrics.perturbation import de_overlap, profile_cells, wilcoxon_de  # noqa: PLC0415

    for t, p in zip(truth, pred):
        des = de_overlap(t["real_de"], wilcoxon_de(profile_cells(p, len(t["cells"])), t["ctrl_cells"]))
        queries.append({**{k: v for k, v in t.items() if k not in ("cells", "ctrl_cells", "real_de")},
                        "pred": p, "des": des})
    return wall


def _scores(queries: list[dict], specs: dict) -> tuple[dict, dict]:
    """Per-query values of every per-query metric for the model, and of the parts the aggregate
    metrics scale by for the baseline (``ref``)."""
    from cellarena.metrics.perturbation import VCC_PARTS, score_queries  # noqa: PLC0415

    parts = {m: specs[m] for m in VCC_PARTS if m in specs}
    return score_queries(queries, specs), score_queries(queries, parts, prediction="ref")


def _means(per_query: dict, select) -> dict[str, float]:
    """Each per-query metric's mean over the finite values of the selected queries (NaN if none)."""
    out = {}
    for mid, arr in per_query.items():
        vals = arr[select]
        finite = np.isfinite(vals)
        out[mid] = float(vals[finite].mean()) if finite.any() else float("nan")
    return out


def _values(queries: list[dict], specs: dict, scores: tuple[dict, dict] | None = None) -> dict:
    """Each metric averaged over the queries (subgroup '') and over the queries of each category
    (``scores``: :func:`_scores`, when already computed); the aggregate metrics from those means."""
    from cellarena.metrics.perturbation import aggregate  # noqa: PLC0415

    per_query, baseline = scores if scores is not None else _scores(queries, specs)
    categories = np.array([q["category"] for q in queries])
    groups = {"": np.ones(len(queries), dtype=bool), **{c: categories == c for c in sorted(set(categories))}}
    values = {}
    for group, select in groups.items():
        means = _means(per_query, select)
        means.update(aggregate(specs, means, _means(baseline, select)))
        for mid, v in means.items():
            entry = values.setdefault(mid, {"": None})
            if np.isfinite(v):
                entry[group] = v
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
    scores = _scores(queries, specs)
    values = _values(queries, specs, scores)
    s.run.columns.update(wall_s=wall, n_train=int(s.split["n_train"]), n_test=int(s.split["n_test"]))
    missing = [m for m, v in values.items() if v[""] is None]
    if missing:
        log.warning("metrics %s undefined on this split (e.g. centroid accuracy with one query)", missing)
    return s.run.rows({m: v for m, v in values.items() if v[""] is not None}, specs,
                      bootstrap=_bootstrap(task, s.run, specs, scores, job.options))


def _bootstrap(task, run, specs: dict, scores: tuple[dict, dict], options: dict) -> dict[str, str]:
    """Each metric's mean over the split's resamples of its queries, and the aggregate metrics from
    the model's and the baseline's means on the same resample. A query's own value is kept as it is
    on every resample (centroid accuracy and the discrimination score rank a query against all the
    others of the split; the resampled mean treats those ranks as fixed)."""
    from cellarena.metrics.bootstrap import encode, replicate_mean  # noqa: PLC0415
    from cellarena.metrics.perturbation import aggregate  # noqa: PLC0415

    per_query, baseline = scores
    n_queries = len(next(iter(per_query.values()), []))
    index = run.resamples(n_queries, options)
    if index is None:
        return {}
    model = {mid: replicate_mean(arr, index) for mid, arr in per_query.items()}
    base = {mid: replicate_mean(arr, index) for mid, arr in baseline.items()}
    agg = [aggregate(specs, {m: v[b] for m, v in model.items()}, {m: v[b] for m, v in base.items()})
           for b in range(len(index))]
    for mid in (agg[0] if agg else {}):
        model[mid] = np.array([a[mid] for a in agg])
    return {mid: encode(task.bootstrap_unit, n_queries, reps) for mid, reps in model.items()}


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
