"""scTab-style classifiers (cellarena/zoo/tabular.py) and the scVI annotation path."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellarena.run import run_task
from cellarena.zoo.tabular import TabNet, augmentation_vectors, donor_labels, entmax15, sparsemax


def test_sparsemax_hand_example():
    out = sparsemax(torch.tensor([[1.0, 0.5, -2.0]]))
    assert torch.allclose(out, torch.tensor([[0.75, 0.25, 0.0]]))


def test_entmax15_is_a_sparse_distribution_between_softmax_and_sparsemax():
    z = torch.tensor([[2.0, 1.0, 0.9, -3.0]])
    e, s = entmax15(z), sparsemax(z)
    assert torch.allclose(e.sum(), torch.tensor(1.0)) and e[0, 3] == 0
    assert (e > 0).sum() >= (s > 0).sum()  # never sparser than sparsemax
    # 1.5-entmax solves p_i = ((z_i - tau)/2)^2 on its support for one threshold tau
    tau = z[0, :3] / 2 - e[0, :3].sqrt()
    assert torch.allclose(tau, tau[0].expand(3), atol=1e-6)


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_closed_form_gradients_match_numerical(fn):
    torch.manual_seed(0)
    z = torch.randn(5, 9, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (z,))


def test_augmentation_vectors_are_donor_differences_of_one_cell_type():
    x = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0], [9.0, 9.0]]))
    types = np.array(["t", "t", "t", "t", "b", "b"])
    donors = np.array(["d1", "d1", "d2", "d2", "d1", "d2"])
    vec = augmentation_vectors(x, types, donors, min_cells=2)
    # type t: mean(d1) = (2, 0), mean(d2) = (0, 3); type b has one cell per donor (< min_cells)
    assert vec.shape == (1, 2) and np.allclose(np.abs(vec[0]), [2.0, 3.0]) and vec[0, 0] == -vec[0, 1] * 2 / 3
    assert augmentation_vectors(x, types, None).shape == (0, 2)
    obs = pd.DataFrame({"batch": donors})
    assert donor_labels(obs)[1] == "batch" and donor_labels(pd.DataFrame(index=range(3)))[0] is None


def test_tabnet_masks_and_shapes():
    torch.manual_seed(0)
    net = TabNet(30, 4, n_d=8, n_a=8, n_steps=2, virtual_batch_size=16)
    logits, entropy = net(torch.rand(40, 30))
    assert logits.shape == (40, 4) and entropy.item() > 0
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def split_file(pbmc68k_split):
    return pbmc68k_split


def _score(rows, metric="macro_f1"):
    return rows.set_index(["metric_id", "subgroup"]).loc[(metric, ""), "value"]


@pytest.mark.parametrize("model", ["sctab", "sctab_mlp", "sctab_linear"])
def test_sctab_family_learns_cell_types(pbmc68k_prepared, split_file, repo, model):
    rows = run_task("annotation", pbmc68k_prepared, split_file, repo / "models" / model, seed=0, threads=2,
                          params={"epochs": 8})
    assert (rows.status == "ok").all(), rows.status_reason.iloc[0]
    majority = run_task("annotation", pbmc68k_prepared, split_file, repo / "models" / "majority_class", seed=0)
    assert _score(rows) > _score(majority) + 0.2
    again = run_task("annotation", pbmc68k_prepared, split_file, repo / "models" / model, seed=0, threads=2,
                           params={"epochs": 8})
    assert _score(again) == _score(rows)  # same seed, same numbers on CPU


def test_scvi_annotates_through_its_latent_space(pbmc68k_prepared, split_file, repo):
    rows = run_task("annotation", pbmc68k_prepared, split_file, repo / "models" / "scvi", seed=0,
                          params={"max_epochs": 10})
    assert (rows.status == "ok").all(), rows.status_reason.iloc[0]
    assert _score(rows, "accuracy") > 0.5


def test_scvi_held_out_loss_is_a_finite_negative_elbo(pbmc68k_prepared, repo):
    from cellarena.cards.model import load_model_card, load_plugin
    from cellarena.plugin import RunContext

    adata = ad.read_h5ad(pbmc68k_prepared)
    view = ad.AnnData(X=None, obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]],
                      layers={"counts": adata.layers["counts"]})
    card = load_model_card(repo / "models" / "scvi")
    model = load_plugin(repo / "models" / "scvi")({**card.params, "max_epochs": 3},
                                                  RunContext(seed=0, threads=1, device="cpu", work_dir=repo))
    loss = model.held_out_loss(view[:500].copy(), view[500:].copy())
    assert np.isfinite(loss) and loss > 0
