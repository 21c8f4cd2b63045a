"""Is an evaluation cell in a pretraining corpus? The leakage status of a run, the dataset-level check
against a corpus card, and the cell-level check with fingerprints and MinHash sketches.

A run's status (:func:`leakage_status`) is ``no_corpus`` for a model that is not pretrained; for an
in-suite model, the cell-level exclusion its pretraining job recorded; otherwise
the dataset-level check of the dataset's identifiers against the corpus card
(:func:`dataset_leakage`), ``unknown`` when the card is missing.

Two files of the same cells rarely have the same genes (one keeps highly variable genes, another
the intersection of studies), so cells are compared on the genes both files share.

- **Exact fingerprint** (:func:`fingerprints`): a 64-bit hash of a cell's non-zero (gene, integer
  count) pairs on the shared genes. Each pair is hashed from the gene's *name* and the count, and
  the pair hashes are added (mod 2^64), so the fingerprint does not depend on gene order or on the
  genes outside the shared set. The same cell gives the same fingerprint in any file that stores
  its raw counts. Cells with fewer than ``min_genes`` non-zero shared genes are too sparse to tell
  apart and are undetermined (0), never matches.
- **MinHash sketch** (:func:`sketches`): ``k`` minimum hashes of the cell's set of non-zero shared
  genes. Normalizing, log-transforming or scaling a cell changes its values but not which genes
  are non-zero, so a renormalized copy has the same sketch; a lightly subsampled copy a nearly
  equal one. The fraction of equal entries estimates the Jaccard similarity of two gene sets.

Both are computed chunk by chunk with numpy (no per-cell Python loop), and a corpus is indexed by
these numbers only (8 + 4k bytes per cell), never by its matrices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

MIN_GENES = 5
SKETCH_SIZE = 32
NEAR_THRESHOLD = 0.8  # estimated Jaccard of the gene sets at or above which a cell is a near-duplicate
BANDS = 8  # LSH bands of the sketch used to find candidate pairs
EMPTY = np.iinfo(np.uint32).max


def _counts(adata) -> sp.csr_matrix:
    m = adata.layers["counts"] if "counts" in adata.layers else adata.X
    return sp.csr_matrix(m)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective 64-bit mixer (uint64 in, uint64 out, wrapping)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def gene_keys(names) -> np.ndarray:
    """A 64-bit key per gene name (BLAKE2b), the same in every file."""
    return np.array([int.from_bytes(hashlib.blake2b(str(n).encode(), digest_size=8).digest(), "little")
                     for n in names], dtype=np.uint64)


def _shared_matrix(adata, genes) -> tuple[sp.csr_matrix, np.ndarray]:
    genes = np.asarray(list(genes), dtype=str)
    cols = adata.var_names.get_indexer(genes)
    if (cols < 0).any():
        raise ValueError(f"{int((cols < 0).sum())} genes are not in this AnnData")
    m = _counts(adata)[:, cols].tocsr()
    m.eliminate_zeros()
    return m, gene_keys(genes)


def _row_reduce(values: np.ndarray, indptr: np.ndarray, ufunc, empty) -> np.ndarray:
    """``ufunc.reduceat`` per CSR row, with ``empty`` for rows without entries."""
    n = indptr.size - 1
    out = np.full(n, empty, dtype=values.dtype)
    filled = np.diff(indptr) > 0
    if values.size:
        out[filled] = ufunc.reduceat(values, indptr[:-1][filled])
    return out


def fingerprint_matrix(m: sp.csr_matrix, keys: np.ndarray, *, min_genes: int = MIN_GENES) -> np.ndarray:
    """Exact fingerprints of the rows of ``m`` (cells x shared genes, raw counts); ``keys`` per column."""
    m = sp.csr_matrix(m)
    m.eliminate_zeros()
    counts = np.rint(m.data).astype(np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        pair = _mix(keys[m.indices] ^ _mix(counts + np.uint64(0x9E3779B97F4A7C15)))
    out = _row_reduce(pair, m.indptr, np.add, np.uint64(0))
    out[out == 0] = 1  # 0 is reserved for "undetermined"
    out[np.diff(m.indptr) < min_genes] = 0
    return out


def sketch_matrix(m: sp.csr_matrix, keys: np.ndarray, *, k: int = SKETCH_SIZE, min_genes: int = MIN_GENES) -> np.ndarray:
    """MinHash sketches (n_cells, k) ``uint32`` of the rows' non-zero gene sets; ``EMPTY`` rows are
    too sparse to tell (fewer than ``min_genes`` genes)."""
    m = sp.csr_matrix(m)
    m.eliminate_zeros()
    out = np.empty((m.shape[0], k), dtype=np.uint32)
    for j in range(k):
        with np.errstate(over="ignore"):
            h = (_mix(keys ^ _mix(np.uint64(j + 1))) >> np.uint64(32)).astype(np.uint32)
        out[:, j] = _row_reduce(h[m.indices], m.indptr, np.minimum, np.uint32(EMPTY))
    out[np.diff(m.indptr) < min_genes] = EMPTY
    return out


def fingerprints(adata, genes, *, min_genes: int = MIN_GENES) -> np.ndarray:
    """One ``uint64`` per cell of ``adata`` on ``genes`` (var names; any order); 0 = too sparse."""
    m, keys = _shared_matrix(adata, genes)
    return fingerprint_matrix(m, keys, min_genes=min_genes)


def sketches(adata, genes, *, k: int = SKETCH_SIZE, min_genes: int = MIN_GENES) -> np.ndarray:
    """MinHash sketch per cell of ``adata`` on ``genes`` (see :func:`sketch_matrix`)."""
    m, keys = _shared_matrix(adata, genes)
    return sketch_matrix(m, keys, k=k, min_genes=min_genes)


def _band_keys(sk: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of ``k / bands`` sketch entries."""
    n, k = sk.shape
    r = k // bands
    out = np.zeros((n, bands), dtype=np.uint64)
    for b in range(bands):
        acc = np.full(n, np.uint64(b + 1), dtype=np.uint64)
        for j in range(b * r, (b + 1) * r):
            acc = _mix(acc ^ sk[:, j].astype(np.uint64))
        out[:, b] = acc
    return out


