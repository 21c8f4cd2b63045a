"""Turn fetched raw files into one canonical AnnData per dataset version.

The canonical form, which every task reads:

- ``layers["counts"]``: integer-valued counts (float32 CSR), cells x genes; ``X`` holds the same.
- ``obs``: the canonical role columns that the card maps (``cell_type``, ``batch``, ``donor``,
  ``condition``, ``perturbation``) as categoricals, and nothing else. Perturbation labels are
  canonical: ``ctrl`` or the sorted targets joined by ``+`` (see ``cards.Perturbations``). Cell IDs are unique (prefixed by the source id
  when a card has several sources).
- ``var``: gene symbols as the index; ``var["original_id"]`` keeps the raw file's gene IDs.
- ``uns["cellarena"]``: provenance — card id and version, label quality, each source's sha256.

Bad data never reaches a score: a source that cannot be read, non-finite or non-integer counts,
missing values in a role column, gene IDs of another type than the card declares, or duplicate cell
IDs are a :class:`DataError` naming the card, the file and the fix. ``cellarena prepare`` turns it
into a failed placeholder (:func:`failed_placeholder`), which every later job turns into failed rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarena import SUITE_VERSION
from cellarena.cards.dataset import ROLES, Counts, DatasetCard
from cellarena.errors import DataError

# --- reading a source ------------------------------------------------------------------------------

_HDF5 = b"\x89HDF\r\n\x1a\n"
_SIGNATURES = (  # leading bytes -> what the file is
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"PAR1", "a Parquet file"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"MATLAB 7.3 MAT-file", "a MATLAB v7.3 MAT-file"),
    (b"MATLAB 5.0 MAT-file", "a MATLAB v5 MAT-file"),
)


def _hdf5_guess(path: Path) -> str:
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            tenx = "matrix" in keys and isinstance(f["matrix"], h5py.Group) or any(
                isinstance(f[k], h5py.Group) and "barcodes" in f[k] for k in keys)
    except OSError:
        return (f"a truncated or damaged HDF5 file (it has the HDF5 signature, but HDF5 cannot open its "
                f"{path.stat().st_size} bytes)")
    kind = ("a loom file" if {"matrix", "row_attrs", "col_attrs"} <= set(keys) else
            "a 10x Genomics HDF5 file" if tenx else
            "an AnnData file" if {"obs", "var"} <= set(keys) else "an HDF5 file")
    return f"{kind} (top-level groups {keys[:8]})"


# what a guess of :func:`looks_like` says the format is (to suggest the card's format)
_FORMAT_OF_GUESS = (("CSV/TSV text", "csv"), ("a loom file", "loom"), ("a 10x Genomics HDF5 file", "10x_h5"),
                    ("an AnnData file", "h5ad"), ("a MATLAB", "mat"))


def _format_of(guess: str) -> str | None:
    return next((fmt for start, fmt in _FORMAT_OF_GUESS if guess.startswith(start)), None)


def looks_like(path: Path) -> tuple[bytes, str]:
    """The first 16 bytes of ``path`` and a guess of what the file is, from its leading bytes (also used
    for submitted result files: cellarena/review/submission.py)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        return b"", f"a file that cannot be opened ({exc.strerror or exc})"
    if not head:
        return b"", "an empty file (0 bytes)"
    if head.startswith(_HDF5):
        return head[:16], _hdf5_guess(path)
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return head[:16], what
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return head[:16], "a Python pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # more than a character cut at the end of the sample
            return head[:16], "binary data of no format recognized here"
        text = head[:exc.start].decode("utf-8")
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html")):
        return head[:16], "an HTML page (a download that returned an error or login page?)"
    if lowered.startswith(("{", "[")):
        return head[:16], "JSON text"
    lines = text.splitlines()
    if lines and ("," in lines[0] or "\t" in lines[0]):
        return head[:16], "CSV/TSV text"
    return head[:16], "text"


def _source_origin(src) -> str:
    """Where a source's bytes come from, in the card's own words."""
    if src.kind == "pypi_wheel":
        return f"member {src.member} of the {src.package}=={src.version} wheel"
    if src.kind == "url":
        return f"url {src.url}"
    if src.kind == "local":
        return f"local path {src.path}"
    if src.kind == "census":
        return f"the slice of CELLxGENE Census {src.census_version} where {src.obs_filter()}"
    return f"the prepared file of dataset {src.dataset} v{src.version}"


