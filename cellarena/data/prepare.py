"""Turn fetched raw files into one canonical AnnData per dataset version.

The canonical form, which every task reads:

- ``layers["counts"]``: integer-valued counts (float32 CSR), cells x genes; ``X`` holds the same.
- ``obs``: the canonical role columns that the card maps (``cell_type``, ``batch``, ``donor``,
  ``condition``, ``perturbation``) as categoricals, and nothing else. Perturbation labels are
  canonical: ``ctrl`` or the sorted targets joined by ``+`` (see ``cards.Perturbations``). Cell IDs are unique (prefixed by the source id
  when a card has several sources).
- ``var``: gene symbols as the index; ``var["original_id"]`` keeps the raw file's gene IDs.
- ``uns["cellarena"]``: provenance — card id and version, label quality, each source's sha256.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarena import SUITE_VERSION
from cellarena.cards.dataset import ROLES, Counts, DatasetCard
from cellarena.errors import DataError


def _read_source(path: Path, fmt: str) -> ad.AnnData:
    if fmt == "h5ad":
        with warnings.catch_warnings():  # old files warn about their own layout; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", ad.OldFormatWarning)
            return ad.read_h5ad(path)
    frame = pd.read_csv(path, index_col=0)
    return ad.AnnData(X=sp.csr_matrix(frame.to_numpy(dtype=np.float32)),
                      obs=pd.DataFrame(index=frame.index.astype(str)),
                      var=pd.DataFrame(index=frame.columns.astype(str)))


def _counts_matrix(adata: ad.AnnData, spec, where: str) -> tuple[sp.csr_matrix, pd.Index]:
    if spec.layer is not None:
        if spec.layer not in adata.layers:
            raise DataError(f"counts.layer {spec.layer!r} is not a layer (have {list(adata.layers)})",
                            where=where, fix="name an existing layer")
        mat, genes = adata.layers[spec.layer], adata.var_names
    elif spec.matrix == "raw":
        if adata.raw is None:
            raise DataError("counts.matrix is 'raw' but the file has no .raw", where=where,
                            fix="set counts.matrix: X in the card")
        mat, genes = adata.raw.X, adata.raw.var_names
    else:
        mat, genes = adata.X, adata.var_names
    mat = sp.csr_matrix(mat, dtype=np.float64)
    if spec.transform == "log1p_normalized":
        if spec.size_column not in adata.obs:
            raise DataError(f"counts.size_column {spec.size_column!r} is not an obs column "
                            f"(have {list(adata.obs.columns)})", where=where,
                            fix="name the obs column holding each cell's total counts")
        size = adata.obs[spec.size_column].to_numpy(dtype=np.float64)
        mat.data = np.expm1(mat.data)
        mat = sp.csr_matrix(sp.diags(size / spec.target_sum) @ mat)
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
    return mat.astype(np.float32), genes


def _part(adata: ad.AnnData, card: DatasetCard, source, where: str) -> ad.AnnData:
    spec = source.counts or (Counts(layer="counts") if source.kind == "derived" else card.counts)
    counts, genes = _counts_matrix(adata, spec, where)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    for role, column in card.role_columns().items():
        if column in source.obs:
            obs[role] = source.obs[column]
        elif column in adata.obs:
            obs[role] = adata.obs[column].astype(str).to_numpy()
        else:
            raise DataError(f"roles.{role} names column {column!r}, which is neither in the file's obs "
                            f"{list(adata.obs.columns)} nor in the source's constant obs {list(source.obs)}",
                            where=where, fix=f"fix roles.{role} in the card")
    var = pd.DataFrame(index=pd.Index(genes.astype(str)))
    if card.gene_id_type == "ensembl" or card.gene_symbol_column:
        col = card.gene_symbol_column
        source_var = adata.raw.var if spec.matrix == "raw" else adata.var
        if col is None or col not in source_var:
            raise DataError(f"gene_symbol_column {col!r} not found in var {list(source_var.columns)}",
                            where=where, fix="name the var column that holds gene symbols")
        var["symbol"] = source_var[col].astype(str).to_numpy()
    return ad.AnnData(X=counts, obs=obs, var=var)


def prepare(card: DatasetCard, paths: dict[str, Path], *, card_path: str | Path | None = None) -> ad.AnnData:
    """Build the canonical AnnData from the fetched files ``{source_id: path}``."""
    where = str(card_path or f"datasets/{card.id}.yaml")
    parts = []
    excluded: dict[str, int] = {}
    for src in card.sources:
        if src.id not in paths:
            raise DataError(f"source {src.id!r} was not fetched", where=where)
        raw = _read_source(Path(paths[src.id]), src.format)
        if raw.obs_names.has_duplicates:
            dup = raw.obs_names[raw.obs_names.duplicated()][:3].tolist()
            raise DataError(f"duplicate cell IDs in source {src.id!r}, e.g. {dup}", where=where,
                            fix="cell IDs must be unique within a file; de-duplicate upstream")
        for column, values in src.exclude.items():
            if column not in raw.obs:
                raise DataError(f"exclude names obs column {column!r}, which the file lacks", where=where,
                                fix=f"fix sources[{src.id}].exclude")
            keep = ~raw.obs[column].astype(str).isin(values).to_numpy()
            excluded[src.id] = excluded.get(src.id, 0) + int((~keep).sum())
            raw = raw[keep].copy()
        part = _part(raw, card, src, f"{where} (source {src.id})")
        if len(card.sources) > 1:
            part.obs_names = [f"{src.id}:{c}" for c in part.obs_names]
        parts.append(part)
    first = parts[0].var_names
    if card.gene_join == "inner":
        shared = first
        for part in parts[1:]:
            shared = shared.intersection(part.var_names, sort=False)
        if len(shared) == 0:
            raise DataError("the sources share no genes", where=where)
        parts = [p[:, shared].copy() for p in parts]
    else:
        for src, part in zip(card.sources[1:], parts[1:]):
            if not part.var_names.equals(first):
                raise DataError(f"source {src.id!r} has different genes from {card.sources[0].id!r}",
                                where=where, fix="give every source the same genes, or set gene_join: inner")
    for part in parts:
        if part.var_names.has_duplicates:
            part.var_names_make_unique()
    adata = ad.concat(parts, axis=0, join="outer", merge="first") if len(parts) > 1 else parts[0]
    if adata.obs_names.has_duplicates:
        raise DataError("duplicate cell IDs across sources", where=where,
                        fix="give each source a distinct id (it prefixes the cell IDs)")

    # gene symbols as the index, original IDs kept
    original = adata.var_names.astype(str)
    symbols = adata.var["symbol"].astype(str) if "symbol" in adata.var else pd.Series(original, index=original)
    n_dup = int(pd.Index(symbols).duplicated().sum())
    adata.var = pd.DataFrame({"original_id": original.to_numpy()},
                             index=ad.utils.make_index_unique(pd.Index(symbols.to_numpy(), name=None)))

    if card.perturbations is not None and "perturbation" in adata.obs:
        canonical = adata.obs["perturbation"].astype(str).map(card.perturbations.canonical)
        keep = canonical.notna().to_numpy()
        if not keep.all():
            excluded["perturbation_labels"] = int((~keep).sum())
            adata = adata[keep].copy()
            canonical = canonical[keep]
        adata.obs["perturbation"] = canonical.to_numpy()
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
    for role in ROLES:
        if role in adata.obs:
            adata.obs[role] = pd.Categorical(adata.obs[role].astype(str))
    adata.obs = adata.obs[[r for r in ROLES if r in adata.obs]]

    adata.layers["counts"] = adata.X
    adata.X = None  # the contract is layers["counts"]; not storing it twice halves the file
    adata.uns["cellarena"] = {
        "status": "ok",
        "dataset_id": card.id,
        "dataset_version": card.version,
        "label_quality": card.label_quality,
        "organism": card.organism,
        "suite_version": SUITE_VERSION,
        "duplicated_gene_symbols": n_dup,
        "excluded_cells": json.dumps(excluded),
        "sources": json.dumps([_source_record(s, paths[s.id]) for s in card.sources]),
        "card": json.dumps(card.model_dump(mode="json"), sort_keys=True),
    }
    if label_report is not None:
        adata.uns["cellarena"]["label_report"] = label_report.to_json(orient="records")
    if simulation is not None:
        adata.uns["cellarena"]["simulation"] = simulation
    return adata


def _source_record(src, path) -> dict:
    """What the provenance keeps of a source: its hash, or for a derived one its parent's provenance."""
    if src.kind != "derived":
        return {"id": src.id, "kind": src.kind, "sha256": src.sha256}
    parent = provenance(ad.read_h5ad(path, backed="r"))
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


def provenance(adata: ad.AnnData) -> dict:
    """The ``uns["cellarena"]`` block of a prepared dataset (raises if the file is not canonical)."""
    try:
        info = dict(adata.uns["cellarena"])
    except KeyError:
        raise DataError("not a prepared dataset (no uns['cellarena'])",
                        fix="run `cellarena prepare` on the card first") from None
    info["dataset_version"] = int(info["dataset_version"])
    return info
