"""Embedding plug-ins (integration / zero-shot): loaded as the runner loads them, on seeded synthetic counts.

Each model must return a finite (n_cells, d) array, be deterministic for a seed, and say
``NotApplicable`` where it needs a batch the data lacks. Sanity checks: Harmony shrinks the batch
separation that PCA shows; the batch-free positive control leaves no batch-mean difference.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from cellarena.cards.model import load_model_card, load_plugin
from cellarena.plugin import NotApplicable, RunContext
from cellarena.plugin import seed_everything

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
EMBEDDING_MODELS = ["pca", "scvi", "harmony", "celltype_embedding", "celltype_embedding_batchfree",
                    "random_embedding", "batch_embedding"]
NEEDS_BATCH = ["harmony", "celltype_embedding_batchfree", "batch_embedding"]
FAST = {"scvi": {"max_epochs": 2}}  # scvi-tools' own tests train an epoch or so on tiny data
N_CELLS, N_GENES = 300, 200
TYPES = np.array(["alpha", "beta", "gamma"])


def synthetic(n_cells: int = N_CELLS, n_genes: int = N_GENES, seed: int = 0, batch: bool = True):
    """Poisson counts from three cell-type programmes in two batches with a batch effect.

    Returns the model's view (counts in layers["counts"], X None, obs "batch" categorical when
    ``batch``, no cell types) and the true cell types. Every type is split evenly between batches,
    so a batch-centroid difference within a type is batch effect, not composition.
    """
    rng = np.random.default_rng(seed)
    types = np.tile(np.repeat(TYPES, 2), n_cells // 6)
    batches = np.tile(["b1", "b2"], n_cells // 2)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    programme = np.ones((3, n_genes))
    for k in range(3):
        programme[k, rng.choice(n_genes, 20, replace=False)] *= 6.0
    shift = np.ones((2, n_genes))
    shift[1] = rng.lognormal(0.0, 0.4, size=n_genes)  # batch b2 scales every gene by its own factor
    size = rng.lognormal(0.0, 0.3, size=n_cells)[:, None]
    lam = (base * programme[np.searchsorted(TYPES, types)] * shift[(batches == "b2").astype(int)] * size)
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    if batch:
        obs["batch"] = pd.Categorical(batches)
    view = ad.AnnData(X=None, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]),
                      layers={"counts": counts})
    return view, types


def embed(model_id: str, view, solution=None, *, tmp_path, seed: int = 0, params: dict | None = None,
          copy: bool = True):
    """Load the card and plug-in from the folder and embed, the way the runner does."""
    folder = MODELS / model_id
    card = load_model_card(folder)
    run_params = {**card.params, **FAST.get(model_id, {}), **(params or {})}
    with threadpool_limits(1):
        seed_everything(seed)
        cls = load_plugin(folder)
        model = cls(run_params, RunContext(seed=seed, threads=1, device="cpu", work_dir=Path(tmp_path)))
        kwargs = {"solution": solution} if card.uses_solution else {}
        return model.embed(view.copy() if copy else view, **kwargs)


def within_type_batch_separation(emb, types, batches) -> float:
    """Mean over cell types of the distance between the two batches' centroids, over the total spread."""
    spread = np.sqrt(np.var(emb, axis=0).sum())
    dists = [np.linalg.norm(emb[(types == t) & (batches == "b1")].mean(0)
                            - emb[(types == t) & (batches == "b2")].mean(0)) for t in TYPES]
    return float(np.mean(dists) / spread)


