"""The Virtual Cell Challenge metrics of the perturbation task against the ``cell-eval`` package
(PyPI, a test-only dependency) on the suite's own data: the simulated screen's held-out queries,
predicted by a suite baseline through the task's driver. Per query and overall, to 1e-6."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.cards.dataset import CONTROL
from cellarena.data.perturbation import PerturbationSplitSpec, contexts, panel_data
from cellarena.run import perturbation as driver
from cellarena.run.setup import Job, start
from cellarena.tasks import TASKS
from cellarena.metrics import perturbation as pm

cell_eval = pytest.importorskip("cell_eval", reason="cell-eval is a test dependency (pip install -e .[test])")
from cell_eval import MetricsEvaluator  # noqa: E402
from cell_eval._score import score_agg_metrics  # noqa: E402

from test_perturbation import _split  # noqa: E402

N_GENES = 2000


@pytest.fixture(scope="module")
def predicted(proxy_prepared, tmp_path_factory, repo):
    """The kNN baseline's queries on an unseen-perturbation split of the screen (the driver's
    own records: prediction, truth, DE overlap ...), the rows the driver writes for the same run,
    and the panel the task scores on."""
    split_path = tmp_path_factory.mktemp("ce_split") / "unseen.json"
    _split(proxy_prepared, "unseen_perturbations", {"scheme": "unseen_perturbations"}, out=split_path)
    job = Job.of(proxy_prepared, split_path, repo / "models" / "knn_perturbation", seed=0, options={"n_genes": N_GENES})
    s = start("perturbation", job)
    queries, _ = driver._predict_folds(s, job)
    # cell-eval refuses negative expression; this model averages observed profiles, so has none
    assert min(q["pred"].min() for q in queries) >= 0.0
    rows = driver.run(TASKS["perturbation"], job)
    spec = PerturbationSplitSpec.model_validate(s.split["scheme"])
    panel = panel_data(s.adata, N_GENES)
    return queries, rows, panel, s.split, contexts(panel.obs, spec)


def _anndata_pair(queries, panel, split, ctx, prediction: str):
    """cell-eval's inputs: the observed held-out cells with the training controls, and the
    predicted cells (each query's profile repeated once per observed cell) with the same controls."""
    (fold,) = split["folds"]
    pert = panel.obs["perturbation"].astype(str).to_numpy()
    x = np.asarray(panel.X.toarray(), dtype=np.float64)
    control = panel.obs_names.isin(fold["train"]) & (pert == CONTROL)
    test = panel.obs_names.isin(fold["test"])
    real_parts, pred_parts, real_labels, pred_labels = [x[control]], [x[control]], [CONTROL] * control.sum(), \
        [CONTROL] * control.sum()
    for q, record in zip(fold["queries"], queries):
        cells = test & (pert == q["perturbation"]) & (ctx == q["context"])
        real_parts.append(x[cells])
        real_labels += [q["perturbation"]] * cells.sum()
        pred_parts.append(np.tile(record[prediction], (cells.sum(), 1)))
        pred_labels += [q["perturbation"]] * cells.sum()
    var = pd.DataFrame(index=panel.var_names.astype(str))

    def make(parts, labels):
        obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
        return ad.AnnData(X=sp.csr_matrix(np.vstack(parts)), obs=obs, var=var)

    return make(real_parts, real_labels), make(pred_parts, pred_labels)


def _cell_eval(real, pred, outdir):
    evaluator = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=CONTROL, pert_col="perturbation",
                                 num_threads=1, outdir=str(outdir))
    results, agg = evaluator.compute(profile="vcc", write_csv=False)
    per = results.to_pandas().set_index("perturbation")
    return per, agg


