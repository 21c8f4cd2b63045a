"""Geneformer adapter: small random releases in the published V1 and V2 layouts, loaded strictly and run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cellarena.zoo.adapters import geneformer as gf
from cellarena.zoo.adapters import random_weights as rw
from cellarena.run.embedding import embed_cells
from cellarena.run.setup import Job

REPO = Path(__file__).resolve().parent.parent
MODEL_DIRS = {"V1": REPO / "models" / "geneformer", "V2": REPO / "models" / "geneformer_v2"}
FOLDERS = {"V1": "Geneformer-V1-10M", "V2": "Geneformer-V2-104M"}


def _genes(tiny, n=400):
    return list(ad.read_h5ad(tiny.prepared, backed="r").var_names[:n])  # 80 % of the tiny data's genes


@pytest.fixture(params=["V1", "V2"])
def release_dir(request, tmp_path, tiny):
    version = request.param
    return rw.write_geneformer(tmp_path / "checkpoints" / FOLDERS[version], _genes(tiny), version=version)


def test_loads_strictly_with_the_versions_special_tokens(release_dir):
    release = gf.Release(release_dir)
    assert release.unused == ["cls.predictions"] and release.pad_id == 0 and release.input_size == 256
    if release.version == "V1":  # <pad> <mask> then genes; the V1 file carries position_ids
        assert not release.special and release.cls_id is None and len(release.token_dict) == 402
        assert gf.POSITION_IDS in load_file(release_dir / "model.safetensors")
    else:
        assert release.special and (release.cls_id, release.eos_id) == (2, 3) and len(release.token_dict) == 404
    assert np.isnan(release.medians[:2]).all() and np.isfinite(release.medians[len(release.token_dict) - 400:]).all()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"bert.encoder.layer.0.extra.weight": torch.zeros(2)}), "unexpected"),
    (lambda s: s.pop("bert.embeddings.LayerNorm.bias"), "missing"),
    (lambda s: s.update({"bert.encoder.layer.1.output.LayerNorm.weight": torch.zeros(7)}), "shape mismatches"),
    (lambda s: s.update({gf.POSITION_IDS: torch.arange(256).flip(0)[None]}), "is not 0..255"),
])
def test_any_other_layout_is_refused(tmp_path, tiny, edit, message):
    folder = rw.write_geneformer(tmp_path / "r", _genes(tiny), version="V1")
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        gf.Release(folder)


def test_both_weight_formats_and_old_layernorm_names_load_the_same_weights(tmp_path, tiny):
    genes = _genes(tiny)
    both = rw.write_geneformer(tmp_path / "both", genes, version="V1", weights="both", seed=4)
    from_safetensors = gf.Release(both).model.state_dict()
    (both / "model.safetensors").unlink()
    release = gf.Release(both)  # pytorch_model.bin, with the tied decoder weights of .bin files
    assert release.weights_file.name == "pytorch_model.bin" and release.unused == ["cls.predictions"]
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in torch.load(both / "pytorch_model.bin", weights_only=True).items()}
    torch.save(old, both / "pytorch_model.bin")
    for state in (release.model.state_dict(), gf.Release(both).model.state_dict()):
        assert state.keys() == from_safetensors.keys()
        assert all(torch.equal(state[k], from_safetensors[k]) for k in state)


def test_a_pickle_referencing_code_is_refused(tmp_path, tiny):
    folder = rw.write_geneformer(tmp_path / "r", _genes(tiny), version="V2")
    with open(folder / "gene_median_dictionary_gc104M.pkl", "wb") as f:
        pickle.dump({"ENSG90000000000": Path("x")}, f)
    with pytest.raises(pickle.UnpicklingError, match="pathlib"):
        gf.Release(folder)


def test_rank_tokenization_hand_example(tmp_path, tiny):
    """Seven genes (tokens 10..16), the cell's total over all its genes 32 (16 of them elsewhere).
    value = count / 32 * 10000 / median = count * 312.5 / median (exact in binary):
      gene 0: count 0                -> dropped       gene 4: 1 * 312.5 / 0.25 = 1250
      gene 1: 4 * 312.5 / 2   = 625                   gene 5: 3 * 312.5 / 1    = 937.5
      gene 2: 2 * 312.5 / 1   = 625                   gene 6: 6 * 312.5 / 2    = 937.5
      gene 3: count 0                -> dropped
    So 14 first, then 15 and 16 (tied), then 11 and 12 (tied). Within a tie the original's order is
    np.argsort(-values) on the non-zero genes in column order (numpy's default, unstable sort)."""
    counts = np.array([0, 4, 2, 0, 1, 3, 6], dtype=float)
    medians = np.array([1, 2, 1, 4, 0.25, 1, 2], dtype=float)
    tokens = np.arange(10, 17)
    values = counts / 32 * 10000 / medians
    assert values[[4, 5, 6, 1, 2]].tolist() == [1250.0, 937.5, 937.5, 625.0, 625.0]
    nonzero = np.flatnonzero(counts)
    numpy_order = tokens[nonzero][np.argsort(-values[nonzero])].tolist()
    v1 = gf.Release(rw.write_geneformer(tmp_path / "v1", _genes(tiny), version="V1"))
    v2 = gf.Release(rw.write_geneformer(tmp_path / "v2", _genes(tiny), version="V2"))
    cell = gf.tokenize_cell(counts, 32.0, tokens, medians, v1)
    assert cell[0] == 14 and set(cell[1:3]) == {15, 16} and set(cell[3:]) == {11, 12}
    assert cell.tolist() == numpy_order
    assert gf.tokenize_cell(counts, 32.0, tokens, medians, v2).tolist() == [2, *numpy_order, 3]  # <cls> .. <eos>
    v1.input_size, v2.input_size = 3, 4  # truncation keeps the top genes; V2 keeps room for <cls> and <eos>
    assert gf.tokenize_cell(counts, 32.0, tokens, medians, v1).tolist() == numpy_order[:3]
    assert gf.tokenize_cell(counts, 32.0, tokens, medians, v2).tolist() == [2, *numpy_order[:2], 3]
    assert gf.tokenize_cell(counts * 0, 0.0, tokens, medians, v2).tolist() == [2, 3]


def test_genes_mapping_to_one_id_are_summed_after_the_others():
    # distinct Ensembl ids A, B, C, D but only three distinct mapped tokens: the original collapses.
    # Columns 1 (token 6) and 3 (token 7) keep their order; 0 and 2 (token 5) become one summed column, last.
    aggregate, tokens = gf.collapse_columns(["A", "B", "C", "D"], [5, 6, 5, 7])
    assert tokens.tolist() == [6, 7, 5]
    assert aggregate.toarray().tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0]]
    # as many distinct ids as tokens (a dataset listing one id twice): nothing moves, nothing is summed
    aggregate, tokens = gf.collapse_columns(["A", "A", "B"], [5, 5, 6])
    assert tokens.tolist() == [5, 5, 6] and aggregate.toarray().tolist() == np.eye(3).tolist()


