"""Integration metrics: the wrappers agree with scib-metrics called directly, order embeddings
sensibly, and leave out what their inputs cannot define."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest

from cellarena.metrics import integration as I

N_PER = 50  # cells per (cell type, batch): 3 x 2 x 50 = 300 cells
D = 8
BIO = ["isolated_labels", "nmi", "ari", "silhouette_label", "clisi"]
BATCH = ["silhouette_batch", "ilisi", "kbet", "graph_connectivity", "pcr_comparison"]


def make_data(*, type_sep=6.0, batch_shift=1.5, seed=0):
    """3 cell types x 2 batches of Gaussian blobs; the batch shifts every cell by one vector."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.array(["B", "NK", "T"]), 2 * N_PER)
    batch = np.tile(np.repeat(np.array(["b1", "b2"]), N_PER), 3)
    centers = rng.normal(0.0, type_sep, size=(3, D))
    shifts = np.array([np.zeros(D), np.full(D, batch_shift / np.sqrt(D))])
    X = centers[np.searchsorted(["B", "NK", "T"], types)] + shifts[(batch == "b2").astype(int)]
    X = X + rng.normal(size=X.shape)
    return X.astype(np.float32), types, batch


@pytest.fixture(scope="module")
def scib():
    I.configure_jax_cache()
    import scib_metrics

    return scib_metrics


@pytest.fixture(scope="module")
def data():
    X, labels, batch = make_data()
    # "unintegrated": the same cells with a strong batch shift
    X_pre, _, _ = make_data(batch_shift=8.0)
    return X, labels, batch, X_pre


@pytest.fixture(scope="module")
def scored(data, scib):
    X, labels, batch, X_pre = data
    return I.score_integration(X, labels, batch, X_unintegrated=X_pre, include_kbet=True)


@pytest.fixture(scope="module")
def nn(data, scib):
    return I.neighbors(data[0])


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

