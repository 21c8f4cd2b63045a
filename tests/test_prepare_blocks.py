"""Preparing block by block (cellarena/data/prepare.py: prepare_to_file), the path `cellarena prepare`
takes for h5ad sources of any size: the same file and the same refusals as preparing in memory."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.cards.dataset import load_card, parse_card
from cellarena.data.fetch import fetch_card, sha256_file
from cellarena.data.prepare import prepare, prepare_to_file, streamable, write_h5ad
from cellarena.errors import DataError


def _same_file(a, b) -> None:
    A, B = ad.read_h5ad(a), ad.read_h5ad(b)
    assert A.X is None and B.X is None
    pd.testing.assert_frame_equal(A.obs, B.obs)
    pd.testing.assert_frame_equal(A.var, B.var)
    assert A.uns["cellarena"] == B.uns["cellarena"]
    x, y = A.layers["counts"], B.layers["counts"]
    assert sp.issparse(y) and y.format == "csr" and x.dtype == y.dtype == np.float32
    assert x.shape == y.shape and (x != y).nnz == 0


@pytest.mark.parametrize("card_id", ["pbmc68k_reduced", "pbmc3k", "wu2020_tumour_t_cells"])
def test_shipped_datasets_prepare_in_blocks_to_the_same_file(repo, data_cache, tmp_path, card_id):
    """pbmc68k_reduced: raw.X with log1p_normalized undone per cell; pbmc3k: 32,738 genes; Wu 2020:
    Ensembl IDs with a symbol column. Blocks of 97 cells: many blocks, the last one short."""
    card = load_card(repo / "datasets" / f"{card_id}.yaml")
    assert streamable(card)
    paths = fetch_card(card, data_cache)
    in_memory = write_h5ad(prepare(card, paths), tmp_path / "memory.h5ad")
    meta = prepare_to_file(card, paths, tmp_path / "blocks.h5ad", block_cells=97)
    _same_file(in_memory, tmp_path / "blocks.h5ad")
    assert meta.n_obs == ad.read_h5ad(in_memory).n_obs and meta.uns["cellarena"]["status"] == "ok"


def _source(path, counts, obs, genes):
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return {"kind": "local", "path": str(path), "sha256": sha256_file(path)}


@pytest.fixture
def two_sources(tmp_path, pbmc68k_prepared):
    """Two files of real pbmc68k counts whose genes overlap in part, one with cells to exclude."""
    real = ad.read_h5ad(pbmc68k_prepared)
    counts, genes = real.layers["counts"].tocsr(), real.var_names
    obs = pd.DataFrame({"kind": np.where(np.arange(real.n_obs) % 7 == 0, "doublet", "cell"),
                        "cell_type": real.obs["cell_type"].astype(str).to_numpy()},
                       index=[f"c{i}" for i in range(real.n_obs)])
    a = _source(tmp_path / "a.h5ad", counts[:400, :600], obs.iloc[:400], genes[:600])
    b = _source(tmp_path / "b.h5ad", counts[400:, 100:], obs.iloc[400:], genes[100:])
    return {"a": a, "b": b}


def _card(sources: dict, **extra):
    data = {"id": "two_files", "version": 1, "title": "t", "organism": "homo_sapiens", "gene_id_type": "symbol",
            "licence": "CC0", "citation": "test", "gene_join": "inner",
            "sources": [{"id": k, **v, "obs": {"batch": k}} for k, v in sources.items()],
            "roles": {"cell_type": "cell_type", "batch": "batch"}, "labels": {"quality": "expert"}, **extra}
    return parse_card(data, where="two_files.yaml")


def test_two_sources_with_shared_genes_and_exclusions_prepare_in_blocks_alike(two_sources, tmp_path):
    sources = {k: dict(v) for k, v in two_sources.items()}
    sources["a"]["exclude"] = {"kind": ["doublet"]}
    card = _card(sources)
    paths = {k: v["path"] for k, v in sources.items()}
    in_memory = write_h5ad(prepare(card, paths), tmp_path / "memory.h5ad")
    prepare_to_file(card, paths, tmp_path / "blocks.h5ad", block_cells=50)
    _same_file(in_memory, tmp_path / "blocks.h5ad")
    prepared = ad.read_h5ad(tmp_path / "blocks.h5ad")
    assert prepared.n_vars == 500 and prepared.obs_names[0] == "a:c1"  # c0 was a doublet
    assert '"a": 58' in prepared.uns["cellarena"]["excluded_cells"]


def test_non_finite_counts_in_several_blocks_are_refused_once_with_every_cell(two_sources, tmp_path):
    """The in-memory message, with the totals over all blocks; no prepared file is left behind."""
    bad = ad.read_h5ad(two_sources["a"]["path"])
    x = bad.X.tocsr().astype(np.float32)
    for row in (3, 120, 390):  # three different blocks of 50 cells
        x.data[x.indptr[row]] = np.nan
    x.data[x.indptr[121]] = np.inf
    bad.X = x
    source = _source(tmp_path / "nan.h5ad", bad.X, bad.obs, bad.var_names)
    card = _card({"a": source})
    paths = {"a": source["path"]}
    with pytest.raises(DataError) as memory:
        prepare(card, paths)
    with pytest.raises(DataError) as blocks:
        prepare_to_file(card, paths, tmp_path / "out.h5ad", block_cells=50)
    assert str(blocks.value) == str(memory.value)
    assert "3 NaN and 1 infinite entries in 4 of 400 cells" in str(blocks.value)
    assert not (tmp_path / "out.h5ad").exists() and not list(tmp_path.glob(".out.h5ad*"))


def test_cards_that_need_every_cell_at_once_are_prepared_in_memory(repo):
    assert not streamable(load_card(repo / "datasets" / "kang2018_ifnb.yaml"))  # derived labels
    assert not streamable(load_card(repo / "datasets" / "perturbseq_proxy.yaml"))  # a simulated screen
    assert streamable(load_card(repo / "datasets" / "replogle2022_k562_essential.yaml"))  # the full plan's largest


def test_read_meta_gives_obs_var_and_provenance_without_the_counts(pbmc68k_prepared):
    """What a split and every provenance check read: never the counts (anndata's backed mode would
    load every layer)."""
    from cellarena.data.prepare import provenance, read_meta

    meta, full = read_meta(pbmc68k_prepared), ad.read_h5ad(pbmc68k_prepared)
    pd.testing.assert_frame_equal(meta.obs, full.obs)
    pd.testing.assert_frame_equal(meta.var, full.var)
    assert provenance(meta) == provenance(full)
    assert meta.X is None and not meta.layers
