"""Positive control: one-hot of the true cell types plus small Gaussian noise.

The runner hands it the true labels (the solution): its card sets ``uses_solution: true``.
"""

from __future__ import annotations

from cellarena.plugin import BaseModel, one_hot


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        if solution is None:
            raise RuntimeError("the cell-type embedding control needs the solution "
                               "(uses_solution: true in its card)")
        emb = one_hot(solution, adata.n_obs)
        return emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
