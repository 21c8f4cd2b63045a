"""scFoundation adapter: a small random checkpoint in the released file layout, loaded strictly and run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellarena.zoo.adapters import random_weights as rw
from cellarena.zoo.adapters import scfoundation as sf
from cellarena.errors import NotApplicable
from cellarena.run.embedding import embed_cells
from cellarena.run.setup import Job

REPO = Path(__file__).resolve().parent.parent
S = rw.SCFOUNDATION_TEST_SIZES
D, HEADS, DEPTH = S.dim, S.heads, S.depth


@pytest.fixture
def release_dir(tmp_path, release_genes):
    return rw.write_scfoundation(tmp_path / "checkpoints" / "scFoundation", release_genes)


def test_loads_strictly_and_names_the_unused_heads(release_dir, release_genes):
    release = sf.Release(release_dir)
    assert release.entry == "cell" and release.unpickler == "weights_only"
    assert release.unused == ["decoder", "decoder_embed", "norm", "to_final"]
    assert release.n_genes == 400 and release.seq_len == 402 and release.genes[release_genes[7]] == 7
    assert release.model.pos_emb.weight.shape == (403, D)  # seq_len + 1 rows: the last one for padding
    assert (release.pad_token_id, release.mask_token_id) == (103, 102)
    rde = sf.Release(release_dir, version="rde")
    assert rde.entry == "rde" and not torch.equal(rde.model.pos_emb.weight, release.model.pos_emb.weight)


def _edit_cell_entry(release_dir, edit):
    released = torch.load(release_dir / sf.CHECKPOINT, weights_only=True)
    edit(released["cell"]["state_dict"])
    torch.save(released, release_dir / sf.CHECKPOINT)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"model.encoder.transformer_encoder.0.extra.weight": torch.zeros(2)}), "unexpected"),
    (lambda s: s.pop("model.token_emb.emb_pad.weight"), "missing"),
    (lambda s: s.update({"model.encoder.norm.weight": torch.zeros(D + 1)}), "shape mismatches"),
    (lambda s: s.update({"model.encoder.norm.bias": s["model.encoder.norm.bias"], "net.model.encoder.norm.bias":
                         torch.zeros(D)}), "two keys"),
])
def test_any_other_layout_is_refused(release_dir, edit, message):
    _edit_cell_entry(release_dir, edit)
    with pytest.raises(ValueError, match=message):
        sf.Release(release_dir)


def test_a_gene_list_that_does_not_fit_the_weights_is_refused(release_dir, release_genes):
    (release_dir / sf.GENE_LIST).write_text("gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in
                                                                           enumerate(release_genes[:-1])))
    with pytest.raises(ValueError, match="lists 399 genes"):
        sf.Release(release_dir)
    with pytest.raises(ValueError, match="unknown version"):
        sf.Release(release_dir, version="gene")


def test_parameter_names_are_what_follows_the_first_model_prefix():
    assert sf.parameter_name("model.encoder.norm.weight") == "encoder.norm.weight"
    assert sf.parameter_name("net.model.pos_emb.weight") == "pos_emb.weight"
    with pytest.raises(ValueError, match="no 'model.' prefix"):
        sf.parameter_name("encoder.norm.weight")


def test_input_vector_hand_example():
    # a cell with counts 3, 0, 1 of the list genes 4, 0, 2 (6 genes in the list): total 4, so
    # gene 4 -> log1p(3 / 4 * 1e4) = ln 7501 = 8.9227916, gene 2 -> ln 2501 = 7.8244459;
    # T = 4 (t4) at index 6, S = log10(4) = 0.6020600 at index 7
    vector = sf.input_vector(np.array([3.0, 0.0, 1.0]), np.array([4, 0, 2]), 6, "t4")
    assert vector.dtype == np.float32
    assert np.allclose(vector, [0, 0, 7.8244459, 0, 8.9227916, 0, 4.0, 0.6020600], rtol=1e-6, atol=0)
    # f2: T = log10(4 * 2) = 0.9030900; a5: T = log10(4) + 5 = 5.6020600
    assert math.isclose(sf.input_vector(np.array([3.0, 0.0, 1.0]), np.array([4, 0, 2]), 6, "f2")[6], 0.90309,
                        rel_tol=1e-5)
    assert math.isclose(sf.input_vector(np.array([3.0, 0.0, 1.0]), np.array([4, 0, 2]), 6, "a5")[6], 5.60206,
                        rel_tol=1e-6)
    # only the entries > 0 enter the encoder, in index order, their indices as positions
    values, positions = sf.gather_tokens(vector)
    assert positions.tolist() == [2, 4, 6, 7]
    assert np.array_equal(values, vector[[2, 4, 6, 7]])
    # a cell of total count 1 has S = log10(1) = 0, which is left out like a zero gene: the last
    # token is then T, as in the original (it takes the last two positions whatever they hold)
    values, positions = sf.gather_tokens(sf.input_vector(np.array([1.0]), np.array([3]), 6, "t4"))
    assert positions.tolist() == [3, 6] and np.allclose(values, [math.log(10001.0), 4.0])
    with pytest.raises(ValueError, match="tgthighres"):
        sf.resolution_tokens(4.0, "x4")


def test_pooling_hand_example():
    hidden = torch.tensor([[[1., 8.], [3., 2.], [5., 5.], [7., 0.], [9., 1.]],
                           [[2., 4.], [6., 0.], [4., 6.], [99., 99.], [99., 99.]]])  # cell 2: 3 tokens + padding
    pooled = sf.pool(hidden, torch.tensor([5, 3]))
    # cell 1: last token [9, 1] (S), second-to-last [7, 0] (T), max and mean of the first three tokens
    assert pooled[0].tolist() == [9., 1., 7., 0., 5., 8., 3., 5.]
    # cell 2: S [4, 6], T [6, 0], then only its first token; the padding rows are ignored
    assert pooled[1].tolist() == [4., 6., 6., 0., 2., 4., 2., 4.]


def test_value_embedding_follows_the_soft_binning_formula(release_dir):
    emb = sf.Release(release_dir).model.token_emb
    values = torch.tensor([[0.5, 102.0, 103.0, 7.25]])
    with torch.no_grad():
        out = emb(values)
    w = {k: v.double().numpy() for k, v in emb.state_dict().items()}
    for i, v in enumerate([0.5, 7.25]):
        h = w["mlp.weight"][:, 0] * v + w["mlp.bias"]
        h = np.where(h > 0, h, 0.1 * h)  # LeakyReLU(0.1)
        logits = 1.0 * h + w["mlp2.weight"] @ h + w["mlp2.bias"]  # bin_alpha = 1
        p = np.exp(logits - logits.max())
        expected = (p / p.sum()) @ w["emb.weight"]
        assert np.allclose(out[0, 3 * i].numpy(), expected, atol=1e-6)
    assert torch.equal(out[0, 1], emb.emb_mask.weight[0]) and torch.equal(out[0, 2], emb.emb_pad.weight[0])


def _reference_encoder(release):
    """What the original builds: PyTorch's own post-norm layers (batch_first, ReLU, 4 d) and a LayerNorm."""
    layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(D, HEADS, 4 * D, batch_first=True)
                                 for _ in range(DEPTH))
    reference = torch.nn.Module()
    reference.transformer_encoder, reference.norm = layers, torch.nn.LayerNorm(D)
    reference.load_state_dict(release.model.encoder.state_dict())  # strict: our names are PyTorch's
    return reference.eval()