def _unreadable(path: Path, src, exc: Exception, where: str) -> DataError:
    """The error for a source file that the reader of its declared format cannot read."""
    head, guess = looks_like(path)
    said = " ".join(f"{type(exc).__name__}: {exc}".split())
    said = said if len(said) <= 300 else said[:297] + "..."
    if src.format == "h5ad" and guess.startswith("an HDF5 file"):
        guess += ", but not a readable AnnData file"
    other = _format_of(guess)
    if src.kind == "derived":
        fix = f"prepare dataset {src.dataset} again (`cellarena prepare`), then this card"
    elif other is not None and other != src.format and not (other == "csv" and src.format == "csv_cells_by_genes"):
        fix = (f"the file is not {src.format}: if {_source_origin(src)} is the right file, set "
               f"format: {other} for source {src.id!r} in the card"
               + (" (with matrix_key and orientation)" if other == "mat" else ""))
    elif guess.endswith(("compressed data", "zip archive")):
        fix = (f"the card must name the {src.format} file itself, not an archive or a compressed copy: "
               f"point source {src.id!r} at the unpacked file and set its sha256 to that file's")
    elif src.kind == "local":
        fix = (f"re-export the local file {src.path} as {src.format} (or fix the source's format), then set "
               "the card's sha256 to the new file's and bump its version")
    else:
        fix = (f"delete {path} and run `cellarena fetch` again; if the fresh copy fails the same way, "
               f"the card pins a broken or wrong file: check source {src.id!r} ({_source_origin(src)}), "
               f"its format ({src.format}) and its sha256")
    return DataError(f"cannot read the file as {src.format}: it looks like {guess} (first bytes "
                     f"{head!r}); the reader said: {said}", where=where, fix=fix)


def _companion_unreadable(exc, src, where: str) -> DataError:
    """The error for a companion file (features, barcodes, cell metadata) that cannot be used."""
    head, guess = looks_like(exc.path)
    spec = src.companions()[exc.name]
    origin = {"member": f"member {spec.member} of the {getattr(src, 'package', '')}=={getattr(src, 'version', '')} "
                        "wheel", "url": f"url {spec.url}", "path": f"local path {spec.path}"}[spec.locator()]
    return DataError(f"cannot use the {exc.name} file {exc.path} of source {src.id!r} ({origin}): {exc}; it looks "
                     f"like {guess} (first bytes {head!r})", where=where,
                     fix=f"check sources[{src.id}].{exc.name}_file in the card: the right file (and its sha256), "
                         + ("its format, join and columns" if exc.name == "obs" else
                            "and that it belongs to this matrix (one line per feature or barcode)"))


def _read_source(path: Path, src, where: str, companions: dict[str, Path] | None = None, *,
                 backed: bool = False) -> ad.AnnData:
    """Read one fetched file (and its companion files; ``backed``: an h5ad file with its matrices
    left on disk); a file that cannot be read as the card's format is a DataError."""
    from cellarena.data import readers  # noqa: PLC0415

    try:
        return readers.read_backed(path, src) if backed else readers.read(path, src, companions)
    except MemoryError:
        raise
    except readers.CompanionUnreadable as exc:
        raise _companion_unreadable(exc, src, where) from exc
    except Exception as exc:  # whatever the reader says, the file is not what the card declares
        raise _unreadable(path, src, exc, where) from exc


# --- counts --------------------------------------------------------------------------------------


def _nonfinite(mat) -> tuple[int, int, np.ndarray]:
    """(NaN entries, infinite entries, rows holding either) of a dense or sparse matrix.

    Sparse matrices are checked on their stored values (a missing entry is a zero), never densified;
    dense ones in blocks of rows, so the check needs little memory beyond the matrix itself.
    """
    if sp.issparse(mat):
        data = mat.data
        if data.dtype.kind not in "fc":
            return 0, 0, np.empty(0, dtype=np.int64)
        bad = ~np.isfinite(data)
        if not bad.any():
            return 0, 0, np.empty(0, dtype=np.int64)
        n_nan = int(np.isnan(data[bad]).sum())
        if mat.format == "csr":
            rows = np.searchsorted(mat.indptr, np.flatnonzero(bad), side="right") - 1
        elif mat.format == "csc":
            rows = mat.indices[bad]
        else:
            coo = mat.tocoo()
            rows = coo.row[~np.isfinite(coo.data)]
        return n_nan, int(bad.sum()) - n_nan, np.unique(rows)
    arr = np.asarray(mat)
    if arr.dtype.kind not in "fc":
        return 0, 0, np.empty(0, dtype=np.int64)
    arr = arr.reshape(arr.shape[0], -1)
    step = max(1, (1 << 24) // max(arr.shape[1], 1))
    n_nan = n_inf = 0
    rows = []
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        nan, inf = np.isnan(block), np.isinf(block)
        n_nan += int(nan.sum())
        n_inf += int(inf.sum())
        rows.append(np.flatnonzero((nan | inf).any(axis=1)) + start)
    return n_nan, n_inf, np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)


def _examples(names, k: int = 3) -> list[str]:
    return [str(n) for n in list(names)[:k]]