def near_duplicates(corpus: np.ndarray, evaluation: np.ndarray, *, threshold: float = NEAR_THRESHOLD,
                    bands: int = BANDS) -> np.ndarray:
    """Per evaluation sketch: the best estimated Jaccard with any corpus sketch found through
    locality-sensitive hashing (cells sharing a whole band), 0 when no candidate reaches
    ``threshold``. Sketches of too-sparse cells never match."""
    best = np.zeros(evaluation.shape[0])
    ok_c = ~(corpus == EMPTY).all(axis=1)
    ok_e = ~(evaluation == EMPTY).all(axis=1)
    if not ok_c.any() or not ok_e.any():
        return best
    c_idx = np.flatnonzero(ok_c)
    c_keys, e_keys = _band_keys(corpus[c_idx], bands), _band_keys(evaluation, bands)
    for b in range(bands):
        order = np.argsort(c_keys[:, b], kind="stable")
        sorted_keys = c_keys[order, b]
        lo = np.searchsorted(sorted_keys, e_keys[:, b], side="left")
        hi = np.searchsorted(sorted_keys, e_keys[:, b], side="right")
        for i in np.flatnonzero(ok_e & (hi > lo)):
            cand = c_idx[order[lo[i]:hi[i]]]
            sim = (corpus[cand] == evaluation[i]).mean(axis=1).max()
            best[i] = max(best[i], sim)
    return np.where(best >= threshold, best, 0.0)


@dataclasses.dataclass(frozen=True)
class Overlap:
    """How many cells of an evaluation set are found in a corpus."""

    n_cells: int  # evaluation cells
    n_found: int  # of them, found in the corpus
    n_undetermined: int  # too sparse on the shared genes to tell
    shared_genes: int
    corpus_mask: np.ndarray  # per corpus cell: True when it is one of the evaluation cells
    n_near: int = 0  # further evaluation cells whose gene set has a near-duplicate in the corpus

    @property
    def fraction(self) -> float:
        return self.n_found / self.n_cells if self.n_cells else 0.0

    @property
    def near_fraction(self) -> float:
        return self.n_near / self.n_cells if self.n_cells else 0.0

    def summary(self) -> dict:
        return {"n_cells": self.n_cells, "n_found": self.n_found, "fraction": round(self.fraction, 6),
                "n_near": self.n_near, "near_fraction": round(self.near_fraction, 6),
                "n_undetermined": self.n_undetermined, "shared_genes": self.shared_genes}


