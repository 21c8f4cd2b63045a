"""Positive control: cell-type one-hot plus noise, then every dimension centred within each batch."""

from __future__ import annotations

import numpy as np

from cellarena.plugin import BaseModel, NotApplicable


def _batches(adata) -> np.ndarray:
    """obs["batch"] as strings; NotApplicable unless there are at least two batches."""
    if "batch" not in adata.obs:
        raise NotApplicable("the batch-free control needs a batch (obs['batch']) and this dataset has none")
    batch = adata.obs["batch"]
    if batch.isna().any():
        raise NotApplicable("obs['batch'] has missing values")
    batch = batch.astype(str).to_numpy()
    if np.unique(batch).size < 2:
        raise NotApplicable("the batch-free control needs at least two batches; obs['batch'] has one")
    return batch


def one_hot(values, n_expected: int) -> np.ndarray:
    """One column per distinct value (sorted), 1.0 where a cell has that value."""
    values = np.asarray(values).astype(str)
    if values.ndim != 1 or values.shape[0] != n_expected:
        raise ValueError(f"expected {n_expected} labels, one per cell; got shape {values.shape}")
    levels, codes = np.unique(values, return_inverse=True)
    out = np.zeros((values.shape[0], levels.size))
    out[np.arange(values.shape[0]), codes.reshape(-1)] = 1.0
    return out


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        if solution is None:
            raise RuntimeError("the batch-free cell-type control needs the solution "
                               "(uses_solution: true in its card)")
        batch = _batches(adata)
        emb = one_hot(solution, adata.n_obs)
        emb = emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
        _, codes = np.unique(batch, return_inverse=True)
        codes = codes.reshape(-1)
        sums = np.zeros((codes.max() + 1, emb.shape[1]))
        np.add.at(sums, codes, emb)
        means = sums / np.bincount(codes)[:, None]
        return emb - means[codes] + emb.mean(axis=0)  # every batch's mean becomes the overall mean
