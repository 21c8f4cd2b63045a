"""Batch-integration metrics: thin wrappers around scib-metrics.

The metric set follows the scIB benchmark (Luecken et al. 2022, "Benchmarking atlas-level data
integration in single-cell genomics", Nat. Methods 19:41-50) as re-implemented in JAX by
scib-metrics. The metrics themselves are computed by scib-metrics; this module

- builds the k-nearest-neighbour graph with scikit-learn (exact search, no numba compilation),
  once per embedding, and hands it to every graph-based metric (kBET's internal neighbour
  search is pointed at the same exact search, see :func:`kbet`);
- computes the per-cell label silhouettes once for both ``silhouette_label`` and
  ``isolated_labels``, and runs the library's k-means with a seed and a smaller minimum
  iteration count (see :func:`nmi_ari_kmeans`): the two changes that keep 14k cells x 5
  embeddings within about a minute on a CPU;
- decides which metrics are defined for the inputs at hand (see :func:`score_integration`);
- points JAX at a persistent compilation cache, so that a fresh process does not recompile the
  XLA programs that an earlier process already compiled for the same shapes.

The tests check every value against the scib-metrics function called directly.

Metrics fall into two groups. ``"bio"`` (conservation of biological variance): isolated labels,
NMI and ARI of a k-means clustering against the labels, silhouette of labels, cLISI. ``"batch"``
(removal of batch effects): silhouette of batches within labels, iLISI, kBET, graph connectivity,
PCR comparison. All of them are scaled by scib-metrics so that 1 is best. The weighted totals of
the scIB paper (0.6 bio + 0.4 batch, after min-max scaling across methods) are deliberately not
computed here: they depend on the set of methods compared and belong to the display layer.

Neighbourhood sizes follow scib-metrics' ``Benchmarker``: one graph of ``n_neighbors`` (90) cells
per embedding; LISI uses all of them, kBET the nearest 50 and graph connectivity the nearest 15
(fewer when ``n_neighbors`` is smaller).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellarena.metrics import MetricSpec

if TYPE_CHECKING:  # scib-metrics imports umap/numba/jax: seconds of import time, so import lazily
    from scib_metrics.nearest_neighbors import NeighborsResults

DEFAULT_N_NEIGHBORS = 90
KBET_NEIGHBORS = 50
CONNECTIVITY_NEIGHBORS = 15
KMEANS_MAX_ITER = 30  # minimum Lloyd iterations of scib-metrics' KMeans (library default 300)

_jax_cache_dir: Path | None = None


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------

def jax_cache_dir() -> Path:
    """The persistent JAX cache folder: ``$CELLARENA_JAX_CACHE`` or ``~/.cache/cellarena/jax``."""
    return Path(os.environ.get("CELLARENA_JAX_CACHE") or "~/.cache/cellarena/jax").expanduser()


def configure_jax_cache() -> Path:
    """Point JAX's persistent compilation cache at :func:`jax_cache_dir` (idempotent).

    By default JAX only writes an entry when compiling took at least
    ``jax_persistent_cache_min_compile_time_secs`` (1 s); the programs scib-metrics compiles
    mostly take well under a second each, but there are a few hundred of them (one per metric,
    array shape and label subset), so that threshold is set to 0 and the entry-size threshold
    to -1 (no minimum, and none substituted by JAX). JAX reads the cache folder when it first
    compiles with a folder set, so this is called before scib-metrics is first used; every
    function of this module that reaches JAX calls it first.
    """
    global _jax_cache_dir
    if _jax_cache_dir is None:
        import jax  # noqa: PLC0415

        path = jax_cache_dir()
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        _jax_cache_dir = path
    return _jax_cache_dir


def _scib():
    configure_jax_cache()
    import scib_metrics  # noqa: PLC0415

    return scib_metrics


def _embedding(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"an embedding must be 2-d with at least two cells, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("the embedding has non-finite values")
    return np.ascontiguousarray(X)


def _categories(values, n: int, what: str) -> np.ndarray:
    values = pd.Series(np.asarray(values, dtype=object).ravel())
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} cells")
    if values.isna().any():
        raise ValueError(f"{what} has missing values; drop those cells first")
    return values.astype(str).to_numpy()


def neighbors(X, n_neighbors: int = DEFAULT_N_NEIGHBORS) -> NeighborsResults:
    """Exact Euclidean k-nearest-neighbour graph of an embedding, each cell's own row first.

    Uses scikit-learn rather than scib-metrics' default pynndescent, whose numba kernels take
    about 100 s to compile in a fresh process. Column 0 is the cell itself (distance 0), as
    scib-metrics expects; the other ``n_neighbors - 1`` columns are its nearest other cells, in
    increasing distance. ``n_neighbors`` is clipped to the number of cells.
    """
    from sklearn.neighbors import NearestNeighbors  # noqa: PLC0415

    NeighborsResults = _scib().nearest_neighbors.NeighborsResults  # noqa: N806
    X = _embedding(X)
    k = min(int(n_neighbors), X.shape[0])
    if k < 2:
        raise ValueError(f"n_neighbors must be at least 2, got {n_neighbors}")
    # Without a query argument scikit-learn leaves each point out of its own neighbour list (by
    # index, so duplicated cells are handled); the cell itself is then prepended at distance 0.
    dist, idx = NearestNeighbors(n_neighbors=k - 1).fit(X).kneighbors()
    n = X.shape[0]
    idx = np.hstack([np.arange(n)[:, None], idx])
    dist = np.hstack([np.zeros((n, 1)), dist]).astype(np.float32)
    return NeighborsResults(indices=idx, distances=dist)


def _graph(X, nn: NeighborsResults | None, k: int) -> NeighborsResults:
    nn = neighbors(X, k) if nn is None else nn
    return nn.subset_neighbors(k) if nn.n_neighbors > k else nn


# --------------------------------------------------------------------------------------------------
# bio conservation
# --------------------------------------------------------------------------------------------------

def isolated_labels(X, labels, batch) -> float:
    """Isolated-label silhouette (Luecken et al. 2022).

    Labels present in the fewest batches are "isolated"; the score is the mean, over those
    labels, of the rescaled ([0, 1]) silhouette of their cells with respect to all labels.
    scib-metrics uses the silhouette variant rather than scIB's cluster-F1 variant.
    """
    X = _embedding(X)
    return float(_scib().isolated_labels(X, _categories(labels, len(X), "labels"),
                                         _categories(batch, len(X), "batch")))


def nmi_ari_kmeans(X, labels, *, seed: int = 0, max_iter: int = KMEANS_MAX_ITER) -> dict[str, float]:
    """NMI and ARI between the labels and a k-means clustering with k = number of labels.

    This is scib-metrics' ``nmi_ari_cluster_labels_kmeans`` (scIB clusters with Louvain at the
    resolution maximising NMI; k-means with the true k is the fast, deterministic variant),
    called as its two steps (the library's JAX ``KMeans``, then scikit-learn's scores) so that
    two of its settings can be passed:

    - ``seed``: the library fixes the k-means seed to 0, so ``seed=0`` matches it;
    - ``max_iter``: the library's ``KMeans`` runs at least ``max_iter`` Lloyd iterations and then
      goes on until the inertia changes by less than its tolerance (its loop condition is
      "not converged *or* fewer than max_iter"), so ``max_iter`` is a minimum, not a cap. Its
      default of 300 costs ~5 s per embedding of 14k cells on a CPU; the default here,
      :data:`KMEANS_MAX_ITER`, still ends at the converged clustering and gave the same labels
      on every embedding tried (see the tests and benchmarks/integration_metrics.py).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: PLC0415

    X = _embedding(X)
    labels = _categories(labels, len(X), "labels")
    km = _scib().utils.KMeans(n_clusters=len(np.unique(labels)), seed=int(seed), max_iter=int(max_iter)).fit(X)
    return {"nmi": float(normalized_mutual_info_score(labels, km.labels_, average_method="arithmetic")),
            "ari": float(adjusted_rand_score(labels, km.labels_))}


