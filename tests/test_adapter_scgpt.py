"""scGPT adapter: a small random checkpoint in the released file layout, loaded strictly and run."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from cellarena.zoo.adapters import random_weights, scgpt
from cellarena.run.embedding import embed_cells
from cellarena.run.setup import Job

REPO = Path(__file__).resolve().parent.parent
D, HEADS, D_HID, LAYERS = random_weights.SCGPT_TEST_SIZES


@pytest.fixture
def release_dir(tmp_path, release_genes):
    return random_weights.write_scgpt(tmp_path / "checkpoints" / "scGPT_human", release_genes)


def test_loads_strictly_and_names_the_unused_heads(release_dir):
    release = scgpt.Release(release_dir)
    assert release.unused == ["cls_decoder", "decoder", "mvc_decoder"]
    assert release.pad_id == 400 and release.cls_id == 401 and len(release.genes) == 400


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"transformer_encoder.layers.0.extra.weight": torch.zeros(2)}), "unexpected"),
    (lambda s: s.pop("value_encoder.norm.bias"), "missing"),
    (lambda s: s.update({"encoder.enc_norm.weight": torch.zeros(D + 1)}), "shape mismatches"),
])
def test_any_other_layout_is_refused(release_dir, edit, message):
    state = torch.load(release_dir / "best_model.pt", weights_only=True)
    edit(state)
    torch.save(state, release_dir / "best_model.pt")
    with pytest.raises(ValueError, match=message):
        scgpt.Release(release_dir)


def test_binning_hand_example():
    rng = np.random.default_rng(0)
    # 50 quantile edges of [1, 1, 3, 5]: 17 edges equal 1, 3 lies above 33 edges, 5 is the last edge
    for _ in range(20):
        bins = scgpt.bin_values(np.array([5.0, 1.0, 1.0, 3.0]), rng)
        assert bins[0] == 50 and bins[3] == 33 and 1 <= bins[1] <= 17 and 1 <= bins[2] <= 17
    spread = np.concatenate([scgpt.bin_values(np.array([1.0, 1.0, 2.0]), rng)[:2] for _ in range(300)])
    assert spread.min() == 1 and spread.max() > 20  # ties are spread, not all put in one bin


def test_tokenize_cell_puts_cls_first_and_samples_to_max_length(release_dir):
    release = scgpt.Release(release_dir)
    counts = np.array([0, 4, 0, 1, 2, 7, 3], dtype=float)
    ids, values = scgpt.tokenize_cell(counts, np.arange(10, 17), release, np.random.default_rng(0), 1200)
    assert ids.tolist() == [release.cls_id, 11, 13, 14, 15, 16] and values[0] == -2.0
    bins = dict(zip(ids[1:].tolist(), values[1:].tolist()))
    assert bins[15] == 50 and bins[13] == 1  # the largest count gets the top bin, the unique smallest bin 1
    assert bins[11] > bins[16] > bins[14] > 1  # counts 4 > 3 > 2
    short_ids, short_values = scgpt.tokenize_cell(counts, np.arange(10, 17), release, np.random.default_rng(0), 3)
    assert short_ids[0] == release.cls_id and short_ids.size == 3 and set(short_ids[1:]) <= {11, 13, 14, 15, 16}


def test_encoder_equals_pytorchs_own_post_norm_layers(release_dir):
    """The same weights in torch.nn.TransformerEncoderLayer (what scGPT runs without flash-attn)."""
    release = scgpt.Release(release_dir)
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (3, 9))
    ids[1, 6:] = release.pad_id
    values = torch.rand(3, 9) * 50
    padding = ids.eq(release.pad_id)
    ours = release.model(ids, values, padding)
    reference = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D, HEADS, D_HID, dropout=0.0, batch_first=True), LAYERS,
        enable_nested_tensor=False).eval()
    state = {k.replace("transformer_encoder.", "").replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight")
             .replace("self_attn.Wqkv.bias", "self_attn.in_proj_bias"): v
             for k, v in release.model.state_dict().items() if k.startswith("transformer_encoder.")}
    reference.load_state_dict(state)
    x = release.model.encoder(ids) + release.model.value_encoder(values)
    expected = reference(x, src_key_padding_mask=padding)
    keep = ~padding
    assert torch.allclose(ours[keep], expected[keep], atol=1e-5)


def test_in_proj_names_load_the_same_weights(tmp_path, release_dir, tiny):
    genes = list(ad.read_h5ad(tiny.prepared, backed="r").var_names[:400])
    other = random_weights.write_scgpt(tmp_path / "torch_names", genes, attention_names="torch")
    a, b = scgpt.Release(release_dir), scgpt.Release(other)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def _embed(tiny, checkpoints_dir):
    return embed_cells(Job.of(tiny.prepared, tiny.splits["all"], REPO / "models" / "scgpt", seed=0,
                              options={"batch_role": "condition"}, checkpoints_dir=checkpoints_dir))


def test_runner_embeds_deterministically_and_records_the_kernel(release_dir, tiny):
    first, second = _embed(tiny, release_dir.parent), _embed(tiny, release_dir.parent)
    assert first.status == "ok", first.columns["status_reason"]
    assert first.embedding.shape == (200, D) and np.array_equal(first.embedding, second.embedding)
    assert np.allclose(np.linalg.norm(first.embedding, axis=1), 1.0, atol=1e-5)
    runtime = json.loads(first.columns["runtime_json"])
    assert runtime["attention"].startswith("sdpa") and runtime["genes_matched"] == "400/500"
    assert runtime["random_weights"] is True  # random_weights marks its folders
    assert first.columns["leakage"] == "unknown"  # the Census corpus is not resolved to datasets yet
