"""CELLxGENE Census as a source: a slice of one release, pinned by a content hash.

A ``census`` source (:class:`cellarena.cards.dataset.CensusSource`) names a dated Census release and
a filter. Fetching opens the release with ``cellxgene_census.open_soma`` (its published location, or
the ``uri`` of a local copy or mirror), reads the slice's raw counts with ``get_anndata``, puts it in
a canonical order (cells and genes by their SOMA join ids) and hashes it (:func:`slice_sha256`): the
card's ``sha256`` must match, as a file's must. The verified slice is cached as an h5ad file, which
prepare then reads like any other.

The CELLxGENE dataset ids of the slice's cells are recorded in the prepared file's provenance, so
the leakage check can match them against a corpus that names a Census release once that corpus is
resolved to dataset ids (:func:`corpus_dataset_ids`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarena.errors import CellarenaError, ChecksumError, DataError

HASH_VERSION = b"cellarena census slice v1\n"  # bump if the canonical form changes


def _open(version: str, uri: str | None, where: str):
    import cellxgene_census  # noqa: PLC0415

    try:
        return cellxgene_census.open_soma(census_version=version, uri=uri)
    except Exception as exc:
        at = uri or "its published location"
        raise CellarenaError(f"cannot open CELLxGENE Census {version} at {at}: {type(exc).__name__}: {exc}",
                             where=where, fix="check the release date and the uri (a local copy must be the "
                                              "SOMA collection of that release); without a uri the network is needed"
                             ) from None


def read_slice(src, organism: str, where: str) -> ad.AnnData:
    """The raw counts and cell metadata of ``src``'s slice, in canonical order."""
    import cellxgene_census  # noqa: PLC0415

    value_filter = src.obs_filter()
    with _open(src.census_version, src.uri, where) as census:
        try:
            adata = cellxgene_census.get_anndata(census, organism, measurement_name="RNA", X_name="raw",
                                                 obs_value_filter=value_filter)
        except Exception as exc:
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # not the C++ trace below it
            said = said if said.startswith(type(exc).__name__) else f"{type(exc).__name__}: {said}"
            raise DataError(f"the Census slice of source {src.id!r} cannot be read with the filter "
                            f"{value_filter!r}: {said}", where=where,
                            fix="check the filter's column names and values against the Census schema "
                                "(obs columns such as dataset_id, tissue_general, cell_type, donor_id)") from None
    if adata.n_obs == 0:
        raise DataError(f"the filter {value_filter!r} selects no cells of Census {src.census_version} "
                        f"({organism})", where=where, fix="check the dataset ids, tissues and cell types")
    return canonical(adata)


def canonical(adata: ad.AnnData) -> ad.AnnData:
    """Cells and genes sorted by SOMA join id; genes named by ``feature_id``; counts as CSR."""
    def order(frame: pd.DataFrame) -> np.ndarray:  # positions, so a repeated index name cannot mix rows up
        return (np.argsort(frame["soma_joinid"].to_numpy(), kind="stable") if "soma_joinid" in frame
                else np.arange(len(frame)))

    out = adata[order(adata.obs)][:, order(adata.var)].copy()
    out.X = sp.csr_matrix(out.X, dtype=np.float32)
    out.X.sort_indices()
    if "soma_joinid" in out.obs:
        out.obs_names = [f"census_{j}" for j in out.obs["soma_joinid"]]
    if "feature_id" in out.var:
        out.var_names = out.var["feature_id"].astype(str).to_numpy()
    return out


def slice_sha256(adata: ad.AnnData) -> str:
    """Content hash of a canonical slice: cell names and every obs column (as text), gene names and
    every var column, and the counts (CSR structure and values). Independent of the file it is kept in."""
    h = hashlib.sha256(HASH_VERSION)

    def text(label: str, values) -> None:
        h.update(f"{label}\0".encode())
        h.update("\x1f".join(pd.Series(values, dtype=object).astype(str)).encode())
        h.update(b"\n")

    text("obs_names", adata.obs_names)
    for column in sorted(adata.obs.columns):
        text(f"obs:{column}", adata.obs[column])
    text("var_names", adata.var_names)
    for column in sorted(adata.var.columns):
        text(f"var:{column}", adata.var[column])
    x = sp.csr_matrix(adata.X)
    x.sort_indices()
    for part in (np.asarray(x.shape, dtype=np.int64), x.indptr.astype(np.int64), x.indices.astype(np.int64),
                 x.data.astype(np.float64)):
        h.update(part.tobytes())
    return h.hexdigest()


def fetch_slice(src, card, cache_dir: Path) -> Path:
    """Read, verify and cache the slice of a census source; returns the cached h5ad (re-verified when
    it is already there)."""
    where = f"datasets/{card.id}.yaml"
    dest = cache_dir / "census" / f"{card.id}-{src.id}-{src.sha256[:16]}.h5ad"
    if dest.is_file():
        try:
            if slice_sha256(ad.read_h5ad(dest)) == src.sha256:
                return dest
        except Exception:  # noqa: BLE001 - a broken cached copy is read again
            pass
        dest.unlink(missing_ok=True)
    adata = read_slice(src, card.organism, where)
    found = slice_sha256(adata)
    if found != src.sha256:
        raise ChecksumError(
            f"the Census slice of source {src.id!r} (release {src.census_version}, filter "
            f"{src.obs_filter()!r}: {adata.n_obs} cells x {adata.n_vars} genes) has content hash {found}; "
            f"the card pins {src.sha256}", where=where,
            fix=f"if the card's release or filter was changed on purpose, set sources[{src.id}].sha256 to {found}; "
                "otherwise the Census copy read is not the release the card was made from")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{os.getpid()}.{dest.name}")
    adata.write_h5ad(tmp)
    tmp.replace(dest)
    return dest


def slice_dataset_ids(path: str | Path) -> list[str]:
    """The CELLxGENE dataset ids of a cached slice's cells."""
    obs = ad.read_h5ad(path, backed="r").obs
    return sorted(obs["dataset_id"].astype(str).unique()) if "dataset_id" in obs else []


def corpus_dataset_ids(census, uri: str | None = None, where: str = "corpus card") -> list[str]:
    """Resolve a corpus's Census release and ``value_filter`` (:class:`cellarena.cards.corpus.Census`)
    to the CELLxGENE dataset ids of its cells: what the corpus card's ``dataset_ids`` should list."""
    if not census.value_filter:
        raise CellarenaError("the corpus names no value_filter to resolve", where=where,
                             fix="write the authors' filter as a SOMA value filter under census.value_filter")
    ids: set[str] = set()
    with _open(census.release, uri, where) as handle:
        for organism in census.organisms:
            obs = handle["census_data"][organism].obs
            table = obs.read(value_filter=census.value_filter, column_names=["dataset_id"]).concat()
            ids.update(table.column("dataset_id").to_pylist())
    return sorted(ids)
