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

The Virtual Cell Challenge metrics, defined as the ``cell-eval`` package (0.8) computes them and
checked against it to 1e-6 (tests/test_cell_eval.py):

- :func:`de_overlap`: differential-expression overlap (cell-eval ``overlap_at_N``). Each side's
  genes are tested against the context's control cells (:func:`wilcoxon_de`: two-sided
  Mann-Whitney U, normal approximation with tie and continuity corrections, as scipy and the
  ``numba-mwu`` package that cell-eval uses compute it; Benjamini-Hochberg FDR over the panel; fold change of the back-transformed geometric means); the genes significant at
  FDR < 0.05 are ordered by |log2 fold change|, and the score is the share of the real top k found
  among the predicted top k, with k = the number of real significant genes (0 when there is none).
- :func:`discrimination_l1`: perturbation discrimination (``discrimination_score_l1``): the L1
  distance of a query's predicted change to every query's observed change, the perturbation's
  target genes left out, and 1 - (number of observed changes nearer than its own) / (number of
  queries). 1 = its own is nearest.
- :func:`mae`: mean absolute error of the predicted and observed mean profiles, all panel genes.
- :func:`vcc_score`: the baseline-scaled overall score. Each of the three means is scaled against
  the same means of a baseline (``(m - b) / (1 - b)`` for the two scores, ``1 - m / b`` for MAE),
  clipped below at 0, undefined ones set to 0, and averaged. The baseline predicts every query as
  ``ref`` (its context's control plus the average perturbed training change), the analogue of the
  challenge's cell-mean baseline.

A model predicts one mean profile per query, while cell-eval compares cells. For the DE test the
predicted cells are copies of the predicted profile (negative values set to 0), as many as the
query's observed cells, which is how cell-eval builds the cells of its own mean baseline; observed and predicted cells are tested
against the same control cells. A constant group against sparse controls makes small predicted
changes significant, so the DE overlap of a one-profile prediction is read against the baseline
and the controls, never alone: on the simulated screen the positive control (the mean of half the
true cells, whose fold changes of low-expressed genes are noisy) scores below the linear model. Queries of several
contexts are ranked together for the discrimination score, each change taken from its own
context's control (cell-eval's case is one context).

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


