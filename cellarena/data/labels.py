"""Silver cell-type labels from marker genes, by clustering and scoring clusters.

Some datasets (e.g. Kang et al. 2018 PBMCs) ship without cell-type labels. For those the suite
makes *silver* labels with the fixed procedure below, implemented by
:func:`marker_cluster_labels`. Every step is deterministic: the same counts, genes, markers,
parameters and seed give the same labels (on the same numerical libraries).

Procedure
---------
Let ``X`` be the cells x genes count matrix.

1. **Normalise.** Divide each cell's counts by the cell's total count and multiply by 1e4, then
   take ``log1p`` (natural log). Call the result ``L``. A cell with zero total count is an error.
2. **Highly variable genes** (the binned-dispersion rule of Seurat v1 / scanpy's
   ``flavor="seurat"``). Let ``E = expm1(L)`` (normalised counts). Per gene compute the mean
   ``m`` and variance ``v`` (ddof=1) of its column of ``E`` over cells. Genes with ``m = 0`` or
   ``v = 0`` are never selected. For the others, ``dispersion = ln(v / m)`` and
   ``x = ln(1 + m)``; split the range ``[min x, max x]`` into 20 equal-width bins (a gene at a bin
   edge goes to the upper bin, the maximum to the last bin) and standardise the dispersion within
   each bin (subtract the bin's mean, divide by its std with ddof=1; a bin with one gene or zero
   std gives 0). Rank genes by this normalised dispersion, highest first, ties broken by the lower
   column index, and keep the top ``n_hvg`` (all of them if fewer remain). The kept columns are used
   in their original column order. Compared with ranking by raw variance this keeps the markers
   of small populations (platelets, pDCs) and drops many strongly expressed
   interferon-response genes.
3. **Scale.** Centre every kept gene to mean 0 and divide by its standard deviation (ddof=1);
   clip the result to [-10, 10]. Call this dense matrix ``Z`` (cells x kept genes).
4. **PCA.** Re-centre the columns of ``Z`` (clipping can move their means slightly), form the
   covariance ``C = Z^T Z / (n_cells - 1)`` and take its ``n_pcs`` leading
   eigenvectors with an exact symmetric eigensolver (LAPACK via ``scipy.linalg.eigh``), ordered by
   decreasing eigenvalue. Each eigenvector's sign is fixed so that its entry of largest absolute
   value is positive. The cell embedding is ``Z @ V``. ``n_pcs`` is capped at
   ``min(n_kept_genes, n_cells - 1)``. Nothing here is random.
5. **Cluster.** ``sklearn.cluster.KMeans(n_clusters, init="k-means++", n_init=10,
   random_state=seed)`` on the embedding. Clusters are then renumbered 0, 1, ... by decreasing
   size (ties: the cluster whose first cell comes first).
6. **Score.** For each marker gene present in ``genes``, take the mean of its ``L`` column within
   each cluster (a plain average over the cluster's cells), then
   z-score those cluster means across clusters (mean and population std over the clusters; a gene
   with the same mean in every cluster gets z = 0). A cell type's score in a cluster is the mean
   z-score over that type's present markers. Markers missing from ``genes`` are ignored; a type
   with none of its markers present is an error, and so is a marker symbol that names more than
   one column. A gene may serve as a marker of several types (e.g. CD3D for CD4 and CD8 T cells).
7. **Assign.** Each cluster gets the type with the highest score (ties: the type listed first in
   ``markers``). ``margin = best - second best``. If ``margin < min_margin`` the cluster is
   labelled ``unassigned`` instead. Every cell gets its cluster's label.

Steps 4 and 5 run with BLAS and OpenMP limited to one thread, so the numbers do not depend on
the machine's core count.

The returned report has one row per cluster with ``cluster, n_cells, label, score_best,
score_second, margin, best_type, second_type`` and the effective parameters in ``report.attrs``;
it is meant to be copied into the dataset card as documentation of how the labels were made.

Scores are in units of across-cluster standard deviations, so ``min_margin`` is too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

UNASSIGNED = "unassigned"  # label of clusters no marker set claims; such cells are never scored

__all__ = ["marker_cluster_labels", "normalize_log1p"]

TARGET_SUM = 1e4
CLIP = 10.0
KMEANS_N_INIT = 10
HVG_BINS = 20


def normalize_log1p(counts, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Library-size normalise each cell to ``target_sum`` and apply ``log1p`` (step 1).

    Returns a float64 CSR matrix. Raises ValueError on negative counts or an all-zero cell.
    """
    X = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    X.sum_duplicates()
    if X.nnz and X.data.min() < 0:
        raise ValueError("counts must be non-negative")
    totals = np.asarray(X.sum(axis=1)).ravel()
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} cell(s) have zero total count (first row index {int(empty[0])}); "
            "filter empty cells before labelling"
        )
    # Scale every stored value by its row's factor, then log1p in place (zeros stay zero).
    X.data *= np.repeat(target_sum / totals, np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X


def _column_variance(L: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population variance of a sparse matrix."""
    n = L.shape[0]
    mean = np.asarray(L.sum(axis=0)).ravel() / n
    sq = L.copy()
    sq.data **= 2
    mean_sq = np.asarray(sq.sum(axis=0)).ravel() / n
    var = np.maximum(mean_sq - mean**2, 0.0)
    return mean, var


def _select_hvg(L: sp.csr_matrix, n_hvg: int) -> np.ndarray:
    """Column indices of the top ``n_hvg`` genes by binned normalised dispersion (step 2)."""
    n = L.shape[0]
    E = L.copy()
    np.expm1(E.data, out=E.data)
    mean, var = _column_variance(E)
    var *= n / (n - 1) if n > 1 else 0.0
    ok = (mean > 0) & (var > 0)
    if not ok.any():
        raise ValueError("no gene varies across cells; cannot select variable genes")
    disp = np.log(var[ok] / mean[ok])
    x = np.log1p(mean[ok])
    edges = np.linspace(x.min(), x.max(), HVG_BINS + 1)
    bins = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, HVG_BINS - 1)
    norm = np.zeros_like(disp)
    for b in range(HVG_BINS):
        in_bin = bins == b
        if in_bin.sum() < 2:
            continue
        d = disp[in_bin]
        sd = d.std(ddof=1)
        if sd > 0:
            norm[in_bin] = (d - d.mean()) / sd
    candidates = np.flatnonzero(ok)
    # Stable sort on -score: equal scores keep ascending column order.
    order = candidates[np.argsort(-norm, kind="stable")]
    return np.sort(order[:n_hvg])


def _scale(L_hvg: sp.csr_matrix) -> np.ndarray:
    """Dense centred, unit-variance (ddof=1), clipped matrix (step 3)."""
    Z = L_hvg.toarray()
    Z -= Z.mean(axis=0)
    sd = Z.std(axis=0, ddof=1)
    sd[sd == 0] = 1.0
    Z /= sd
    np.clip(Z, -CLIP, CLIP, out=Z)
    return Z


def _pca(Z: np.ndarray, n_pcs: int) -> np.ndarray:
    """Exact PCA through the eigendecomposition of the covariance matrix (step 4)."""
    n, d = Z.shape
    Zc = Z - Z.mean(axis=0)  # re-centre: clipping can shift the mean slightly
    cov = (Zc.T @ Zc) / (n - 1)
    _, vecs = scipy.linalg.eigh(cov, subset_by_index=[d - n_pcs, d - 1])
    vecs = vecs[:, ::-1]  # eigh returns ascending eigenvalues
    # Deterministic sign: largest-magnitude loading of each component is positive.
    idx = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    vecs *= signs
    return Zc @ vecs


def _kmeans(emb: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """KMeans labels renumbered by decreasing cluster size (step 5)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=KMEANS_N_INIT, random_state=seed)
    raw = km.fit_predict(emb)
    ids, first, sizes = np.unique(raw, return_index=True, return_counts=True)
    # Sort by size descending, then by first appearance.
    order = np.lexsort((first, -sizes))
    remap = np.empty(ids.max() + 1, dtype=np.int64)
    remap[ids[order]] = np.arange(order.size)
    return remap[raw]


def _resolve_markers(
    markers: Mapping[str, Sequence[str]], genes: np.ndarray, unassigned: str
) -> tuple[list[str], list[np.ndarray], list[list[str]]]:
    """Map each type's marker symbols to column indices; validate the panel."""
    if not isinstance(markers, Mapping) or len(markers) < 2:
        raise ValueError("markers must be a mapping with at least two cell types")
    positions: dict[str, list[int]] = {}
    for j, g in enumerate(genes):
        positions.setdefault(g, []).append(j)

    types: list[str] = []
    cols: list[np.ndarray] = []
    used: list[list[str]] = []
    for cell_type, symbols in markers.items():
        if not isinstance(cell_type, str) or not cell_type:
            raise ValueError(f"cell type names must be non-empty strings, got {cell_type!r}")
        if cell_type == unassigned:
            raise ValueError(f"cell type {cell_type!r} clashes with the unassigned label")
        if isinstance(symbols, (str, bytes)) or not isinstance(symbols, Iterable):
            symbols = []
        symbols = list(symbols)
        if not symbols:
            raise ValueError(f"markers for {cell_type!r} must be a non-empty list of gene symbols")
        present: list[str] = []
        missing: list[str] = []
        for s in dict.fromkeys(symbols):  # de-duplicate, keep order
            if not isinstance(s, str):
                raise ValueError(f"marker {s!r} for {cell_type!r} is not a string")
            hits = positions.get(s)
            if hits is None:
                missing.append(s)
            elif len(hits) > 1:
                raise ValueError(f"marker {s!r} for {cell_type!r} matches {len(hits)} columns")
            else:
                present.append(s)
        if not present:
            raise ValueError(
                f"cell type {cell_type!r} has none of its markers in the data "
                f"(missing: {', '.join(missing)})"
            )
        types.append(cell_type)
        cols.append(np.array([positions[s][0] for s in present], dtype=np.int64))
        used.append(present)
    return types, cols, used


def marker_cluster_labels(
    counts,
    genes,
    markers: Mapping[str, Sequence[str]],
    *,
    n_clusters: int = 30,
    n_pcs: int = 30,
    n_hvg: int = 2000,
    seed: int = 0,
    min_margin: float = 0.0,
    unassigned: str = UNASSIGNED,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Label cells by clustering them and scoring each cluster with marker genes.

    See the module docstring for the exact procedure.

    Parameters
    ----------
    counts : cells x genes raw counts, scipy sparse or dense array.
    genes : gene symbols, one per column of ``counts``.
    markers : plain mapping ``{cell type: [marker symbol, ...]}``; order decides score ties.
    n_clusters, n_pcs, n_hvg : KMeans clusters, principal components, variable genes.
    seed : KMeans random_state (the only random step).
    min_margin : clusters whose best-minus-second score is below this become ``unassigned``.
    unassigned : label used for such clusters.

    Returns
    -------
    labels : ``np.ndarray`` of str, one per cell.
    report : DataFrame, one row per cluster: ``cluster, n_cells, label, score_best, score_second,
        margin, best_type, second_type``; ``report.attrs`` holds the effective parameters and the
        markers actually used per type.
    """
    genes = np.asarray([str(g) for g in genes], dtype=object)
    n_cells, n_genes = counts.shape
    if genes.shape[0] != n_genes:
        raise ValueError(f"genes has {genes.shape[0]} entries but counts has {n_genes} columns")
    if not (isinstance(n_clusters, (int, np.integer)) and 2 <= n_clusters <= n_cells):
        raise ValueError(
            f"n_clusters must be an integer in [2, n_cells={n_cells}], got {n_clusters!r}"
        )
    if n_pcs < 1 or n_hvg < 1:
        raise ValueError("n_pcs and n_hvg must be positive")
    if not np.isfinite(min_margin) or min_margin < 0:
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin}")
    types, marker_cols, used = _resolve_markers(markers, genes, unassigned)

    L = normalize_log1p(counts)
    hvg = _select_hvg(L, n_hvg)
    Z = _scale(L[:, hvg])
    n_pcs_eff = int(min(n_pcs, Z.shape[1], n_cells - 1))
    # One BLAS/OpenMP thread: the floating-point reduction order (and so the embedding and the
    # clustering) then does not depend on how many cores the machine has. It is also faster here:
    # multi-threaded KMeans on this small embedding mostly waits on thread barriers.
    with threadpool_limits(limits=1):
        emb = _pca(Z, n_pcs_eff)
        del Z
        cluster = _kmeans(emb, n_clusters, seed)
    k = int(cluster.max()) + 1

    # Cluster means of the marker columns of L via a sparse cluster-indicator product.
    all_cols = np.unique(np.concatenate(marker_cols))
    sizes = np.bincount(cluster, minlength=k).astype(np.float64)
    indicator = sp.csr_matrix(
        (np.ones(n_cells), (cluster, np.arange(n_cells))), shape=(k, n_cells)
    )
    means = np.asarray((indicator @ L[:, all_cols]).todense()) / sizes[:, None]
    sd = means.std(axis=0)
    z = np.where(sd > 0, (means - means.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    where = {c: i for i, c in enumerate(all_cols)}
    scores = np.column_stack([z[:, [where[c] for c in cols]].mean(axis=1) for cols in marker_cols])

    order = np.argsort(-scores, axis=1, kind="stable")  # ties: earlier type first
    rows = np.arange(k)
    best, second = order[:, 0], order[:, 1]
    score_best = scores[rows, best]
    score_second = scores[rows, second]
    margin = score_best - score_second
    type_arr = np.asarray(types, dtype=object)
    cluster_label = np.where(margin < min_margin, unassigned, type_arr[best]).astype(object)

    labels = np.asarray(cluster_label[cluster], dtype=str)
    report = pd.DataFrame(
        {
            "cluster": rows,
            "n_cells": sizes.astype(np.int64),
            "label": cluster_label.astype(str),
            "score_best": score_best,
            "score_second": score_second,
            "margin": margin,
            "best_type": type_arr[best].astype(str),
            "second_type": type_arr[second].astype(str),
        }
    )
    report.attrs["params"] = {
        "n_clusters": int(n_clusters),
        "n_pcs": n_pcs_eff,
        "n_hvg": int(hvg.size),
        "seed": int(seed),
        "min_margin": float(min_margin),
        "target_sum": TARGET_SUM,
        "kmeans_n_init": KMEANS_N_INIT,
        "hvg_bins": HVG_BINS,
    }
    report.attrs["markers_used"] = {t: list(u) for t, u in zip(types, used)}
    return labels, report