def test_encoder_equals_pytorchs_own_layers(release_dir):
    release = sf.Release(release_dir)
    reference = _reference_encoder(release)
    torch.manual_seed(0)
    x = torch.randn(3, 9, D)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    ours, _ = release.model.encoder(x, padding, "sdpa")
    expected = x
    for layer in reference.transformer_encoder:
        expected = layer(expected, src_key_padding_mask=padding)
    expected = reference.norm(expected)
    keep = ~padding
    assert torch.allclose(ours[keep], expected[keep], atol=1e-5)


def test_batched_embedding_equals_the_original_one_cell_at_a_time(release_dir):
    """embed() (cells ordered by length, padded, 3 per batch) against the original's procedure:
    one cell per forward, no padding, PyTorch's layers, pooled by position."""
    release = sf.Release(release_dir)
    reference = _reference_encoder(release)
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.gamma(0.4, 2.0, size=(7, 60))).astype(float)
    counts[2, 3:] = 0
    counts[2, :3] = 2
    gene_index = rng.permutation(400)[:60]
    ours = sf.embed(counts, gene_index, release, tgthighres="a5", batch_size=3)
    assert ours.shape == (7, 4 * D) and ours.dtype == np.float32
    for i in range(7):
        values, positions = sf.gather_tokens(sf.input_vector(counts[i], gene_index, 400, "a5"))
        with torch.no_grad():
            h = release.model.token_emb(torch.from_numpy(values)[None]) + \
                release.model.pos_emb(torch.from_numpy(positions)[None])
            for layer in reference.transformer_encoder:
                h = layer(h)
            h = reference.norm(h)[0]
        expected = torch.cat([h[-1], h[-2], h[:-2].max(0).values, h[:-2].mean(0)]).numpy()
        assert np.allclose(ours[i], expected, atol=1e-5), i


def test_cells_with_too_few_tokens_are_not_applicable(release_dir):
    counts = np.array([[0.0, 0.0, 0.0], [1.0, 4.0, 0.0]])  # the first cell has no count: only T
    with pytest.raises(NotApplicable, match="1 of 2 cells"):
        sf.embed(counts, np.array([0, 1, 2]), sf.Release(release_dir))


def test_published_configuration():
    config = sf.merged_config(rw.scfoundation_config(rw.SCFOUNDATION_PUBLISHED_SIZES, 19264))
    assert config["seq_len"] == 19266 and config["bin_num"] == 100 and config["bin_alpha"] == 1.0
    assert config["encoder"] == {"hidden_dim": 768, "depth": 12, "heads": 12, "dim_head": 64, "seq_len": 19266,
                                 "module_type": "transformer", "norm_first": False}
    assert (config["decoder"]["hidden_dim"], config["decoder"]["depth"], config["decoder"]["heads"]) == (512, 6, 8)


def _embed(tiny, checkpoints_dir):
    return embed_cells(Job.of(tiny.prepared, tiny.splits["all"], REPO / "models" / "scfoundation", seed=0,
                              options={"batch_role": "condition"}, checkpoints_dir=checkpoints_dir))


def test_runner_embeds_deterministically_and_records_the_kernel(release_dir, tiny):
    first, second = _embed(tiny, release_dir.parent), _embed(tiny, release_dir.parent)
    assert first.status == "ok", first.columns["status_reason"]
    assert first.embedding.shape == (200, 4 * D) and np.array_equal(first.embedding, second.embedding)
    runtime = json.loads(first.columns["runtime_json"])
    assert runtime["attention"].startswith("sdpa") and runtime["genes_matched"] == "400/500"
    assert runtime["checkpoint_entry"] == "cell" and runtime["unused_heads"] == ["decoder", "decoder_embed", "norm",
                                                                                  "to_final"]
    assert first.columns["leakage"] == "unknown"  # the corpus' study list is not resolved to datasets yet