def _counts_source(adata: ad.AnnData, spec, where: str):
    """The matrix the card names as counts (in memory, or a backed handle), its genes and its name."""
    if spec.layer is not None:
        if spec.layer not in adata.layers:
            raise DataError(f"counts.layer {spec.layer!r} is not a layer (have {list(adata.layers)})",
                            where=where, fix="name an existing layer")
        return adata.layers[spec.layer], adata.var_names, f"layers[{spec.layer!r}]"
    if spec.matrix == "raw":
        if adata.raw is None:
            raise DataError("counts.matrix is 'raw' but the file has no .raw", where=where,
                            fix="set counts.matrix: X in the card")
        return adata.raw.X, adata.raw.var_names, "raw.X"
    return adata.X, adata.var_names, "X"


def _size_factors(adata: ad.AnnData, spec, where: str) -> np.ndarray | None:
    """Each cell's total count, for undoing ``log1p_normalized`` (None for other transforms)."""
    if spec.transform != "log1p_normalized":
        return None
    if spec.size_column not in adata.obs:
        raise DataError(f"counts.size_column {spec.size_column!r} is not an obs column "
                        f"(have {list(adata.obs.columns)})", where=where,
                        fix="name the obs column holding each cell's total counts")
    return adata.obs[spec.size_column].to_numpy(dtype=np.float64)


class _NonFinite:
    """Non-finite counts met so far, when a file is cleaned in blocks of cells (one error at the end)."""

    def __init__(self):
        self.nan = self.inf = 0
        self.cells: list[str] = []

    def raise_if_any(self, what: str, n_cells: int, where: str) -> None:
        if self.cells:
            raise _nonfinite_error(what, self.nan, self.inf, self.cells, n_cells, where)


def _nonfinite_error(what: str, n_nan: int, n_inf: int, cells, n_cells: int, where: str) -> DataError:
    return DataError(
        f"the file's {what} holds non-finite counts: {n_nan} NaN and {n_inf} infinite entries in "
        f"{len(cells)} of {n_cells} cells, e.g. cells {_examples(cells)}",
        where=where,
        fix="counts must be finite numbers: point counts.matrix / counts.layer at the raw integer "
            "counts, or repair the file upstream (drop or re-count those cells), then update the "
            "card's sha256 and bump its version")


def _clean_counts(mat, spec, where: str, *, what: str, names, n_cells: int, size: np.ndarray | None = None,
                  tally: _NonFinite | None = None) -> sp.csr_matrix | None:
    """Cells x genes counts as float32 CSR, refused if not finite, negative or not integers.

    ``mat``: all cells, or a block of them (``names``: their IDs, ``size``: their total counts);
    ``n_cells``: how many cells the file has, for the message. With ``tally``, non-finite values are
    counted there and the block gives None (the caller raises once every block was seen).
    """
    n_nan, n_inf, rows = _nonfinite(mat)
    if len(rows):
        if tally is None:
            raise _nonfinite_error(what, n_nan, n_inf, np.asarray(names)[rows], n_cells, where)
        tally.nan, tally.inf = tally.nan + n_nan, tally.inf + n_inf
        tally.cells.extend(map(str, np.asarray(names)[rows]))
        return None
    if tally is not None and tally.cells:
        return None  # the file is refused anyway
    mat = sp.csr_matrix(mat, dtype=np.float64)
    if spec.transform == "log1p":
        mat.data = np.expm1(mat.data)
    if spec.transform == "log1p_normalized":
        mat.data = np.expm1(mat.data)
        mat = sp.csr_matrix(sp.diags(size / spec.target_sum) @ mat)
        n_nan, n_inf, rows = _nonfinite(mat)
        if len(rows):
            raise DataError(
                f"undoing counts.transform log1p_normalized gives {n_nan + n_inf} non-finite values in "
                f"{len(rows)} cells, e.g. {_examples(np.asarray(names)[rows])} (their "
                f"obs[{spec.size_column!r}]: {_examples(size[rows])})", where=where,
                fix="counts.size_column must hold each cell's finite total count, and counts.target_sum "
                    "the sum the file was normalized to")
    if mat.data.size and mat.data.min() < 0:
        raise DataError("negative values where counts are required", where=where,
                        fix="point counts.matrix at raw counts, or declare the transform in the card")
    err = np.abs(mat.data - np.round(mat.data))
    if err.size and err.max() > spec.max_rounding_error:
        worst = int(np.argmax(err))
        raise DataError(
            f"non-integer counts: value {mat.data[worst]:.4f} is {err[worst]:.3f} away from an integer "
            f"(allowed {spec.max_rounding_error})", where=where,
            fix="counts must be raw integers: use the raw layer, or declare counts.transform "
                "with the size column and target sum that undo the normalization")
    mat.data = np.round(mat.data)
    mat.eliminate_zeros()
    return mat.astype(np.float32)


def _counts_matrix(adata: ad.AnnData, spec, where: str) -> tuple[sp.csr_matrix, pd.Index]:
    mat, genes, what = _counts_source(adata, spec, where)
    size = _size_factors(adata, spec, where)
    return _clean_counts(mat, spec, where, what=what, names=adata.obs_names, n_cells=adata.n_obs, size=size), genes