def test_gene_names_map_through_the_release_dictionaries(tmp_path):
    folder = rw.write_geneformer(tmp_path / "r", ["AAA", "BBB", "CCC", "DDD"], version="V2")
    with open(folder / "ensembl_mapping_dict_gc104M.pkl", "rb") as f:
        mapping = pickle.load(f)
    mapping["ENSG90000000001"] = "ENSG90000000000"  # BBB's id collapses onto AAA's
    del mapping["ENSG90000000002"]  # CCC's id is not in the mapping: dropped
    with open(folder / "ensembl_mapping_dict_gc104M.pkl", "wb") as f:
        pickle.dump(mapping, f)
    release = gf.Release(folder)
    genes = ["DDD", "XYZ", "AAA", "ENSG90000000003", "BBB", "CCC"]  # an Ensembl id is taken as it is
    found, aggregate, tokens = gf.gene_columns(genes, release, min_fraction=0.5)
    assert found.tolist() == [0, 2, 3, 4]
    # DDD and the id ENSG..3 share token 7 but are one id: ids DDD, AAA, ENSG..3, BBB -> 3 distinct ids,
    # tokens 7, 4, 7, 4 -> 2 distinct: collapsed, both pairs summed, in order of first appearance
    assert tokens.tolist() == [7, 4] and aggregate.toarray().tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]


