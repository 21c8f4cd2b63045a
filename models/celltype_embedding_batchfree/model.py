"""Positive control: cell-type one-hot plus noise, then every dimension centred within each batch."""

from __future__ import annotations

import numpy as np

from cellarena.plugin import BaseModel, one_hot, require_batches


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        if solution is None:
            raise RuntimeError("the batch-free cell-type control needs the solution "
                               "(uses_solution: true in its card)")
        batch = require_batches(adata, "the batch-free control")
        emb = one_hot(solution, adata.n_obs)
        emb = emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
        _, codes = np.unique(batch, return_inverse=True)
        codes = codes.reshape(-1)
        sums = np.zeros((codes.max() + 1, emb.shape[1]))
        np.add.at(sums, codes, emb)
        means = sums / np.bincount(codes)[:, None]
        return emb - means[codes] + emb.mean(axis=0)  # every batch's mean becomes the overall mean
