"""Positive control: cell-type one-hot plus noise, then every dimension centred within each
(batch, cell type): no batch effect of any kind within a cell type, whatever the compositions."""

from __future__ import annotations

import numpy as np

from cellarena.plugin import BaseModel, one_hot, require_batches


def _group_means(emb: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each row's group mean (rows grouped by ``codes``)."""
    sums = np.zeros((codes.max() + 1, emb.shape[1]))
    np.add.at(sums, codes, emb)
    return (sums / np.bincount(codes)[:, None])[codes]


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        if solution is None:
            raise RuntimeError("the batch-free cell-type control needs the solution "
                               "(uses_solution: true in its card)")
        batch = require_batches(adata, "the batch-free control")
        emb = one_hot(solution, adata.n_obs)
        emb = emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
        types = np.asarray(solution).astype(str)
        _, pair = np.unique(np.char.add(np.char.add(np.asarray(batch).astype(str), "\x1f"), types),
                            return_inverse=True)
        _, type_code = np.unique(types, return_inverse=True)
        # every (batch, type) group moved onto its type's mean over all batches: a type's cells have
        # the same mean in every batch. Centring within a batch alone (version 1) moved whole batches
        # by their composition offsets when compositions differ, which made batch structure.
        return emb - _group_means(emb, pair.reshape(-1)) + _group_means(emb, type_code.reshape(-1))
