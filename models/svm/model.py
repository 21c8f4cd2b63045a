"""Linear SVM on log-normalized counts of the training cells' most variable genes."""

from sklearn.svm import LinearSVC

from cellarena.data.features import log_normalize, top_variable_genes
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        p = self.params
        x = log_normalize(train.layers["counts"])
        self._genes = top_variable_genes(x, int(p["n_hvg"]))
        self._clf = LinearSVC(C=float(p["C"]), max_iter=int(p["max_iter"]), random_state=self.context.seed)
        self._clf.fit(x[:, self._genes], labels)

    def predict(self, test, *, solution=None):
        return self._clf.predict(log_normalize(test.layers["counts"])[:, self._genes])
