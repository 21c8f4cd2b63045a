"""Logistic regression on PCA of log-normalized counts."""

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        p = self.params
        self._pca = LogPCA(p["n_comps"], p["n_hvg"], self.context.seed)
        self._clf = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=p["C"], max_iter=p["max_iter"], random_state=self.context.seed))
        self._clf.fit(self._pca.fit_transform(train), labels)

    def predict(self, test, *, solution=None):
        return self._clf.predict(self._pca.transform(test))
