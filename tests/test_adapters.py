"""What every published-model adapter must do when its input does not fit, checked on all of them:
a missing checkpoint, a vocabulary that covers too few of the dataset's genes, another organism.
Each gives ``not_applicable`` with the reason, never a crash. Also where releases are looked for
(the job's ``checkpoints_dir``, the environment only as the default) and which plug-ins get a random
release. Adapter-specific checks (strict loading, tokenization, equivalence with PyTorch's layers)
are in ``test_adapter_<id>.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import anndata as ad
import pytest

from cellarena.cards.model import discover, load_model_card, load_plugin
from cellarena.run.embedding import embed_cells
from cellarena.run.setup import Job
from cellarena.zoo import adapters
from cellarena.zoo.adapters import random_weights
from cellarena.zoo.adapters.releases import CHECKPOINTS_ENV

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = sorted(i for i, d in discover(REPO / "models").items() if load_model_card(d).kind == "adapter")


def _embed(tiny, model_id, checkpoints_dir=None, prepared=None):
    return embed_cells(Job.of(prepared or tiny.prepared, tiny.splits["all"], REPO / "models" / model_id, seed=0,
                              checkpoints_dir=checkpoints_dir))


def test_the_published_families_are_here():
    assert {"scgpt", "geneformer", "geneformer_v2", "uce", "scfoundation", "cellplm"} <= set(ADAPTERS)


@pytest.mark.parametrize("model_id", ADAPTERS)
def test_missing_checkpoint_names_every_file_and_where_to_get_it(model_id, tiny, tmp_path):
    spec = load_model_card(REPO / "models" / model_id).checkpoint
    run = _embed(tiny, model_id, checkpoints_dir=tmp_path / "empty")
    reason = run.columns["status_reason"]
    assert run.status == "not_applicable", reason
    for f in spec.files:
        assert str(tmp_path / "empty" / spec.folder / f.name) in reason
    assert spec.source in reason


def test_the_environment_only_sets_the_default_checkpoints_dir(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "from_env"))
    folder = load_model_card(REPO / "models" / "scgpt").checkpoint.folder
    assert str(tmp_path / "from_env" / folder) in _embed(tiny, "scgpt").columns["status_reason"]
    reason = _embed(tiny, "scgpt", checkpoints_dir=tmp_path / "from_job").columns["status_reason"]
    assert str(tmp_path / "from_job" / folder) in reason and str(tmp_path / "from_env") not in reason


@pytest.mark.parametrize("model_id", ADAPTERS)
def test_too_few_genes_in_the_vocabulary_is_not_applicable_with_the_fraction(model_id, tiny, tmp_path):
    genes = list(ad.read_h5ad(tiny.prepared, backed="r").var_names[:100]) + [f"NOTAGENE{i}" for i in range(300)]
    model_dir = REPO / "models" / model_id
    card = load_model_card(model_dir)
    folder = random_weights.write_release(load_plugin(model_dir), card, tmp_path / "ck", genes, 0)
    assert folder == tmp_path / "ck" / card.checkpoint.folder
    run = _embed(tiny, model_id, checkpoints_dir=tmp_path / "ck")
    assert run.status == "not_applicable" and "only 100 of 500 genes (20.0%)" in run.columns["status_reason"]


def test_no_random_release_for_a_plugin_of_no_adapter_family(tmp_path):
    model_dir = REPO / "models" / "pca"
    assert random_weights.write_release(load_plugin(model_dir), load_model_card(model_dir), tmp_path, ["A"], 0) is None
    assert not any(tmp_path.iterdir())


def test_runtime_modules_do_not_import_the_random_writers():
    """random_weights imports the adapters; an adapter importing it back would ship test fixtures."""
    for path in Path(adapters.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [f"{node.module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name
                 for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) for a in node.names]
        assert path.stem == "random_weights" or not [n for n in names if "random_weights" in n], path


@pytest.mark.parametrize("model_id", ADAPTERS)
def test_another_organism_is_not_applicable(model_id, tiny, tmp_path):
    data = ad.read_h5ad(tiny.prepared)
    data.uns["cellarena"] = {**data.uns["cellarena"], "organism": "mus_musculus"}
    data.write_h5ad(tmp_path / "mouse.h5ad")
    run = _embed(tiny, model_id, prepared=tmp_path / "mouse.h5ad")
    assert run.status == "not_applicable" and "homo_sapiens" in run.columns["status_reason"]
