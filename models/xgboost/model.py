"""XGBoost classifier on PCA of log-normalized counts."""

import numpy as np
from xgboost import XGBClassifier

from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        p = self.params
        self._classes, y = np.unique(labels, return_inverse=True)
        self._pca = LogPCA(p["n_comps"], p["n_hvg"], self.context.seed)
        z = self._pca.fit_transform(train)
        self._clf = None
        if self._classes.size > 1:
            self._clf = XGBClassifier(
                n_estimators=p["n_estimators"], max_depth=p["max_depth"], learning_rate=p["learning_rate"],
                subsample=p["subsample"], min_child_weight=p["min_child_weight"], tree_method="hist",
                device="cuda" if self.context.device.startswith("cuda") else "cpu",
                n_jobs=self.context.threads, random_state=self.context.seed)
            self._clf.fit(z, y)

    def predict(self, test, *, solution=None):
        z = self._pca.transform(test)
        if self._clf is None:  # one class in training: nothing to learn
            return np.repeat(self._classes[0], z.shape[0])
        return self._classes[self._clf.predict(z).astype(int)]
