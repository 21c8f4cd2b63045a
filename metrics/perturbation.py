"""Perturbation-response metrics: a predicted expression profile against the observed one.

Every profile is a vector over the task's gene panel: the mean log-normalized expression
(``log1p(counts / total * 1e4)``) of the cells of one perturbation in one context. A metric
compares the prediction for one query (context, perturbation) with the observed mean of that
query's held-out cells, relative to the context's control mean ``ctrl`` (the unperturbed cells) or
to a reference profile ``ref``.

The quantities follow the definitions in use, so numbers can be compared with published ones:

- :func:`pearson_delta`: Pearson correlation of predicted and observed change from control, as
  GEARS computes ``pearson_delta`` (all genes) and ``pearson_delta_top20_de`` (on the top
  differentially expressed genes). A constant vector carries no signal and scores 0, as GEARS
  replaces an undefined correlation by 0.
- :func:`mse`: mean squared error of the profiles on a gene set (GEARS' ``mse_de`` on the top
  20 DE genes).
- :func:`direction_error`: fraction of genes whose predicted change has a different sign from the
  observed one, i.e. ``1 - frac_correct_direction_top20`` of GEARS; predicting no change where the
  truth changes counts as wrong.
- :func:`r2_delta`: coefficient of determination of the observed change by the predicted change.
- :func:`pearson_delta` with ``ref`` in place of ``ctrl``: the correlation after removing the
  systematic difference between perturbed and control cells (Viñas Torné et al. 2025, Systema):
  ``ref`` is the average perturbed profile of the training data, so a model that only predicts
  the average perturbation effect scores 0.
- :func:`centroid_accuracy`: for each query, the fraction of the *other* queries whose observed
  change is farther from the predicted change than the query's own observed change (ties count
  half; Systema's centroid accuracy, made tie-aware): 1 = every prediction is nearest its own
  truth, 0.5 = chance, and exactly 0.5 for a prediction that is the same for every query.

Gene sets: :func:`top_de_genes` ranks genes by the absolute Welch t-statistic of the perturbed
cells against the control cells (the truth side only; no prediction enters the gene choice).
"""

from __future__ import annotations

import numpy as np

from cellarena.metrics import MetricSpec


def _vectors(*arrays, genes=None) -> list[np.ndarray]:
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64).ravel()
        out.append(a if genes is None else a[np.asarray(genes)])
    n = {a.size for a in out}
    if len(n) != 1:
        raise ValueError(f"profiles must have the same number of genes, got {sorted(n)}")
    if out[0].size == 0:
        raise ValueError("cannot score an empty gene set")
    if not all(np.isfinite(a).all() for a in out):
        raise ValueError("profiles contain NaN or inf")
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0.0 or not np.isfinite(denom):
        return 0.0  # a constant vector carries no signal (GEARS: NaN -> 0)
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0))


def pearson_delta(pred, truth, ctrl, genes=None) -> float:
    """Pearson correlation of ``pred - ctrl`` with ``truth - ctrl`` (on ``genes`` if given)."""
    p, t, c = _vectors(pred, truth, ctrl, genes=genes)
    return _pearson(p - c, t - c)


def mse(pred, truth, genes=None) -> float:
    """Mean squared difference of the two profiles (on ``genes`` if given)."""
    p, t = _vectors(pred, truth, genes=genes)
    return float(np.mean((p - t) ** 2))


def direction_error(pred, truth, ctrl, genes=None) -> float:
    """Fraction of genes where ``sign(pred - ctrl) != sign(truth - ctrl)``."""
    p, t, c = _vectors(pred, truth, ctrl, genes=genes)
    return float(np.mean(np.sign(p - c) != np.sign(t - c)))


