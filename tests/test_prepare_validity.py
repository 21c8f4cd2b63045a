"""prepare refuses bad data (issue 18): every refusal names the card, the file and the fix, and
reaches the workflow as a failed placeholder, so a bad dataset yields failed rows, never a score.

Each test writes a real file in tmp_path, points a local-source card at it and runs prepare; each
asserts on the message, so it fails if its check is removed.
"""

from __future__ import annotations

import gzip
import json
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from cellarena.cards.dataset import load_card, parse_card
from cellarena.cli import main as cli
from cellarena.data.fetch import fetch_card, sha256_file
from cellarena.data.prepare import prepare, provenance
from cellarena.errors import DataError
from cellarena.run import run_task

CARD = "datasets/toy_set.yaml"


def _card_data(path, **over) -> dict:
    data = {
        "id": "toy_set", "version": 1, "title": "toy", "organism": "homo_sapiens",
        "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody",
        "sources": [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path)}],
        "roles": {"cell_type": "label", "batch": "lane"}, "labels": {"quality": "expert"},
    }
    data.update(over)
    return data


def _prepare(path, **over) -> ad.AnnData:
    return prepare(parse_card(_card_data(path, **over), where=CARD), {"main": path}, card_path=CARD)


def _refused(path, **over) -> str:
    """prepare's error message for ``path``; asserts it names the card, the file and a fix."""
    with pytest.raises(DataError) as err:
        _prepare(path, **over)
    text = str(err.value)
    assert err.value.where.startswith(f"{CARD} (source main: {path}")
    assert err.value.fix and "\n  fix: " in text
    return text


def _write(adata: ad.AnnData, path):
    adata.write_h5ad(path)
    return path


# --- non-finite counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_counts_are_refused(tmp_path, small_adata, layout, value):
    a = small_adata()
    x = a.X.toarray()
    x[[3, 3, 7], [0, 5, 2]] = value  # three entries in two cells
    a.X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](x)
    text = _refused(_write(a, tmp_path / "toy.h5ad"))
    kind = "NaN" if np.isnan(value) else "infinite"
    assert "non-finite counts" in text and f"3 {kind}" in text and "in 2 of 60 cells" in text
    assert "['cell3', 'cell7']" in text and "file's X" in text
    assert "point counts.matrix / counts.layer at the raw integer counts" in text


def test_non_finite_counts_in_a_layer_name_the_layer(tmp_path, small_adata):
    a = small_adata()
    a.layers["counts"] = a.X.copy()
    a.layers["counts"].data[0] = np.nan
    text = _refused(_write(a, tmp_path / "toy.h5ad"), counts={"layer": "counts"})
    assert "layers['counts'] holds non-finite counts: 1 NaN" in text


def test_non_finite_check_never_densifies(tmp_path):
    """100,000 x 100,000 cells x genes would be 40 GB dense; the check reads the stored values only."""
    n = 100_000
    x = sp.csr_matrix((np.array([1.0, np.nan, 2.0], dtype=np.float32), ([0, 50_000, 99_999], [0, 7, 99_999])),
                      shape=(n, n))
    a = ad.AnnData(X=x, obs=pd.DataFrame({"label": "t", "lane": "b"}, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(n)]))
    text = _refused(_write(a, tmp_path / "big.h5ad"))
    assert "1 NaN and 0 infinite entries in 1 of 100000 cells, e.g. cells ['c50000']" in text


