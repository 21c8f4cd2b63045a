"""Perturbation metrics on hand-computed examples, and against the GEARS definitions they follow."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import mean_squared_error, r2_score

from cellarena.metrics import perturbation as pm


def test_pearson_delta_by_hand():
    # changes from control: pred (0, 1, 2), truth (1, 3, 6)
    # covariance sum 5, squared deviations 2 and 114/9
    value = pm.pearson_delta([1, 2, 3], [2, 4, 7], [1, 1, 1])
    assert value == pytest.approx(5 / np.sqrt(2 * 114 / 9))


def test_pearson_delta_on_a_gene_subset():
    # genes 0 and 2 only: pred change (0, 2), truth change (1, 6): two points, r = 1
    assert pm.pearson_delta([1, 9, 3], [2, -5, 7], [1, 1, 1], genes=[0, 2]) == pytest.approx(1.0)
    assert pm.pearson_delta([1, 9, 0], [2, -5, 7], [1, 1, 1], genes=[0, 2]) == pytest.approx(-1.0)


def test_no_predicted_change_scores_zero_not_nan():
    assert pm.pearson_delta([1, 1, 1], [2, 4, 7], [1, 1, 1]) == 0.0


def test_mse_by_hand():
    assert pm.mse([1, 2, 3], [2, 4, 7]) == pytest.approx((1 + 4 + 16) / 3)
    assert pm.mse([1, 2, 3], [2, 4, 7], genes=[1, 2]) == pytest.approx((4 + 16) / 2)


def test_direction_error_by_hand():
    # signs of the change: pred (+, 0, +, +), truth (+, -, 0, +): genes 1 and 2 disagree
    assert pm.direction_error([1, 0, 3, 1], [2, -1, 0, 1], [0, 0, 0, 0]) == pytest.approx(0.5)
    assert pm.direction_error([1, 0, 3, 1], [2, -1, 0, 1], [0, 0, 0, 0], genes=[0, 3]) == 0.0


def test_r2_delta_by_hand():
    # truth change (1, 2, 3), predicted (1, 2, 4): residual 1, total 2
    assert pm.r2_delta([1, 2, 4], [1, 2, 3], [0, 0, 0]) == pytest.approx(0.5)
    assert pm.r2_delta([5, 5, 5], [2, 2, 2], [0, 0, 0]) == 0.0  # nothing to explain


def test_centroid_accuracy_by_hand():
    truths = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    assert pm.centroid_accuracy(truths, truths).tolist() == [1.0, 1.0, 1.0]
    # query 0 predicted at query 1's truth: its own truth is farther than query 1's, nearer than 2's
    preds = truths.copy()
    preds[0] = [10.0, 0.0]
    # d(pred0, truth0) = 10, d(pred0, truth1) = 0, d(pred0, truth2) = sqrt(200)
    assert pm.centroid_accuracy(preds, truths)[0] == pytest.approx(0.5)
    # a tie counts half: pred0 at (0, 5) is as near truth2 as its own truth0 (5), truth1 is farther
    preds[0] = [0.0, 5.0]
    assert pm.centroid_accuracy(preds, truths)[0] == pytest.approx((0.5 + 1.0) / 2)


def test_centroid_accuracy_is_chance_for_one_prediction_everywhere():
    rng = np.random.default_rng(0)
    truths = rng.normal(size=(7, 30))
    same = np.tile(rng.normal(size=30), (7, 1))
    assert pm.centroid_accuracy(same, truths).mean() == pytest.approx(0.5)
    assert np.isnan(pm.centroid_accuracy(truths[:1], truths[:1])).all()


def test_welch_t_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(15, 6)), rng.normal(0.0, 1.0, size=(40, 6))
    expected = stats.ttest_ind(a, b, equal_var=False).statistic
    np.testing.assert_allclose(pm.welch_t(a, b), expected, rtol=1e-10)


def test_top_de_genes_ranks_by_absolute_t():
    rng = np.random.default_rng(2)
    control = rng.normal(0.0, 1.0, size=(50, 5))
    perturbed = rng.normal(0.0, 1.0, size=(50, 5))
    perturbed[:, 3] -= 5.0  # strongest, downwards
    perturbed[:, 1] += 2.0
    assert pm.top_de_genes(perturbed, control, 2).tolist() == [3, 1]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same number of genes"):
        pm.mse([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        pm.pearson_delta([1, np.nan], [1, 2], [0, 0])


# --- GEARS' definitions (gears/inference.py: pearsonr with NaN -> 0, sklearn's mean squared error,
# and the sign-agreement fraction of the top-20 genes) written out independently here.

def _gears_pearson_delta(pred, truth, ctrl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = stats.pearsonr(pred - ctrl, truth - ctrl)[0]
    return 0.0 if np.isnan(value) else value


def _gears_frac_correct_direction(pred, truth, ctrl):
    change = np.abs(np.sign(pred - ctrl) - np.sign(truth - ctrl))
    return np.mean(change == 0)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_gears_definitions(seed):
    rng = np.random.default_rng(seed)
    ctrl = rng.gamma(2.0, size=200)
    truth = ctrl + rng.normal(size=200)
    pred = ctrl + 0.5 * (truth - ctrl) + rng.normal(scale=0.5, size=200)
    pred[:10] = ctrl[:10]  # some exact no-change genes
    de = rng.choice(200, 20, replace=False)
    assert pm.pearson_delta(pred, truth, ctrl) == pytest.approx(_gears_pearson_delta(pred, truth, ctrl))
    assert pm.pearson_delta(pred, truth, ctrl, de) == pytest.approx(
        _gears_pearson_delta(pred[de], truth[de], ctrl[de]))
    assert pm.mse(pred, truth, de) == pytest.approx(mean_squared_error(truth[de], pred[de]))
    assert pm.direction_error(pred, truth, ctrl, de) == pytest.approx(
        1.0 - _gears_frac_correct_direction(pred[de], truth[de], ctrl[de]))
    assert pm.r2_delta(pred, truth, ctrl, de) == pytest.approx(r2_score(truth[de] - ctrl[de], pred[de] - ctrl[de]))
    constant = _gears_pearson_delta(ctrl, truth, ctrl)
    assert pm.pearson_delta(ctrl, truth, ctrl) == constant == 0.0


def test_metric_specs_declare_direction_and_range():
    specs = pm.metric_specs({"top_de": 50})
    assert "pearson_delta_top50" in specs and "mse_top50" in specs
    assert specs["mse_top50"].higher_is_better is False
    assert specs["direction_error_top50"].range == (0.0, 1.0)
    assert all(s.higher_is_better for k, s in specs.items() if k.startswith("pearson"))
