"""k-nearest-neighbour classifier on PCA of log-normalized counts."""

from sklearn.neighbors import KNeighborsClassifier

from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        p = self.params
        self._pca = LogPCA(p["n_comps"], p["n_hvg"], self.context.seed)
        z = self._pca.fit_transform(train)
        k = min(p["n_neighbors"], z.shape[0])
        self._clf = KNeighborsClassifier(n_neighbors=k, weights=p["weights"], metric=p.get("metric", "euclidean"),
                                         n_jobs=self.context.threads)
        self._clf.fit(z, labels)

    def predict(self, test, *, solution=None):
        return self._clf.predict(self._pca.transform(test))
