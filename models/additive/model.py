"""Additive baseline: control + the sum of the seen single-target changes."""

from __future__ import annotations

import numpy as np

from cellarena.data.perturbation import TrainingProfiles, targets
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.profiles = TrainingProfiles(train)

    def predict_perturbation(self, queries, *, solution=None):
        out = []
        for context, perturbation in zip(queries["context"], queries["perturbation"]):
            pred = self.profiles.control(context).copy()
            for t in targets(perturbation):
                delta = self.profiles.single_delta(t, context)
                if delta is not None:
                    pred += delta
            out.append(pred)
        return np.stack(out)
