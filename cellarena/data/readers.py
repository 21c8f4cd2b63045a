"""Read a source file of any format a dataset card may declare into an AnnData (cells x genes).

Only glue around the readers the scientific Python stack already has: anndata (h5ad), scanpy (10x
HDF5 of Cell Ranger v2 and v3), pandas (CSV/TSV, gzipped or not), scipy (MATLAB v5) and h5py
(MATLAB v7.3, loom). Each reader returns the matrix as stored (counts or a transform of them; the
card's ``counts`` block says which), the cell names as ``obs_names``, the gene names as
``var_names`` and whatever per-cell columns the file holds as ``obs``. Any exception means the file
is not what the card says; :func:`cellarena.data.prepare._read_source` turns it into an error that
names the file, what it looks like and the fix.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

_GZIP = b"\x1f\x8b"


class CompanionUnreadable(ValueError):
    """A companion file (features, barcodes, cell metadata) that cannot be read as the card says."""

    def __init__(self, name: str, path: Path, reason: str):
        super().__init__(reason)
        self.name, self.path = name, Path(path)


def read(path: Path, src, companions: dict[str, Path] | None = None) -> ad.AnnData:
    """The cells x genes AnnData of ``path`` read as ``src.format`` (a source of a dataset card);
    ``companions``: the paths of its companion files by name (``features``, ``barcodes``, ``obs``)."""
    companions = {k: Path(v) for k, v in (companions or {}).items()}
    adata = (_mtx(Path(path), src, companions) if src.format == "mtx"
             else _READERS[src.format](Path(path), src))
    if src.obs_file is not None:
        _join_obs(adata, src.obs_file, companions["obs"])
    return adata


def _companion(name: str, path: Path, read_it):
    try:
        return read_it()
    except (MemoryError, CompanionUnreadable):
        raise
    except Exception as exc:
        raise CompanionUnreadable(name, path, f"{type(exc).__name__}: {exc}") from exc


def _gzip_or_none(path: Path) -> str | None:
    with open(path, "rb") as fh:
        return "gzip" if fh.read(2) == _GZIP else None


def _open(path: Path, mode: str = "rb"):
    """``path`` opened as it is stored: through gzip when its bytes say so (whatever its name)."""
    import gzip  # noqa: PLC0415

    text = {"encoding": "utf-8", "errors": "replace"} if "t" in mode else {}
    return (gzip.open if _gzip_or_none(path) else open)(path, mode, **text)


def _delimited(path: Path, **read_csv) -> pd.DataFrame:
    """A CSV or TSV file, gzipped or not: tab-separated when its first line has a tab, else commas."""
    with _open(path, "rt") as fh:
        sep = "\t" if "\t" in fh.readline() else ","
    return pd.read_csv(path, sep=sep, compression=_gzip_or_none(path), **read_csv)


def _table(path: Path, *, header: bool = True) -> pd.DataFrame:
    """A CSV or TSV file (gzipped or not) as text, rows as they are."""
    return _delimited(path, dtype=str, header=0 if header else None, keep_default_na=False)


def _h5ad(path: Path, src, backed: str | None = None) -> ad.AnnData:
    with warnings.catch_warnings():  # old files warn about their own layout; not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        return ad.read_h5ad(path, backed=backed)


def read_backed(path: Path, src) -> ad.AnnData:
    """An h5ad source opened read-only with its X and raw.X left on disk (sliced by rows on use)."""
    return _h5ad(Path(path), src, backed="r")


def _csv(path: Path, src) -> ad.AnnData:
    frame = _delimited(path, index_col=0)
    if frame.shape[1] == 0:
        raise ValueError("the table has a single column: no expression values (wrong delimiter?)")
    values = frame.to_numpy(dtype=np.float32)
    cells, genes = frame.index.astype(str), frame.columns.astype(str)
    if (src.orientation or "cells_by_genes") == "genes_by_cells":
        values, cells, genes = values.T, genes, cells
    return _anndata(sp.csr_matrix(values), cells, genes)


def _10x_h5(path: Path, src) -> ad.AnnData:
    import scanpy as sc  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Variable names are not unique": prepare handles it
        return sc.read_10x_h5(path)  # Cell Ranger v3 (matrix/) or v2 (one group per genome)


def _mtx(path: Path, src, companions: dict[str, Path]) -> ad.AnnData:
    """Matrix Market (features x barcodes in Cell Ranger's layout, gzipped or not) with its features
    file (v3 ``features.tsv``: id, name, type; v2 ``genes.tsv``: id, name; or one name per line)
    and its barcodes file; only gene expression features are kept."""
    from scipy.io import mmread  # noqa: PLC0415

    with _open(path) as fh:
        matrix = sp.csr_matrix(mmread(fh))
    features = _companion("features", companions["features"],
                          lambda: _table(companions["features"], header=False))
    barcodes = _companion("barcodes", companions["barcodes"],
                          lambda: _table(companions["barcodes"], header=False))
    if (src.orientation or "genes_by_cells") == "genes_by_cells":
        matrix = matrix.T.tocsr()
    if len(features) != matrix.shape[1]:
        raise CompanionUnreadable("features", companions["features"],
                                  f"it lists {len(features)} features, the matrix has {matrix.shape[1]}")
    if len(barcodes) != matrix.shape[0]:
        raise CompanionUnreadable("barcodes", companions["barcodes"],
                                  f"it lists {len(barcodes)} barcodes, the matrix has {matrix.shape[0]} cells")
    names = features[1] if features.shape[1] > 1 else features[0]
    adata = _anndata(matrix, barcodes[0], names)
    if features.shape[1] > 1:
        adata.var["gene_ids"] = features[0].to_numpy()
    if features.shape[1] > 2:
        adata.var["feature_types"] = features[2].to_numpy()
        adata = adata[:, adata.var["feature_types"] == "Gene Expression"].copy()
    return adata


def _join_obs(adata: ad.AnnData, spec, path: Path) -> None:
    """Add the columns of a cell-metadata file to ``adata.obs``: by cell name or by order."""
    def read_it():
        if spec.format == "mat":
            wanted = [*spec.columns.values(), *([spec.key] if spec.key else [])]
            variables = _mat_variables(path, wanted)
            table = pd.DataFrame({k: _mat_column(variables, k) for k in wanted})
        else:
            table = _table(path, header=spec.header)
            table.columns = table.columns.astype(str)
        return table

    table = _companion("obs", path, read_it)
    columns = dict(spec.columns) or {c: c for c in table.columns if c != (spec.key or table.columns[0])}
    missing = [c for c in columns.values() if c not in table.columns]
    if missing:
        raise CompanionUnreadable("obs", path, f"it has no column(s) {missing} (columns {list(table.columns)})")
    if spec.join == "order":
        if len(table) != adata.n_obs:
            raise CompanionUnreadable("obs", path, f"join by order, but it has {len(table)} rows for "
                                                   f"{adata.n_obs} cells")
        rows = table
    else:
        key = spec.key or table.columns[0]
        if key not in table.columns:
            raise CompanionUnreadable("obs", path, f"no column {key!r} with the cell names (columns "
                                                   f"{list(table.columns)})")
        index = table[key].astype(str)
        if index.duplicated().any():
            raise CompanionUnreadable("obs", path, f"cell names repeat in column {key!r}, e.g. "
                                                   f"{index[index.duplicated()].head(3).tolist()}")
        absent = adata.obs_names.difference(index)
        if len(absent):
            raise CompanionUnreadable("obs", path, f"join by barcode, but {len(absent)} of {adata.n_obs} cells have "
                                                   f"no row, e.g. {absent[:3].tolist()}")
        rows = table.set_index(index).loc[adata.obs_names]
    for column, source in columns.items():
        adata.obs[column] = rows[source].to_numpy()


def _anndata(matrix, cells, genes, obs: dict | None = None) -> ad.AnnData:
    n_cells, n_genes = matrix.shape
    cells = pd.Index(np.asarray(cells).astype(str)) if cells is not None else pd.Index(
        [f"cell_{i}" for i in range(n_cells)])
    genes = pd.Index(np.asarray(genes).astype(str)) if genes is not None else pd.Index(
        [f"gene_{i}" for i in range(n_genes)])
    if len(cells) != n_cells or len(genes) != n_genes:
        raise ValueError(f"the matrix is {n_cells} cells x {n_genes} genes but the file names {len(cells)} "
                         f"cells and {len(genes)} genes (check orientation and the name keys)")
    frame = pd.DataFrame(index=cells)
    for column, values in (obs or {}).items():
        values = np.asarray(values).reshape(-1)
        if values.size != n_cells:
            raise ValueError(f"obs column {column!r} has {values.size} values for {n_cells} cells")
        frame[column] = values
    return ad.AnnData(X=sp.csr_matrix(matrix, dtype=np.float32), obs=frame, var=pd.DataFrame(index=genes))


# --- loom -----------------------------------------------------------------------------------------


def _loom_text(values) -> np.ndarray:
    values = np.asarray(values)
    return values.astype(str) if values.dtype.kind != "S" else np.char.decode(values, "utf-8")


def _loom(path: Path, src) -> ad.AnnData:
    """Loom: ``/matrix`` is genes x cells, ``/row_attrs`` per gene, ``/col_attrs`` per cell."""
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ValueError(f"no /matrix dataset (top-level keys {sorted(f.keys())}): not a loom file")
        matrix = sp.csr_matrix(np.asarray(f["matrix"]).T)
        cols, rows = f.get("col_attrs", {}), f.get("row_attrs", {})
        # the names' attributes: the card's, else the convention's; a file without 'CellID' numbers
        # its cells (cell_0, ...), as loompy-written files of imaging data do
        cell_key, gene_key = src.cell_names_key or "CellID", src.gene_names_key or "Gene"
        for key, group, what, named in ((cell_key, cols, "col_attrs", src.cell_names_key),
                                        (gene_key, rows, "row_attrs", True)):
            if key not in group and named:
                raise ValueError(f"loom {what} has no {key!r} (have {sorted(group.keys())})")
        cells = _loom_text(cols[cell_key]) if cell_key in cols else None
        genes = _loom_text(rows[gene_key])
        wanted = src.obs_keys or {k: k for k in cols if k != cell_key}
        missing = [k for k in wanted.values() if k not in cols]
        if missing:
            raise ValueError(f"loom col_attrs lack {missing} (have {sorted(cols.keys())})")
        obs = {}
        for column, key in wanted.items():
            values = np.asarray(cols[key])
            if values.ndim == 2 and values.shape[1] == 1:  # a per-cell value stored as a column vector
                values = values[:, 0]
            if values.ndim == 1:  # (2-D attributes, e.g. coordinates, are not obs columns)
                obs[column] = _loom_text(values) if values.dtype.kind in "SOU" else _whole(values)
    return _anndata(matrix, cells, genes, obs)


def _whole(values: np.ndarray) -> np.ndarray:
    """Numbers that are all whole as integers (a batch 0.0, 1.0 reads as 0, 1), others unchanged."""
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all():
        return values.astype(np.int64)
    return values


# --- MATLAB ---------------------------------------------------------------------------------------


def _mat_v5(path: Path, names: set[str]) -> dict:
    from scipy.io import loadmat, whosmat  # noqa: PLC0415

    stored = {name for name, _, _ in whosmat(path)}
    read = loadmat(path, squeeze_me=True, variable_names=sorted(names & stored)) if names & stored else {}
    return {k: read[k] if k in names else None for k in stored}


def _matlab_text(values) -> np.ndarray:
    """One entry per cell or gene from a MATLAB variable as loadmat gives it (``squeeze_me``,
    ``chars_as_strings``): a cell array of strings is an object array of str, a char matrix an array
    of str (one per row), a numeric vector stays numeric."""
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind == "O":
        return np.array([v.strip() if isinstance(v, str) else str(np.asarray(v).squeeze()) for v in values])
    return np.char.strip(values.astype(str)) if values.dtype.kind in "US" else values


def _matlab_class(node) -> str:
    kind = node.attrs.get("MATLAB_class", b"")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _h5_chars(values) -> str:
    return "".join(map(chr, np.asarray(values).reshape(-1))).strip()


def _h5_value(f: h5py.File, node):
    """A MATLAB v7.3 variable read through h5py, in MATLAB's own shape (HDF5 stores it transposed):
    a numeric array, a sparse matrix, or for a cell array / char matrix one string per entry / row."""
    if isinstance(node, h5py.Group):
        if "MATLAB_sparse" not in node.attrs:
            raise ValueError(f"variable {node.name} is a MATLAB struct, not an array")
        jc = np.asarray(node["jc"])  # compressed sparse columns of the MATLAB matrix
        data = np.asarray(node["data"]) if "data" in node else np.ones(len(node["ir"]))
        return sp.csc_matrix((data, np.asarray(node["ir"]), jc), shape=(int(node.attrs["MATLAB_sparse"]), len(jc) - 1))
    values = np.asarray(node).T
    if _matlab_class(node) == "cell":  # object references, one array per entry
        entries = [f[ref] for ref in values.reshape(-1)]
        return np.array([_h5_chars(e) if _matlab_class(e) == "char" else np.asarray(e).reshape(-1)[0] for e in entries])
    if _matlab_class(node) == "char":
        return np.array([_h5_chars(row) for row in np.atleast_2d(values)])
    return values


def _mat_v73(path: Path, names: set[str]) -> dict:
    with h5py.File(path, "r") as f:
        return {k: _h5_value(f, f[k]) if k in names else None for k in f.keys() if not k.startswith("#")}


def _mat_variables(path: Path, keys) -> dict:
    """The variables of a MATLAB file (v5 through scipy; v7.3, which is HDF5, through h5py) that
    ``keys`` name (``variable`` or ``variable:k``) read, the file's other variables listed as None."""
    names = {k.rpartition(":")[0] if ":" in k else k for k in keys if k}
    return _mat_v73(path, names) if h5py.is_hdf5(path) else _mat_v5(path, names)


def _mat_column(variables: dict, key: str) -> np.ndarray:
    """One value per cell or gene from ``key``: a variable, or ``variable:k`` for the k-th column
    (counted from 1, as MATLAB does) of a two-dimensional one (a cell array of names by level)."""
    name, _, column = key.rpartition(":") if ":" in key else (key, "", "")
    if name not in variables:
        raise ValueError(f"the file has no variable {name!r} (it has {sorted(variables)})")
    values = variables[name]
    if column:
        values = np.asarray(values)
        if values.ndim != 2 or not column.isdigit() or not 1 <= int(column) <= values.shape[1]:
            raise ValueError(f"{key!r}: variable {name!r} has shape {values.shape}; ':k' picks column k "
                             f"(1 to {values.shape[1] if values.ndim == 2 else 'n'}) of a 2-D variable")
        values = values[:, int(column) - 1]
    return _matlab_text(values)


def _mat(path: Path, src) -> ad.AnnData:
    variables = _mat_variables(path, [src.matrix_key, src.cell_names_key, src.gene_names_key,
                                      *src.obs_keys.values()])
    if src.matrix_key not in variables:
        raise ValueError(f"the file has no variable(s) {[src.matrix_key]} (it has {sorted(variables)})")
    matrix = variables[src.matrix_key]
    matrix = matrix if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"variable {src.matrix_key!r} is not a 2-D matrix (shape {matrix.shape})")
    if src.orientation == "genes_by_cells":
        matrix = matrix.T
    names = {k: _mat_column(variables, getattr(src, k)) if getattr(src, k) else None
             for k in ("cell_names_key", "gene_names_key")}
    obs = {column: _mat_column(variables, key) for column, key in src.obs_keys.items()}
    return _anndata(matrix, names["cell_names_key"], names["gene_names_key"], obs)


_READERS = {"h5ad": _h5ad, "csv": _csv, "csv_cells_by_genes": _csv, "10x_h5": _10x_h5, "loom": _loom,
            "mat": _mat}  # mtx: _mtx, which needs the companion files
