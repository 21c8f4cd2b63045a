"""Training-mean baseline: control of the query context + the average training change."""

from __future__ import annotations

import numpy as np

from cellarena.data.perturbation import TrainingProfiles
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.profiles = TrainingProfiles(train)

    def predict_perturbation(self, queries, *, solution=None):
        shift = self.profiles.mean_delta()
        return np.stack([self.profiles.control(c) + shift for c in queries["context"]])
