"""prepare: the canonical AnnData contract, on real data and on broken inputs."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellarena.cards.dataset import parse_card
from cellarena.errors import DataError
from cellarena.data.fetch import sha256_file
from cellarena.data.prepare import prepare, provenance


def test_pbmc68k_canonical(pbmc68k_prepared, data_cache):
    adata = ad.read_h5ad(pbmc68k_prepared)
    assert adata.shape == (700, 765)
    counts = adata.layers["counts"]
    assert sp.issparse(counts)
    assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() >= 1
    assert list(adata.obs.columns) == ["cell_type"]
    assert adata.obs["cell_type"].nunique() == 10
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert "HES4" in adata.var_names and "original_id" in adata.var
    info = provenance(adata)
    assert info["dataset_id"] == "pbmc68k_reduced" and info["dataset_version"] == 1
    assert info["label_quality"] == "expert" and info["status"] == "ok"
    assert json.loads(info["sources"])[0]["sha256"].startswith("e71d41e7")


def test_pbmc68k_counts_reproduce_the_stored_normalization(pbmc68k_prepared, data_cache):
    """Re-normalizing the recovered counts gives back the file's log-normalized values."""
    raw = ad.read_h5ad(next(data_cache.glob("e71d41e7*/10x_pbmc68k_reduced.h5ad")))
    ours = ad.read_h5ad(pbmc68k_prepared)
    size = raw.obs["n_counts"].to_numpy()[:, None]
    again = np.log1p(ours.layers["counts"].toarray() / size * 1e4)
    assert np.abs(again - raw.raw.X.toarray()).max() < 0.05


def _local_card(path, **over):
    data = {
        "id": "toy_set", "version": 1, "title": "toy", "organism": "homo_sapiens",
        "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody",
        "sources": [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path)}],
        "roles": {"cell_type": "label", "batch": "lane"}, "labels": {"quality": "expert"},
    }
    data.update(over)
    return parse_card(data, where="toy_set.yaml")


def test_small_local_canonical(tmp_path, small_adata):
    path = tmp_path / "toy.h5ad"
    small_adata().write_h5ad(path)
    adata = prepare(_local_card(path), {"main": path})
    assert list(adata.obs.columns) == ["cell_type", "batch"]
    assert adata.obs["batch"].dtype.name == "category"
    assert adata.X is None and adata.layers["counts"].dtype == np.float32


def test_non_integer_counts_are_an_error(tmp_path, small_adata):
    a = small_adata()
    a.X = a.X * 0.37
    path = tmp_path / "toy.h5ad"
    a.write_h5ad(path)
    with pytest.raises(DataError, match="non-integer counts") as err:
        prepare(_local_card(path), {"main": path})
    assert "toy_set.yaml" in str(err.value) and "fix:" in str(err.value)


def test_missing_mapped_column_is_an_error(tmp_path, small_adata):
    path = tmp_path / "toy.h5ad"
    small_adata().write_h5ad(path)
    card = _local_card(path, roles={"cell_type": "label", "donor": "patient"})
    with pytest.raises(DataError, match="roles.donor names column 'patient'"):
        prepare(card, {"main": path})


def test_duplicate_cell_ids_are_an_error(tmp_path, small_adata):
    a = small_adata()
    a.obs_names = ["same"] * 2 + list(a.obs_names[2:])
    path = tmp_path / "toy.h5ad"
    a.write_h5ad(path)
    with pytest.raises(DataError, match="duplicate cell IDs"):
        prepare(_local_card(path), {"main": path})


def test_two_sources_get_prefixed_ids_and_constant_roles(tmp_path, small_adata):
    a = small_adata()
    p1, p2 = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    a.write_h5ad(p1)
    a.write_h5ad(p2)  # the same barcodes in both parts, as in Kang ctrl/stim
    sources = [{"id": "ctrl", "kind": "local", "path": str(p1), "sha256": sha256_file(p1),
                "obs": {"condition": "ctrl"}},
               {"id": "stim", "kind": "local", "path": str(p2), "sha256": sha256_file(p2),
                "obs": {"condition": "stim"}}]
    card = _local_card(p1, sources=sources, roles={"cell_type": "label", "condition": "condition"})
    adata = prepare(card, {"ctrl": p1, "stim": p2})
    assert adata.n_obs == 120 and adata.obs_names.is_unique
    assert adata.obs_names[0] == "ctrl:cell0"
    assert adata.obs["condition"].value_counts().to_dict() == {"ctrl": 60, "stim": 60}


def test_inner_gene_join_keeps_shared_genes(tmp_path, small_adata):
    a, b = small_adata(), small_adata(seed=1)
    b = b[:, 5:].copy()  # the second study lacks the first five genes
    p1, p2 = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    a.write_h5ad(p1)
    b.write_h5ad(p2)
    sources = [{"id": "one", "kind": "local", "path": str(p1), "sha256": sha256_file(p1), "obs": {"study": "one"}},
               {"id": "two", "kind": "local", "path": str(p2), "sha256": sha256_file(p2), "obs": {"study": "two"}}]
    roles = {"cell_type": "label", "batch": "study"}
    with pytest.raises(DataError, match="different genes"):
        prepare(_local_card(p1, sources=sources, roles=roles), {"one": p1, "two": p2})
    adata = prepare(_local_card(p1, sources=sources, roles=roles, gene_join="inner"), {"one": p1, "two": p2})
    assert adata.n_vars == 35 and adata.var_names[0] == "GENE5"
    assert adata.obs["batch"].value_counts().to_dict() == {"one": 60, "two": 60}


def test_counts_layer_and_excluded_batches(tmp_path, small_adata):
    a = small_adata()
    a.layers["counts"] = a.X.copy()
    a.X = a.X * 0.5  # X holds something else, as in the scIB files
    a.layers["counts"][a.obs["lane"].to_numpy() == "b2"] *= 0.37  # one batch stores no counts
    path = tmp_path / "toy.h5ad"
    a.write_h5ad(path)
    with pytest.raises(DataError, match="non-integer"):
        prepare(_local_card(path, counts={"layer": "counts"}), {"main": path})
    sources = [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path),
                "exclude": {"lane": ["b2"]}}]
    adata = prepare(_local_card(path, sources=sources, counts={"layer": "counts"}), {"main": path})
    assert adata.n_obs == 30 and set(adata.obs["batch"]) == {"b1"}
    assert json.loads(adata.uns["cellarena"]["excluded_cells"]) == {"main": 30}
    with pytest.raises(DataError, match="not a layer"):
        prepare(_local_card(path, counts={"layer": "spliced"}), {"main": path})
