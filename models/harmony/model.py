"""Harmony (harmonypy) on the PCA of log-normalized counts, with obs["batch"] as the covariate."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from cellarena.features import LogPCA
from cellarena.plugin import BaseModel, NotApplicable


def _batches(adata) -> np.ndarray:
    """obs["batch"] as strings; NotApplicable unless there are at least two batches."""
    if "batch" not in adata.obs:
        raise NotApplicable("Harmony needs a batch (obs['batch']) and this dataset has none")
    batch = adata.obs["batch"]
    if batch.isna().any():
        raise NotApplicable("obs['batch'] has missing values")
    batch = batch.astype(str).to_numpy()
    if np.unique(batch).size < 2:
        raise NotApplicable("Harmony needs at least two batches; obs['batch'] has one")
    return batch


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        import harmonypy  # noqa: PLC0415

        p = self.params
        batch = _batches(adata)
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
