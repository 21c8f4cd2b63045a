"""Negative control: the average training change, assigned to randomly permuted genes."""

from __future__ import annotations

import numpy as np

from cellarena.data.perturbation import TrainingProfiles
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit_perturbation(self, train):
        self.profiles = TrainingProfiles(train)
        self.shift = self.profiles.mean_delta()[self.context.rng.permutation(train.n_vars)]

    def predict_perturbation(self, queries, *, solution=None):
        return np.stack([self.profiles.control(c) + self.shift for c in queries["context"]])