def nmi(X, labels, *, seed: int = 0) -> float:
    """Normalised mutual information of k-means clusters and labels (see :func:`nmi_ari_kmeans`)."""
    return nmi_ari_kmeans(X, labels, seed=seed)["nmi"]


def ari(X, labels, *, seed: int = 0) -> float:
    """Adjusted Rand index of k-means clusters and labels (see :func:`nmi_ari_kmeans`)."""
    return nmi_ari_kmeans(X, labels, seed=seed)["ari"]


def silhouette_label(X, labels) -> float:
    """Average silhouette width of the labels, rescaled from [-1, 1] to [0, 1]."""
    X = _embedding(X)
    return float(_scib().silhouette_label(X, _categories(labels, len(X), "labels")))


def clisi(X, labels, *, nn: NeighborsResults | None = None) -> float:
    """Cell-type LISI (Korsunsky et al. 2019, Harmony), median over cells, scaled so 1 = pure.

    ``nn`` is a precomputed :func:`neighbors` graph of ``X``; built here when omitted.
    """
    X = _embedding(X)
    graph = _graph(X, nn, DEFAULT_N_NEIGHBORS)
    return float(_scib().clisi_knn(graph, _categories(labels, len(X), "labels")))


# --------------------------------------------------------------------------------------------------
# batch correction
# --------------------------------------------------------------------------------------------------