def test_layers_equal_pytorchs_post_norm_encoder_layer(tmp_path, tiny):
    """The same weights in torch.nn.TransformerEncoderLayer (post-norm, ReLU, eps 1e-12)."""
    release = gf.Release(rw.write_geneformer(tmp_path / "r", _genes(tiny), version="V2", seed=2))
    d, heads, d_ff, layers, _ = rw.GENEFORMER_TEST_SIZES["V2"]
    torch.manual_seed(0)
    ids = torch.randint(4, 404, (3, 11))
    ids[1, 7:] = release.pad_id
    padding = ids.eq(release.pad_id)
    emb = release.model.bert.embeddings
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0]
                      + emb.position_embeddings.weight[:11])  # token type 0, positions 0..L-1
    assert torch.allclose(release.model(ids, padding, 0), x, atol=1e-6)
    for layer in range(layers):
        p = f"bert.encoder.layer.{layer}."
        s = release.model.state_dict()
        qkv = ("query", "key", "value")
        reference = torch.nn.TransformerEncoderLayer(d, heads, d_ff, dropout=0.0, activation="relu",
                                                     layer_norm_eps=1e-12, batch_first=True).eval()
        reference.load_state_dict({
            "self_attn.in_proj_weight": torch.cat([s[p + f"attention.self.{n}.weight"] for n in qkv]),
            "self_attn.in_proj_bias": torch.cat([s[p + f"attention.self.{n}.bias"] for n in qkv]),
            "self_attn.out_proj.weight": s[p + "attention.output.dense.weight"],
            "self_attn.out_proj.bias": s[p + "attention.output.dense.bias"],
            "linear1.weight": s[p + "intermediate.dense.weight"], "linear1.bias": s[p + "intermediate.dense.bias"],
            "linear2.weight": s[p + "output.dense.weight"], "linear2.bias": s[p + "output.dense.bias"],
            "norm1.weight": s[p + "attention.output.LayerNorm.weight"],
            "norm1.bias": s[p + "attention.output.LayerNorm.bias"],
            "norm2.weight": s[p + "output.LayerNorm.weight"], "norm2.bias": s[p + "output.LayerNorm.bias"]})
        with torch.no_grad():
            x = reference(x, src_key_padding_mask=padding)
            ours = release.model(ids, padding, layer + 1)
        assert torch.allclose(ours[~padding], x[~padding], atol=1e-5), layer


def test_pooling_follows_the_original(tmp_path, tiny):
    v2 = gf.Release(rw.write_geneformer(tmp_path / "v2", _genes(tiny), version="V2"))
    v1 = gf.Release(rw.write_geneformer(tmp_path / "v1", _genes(tiny), version="V1"))
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    lengths = torch.tensor([5, 3])
    # V2 "cell": positions 1..length-2 (<cls> first and <eos> last excluded); "cls": position 0
    assert gf.pool(hidden, lengths, v2, "cell").tolist() == [hidden[0, 1:4].mean(0).tolist(),
                                                            hidden[1, 1:2].mean(0).tolist()]
    assert gf.pool(hidden, lengths, v2, "cls").tolist() == hidden[:, 0].tolist()
    assert gf.pool(hidden, lengths, v1, "cell").tolist() == [hidden[0].mean(0).tolist(), hidden[1, :3].mean(0).tolist()]


def test_embedding_layer_and_cells_without_genes(tmp_path, tiny):
    release = gf.Release(rw.write_geneformer(tmp_path / "r", [f"G{i}" for i in range(6)], version="V1"))
    counts = np.array([[0, 3, 1, 0, 0, 2], [0, 0, 0, 0, 0, 0], [5, 1, 0, 0, 2, 0]], dtype=float)
    tokens = np.arange(2, 8)
    emb, summary = gf.embed(counts, counts.sum(1) + 1, tokens, release, emb_mode="cls", batch_size=2)
    assert summary == {"emb_mode": "cell", "emb_layer": -1, "layers_run": 1, "cells_truncated": 0,
                       "cells_without_genes": 1}
    assert np.all(emb[1] == 0) and np.all(np.abs(emb[[0, 2]]).sum(1) > 0)
    cell = gf.tokenize_cell(counts[0], counts[0].sum() + 1, tokens, release.medians[tokens], release)
    ids = torch.from_numpy(cell)[None]
    expected = release.model(ids, torch.zeros_like(ids, dtype=torch.bool), 1).mean(1)  # after layer 1 of 2
    assert torch.allclose(torch.from_numpy(emb[0]), expected[0], atol=1e-6)
    last, _ = gf.embed(counts, counts.sum(1) + 1, tokens, release, emb_layer=0)
    assert not np.allclose(last[0], emb[0])


