"""Positive control: one-hot of the true cell types plus small Gaussian noise.

The runner hands it the true labels (the solution): its card sets ``uses_solution: true``.
"""

from __future__ import annotations

import numpy as np

from cellarena.plugin import BaseModel


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
            raise RuntimeError("the cell-type embedding control needs the solution "
                               "(uses_solution: true in its card)")
        emb = one_hot(solution, adata.n_obs)
        return emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
