"""Harmony (harmonypy) on the PCA of log-normalized counts, with obs["batch"] as the covariate."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel, require_batches


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        import harmonypy  # noqa: PLC0415

        p = self.params
        batch = require_batches(adata, "Harmony")
        # BLAS libraries loaded with this plug-in (scipy's OpenBLAS) were not there when the runner
        # set its thread limit; limit them too, so the PCA does not depend on the machine's cores.
        with threadpool_limits(self.context.threads):
            pcs = LogPCA(int(p["n_comps"]), int(p["n_hvg"]), self.context.seed).fit_transform(adata)
        ho = harmonypy.run_harmony(
            pcs, {"batch": batch}, "batch",
            theta=p["theta"], sigma=p["sigma"], nclust=p["nclust"], lamb=p["lamb"],
            max_iter_harmony=int(p["max_iter_harmony"]), max_iter_kmeans=int(p["max_iter_kmeans"]),
            epsilon_cluster=float(p["epsilon_cluster"]), epsilon_harmony=float(p["epsilon_harmony"]),
            verbose=False, random_state=int(self.context.seed), ncores=int(self.context.threads))
        z = np.asarray(ho.Z_corr, dtype=np.float64)
        n, d = pcs.shape
        # harmonypy 2.x returns cells x dims; 0.0.x returned dims x cells. Accept either, never guess.
        if z.shape == (n, d):
            return z
        if z.shape == (d, n):
            return np.ascontiguousarray(z.T)
        raise RuntimeError(f"harmonypy returned Z_corr of shape {z.shape} for {n} cells x {d} components")