def same_label_neighbours(emb, labels, k: int = 15) -> float:
    """Fraction of each cell's k nearest neighbours that share its label (0.5 = two equal groups mixed)."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
    return float((labels[idx] == labels[:, None]).mean())


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def embeddings(data, tmp_path_factory):
    """One embedding per model with seed 0 (scvi's trained once here, reused by the checks).

    The models get the shared view itself, not a copy: test_inputs_are_untouched checks it after.
    """
    view, types = data
    return {mid: embed(mid, view, types, tmp_path=tmp_path_factory.mktemp(mid), copy=False)
            for mid in EMBEDDING_MODELS}


def test_inputs_are_untouched(data, embeddings):
    view, _ = data
    fresh, _ = synthetic()
    assert view.X is None and list(view.layers) == ["counts"] and not view.uns
    assert list(view.obs.columns) == ["batch"] and list(view.var.columns) == []
    assert view.obs["batch"].equals(fresh.obs["batch"])
    assert (view.layers["counts"] != fresh.layers["counts"]).nnz == 0


@pytest.mark.parametrize("model_id", EMBEDDING_MODELS)
def test_card_is_valid(model_id):
    card = load_model_card(MODELS / model_id)
    assert card.kind == ("baseline" if model_id in ("pca", "scvi", "harmony") else "control")
    assert card.uses_solution == model_id.startswith("celltype_embedding")
    if model_id == "batch_embedding":  # the floor of the batch metrics in both embedding tasks
        assert card.tasks == ["integration", "zero_shot"]
    elif model_id in NEEDS_BATCH:
        assert card.tasks == ["integration"]
    elif model_id == "scvi":  # also annotates, through its latent space
        assert card.tasks == ["annotation", "integration", "zero_shot"]
    else:
        assert card.tasks == ["integration", "zero_shot"]
    assert card.citation and card.licence and card.params


EXPECTED_DIM = {"pca": 50, "scvi": 10, "harmony": 50, "celltype_embedding": 3, "celltype_embedding_batchfree": 3,
                "random_embedding": 30, "batch_embedding": 2}


@pytest.mark.parametrize("model_id", EMBEDDING_MODELS)
def test_embedding_shape_and_finite(model_id, embeddings):
    emb = np.asarray(embeddings[model_id])
    assert emb.shape == (N_CELLS, EXPECTED_DIM[model_id])
    assert emb.dtype.kind == "f"
    assert np.isfinite(emb).all()


@pytest.mark.parametrize("model_id", EMBEDDING_MODELS)
def test_deterministic_for_a_seed(model_id, data, embeddings, tmp_path):
    view, types = data
    again = embed(model_id, view, types, tmp_path=tmp_path)
    np.testing.assert_array_equal(again, embeddings[model_id])  # exactly, scVI on CPU included


@pytest.mark.parametrize("model_id", ["scvi", "harmony", "celltype_embedding", "random_embedding",
                                      "batch_embedding"])
def test_seed_matters(model_id, data, embeddings, tmp_path):
    view, types = data
    other = embed(model_id, view, types, seed=1, tmp_path=tmp_path)
    assert not np.allclose(other, embeddings[model_id])


@pytest.mark.parametrize("model_id", NEEDS_BATCH)
def test_needs_a_batch(model_id, data, tmp_path):
    view, types = data
    no_batch = view.copy()
    del no_batch.obs["batch"]
    with pytest.raises(NotApplicable, match="batch"):
        embed(model_id, no_batch, types, tmp_path=tmp_path)
    one_batch = view.copy()
    one_batch.obs["batch"] = pd.Categorical(["b1"] * view.n_obs)
    with pytest.raises(NotApplicable, match="two batches"):
        embed(model_id, one_batch, types, tmp_path=tmp_path)


@pytest.mark.parametrize("model_id", ["pca", "scvi", "celltype_embedding", "random_embedding"])
def test_runs_without_a_batch(model_id, data, tmp_path):
    """Zero-shot datasets may have no batch: these models embed them all the same."""
    view, types = data
    no_batch = view.copy()
    del no_batch.obs["batch"]
    emb = embed(model_id, no_batch, types, tmp_path=tmp_path)
    assert emb.shape == (N_CELLS, EXPECTED_DIM[model_id]) and np.isfinite(emb).all()


def test_solution_controls_need_the_solution(data, tmp_path):
    view, _ = data
    for model_id in ("celltype_embedding", "celltype_embedding_batchfree"):
        with pytest.raises(RuntimeError, match="solution"):
            embed(model_id, view, None, tmp_path=tmp_path)


def test_pca_shows_the_batch_effect_and_harmony_reduces_it(data, embeddings):
    view, types = data
    batches = view.obs["batch"].astype(str).to_numpy()
    pca, harmony = embeddings["pca"], embeddings["harmony"]
    before = within_type_batch_separation(pca, types, batches)
    after = within_type_batch_separation(harmony, types, batches)
    assert before > 0.3, "the synthetic batch effect should show in PCA"
    assert after < 0.5 * before
    assert same_label_neighbours(pca, batches) > 0.7  # neighbours mostly from the cell's own batch
    assert same_label_neighbours(harmony, batches) < 0.6  # near 0.5: batches mixed


def test_harmony_keeps_cell_types_apart(data, embeddings):
    _, types = data
    assert same_label_neighbours(embeddings["pca"], types) > 0.95
    assert same_label_neighbours(embeddings["harmony"], types) > 0.95


def test_harmony_output_orientation(data, tmp_path, monkeypatch):
    """harmonypy 2.x returns Z_corr as cells x dims, older versions dims x cells: both give (n_cells, d)."""
    import harmonypy

    view, types = data
    real = harmonypy.run_harmony

    class Transposed:
        def __init__(self, ho):
            self.Z_corr = np.asarray(ho.Z_corr).T

    pcs = np.random.default_rng(0).standard_normal((N_CELLS, 5))
    direct = real(pcs, {"batch": np.tile(["a", "b"], N_CELLS // 2)}, "batch", verbose=False)
    assert np.asarray(direct.Z_corr).shape == (N_CELLS, 5), "harmonypy's orientation changed; check the plug-in"
    monkeypatch.setattr(harmonypy, "run_harmony", lambda *a, **k: Transposed(real(*a, **k)))
    emb = embed("harmony", view, types, params={"n_comps": 20}, tmp_path=tmp_path)
    assert emb.shape == (N_CELLS, 20)


def test_celltype_controls_separate_types(data, embeddings):
    view, types = data
    for model_id in ("celltype_embedding", "celltype_embedding_batchfree"):
        emb = embeddings[model_id]
        nearest = np.argmax(emb, axis=1)  # with noise_sd 0.1 the largest coordinate is the type's
        assert (np.asarray(TYPES)[nearest] == types).mean() > 0.99


def test_batchfree_control_has_no_batch_effect_within_a_cell_type(tmp_path):
    """Even with unequal cell-type composition between batches, each cell type has the same mean in
    every batch, and the composition difference is left alone (centring whole batches moved every
    cell of a batch by its composition offset, which made batch structure within each type)."""
    view, types = synthetic()
    batches = view.obs["batch"].astype(str).to_numpy()
    keep = ~((types == "alpha") & (batches == "b2") & (np.arange(N_CELLS) % 4 < 3))  # drop most b2 alphas
    view, types, batches = view[keep].copy(), types[keep], batches[keep]
    emb = embed("celltype_embedding_batchfree", view, types, tmp_path=tmp_path)
    for t in TYPES:
        diff = emb[(types == t) & (batches == "b1")].mean(0) - emb[(types == t) & (batches == "b2")].mean(0)
        assert np.abs(diff).max() < 1e-10, t
    plain = embed("celltype_embedding", view, types, tmp_path=tmp_path)
    # the type's own coordinate is untouched (a type's mean over all batches is kept)
    for t in TYPES:
        assert emb[types == t].mean(0) == pytest.approx(plain[types == t].mean(0), abs=1e-12)
    # batches still differ in mean as their compositions do (biology, not batch)
    comp = emb[batches == "b1"].mean(0) - emb[batches == "b2"].mean(0)
    assert np.abs(comp).max() > 0.05
    assert within_type_batch_separation(emb, types, batches) < within_type_batch_separation(plain, types, batches)


def test_batch_embedding_is_all_batch(data, embeddings):
    view, types = data
    batches = view.obs["batch"].astype(str).to_numpy()
    emb = embeddings["batch_embedding"]
    assert ((emb[:, 1] > emb[:, 0]) == (batches == "b2")).all()
    assert within_type_batch_separation(emb, types, batches) > 1.0


def test_random_embedding_ignores_the_data(data, embeddings, tmp_path):
    view, types = data
    other, _ = synthetic(seed=5)
    again = embed("random_embedding", other, tmp_path=tmp_path)
    np.testing.assert_array_equal(again, embeddings["random_embedding"])
    emb = embeddings["random_embedding"]
    assert abs(emb.mean()) < 0.05 and abs(emb.std() - 1) < 0.05


def test_scvi_embeds_cells_without_counts(data, tmp_path):
    """A cell with no counts in the selected genes is left out of training but still embedded."""
    view, types = data
    empty = view.copy()
    counts = empty.layers["counts"].tolil()
    counts[:4, :] = 0
    empty.layers["counts"] = counts.tocsr()
    emb = embed("scvi", empty, types, tmp_path=tmp_path)
    assert emb.shape == (N_CELLS, EXPECTED_DIM["scvi"]) and np.isfinite(emb).all()
    np.testing.assert_array_equal(emb[0], emb[2])  # two all-zero cells of one batch look alike to the encoder
