"""The runner on the embedding tasks (integration, zero-shot): views, checks, statuses."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from cellarena import results
from cellarena.cards import parse_card
from cellarena.errors import CardError
from cellarena.fetch import sha256_file
from cellarena.models import load_model_card
from cellarena.prepare import prepare, write_h5ad
from cellarena.runner import run_task
from cellarena.splits import SplitSpec, make_split, write_split

CARD = """\
id: {id}
version: "0.1"
name: test embedder
kind: {kind}
tasks: [integration, zero_shot]
citation: test
licence: MIT
"""


@pytest.fixture
def prepared(tmp_path, small_adata):
    raw = tmp_path / "raw.h5ad"
    small_adata(n_cells=120).write_h5ad(raw)
    card = parse_card({
        "id": "toy_set", "version": 1, "title": "toy", "organism": "homo_sapiens", "gene_id_type": "symbol",
        "licence": "CC0", "citation": "nobody",
        "sources": [{"id": "main", "kind": "local", "path": str(raw), "sha256": sha256_file(raw)}],
        "roles": {"cell_type": "label", "condition": "lane"}, "labels": {"quality": "expert"},
    }, where="toy_set.yaml")
    path = write_h5ad(prepare(card, {"main": raw}), tmp_path / "toy_set.h5ad")
    import anndata as ad

    split = make_split(ad.read_h5ad(path).obs, dataset_id="toy_set", dataset_version=1, name="all",
                       spec=SplitSpec(scheme="all"), seed=0)
    return path, write_split(split, tmp_path / "all.json")


def _plugin(tmp_path, model_id, body, kind="baseline", extra=""):
    folder = tmp_path / "models" / model_id
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(CARD.format(id=model_id, kind=kind) + extra)
    (folder / "model.py").write_text(
        "import numpy as np\nfrom cellarena.plugin import BaseModel, NotApplicable\n\n"
        "class Model(BaseModel):\n" + textwrap.indent(textwrap.dedent(body), "    "))
    return folder


def _status(rows):
    results.validate(rows)
    assert rows["status"].nunique() == 1
    return rows["status"].iloc[0], rows["status_reason"].iloc[0]


SPY = """
def embed(self, adata, *, solution=None):
    assert "cell_type" not in adata.obs, "labels leaked into the model's view"
    assert list(adata.obs.columns) == ["batch"] and set(adata.obs["batch"]) == {"b1", "b2"}
    assert adata.layers["counts"].shape == adata.shape and solution is None
    return np.random.default_rng(self.context.seed).normal(size=(adata.n_obs, 8))
"""


def test_integration_view_and_rows(prepared, tmp_path):
    h5ad, split = prepared
    rows = run_task("integration", h5ad, split, _plugin(tmp_path, "spy", SPY), seed=0,
                    options={"batch_role": "condition"})
    assert _status(rows) == ("ok", "")
    groups = rows.drop_duplicates("metric_id").set_index("metric_id")["metric_group"]
    assert {"bio", "batch"} <= set(groups)
    assert rows["n_test"].iloc[0] == 120 and rows["n_train"].iloc[0] == 0


def test_integration_needs_a_batch(prepared, tmp_path):
    h5ad, split = prepared
    status, reason = _status(run_task("integration", h5ad, split, _plugin(tmp_path, "spy", SPY), seed=0))
    assert status == "not_applicable" and "batch" in reason
    status, reason = _status(run_task("integration", h5ad, split, _plugin(tmp_path, "spy2", SPY), seed=0,
                                      options={"batch_role": "donor"}))
    assert status == "not_applicable" and "'donor'" in reason


@pytest.mark.parametrize("ret, message", [
    ("np.full((adata.n_obs, 4), np.nan)", "non-finite"),
    ("np.zeros((adata.n_obs - 1, 4))", "shape"),
    ("np.zeros(adata.n_obs)", "shape"),
    ("np.array([['a'] * 3] * adata.n_obs)", "dtype"),
])
def test_embedding_output_checks(prepared, tmp_path, ret, message):
    h5ad, split = prepared
    folder = _plugin(tmp_path, "sloppy", f"def embed(self, adata, *, solution=None):\n    return {ret}\n")
    status, reason = _status(run_task("zero_shot", h5ad, split, folder, seed=0))
    assert status == "failed" and message in reason


def test_zero_shot_without_batch_has_no_batch_metrics(prepared, tmp_path):
    h5ad, split = prepared
    body = "def embed(self, adata, *, solution=None):\n    return np.random.default_rng(0).normal(size=(adata.n_obs, 5))\n"
    rows = run_task("zero_shot", h5ad, split, _plugin(tmp_path, "emb", body), seed=0)
    assert _status(rows)[0] == "ok"
    assert "batch" not in set(rows["metric_group"])
    assert {"knn_accuracy", "knn_macro_f1"} <= set(rows["metric_id"])


def test_zero_shot_refuses_a_pretrained_model_without_corpus(tmp_path):
    folder = _plugin(tmp_path, "foundation", "pass", kind="transformer")
    with pytest.raises(CardError, match="must declare its pretraining corpus"):
        load_model_card(folder)
    ok = _plugin(tmp_path, "foundation_ok", "pass", kind="transformer",
                 extra="pretraining:\n  corpus: tiny_corpus\n")
    assert load_model_card(ok).pretraining.corpus == "tiny_corpus"


def test_positive_control_gets_labels_only_when_declared(prepared, tmp_path):
    h5ad, split = prepared
    body = """
    def embed(self, adata, *, solution=None):
        classes, codes = np.unique(solution, return_inverse=True)
        return np.eye(classes.size)[codes] + 0.01 * np.random.default_rng(0).normal(size=(adata.n_obs, classes.size))
    """
    folder = _plugin(tmp_path, "oracle", body, kind="control", extra="uses_solution: true\n")
    rows = run_task("zero_shot", h5ad, split, folder, seed=0)
    assert _status(rows)[0] == "ok"
    assert rows.set_index("metric_id").loc["knn_accuracy", "value"] == pytest.approx(1.0)