def test_published_sizes_match_the_released_files():
    """Parameters at GENEFORMER_PUBLISHED_SIZES (vocabularies from the released config.json files),
    plus the unused cls.predictions head (dense d x d, LayerNorm, bias per token; decoder tied), times
    4 bytes, fall just under the published safetensors sizes (the rest is the file's JSON header, and
    V1's int64 position_ids)."""
    for version, vocab, published in (("V1", 25426, 41183536), ("V2", 20275, 417571156)):
        d, heads, d_ff, layers, positions = rw.GENEFORMER_PUBLISHED_SIZES[version]
        model = gf.GeneformerEncoder({"hidden_size": d, "num_attention_heads": heads, "intermediate_size": d_ff,
                                      "num_hidden_layers": layers, "max_position_embeddings": positions,
                                      "vocab_size": vocab, "hidden_act": "relu"})
        n = sum(p.numel() for p in model.parameters()) + d * d + d + 2 * d + vocab
        payload = 4 * n + (8 * positions if version == "V1" else 0)
        assert 0 < published - payload < 32_000, (version, n, published - payload)
    assert n == 104_386_867  # "Geneformer-V2-104M"


def test_a_random_v1_file_at_published_sizes_has_the_published_files_size(tmp_path):
    """The safetensors header lists every key with its dtype and shape, so equal sizes mean the same
    key set: 25,424 genes + <pad> + <mask> = the released vocab_size 25426. (The same holds for V2:
    a random Geneformer-V2-104M file is 417,571,156 bytes, as published; too big to write here.)"""
    folder = rw.write_geneformer(tmp_path / "v1", [f"G{i}" for i in range(25424)], version="V1",
                                 sizes=rw.GENEFORMER_PUBLISHED_SIZES)
    assert (folder / "model.safetensors").stat().st_size == 41183536
    assert gf.Release(folder).model.n_layers == 6


def _embed(tiny, version, checkpoints_dir):
    return embed_cells(Job.of(tiny.prepared, tiny.splits["all"], MODEL_DIRS[version], seed=0,
                              options={"batch_role": "condition"}, checkpoints_dir=checkpoints_dir))


def test_runner_embeds_deterministically_and_records_the_kernel(release_dir, tiny):
    version = gf.Release(release_dir).version
    first, second = _embed(tiny, version, release_dir.parent), _embed(tiny, version, release_dir.parent)
    assert first.status == "ok", first.columns["status_reason"]
    d = rw.GENEFORMER_TEST_SIZES[version][0]
    assert first.embedding.shape == (200, d) and np.array_equal(first.embedding, second.embedding)
    runtime = json.loads(first.columns["runtime_json"])
    assert runtime["attention"].startswith("sdpa") and runtime["genes_matched"] == "400/500"
    # the card defaults: V1 mean over genes, V2 <cls>; both after the second-to-last of their 2 and 3 layers
    assert (runtime["emb_mode"], runtime["layers_run"]) == (("cell", 1) if version == "V1" else ("cls", 2))
    assert runtime["unused_heads"] == ["cls.predictions"] and runtime["weights"] == "model.safetensors"
    assert first.columns["leakage"] == "unknown"  # the corpora are not resolved to datasets yet


def test_a_release_of_the_other_version_is_refused(tmp_path, tiny):
    folder = rw.write_geneformer(tmp_path / "ck" / FOLDERS["V1"], _genes(tiny), version="V2")
    for path in folder.glob("*_gc104M.pkl"):  # V2 dictionaries under the V1 card's names
        path.rename(path.with_name(path.name.replace("gc104M", "gc30M")))
    run = _embed(tiny, "V1", tmp_path / "ck")
    assert run.status == "failed" and "holds a Geneformer V2 release" in run.columns["status_reason"]


def test_a_gene_without_a_median_fails_only_when_the_data_has_it(tmp_path):
    folder = rw.write_geneformer(tmp_path / "r", ["AAA", "BBB", "CCC"], version="V1")
    with open(folder / "gene_median_dictionary_gc30M.pkl", "rb") as f:
        medians = pickle.load(f)
    del medians["ENSG90000000001"]  # BBB
    with open(folder / "gene_median_dictionary_gc30M.pkl", "wb") as f:
        pickle.dump(medians, f)
    release = gf.Release(folder)
    assert gf.gene_columns(["AAA", "CCC"], release, min_fraction=0.5)[2].tolist() == [2, 4]
    with pytest.raises(ValueError, match=r"no median .*\['ENSG90000000001'\]"):
        gf.gene_columns(["AAA", "BBB"], release, min_fraction=0.5)
