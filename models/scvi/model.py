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

from cellarena.data.features import log_normalize, top_variable_genes
from cellarena.plugin import BaseModel, NotApplicable

_QUIET_LOGGERS = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                  "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


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
    """``embed`` (integration, zero-shot), ``fit``/``predict`` (annotation: a logistic regression on
    the latent means of a model trained on the training cells; test cells are mapped by the trained
    encoder) and ``held_out_loss`` (negative ELBO per held-out cell, the label-free tuning objective)."""

    def _data(self, adata, genes=None, use_batch=True):
        """The raw counts of ``genes`` (default: the n_hvg most variable of ``adata``), as scvi-tools wants them."""
        counts = sp.csr_matrix(adata.layers["counts"], dtype=np.float32)
        if genes is None:
            genes = top_variable_genes(log_normalize(counts), int(self.params["n_hvg"]))
        batch = _batches(adata) if use_batch else None
        obs = pd.DataFrame(index=adata.obs_names.astype(str))
        if batch is not None:
            obs["batch"] = pd.Categorical(batch.to_numpy())
        data = ad.AnnData(X=counts[:, genes].tocsr(), obs=obs,
                          var=pd.DataFrame(index=adata.var_names[genes].astype(str)))
        return data, genes, batch is not None

    def _train(self, data, has_batch):
        """Train scVI on the cells of ``data`` that have counts (a cell without counts has no library
        size to learn from; the encoder still embeds it, since it reads log1p counts)."""
        import scvi  # noqa: PLC0415  (heavy import, only when the model runs)

        p = self.params
        has_counts = np.asarray(data.X.sum(axis=1)).ravel() > 0
        if not has_counts.any():
            raise NotApplicable("no cell has counts in the selected genes")
        train = data if has_counts.all() else data[has_counts].copy()
        gpu = str(self.context.device).startswith("cuda")
        scvi.settings.seed = int(self.context.seed)
        scvi.settings.dl_num_workers = 0
        scvi.model.SCVI.setup_anndata(train, batch_key="batch" if has_batch else None)
        model = scvi.model.SCVI(train, n_latent=int(p["n_latent"]), n_layers=int(p["n_layers"]),
                                n_hidden=int(p["n_hidden"]), dropout_rate=float(p["dropout_rate"]),
                                gene_likelihood=str(p["gene_likelihood"]))
        model.train(max_epochs=int(p["max_epochs"]), batch_size=int(p["batch_size"]),
                    train_size=float(p["train_size"]), plan_kwargs={"lr": float(p["lr"])},
                    accelerator="gpu" if gpu else "cpu", devices=1,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    logger=False, default_root_dir=str(self.context.work_dir))
        return model

    def _latent(self, model, data):
        z = np.asarray(model.get_latent_representation(data, batch_size=int(self.params["batch_size"])),
                       dtype=np.float32)
        if not np.isfinite(z).all():
            raise RuntimeError("scVI training diverged: the latent representation has non-finite values "
                               "(try a lower lr or fewer epochs)")
        return z

    def embed(self, adata, *, solution=None):
        data, _, has_batch = self._data(adata)
        with _quiet(self.context.threads):
            return self._latent(self._train(data, has_batch), data)

    def fit(self, train, labels):
        from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
        from sklearn.pipeline import make_pipeline  # noqa: PLC0415
        from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

        # no batch covariate: test cells may come from batches the training cells never had
        data, self._genes, _ = self._data(train, use_batch=False)
        with _quiet(self.context.threads):
            self._model = self._train(data, False)
            z = self._latent(self._model, data)
        self._clf = make_pipeline(StandardScaler(), LogisticRegression(
            C=float(self.params["classifier_C"]), max_iter=1000, random_state=self.context.seed))
        self._clf.fit(z, np.asarray(labels))

    def predict(self, test, *, solution=None):
        data, _, _ = self._data(test, self._genes, use_batch=False)
        with _quiet(self.context.threads):
            z = self._latent(self._model, data)
        return self._clf.predict(z)

    def held_out_loss(self, train, held_out):
        data, genes, has_batch = self._data(train)
        with _quiet(self.context.threads):
            model = self._train(data, has_batch)
            held, _, _ = self._data(held_out, genes, use_batch=has_batch)
            elbo = float(model.get_elbo(held, batch_size=int(self.params["batch_size"])))
        return -elbo  # negative ELBO per cell: lower is better
