"""Cell-level leakage checks: exact fingerprints and MinHash sketches for near-duplicates."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.data.features import log_normalize
from cellarena.data.leakage import (EMPTY, fingerprint_matrix, fingerprints, gene_keys, near_duplicates, overlap,
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


# --- corpus manifests and the dataset-level check ---------------------------------------------------

def test_published_corpus_manifests(repo):
    from cellarena.cards.corpus import list_corpora

    corpora = list_corpora(repo / "datasets")
    published = {k: c for k, c in corpora.items() if c.kind == "published"}
    assert {"scgpt_whole_human", "geneformer_genecorpus_30m", "geneformer_genecorpus_104m", "uce_36m",
            "scfoundation_50m", "cellplm_11m"} <= set(published)
    for card in published.values():
        assert card.references and all(len(r) > 20 for r in card.references)
        assert all(c.source for c in card.contains), f"{card.id}: every contained study names its source"
    assert published["scgpt_whole_human"].census.release == "2023-05-08"
    assert published["uce_36m"].census.organisms == ["homo_sapiens", "mus_musculus"]


def test_census_release_needs_its_census_block():
    from cellarena.cards.corpus import CorpusCard

    base = {"id": "x", "version": 1, "title": "x", "kind": "published", "references": ["a paper"]}
    with pytest.raises(ValueError, match="census"):
        CorpusCard.model_validate({**base, "confidence": "census_release"})
    with pytest.raises(ValueError, match="census"):
        CorpusCard.model_validate({**base, "confidence": "stated_in_paper",
                                   "census": {"release": "2023-05-15", "organisms": ["homo_sapiens"],
                                              "filter": "all"}})


@pytest.mark.parametrize("confidence, contains, expected", [
    ("exact", [{"type": "geo", "value": "gse96583"}], "leaked"),  # case-insensitive accession match
    ("stated_in_paper", [{"type": "doi", "value": "10.1038/nbt.4042"}], "leaked"),
    ("exact", [{"type": "geo", "value": "GSE1"}], "clean"),
    ("stated_in_paper", [{"type": "geo", "value": "GSE1"}], "unknown"),
    ("stated_in_paper", [], "unknown"),
])
def test_dataset_level_leakage(repo, confidence, contains, expected):
    from cellarena.cards.dataset import load_card
    from cellarena.cards.corpus import CorpusCard
    from cellarena.data.leakage import dataset_leakage

    kang = load_card(repo / "datasets" / "kang2018_ifnb.yaml")
    corpus = CorpusCard.model_validate({
        "id": "c", "version": 1, "title": "c", "kind": "published", "confidence": confidence,
        "references": ["somewhere"], "contains": [dict(c, source="a table") for c in contains]})
    status, hits = dataset_leakage(kang, corpus)
    assert status == expected
    assert bool(hits) == (expected == "leaked")


def test_in_suite_corpus_is_exact(repo):
    from cellarena.cards.dataset import load_card
    from cellarena.cards.corpus import load_corpus
    from cellarena.data.leakage import dataset_leakage

    corpus = load_corpus(repo / "datasets" / "corpora" / "cellarena_pbmc3k.yaml")
    assert dataset_leakage(load_card(repo / "datasets" / "pbmc68k_reduced.yaml"), corpus) == ("clean", [])
    status, hits = dataset_leakage(load_card(repo / "datasets" / "pbmc3k.yaml"), corpus)
    assert status == "leaked" and "dataset:pbmc3k" in hits


def test_leakage_command_reports_exact_and_near_copies(tmp_path):
    import json
    import subprocess
    import sys

    evaluation = _cells(50, seed=5, prefix="e")
    copies = evaluation[:10].copy()
    copies.X = log_normalize(copies.X)
    copies.obs_names = [f"n{i}" for i in range(10)]
    corpus = ad.concat([_cells(100, seed=6, prefix="u"), evaluation[10:15], copies])
    corpus.write_h5ad(tmp_path / "corpus.h5ad")
    evaluation.write_h5ad(tmp_path / "eval.h5ad")
    proc = subprocess.run([sys.executable, "-m", "cellarena", "leakage", "--corpus", str(tmp_path / "corpus.h5ad"),
                           "--evaluation", str(tmp_path / "eval.h5ad"), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, check=True)
    assert "5 of 50 evaluation cells found exactly (10.00%), 10 more as near-duplicates" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())[str(tmp_path / "corpus.h5ad")]
    assert report["n_found"] == 5 and report["n_near"] == 10
