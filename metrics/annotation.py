"""Cell-type annotation metrics: predicted labels against true labels.

All metrics take two 1-d arrays of labels (any hashable dtype, usually strings) of equal length and
compare them exactly. The label set is the union of true and predicted labels, so a class that is
predicted but absent from the truth counts against precision (as scikit-learn does).
"""

from __future__ import annotations

import numpy as np

from cellarena.metrics import MetricSpec


def _check(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=object)
    y_pred = np.asarray(y_pred, dtype=object)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must be 1-d of equal length, got {y_true.shape} and {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("cannot score an empty set of cells")
    return y_true.astype(str), y_pred.astype(str)


def _per_class_counts(y_true, y_pred):
    """Classes (sorted), true positives, predicted counts and true counts per class."""
    classes, true_idx = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t, p = true_idx[: y_true.size], true_idx[y_true.size:]
    k = classes.size
    tp = np.bincount(t[t == p], minlength=k).astype(float)
    n_pred = np.bincount(p, minlength=k).astype(float)
    n_true = np.bincount(t, minlength=k).astype(float)
    return classes, tp, n_pred, n_true


def _f1(tp, n_pred, n_true) -> np.ndarray:
    # F1 = 2 TP / (predicted + true); defined as 0 where a class is neither predicted nor true
    denom = n_pred + n_true
    return np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def accuracy(y_true, y_pred) -> float:
    """Fraction of cells whose predicted label equals the true label."""
    y_true, y_pred = _check(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def f1_per_class(y_true, y_pred) -> dict[str, float]:
    """F1 score of each class present in the truth, as ``{class: f1}``."""
    y_true, y_pred = _check(y_true, y_pred)
    classes, tp, n_pred, n_true = _per_class_counts(y_true, y_pred)
    f1 = _f1(tp, n_pred, n_true)
    return {str(c): float(v) for c, v, nt in zip(classes, f1, n_true) if nt > 0}


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of per-class F1 over every class seen in truth or prediction.

    Rare cell types weigh as much as abundant ones, which is why annotation benchmarks report it
    next to accuracy (e.g. Fischer et al. 2024, scTab).
    """
    y_true, y_pred = _check(y_true, y_pred)
    _, tp, n_pred, n_true = _per_class_counts(y_true, y_pred)
    return float(np.mean(_f1(tp, n_pred, n_true)))


def weighted_f1(y_true, y_pred) -> float:
    """Per-class F1 averaged with weights proportional to each class's true frequency."""
    y_true, y_pred = _check(y_true, y_pred)
    _, tp, n_pred, n_true = _per_class_counts(y_true, y_pred)
    return float(np.sum(_f1(tp, n_pred, n_true) * n_true) / n_true.sum())


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in the truth."""
    y_true, y_pred = _check(y_true, y_pred)
    _, tp, _, n_true = _per_class_counts(y_true, y_pred)
    present = n_true > 0
    return float(np.mean(tp[present] / n_true[present]))


METRICS: dict[str, MetricSpec] = {
    m.id: m
    for m in (
        MetricSpec("accuracy", accuracy, True, (0.0, 1.0), "fraction of test cells labelled correctly"),
        MetricSpec("macro_f1", macro_f1, True, (0.0, 1.0), "unweighted mean of per-class F1"),
        MetricSpec("balanced_accuracy", balanced_accuracy, True, (0.0, 1.0), "mean per-class recall"),
        MetricSpec("weighted_f1", weighted_f1, True, (0.0, 1.0), "per-class F1 weighted by class size"),
        MetricSpec("f1_per_class", f1_per_class, True, (0.0, 1.0), "F1 of each true class",
                   per_subgroup=True),
    )
}


def metric_specs(options: dict | None = None) -> dict[str, MetricSpec]:
    """The annotation task's metrics; with the option ``cell_ontology`` (the dataset card's label ->
    Cell Ontology term mapping) also the ontology-aware ones of :mod:`cellarena.metrics.ontology`."""
    specs = dict(METRICS)
    if (options or {}).get("cell_ontology") is not None:
        from cellarena.metrics.ontology import metric_specs as ontology_specs  # noqa: PLC0415

        specs.update(ontology_specs(options["cell_ontology"]))
    return specs


def score(y_true, y_pred) -> dict[str, float | dict[str, float]]:
    """Every annotation metric, keyed by metric id."""
    return {mid: spec.fn(y_true, y_pred) for mid, spec in METRICS.items()}
