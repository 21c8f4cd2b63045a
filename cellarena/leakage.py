"""Is an evaluation cell in a pretraining corpus? Cell fingerprints on integer counts.

Two files of the same cells rarely have the same genes (one keeps highly variable genes, another
the intersection of studies), so cells are compared on the genes both files share. A cell's
fingerprint is a 64-bit BLAKE2b hash of its non-zero (gene, count) pairs on those genes, in gene
name order: the same cell gives the same fingerprint in any file that stores its raw counts,
whatever the gene order or the other genes. Cells with fewer than ``min_genes`` non-zero shared
genes are too sparse to tell apart and are counted as undetermined, never as matches.

The fingerprints are small (8 bytes per cell), so a corpus is indexed as a set of integers, not as
its matrices.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import scipy.sparse as sp

MIN_GENES = 5


def _counts(adata) -> sp.csr_matrix:
    m = adata.layers["counts"] if "counts" in adata.layers else adata.X
    return sp.csr_matrix(m)


def fingerprints(adata, genes, *, min_genes: int = MIN_GENES) -> np.ndarray:
    """One ``uint64`` per cell of ``adata`` on ``genes`` (0 for a cell too sparse to tell).

    ``genes`` are var names of ``adata``; they are used in sorted order.
    """
    genes = np.sort(np.asarray(list(genes), dtype=str))
    cols = adata.var_names.get_indexer(genes)
    if (cols < 0).any():
        raise ValueError(f"{int((cols < 0).sum())} genes are not in this AnnData")
    m = _counts(adata)[:, cols].tocsr()
    m.sort_indices()
    out = np.zeros(m.shape[0], dtype=np.uint64)
    indptr, indices = m.indptr, m.indices.astype(np.int32)
    data = np.rint(m.data).astype(np.int64)
    for i in range(m.shape[0]):
        a, b = indptr[i], indptr[i + 1]
        nz = data[a:b] != 0
        if int(nz.sum()) < min_genes:
            continue
        h = hashlib.blake2b(indices[a:b][nz].tobytes(), digest_size=8)
        h.update(data[a:b][nz].tobytes())
        out[i] = max(1, int.from_bytes(h.digest(), "little"))  # 0 is reserved for "undetermined"
    return out


@dataclasses.dataclass(frozen=True)
class Overlap:
    """How many cells of an evaluation set are found in a corpus."""

    n_cells: int  # evaluation cells
    n_found: int  # of them, found in the corpus
    n_undetermined: int  # too sparse on the shared genes to tell
    shared_genes: int
    corpus_mask: np.ndarray  # per corpus cell: True when it is one of the evaluation cells

    @property
    def fraction(self) -> float:
        return self.n_found / self.n_cells if self.n_cells else 0.0

    def summary(self) -> dict:
        return {"n_cells": self.n_cells, "n_found": self.n_found, "fraction": round(self.fraction, 6),
                "n_undetermined": self.n_undetermined, "shared_genes": self.shared_genes}


def overlap(corpus, evaluation, *, min_genes: int = MIN_GENES) -> Overlap:
    """Cells of ``evaluation`` that are also in ``corpus`` (both AnnData with raw counts)."""
    shared = np.intersect1d(np.asarray(corpus.var_names, dtype=str), np.asarray(evaluation.var_names, dtype=str))
    if shared.size == 0:
        return Overlap(evaluation.n_obs, 0, evaluation.n_obs, 0, np.zeros(corpus.n_obs, dtype=bool))
    fc = fingerprints(corpus, shared, min_genes=min_genes)
    fe = fingerprints(evaluation, shared, min_genes=min_genes)
    known = fe[fe != 0]
    found = np.isin(known, fc[fc != 0])
    corpus_mask = (fc != 0) & np.isin(fc, known)
    return Overlap(n_cells=int(evaluation.n_obs), n_found=int(found.sum()),
                   n_undetermined=int((fe == 0).sum()), shared_genes=int(shared.size), corpus_mask=corpus_mask)