def silhouette_batch(X, labels, batch) -> float:
    """Batch ASW within labels: 1 - |silhouette of batches| per label, averaged over labels.

    Labels seen in a single batch are skipped; raises ValueError when that leaves none.
    """
    X = _embedding(X)
    labels = _categories(labels, len(X), "labels")
    batch = _categories(batch, len(X), "batch")
    if not _has_multibatch_label(labels, batch):
        raise ValueError("silhouette_batch needs a label whose cells come from at least two batches")
    return float(_scib().silhouette_batch(X, labels, batch))


def ilisi(X, batch, *, nn: NeighborsResults | None = None) -> float:
    """Integration LISI (Korsunsky et al. 2019), median over cells, scaled so 1 = fully mixed."""
    X = _embedding(X)
    graph = _graph(X, nn, DEFAULT_N_NEIGHBORS)
    return float(_scib().ilisi_knn(graph, _categories(batch, len(X), "batch")))


def _exact_search(X, n_neighbors: int, random_state: int = 0, n_jobs: int = 1) -> NeighborsResults:
    # stands in for scib_metrics.nearest_neighbors.pynndescent (same signature; exact, no numba)
    return neighbors(X, n_neighbors)


def kbet(X, labels, batch, *, nn: NeighborsResults | None = None, exact: bool = True) -> float:
    """kBET acceptance rate (Büttner et al. 2019) within each label, averaged over labels.

    scib-metrics' ``kbet_per_label``: per label, neighbours are re-derived from diffusion
    distances on the label's subgraph of the 50-NN graph, then a chi-squared test compares each
    cell's neighbourhood batch composition with the label's overall one; labels whose graph falls
    apart into small components score 0. Slow (UMAP connectivities, an eigensolve and a neighbour
    search per label), hence off by default in :func:`score_integration`.

    The library searches neighbours in the diffusion embedding with pynndescent, whose numba
    kernels take 1-2 minutes to compile in every fresh process. With ``exact`` (default) that
    search is swapped, for the duration of the call, for the exact scikit-learn search of
    :func:`neighbors`; on small label subsets the two agree, on large ones pynndescent is
    approximate. ``exact=False`` runs the library untouched.
    """
    from unittest import mock  # noqa: PLC0415

    X = _embedding(X)
    graph = _graph(X, nn, KBET_NEIGHBORS)
    scib = _scib()
    batch = _categories(batch, len(X), "batch")
    labels = _categories(labels, len(X), "labels")
    if not exact:
        return float(scib.kbet_per_label(graph, batch, labels))
    with mock.patch.object(scib.nearest_neighbors, "pynndescent", _exact_search):
        return float(scib.kbet_per_label(graph, batch, labels))