def test_per_query_metrics_equal_cell_eval(predicted, tmp_path):
    queries, _, panel, split, ctx = predicted
    real, pred = _anndata_pair(queries, panel, split, ctx, "pred")
    per, _ = _cell_eval(real, pred, tmp_path)
    names = [q["perturbation"] for q in split["folds"][0]["queries"]]
    assert len(names) >= 20 and any("+" in n for n in names) and any("+" not in n for n in names)
    ours = pm.score_queries(queries, TASKS["perturbation"].metric_specs({"n_genes": N_GENES}))
    # cell-eval leaves out a gene only when its name is the perturbation's whole label, so it leaves
    # out nothing for a double; the suite leaves out both targets. Same rule here to compare:
    same_rule = pm.discrimination_l1(np.stack([q["pred"] - q["ctrl"] for q in queries]),
                                     np.stack([q["truth"] - q["ctrl"] for q in queries]),
                                     [q["exclude"] if "+" not in n else [] for q, n in zip(queries, names)])
    np.testing.assert_allclose(ours["de_overlap_at_n"], per.loc[names, "overlap_at_N"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours["mae"], per.loc[names, "mae"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(same_rule, per.loc[names, "discrimination_score_l1"], atol=1e-6, rtol=0)
    singles = np.array(["+" not in n for n in names])
    np.testing.assert_allclose(ours["discrimination_score_l1"][singles], same_rule[singles], atol=0, rtol=0)
    # the DE overlap is not trivial on this split: some genes found, not all
    assert 0.05 < ours["de_overlap_at_n"].mean() < 0.95


def test_overall_score_equals_cell_eval_against_the_same_baseline(predicted, tmp_path):
    """The run's vcc_score row: cell-eval's score_agg_metrics of the model's and the baseline's
    aggregate results (the baseline predicts each query as its ``ref`` profile)."""
    queries, rows, panel, split, ctx = predicted
    names = [q["perturbation"] for q in split["folds"][0]["queries"]]
    doubles = [n for n in names if "+" in n]
    model = _cell_eval(*_anndata_pair(queries, panel, split, ctx, "pred"), tmp_path / "model")
    base = _cell_eval(*_anndata_pair(queries, panel, split, ctx, "ref"), tmp_path / "base")
    # the suite's discrimination score leaves out both targets of a double: swap in the suite's own
    # per-query values there (checked above to equal cell-eval's rule on singles) before aggregating
    specs = TASKS["perturbation"].metric_specs({"n_genes": N_GENES})
    for (per, _), prediction in ((model, "pred"), (base, "ref")):
        ours = pm.score_queries(queries, specs, prediction=prediction)["discrimination_score_l1"]
        per.loc[doubles, "discrimination_score_l1"] = ours[[names.index(n) for n in doubles]]
    agg = {}
    for key, (per, _) in (("model", model), ("base", base)):
        means = per.loc[names, ["mae", "discrimination_score_l1", "overlap_at_N"]].mean()
        agg[key] = pd.DataFrame({"statistic": ["mean"], **{m: [float(v)] for m, v in means.items()}})
    import polars as pl  # noqa: PLC0415

    scored = score_agg_metrics(pl.from_pandas(agg["model"]), pl.from_pandas(agg["base"])).to_pandas()
    expected = float(scored.set_index("metric").loc["avg_score", "from_baseline"])
    got = rows[(rows.metric_id == "vcc_score") & (rows.subgroup == "")]["value"]
    assert len(got) == 1 and 0.0 < expected < 1.0
    assert float(got.iloc[0]) == pytest.approx(expected, abs=1e-6)
    for metric, theirs in (("de_overlap_at_n", "overlap_at_N"), ("mae", "mae"),
                           ("discrimination_score_l1", "discrimination_score_l1")):
        row = rows[(rows.metric_id == metric) & (rows.subgroup == "")]["value"]
        assert float(row.iloc[0]) == pytest.approx(float(model[0].loc[names, theirs].mean()), abs=1e-6)


def test_vcc_score_hand_worked():
    # DES 0.5 against a baseline 0.2 -> 0.375; PDS 0.6 against 0.8 -> below: 0; MAE 0.1 against 0.2 -> 0.5
    assert pm.vcc_score({"de_overlap_at_n": 0.5, "discrimination_score_l1": 0.6, "mae": 0.1},
                        {"de_overlap_at_n": 0.2, "discrimination_score_l1": 0.8, "mae": 0.2}) == \
        pytest.approx((0.375 + 0.0 + 0.5) / 3)
    # a baseline at the best value leaves nothing to gain: that part is 0, not a division error
    assert pm.vcc_score({"de_overlap_at_n": 1.0, "discrimination_score_l1": 1.0, "mae": 0.0},
                        {"de_overlap_at_n": 1.0, "discrimination_score_l1": 1.0, "mae": 0.0}) == 0.0


def test_de_overlap_and_discrimination_hand_worked():
    # real: genes 0, 2, 3 significant, by |lfc| 3 > 0 > 2; predicted: 3, 1, 0 by |lfc| (k = 3 -> {3, 1, 0})
    real = (np.array([2.0, 0.1, -1.0, 5.0, 0.0]), np.array([0.01, 0.5, 0.02, 0.001, 0.9]))
    pred = (np.array([1.0, -3.0, 0.2, 4.0, 9.0]), np.array([0.04, 0.01, 0.01, 0.001, 0.2]))
    # predicted significant: 0 (1.0), 1 (3.0), 2 (0.2), 3 (4.0) -> top 3: 3, 1, 0; overlap {3, 0} = 2/3
    assert pm.de_overlap(real, pred) == pytest.approx(2 / 3)
    assert pm.de_overlap((real[0], np.ones(5)), pred) == 0.0  # nothing observed: 0, as cell-eval
    truths = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    preds = np.array([[0.9, 0.0], [0.0, 0.1], [0.0, 3.0]])
    # query 0 is nearest truth 1 (0.1) before its own (0.9): 1 - 1/3; query 1 nearest truth 0: 1 - 1/3
    np.testing.assert_allclose(pm.discrimination_l1(preds, truths), [2 / 3, 2 / 3, 1.0])
    # leaving gene 0 out for query 0 makes truths 0 and 1 equally far: only nearer ones count
    np.testing.assert_allclose(pm.discrimination_l1(preds, truths, [[0], [], []])[0], 1.0)