def r2_delta(pred, truth, ctrl, genes=None) -> float:
    """``1 - sum((dp - dt)^2) / sum((dt - mean(dt))^2)`` with ``d = profile - ctrl``; unbounded below.

    A constant observed change leaves nothing to explain: the score is then 0.
    """
    p, t, c = _vectors(pred, truth, ctrl, genes=genes)
    dp, dt = p - c, t - c
    ss_tot = float(((dt - dt.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 0.0
    return 1.0 - float(((dp - dt) ** 2).sum()) / ss_tot


def centroid_accuracy(preds, truths) -> np.ndarray:
    """Per query ``i``: the fraction of queries ``j != i`` with ``|pred_i - truth_j| > |pred_i - truth_i|``
    (Euclidean; ties count 0.5). ``preds`` and ``truths`` are (n_queries, n_genes), rows aligned;
    the task passes changes from each query's own control, so cell identity does not decide it and
    a prediction that is the same for every query averages exactly 0.5. NaN for every query when
    there is only one."""
    p = np.asarray(preds, dtype=np.float64)
    t = np.asarray(truths, dtype=np.float64)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"preds and truths must be equal-shape 2-d arrays, got {p.shape} and {t.shape}")
    n = p.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(axis=2))  # d[i, j] = |pred_i - truth_j|
    own = np.diag(d)[:, None]
    score = (d > own).astype(float) + 0.5 * np.isclose(d, own, rtol=1e-12, atol=1e-12)
    np.fill_diagonal(score, 0.0)
    return score.sum(axis=1) / (n - 1)


def welch_t(perturbed, control) -> np.ndarray:
    """Welch t-statistic per gene of ``perturbed`` cells (rows) against ``control`` cells (rows)."""
    a = np.asarray(perturbed, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (cells, genes) arrays with the same genes, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least two perturbed and two control cells")
    se = np.sqrt(a.var(axis=0, ddof=1) / a.shape[0] + b.var(axis=0, ddof=1) / b.shape[0])
    diff = a.mean(axis=0) - b.mean(axis=0)
    return np.divide(diff, se, out=np.zeros_like(diff), where=se > 0)


def top_de_genes(perturbed, control, n: int) -> np.ndarray:
    """Indices of the ``n`` genes with the largest ``|welch_t|`` (ties by gene index), best first."""
    t = np.abs(welch_t(perturbed, control))
    order = np.lexsort((np.arange(t.size), -t))
    return order[: min(n, t.size)]


# Per-query metrics. ``fn(q)`` receives a query's arrays: pred, truth, ctrl, ref (profiles) and de
# (top DE gene indices for the configured N). centroid_accuracy needs every query at once and is
# computed by score_queries.
def metric_specs(options: dict | None = None) -> dict[str, MetricSpec]:
    """The perturbation task's metrics; the option ``top_de`` (default 20) is the N of the top-N DE metrics."""
    top_n = int((options or {}).get("top_de", 20))
    k = f"top{top_n}"
    specs = (
        MetricSpec("pearson_delta", lambda q: pearson_delta(q["pred"], q["truth"], q["ctrl"]), True,
                   (-1.0, 1.0), "Pearson r of predicted vs observed change from control, all panel genes"),
        MetricSpec(f"pearson_delta_{k}", lambda q: pearson_delta(q["pred"], q["truth"], q["ctrl"], q["de"]),
                   True, (-1.0, 1.0), f"Pearson r of the change from control on the top {top_n} DE genes"),
        MetricSpec(f"mse_{k}", lambda q: mse(q["pred"], q["truth"], q["de"]), False, (0.0, np.inf),
                   f"mean squared error of the profile on the top {top_n} DE genes"),
        MetricSpec(f"direction_error_{k}", lambda q: direction_error(q["pred"], q["truth"], q["ctrl"], q["de"]),
                   False, (0.0, 1.0), f"fraction of the top {top_n} DE genes changed in the wrong direction"),
        MetricSpec(f"r2_delta_{k}", lambda q: r2_delta(q["pred"], q["truth"], q["ctrl"], q["de"]), True,
                   (-np.inf, 1.0), f"R² of the observed change by the predicted one, top {top_n} DE genes"),
        MetricSpec("pearson_delta_reference", lambda q: pearson_delta(q["pred"], q["truth"], q["ref"]), True,
                   (-1.0, 1.0), "Pearson r of the change from the average perturbed training profile "
                                "(systematic perturbation effect removed), all panel genes"),
        MetricSpec("centroid_accuracy", None, True, (0.0, 1.0),
                   "fraction of other queries whose observed change is farther from the predicted "
                   "change than its own (0.5 = chance)"),
    )
    return {s.id: s for s in specs}


METRICS = metric_specs()


def score_queries(queries: list[dict], specs: dict[str, MetricSpec] | None = None) -> dict[str, np.ndarray]:
    """Every metric for every query: ``{metric_id: array (n_queries,)}``.

    Each query is a dict with ``pred``, ``truth``, ``ctrl``, ``ref`` (profiles over the panel) and
    ``de`` (indices of its top DE genes).
    """
    specs = specs or METRICS
    out = {}
    for mid, spec in specs.items():
        if mid == "centroid_accuracy":
            out[mid] = centroid_accuracy(np.stack([q["pred"] - q["ctrl"] for q in queries]),
                                         np.stack([q["truth"] - q["ctrl"] for q in queries]))
        else:
            out[mid] = np.array([spec.fn(q) for q in queries], dtype=float)
    return out
