"""Negative control: one-hot of the batch plus small Gaussian noise (perfect batch signal, no biology)."""

from __future__ import annotations

import numpy as np

from cellarena.plugin import BaseModel, NotApplicable


def _batches(adata) -> np.ndarray:
    """obs["batch"] as strings; NotApplicable unless there are at least two batches."""
    if "batch" not in adata.obs:
        raise NotApplicable("the batch-embedding control needs a batch (obs['batch']) "
                            "and this dataset has none")
    batch = adata.obs["batch"]
    if batch.isna().any():
        raise NotApplicable("obs['batch'] has missing values")
    batch = batch.astype(str).to_numpy()
    if np.unique(batch).size < 2:
        raise NotApplicable("the batch-embedding control needs at least two batches; obs['batch'] has one")
    return batch


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        batch = _batches(adata)
        levels, codes = np.unique(batch, return_inverse=True)
        emb = np.zeros((adata.n_obs, levels.size))
        emb[np.arange(adata.n_obs), codes.reshape(-1)] = 1.0
        return emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
