"""Zero-shot metrics: the kNN probe and the reuse of the integration metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

from cellarena.metrics import integration
from cellarena.metrics import zero_shot as Z


def blobs(n_per=50, d=8, sep=6.0, batch_shift=1.5, seed=0):
    """3 cell types x 2 batches of Gaussian blobs (the same design as the integration tests)."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.array(["B", "NK", "T"]), 2 * n_per)
    batch = np.tile(np.repeat(np.array(["b1", "b2"]), n_per), 3)
    centers = rng.normal(0.0, sep, size=(3, d))
    X = centers[np.searchsorted(["B", "NK", "T"], types)] + rng.normal(size=(types.size, d))
    X[batch == "b2"] += batch_shift / np.sqrt(d)
    return X.astype(np.float32), types, batch


def test_registry():
    assert list(Z.METRICS)[:2] == ["knn_accuracy", "knn_macro_f1"]
    assert {Z.METRICS[m].group for m in ("knn_accuracy", "knn_macro_f1")} == {"classification"}
    assert "pcr_comparison" not in Z.METRICS
    reused = [m for m in Z.METRICS if m not in ("knn_accuracy", "knn_macro_f1")]
    assert reused == [m for m in integration.METRICS if m != "pcr_comparison"]
    assert all(Z.METRICS[m] is integration.METRICS[m] for m in reused)
    assert all(s.higher_is_better and s.range == (0.0, 1.0) for s in list(Z.METRICS.values())[:2])


def test_knn_perfect_separation():
    X, labels, _ = blobs(sep=50.0)
    assert Z.knn_cv(X, labels) == {"knn_accuracy": 1.0, "knn_macro_f1": 1.0}


def test_knn_random_labels_near_chance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1200, 10)).astype(np.float32)
    labels = rng.choice(["a", "b", "c", "d"], size=1200)
    out = Z.knn_cv(X, labels)
    assert out["knn_accuracy"] == pytest.approx(0.25, abs=0.05)
    assert out["knn_macro_f1"] == pytest.approx(0.25, abs=0.06)


def test_knn_matches_scikit_learn_and_is_seeded():
    X, labels, _ = blobs(sep=1.0, seed=2)  # overlapping types: accuracy well below 1
    out = Z.knn_cv(X, labels, seed=4)
    pred = cross_val_predict(KNeighborsClassifier(15), X, labels,
                             cv=StratifiedKFold(5, shuffle=True, random_state=4))
    assert out["knn_accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert out["knn_macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert 0.4 < out["knn_accuracy"] < 0.95
    assert Z.knn_cv(X, labels, seed=4) == out
    assert Z.knn_accuracy(X, labels, seed=4) == out["knn_accuracy"]
    others = [Z.knn_cv(X, labels, seed=s)["knn_accuracy"] for s in range(5, 9)]
    assert any(a != out["knn_accuracy"] for a in others)


def test_knn_drops_classes_smaller_than_n_splits():
    X, labels, _ = blobs(sep=1.0, seed=2)
    rng = np.random.default_rng(0)
    X_rare = rng.normal(size=(4, X.shape[1])).astype(np.float32)
    with_rare = Z.knn_cv(np.vstack([X, X_rare]), np.concatenate([labels, ["rare"] * 4]))
    assert with_rare == Z.knn_cv(X, labels)
    assert Z.knn_cv(np.vstack([X, X_rare]), np.concatenate([labels, ["rare"] * 4]), n_splits=4) != with_rare
    with pytest.raises(ValueError, match="two classes"):
        Z.knn_cv(X[:12], np.array(["a"] * 8 + ["b"] * 4))


def test_knn_small_folds_clip_k():
    # 15 cells in 5 folds: every training fold has 12 cells, fewer than the 15 neighbours asked for,
    # so k is clipped to 12 (scikit-learn would refuse k > 12)
    X, labels, _ = blobs(seed=5)
    idx = np.concatenate([np.flatnonzero(labels == t)[:5] for t in ("B", "NK", "T")])
    X, labels = X[idx], labels[idx]
    pred = cross_val_predict(KNeighborsClassifier(12), X, labels,
                             cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert Z.knn_cv(X, labels)["knn_accuracy"] == pytest.approx(accuracy_score(labels, pred))


@pytest.fixture(scope="module")
def data():
    integration.configure_jax_cache()
    return blobs()


def test_score_zero_shot_without_batch(data):
    X, labels, _ = data
    out = Z.score_zero_shot(X, labels, seed=0)
    assert list(out) == ["knn_accuracy", "knn_macro_f1", "nmi", "ari", "silhouette_label", "clisi"]
    # the rows a run gets on a dataset without batches (a failed or not-applicable run too): the same
    assert set(Z.metric_specs({})) == set(out)
    assert {k: out[k] for k in ("knn_accuracy", "knn_macro_f1")} == Z.knn_cv(X, labels)
    ref = integration.score_integration(X, labels, None)
    for k, v in ref.items():
        assert out[k] == pytest.approx(v)
    assert out["nmi"] == pytest.approx(1.0) and out["knn_accuracy"] == 1.0


def test_score_zero_shot_with_batch(data):
    X, labels, batch = data
    out = Z.score_zero_shot(X, labels, batch)
    assert list(out) == ["knn_accuracy", "knn_macro_f1", "isolated_labels", "nmi", "ari", "silhouette_label",
                         "clisi", "silhouette_batch", "ilisi", "graph_connectivity"]
    ref = integration.score_integration(X, labels, batch)
    for k, v in ref.items():
        assert out[k] == pytest.approx(v)
    assert set(Z.metric_specs({"batch_role": "batch"})) == set(out)
    assert "kbet" in Z.score_zero_shot(X, labels, batch, include_kbet=True)
    # a single batch value is the same as no batch
    assert list(Z.score_zero_shot(X, labels, np.full(len(X), "b1"))) == list(Z.score_zero_shot(X, labels))