def test_registry_ids_groups_directions():
    assert list(I.METRICS) == BIO + BATCH
    for mid, spec in I.METRICS.items():
        assert spec.id == mid
        assert spec.group == ("bio" if mid in BIO else "batch")
        assert spec.higher_is_better is True
        assert spec.range == ((-0.5, 1.0) if mid == "ari" else (0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# neighbours
# ---------------------------------------------------------------------------------------------

def test_neighbors_exact_self_first(data, nn, scib):
    X = data[0]
    assert nn.indices.shape == (300, 90) and nn.distances.shape == (300, 90)
    np.testing.assert_array_equal(nn.indices[:, 0], np.arange(300))
    np.testing.assert_array_equal(nn.distances[:, 0], 0.0)
    assert (np.diff(nn.distances, axis=1) >= 0).all()
    # brute force
    d = np.sqrt(((X[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(nn.distances, np.sort(d, axis=1)[:, :90], atol=1e-4)
    # scib-metrics' own JAX search (exact on CPU) finds the same neighbour sets
    ref = scib.nearest_neighbors.jax_approx_min_k(X, 90)
    np.testing.assert_allclose(np.sort(ref.distances, axis=1), nn.distances, atol=1e-3)
    same = [len(set(a) & set(b)) for a, b in zip(ref.indices, nn.indices)]
    assert np.mean(same) > 89.9


def test_neighbors_duplicates_and_clipping(scib):
    X = np.zeros((5, 3), dtype=np.float32)  # every cell identical
    nn = I.neighbors(X, n_neighbors=90)
    assert nn.indices.shape == (5, 5)
    np.testing.assert_array_equal(nn.indices[:, 0], np.arange(5))
    assert all(sorted(row) == list(range(5)) for row in nn.indices)


# ---------------------------------------------------------------------------------------------
# agreement with scib-metrics called directly
# ---------------------------------------------------------------------------------------------

def test_score_integration_matches_scib(data, nn, scored, scib):
    X, labels, batch, X_pre = data
    ref_nmi_ari = scib.nmi_ari_cluster_labels_kmeans(X, labels)
    exact = mock.patch.object(scib.nearest_neighbors, "pynndescent",
                              lambda E, n_neighbors, **kw: I.neighbors(E, n_neighbors))
    with exact:
        ref_kbet = scib.kbet_per_label(nn.subset_neighbors(50), batch, labels)
    expected = {
        "isolated_labels": scib.isolated_labels(X, labels, batch),
        "nmi": ref_nmi_ari["nmi"],
        "ari": ref_nmi_ari["ari"],
        "silhouette_label": scib.silhouette_label(X, labels),
        "clisi": scib.clisi_knn(nn, labels),
        "silhouette_batch": scib.silhouette_batch(X, labels, batch),
        "ilisi": scib.ilisi_knn(nn, batch),
        "kbet": ref_kbet,
        "graph_connectivity": scib.graph_connectivity(nn.subset_neighbors(15), labels),
        "pcr_comparison": scib.pcr_comparison(X_pre, X, batch, categorical=True),
    }
    assert list(scored) == list(expected)
    for mid, value in expected.items():
        np.testing.assert_allclose(scored[mid], float(value), rtol=1e-5, atol=1e-6, err_msg=mid)
    assert all(isinstance(v, float) for v in scored.values())


def test_values_are_pinned(scored):
    # Regression pins for this seeded data set (scib-metrics 0.5.10, CPU): three well separated
    # types, so clustering is perfect; the mild batch shift leaves batches partly unmixed. Every
    # label is seen in both batches, so all are "isolated" and isolated_labels = silhouette_label.
    expected = {"isolated_labels": 0.88278, "nmi": 1.0, "ari": 1.0, "silhouette_label": 0.88278,
                "clisi": 1.0, "silhouette_batch": 0.89347, "ilisi": 0.74374, "kbet": 0.56333,
                "graph_connectivity": 0.97667, "pcr_comparison": 0.94799}
    assert scored == pytest.approx(expected, abs=2e-4)


def test_single_metric_functions_match_scib(data, nn, scib):
    X, labels, batch, X_pre = data
    np.testing.assert_allclose(I.isolated_labels(X, labels, batch), scib.isolated_labels(X, labels, batch), rtol=1e-6)
    np.testing.assert_allclose(I.silhouette_label(X, labels), scib.silhouette_label(X, labels), rtol=1e-6)
    np.testing.assert_allclose(I.clisi(X, labels), scib.clisi_knn(nn, labels), rtol=1e-6)  # builds its own graph
    np.testing.assert_allclose(I.ilisi(X, batch, nn=nn), scib.ilisi_knn(nn, batch), rtol=1e-6)
    np.testing.assert_allclose(I.graph_connectivity(X, labels, nn=nn),
                               scib.graph_connectivity(nn.subset_neighbors(15), labels), rtol=1e-6)
    np.testing.assert_allclose(I.silhouette_batch(X, labels, batch), scib.silhouette_batch(X, labels, batch),
                               rtol=1e-6)
    np.testing.assert_allclose(I.pcr_comparison(X, batch, X_pre),
                               scib.pcr_comparison(X_pre, X, batch, categorical=True), rtol=1e-6)
    ref = scib.nmi_ari_cluster_labels_kmeans(X, labels)
    assert I.nmi(X, labels) == pytest.approx(ref["nmi"]) and I.ari(X, labels) == pytest.approx(ref["ari"])


def test_isolated_labels_with_an_isolated_type(data, scib):
    # relabel the batch of every T cell as b1: T is then the only label seen in one batch
    X, labels, batch, _ = data
    batch = np.where(labels == "T", "b1", batch)
    got = I.score_integration(X, labels, batch)["isolated_labels"]
    np.testing.assert_allclose(got, scib.isolated_labels(X, labels, batch), rtol=1e-6)
    sil = (scib.utils.silhouette_samples(X, labels) + 1) / 2
    np.testing.assert_allclose(got, sil[labels == "T"].mean(), rtol=1e-6)
    assert got != pytest.approx(I.silhouette_label(X, labels))


def test_kmeans_seed(data, scib):
    X, labels, _, _ = data
    a = I.nmi_ari_kmeans(X, labels, seed=1)
    assert a == I.nmi_ari_kmeans(X, labels, seed=1)
    assert a["nmi"] == pytest.approx(1.0)  # well separated: any seed finds the types
    # overlapping types: the clustering is not trivial, and KMEANS_MAX_ITER (a minimum number of
    # Lloyd steps in scib-metrics' KMeans) still reaches the library default's result
    X, labels, _ = make_data(type_sep=1.0, seed=5)
    ref = scib.nmi_ari_cluster_labels_kmeans(X, labels)
    assert 0.05 < ref["nmi"] < 0.9
    assert I.nmi_ari_kmeans(X, labels) == pytest.approx(ref, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# ordering sanity
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_embeddings(scib):
    _, labels, batch = make_data()
    rng = np.random.default_rng(7)
    perfect, _, _ = make_data(batch_shift=0.0)
    random = rng.normal(size=perfect.shape).astype(np.float32)
    batch_only = (np.where(batch == "b2", 4.0, 0.0)[:, None] + rng.normal(size=perfect.shape)).astype(np.float32)
    unintegrated, _, _ = make_data(batch_shift=8.0)
    with warnings.catch_warnings():  # scib-metrics warns when it clips a negative PCR score to 0
        warnings.simplefilter("ignore", UserWarning)
        return {name: I.score_integration(X, labels, batch, X_unintegrated=unintegrated, include_kbet=True)
                for name, X in [("perfect", perfect), ("random", random), ("batch_only", batch_only)]}


def test_perfect_beats_random(three_embeddings):
    perfect, random = three_embeddings["perfect"], three_embeddings["random"]
    for mid in BIO:
        assert perfect[mid] > random[mid] + 0.3, mid
    # A random embedding mixes batches perfectly, so its batch-mixing scores (silhouette_batch,
    # iLISI, kBET, PCR) are near-perfect as well; cell types fall apart in its kNN graph, though.
    assert perfect["graph_connectivity"] > random["graph_connectivity"] + 0.1
    for mid in BATCH:
        assert perfect[mid] > 0.9, mid
    assert np.mean([perfect[m] for m in BATCH]) > np.mean([random[m] for m in BATCH])
    assert np.mean([perfect[m] for m in BIO]) > 0.9 > 0.5 > np.mean([random[m] for m in BIO])


def test_batch_only_scores_badly_on_batch(three_embeddings):
    perfect, batch_only = three_embeddings["perfect"], three_embeddings["batch_only"]
    for mid in ["silhouette_batch", "ilisi", "kbet", "pcr_comparison"]:
        assert batch_only[mid] < perfect[mid] - 0.3, mid
    assert batch_only["ilisi"] < 0.05
    assert batch_only["kbet"] < 0.2
    assert batch_only["nmi"] < 0.1


# ---------------------------------------------------------------------------------------------
# omitted metrics
# ---------------------------------------------------------------------------------------------

def test_omissions(data, scib):
    X, labels, batch, X_pre = data
    default = I.score_integration(X, labels, batch)
    assert list(default) == BIO + ["silhouette_batch", "ilisi", "graph_connectivity"]  # no kbet, no pcr
    one_batch = I.score_integration(X, labels, np.full(len(X), "only"), X_unintegrated=X_pre, include_kbet=True)
    assert list(one_batch) == ["nmi", "ari", "silhouette_label", "clisi"]
    assert I.score_integration(X, labels, None) == one_batch
    one_label = I.score_integration(X, np.full(len(X), "x"), batch, X_unintegrated=X_pre)
    assert list(one_label) == ["silhouette_batch", "ilisi", "graph_connectivity", "pcr_comparison"]
    # batches never share a label: no within-label batch comparison is possible
    confounded = np.where(labels == "B", "b1", "b2")
    assert list(I.score_integration(X, labels, confounded, include_kbet=True)) == \
        BIO + ["ilisi", "graph_connectivity"]
    with pytest.raises(ValueError, match="at least two batches"):
        I.silhouette_batch(X, labels, confounded)


def test_input_checks(data):
    X, labels, batch, _ = data
    with pytest.raises(ValueError, match="entries"):
        I.score_integration(X, labels[:-1], batch)
    with pytest.raises(ValueError, match="missing"):
        I.score_integration(X, np.where(labels == "B", None, labels), batch)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        I.score_integration(bad, labels, batch)


# ---------------------------------------------------------------------------------------------
# JAX cache
# ---------------------------------------------------------------------------------------------

def test_jax_cache_writes_entries(tmp_path, repo):
    """In a fresh process, a tiny jitted function lands in $CELLARENA_JAX_CACHE."""
    code = ("from metrics.integration import configure_jax_cache; p = configure_jax_cache(); "
            "import jax, jax.numpy as jnp; jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready(); "
            "print(p, jax.config.jax_compilation_cache_dir)")
    env = {**os.environ, "CELLARENA_JAX_CACHE": str(tmp_path / "jc"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(tmp_path / "jc")] * 2
    assert any(p.is_file() for p in (tmp_path / "jc").rglob("*"))