def _query_matrices(preds, truths) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and observed changes as float64 (n_queries, n_genes) arrays, rows aligned."""
    p = np.asarray(preds, dtype=np.float64)
    t = np.asarray(truths, dtype=np.float64)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"preds and truths must be equal-shape 2-d arrays, got {p.shape} and {t.shape}")
    return p, t


def centroid_accuracy(preds, truths) -> np.ndarray:
    """Per query ``i``: the fraction of queries ``j != i`` with ``|pred_i - truth_j| > |pred_i - truth_i|``
    (Euclidean; ties count 0.5). ``preds`` and ``truths`` are (n_queries, n_genes), rows aligned;
    the task passes changes from each query's own control, so cell identity does not decide it and
    a prediction that is the same for every query averages exactly 0.5. NaN for every query when
    there is only one."""
    p, t = _query_matrices(preds, truths)
    n = p.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(axis=2))  # d[i, j] = |pred_i - truth_j|
    own = np.diag(d)[:, None]
    score = (d > own).astype(float) + 0.5 * np.isclose(d, own, rtol=1e-12, atol=1e-12)
    np.fill_diagonal(score, 0.0)
    return score.sum(axis=1) / (n - 1)


def _cell_matrices(perturbed, control, min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Perturbed and control cells as float64 (cells, genes) arrays over the same genes, each with
    at least ``min_cells`` rows."""
    a = np.asarray(perturbed, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (cells, genes) arrays with the same genes, got {a.shape} and {b.shape}")
    if a.shape[0] < min_cells or b.shape[0] < min_cells:
        word = {1: "one", 2: "two"}.get(min_cells, str(min_cells))
        raise ValueError(f"need at least {word} perturbed and {word} control cell{'s' if min_cells > 1 else ''}")
    return a, b


def welch_t(perturbed, control) -> np.ndarray:
    """Welch t-statistic per gene of ``perturbed`` cells (rows) against ``control`` cells (rows)."""
    a, b = _cell_matrices(perturbed, control, 2)
    se = np.sqrt(a.var(axis=0, ddof=1) / a.shape[0] + b.var(axis=0, ddof=1) / b.shape[0])
    diff = a.mean(axis=0) - b.mean(axis=0)
    return np.divide(diff, se, out=np.zeros_like(diff), where=se > 0)


def top_de_genes(perturbed, control, n: int) -> np.ndarray:
    """Indices of the ``n`` genes with the largest ``|welch_t|`` (ties by gene index), best first."""
    t = np.abs(welch_t(perturbed, control))
    order = np.lexsort((np.arange(t.size), -t))
    return order[: min(n, t.size)]


def wilcoxon_de(perturbed, control) -> tuple[np.ndarray, np.ndarray]:
    """Per gene of log-normalized ``perturbed`` and ``control`` cells (rows): the log2 fold change of
    ``expm1(mean)`` (0 where it is undefined, e.g. 0/0) and the Benjamini-Hochberg FDR of a two-sided
    Mann-Whitney U test (normal approximation, tie and continuity corrections)."""
    from numba_mwu import mannwhitneyu_columns  # noqa: PLC0415  (scipy's test, compiled: ~10x faster)
    from scipy.stats import false_discovery_control  # noqa: PLC0415

    a, b = _cell_matrices(perturbed, control, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(a.mean(axis=0)) / np.expm1(b.mean(axis=0)))
    lfc[np.isnan(lfc)] = 0.0
    p = np.asarray(mannwhitneyu_columns(a, b, use_continuity=True, alternative="two-sided").pvalue, dtype=np.float64)
    p = np.clip(np.where(np.isnan(p), 1.0, p), 0.0, 1.0)
    return lfc, false_discovery_control(p)


def _significant_by_effect(lfc: np.ndarray, fdr: np.ndarray, alpha: float) -> np.ndarray:
    sig = np.flatnonzero(fdr < alpha)
    return sig[np.argsort(-np.abs(lfc[sig]), kind="stable")]  # ties keep gene order


def de_overlap(real: tuple[np.ndarray, np.ndarray], pred: tuple[np.ndarray, np.ndarray],
               alpha: float = 0.05) -> float:
    """Share of the real top-k DE genes among the predicted top k (k = number of real genes at
    FDR < ``alpha``; both sides ranked by |log2 fold change|). ``real`` and ``pred`` are
    :func:`wilcoxon_de` results; 0 when no real gene is significant, as cell-eval scores it."""
    real_top = _significant_by_effect(*real, alpha)
    k = real_top.size
    if k == 0:
        return 0.0
    pred_top = _significant_by_effect(*pred, alpha)[:k]
    return float(np.intersect1d(real_top, pred_top).size / k)


def profile_cells(profile, n_cells: int) -> np.ndarray:
    """``n_cells`` copies of a predicted mean profile: the cells a one-profile prediction stands for
    in the DE test, as cell-eval builds the cells of its own mean baseline. Negative values (a
    linear model can predict them; no cell has them, and cell-eval refuses them) become 0."""
    return np.tile(np.maximum(np.asarray(profile, dtype=np.float64), 0.0), (int(n_cells), 1))


def discrimination_l1(pred_changes, true_changes, exclude: list | None = None) -> np.ndarray:
    """Per query ``i``: ``1 - r_i / n`` where ``r_i`` counts the queries ``j`` whose observed change
    is nearer (L1) to the predicted change ``i`` than query ``i``'s own; ``exclude[i]`` lists gene
    indices left out for query ``i`` (its targets). Rows aligned; NaN when there is one query."""
    p, t = _query_matrices(pred_changes, true_changes)
    n = p.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    out = np.empty(n)
    for i in range(n):
        keep = np.ones(p.shape[1], dtype=bool)
        if exclude is not None and len(exclude[i]):
            keep[np.asarray(exclude[i], dtype=int)] = False
        d = np.abs(t[:, keep] - p[i, keep]).sum(axis=1)
        out[i] = 1.0 - np.count_nonzero(d < d[i]) / n
    return out


def mae(pred, truth, genes=None) -> float:
    """Mean absolute difference of the two profiles (on ``genes`` if given)."""
    p, t = _vectors(pred, truth, genes=genes)
    return float(np.mean(np.abs(p - t)))


# The parts of the challenge score and whether larger is better; the baseline's value of each part
# travels with the query under "<part>:baseline" (DE overlap) or is computed from ``ref``.
VCC_PARTS = {"de_overlap_at_n": True, "discrimination_score_l1": True, "mae": False}


def vcc_score(model: dict[str, float], baseline: dict[str, float]) -> float:
    """The baseline-scaled score from the model's and the baseline's mean of each part."""
    scaled = []
    for part, higher in VCC_PARTS.items():
        m, b = np.float64(model[part]), np.float64(baseline[part])
        with np.errstate(divide="ignore", invalid="ignore"):
            v = (m - b) / (1.0 - b) if higher else 1.0 - m / b
        scaled.append(0.0 if not np.isfinite(v) else max(float(v), 0.0))
    return float(np.mean(scaled))


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
        MetricSpec("de_overlap_at_n", lambda q: q["des"], True, (0.0, 1.0),
                   "share of the observed DE genes (Wilcoxon, FDR < 0.05) found among as many predicted "
                   "ones, by |log2 fold change| (cell-eval overlap_at_N; Virtual Cell Challenge DES)"),
        MetricSpec("discrimination_score_l1", None, True, (0.0, 1.0),
                   "1 - share of queries whose observed change is nearer (L1, targets left out) to the "
                   "prediction than its own (cell-eval discrimination_score_l1; Virtual Cell Challenge PDS)"),
        MetricSpec("mae", lambda q: mae(q["pred"], q["truth"]), False, (0.0, np.inf),
                   "mean absolute error of the profile, all panel genes (cell-eval mae)"),
        MetricSpec("vcc_score", None, True, (0.0, 1.0),
                   "mean of DES, PDS and MAE each scaled against the average-perturbation baseline and "
                   "clipped at 0 (Virtual Cell Challenge score, cell-eval score_agg_metrics)"),
    )
    return {s.id: s for s in specs}


