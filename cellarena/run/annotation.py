"""The annotation driver: fit on the split's training cells, predict its test cells with their labels
removed, score the predictions against the held-back labels (the solution)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from cellarena.run.checks import check_known_labels, check_labels
from cellarena.run.setup import (Job, Started, assigned, plugin_instance, precheck, reason_error, sandbox, start,
                                  status_of, tuning_reason)


def annotate(model, adata, split, card) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit ``model`` on the split's training cells, predict its test cells (labels removed); returns
    (checked predictions, true test labels, number of cells fit on)."""
    train = adata[split["train"]]
    test = adata[split["test"]]
    train = train[assigned(train.obs["cell_type"])].copy()
    test = test[assigned(test.obs["cell_type"])].copy()
    y_train = train.obs["cell_type"].astype(str).to_numpy()
    solution = test.obs["cell_type"].astype(str).to_numpy()
    test.obs = test.obs.drop(columns=["cell_type"])  # the model's view of the test cells has no labels
    model.fit(train, y_train)
    kwargs = {"solution": solution} if card.uses_solution else {}
    pred = check_labels(model.predict(test, **kwargs), test.n_obs)
    check_known_labels(pred, set(y_train) | (set(solution) if card.uses_solution else set()))
    return pred, solution, train.n_obs


def _why_not(task, s: Started, job: Job) -> tuple[str, str] | None:
    reason = precheck(s.card, s.info, s.split, s.adata, role=task.label_role) or tuning_reason(job.tuning)
    if reason is None and task.id not in s.card.tasks:
        reason = ("not_applicable", f"model {s.card.id} does not support {task.id}")
    if reason is None and s.split["n_train"] == 0:
        reason = ("not_applicable", f"split has {s.split['n_train']} train and {s.split['n_test']} test cells")
    return reason


def run(task, job: Job) -> pd.DataFrame:
    """Run one model on one split and return its long result rows (never raises for the model's fault)."""
    specs = task.metric_specs(job.options)
    s = start(task.id, job)
    reason = _why_not(task, s, job)
    if reason is not None:
        return s.run.status_rows(specs, *reason)
    try:
        with sandbox(s.card, job) as box, plugin_instance(box, s.run.params, s.run) as model:
            t0 = time.perf_counter()
            pred, solution, n_fit = annotate(model, s.adata, s.split, s.card)
            s.run.columns["wall_s"] = time.perf_counter() - t0
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        return s.run.status_rows(specs, *status_of(exc, s.card, s.info, s.split))
    s.run.columns.update(n_train=int(n_fit), n_test=int(solution.size))
    return s.run.rows({mid: spec.fn(solution, pred) for mid, spec in specs.items()}, specs,
                      bootstrap=_bootstrap(task, s.run, specs, solution, pred, job.options))


def _bootstrap(task, run, specs: dict, solution: np.ndarray, pred: np.ndarray, options: dict) -> dict[str, str]:
    """Each overall metric on the split's resamples of the test cells (labels coded as integers
    first: the metrics compare labels exactly, so codes give the same numbers, faster)."""
    from cellarena.metrics.bootstrap import encode, replicate  # noqa: PLC0415

    index = run.resamples(solution.size, options)
    if index is None:
        return {}
    _, codes = np.unique(np.concatenate([solution, pred]), return_inverse=True)
    coded = codes[: solution.size], codes[solution.size:]
    labelled = solution.astype(str), np.asarray(pred).astype(str)  # for metrics that read the labels (ontology)
    return {mid: encode(task.bootstrap_unit, solution.size,
                        replicate(spec.fn, labelled if getattr(spec.fn, "on_labels", False) else coded, index))
            for mid, spec in specs.items() if not spec.per_subgroup}


def probe(task, job: Job) -> np.ndarray:
    """The predictions alone, raising what the plug-in or the checks raise (``cellarena validate``)."""
    s = start(task.id, job)
    reason = _why_not(task, s, job)
    if reason is not None:
        raise reason_error(*reason)
    with sandbox(s.card, job) as box, plugin_instance(box, s.run.params, s.run) as model:
        pred, _solution, _n = annotate(model, s.adata, s.split, s.card)
    return np.asarray(pred)


def tuning_objective(task, card, job: Job, adata, split, select, box):
    """``evaluate(params) -> macro-F1`` of a stratified K-fold CV over the split's training cells: the
    test cells, and their labels, are not even loaded into the objective. ``select(n, labels)`` (from
    cellarena/run/tuning.py) gives the budget's subsample of the cells and its inner folds."""
    from cellarena.metrics.annotation import macro_f1  # noqa: PLC0415

    train = adata[split["train"]]
    train = train[assigned(train.obs["cell_type"])]
    labels = train.obs["cell_type"].astype(str).to_numpy()
    keep, folds = select(train.n_obs, labels)
    cells, labels = train[keep].copy(), labels[keep]

    def evaluate(params):
        scores = []
        for fit_idx, val_idx in folds:
            fit, val = cells[fit_idx].copy(), cells[val_idx].copy()
            val.obs = val.obs.drop(columns=["cell_type"])
            with plugin_instance(box, params) as model:
                model.fit(fit, labels[fit_idx])
                pred = check_labels(model.predict(val), val.n_obs)
            scores.append(macro_f1(labels[val_idx], pred))
        return float(np.mean(scores))

    return evaluate

