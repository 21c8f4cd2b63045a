"""CellPLM adapter: a small random checkpoint in the released file layout, loaded strictly and run."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellarena.zoo.adapters import cellplm, random_weights
from cellarena.run.embedding import embed_cells
from cellarena.run.setup import Job

REPO = Path(__file__).resolve().parent.parent
CKPT, CONFIG, SYMBOLS = cellplm.FILES
S = random_weights.CELLPLM_TEST_SIZES


@pytest.fixture
def release_dir(tmp_path, release_genes):
    return random_weights.write_cellplm(tmp_path / "checkpoints" / "CellPLM", release_genes)


def test_loads_strictly_and_names_the_unused_heads(release_dir):
    release = cellplm.Release(release_dir)
    assert release.unused == ["decoder", "embedder.norm0", "embedder.pe_enc"]
    assert release.latent_kind == "gmvae" and release.dim == S.latent
    assert len(release.gene_list) == 400 and release.gene_list[0] == "ENSG90000000000"
    assert len(release.symbol_index) == 400 and release.ambiguous_symbols == 0


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"encoder.layers.0.extra.weight": torch.zeros(2)}), "unexpected"),
    (lambda s: s.pop("pre_latent_norm.norm.bias"), "missing"),
    (lambda s: s.pop("latent.layers.1.inference.y_var.weight"), "missing"),
    (lambda s: s.update({"embedder.feat_enc.emb": torch.zeros(400, S.enc_hid + 1)}), "shape mismatches"),
    # a DDP-wrapped model's keys: the original would load none of them and silently keep random weights
    (lambda s: s.update({f"module.{k}": s.pop(k) for k in list(s)}), "missing"),
])
def test_any_other_layout_is_refused(release_dir, edit, message):
    released = torch.load(release_dir / CKPT, weights_only=True)
    edit(released["model_state_dict"])
    torch.save(released, release_dir / CKPT)
    with pytest.raises(ValueError, match=message):
        cellplm.Release(release_dir)


def test_a_bare_state_dict_or_another_configuration_is_refused(release_dir):
    config = json.loads((release_dir / CONFIG).read_text())
    (release_dir / CONFIG).write_text(json.dumps({**config, "enc_mod": "performer", "dsbn": True}))
    with pytest.raises(ValueError, match="enc_mod 'performer'.*dsbn true"):
        cellplm.Release(release_dir)
    (release_dir / CONFIG).write_text(json.dumps(config))
    torch.save(torch.load(release_dir / CKPT, weights_only=True)["model_state_dict"], release_dir / CKPT)
    with pytest.raises(ValueError, match="no 'model_state_dict' entry"):
        cellplm.Release(release_dir)


def test_the_written_layout_has_the_original_models_size_at_published_sizes():
    """OmicsFormer(**ckpt/20230926_85M.config.json) holds 82,402,543 values (counted with the
    original package, whose key names, order and shapes random_weights.write_cellplm reproduces)."""
    state = random_weights.cellplm_state(random_weights.CELLPLM_PUBLISHED_SIZES, 19374, "gmvae",
                                         torch.Generator().manual_seed(0))
    assert sum(v.numel() for v in state.values()) == 82402543
    assert tuple(state["latent.layers.1.inference.inference_qzyx.0.weight"].shape) == (512, 1024 + 16)
    assert tuple(state["embedder.pe_enc.pe_enc.weight"].shape) == (10000, 1024)


def test_genes_match_by_id_or_through_the_symbol_table(release_dir):
    ids = [f"ENSG9{i:010d}" for i in range(4)]
    (release_dir / SYMBOLS).write_text("ensembl_id\tsymbol\n" + f"{ids[0]}\tA\n{ids[1]}\tB\n{ids[2]}\tB\n"
                                       f"{ids[3]}\t0\nENSG00000999999\tC\n")
    release = cellplm.Release(release_dir)
    # A names one id of the list; B names two (left out); 0 is "no symbol"; C's id is not in the list
    assert release.symbol_index == {"A": 0} and release.ambiguous_symbols == 1
    vocabulary, how = release.vocabulary(["B", "A", "C", "Z"])
    assert how == f"symbols via {SYMBOLS}" and [vocabulary.get(g, -1) for g in ["B", "A", "C", "Z"]] == [-1, 0, -1, -1]
    # any name that is an id of the list: every name is read as an id (the original then converts nothing)
    vocabulary, how = release.vocabulary(["A", ids[2]])
    assert how == "Ensembl ids" and [vocabulary.get(g, -1) for g in ["A", ids[2]]] == [-1, 2]


def test_input_is_log1p_of_raw_counts_summed_over_gene_rows(release_dir):
    release = cellplm.Release(release_dir)
    embedder = release.model.embedder
    counts = sp.csr_matrix(np.array([[0.0, 3.0, 1.0], [7.0, 0.0, 0.0]], dtype=np.float32))
    rows = torch.tensor([2, 0, 1])  # data column j is gene-list row rows[j]
    emb = embedder.feat_enc.emb.detach()
    # cell 0: log1p(3) x row 0 + log1p(1) x row 1; cell 1: log1p(7) x row 2; no library-size scaling
    expected = torch.stack([math.log1p(3) * emb[0] + math.log(2) * emb[1], math.log1p(7) * emb[2]])
    mixed = cellplm._log_counts(counts, "cpu") @ emb.index_select(0, rows)
    assert torch.allclose(mixed, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(embedder(cellplm._log_counts(counts, "cpu"), rows), embedder.extra_linear(expected),
                              atol=1e-5)


def test_forward_passes_follow_the_originals_grouping_and_order():
    batch = ["b", "a", "b", "a", "c", "b", "b"]
    # groups in sorted label order (a, b, c), cells in data order, cut into chunks of 2
    assert [c.tolist() for c in cellplm.chunks(7, batch, 2)] == [[1, 3], [0, 2], [5, 6], [4]]
    assert [c.tolist() for c in cellplm.chunks(7, batch, 0)] == [[1, 3], [0, 2, 5, 6], [4]]
    assert [c.tolist() for c in cellplm.chunks(5, None, 0)] == [[0, 1, 2, 3, 4]]


def _flow_reference(q, k, v, eps=1e-6):
    """Flow-Attention written per cell with explicit sums (Wu et al. 2022, eqs. for the non-causal
    case): q, k already sigmoid-mapped, (H, L, Dh)."""
    k_total, q_total = k.sum(1), q.sum(1)  # (H, Dh)
    incoming = 1 / torch.einsum("hid,hd->hi", q + eps, k_total + eps)
    outgoing = 1 / torch.einsum("hjd,hd->hj", k + eps, q_total + eps)
    sink = torch.einsum("hid,hd->hi", q + eps, torch.einsum("hjd,hj->hd", k, outgoing) + eps)
    source = torch.einsum("hjd,hd->hj", k + eps, torch.einsum("hid,hi->hd", q, incoming) + eps).clamp(-1, 1)
    competition = torch.softmax(source, dim=1) * k.shape[1]
    weights = torch.einsum("hid,hjd->hij", q, k) * incoming[:, :, None]  # cell i's weight on cell j
    return torch.einsum("hij,hj,hjd->hid", weights, competition, v) * torch.sigmoid(sink)[:, :, None]


def test_flow_attention_equals_the_per_cell_formula(release_dir):
    attention = cellplm.Release(release_dir).model.encoder.layers[0].self_attn
    x = torch.randn(11, S.enc_hid, generator=torch.Generator().manual_seed(0))
    heads, d = attention.heads, x.shape[1]

    def split(t):
        return t.view(11, heads, d // heads).transpose(0, 1)

    with torch.no_grad():
        q = torch.sigmoid(split(attention.query_projection(x)))
        k = torch.sigmoid(split(attention.key_projection(x)))
        ref = _flow_reference(q, k, split(attention.value_projection(x)))
        expected = attention.out_projection(ref.transpose(0, 1).reshape(11, d))
        assert torch.allclose(attention(x), expected, atol=1e-5)
        # the sequence is the cells: a cell's output depends on the other cells
        assert not torch.allclose(attention(x[:5])[0], attention(x)[0], atol=1e-4)


def test_layer_is_pre_norm_with_a_gelu_feed_forward(release_dir):
    layer = cellplm.Release(release_dir).model.encoder.layers[0]
    x = torch.randn(6, S.enc_hid, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mid = x + layer.self_attn(torch.nn.functional.layer_norm(x, (x.shape[1],), layer.norm1.weight,
                                                                 layer.norm1.bias))
        ff = layer._ff_block
        h = torch.nn.functional.layer_norm(mid, (x.shape[1],), layer.norm2.weight, layer.norm2.bias)
        expected = mid + ff[3](torch.nn.functional.gelu(ff[0](h)))
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_gmvae_embedding_is_the_mean_for_the_gumbel_sampled_cluster(release_dir):
    latent = cellplm.Release(release_dir).model.latent.layers[1]
    k = S.clusters
    h = torch.randn(3, S.enc_hid, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = latent.inference.inference_qyx[0].logits
        logits.weight.zero_()
        logits.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
        # uniforms: a Gumbel draw of -log(-log(u)); cell 0 draws cluster 1 far above the others (u near 1),
        # cell 1 draws nothing special (the logit 5 of cluster 2 wins), cell 2 draws cluster 3 at u = 1 - 1e-7
        u = torch.tensor([[0.5, 0.999999, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 1 - 1e-7]])
        chosen = [1, 2, 3]
        hidden, relu, gaussian = latent.inference.inference_qzyx
        expected = gaussian.mu(relu(hidden(torch.cat([h, torch.eye(k)[chosen]], dim=1))))
        assert torch.allclose(latent(h, u), expected, atol=1e-5)


def test_draws_follow_torchs_global_stream_as_the_original_consumes_it(release_dir):
    """After torch.manual_seed(s) the original draws one int64 (its DataLoader), then per forward
    pass the Gumbel uniforms (cells x clusters) and unused normals (cells x latent)."""
    model = cellplm.Release(release_dir).model
    torch.manual_seed(5)
    iter(torch.utils.data.DataLoader([0], batch_size=None))
    expected = [torch.rand(7, model.clusters), torch.randn(7, model.latent_dim), torch.rand(3, model.clusters)]
    g = torch.Generator().manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    first, second = model.draw(7, g), model.draw(3, g)
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[2])


def _synthetic(release, n_cells=90, seed=0):
    rng = np.random.default_rng(seed)
    names = list(rng.permutation(release.gene_list)[:300]) + [f"ENSG8{i:010d}" for i in range(20)]
    counts = sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, (n_cells, len(names)))).astype(np.float32))
    batch = np.array(["b", "a", "c"])[rng.integers(0, 3, n_cells)]
    return names, counts, batch


def _embed(release, names, counts, batch, seed, batch_size):
    vocabulary, _ = release.vocabulary(names)
    cols = [i for i, g in enumerate(names) if g in vocabulary]
    rows = np.array([vocabulary[names[i]] for i in cols])
    return cellplm.embed(counts[:, cols], rows, release, seed=seed, batch=batch, batch_size=batch_size)


@pytest.mark.parametrize("kind", ["gmvae", "vae"])
def test_matches_the_original_package_when_installed(tmp_path, kind):
    """The original CellEmbeddingPipeline.predict on the same files (pip install cellplm einops)."""
    pipeline_module = pytest.importorskip("CellPLM.pipeline.cell_embedding")
    folder = random_weights.write_cellplm(tmp_path / kind, [f"G{i}" for i in range(400)], latent_kind=kind)
    release = cellplm.Release(folder)
    names, counts, batch = _synthetic(release)
    for use_batch, batch_size in ((False, 0), (True, 25)):
        obs = pd.DataFrame({"batch": batch} if use_batch else {}, index=[f"c{i}" for i in range(counts.shape[0])])
        data = ad.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=names))
        pipeline = pipeline_module.CellEmbeddingPipeline(pretrain_prefix=cellplm.PREFIX, pretrain_directory=str(folder))
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original = pipeline.predict(data, inference_config={"batch_size": batch_size}, device="cpu").numpy()
        ours, _ = _embed(release, names, counts, batch if use_batch else None, 3, batch_size)
        assert np.allclose(ours, original, atol=2e-4), np.abs(ours - original).max()


def test_gmvae_draws_are_seeded_and_vae_draws_do_not_matter(tmp_path):
    genes = [f"G{i}" for i in range(400)]
    for kind in ("gmvae", "vae"):
        release = cellplm.Release(random_weights.write_cellplm(tmp_path / kind, genes, latent_kind=kind))
        names, counts, batch = _synthetic(release)
        a, passes = _embed(release, names, counts, batch, 0, 0)
        b, _ = _embed(release, names, counts, batch, 0, 0)
        c, _ = _embed(release, names, counts, batch, 1, 0)
        assert np.array_equal(a, b) and sorted(passes) == sorted(np.unique(batch, return_counts=True)[1].tolist())
        assert np.array_equal(a, c) == (kind == "vae")
        # cells are the attention's sequence: other chunk-mates, other embeddings
        d, passes = _embed(release, names, counts, batch, 0, 10)
        assert max(passes) == 10 and not np.allclose(a, d, atol=1e-4)


def test_runner_embeds_deterministically_and_records_the_attention(release_dir, tiny):
    def run():
        return embed_cells(Job.of(tiny.prepared, tiny.splits["all"], REPO / "models" / "cellplm", seed=0,
                                  options={"batch_role": "condition"}, checkpoints_dir=release_dir.parent))

    first, second = run(), run()
    assert first.status == "ok", first.columns["status_reason"]
    assert first.embedding.shape == (200, S.latent)
    assert np.array_equal(first.embedding, second.embedding)
    runtime = json.loads(first.columns["runtime_json"])
    assert runtime["attention"] == "flow_attention" and runtime["genes_matched"] == "400/500"
    assert runtime["gene_ids"] == f"symbols via {SYMBOLS}" and runtime["latent"] == "gmvae"
    assert runtime["grouped_by_batch"] is True and runtime["forward_passes"] == 2  # ctrl and stim
    assert runtime["random_weights"] is True  # random_weights marks its folders
    assert first.columns["leakage"] == "unknown"  # the corpus is not resolved to datasets yet