METRICS = metric_specs()


# metrics that are not a mean over queries: computed from the means of others (:func:`aggregate`)
AGGREGATE = ("vcc_score",)


def score_queries(queries: list[dict], specs: dict[str, MetricSpec] | None = None,
                  prediction: str = "pred") -> dict[str, np.ndarray]:
    """Every per-query metric for every query: ``{metric_id: array (n_queries,)}``; the metrics of
    :data:`AGGREGATE` are left to :func:`aggregate`.

    Each query is a dict with ``pred``, ``truth``, ``ctrl``, ``ref`` (profiles over the panel),
    ``de`` (indices of its top DE genes), ``des`` (its DE overlap, :func:`de_overlap`) and
    ``exclude`` (gene indices the discrimination score leaves out). ``prediction`` names the profile
    scored (``"ref"`` scores the baseline; its DE overlap is then ``des_ref``).
    """
    specs = specs or METRICS
    if prediction != "pred":
        queries = [dict(q, pred=q[prediction], des=q.get(f"des_{prediction}", np.nan)) for q in queries]
    out = {}
    for mid, spec in specs.items():
        if mid in AGGREGATE:
            continue
        if mid == "centroid_accuracy":
            out[mid] = centroid_accuracy(np.stack([q["pred"] - q["ctrl"] for q in queries]),
                                         np.stack([q["truth"] - q["ctrl"] for q in queries]))
        elif mid == "discrimination_score_l1":
            out[mid] = discrimination_l1(np.stack([q["pred"] - q["ctrl"] for q in queries]),
                                         np.stack([q["truth"] - q["ctrl"] for q in queries]),
                                         [q.get("exclude", []) for q in queries])
        else:
            out[mid] = np.array([spec.fn(q) for q in queries], dtype=float)
    return out


def aggregate(specs: dict[str, MetricSpec], means: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """The :data:`AGGREGATE` metrics of ``specs`` from the model's and the baseline's mean of each
    per-query metric (over the same queries)."""
    out = {}
    if "vcc_score" in specs:
        out["vcc_score"] = vcc_score(means, baseline)
    return out
