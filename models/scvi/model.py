"""scVI (scvi-tools): a variational autoencoder of raw counts; the embedding is the latent mean.

Trained on the raw counts of the most variable genes of the cells it is given, with ``obs["batch"]``
as the batch covariate when the view has one. Deterministic for a seed on CPU (same thread count).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarena.features import log_normalize, top_variable_genes
from cellarena.plugin import BaseModel, NotApplicable

_QUIET_LOGGERS = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


@contextlib.contextmanager
def _quiet(threads: int):
    """Silence scvi-tools/Lightning chatter and use ``threads`` torch threads; restore both after."""
    import torch  # noqa: PLC0415

    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    torch_threads = torch.get_num_threads()
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        torch.set_num_threads(max(1, int(threads)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(torch_threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _batches(adata: ad.AnnData) -> pd.Series | None:
    """obs["batch"] as strings when it holds at least two batches; None when there is nothing to correct."""
    if "batch" not in adata.obs:
        return None
    batch = adata.obs["batch"]
    if batch.isna().any():
        raise NotApplicable("obs['batch'] has missing values")
    batch = batch.astype(str)
    return batch if batch.nunique() >= 2 else None


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        import scvi  # noqa: PLC0415  (heavy import, only when the model runs)

        p = self.params
        counts = sp.csr_matrix(adata.layers["counts"], dtype=np.float32)
        genes = top_variable_genes(log_normalize(counts), int(p["n_hvg"]))
        x = counts[:, genes].tocsr()
        batch = _batches(adata)
        obs = pd.DataFrame(index=adata.obs_names.astype(str))
        if batch is not None:
            obs["batch"] = pd.Categorical(batch.to_numpy())
        data = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names[genes].astype(str)))
        # A cell with no counts in these genes has no library size to learn from: train on the others,
        # then embed every cell (the encoder reads log1p counts, defined for an empty cell too).
        has_counts = np.asarray(x.sum(axis=1)).ravel() > 0
        if not has_counts.any():
            raise NotApplicable("no cell has counts in the selected genes")
        train = data if has_counts.all() else data[has_counts].copy()

        gpu = str(self.context.device).startswith("cuda")
        with _quiet(self.context.threads):
            scvi.settings.seed = int(self.context.seed)
            scvi.settings.dl_num_workers = 0
            scvi.model.SCVI.setup_anndata(train, batch_key="batch" if batch is not None else None)
            model = scvi.model.SCVI(train, n_latent=int(p["n_latent"]), n_layers=int(p["n_layers"]),
                                    n_hidden=int(p["n_hidden"]), dropout_rate=float(p["dropout_rate"]),
                                    gene_likelihood=str(p["gene_likelihood"]))
            model.train(max_epochs=int(p["max_epochs"]), batch_size=int(p["batch_size"]),
                        train_size=float(p["train_size"]), plan_kwargs={"lr": float(p["lr"])},
                        accelerator="gpu" if gpu else "cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        logger=False, default_root_dir=str(self.context.work_dir))
            z = model.get_latent_representation(data, batch_size=int(p["batch_size"]))
        z = np.asarray(z, dtype=np.float32)
        if not np.isfinite(z).all():
            raise RuntimeError("scVI training diverged: the latent representation has non-finite values "
                               "(try a lower lr or fewer epochs)")
        return z
