"""Calls sys.exit(0) in predict: SystemExit is not an Exception, and 0 looks like success."""

import sys

from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        self.n = train.n_obs

    def predict(self, test, *, solution=None):
        sys.exit(0)
