"""kNN in perturbation space (unseen perturbations) or in context space (held-out contexts)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellarena.data.perturbation import TrainingProfiles, gene_embedding, perturbation_embedding
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.profiles = TrainingProfiles(train)
        self.genes = pd.Index(train.var_names)
        self.G = gene_embedding(self.profiles, int(self.params.get("pca_dim", 10)))
        self.E = np.stack([perturbation_embedding(p, self.genes, self.G)
                           for p in self.profiles.groups["perturbation"]])

    def _nearest_perturbations(self, perturbation):
        e = perturbation_embedding(perturbation, self.genes, self.G)
        norms = np.linalg.norm(self.E, axis=1) * np.linalg.norm(e)
        if not np.linalg.norm(e) > 0:
            return self.profiles.mean_delta()
        sim = np.divide(self.E @ e, norms, out=np.full(len(self.E), -np.inf), where=norms > 0)
        order = np.lexsort((np.arange(sim.size), -sim))[: int(self.params.get("k", 3))]
        return self.profiles.delta[order].mean(axis=0)

    def _nearest_contexts(self, context, perturbation):
        contexts, deltas = self.profiles.context_deltas(perturbation)
        others = [i for i, c in enumerate(contexts) if c != context] or list(range(len(contexts)))
        ctrl = self.profiles.control(context)
        dist = np.array([np.linalg.norm(self.profiles.control(contexts[i]) - ctrl) for i in others])
        nearest = [others[j] for j in np.lexsort((np.arange(dist.size), dist))[: int(self.params.get("k", 3))]]
        return deltas[nearest].mean(axis=0)

    def predict_perturbation(self, queries, *, solution=None):
        out = []
        for context, perturbation in zip(queries["context"], queries["perturbation"]):
            if self.profiles.seen(perturbation):
                delta = self._nearest_contexts(context, perturbation)
            else:
                delta = self._nearest_perturbations(perturbation)
            out.append(self.profiles.control(context) + delta)
        return np.stack(out)