def graph_connectivity(X, labels, *, nn: NeighborsResults | None = None) -> float:
    """Mean over labels of the fraction of the label's cells in its largest connected component
    of the 15-NN graph restricted to that label."""
    X = _embedding(X)
    graph = _graph(X, nn, CONNECTIVITY_NEIGHBORS)
    return float(_scib().graph_connectivity(graph, _categories(labels, len(X), "labels")))


def pcr_comparison(X, batch, X_unintegrated) -> float:
    """Relative drop in batch variance explained by principal-component regression (Büttner et
    al. 2019) from the unintegrated to the integrated embedding; 0 when it did not drop."""
    X = _embedding(X)
    X_pre = _embedding(X_unintegrated)
    if X_pre.shape[0] != X.shape[0]:
        raise ValueError(f"X_unintegrated has {X_pre.shape[0]} cells, X has {X.shape[0]}")
    return float(_scib().pcr_comparison(X_pre, X, _categories(batch, len(X), "batch"), categorical=True))


def _label_silhouettes(X: np.ndarray, labels: np.ndarray, batch: np.ndarray | None) -> dict[str, float]:
    """``silhouette_label`` and (given batches) ``isolated_labels`` from one silhouette pass.

    Both scib-metrics functions start from the same per-cell label silhouettes (an O(n^2) pass,
    the slowest step of the whole score); here scib-metrics' ``silhouette_samples`` runs once
    and each function's final averaging is applied to it. The tests check the results against
    the two library functions.
    """
    from scib_metrics.metrics._isolated_labels import _get_isolated_labels  # noqa: PLC0415

    rescaled = (_scib().utils.silhouette_samples(X, labels) + 1.0) / 2.0
    out = {"silhouette_label": float(np.mean(rescaled))}
    if batch is not None:
        iso = _get_isolated_labels(labels, batch, None)
        out["isolated_labels"] = float(np.mean([rescaled[labels == lab].mean() for lab in iso]))
    return out


def _has_multibatch_label(labels: np.ndarray, batch: np.ndarray) -> bool:
    # mirrors the skip rule of scib-metrics' silhouette_batch: a label counts when its cells span
    # at least two batches and not every cell is its own batch
    df = pd.DataFrame({"label": labels, "batch": batch})
    per = df.groupby("label")["batch"].agg(["nunique", "size"])
    return bool(((per["nunique"] > 1) & (per["nunique"] < per["size"])).any())


# --------------------------------------------------------------------------------------------------
# registry and driver
# --------------------------------------------------------------------------------------------------

BIO = "bio"
BATCH = "batch"

METRICS: dict[str, MetricSpec] = {
    m.id: m
    for m in (
        MetricSpec("isolated_labels", isolated_labels, True, (0.0, 1.0),
                   "silhouette of the labels present in the fewest batches", group=BIO),
        MetricSpec("nmi", nmi, True, (0.0, 1.0),
                   "NMI between labels and k-means clusters (k = number of labels)", group=BIO),
        MetricSpec("ari", ari, True, (-0.5, 1.0),
                   "adjusted Rand index between labels and k-means clusters", group=BIO),
        MetricSpec("silhouette_label", silhouette_label, True, (0.0, 1.0),
                   "average silhouette width of the labels, rescaled to [0, 1]", group=BIO),
        MetricSpec("clisi", clisi, True, (0.0, 1.0),
                   "cell-type LISI on the 90-NN graph, scaled (1 = neighbourhoods of one label)",
                   group=BIO),
        MetricSpec("silhouette_batch", silhouette_batch, True, (0.0, 1.0),
                   "1 - |silhouette of batches| within each label, averaged", group=BATCH),
        MetricSpec("ilisi", ilisi, True, (0.0, 1.0),
                   "integration LISI on the 90-NN graph, scaled (1 = batches fully mixed)",
                   group=BATCH),
        MetricSpec("kbet", kbet, True, (0.0, 1.0),
                   "kBET acceptance rate within labels (optional: slow)", group=BATCH),
        MetricSpec("graph_connectivity", graph_connectivity, True, (0.0, 1.0),
                   "fraction of each label's cells in its largest 15-NN component", group=BATCH),
        MetricSpec("pcr_comparison", pcr_comparison, True, (0.0, 1.0),
                   "relative drop of batch variance explained (PC regression) vs unintegrated",
                   group=BATCH),
    )
}


