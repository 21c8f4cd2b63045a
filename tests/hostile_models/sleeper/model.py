"""Never returns: the run's time limit (resources.time_limit_s in model.yaml) must stop it."""

import time

from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        while True:
            time.sleep(1)

    def predict(self, test, *, solution=None):
        raise AssertionError("never reached")