def test_csv_with_an_empty_field_is_non_finite(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("cell,GENE0,GENE1\ncell0,1,2\ncell1,,3\n")
    src = {"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path),
           "format": "csv_cells_by_genes"}
    text = _refused(path, sources=[src], roles={}, labels={"quality": "none"})
    assert "1 NaN and 0 infinite entries in 1 of 2 cells, e.g. cells ['cell1']" in text


def test_a_non_finite_size_column_is_refused(tmp_path, small_adata):
    """log1p-normalized files: a NaN total count makes every recovered count of its cell NaN."""
    a = small_adata()
    counts = a.X.toarray()
    size = counts.sum(axis=1)
    a.raw = ad.AnnData(X=sp.csr_matrix(np.log1p(counts / size[:, None] * 1e4)), var=a.var)
    a.obs["n_counts"] = size
    a.obs.iloc[4, a.obs.columns.get_loc("n_counts")] = np.nan
    spec = {"matrix": "raw", "transform": "log1p_normalized", "size_column": "n_counts", "target_sum": 10000}
    text = _refused(_write(a, tmp_path / "toy.h5ad"), counts=spec)
    assert "undoing counts.transform log1p_normalized" in text and "['cell4']" in text
    assert "counts.size_column must hold each cell's finite total count" in text


# --- missing values in role columns --------------------------------------------------------------


@pytest.mark.parametrize("missing", [np.nan, "", "  ", "None"], ids=["nan", "empty", "blank", "None_text"])
def test_missing_labels_are_refused(tmp_path, small_adata, missing):
    a = small_adata()
    labels = a.obs["label"].astype(object).to_numpy()
    labels[[2, 11, 40]] = missing
    a.obs["label"] = labels
    text = _refused(_write(a, tmp_path / "toy.h5ad"))
    assert "obs column 'label' (roles.cell_type) has no value for 3 of 60 cells" in text
    assert "e.g. cells ['cell2', 'cell11', 'cell40']" in text
    assert "sources[main].exclude: {label: [" in text and "'unassigned'" in text


def test_missing_batches_are_refused(tmp_path, small_adata):
    a = small_adata()
    a.obs["lane"] = pd.Categorical(np.where(np.arange(60) % 10 == 0, None, a.obs["lane"].to_numpy()))
    text = _refused(_write(a, tmp_path / "toy.h5ad"))
    assert "obs column 'lane' (roles.batch) has no value for 6 of 60 cells (values ['nan'])" in text
    assert "e.g. cells ['cell0', 'cell10', 'cell20']" in text
    assert "sources[main].exclude: {lane: ['nan']}" in text and "unassigned" not in text


def test_the_suggested_exclude_drops_the_unlabelled_cells(tmp_path, small_adata):
    """The fix the error gives works: excluding the spelled-out missing values prepares the rest."""
    a = small_adata()
    a.obs["label"] = pd.Categorical(np.where(np.arange(60) < 4, None, a.obs["label"].to_numpy()))
    path = _write(a, tmp_path / "toy.h5ad")
    _refused(path)
    src = {"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path),
           "exclude": {"label": ["nan"]}}
    adata = _prepare(path, sources=[src])
    assert adata.n_obs == 56 and "nan" not in set(adata.obs["cell_type"])
    assert json.loads(adata.uns["cellarena"]["excluded_cells"]) == {"main": 4}


def test_an_empty_constant_role_is_refused(tmp_path, small_h5ad):
    src = {"id": "main", "kind": "local", "path": str(small_h5ad), "sha256": sha256_file(small_h5ad),
           "obs": {"study": ""}}
    text = _refused(small_h5ad, sources=[src], roles={"cell_type": "label", "batch": "study"})
    assert "sources[main].obs.study (roles.batch) is ''" in text


def test_missing_perturbations_need_an_explicit_exclude(tmp_path, small_adata):
    """Without 'nan' in exclude_values they are an error; with it (the Adamson card) they are dropped."""
    a = small_adata()
    guides = np.where(np.arange(60) < 30, "ctrl", "CBL").astype(object)
    guides[:6] = None
    a.obs["guide"] = pd.Categorical(guides)
    path = _write(a, tmp_path / "toy.h5ad")
    roles = {"cell_type": "label", "perturbation": "guide"}
    text = _refused(path, roles=roles, perturbations={"kind": "genetic", "control_values": ["ctrl"]})
    assert "obs column 'guide' (roles.perturbation) has no value for 6 of 60 cells" in text
    assert "add 'nan' to perturbations.exclude_values" in text
    adata = _prepare(path, roles=roles, perturbations={"kind": "genetic", "control_values": ["ctrl"],
                                                       "exclude_values": ["nan"]})
    assert adata.n_obs == 54 and set(adata.obs["perturbation"]) == {"ctrl", "CBL"}
    assert json.loads(adata.uns["cellarena"]["excluded_cells"]) == {"perturbation_labels": 6}


# --- gene IDs ------------------------------------------------------------------------------------


def test_ensembl_ids_under_a_symbol_card_are_refused(tmp_path, small_adata):
    a = small_adata()
    a.var["feature_name"] = a.var_names.to_numpy()
    a.var_names = [f"ENSG{j:011d}" for j in range(30)] + [f"GENE{j}" for j in range(30, 40)]  # 75 %
    text = _refused(_write(a, tmp_path / "toy.h5ad"))
    assert "declares gene_id_type: symbol, but 75% of the file's 40 gene names look like Ensembl IDs" in text
    assert "'ENSG00000000000'" in text and "more than 50%" in text
    assert "set gene_id_type: ensembl and gene_symbol_column" in text and "['feature_name']" in text


def test_symbols_under_an_ensembl_card_are_refused(tmp_path, small_adata):
    a = small_adata()
    a.var["gene_ids"] = [f"ENSMUSG{j:011d}.2" for j in range(40)]
    a.var["symbol"] = a.var_names.to_numpy()
    text = _refused(_write(a, tmp_path / "toy.h5ad"), gene_id_type="ensembl", gene_symbol_column="symbol")
    assert "declares gene_id_type: ensembl, but 0% of the file's 40 gene names look like Ensembl IDs" in text
    assert "'GENE0'" in text and "set gene_id_type: symbol" in text and "['gene_ids']" in text


def test_a_minority_of_ensembl_ids_is_fine_and_ensembl_cards_prepare(tmp_path, small_adata):
    a = small_adata()
    a.var_names = [f"ENSG{j:011d}" for j in range(20)] + [f"GENE{j}" for j in range(20, 40)]  # 50 %
    assert _prepare(_write(a, tmp_path / "half.h5ad")).n_vars == 40
    a.var["symbol"] = [f"SYM{j}" for j in range(40)]
    a.var_names = [f"ENSG{j:011d}.1" for j in range(40)]
    adata = _prepare(_write(a, tmp_path / "ens.h5ad"), gene_id_type="ensembl", gene_symbol_column="symbol")
    assert adata.var_names[0] == "SYM0" and adata.var["original_id"].iloc[0] == "ENSG00000000000.1"


def test_a_symbol_column_holding_ensembl_ids_is_refused(tmp_path, small_adata):
    a = small_adata()
    a.var["gene_ids"] = [f"ENSG{j:011d}" for j in range(40)]
    a.var["symbol"] = a.var_names.to_numpy()
    a.var_names = a.var["gene_ids"].to_numpy()
    text = _refused(_write(a, tmp_path / "toy.h5ad"), gene_id_type="ensembl", gene_symbol_column="gene_ids")
    assert "gene_symbol_column 'gene_ids' holds Ensembl IDs" in text and "(candidates: ['symbol'])" in text


# --- sources that cannot be read -----------------------------------------------------------------


def test_a_truncated_h5ad_is_refused(tmp_path, small_h5ad):
    path = tmp_path / "toy.h5ad"
    path.write_bytes(small_h5ad.read_bytes()[: small_h5ad.stat().st_size // 2])
    text = _refused(path)
    assert "cannot read the file as h5ad: it looks like a truncated or damaged HDF5 file" in text
    assert r"first bytes b'\x89HDF\r\n\x1a\n" in text and "truncated file" in text
    assert f"re-export the local file {path}" in text and "sha256" in text


def test_csv_bytes_named_h5ad_are_refused(tmp_path):
    path = tmp_path / "toy.h5ad"
    path.write_text("cell,GENE0,GENE1\ncell0,1,2\n")
    text = _refused(path)
    assert "it looks like CSV/TSV text (first bytes b'cell,GENE0,GENE1')" in text
    assert "set format: csv for source 'main'" in text


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "toy.h5ad"
    path.write_bytes(b"")
    text = _refused(path)
    assert "it looks like an empty file (0 bytes) (first bytes b'')" in text and "re-export" in text


@pytest.mark.parametrize("pack", ["zip", "gzip"])
def test_an_archive_named_h5ad_is_refused(tmp_path, small_h5ad, pack):
    path = tmp_path / "toy.h5ad"
    if pack == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.write(small_h5ad, "toy.h5ad")
    else:
        path.write_bytes(gzip.compress(small_h5ad.read_bytes()))
    text = _refused(path)
    assert ("a zip archive (first bytes b'PK" if pack == "zip" else "gzip-compressed data") in text
    assert "not an archive or a compressed copy" in text


def test_an_h5ad_given_as_csv_is_refused(tmp_path, small_h5ad):
    src = {"id": "main", "kind": "local", "path": str(small_h5ad), "sha256": sha256_file(small_h5ad),
           "format": "csv_cells_by_genes"}
    text = _refused(small_h5ad, sources=[src])
    assert "cannot read the file as csv_cells_by_genes: it looks like an AnnData file" in text
    assert "set format: h5ad" in text


def test_a_fetched_file_names_the_refetch(tmp_path, small_h5ad):
    """For fetched sources the fix is to delete the cached copy and fetch again."""
    data = _card_data(small_h5ad)
    data["sources"] = [{"id": "main", "kind": "url", "url": "https://example.org/toy.h5ad",
                        "sha256": "0" * 64, "size": 10}]
    data["requires_network"] = True
    broken = tmp_path / "cache" / "main.h5ad"
    broken.parent.mkdir()
    broken.write_bytes(b"<!DOCTYPE html><html>Too many requests</html>")
    with pytest.raises(DataError, match="an HTML page") as err:
        prepare(parse_card(data, where=CARD), {"main": broken}, card_path=CARD)
    assert f"delete {broken} and run `cellarena fetch` again" in err.value.fix
    assert "url https://example.org/toy.h5ad" in err.value.fix


# --- through the workflow's commands -------------------------------------------------------------


def test_a_refusal_becomes_a_failed_placeholder_and_failed_rows(tmp_path, small_adata, repo):
    """`cellarena prepare` writes the reason into a failed placeholder; the split and the run that
    follow carry it as failed rows, and no score is computed."""
    a = small_adata()
    a.X.data[:5] = np.nan
    raw = _write(a, tmp_path / "toy_raw.h5ad")
    card = tmp_path / "toy_set.yaml"
    card.write_text(yaml.safe_dump(_card_data(raw)))
    manifest, prepared, split = tmp_path / "m.json", tmp_path / "toy.h5ad", tmp_path / "split.json"
    cache = str(tmp_path / "cache")
    assert cli(["fetch", "--card", str(card), "--cache", cache, "--out", str(manifest)]) == 0
    assert cli(["prepare", "--card", str(card), "--manifest", str(manifest), "--out", str(prepared)]) == 0
    info = provenance(ad.read_h5ad(prepared))
    assert info["status"] == "failed" and str(card) in info["reason"]
    assert "non-finite counts" in info["reason"] and "fix:" in info["reason"]
    spec = json.dumps({"scheme": "stratified", "test_fraction": 0.3})
    assert cli(["split", "--prepared", str(prepared), "--name", "stratified", "--spec", spec, "--seed", "0",
                "--out", str(split)]) == 0
    assert json.loads(split.read_text())["status"] == "failed"
    rows = run_task("annotation", prepared, split, repo / "models" / "majority_class", seed=0)
    assert set(rows["status"]) == {"failed"} and rows["value"].isna().all()
    assert rows["status_reason"].str.contains("non-finite counts").all()


# --- the shipped data -----------------------------------------------------------------------------


@pytest.mark.parametrize("dataset_id", ["pbmc68k_reduced", "pbmc_cross_study", "pbmc3k"])
def test_shipped_offline_datasets_still_prepare(dataset_id, repo, data_cache):
    card = load_card(repo / "datasets" / f"{dataset_id}.yaml")
    adata = prepare(card, fetch_card(card, data_cache))
    assert adata.uns["cellarena"]["status"] == "ok" and adata.n_obs > 0
    for role in adata.obs.columns:
        assert not ({"nan", "", "None"} & set(adata.obs[role].astype(str))), role


def test_kang_and_the_simulated_screen_still_prepare(kang_prepared, proxy_prepared):
    for path in (kang_prepared, proxy_prepared):
        adata = ad.read_h5ad(path)
        assert provenance(adata)["status"] == "ok"
        assert "nan" not in set(adata.obs["cell_type"].astype(str))
