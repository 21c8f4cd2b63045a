"""LogPCA (cellarena/data/features.py) on atlas-sized input: the blocked path gives the exact PCA."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
from sklearn.decomposition import PCA

from cellarena.data import features
from cellarena.data.features import LogPCA, log_normalize, top_variable_genes


@pytest.fixture
def small_limits(monkeypatch):
    """Blocks of a few hundred cells, and every input 'atlas-sized'."""
    monkeypatch.setattr(features, "DENSE_LIMIT_BYTES", 1)
    monkeypatch.setattr(features, "BLOCK_BYTES", 4 * 500 * 300)


def _exact(counts, n_comps, n_hvg):
    x = log_normalize(counts)
    genes = top_variable_genes(x, n_hvg)
    a = x[:, genes].toarray().astype(np.float64)
    return genes, PCA(n_components=n_comps, svd_solver="covariance_eigh").fit(a), a


def test_blocked_logpca_is_the_exact_pca(kang_prepared, small_limits):
    cells = ad.read_h5ad(kang_prepared)[:3000].copy()
    genes, pca, a = _exact(cells.layers["counts"], 20, 500)
    model = LogPCA(20, 500, seed=0).fit(cells)
    assert len(features.row_blocks(cells.layers["counts"], 500)) > 5  # it did go block by block
    np.testing.assert_array_equal(model.genes_, genes)
    np.testing.assert_allclose(model.pca_.explained_variance_, pca.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(model.pca_.components_), np.abs(pca.components_), atol=1e-6)
    z = model.transform(cells)
    assert z.shape == (3000, 20) and z.dtype == np.float32
    np.testing.assert_allclose(np.abs(z), np.abs(pca.transform(a)), atol=1e-3)


def test_blocked_logpca_reads_a_backed_matrix_like_an_in_memory_one(kang_prepared, small_limits, tmp_path):
    cells = ad.read_h5ad(kang_prepared)[:2000].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    with h5py.File(tmp_path / "cells.h5ad", "r") as f:
        backed = ad.AnnData(obs=cells.obs, var=cells.var,
                            layers={"counts": ad.io.sparse_dataset(f["layers"]["counts"])})
        on_disk = LogPCA(10, 300).fit_transform(backed)
    np.testing.assert_array_equal(on_disk, LogPCA(10, 300).fit_transform(cells))


def test_small_input_keeps_the_randomized_solver(kang_prepared):
    cells = ad.read_h5ad(kang_prepared)[:500].copy()
    model = LogPCA(10, 300, seed=0).fit(cells)
    assert isinstance(model.pca_, PCA) and model.pca_.svd_solver == "randomized"
