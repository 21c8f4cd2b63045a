"""Shared preprocessing for baselines: PCA of log-normalized counts, fit on the training cells only.

Nothing about the test cells (not even their gene variances) influences the transform, so a
baseline cannot learn from the test set through its features.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA


def log_normalize(counts, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p(counts / total * target_sum) per cell; cells with zero counts stay zero."""
    m = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    m = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ m)
    np.log1p(m.data, out=m.data)
    return m


def group_means(x, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels of ``groups`` (sorted), each row's level index, and the mean row of the sparse ``x``
    per level (dense, levels x columns), through one sparse indicator product."""
    levels, codes = np.unique(np.asarray(groups), return_inverse=True)
    indicator = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))),
                              shape=(levels.size, codes.size))
    sizes = np.asarray(indicator.sum(axis=1)).ravel()
    return levels, codes, np.asarray((sp.diags(1.0 / sizes) @ indicator @ sp.csr_matrix(x)).todense())


def top_variable_genes(lognorm: sp.csr_matrix, n: int) -> np.ndarray:
    """Indices of the ``n`` genes with the largest variance of log-normalized values (ties by index)."""
    mean = np.asarray(lognorm.mean(axis=0)).ravel()
    sq = np.asarray(lognorm.multiply(lognorm).mean(axis=0)).ravel()
    return most_variable(sq - mean**2, n)


def most_variable(var: np.ndarray, n: int) -> np.ndarray:
    """Indices (sorted) of the ``n`` largest of ``var``, ties broken by index."""
    order = np.lexsort((np.arange(var.size), -var))
    return np.sort(order[: min(n, var.size)])


DENSE_LIMIT_BYTES = 1 << 30  # above this, LogPCA works through blocks of cells (see LogPCA)
BLOCK_BYTES = 1 << 28  # the dense block of cells x selected genes a blocked pass holds at a time


def row_blocks(counts, n_columns: int):
    """Row ranges of ``counts`` whose dense float32 copy of ``n_columns`` columns is ~BLOCK_BYTES."""
    n = counts.shape[0]
    step = max(1, BLOCK_BYTES // (4 * max(n_columns, 1)))
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


class _CovariancePCA:
    """PCA from the genes' covariance, accumulated over blocks of cells (float64): the exact solution
    (sklearn's ``covariance_eigh``) without holding every cell at once. Signs as sklearn's: each
    component's largest-magnitude loading is positive."""

    def __init__(self, n_components: int):
        self.n_components = n_components

    def fit_blocks(self, blocks, n_columns: int) -> "_CovariancePCA":
        total, gram, n = np.zeros(n_columns), np.zeros((n_columns, n_columns)), 0
        for a in blocks:
            a = np.asarray(a, dtype=np.float64)
            total += a.sum(axis=0)
            gram += a.T @ a
            n += a.shape[0]
        self.mean_ = total / n
        cov = (gram - n * np.outer(self.mean_, self.mean_)) / max(n - 1, 1)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1][: self.n_components]
        comps = vectors[:, order].T
        signs = np.sign(comps[np.arange(comps.shape[0]), np.argmax(np.abs(comps), axis=1)])
        self.components_ = comps * signs[:, None]
        self.explained_variance_ = np.clip(values[order], 0, None)
        return self

    def transform(self, a) -> np.ndarray:
        return (np.asarray(a, dtype=np.float64) - self.mean_) @ self.components_.T


class LogPCA:
    """PCA of log-normalized counts on the most variable genes, learned from the cells given to fit.

    By default a randomized, seeded solver in float32 (what the models that use it were tuned
    with). ``exact``: the eigendecomposition of the genes' covariance in float64, which depends on
    the data alone; the unintegrated embedding that ``pcr_comparison`` compares with is computed so,
    since the randomized solver moved that metric by up to 4.3e-3 (an independent audit).

    Atlas-sized input (the dense cells x selected genes matrix above ``DENSE_LIMIT_BYTES``, 1 GiB:
    about 134,000 cells at 2,000 genes) is never densified or log-normalized whole: the gene
    variances, then the covariance of the selected genes, are accumulated over blocks of cells, and
    the PCA is the exact one of that covariance (whatever ``exact`` says); ``transform`` goes block
    by block too. The counts may be in memory or a backed sparse dataset (anything sliced by rows).
    """

    def __init__(self, n_comps: int = 50, n_hvg: int = 2000, seed: int = 0, exact: bool = False):
        self.n_comps, self.n_hvg, self.seed, self.exact = n_comps, n_hvg, seed, exact

    def _blocked(self, counts) -> bool:
        return counts.shape[0] * min(self.n_hvg, counts.shape[1]) * 4 > DENSE_LIMIT_BYTES

    def fit(self, adata: ad.AnnData) -> "LogPCA":
        counts = adata.layers["counts"]
        if self._blocked(counts):
            return self._fit_blocked(counts)
        x = log_normalize(counts)
        self.genes_ = top_variable_genes(x, self.n_hvg)
        a = x[:, self.genes_].toarray()
        k = max(1, min(self.n_comps, a.shape[0] - 1, a.shape[1] - 1))
        if self.exact:
            self.pca_ = PCA(n_components=k, svd_solver="covariance_eigh").fit(a.astype(np.float64))
        else:
            self.pca_ = PCA(n_components=k, svd_solver="randomized", random_state=self.seed).fit(a)
        return self

    def _fit_blocked(self, counts) -> "LogPCA":
        n, n_genes = counts.shape
        total, squares = np.zeros(n_genes), np.zeros(n_genes)
        for lo, hi in row_blocks(counts, n_genes // 8):  # sparse blocks: a fraction of the dense size
            x = log_normalize(counts[lo:hi])
            total += np.asarray(x.sum(axis=0)).ravel()
            squares += np.asarray(x.multiply(x).sum(axis=0)).ravel()
        mean = total / n
        self.genes_ = most_variable(squares / n - mean**2, self.n_hvg)
        k = max(1, min(self.n_comps, n - 1, len(self.genes_) - 1))
        self.pca_ = _CovariancePCA(k).fit_blocks(
            (self._selected(counts[lo:hi]) for lo, hi in row_blocks(counts, len(self.genes_))), len(self.genes_))
        return self

    def _selected(self, counts) -> np.ndarray:
        return log_normalize(counts)[:, self.genes_].toarray()

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        counts = adata.layers["counts"]
        if not self._blocked(counts) and not isinstance(self.pca_, _CovariancePCA):
            return self.pca_.transform(self._selected(counts))
        out = [self.pca_.transform(self._selected(counts[lo:hi])) for lo, hi in row_blocks(counts, len(self.genes_))]
        return np.vstack(out).astype(np.float32)

    def fit_transform(self, adata: ad.AnnData) -> np.ndarray:
        return self.fit(adata).transform(adata)
