"""Annotation metrics agree with scikit-learn on seeded data."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cellarena.metrics import annotation as am

CLASSES = np.array(["B", "CD4 T", "CD8 T", "NK", "Mono"])


def _seeded(seed, n=500, noise=0.3, extra_pred_class=False):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(CLASSES, size=n, p=[0.1, 0.4, 0.2, 0.25, 0.05])
    y_pred = y_true.copy()
    flip = rng.random(n) < noise
    pool = np.append(CLASSES, "Platelet") if extra_pred_class else CLASSES
    y_pred[flip] = rng.choice(pool, size=flip.sum())
    return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("extra", [False, True])
def test_against_sklearn(seed, extra):
    y_true, y_pred = _seeded(seed, extra_pred_class=extra)
    assert am.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert am.macro_f1(y_true, y_pred) == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert am.weighted_f1(y_true, y_pred) == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted"))
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_bal = skm.balanced_accuracy_score(y_true, y_pred)
    assert am.balanced_accuracy(y_true, y_pred) == pytest.approx(ref_bal)
    per = am.f1_per_class(y_true, y_pred)
    labels = sorted(set(y_true))
    ref = skm.f1_score(y_true, y_pred, labels=labels, average=None)
    assert list(per) == labels
    np.testing.assert_allclose([per[c] for c in labels], ref)


def test_hand_checked_example():
    y_true = ["a", "a", "b", "b"]
    y_pred = ["a", "b", "b", "b"]
    # class a: tp 1, pred 1, true 2 -> F1 2/3 ; class b: tp 2, pred 3, true 2 -> F1 4/5
    assert am.f1_per_class(y_true, y_pred) == pytest.approx({"a": 2 / 3, "b": 0.8})
    assert am.macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 0.8) / 2)
    assert am.accuracy(y_true, y_pred) == pytest.approx(0.75)
    assert am.balanced_accuracy(y_true, y_pred) == pytest.approx((0.5 + 1.0) / 2)


def test_perfect_and_worst():
    y = np.array(["x", "y", "z"] * 5)
    for mid in ("accuracy", "macro_f1", "balanced_accuracy", "weighted_f1"):
        assert am.METRICS[mid].fn(y, y) == 1.0
        assert am.METRICS[mid].fn(y, np.roll(y, 1)) == 0.0


def test_every_metric_declares_direction_and_range():
    for spec in am.METRICS.values():
        assert spec.higher_is_better is True
        assert spec.range == (0.0, 1.0)
    assert set(am.score(["a"], ["a"])) == set(am.METRICS)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="equal length"):
        am.accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        am.accuracy([], [])
