"""Tests for cellarena.data.labels on small synthetic count matrices (no external data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.data.labels import marker_cluster_labels, normalize_log1p

N_BACKGROUND = 150
MARKERS = {
    "alpha": ["A1", "A2", "A3"],
    "beta": ["B1", "B2", "B3"],
    "gamma": ["C1", "C2", "C3"],
}
REPORT_COLUMNS = ["cluster", "n_cells", "label", "score_best", "score_second", "margin"]


def make_counts(sizes, *, seed=0, mixed=0):
    """Poisson counts for populations alpha/beta/gamma with their own marker genes.

    ``mixed`` extra cells express the alpha and beta markers at the same rate (an ambiguous
    population, labelled "mixed" in the truth). Returns (CSR float32 counts, genes, truth).
    """
    rng = np.random.default_rng(seed)
    marker_genes = [g for gs in MARKERS.values() for g in gs]
    genes = marker_genes + [f"G{i}" for i in range(N_BACKGROUND)]
    base = rng.gamma(2.0, 1.0, size=N_BACKGROUND)  # background gene rates shared by all cells
    blocks, truth = [], []
    groups = list(zip(MARKERS, sizes)) + ([("mixed", mixed)] if mixed else [])
    for name, n in groups:
        rates = np.full(len(genes), 0.1)
        rates[len(marker_genes):] = base
        # Each population also raises its own block of 10 background genes, so PCA sees
        # structure beyond the markers.
        block = ["alpha", "beta", "gamma", "mixed"].index(name)
        rates[len(marker_genes) + 10 * block : len(marker_genes) + 10 * (block + 1)] *= 4.0
        for t in ("alpha", "beta") if name == "mixed" else (name,):
            for g in MARKERS[t]:
                rates[genes.index(g)] = 8.0
        depth = rng.uniform(0.7, 1.3, size=(n, 1))  # per-cell library-size variation
        blocks.append(rng.poisson(rates * depth))
        truth += [name] * n
    X = np.vstack(blocks)
    perm = rng.permutation(X.shape[0])  # interleave populations
    return sp.csr_matrix(X[perm].astype(np.float32)), genes, np.asarray(truth)[perm]


@pytest.fixture(scope="module")
def data():
    return make_counts((60, 45, 30), seed=1)


def run(counts, genes, markers=MARKERS, **kw):
    kw.setdefault("n_clusters", 3)
    kw.setdefault("n_pcs", 5)
    kw.setdefault("n_hvg", 100)
    return marker_cluster_labels(counts, genes, markers, **kw)


def test_recovers_populations_exactly(data):
    counts, genes, truth = data
    labels, report = run(counts, genes)
    assert isinstance(labels, np.ndarray) and labels.dtype.kind == "U"
    assert labels.shape == (counts.shape[0],)
    np.testing.assert_array_equal(labels, truth)
    assert list(report.columns[: len(REPORT_COLUMNS)]) == REPORT_COLUMNS
    assert report["n_cells"].sum() == counts.shape[0]
    assert sorted(report["label"]) == ["alpha", "beta", "gamma"]
    # Clusters are numbered by decreasing size.
    assert report["n_cells"].tolist() == [60, 45, 30]
    assert (report["margin"] > 1.0).all()
    np.testing.assert_allclose(report["margin"], report["score_best"] - report["score_second"])


def test_recovers_populations_when_overclustered(data):
    counts, genes, truth = data
    labels, report = run(counts, genes, n_clusters=7)
    np.testing.assert_array_equal(labels, truth)
    assert len(report) == 7
    assert report["cluster"].tolist() == list(range(7))
    sizes = report["n_cells"].to_numpy()
    assert (np.diff(sizes) <= 0).all(), "clusters must be numbered by decreasing size"


def test_scores_are_relative_across_clusters(data):
    # A "type" whose markers are highly but evenly expressed everywhere must not win: after
    # z-scoring across clusters such genes carry no signal, whatever their absolute level.
    counts, genes, truth = data
    dense = counts.toarray()
    top = np.argsort(-dense[:, 9:].mean(axis=0))[:3] + 9  # most expressed background genes
    markers = dict(MARKERS, housekeeping=[genes[j] for j in top])
    labels, report = run(counts, genes, markers)
    np.testing.assert_array_equal(labels, truth)
    assert "housekeeping" not in set(report["label"])


def test_dense_input_matches_sparse(data):
    counts, genes, truth = data
    sparse_labels, sparse_report = run(counts, genes)
    dense_labels, dense_report = run(counts.toarray().astype(np.int64), genes)
    np.testing.assert_array_equal(dense_labels, sparse_labels)
    pd.testing.assert_frame_equal(dense_report, sparse_report)


def test_deterministic_for_same_seed(data):
    counts, genes, _ = data
    first = run(counts, genes, n_clusters=6, seed=3)
    second = run(counts.copy(), list(genes), n_clusters=6, seed=3)
    np.testing.assert_array_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    assert first[1].attrs == second[1].attrs
    # With more clusters than populations KMeans has many local optima, so this comparison
    # only passes if the seed really fixes the clustering.
    other = run(counts, genes, n_clusters=6, seed=4)
    assert other[1]["n_cells"].tolist() != first[1]["n_cells"].tolist()


def test_other_seed_still_recovers(data):
    counts, genes, truth = data
    labels, _ = run(counts, genes, seed=12345)
    np.testing.assert_array_equal(labels, truth)


def test_absent_markers_are_ignored(data):
    counts, genes, truth = data
    markers = {t: gs + ["NOT_A_GENE"] for t, gs in MARKERS.items()}
    markers["gamma"] = ["MISSING1", "C2"]
    labels, report = run(counts, genes, markers)
    np.testing.assert_array_equal(labels, truth)
    assert report.attrs["markers_used"]["gamma"] == ["C2"]
    assert report.attrs["markers_used"]["alpha"] == ["A1", "A2", "A3"]


def test_type_with_no_marker_present_raises(data):
    counts, genes, _ = data
    markers = dict(MARKERS, delta=["NOPE1", "NOPE2"])
    with pytest.raises(ValueError, match=r"'delta'.*NOPE1, NOPE2"):
        run(counts, genes, markers)


def test_unassigned_margin_rule():
    counts, genes, truth = make_counts((50, 50, 50), seed=2, mixed=40)
    base_labels, base = run(counts, genes, n_clusters=4)
    mixed_row = base.loc[base["n_cells"] == 40].iloc[0]
    # The mixed population scores alpha and beta about equally ...
    assert {mixed_row["best_type"], mixed_row["second_type"]} == {"alpha", "beta"}
    assert mixed_row["margin"] < 0.5
    # ... while the pure populations win by a wide margin.
    pure = base.loc[base["n_cells"] == 50]
    assert (pure["margin"] > 0.5).all()
    # With min_margin=0 every cluster keeps its best type.
    assert "unassigned" not in set(base_labels)

    labels, report = run(counts, genes, n_clusters=4, min_margin=0.5, unassigned="unknown")
    expected = np.where(truth == "mixed", "unknown", truth)
    np.testing.assert_array_equal(labels, expected)
    assert (report.loc[report["margin"] < 0.5, "label"] == "unknown").all()
    kept = report.loc[report["margin"] >= 0.5]
    assert len(kept) == 3 and (kept["label"] == kept["best_type"]).all()


def test_margin_threshold_applies_per_cluster(data):
    counts, genes, _ = data
    _, base = run(counts, genes, n_clusters=3)
    # A threshold just above the smallest margin turns exactly that cluster unassigned.
    smallest = base["margin"].idxmin()
    threshold = float(np.nextafter(base["margin"].min(), np.inf))
    labels, report = run(counts, genes, n_clusters=3, min_margin=threshold)
    assert report.loc[smallest, "label"] == "unassigned"
    others = report.drop(index=smallest)
    assert (others["label"] == others["best_type"]).all()
    assert (labels == "unassigned").sum() == report.loc[smallest, "n_cells"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_clusters": 1}, "n_clusters"),
        ({"n_clusters": 10_000}, "n_clusters"),
        ({"min_margin": -1.0}, "min_margin"),
        ({"unassigned": "alpha"}, "clashes"),
    ],
)
def test_bad_parameters_raise(data, kwargs, message):
    counts, genes, _ = data
    with pytest.raises(ValueError, match=message):
        run(counts, genes, **kwargs)


def test_bad_inputs_raise(data):
    counts, genes, _ = data
    with pytest.raises(ValueError, match="genes has"):
        run(counts, genes[:-1])
    with pytest.raises(ValueError, match="at least two"):
        run(counts, genes, {"alpha": ["A1"]})
    with pytest.raises(ValueError, match="non-empty list"):
        run(counts, genes, dict(MARKERS, beta="B1"))
    empty = counts.tolil()
    empty[0, :] = 0
    with pytest.raises(ValueError, match="zero total count"):
        run(empty.tocsr(), genes)


def test_normalize_log1p_library_size():
    X = sp.csr_matrix(np.array([[1, 0, 3], [0, 5, 5]], dtype=np.float32))
    L = normalize_log1p(X)
    np.testing.assert_allclose(np.expm1(L.toarray()).sum(axis=1), [1e4, 1e4])
    np.testing.assert_allclose(L.toarray()[0], np.log1p([2500.0, 0.0, 7500.0]))
    assert X.toarray()[0, 0] == 1  # the input is not modified


def test_hvg_prefers_overdispersed_genes():
    from cellarena.data.labels import _select_hvg

    rng = np.random.default_rng(0)
    n_cells, n_genes = 300, 400
    # Background: Poisson genes of similar depth, so the dispersion bins are well populated.
    X = rng.poisson(rng.uniform(0.2, 0.6, size=n_genes), size=(n_cells, n_genes)).astype(float)
    X[:, 0] = 0.0
    X[:15, 0] = rng.poisson(6.0, size=15)  # marker of a small population: over-dispersed
    X[:, 1] = 0.0  # never detected
    X[:, 2] = 3.0  # same count in every cell
    L = normalize_log1p(sp.csr_matrix(X))
    assert _select_hvg(L, 1).tolist() == [0]
    everything = _select_hvg(L, 10_000)
    assert 0 in everything and 1 not in everything
    assert len(everything) == n_genes - 1
    assert (np.diff(everything) > 0).all()  # returned in column order