def metric_specs(options: dict | None = None) -> dict[str, MetricSpec]:
    """The integration task's metrics; ``kbet`` only with the option ``include_kbet``."""
    return {k: v for k, v in METRICS.items() if k != "kbet" or (options or {}).get("include_kbet")}


def score_integration(X, labels, batch, *, X_unintegrated=None, include_kbet: bool = False,
                      n_neighbors: int = DEFAULT_N_NEIGHBORS, seed: int = 0) -> dict[str, float]:
    """Every integration metric defined for the inputs, keyed by metric id.

    Parameters
    ----------
    X
        Integrated embedding, ``(n_cells, d)``.
    labels
        Cell-type label per cell (no missing values).
    batch
        Batch per cell, or None (treated as a single batch).
    X_unintegrated
        The unintegrated representation of the same cells (e.g. PCA of log-normalised counts),
        needed by ``pcr_comparison`` only.
    include_kbet
        Also compute ``kbet`` (several seconds per label on large data).
    n_neighbors
        Size of the single kNN graph built for the embedding (see the module docstring).
    seed
        Seed of the k-means clustering behind ``nmi`` / ``ari``.

    Metrics whose inputs are missing are left out of the result, never reported as 0:

    - every batch metric when there are fewer than two batches, ``pcr_comparison`` without
      ``X_unintegrated``, ``kbet`` unless ``include_kbet``, ``silhouette_batch`` and ``kbet``
      when no label spans two batches;
    - ``isolated_labels`` with fewer than two batches ("isolated" is defined by batch counts);
    - every bio metric when there are fewer than two labels (the batch metrics, computed within
      labels, stay defined).
    """
    X = _embedding(X)
    n = X.shape[0]
    labels = _categories(labels, n, "labels")
    batch = np.full(n, "", dtype=object) if batch is None else _categories(batch, n, "batch")
    n_labels = len(np.unique(labels))
    n_batches = len(np.unique(batch))

    nn = neighbors(X, n_neighbors)
    out: dict[str, float] = {}
    if n_labels >= 2:
        out.update(_label_silhouettes(X, labels, batch if n_batches >= 2 else None))
        out.update(nmi_ari_kmeans(X, labels, seed=seed))
        out["clisi"] = clisi(X, labels, nn=nn)
    if n_batches >= 2:
        multibatch = _has_multibatch_label(labels, batch)
        if multibatch:
            out["silhouette_batch"] = silhouette_batch(X, labels, batch)
        out["ilisi"] = ilisi(X, batch, nn=nn)
        if include_kbet and multibatch:
            out["kbet"] = kbet(X, labels, batch, nn=nn)
        out["graph_connectivity"] = graph_connectivity(X, labels, nn=nn)
        if X_unintegrated is not None:
            out["pcr_comparison"] = pcr_comparison(X, batch, X_unintegrated)
    return {k: out[k] for k in METRICS if k in out}


def score_embedding(X, labels, batch, *, X_unintegrated=None, options: dict | None = None, seed: int = 0
                    ) -> dict[str, float]:
    """The integration task's scores of one embedding (cellarena/run/embedding.py calls every embedding
    task's metrics this way): :func:`score_integration` with the task's options."""
    return score_integration(X, labels, batch, X_unintegrated=X_unintegrated,
                             include_kbet=bool((options or {}).get("include_kbet")), seed=seed)
