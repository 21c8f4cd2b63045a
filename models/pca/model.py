"""Unintegrated PCA of log-normalized counts on the most variable genes (fit on all cells embedded)."""

from threadpoolctl import threadpool_limits

from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        p = self.params
        # BLAS libraries loaded with this plug-in (scipy's OpenBLAS) were not there when the runner
        # set its thread limit; limit them too, so the result does not depend on the machine's cores.
        with threadpool_limits(self.context.threads):
            return LogPCA(int(p["n_comps"]), int(p["n_hvg"]), self.context.seed).fit_transform(adata)
