"""CELLxGENE Census as a source, offline: the test writes a SOMA collection laid out as a Census
release (census_data/<organism> experiments, raw counts in ms['RNA'].X['raw']) with tiledbsoma, from
the real PBMC counts that scanpy ships, and the card reads it through cellxgene-census by its uri."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.cards.corpus import CorpusCard
from cellarena.cards.dataset import parse_card
from cellarena.cli import main as cli
from cellarena.data.census import corpus_dataset_ids, read_slice, slice_sha256
from cellarena.data.fetch import fetch_card
from cellarena.data.leakage import dataset_leakage
from cellarena.data.prepare import prepare, read_provenance, write_h5ad
from cellarena.errors import CardError, ChecksumError, DataError

DS_A, DS_B = "0b4a15a7-4e9e-4555-9733-2423e5c66469", "9f222629-9e39-47d0-b83f-e08d610c7479"


@pytest.fixture(scope="module")
def source_cells(pbmc68k_prepared) -> ad.AnnData:
    """The cells the local Census holds: pbmc68k_reduced's counts and labels, split into two
    'datasets' and two donors."""
    prepared = ad.read_h5ad(pbmc68k_prepared)
    n = prepared.n_obs
    obs = pd.DataFrame({
        "dataset_id": np.where(np.arange(n) < 400, DS_A, DS_B),
        "cell_type": prepared.obs["cell_type"].astype(str).to_numpy(),
        "tissue_general": "blood",
        "donor_id": np.where(np.arange(n) % 2 == 0, "donor-1", "donor-2"),
        "assay": "10x 3' v1",
        "is_primary_data": np.arange(n) % 7 != 0,
    }, index=prepared.obs_names.astype(str))
    var = pd.DataFrame({"feature_id": [f"ENSG{j:011d}" for j in range(prepared.n_vars)],
                        "feature_name": prepared.var_names.astype(str)}, index=prepared.var_names.astype(str))
    return ad.AnnData(X=sp.csr_matrix(prepared.layers["counts"], dtype=np.float32), obs=obs, var=var)


@pytest.fixture(scope="module")
def census_uri(source_cells, tmp_path_factory) -> str:
    import tiledbsoma
    import tiledbsoma.io

    uri = str(tmp_path_factory.mktemp("census") / "2025-01-30")
    with tiledbsoma.Collection.create(uri) as root:
        root.add_new_collection("census_data")
        root.add_new_collection("census_info")
    tiledbsoma.io.from_anndata(f"{uri}/census_data/homo_sapiens", source_cells, measurement_name="RNA",
                               X_layer_name="raw")
    with tiledbsoma.Collection.open(f"{uri}/census_data", "w") as data:
        data.set("homo_sapiens", tiledbsoma.Experiment.open(f"{uri}/census_data/homo_sapiens"), use_relative_uri=True)
    return uri


def _card(census_uri, sha="0" * 64, **source):
    return parse_card({
        "id": "census_pbmc", "version": 1, "title": "t", "organism": "homo_sapiens", "gene_id_type": "ensembl",
        "gene_symbol_column": "feature_name", "licence": "CC-BY-4.0", "citation": "x",
        "sources": [{"id": "main", "kind": "census", "census_version": "2025-01-30", "uri": census_uri,
                     "sha256": sha, **source}],
        "roles": {"cell_type": "cell_type", "batch": "donor_id"}, "labels": {"quality": "expert"},
    }, "datasets/census_pbmc.yaml")


def test_a_slice_is_fetched_verified_cached_and_prepared(census_uri, source_cells, tmp_path):
    first = _card(census_uri, dataset_ids=[DS_A], value_filter="is_primary_data == True")
    # the content hash a new card needs is in the error of a card that pins another
    with pytest.raises(ChecksumError, match=r"has content hash [0-9a-f]{64}; the card pins 0{64}") as err:
        fetch_card(first, tmp_path / "cache")
    sha = str(err.value).split("has content hash ")[1][:64]
    assert f"set sources[main].sha256 to {sha}" in str(err.value)
    card = _card(census_uri, sha, dataset_ids=[DS_A], value_filter="is_primary_data == True")
    path = fetch_card(card, tmp_path / "cache")["main"]
    cached = ad.read_h5ad(path)
    assert slice_sha256(cached) == sha  # the hash survives the h5ad round trip
    # the slice is exactly the source's cells of that dataset and filter, in their order, with their counts
    keep = (source_cells.obs["dataset_id"] == DS_A) & source_cells.obs["is_primary_data"]
    want = source_cells[keep.to_numpy()]
    assert cached.n_obs == int(keep.sum()) and cached.n_vars == source_cells.n_vars
    assert list(cached.obs["cell_type"]) == list(want.obs["cell_type"])
    assert list(cached.var_names) == list(want.var["feature_id"])
    assert (cached.X != want.X).nnz == 0
    # prepare: ensembl ids -> symbols, roles mapped, the dataset ids in the provenance
    adata = write_h5ad(prepare(card, {"main": path}), tmp_path / "census_pbmc.h5ad")
    prepared = ad.read_h5ad(adata)
    assert prepared.n_obs == cached.n_obs and list(prepared.var_names) == list(want.var["feature_name"])
    assert set(prepared.obs["batch"]) == {"donor-1", "donor-2"}
    record = json.loads(read_provenance(adata)["sources"])[0]
    assert record["kind"] == "census" and record["dataset_ids"] == [DS_A] and record["sha256"] == sha
    # a cached copy that no longer matches is read again from the Census
    cached.X[0, cached.X[0].indices[0]] += 1
    cached.write_h5ad(path)
    again = fetch_card(card, tmp_path / "cache")["main"]
    assert slice_sha256(ad.read_h5ad(again)) == sha
    # the same filter read twice gives the same hash; another filter another one
    assert slice_sha256(read_slice(card.sources[0], "homo_sapiens", "x")) == sha
    other = _card(census_uri, dataset_ids=[DS_A]).sources[0]
    assert slice_sha256(read_slice(other, "homo_sapiens", "x")) != sha


def test_filters_combine_and_bad_ones_are_named(census_uri, source_cells):
    src = _card(census_uri, tissues=["blood"], cell_types=["CD14+ Monocyte", "Dendritic"],
                value_filter="donor_id == 'donor-2'").sources[0]
    assert src.obs_filter() == ("tissue_general in ['blood'] and cell_type in ['CD14+ Monocyte', 'Dendritic'] "
                                "and (donor_id == 'donor-2')")
    got = read_slice(src, "homo_sapiens", "x")
    obs = source_cells.obs
    assert got.n_obs == int((obs["cell_type"].isin(["CD14+ Monocyte", "Dendritic"]) & (obs["donor_id"] == "donor-2")).sum())
    with pytest.raises(DataError, match="selects no cells"):
        read_slice(_card(census_uri, tissues=["brain"]).sources[0], "homo_sapiens", "datasets/x.yaml")
    with pytest.raises(DataError, match=r"cannot be read with the filter '\(no_such_column == 1\)': SOMAError: .*no_such_column does not exist") as err:
        read_slice(_card(census_uri, value_filter="no_such_column == 1").sources[0], "homo_sapiens", "datasets/x.yaml")
    assert "Census schema" in str(err.value) and "At:" not in str(err.value)
    with pytest.raises(Exception, match="Unknown organism"):
        read_slice(src, "mus_musculus", "x")


def test_census_card_rules(census_uri):
    with pytest.raises(CardError, match="needs a filter"):
        _card(census_uri)
    with pytest.raises(CardError, match=r"not a file: \['format'\]"):
        _card(census_uri, dataset_ids=[DS_A], format="loom")
    with pytest.raises(CardError, match="requires_network"):
        _card(None, dataset_ids=[DS_A])
    with pytest.raises(CardError, match="census_version"):
        _card(census_uri, dataset_ids=[DS_A], census_version="stable")


def test_leakage_resolves_census_dataset_ids(census_uri, tmp_path, capsys):
    corpus_yaml = tmp_path / "toy_corpus.yaml"
    corpus = {"id": "toy_corpus", "version": 1, "title": "t", "kind": "published", "confidence": "census_release",
              "references": ["a paper"],
              "census": {"release": "2025-01-30", "organisms": ["homo_sapiens"], "filter": "donor 1 cells",
                         "value_filter": "donor_id == 'donor-1' and dataset_id == '" + DS_B + "'"}}
    unresolved = CorpusCard.model_validate(corpus)
    assert corpus_dataset_ids(unresolved.census, census_uri) == [DS_B]
    import yaml

    corpus_yaml.write_text(yaml.safe_dump(corpus))
    assert cli(["census-datasets", "--corpus", str(corpus_yaml), "--uri", census_uri]) == 0
    assert f"dataset_ids:\n  - {DS_B}" in capsys.readouterr().out
    card = _card(census_uri, dataset_ids=[DS_A])
    assert dataset_leakage(card, unresolved, [DS_A]) == ("unknown", [])  # a release not resolved yet
    resolved = CorpusCard.model_validate({**corpus, "census": {**corpus["census"], "dataset_ids": [DS_B]}})
    assert dataset_leakage(card, resolved, [DS_A]) == ("clean", [])
    assert dataset_leakage(card, resolved, [DS_A, DS_B]) == ("leaked", [f"cellxgene_dataset:{DS_B}"])
