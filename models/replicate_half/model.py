"""Positive control: the mean of a random half of each query's true cells."""

from __future__ import annotations

import numpy as np

from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.n_genes = train.n_vars

    def predict_perturbation(self, queries, *, solution=None):
        if solution is None:
            raise ValueError("the replicate control needs the true cells (uses_solution)")
        rng = self.context.rng
        out = []
        for cells in solution:
            half = rng.permutation(cells.shape[0])[: max(1, cells.shape[0] // 2)]
            out.append(np.asarray(cells)[half].mean(axis=0))
        return np.stack(out)
