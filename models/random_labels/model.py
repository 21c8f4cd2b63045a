"""Negative control: labels drawn at random with the training class frequencies."""

from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        self._labels = labels

    def predict(self, test, *, solution=None):
        return self.context.rng.choice(self._labels, size=test.n_obs, replace=True)
