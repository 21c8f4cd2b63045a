"""TODO one line: what this plug-in does.

The plug-in only computes. The runner gives it the data, seeds every library from the config, limits
threads, times it, and checks what it returns (shapes, finite values, labels among the training
labels). Raise cellarena.plugin.NotApplicable("why") when an input does not fit the model (organism,
gene identifiers, no batch...); the row then says not_applicable with your reason.

As shipped: a nearest-centroid classifier and a PCA embedding, on log-normalized counts.
"""

import numpy as np

from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel


class Model(BaseModel):
    # self.params: the card's params (tuned or overridden values included)
    # self.context: seed, threads, device ("cpu" or "cuda..."), work_dir (scratch), checkpoint

    # ---- annotation: fit on the training cells, then label the test cells ------------------------
    def fit(self, train, labels):
        """``train.layers["counts"]``: raw integer counts (cells x genes); ``labels``: one cell type
        per training cell (strings). ``train.var_names`` are gene symbols."""
        self._pca = LogPCA(int(self.params["n_comps"]), int(self.params["n_hvg"]), self.context.seed)
        z = self._pca.fit_transform(train)
        self._classes, codes = np.unique(labels, return_inverse=True)
        self._centroids = np.stack([z[codes == i].mean(axis=0) for i in range(self._classes.size)])

    def predict(self, test, *, solution=None):
        """One label per test cell, from the labels fit() received. The test cells carry no labels."""
        z = self._pca.transform(test)
        distance = ((z[:, None, :] - self._centroids[None, :, :]) ** 2).sum(axis=2)
        return self._classes[distance.argmin(axis=1)]

    # ---- integration / zero_shot: one embedding row per cell ------------------------------------
    def embed(self, adata, *, solution=None):
        """An array (n_cells, d) of finite numbers. ``adata.obs["batch"]`` exists when the task has a
        batch; cell types are never given."""
        return LogPCA(int(self.params["n_comps"]), int(self.params["n_hvg"]), self.context.seed).fit_transform(adata)

    # ---- perturbation (declare it in tasks: to use it) --------------------------------------------
    # def fit_perturbation(self, train): ...
    # def predict_perturbation(self, queries, *, solution=None): ...  -> (n_queries, n_genes)
    # See cellarena/plugin.py (BaseModel) and models/additive/model.py for a worked example.
