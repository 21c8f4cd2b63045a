"""Negative control: a standard Gaussian embedding, independent of the data."""

from cellarena.plugin import BaseModel


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        return self.context.rng.standard_normal((adata.n_obs, int(self.params["dim"])))