# --- gene IDs ------------------------------------------------------------------------------------

ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")  # ENSG00000141510, ENSMUSG00000059552.3
# The names "are Ensembl IDs" when more than this fraction matches ENSEMBL_ID. Symbol-indexed files
# keep a minority of Ensembl IDs for genes without a symbol; any majority means the other type.
ENSEMBL_MAJORITY = 0.5


def _ensembl_fraction(names) -> float:
    names = pd.Index(names).astype(str)
    return float(names.str.match(ENSEMBL_ID.pattern).mean()) if len(names) else 0.0


def _text_columns(var: pd.DataFrame) -> dict[str, float]:
    """The var columns holding text, with the fraction of their values that look like Ensembl IDs."""
    out = {}
    for col in var.columns:
        values = var[col]
        if values.dtype.kind == "O" or isinstance(values.dtype, (pd.CategoricalDtype, pd.StringDtype)):
            out[str(col)] = _ensembl_fraction(values.dropna())
    return out


def _check_gene_ids(card: DatasetCard, genes: pd.Index, source_var: pd.DataFrame, where: str) -> None:
    """The var index must hold the declared ``gene_id_type`` (and a symbol column, symbols); anonymous
    features (``none``) are whatever the file calls them."""
    if not len(genes) or card.gene_id_type == "none":
        return
    fraction = _ensembl_fraction(genes)
    looks_ensembl = fraction > ENSEMBL_MAJORITY
    if looks_ensembl != (card.gene_id_type == "ensembl"):
        names = pd.Index(genes).astype(str)
        matching = names.str.match(ENSEMBL_ID.pattern)
        shown = _examples(names[matching] if looks_ensembl else names[~matching], 5)
        columns = _text_columns(source_var)
        if looks_ensembl:
            symbols = [c for c, f in columns.items() if f <= ENSEMBL_MAJORITY]
            fix = ("set gene_id_type: ensembl and gene_symbol_column: the var column with the symbols"
                   + (f" (var columns that may hold them: {symbols})" if symbols else
                      " (the file has no text var column that could hold them: add one upstream)"))
        else:
            ids = [c for c, f in columns.items() if f > ENSEMBL_MAJORITY]
            fix = ("set gene_id_type: symbol (gene_symbol_column is then optional)"
                   + (f"; the Ensembl IDs are in var column(s) {ids}, so alternatively re-index the file by "
                      "them upstream" if ids else ""))
        raise DataError(
            f"the card declares gene_id_type: {card.gene_id_type}, but {fraction:.0%} of the file's "
            f"{len(names)} gene names look like Ensembl IDs (the rule: more than {ENSEMBL_MAJORITY:.0%} "
            f"means Ensembl), e.g. {shown}", where=where, fix=fix)
    col = card.gene_symbol_column
    if col is not None and col in source_var:
        fraction = _ensembl_fraction(source_var[col].dropna())
        if fraction > ENSEMBL_MAJORITY:
            others = [c for c, f in _text_columns(source_var).items() if f <= ENSEMBL_MAJORITY]
            raise DataError(
                f"gene_symbol_column {col!r} holds Ensembl IDs ({fraction:.0%} of its values, e.g. "
                f"{_examples(source_var[col].dropna().astype(str), 3)}), not gene symbols", where=where,
                fix="name the var column that holds gene symbols"
                    + (f" (candidates: {others})" if others else ""))


# --- role columns --------------------------------------------------------------------------------

# How a missing value reads once it has been turned into text (by pandas, numpy or an R export).
_MISSING_TEXT = frozenset({"", "nan", "NaN", "None", "<NA>"})


def _missing(values: pd.Series) -> np.ndarray:
    """Cells whose value is missing: NaN/None/NA, an empty string, or a missing value written as text."""
    missing = values.isna().to_numpy(copy=True)
    text = values[~missing].astype(str).str.strip()
    missing[~missing] = text.isin(_MISSING_TEXT).to_numpy()
    return missing


def _drops_missing_perturbations(card: DatasetCard, role: str) -> bool:
    """A card drops cells without a perturbation label by listing 'nan' in perturbations.exclude_values."""
    return (role == "perturbation" and card.perturbations is not None
            and "nan" in card.perturbations.exclude_values)


def _role_values(raw: ad.AnnData, card: DatasetCard, src, role: str, column: str, where: str):
    """The raw values of one role column, refused if any cell lacks a value."""
    if column in src.obs:
        if src.obs[column].strip() in _MISSING_TEXT:
            raise DataError(f"sources[{src.id}].obs.{column} (roles.{role}) is {src.obs[column]!r}, a "
                            "missing value for every cell", where=where,
                            fix=f"give sources[{src.id}].obs.{column} a value in the card")
        return src.obs[column]
    values = raw.obs[column]
    missing = _missing(values)
    if not missing.any():
        return values.astype(str).to_numpy()
    if _drops_missing_perturbations(card, role):  # spelled 'nan' as before, so exclude_values drops them
        return np.where(missing, "nan", values.astype(str).to_numpy())
    spellings = sorted({str(v) for v in values[missing].astype(str)})
    fix = (f"drop those cells upstream or in the card (sources[{src.id}].exclude: "
           f"{{{column}: {spellings}}}), or fill in their values upstream")
    if role == "cell_type":
        from cellarena.data.labels import UNASSIGNED

        fix += (f"; cells meant to stay unlabeled can be labelled {UNASSIGNED!r} upstream (kept, never "
                "scored)")
    elif role == "perturbation":
        fix += "; or add 'nan' to perturbations.exclude_values to drop cells without a perturbation label"
    n = int(missing.sum())
    raise DataError(f"obs column {column!r} (roles.{role}) has no value for {n} of {raw.n_obs} cells "
                    f"(values {spellings}), e.g. cells {_examples(raw.obs_names[missing])}",
                    where=where, fix=fix)


