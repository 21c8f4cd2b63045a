"""No-change baseline: each query's prediction is its context's control mean."""

from __future__ import annotations

import numpy as np

from cellarena.data.perturbation import TrainingProfiles
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.profiles = TrainingProfiles(train)

    def predict_perturbation(self, queries, *, solution=None):
        return np.stack([self.profiles.control(c) for c in queries["context"]])