def overlap(corpus, evaluation, *, min_genes: int = MIN_GENES, near: bool = False,
            threshold: float = NEAR_THRESHOLD) -> Overlap:
    """Cells of ``evaluation`` that are also in ``corpus`` (both AnnData with raw counts).

    ``near``: also count evaluation cells without an exact match whose gene-set sketch has a
    near-duplicate in the corpus (renormalized or subsampled copies) as ``n_near``.
    """
    shared = np.intersect1d(np.asarray(corpus.var_names, dtype=str), np.asarray(evaluation.var_names, dtype=str))
    if shared.size == 0:
        return Overlap(evaluation.n_obs, 0, evaluation.n_obs, 0, np.zeros(corpus.n_obs, dtype=bool))
    fc = fingerprints(corpus, shared, min_genes=min_genes)
    fe = fingerprints(evaluation, shared, min_genes=min_genes)
    known = fe[fe != 0]
    found = np.isin(known, fc[fc != 0])
    corpus_mask = (fc != 0) & np.isin(fc, known)
    n_near = 0
    if near:
        exact = (fe != 0) & np.isin(fe, fc[fc != 0])
        sim = near_duplicates(sketches(corpus, shared, min_genes=min_genes),
                              sketches(evaluation, shared, min_genes=min_genes), threshold=threshold)
        n_near = int(((sim > 0) & ~exact).sum())
    return Overlap(n_cells=int(evaluation.n_obs), n_found=int(found.sum()),
                   n_undetermined=int((fe == 0).sum()), shared_genes=int(shared.size), corpus_mask=corpus_mask,
                   n_near=n_near)


# --------------------------------------------------------------------------------------------------
# the leakage status of a run
# --------------------------------------------------------------------------------------------------

LEAKAGE_STATUSES = ("clean", "leaked", "unknown")


def dataset_leakage(dataset, corpus, census_ids: list[str] | tuple = ()) -> tuple[str, list[str]]:
    """Dataset-level leakage of ``dataset`` in ``corpus``: (status, matching identifiers).

    ``census_ids``: the CELLxGENE dataset ids of the dataset's cells where they come from the Census
    (the prepared file's provenance), matched like ``cellxgene_dataset`` identifiers.

    ``leaked`` when any of the dataset's identifiers (type and value, case-insensitive) is one the
    corpus contains, or is among the dataset ids its Census release was resolved to, or, for an
    in-suite corpus, when the dataset is one of its datasets; ``clean`` when none matches and the
    corpus is an exact list, or a resolved Census release and every cell's dataset id is known (the
    data come from the Census); ``unknown`` otherwise (a Census release not resolved to dataset IDs,
    or the studies a paper names).
    """
    theirs = {(c.type, c.value.strip().lower()) for c in corpus.contains}
    resolved = corpus.census.dataset_ids if corpus.census is not None else []
    theirs |= {("cellxgene_dataset", d.strip().lower()) for d in resolved}
    ours = [(i.type, i.value) for i in dataset.identifiers] + [("cellxgene_dataset", d) for d in census_ids]
    hits = list(dict.fromkeys(f"{t}:{v}" for t, v in ours if (t, v.strip().lower()) in theirs))
    if dataset.id in corpus.datasets:
        hits.append(f"dataset:{dataset.id}")
    if hits:
        return "leaked", hits
    if corpus.confidence == "exact" or (resolved and census_ids and all(s.kind == "census" for s in dataset.sources)):
        return "clean", []
    return "unknown", []


def leakage_status(card, info: dict, datasets_dir: str | Path, exclusion: dict | None = None
                   ) -> tuple[str, float]:
    """(leakage, leaked_fraction) of the model of ``card`` on a prepared dataset (``info``: its provenance).

    - a model without a pretraining corpus: ``no_corpus``;
    - an in-suite model with the ``exclusion`` its pretraining job recorded (the checkpoint card's
      ``extra.exclusion``): the cell-level check of this dataset (``clean`` when no evaluation cell
      was left in the corpus, with the fraction);
    - otherwise :func:`dataset_leakage` with the corpus card in ``datasets_dir``/corpora; ``unknown``
      when it is missing.
    """
    if card.pretraining is None:
        return "no_corpus", float("nan")
    after = (exclusion or {}).get("datasets", {}).get(info.get("dataset_id"), {}).get("after")
    if after and after.get("n_cells"):
        fraction = after["n_found"] / after["n_cells"]
        return ("clean" if after["n_found"] == 0 else "leaked"), float(fraction)
    from cellarena.cards.corpus import corpus_path, load_corpus  # noqa: PLC0415
    from cellarena.cards.dataset import DatasetCard  # noqa: PLC0415
    from cellarena.errors import CardError  # noqa: PLC0415

    try:
        dataset = DatasetCard.model_validate(json.loads(info["card"]))
        corpus = load_corpus(corpus_path(datasets_dir, card.pretraining.corpus))
    except (KeyError, ValueError, CardError):
        return "unknown", float("nan")
    census_ids = [d for record in json.loads(info.get("sources") or "[]") if record.get("kind") == "census"
                  for d in record.get("dataset_ids", [])]
    return dataset_leakage(dataset, corpus, census_ids)[0], float("nan")
