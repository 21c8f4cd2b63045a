"""What every published-model adapter must do when its input does not fit, checked on all of them:
a missing checkpoint, a vocabulary that covers too few of the dataset's genes, another organism.
Each gives ``not_applicable`` with the reason, never a crash. Adapter-specific checks (strict
loading, tokenization, equivalence with PyTorch's layers) are in ``test_adapter_<id>.py``."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pytest

from cellarena.checkpoints import CHECKPOINTS_ENV
from cellarena.models import discover, load_model_card, load_plugin
from cellarena.runner import embed_cells

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = sorted(i for i, d in discover(REPO / "models").items() if load_model_card(d).kind == "adapter")


def test_the_published_families_are_here():
    assert {"scgpt", "geneformer", "geneformer_v2", "uce", "scfoundation", "cellplm"} <= set(ADAPTERS)


@pytest.mark.parametrize("model_id", ADAPTERS)
def test_missing_checkpoint_names_every_file_and_where_to_get_it(model_id, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "empty"))
    spec = load_model_card(REPO / "models" / model_id).checkpoint
    run = embed_cells(tiny.prepared, tiny.embedding_split, REPO / "models" / model_id, seed=0)
    reason = run.columns["status_reason"]
    assert run.status == "not_applicable", reason
    for f in spec.files:
        assert str(tmp_path / "empty" / spec.folder / f.name) in reason
    assert spec.source in reason


@pytest.mark.parametrize("model_id", ADAPTERS)
def test_too_few_genes_in_the_vocabulary_is_not_applicable_with_the_fraction(model_id, tiny, tmp_path, monkeypatch):
    genes = list(ad.read_h5ad(tiny.prepared, backed="r").var_names[:100]) + [f"NOTAGENE{i}" for i in range(300)]
    load_plugin(REPO / "models" / model_id).write_validation_release(tmp_path / "ck", genes, 0)
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "ck"))
    run = embed_cells(tiny.prepared, tiny.embedding_split, REPO / "models" / model_id, seed=0)
    assert run.status == "not_applicable" and "only 100 of 500 genes (20.0%)" in run.columns["status_reason"]


@pytest.mark.parametrize("model_id", ADAPTERS)
def test_another_organism_is_not_applicable(model_id, tiny, tmp_path):
    data = ad.read_h5ad(tiny.prepared)
    data.uns["cellarena"] = {**data.uns["cellarena"], "organism": "mus_musculus"}
    data.write_h5ad(tmp_path / "mouse.h5ad")
    run = embed_cells(tmp_path / "mouse.h5ad", tiny.embedding_split, REPO / "models" / model_id, seed=0)
    assert run.status == "not_applicable" and "homo_sapiens" in run.columns["status_reason"]
