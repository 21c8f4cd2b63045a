"""Zero-shot embedding metrics: how much cell-type structure a frozen embedding carries.

Zero-shot evaluations of single-cell foundation models (e.g. Kedzierska et al. 2025, "Zero-shot
evaluation reveals limitations of single-cell foundation models", Genome Biology) score the
embedding of a pretrained model without any fine-tuning. Two views are reported:

- a probe: a k-nearest-neighbour classifier trained and tested on the embedding by stratified
  K-fold cross-validation (:func:`knn_cv`), group ``"classification"``;
- the label-centred metrics of the integration task (:mod:`metrics.integration`), group ``"bio"``,
  plus its batch metrics (group ``"batch"``) when the cells come from at least two batches.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellarena.metrics import MetricSpec
from cellarena.metrics import annotation
from cellarena.metrics import integration

CLASSIFICATION = "classification"


def _knn_predictions(X, labels, *, n_splits: int, n_neighbors: int, seed: int):
    """Out-of-fold predictions of the kNN probe, with the true labels of the cells scored."""
    from sklearn.model_selection import StratifiedKFold  # noqa: PLC0415
    from sklearn.neighbors import KNeighborsClassifier  # noqa: PLC0415

    X = np.asarray(X, dtype=np.float32)
    labels = pd.Series(np.asarray(labels, dtype=object).ravel())
    if X.ndim != 2 or X.shape[0] != len(labels):
        raise ValueError(f"X must be (n_cells, d) with one label per cell, got {X.shape} and {len(labels)}")
    if labels.isna().any():
        raise ValueError("labels have missing values; drop those cells first")
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    y = labels.astype(str).to_numpy()
    classes, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, classes[counts >= n_splits])
    if len(np.unique(y[keep])) < 2:
        raise ValueError(f"kNN cross-validation needs two classes with at least {n_splits} cells each")
    X, y = X[keep], y[keep]
    pred = np.empty_like(y)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(X, y):
        k = min(n_neighbors, len(train))
        clf = KNeighborsClassifier(n_neighbors=k).fit(X[train], y[train])
        pred[test] = clf.predict(X[test])
    return y, pred


def knn_cv(X, labels, *, n_splits: int = 5, n_neighbors: int = 15, seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy and macro F1 of a kNN classifier on the embedding.

    Cells are split by stratified K-fold (shuffled with ``seed``); each fold is labelled by a
    majority vote of its ``n_neighbors`` nearest training cells (Euclidean, uniform weights; ties
    go to the alphabetically first label). The out-of-fold predictions of all folds are pooled and
    scored once with :func:`metrics.annotation.accuracy` and :func:`metrics.annotation.macro_f1`.

    Classes with fewer than ``n_splits`` cells cannot appear in every fold, and their cells would
    often be tested with no example of their class left to train on; those cells are left out of
    the probe altogether (as training neighbours and as test cells). Raises ValueError when fewer
    than two classes remain.

    Returns ``{"knn_accuracy": ..., "knn_macro_f1": ...}``.
    """
    y, pred = _knn_predictions(X, labels, n_splits=n_splits, n_neighbors=n_neighbors, seed=seed)
    return {"knn_accuracy": annotation.accuracy(y, pred), "knn_macro_f1": annotation.macro_f1(y, pred)}


def knn_accuracy(X, labels, *, n_splits: int = 5, n_neighbors: int = 15, seed: int = 0) -> float:
    """Pooled out-of-fold accuracy of the kNN probe (see :func:`knn_cv`)."""
    return knn_cv(X, labels, n_splits=n_splits, n_neighbors=n_neighbors, seed=seed)["knn_accuracy"]


def knn_macro_f1(X, labels, *, n_splits: int = 5, n_neighbors: int = 15, seed: int = 0) -> float:
    """Pooled out-of-fold macro F1 of the kNN probe (see :func:`knn_cv`)."""
    return knn_cv(X, labels, n_splits=n_splits, n_neighbors=n_neighbors, seed=seed)["knn_macro_f1"]


# The integration metrics reused here: all but pcr_comparison, which needs an unintegrated
# representation that a zero-shot evaluation does not have.
_REUSED = [mid for mid in integration.METRICS if mid != "pcr_comparison"]

METRICS: dict[str, MetricSpec] = {
    **{m.id: m for m in (
        MetricSpec("knn_accuracy", knn_accuracy, True, (0.0, 1.0),
                   "5-fold cross-validated accuracy of a 15-NN classifier on the embedding",
                   group=CLASSIFICATION),
        MetricSpec("knn_macro_f1", knn_macro_f1, True, (0.0, 1.0),
                   "5-fold cross-validated macro F1 of a 15-NN classifier on the embedding",
                   group=CLASSIFICATION),
    )},
    **{mid: integration.METRICS[mid] for mid in _REUSED},
}


def metric_specs(options: dict | None = None) -> dict[str, MetricSpec]:
    """The zero-shot task's metrics: ``kbet`` only with ``include_kbet``; the batch metrics and
    ``isolated_labels`` (a label is "isolated" by how many batches hold it) only when the plan gives
    the dataset a ``batch_role``."""
    options = options or {}
    needs_batch = {k for k, v in METRICS.items() if v.group == integration.BATCH} | {"isolated_labels"}
    return {k: v for k, v in METRICS.items()
            if (k != "kbet" or options.get("include_kbet")) and (k not in needs_batch or options.get("batch_role"))}


def score_zero_shot(X, labels, batch=None, *, seed: int = 0, include_kbet: bool = False) -> dict[str, float]:
    """kNN-probe metrics plus the integration metrics defined for the inputs, keyed by metric id.

    ``batch`` may be None (one batch): then only the probe and the bio metrics other than
    ``isolated_labels`` are reported. With at least two batches, ``isolated_labels`` and the batch
    metrics are added (``kbet`` only with ``include_kbet``). ``seed`` drives the fold split and
    the k-means behind ``nmi`` / ``ari``.
    """
    out = knn_cv(X, labels, seed=seed)
    out.update(integration.score_integration(X, labels, batch, include_kbet=include_kbet, seed=seed))
    return {k: out[k] for k in METRICS if k in out}


def score_embedding(X, labels, batch, *, X_unintegrated=None, options: dict | None = None, seed: int = 0
                    ) -> dict[str, float]:
    """The zero-shot task's scores of one embedding (cellarena/run/embedding.py calls every embedding
    task's metrics this way): :func:`score_zero_shot` with the task's options; a zero-shot evaluation
    has no unintegrated representation to compare with."""
    return score_zero_shot(X, labels, batch, seed=seed, include_kbet=bool((options or {}).get("include_kbet")))
