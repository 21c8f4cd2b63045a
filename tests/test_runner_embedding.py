"""The runner on the embedding tasks (integration, zero-shot): views, checks, statuses."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

from cellarena import results
from cellarena.errors import CardError
from cellarena.cards.model import load_model_card
from cellarena.run import run_task
from cellarena.data.splits import SplitSpec, make_split, write_split

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
def prepared(tmp_path, small_adata, prepare_local):
    path = prepare_local(small_adata(n_cells=120))
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


# --- embed once, score many: the two halves the workflow runs as separate jobs ---------------------

RANDOM = "def embed(self, adata, *, solution=None):\n    return self.context.rng.normal(size=(adata.n_obs, 6))\n"
ORACLE = """
def embed(self, adata, *, solution=None):
    classes, codes = np.unique(solution, return_inverse=True)
    self.context.runtime["kernel"] = "oracle"
    return np.eye(classes.size)[codes] + 0.01 * self.context.rng.normal(size=(adata.n_obs, classes.size))
"""


def test_embeddings_round_trip_and_are_scored_together(prepared, tmp_path):
    from cellarena.run.embedding import embed_cells, score_embeddings
    from cellarena.run.embedding_file import read_embedding, write_embedding
    from cellarena.run.setup import Job

    h5ad, split = prepared
    folders = {
        "rand": _plugin(tmp_path, "rand", RANDOM),
        "oracle": _plugin(tmp_path, "oracle", ORACLE, kind="control", extra="uses_solution: true\n"),
        "boom": _plugin(tmp_path, "boom", "def embed(self, adata, *, solution=None):\n    raise RuntimeError('kaput')\n"),
    }
    runs = []
    for mid, folder in folders.items():
        run = embed_cells(Job.of(h5ad, split, folder, seed=0, options={"batch_role": "condition"}))
        runs.append(read_embedding(write_embedding(run, tmp_path / f"{mid}.npz")))
    assert [r.status for r in runs] == ["ok", "ok", "failed"]
    np.testing.assert_array_equal(runs[0].embedding,
                                  embed_cells(Job.of(h5ad, split, folders["rand"], seed=0, options={"batch_role": "condition"})).embedding)
    rows = score_embeddings("integration", h5ad, split, runs, seed=0, options={"batch_role": "condition"})
    results.validate(rows)
    status = rows.drop_duplicates("model_id").set_index("model_id")
    assert status.loc["boom", "status"] == "failed" and "kaput" in status.loc["boom", "status_reason"]
    assert status.loc["oracle", "runtime_json"] == '{"kernel": "oracle"}'
    assert status.loc["rand", "runtime_json"] == "{}"
    assert (status["wall_s"].drop("boom") >= 0).all()
    nmi = rows[rows.metric_id == "nmi"].set_index("model_id")["value"]
    assert nmi["oracle"] > 0.9 > 0.3 > nmi["rand"]


def test_unassigned_cells_are_not_scored(tmp_path, small_adata, prepare_local):
    from cellarena.run.embedding import embed_cells, score_embeddings
    from cellarena.run.setup import Job

    raw = small_adata(n_cells=120)
    raw.obs["label"] = raw.obs["label"].astype(str)
    raw.obs.iloc[:9, raw.obs.columns.get_loc("label")] = "unassigned"
    h5ad = prepare_local(raw)
    import anndata as ad

    obs = ad.read_h5ad(h5ad).obs
    split = write_split(make_split(obs, dataset_id="toy_set", dataset_version=1, name="all",
                                   spec=SplitSpec(scheme="all"), seed=0), tmp_path / "all.json")
    oracle = _plugin(tmp_path, "oracle", ORACLE, kind="control", extra="uses_solution: true\n")
    run = embed_cells(Job.of(h5ad, split, oracle, seed=0))
    assert run.embedding.shape[0] == 120  # the model embeds every cell ...
    rows = score_embeddings("zero_shot", h5ad, split, [run], seed=0)
    assert set(rows["n_test"]) == {111}  # ... the metrics see only labelled ones
    assert rows.set_index("metric_id").loc["knn_accuracy", "value"] == pytest.approx(1.0)

    strat = write_split(make_split(obs, dataset_id="toy_set", dataset_version=1, name="stratified",
                                   spec=SplitSpec(scheme="stratified"), seed=0), tmp_path / "s.json")
    folder = _plugin(tmp_path, "labels_seen", """
    def fit(self, train, labels):
        assert "unassigned" not in set(labels)
    def predict(self, test, *, solution=None):
        return np.full(test.n_obs, "alpha")
    """, extra="")
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text().replace(
        "tasks: [integration, zero_shot]", "tasks: [annotation]"))
    rows = run_task("annotation", h5ad, strat, folder, seed=0)
    assert _status(rows)[0] == "ok"
    first = rows.iloc[0]
    assert first.n_train + first.n_test == 111


def test_cli_job_sizes_thread_pools_from_threads(prepared, tmp_path):
    import json
    import subprocess
    import sys

    h5ad, split = prepared
    body = """
    def embed(self, adata, *, solution=None):
        import os
        self.context.runtime["openblas"] = os.environ.get("OPENBLAS_NUM_THREADS")
        return self.context.rng.normal(size=(adata.n_obs, 4))
    """
    folder = _plugin(tmp_path, "envspy", body)
    out = tmp_path / "e.npz"
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run([sys.executable, "-m", "cellarena", "embed", "--prepared", str(h5ad), "--split", str(split),
                    "--model", str(folder), "--seed", "0", "--threads", "3", "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True)
    from cellarena.run.embedding_file import read_embedding

    assert json.loads(read_embedding(out).columns["runtime_json"]) == {"openblas": "3"}


def test_an_atlas_is_scored_on_a_seeded_stratified_subsample_that_its_rows_name(prepared, tmp_path):
    """scoring_max_cells: the superlinear embedding metrics see a seeded subsample stratified by cell
    type; the rows say so and count the scored cells; reading from the file (only the scored cells'
    counts) or from cells in memory gives the same numbers."""
    import anndata as ad

    from cellarena.run.embedding import embed_cells, score_embeddings
    from cellarena.run.setup import Job

    h5ad, split = prepared
    options = {"batch_role": "condition"}
    run = embed_cells(Job.of(h5ad, split, _plugin(tmp_path, "oracle", ORACLE, kind="control",
                                                     extra="uses_solution: true\n"), seed=0, options=options))
    full = score_embeddings("integration", h5ad, split, [run], seed=0, options=options)
    in_memory = score_embeddings("integration", ad.read_h5ad(h5ad), split, [run], seed=0, options=options)
    pd.testing.assert_frame_equal(full.drop(columns="created_utc"), in_memory.drop(columns="created_utc"))
    n = int(full["n_test"].iloc[0])
    assert (full["status_reason"] == "").all()

    capped = dict(options, max_cells=n // 2)
    first = score_embeddings("integration", h5ad, split, [run], seed=0, options=capped)
    again = score_embeddings("integration", h5ad, split, [run], seed=0, options=capped)
    other = score_embeddings("integration", h5ad, split, [run], seed=1, options=capped)
    assert set(first["n_test"]) == {n // 2} and (first["status"] == "ok").all()
    assert first["status_reason"].str.contains(f"scored on {n // 2:,} of {n:,} cells").all()
    pd.testing.assert_series_equal(first["value"], again["value"])  # seeded
    assert not np.allclose(first["value"].to_numpy(float), other["value"].to_numpy(float), equal_nan=True)
