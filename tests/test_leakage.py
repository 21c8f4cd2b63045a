"""Cell-level leakage checks: exact fingerprints and MinHash sketches for near-duplicates."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.features import log_normalize
from cellarena.leakage import (EMPTY, fingerprint_matrix, fingerprints, gene_keys, near_duplicates, overlap,
                               sketches)


def _cells(n, n_genes=300, seed=0, prefix="c"):
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.3, 2.0, size=(n, n_genes))
    counts = rng.poisson(rates).astype(np.float32)
    return ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))


def test_fingerprint_ignores_gene_order_and_other_genes():
    a = _cells(20)
    shuffled = a[:, np.random.default_rng(1).permutation(a.n_vars)].copy()
    extra = ad.concat([a, ad.AnnData(X=sp.csr_matrix(np.ones((20, 3), dtype=np.float32)), obs=a.obs[[]],
                                     var=pd.DataFrame(index=["X1", "X2", "X3"]))], axis=1, merge="first")
    genes = list(a.var_names)
    np.testing.assert_array_equal(fingerprints(a, genes), fingerprints(shuffled, genes[::-1]))
    np.testing.assert_array_equal(fingerprints(a, genes), fingerprints(extra, genes))
    assert np.unique(fingerprints(a, genes)).size == 20


def test_one_count_changes_the_fingerprint_and_sparse_cells_are_undetermined():
    m = sp.csr_matrix(np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [0, 0, 0, 1, 1, 0]], dtype=np.float32))
    fp = fingerprint_matrix(m, gene_keys(list("abcdef")), min_genes=5)
    assert fp[0] != fp[1] and fp[0] != 0 and fp[2] == 0


def test_renormalized_copies_are_caught_by_the_sketch_only():
    evaluation = _cells(100, seed=2, prefix="e")
    unrelated = _cells(400, seed=3, prefix="u")
    copies = evaluation[:30].copy()
    copies.X = log_normalize(copies.X)  # renormalized: same genes non-zero, other values
    copies.obs_names = [f"copy{i}" for i in range(30)]
    exact = evaluation[30:40].copy()
    exact.obs_names = [f"exact{i}" for i in range(10)]
    corpus = ad.concat([unrelated, copies, exact])
    ov = overlap(corpus, evaluation, near=True)
    assert ov.n_found == 10  # raw-count copies: exact fingerprints
    assert ov.n_near == 30  # renormalized copies: exact fingerprints differ, the sketch catches them
    assert ov.near_fraction == pytest.approx(0.3) and ov.fraction == pytest.approx(0.1)
    assert overlap(unrelated, evaluation, near=True).n_near == 0  # no false positives


def test_sketch_estimates_jaccard():
    rng = np.random.default_rng(4)
    genes = [f"G{j}" for j in range(2000)]
    base = rng.choice(2000, 400, replace=False)
    other = np.concatenate([base[:300], rng.choice(np.setdiff1d(np.arange(2000), base), 100, replace=False)])
    rows = np.zeros((2, 2000), dtype=np.float32)
    rows[0, base] = 1
    rows[1, other] = 1
    adata = ad.AnnData(X=sp.csr_matrix(rows), var=pd.DataFrame(index=genes))
    sk = sketches(adata, genes, k=256)
    true_jaccard = 300 / 500
    assert (sk[0] == sk[1]).mean() == pytest.approx(true_jaccard, abs=0.1)
    sparse = sketches(adata[:, :3].copy(), genes[:3])
    assert (sparse == EMPTY).all()
    assert near_duplicates(sk[:1], sk[1:], threshold=0.9)[0] == 0.0