def _part_meta(adata: ad.AnnData, card: DatasetCard, source, genes, source_var: pd.DataFrame,
               where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The canonical obs (one column per role) and var (genes, and symbols from ``source_var``: the
    var of the matrix the counts come from) of one source's cells."""
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    for role, column in card.role_columns().items():
        if column not in source.obs and column not in adata.obs:
            raise DataError(f"roles.{role} names column {column!r}, which is neither in the file's obs "
                            f"{list(adata.obs.columns)} nor in the source's constant obs {list(source.obs)}",
                            where=where, fix=f"fix roles.{role} in the card")
        obs[role] = _role_values(adata, card, source, role, column, where)
    _check_gene_ids(card, genes, source_var, where)
    var = pd.DataFrame(index=pd.Index(genes.astype(str)))
    if card.gene_id_type == "ensembl" or card.gene_symbol_column:
        col = card.gene_symbol_column
        if col is None or col not in source_var:
            raise DataError(f"gene_symbol_column {col!r} not found in var {list(source_var.columns)}",
                            where=where, fix="name the var column that holds gene symbols")
        var["symbol"] = source_var[col].astype(str).to_numpy()
    return obs, var


def _spec(card: DatasetCard, source):
    return source.counts or (Counts(layer="counts") if source.kind == "derived" else card.counts)


def _part(adata: ad.AnnData, card: DatasetCard, source, where: str) -> ad.AnnData:
    spec = _spec(card, source)
    counts, genes = _counts_matrix(adata, spec, where)
    obs, var = _part_meta(adata, card, source, genes, adata.raw.var if spec.matrix == "raw" else adata.var, where)
    return ad.AnnData(X=counts, obs=obs, var=var)


def _fetched(src, paths: dict, where: str) -> tuple[Path, str]:
    """A source's fetched file (its companions fetched too) and how messages name it."""
    if src.id not in paths:
        raise DataError(f"source {src.id!r} was not fetched", where=where)
    missing = [c.id for c in src.companion_sources() if c.id not in paths]
    if missing:
        raise DataError(f"companion file(s) {missing} of source {src.id!r} were not fetched", where=where,
                        fix="fetch the card again with this version of cellarena (`cellarena fetch`)")
    path = Path(paths[src.id])
    return path, f"{where} (source {src.id}: {path})"


def _kept_cells(names: pd.Index, obs: pd.DataFrame, src, excluded: dict, at: str) -> np.ndarray:
    """The source's cells its ``exclude`` keeps (counted in ``excluded``); its cell IDs must be unique."""
    if names.has_duplicates:
        dup = names[names.duplicated()][:3].tolist()
        raise DataError(f"duplicate cell IDs in source {src.id!r}, e.g. {dup}", where=at,
                        fix="cell IDs must be unique within a file; de-duplicate upstream")
    keep = np.ones(len(names), dtype=bool)
    for column, values in src.exclude.items():
        if column not in obs:
            raise DataError(f"exclude names obs column {column!r}, which the file lacks", where=at,
                            fix=f"fix sources[{src.id}].exclude")
        drop = obs[column].astype(str).isin(values).to_numpy() & keep
        excluded[src.id] = excluded.get(src.id, 0) + int(drop.sum())
        keep &= ~drop
    return keep


def _joined_genes(card: DatasetCard, genes: list[pd.Index], where: str) -> pd.Index:
    """The genes of the prepared file: those every source has (gene_join: inner), or the first
    source's, which every other source must have in the same order."""
    shared = genes[0]
    for src, part in zip(card.sources[1:], genes[1:]):
        if card.gene_join == "inner":
            shared = shared.intersection(part, sort=False)
        elif not part.equals(shared):
            raise DataError(f"source {src.id!r} has different genes from {card.sources[0].id!r}",
                            where=where, fix="give every source the same genes, or set gene_join: inner")
    if card.gene_join == "inner" and len(shared) == 0:
        raise DataError("the sources share no genes", where=where)
    return shared


def _no_duplicate_cells(names: pd.Index, where: str) -> None:
    if names.has_duplicates:
        raise DataError("duplicate cell IDs across sources", where=where,
                        fix="give each source a distinct id (it prefixes the cell IDs)")


def prepare(card: DatasetCard, paths: dict[str, Path], *, card_path: str | Path | None = None) -> ad.AnnData:
    """Build the canonical AnnData from the fetched files ``{source_id: path}``."""
    where = str(card_path or f"datasets/{card.id}.yaml")
    parts = []
    excluded: dict[str, int] = {}
    for src in card.sources:
        path, at = _fetched(src, paths, where)
        companions = {n: Path(paths[f"{src.id}__{n}"]) for n in src.companions()}
        raw = _read_source(path, src, at, companions)
        keep = _kept_cells(raw.obs_names, raw.obs, src, excluded, at)
        if not keep.all():
            raw = raw[keep].copy()
        part = _part(raw, card, src, at)
        if len(card.sources) > 1:
            part.obs_names = [f"{src.id}:{c}" for c in part.obs_names]
        parts.append(part)
    shared = _joined_genes(card, [p.var_names for p in parts], where)
    if card.gene_join == "inner":
        parts = [p[:, shared].copy() for p in parts]
    for part in parts:
        if part.var_names.has_duplicates:
            part.var_names_make_unique()
    adata = ad.concat(parts, axis=0, join="outer", merge="first") if len(parts) > 1 else parts[0]
    _no_duplicate_cells(adata.obs_names, where)

    adata.var, n_dup = _canonical_var(adata.var)
    keep, canonical = _perturbation_keep(card, adata.obs, excluded)
    if not keep.all():
        adata = adata[keep].copy()
    if canonical is not None:
        adata.obs["perturbation"] = canonical
    simulation = None
    if card.simulation is not None:
        from cellarena.data.simulate import simulate_screen

        adata.layers["counts"] = adata.X
        adata = simulate_screen(adata, card.simulation)
        simulation = adata.uns.pop("cellarena_simulation")
        adata.layers.clear()

    label_report = None
    if card.labels.derive is not None:
        from cellarena.data.labels import marker_cluster_labels

        d = card.labels.derive
        labels, label_report = marker_cluster_labels(
            adata.X, adata.var_names.to_numpy(), d.markers, n_clusters=d.n_clusters, n_pcs=d.n_pcs,
            n_hvg=d.n_hvg, seed=d.seed, min_margin=d.min_margin)
        adata.obs["cell_type"] = np.asarray(labels, dtype=str)
    adata.obs = _canonical_obs(adata.obs)
    _check_ontology_covers(card, adata.obs, where)

    adata.layers["counts"] = adata.X
    adata.X = None  # the contract is layers["counts"]; not storing it twice halves the file
    adata.uns["cellarena"] = _uns(card, paths, excluded, n_dup)
    if label_report is not None:
        adata.uns["cellarena"]["label_report"] = label_report.to_json(orient="records")
    if simulation is not None:
        adata.uns["cellarena"]["simulation"] = simulation
    return adata


# --- atlas-sized files: prepared in blocks of cells -------------------------------------------------

STREAM_CELLS = 20_000  # cells read, checked and written at a time


def streamable(card: DatasetCard) -> bool:
    """Whether :func:`prepare_to_file` prepares the card block by block: every source an h5ad file
    whose counts are its X or raw.X, and nothing that needs every cell at once (derived labels, a
    simulated screen)."""
    return (card.simulation is None and card.labels.derive is None
            and all(getattr(s, "format", None) == "h5ad" and s.kind in ("pypi_wheel", "url", "local")
                    and s.obs_file is None and not s.companions() and _spec(card, s).layer is None
                    for s in card.sources))


def prepare_to_file(card: DatasetCard, paths: dict[str, Path], out: str | Path, *,
                    card_path: str | Path | None = None, block_cells: int = STREAM_CELLS) -> ad.AnnData:
    """Prepare ``card`` into the h5ad file ``out``; returns the prepared cells' obs, var and uns.

    A :func:`streamable` card is read, checked and written ``block_cells`` cells at a time, so memory
    does not grow with the number of cells (about the matrix of one block, plus obs and var); the
    file and every refusal are those of :func:`prepare`. Other cards are prepared in memory.
    """
    if not streamable(card):
        adata = prepare(card, paths, card_path=card_path)
        write_h5ad(adata, out)
        return ad.AnnData(obs=adata.obs, var=adata.var, uns=adata.uns)
    return _prepare_in_blocks(card, paths, Path(out), str(card_path or f"datasets/{card.id}.yaml"), block_cells)


def _prepare_in_blocks(card: DatasetCard, paths: dict[str, Path], out: Path, where: str,
                       block_cells: int) -> ad.AnnData:
    from anndata.io import sparse_dataset, write_elem  # noqa: PLC0415

    parts, excluded = [], {}
    try:
        for src in card.sources:
            path, at = _fetched(src, paths, where)
            backed = _read_source(path, src, at, backed=True)
            parts.append({"src": src, "at": at, "backed": backed})
            keep = _kept_cells(backed.obs_names, backed.obs, src, excluded, at)
            spec = _spec(card, src)
            mat, genes, what = _counts_source(backed, spec, at)
            meta = ad.AnnData(obs=backed.obs[keep].copy())  # the kept cells' obs, for their role values
            obs, var = _part_meta(meta, card, src, genes, backed.raw.var if spec.matrix == "raw" else backed.var, at)
            size = _size_factors(backed, spec, at)
            parts[-1].update(rows=np.flatnonzero(keep), mat=mat, what=what, spec=spec, obs=obs, var=var, size=size,
                             names=obs.index.to_numpy())

        shared = _joined_genes(card, [p["var"].index for p in parts], where)
        for part in parts:
            part["cols"] = None if part["var"].index.equals(shared) else part["var"].index.get_indexer(shared)
            var = part["var"].loc[shared] if part["cols"] is not None else part["var"]
            if var.index.has_duplicates:
                var = var.set_axis(ad.utils.make_index_unique(var.index))
            part["var"] = var
            if len(parts) > 1:
                part["obs"].index = [f"{part['src'].id}:{c}" for c in part["obs"].index]
        obs = pd.concat([p["obs"] for p in parts]) if len(parts) > 1 else parts[0]["obs"]
        _no_duplicate_cells(obs.index, where)
        var, n_dup = _canonical_var(parts[0]["var"])
        keep, canonical = _perturbation_keep(card, obs, excluded)
        obs = obs[keep].copy()
        if canonical is not None:
            obs["perturbation"] = canonical
        obs = _canonical_obs(obs)
        _check_ontology_covers(card, obs, where)
        uns = {"cellarena": _uns(card, paths, excluded, n_dup)}

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        offset, written = 0, False
        with h5py.File(tmp, "w") as f:
            for part in parts:
                rows, n_source = part["rows"], int(part["backed"].n_obs)
                n_kept = len(rows)
                kept_here = keep[offset:offset + n_kept]  # after the perturbation labels' filter
                offset += n_kept
                tally = _NonFinite()
                for lo in range(0, n_source, block_cells):
                    hi = min(lo + block_cells, n_source)
                    a, b = np.searchsorted(rows, [lo, hi])
                    if a == b:
                        continue
                    pick = rows[a:b]
                    block = part["mat"][lo:hi][pick - lo]
                    if part["cols"] is not None:
                        block = block[:, part["cols"]]
                    counts = _clean_counts(block, part["spec"], part["at"], what=part["what"],
                                           names=part["names"][a:b], n_cells=n_kept,
                                           size=None if part["size"] is None else part["size"][pick], tally=tally)
                    if counts is None:
                        continue
                    if not kept_here[a:b].all():
                        counts = counts[kept_here[a:b]]
                    if not written:
                        counts.indptr = counts.indptr.astype(np.int64)  # room for more than 2**31 values
                        write_elem(f, "layers", {"counts": counts})
                        written = True
                    elif counts.shape[0]:
                        sparse_dataset(f["layers"]["counts"]).append(counts)
                tally.raise_if_any(part["what"], n_kept, part["at"])
            if not written:
                write_elem(f, "layers", {"counts": sp.csr_matrix((0, len(var)), dtype=np.float32)})
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            write_elem(f, "uns", uns)
            for key in ("obsm", "varm", "obsp", "varp"):
                write_elem(f, key, {})
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        tmp.replace(out)
    except BaseException:
        out.with_name(f".{out.name}.tmp").unlink(missing_ok=True)
        raise
    finally:
        for part in parts:
            part["backed"].file.close()
    return ad.AnnData(obs=obs, var=var, uns=uns)


def _canonical_var(var: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Gene symbols as the index (made unique), the original IDs kept; and how many symbols repeat."""
    original = var.index.astype(str)
    symbols = var["symbol"].astype(str) if "symbol" in var else pd.Series(original, index=original)
    n_dup = int(pd.Index(symbols).duplicated().sum())
    return pd.DataFrame({"original_id": original.to_numpy()},
                        index=ad.utils.make_index_unique(pd.Index(symbols.to_numpy(), name=None))), n_dup


def _perturbation_keep(card: DatasetCard, obs: pd.DataFrame, excluded: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Cells whose perturbation label the card maps (others are dropped and counted in ``excluded``),
    and the kept cells' canonical labels (None without a perturbation role)."""
    if card.perturbations is None or "perturbation" not in obs:
        return np.ones(len(obs), dtype=bool), None
    canonical = obs["perturbation"].astype(str).map(card.perturbations.canonical)
    keep = canonical.notna().to_numpy()
    if not keep.all():
        excluded["perturbation_labels"] = int((~keep).sum())
    return keep, canonical[keep].to_numpy()


def _canonical_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """The role columns only, in the canonical order, as categoricals."""
    obs = obs.copy()
    for role in ROLES:
        if role in obs:
            obs[role] = pd.Categorical(obs[role].astype(str))
    return obs[[r for r in ROLES if r in obs]]


def _uns(card: DatasetCard, paths: dict, excluded: dict, n_dup: int) -> dict:
    return {
        "status": "ok",
        "dataset_id": card.id,
        "dataset_version": card.version,
        "label_quality": card.label_quality,
        "organism": card.organism,
        "gene_id_type": card.gene_id_type,
        "suite_version": SUITE_VERSION,
        "duplicated_gene_symbols": n_dup,
        "excluded_cells": json.dumps(excluded),
        "sources": json.dumps([_source_record(s, paths[s.id]) for s in card.sources]),
        "card": json.dumps(card.model_dump(mode="json"), sort_keys=True),
    }


def _check_ontology_covers(card, obs: pd.DataFrame, where) -> None:
    """A card that maps its labels to Cell Ontology terms must map every label the cells carry (null
    for a label with no term), or the ontology metrics would silently leave cells out."""
    if card.labels.ontology is None or "cell_type" not in obs:
        return
    from cellarena.data.labels import UNASSIGNED  # noqa: PLC0415

    labels = set(obs["cell_type"].astype(str)) - {UNASSIGNED}
    missing = sorted(labels - set(card.labels.ontology))
    if missing:
        raise DataError(f"labels.ontology has no entry for {len(missing)} of the {len(labels)} cell-type labels: "
                        f"{missing[:10]}" + (" ..." if len(missing) > 10 else ""), where=where,
                        fix="add each label under labels.ontology with its CL term, or null where no term fits")


def _source_record(src, path) -> dict:
    """What the provenance keeps of a source: its hash, or for a derived one its parent's provenance."""
    if src.kind == "census":  # its cells' CELLxGENE dataset ids: what the leakage check matches
        from cellarena.data.census import slice_dataset_ids  # noqa: PLC0415

        return {"id": src.id, "kind": src.kind, "sha256": src.sha256, "census_version": src.census_version,
                "filter": src.obs_filter(), "dataset_ids": slice_dataset_ids(path)}
    if src.kind != "derived":
        return {"id": src.id, "kind": src.kind, "sha256": src.sha256}
    parent = read_provenance(path)
    return {"id": src.id, "kind": src.kind, "dataset": parent["dataset_id"],
            "version": parent["dataset_version"], "sources": json.loads(parent["sources"])}


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    """Write atomically: a partial file never has the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    return path


def failed_placeholder(card_id: str, version: int, label_quality: str, reason: str) -> ad.AnnData:
    """An empty prepared dataset that records why preparation failed.

    Downstream jobs read the status and turn it into ``failed`` result rows, so one broken dataset
    costs its own rows and nothing else.
    """
    adata = ad.AnnData(X=None, obs=pd.DataFrame(index=pd.Index([], dtype=str)),
                       var=pd.DataFrame(index=pd.Index([], dtype=str)))
    adata.uns["cellarena"] = {"status": "failed", "reason": reason, "dataset_id": card_id,
                              "dataset_version": version, "label_quality": label_quality,
                              "suite_version": SUITE_VERSION}
    return adata


def read_meta(path: str | Path) -> ad.AnnData:
    """The obs, var and uns of a prepared file, without its counts (anndata's ``backed="r"`` mode
    would read every layer into memory: gigabytes for an atlas)."""
    from anndata.io import read_elem  # noqa: PLC0415

    with h5py.File(path, "r") as f:
        return ad.AnnData(obs=read_elem(f["obs"]), var=read_elem(f["var"]),
                          uns=read_elem(f["uns"]) if "uns" in f else {})


def read_cells(path: str | Path, positions, meta: ad.AnnData | None = None) -> ad.AnnData:
    """The cells at ``positions`` (in that order) of a prepared file, with their counts: only those
    rows are read. ``meta``: the file's :func:`read_meta`, when already read."""
    from anndata.io import sparse_dataset  # noqa: PLC0415

    meta = read_meta(path) if meta is None else meta
    positions = np.asarray(positions, dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    with h5py.File(path, "r") as f:  # prepared counts are CSR (a failed placeholder has none)
        layers = {}
        if "layers" in f and "counts" in f["layers"]:
            layers["counts"] = sparse_dataset(f["layers"]["counts"])[positions[order]][np.argsort(order, kind="stable")]
    return ad.AnnData(obs=meta.obs.iloc[positions].copy(), var=meta.var.copy(), uns=meta.uns, layers=layers)


def read_provenance(path: str | Path) -> dict:
    """:func:`provenance` of a prepared file, read without loading its cells."""
    return provenance(read_meta(path))


def provenance(adata: ad.AnnData) -> dict:
    """The ``uns["cellarena"]`` block of a prepared dataset (raises if the file is not canonical)."""
    try:
        info = dict(adata.uns["cellarena"])
    except KeyError:
        raise DataError("not a prepared dataset (no uns['cellarena'])",
                        fix="run `cellarena prepare` on the card first") from None
    info["dataset_version"] = int(info["dataset_version"])
    return info
