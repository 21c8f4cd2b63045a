"""Negative control: one-hot of the batch plus small Gaussian noise (perfect batch signal, no biology)."""

from __future__ import annotations

from cellarena.plugin import BaseModel, one_hot, require_batches


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        batch = require_batches(adata, "the batch-embedding control")
        emb = one_hot(batch, adata.n_obs)
        return emb + float(self.params["noise_sd"]) * self.context.rng.standard_normal(emb.shape)
