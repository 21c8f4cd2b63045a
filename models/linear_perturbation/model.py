"""Linear perturbation baseline (Ahlmann-Eltze et al. for unseen perturbations; ridge across contexts)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellarena.data.perturbation import TrainingProfiles, gene_embedding, perturbation_embedding
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.profiles = TrainingProfiles(train)
        self.genes = pd.Index(train.var_names)
        k, lam = int(self.params.get("pca_dim", 10)), float(self.params.get("ridge_penalty", 0.1))
        self.G = gene_embedding(self.profiles, k)
        P = np.stack([perturbation_embedding(p, self.genes, self.G) for p in self.profiles.groups["perturbation"]],
                     axis=1)  # K x groups
        Y = self.profiles.delta.T  # genes x groups
        self.center = Y.mean(axis=1)
        eye = np.eye(self.G.shape[1])
        left = np.linalg.solve(self.G.T @ self.G + lam * eye, self.G.T @ (Y - self.center[:, None]))
        self.W = np.linalg.solve(P @ P.T + lam * eye, (left @ P.T).T).T  # K x K

    def _transfer(self, context, perturbation):
        """Change of a perturbation seen in other contexts, predicted from the context's control profile."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge

        contexts, deltas = self.profiles.context_deltas(perturbation)
        others = [i for i, c in enumerate(contexts) if c != context]
        if len(others) < 3:  # too few contexts to regress on: their average change
            return deltas[others or list(range(len(contexts)))].mean(axis=0)
        X = np.stack([self.profiles.control(contexts[i]) for i in others])
        k = min(int(self.params.get("pca_dim", 10)), len(others) - 1)
        pca = PCA(n_components=k, random_state=self.context.seed).fit(X)
        ridge = Ridge(alpha=float(self.params.get("context_alpha", 10.0))).fit(pca.transform(X), deltas[others])
        return ridge.predict(pca.transform(self.profiles.control(context)[None, :]))[0]

    def predict_perturbation(self, queries, *, solution=None):
        out = []
        for context, perturbation in zip(queries["context"], queries["perturbation"]):
            ctrl = self.profiles.control(context)
            if self.profiles.seen(perturbation):
                out.append(ctrl + self._transfer(context, perturbation))
            else:
                p = perturbation_embedding(perturbation, self.genes, self.G)
                out.append(ctrl + self.G @ self.W @ p + self.center)
        return np.stack(out)
