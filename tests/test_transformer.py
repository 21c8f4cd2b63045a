"""The in-suite transformer library: tokenization by hand, attention paths, determinism, training,
checkpoints. CPU and fast; the GPU test is skipped without CUDA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellarena.errors import NotApplicable
from cellarena.zoo.transformer import api, train as train_mod
from cellarena.zoo.transformer import model as model_mod
from cellarena.zoo.transformer.checkpoint import (CheckpointError, CheckpointMismatch, load_checkpoint,
                                              save_checkpoint)
from cellarena.zoo.transformer.model import CellTransformer, math_attention, preset, sdpa_attention
from cellarena.zoo.transformer.tokenize import (CLS, ENCODINGS, PAD, CellTokenizer, GeneVocab,
                                            compute_gene_medians)
from cellarena.zoo.transformer.train import build_model, embed, pretrain


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest and is not slowed by a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# a one-cell example worked out by hand
#
# columns A B C D E F OTHER; OTHER is not in the vocabulary but counts towards the library size.
# counts  8 0 2 4 1 5 5      -> total 25; target_sum 100 -> normalized = 4 * count
# normalized A=32 C=8 D=16 E=4 F=20 (B is zero and dropped)
# vocabulary: 3 specials, one sample group "batch" with 4 slots (ids 3..6: unknown, b1, b2, free),
# genes from id 7: A=7 B=8 C=9 D=10 E=11 F=12

GENES = ["A", "B", "C", "D", "E", "F", "OTHER"]
COUNTS = np.array([[8, 0, 2, 4, 1, 5, 5]], dtype=np.float32)
A, B, C, D, E, F = 7, 8, 9, 10, 11, 12
UNKNOWN_BATCH, B1, B2 = 3, 4, 5


@pytest.fixture
def hand_vocab():
    return GeneVocab(genes=["A", "B", "C", "D", "E", "F"], sample_groups={"batch": ["b1", "b2"]},
                     sample_slots=4, medians=np.array([64.0, 1.0, 2.0, 8.0, 1.0, 10.0]), target_sum=100.0)


def _encode(vocab, encoding, context_length=16, n_bins=4, bin_mode="quantile", batch=("b2",)):
    tok = CellTokenizer(vocab, encoding, context_length, n_bins=n_bins, bin_mode=bin_mode)
    cells = tok.encode(sp.csr_matrix(COUNTS), GENES, {"batch": list(batch) if batch else None})
    b = cells.batch([0])
    return b.tokens[0].tolist(), b.values[0].numpy(), b.bins[0].tolist(), b.attention_mask[0].tolist()


def test_vocab_layout(hand_vocab):
    v = hand_vocab
    assert (v.gene_offset, len(v), v.n_prefix) == (7, 13, 2)
    assert v.gene_token_ids(["A", "F", "nope"]).tolist() == [A, F, -1]
    assert v.sample_token_ids("batch", ["b1", "b2", "b9", None]).tolist() == [B1, B2, UNKNOWN_BATCH, UNKNOWN_BATCH]
    assert [v.token_name(i) for i in (0, 1, 2, 3, 4, 6, 7)] == [
        "<pad>", "<cls>", "<mask>", "<batch:unknown>", "<batch:b1>", "<batch:free3>", "A"]
    assert GeneVocab.from_dict(json.loads(json.dumps(v.to_dict()))).to_dict() == v.to_dict()


def test_rank_tokens_by_hand(hand_vocab):
    # ratio to median: A 32/64=0.5, C 8/2=4, D 16/8=2, E 4/1=4, F 20/10=2
    # descending, ties by token id: C(9) E(11) | D(10) F(12) | A
    tokens, values, bins, mask = _encode(hand_vocab, "rank")
    assert tokens == [CLS, B2, C, E, D, F, A]
    assert mask == [True] * 7
    np.testing.assert_allclose(values[2:], np.log1p([8, 4, 16, 20, 32]), rtol=1e-6)
    assert bins == [0] * 7
    # context 5 = CLS + batch + 3 genes: the top three by ratio survive
    tokens, *_ = _encode(hand_vocab, "rank", context_length=5)
    assert tokens == [CLS, B2, C, E, D]


def test_bin_tokens_by_hand(hand_vocab):
    # log1p of A=32 F=20 D=16 C=8 E=4; quantile edges (n_bins=4, 5 values, linear interpolation)
    # at 1/4, 2/4, 3/4 are the 2nd, 3rd and 4th smallest values: log1p(8), log1p(16), log1p(20).
    # A value equal to an edge goes to the lower bin: E->1, C->1, D->2, F->3, A->4
    tokens, values, bins, _ = _encode(hand_vocab, "bin")
    assert tokens == [CLS, B2, A, F, D, C, E]
    assert bins == [0, 0, 4, 3, 2, 1, 1]
    # truncated to 3 genes: bins still come from all five values
    tokens, _, bins, _ = _encode(hand_vocab, "bin", context_length=5)
    assert (tokens, bins) == ([CLS, B2, A, F, D], [0, 0, 4, 3, 2])
    # equal width between log1p(4)=1.609 and log1p(32)=3.497: edges 2.081, 2.553, 3.025
    # -> A 3.497:4, F 3.045:4, D 2.833:3, C 2.197:2, E 1.609:1
    _, _, bins, _ = _encode(hand_vocab, "bin", bin_mode="equal_width")
    assert bins == [0, 0, 4, 4, 3, 2, 1]


def test_projection_values_by_hand(hand_vocab):
    tokens, values, bins, _ = _encode(hand_vocab, "projection", batch=None)
    assert tokens == [CLS, UNKNOWN_BATCH, A, F, D, C, E]  # no batch given: the unknown token
    np.testing.assert_allclose(values, [0, 0, *np.log1p([32, 20, 16, 8, 4])], rtol=1e-6)
    assert bins == [0] * 7


def test_batches_pad_and_skip_unknown_genes(hand_vocab):
    counts = sp.csr_matrix(np.array([[8, 0, 2, 4, 1, 5, 5], [0, 3, 0, 0, 0, 0, 9]], dtype=np.float32))
    tok = CellTokenizer(hand_vocab, "bin", 16, n_bins=4)
    cells = tok.encode(counts, GENES, {"batch": ["b1", "b1"]})
    assert cells.lengths.tolist() == [7, 3]
    b = cells.batch([0, 1])
    assert b.tokens[1].tolist() == [CLS, B1, B, PAD, PAD, PAD, PAD]
    assert b.attention_mask[1].tolist() == [True] * 3 + [False] * 4
    assert b.bins[1].tolist()[:3] == [0, 0, 1]  # a single value is bin 1
    with pytest.raises(NotApplicable, match="vocabulary"):
        tok.encode(counts, [f"X{i}" for i in range(7)])


def test_gene_medians_and_vocab_from_adata(small_adata):
    counts = sp.csr_matrix(np.array([[1, 0], [3, 2], [0, 0], [1, 6]], dtype=np.float32))
    # normalized to 10: row totals 1, 5, -, 7 -> gene 0: 10, 6, 10/7 -> median 6; gene 1: 4, 60/7
    np.testing.assert_allclose(compute_gene_medians(counts, 10.0), [6.0, 0.5 * (4 + 60 / 7)])
    a = small_adata(30, 12)
    v = api.build_vocab(a, sample_keys=("lane", "absent"))
    assert v.genes == sorted(a.var_names)
    assert v.sample_groups == {"lane": ["b1", "b2"], "absent": []}
    assert np.all(np.isfinite(v.medians))


# --------------------------------------------------------------------------------------------
# attention paths


@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_matches_math(with_mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 17, 16, generator=g) for _ in range(3))
    mask = None
    if with_mask:
        lengths = torch.tensor([17, 9, 1])
        mask = (torch.arange(17)[None] < lengths[:, None])[:, None, None, :]
    ref = math_attention(q, k, v, mask)
    out, label = sdpa_attention(q, k, v, mask)
    assert label.startswith("sdpa-")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _toy(n_cells=48, n_genes=45, seed=0):
    """Counts of three cell groups in two batches: each group expresses its own ten genes at
    gene-specific levels (5 to 50) over a sparse background, so gene sets, ranks and bins carry signal."""
    import anndata as ad  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    group = np.arange(n_cells) % 3
    rates = np.full((3, n_genes), 0.1)
    for g in range(3):
        rates[g, 10 * g:10 * g + 10] = np.linspace(5.0, 50.0, 10)[rng.permutation(10)]
    counts = rng.poisson(rates[group]).astype(np.float32)
    obs = pd.DataFrame({"label": np.array(["alpha", "beta", "gamma"])[group],
                        "batch": np.where(np.arange(n_cells) % 2, "b2", "b1")},
                       index=[f"c{i}" for i in range(n_cells)])
    a = ad.AnnData(X=sp.csr_matrix(counts), obs=obs,
                   var=pd.DataFrame(index=[f"G{j:02d}" for j in range(n_genes)]))
    a.layers["counts"] = a.X.copy()
    return a


def _cells(encoding, a=None, context_length=32, **cfg):
    a = _toy() if a is None else a
    vocab = api.build_vocab(a, sample_keys=("batch",), sample_slots=8)
    config = preset("tiny", encoding, context_length=context_length, n_bins=8, **cfg).with_vocab(vocab)
    return config, vocab, CellTokenizer.from_config(vocab, config).encode_adata(a)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cells_on_demand_match_tokenizing_all(encoding):
    """Tokenizing only the cells asked for gives what tokenizing every cell gives (sample tokens,
    a cell asked for twice, and the padding of a batch included)."""
    a = _toy(n_cells=30)
    config, vocab, cells = _cells(encoding, a=a)
    lazy = CellTokenizer.from_config(vocab, config).on_demand(a)
    assert len(lazy) == len(cells) == 30
    idx = np.array([7, 3, 3, 29, 0])
    for got, want in ((lazy.batch(idx), cells.batch(idx)), (lazy.batch(idx, pad_to=32), cells.batch(idx, pad_to=32))):
        for field in ("tokens", "values", "bins", "attention_mask"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    sub, ref = lazy.subset(idx), cells.subset(idx)
    for field in ("offsets", "genes", "values", "bins", "prefix", "n_expressed"):
        np.testing.assert_array_equal(getattr(sub, field), getattr(ref, field))
    unknown = a.copy()
    unknown.var_names = [f"X{j}" for j in range(a.n_vars)]
    with pytest.raises(NotApplicable, match="vocabulary"):
        CellTokenizer.from_config(vocab, config).on_demand(unknown)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_model_paths_agree_with_padding(encoding):
    config, _, cells = _cells(encoding)
    model = build_model(config, seed=1).eval()
    batch = cells.batch(np.arange(8))
    ref_model = CellTransformer(config.replace(attention="math")).eval()
    ref_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model.forward_batch(batch)
        ref = ref_model.forward_batch(batch)
    assert out.attention_backend.startswith("sdpa-") and ref.attention_backend == "math"
    assert model.last_attention_backend == out.attention_backend
    m = batch.attention_mask
    torch.testing.assert_close(out.hidden[m], ref.hidden[m], atol=1e-5, rtol=0)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
    """Stand-in for flash_attn_varlen_func: per-sequence math attention on packed (n, H, Dh)."""
    outs = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(math_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outs)


def test_varlen_packing_matches_padded(monkeypatch):
    """The unpad -> packed blocks -> re-pad path, with a CPU stand-in for the flash kernel."""
    config, _, cells = _cells("bin", pooling="mean")
    model = build_model(config, seed=2).eval()
    batch = cells.batch(np.arange(6))
    with torch.no_grad():
        ref = model.forward_batch(batch)
        monkeypatch.setattr(model_mod, "_flash_varlen_fn", lambda: _reference_varlen)
        monkeypatch.setattr(model, "_resolve_attention", lambda x, padded=True: "varlen")
        out = model.forward_batch(batch)
    assert out.attention_backend == "flash-attn-varlen"
    m = batch.attention_mask
    torch.testing.assert_close(out.hidden[m], ref.hidden[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cell_embedding, ref.cell_embedding, atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoding,pooling", [(e, "cls") for e in ENCODINGS] + [("bin", "mean")])
def test_packed_cpu_path_matches_padded_in_training(encoding, pooling, monkeypatch):
    """The CPU packed path (tokens unpadded, attention in groups of cells of similar length) gives
    the padded path's outputs and gradients, with groups both padded and not."""
    monkeypatch.setattr(model_mod, "PACKED_GROUP", 3)
    config, _, cells = _cells(encoding, pooling=pooling, dropout=0.0)
    idx = np.arange(10)
    lengths = cells.lengths[idx]
    assert lengths.min() < lengths.max()  # the batch is padded
    batch = cells.batch(idx)
    masked = train_mod.choose_masked(batch, config.gene_offset, 0.3, torch.Generator().manual_seed(0))
    results = {}
    for choice in ("sdpa", "sdpa_packed", "auto"):
        model = build_model(config.replace(attention=choice), seed=4).train()
        out = model.forward_batch(batch, masked=masked)
        loss = model.mlm_loss(out.hidden, batch, masked) + out.cell_embedding.pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[choice] = (out, grads)
    assert results["sdpa"][0].attention_backend == "sdpa-flash"
    assert results["sdpa_packed"][0].attention_backend == "sdpa-flash-packed"
    assert results["auto"][0].attention_backend == "sdpa-flash-packed"  # CPU + padding: packed
    m = batch.attention_mask
    ref_out, ref_grads = results["sdpa"]
    for choice in ("sdpa_packed", "auto"):
        out, grads = results[choice]
        torch.testing.assert_close(out.hidden[m], ref_out.hidden[m], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.cell_embedding, ref_out.cell_embedding, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # a batch without padding keeps the plain padded path (nothing to gain from packing)
    full = cells.batch([int(np.argmax(cells.lengths))] * 2)
    model = build_model(config, seed=4).eval()
    with torch.no_grad():
        assert model.forward_batch(full).attention_backend == "sdpa-flash"


@pytest.mark.parametrize("encoding,pooling,attention",
                         [(e, "cls", "sdpa") for e in ENCODINGS] + [("bin", "mean", "sdpa"),
                                                                     ("rank", "cls", "math")])
def test_padding_does_not_change_embedding(encoding, pooling, attention):
    config, _, cells = _cells(encoding, pooling=pooling, attention=attention)
    model = build_model(config, seed=3)
    short, long_ = int(np.argmin(cells.lengths)), int(np.argmax(cells.lengths))
    assert cells.lengths[short] < cells.lengths[long_]
    alone = embed(model, [cells.batch([short])])
    together = embed(model, [cells.batch([long_, short])])
    padded_more = embed(model, [cells.batch([short], pad_to=config.context_length)])
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(padded_more[0], alone[0], atol=1e-5)


# --------------------------------------------------------------------------------------------
# determinism and training


def test_same_seed_same_embedding_and_loss():
    config, _, cells = _cells("rank")
    z1 = embed(build_model(config, seed=5), cells)
    z2 = embed(build_model(config, seed=5), cells)
    z3 = embed(build_model(config, seed=6), cells)
    np.testing.assert_array_equal(z1, z2)
    assert not np.allclose(z1, z3)

    runs = []
    for _ in range(2):
        m = build_model(config.replace(dropout=0.1), seed=5)
        r = pretrain(m, cells, max_steps=4, batch_size=8, seed=11)
        runs.append((r.losses, embed(m, cells)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_pretraining_reduces_mlm_loss(encoding):
    a = _toy(n_cells=96)
    config, _, cells = _cells(encoding, a=a)
    model = build_model(config, seed=0)
    r = pretrain(model, cells, epochs=12, batch_size=16, lr=3e-3, seed=0, warmup_fraction=0.0)
    assert r.steps == 72 and r.cells_seen == 12 * 96
    first, last = np.mean(r.losses[:6]), np.mean(r.losses[-6:])
    assert last < 0.9 * first, (encoding, first, last)
    assert r.attention_backend is not None


def test_gradient_checkpointing_same_gradients():
    config, _, cells = _cells("bin")
    batch = cells.batch(np.arange(8))
    masked = train_mod.choose_masked(batch, config.gene_offset, 0.3, torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = build_model(config.replace(gradient_checkpointing=ckpt), seed=4)
        out = model.forward_batch(batch, masked=masked)
        model.mlm_loss(out.hidden, batch, masked).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_oom_halves_batch(monkeypatch):
    config, _, cells = _cells("bin")
    model = build_model(config, seed=0)
    real_step = train_mod._train_step
    sizes = []

    def step(model, opt, batch, *args):
        sizes.append(len(batch))
        if len(batch) > 4:
            raise torch.OutOfMemoryError("fake")
        return real_step(model, opt, batch, *args)

    monkeypatch.setattr(train_mod, "_train_step", step)
    monkeypatch.setattr(train_mod, "_RECOVER_OOM_ON", ("cpu",))
    with pytest.warns(RuntimeWarning) as caught:
        r = pretrain(model, cells, epochs=1, batch_size=16, seed=0, device="cpu")
    assert [str(w.message).rsplit(" ", 1)[-1] for w in caught] == ["8", "4"]
    assert r.batch_size == 4 and r.cells_seen == len(cells) and sizes[:3] == [16, 8, 4]

    monkeypatch.setattr(train_mod, "_train_step", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="even with batch size 1"):
        pretrain(model, cells, epochs=1, batch_size=2, seed=0, device="cpu")


def test_finetune_annotation_beats_chance():
    a = _toy(n_cells=120, seed=1)
    rng = np.random.default_rng(0)
    idx = rng.permutation(a.n_obs)
    train, test = a[idx[:80]].copy(), a[idx[80:]].copy()
    config = preset("tiny", "bin", context_length=32, n_bins=8)
    vocab = api.build_vocab(train, sample_keys=("batch",), sample_slots=8)
    model = build_model(config.with_vocab(vocab), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pred = api.annotate(model, vocab, train, train.obs["label"].to_numpy(), test, epochs=8, batch_size=16,
                        lr=2e-3, seed=0)
    assert pred.shape == (test.n_obs,) and set(pred) <= {"alpha", "beta", "gamma"}
    assert np.mean(pred == test.obs["label"].to_numpy()) > 0.6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was tuned
    # fit / predict in two calls (a plug-in's fit and predict) gives the same labels: seeded
    clf = api.fit_classifier(model, vocab, train, train.obs["label"].to_numpy(), epochs=8, batch_size=16,
                             lr=2e-3, seed=0)
    assert len(clf.losses) == 8 * 5
    np.testing.assert_array_equal(api.predict_adata(clf, vocab, test, batch_size=7), pred)


# --------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_and_refusal(tmp_path):
    a = _toy()
    config = preset("tiny", "projection", context_length=32, n_bins=8, n_layers=1)
    run = api.pretrain_on_adata(a, config, sample_keys=("batch",), corpus_id="toy", max_steps=3,
                                batch_size=8, seed=3, checkpoint_path=tmp_path / "ckpt", git_commit="abc123",
                                device="cpu")
    assert run.checkpoint == tmp_path / "ckpt.safetensors"
    card = json.loads((tmp_path / "ckpt.json").read_text())
    assert card["encoding"] == "projection" and card["steps"] == 3 and card["seed"] == 3
    assert card["git_commit"] == "abc123" and card["corpus_id"] == "toy" and len(card["corpus_hash"]) == 64
    assert card["vocab"]["genes"] == run.vocab.genes and card["vocab"]["medians"] is not None
    assert np.isfinite(card["final_loss"]) and card["created"]

    z = api.embed_adata(run.model, run.vocab, a, device="cpu")
    loaded = api.load(tmp_path / "ckpt", expect=config.replace(attention="math"), device="cpu")
    assert loaded.model.attention == "math"  # runtime fields follow the request
    np.testing.assert_allclose(api.embed_adata(loaded.model, loaded.vocab, a), z, atol=1e-5)
    loaded = api.load(tmp_path / "ckpt.safetensors", expect=config)
    np.testing.assert_array_equal(api.embed_adata(loaded.model, loaded.vocab, a), z)

    with pytest.raises(CheckpointMismatch, match=r"ckpt\.json(.|\n)*encoding: checkpoint has 'projection'"):
        load_checkpoint(tmp_path / "ckpt", expect=config.replace(encoding="rank"))
    with pytest.raises(CheckpointMismatch, match="d_model: checkpoint has 64, requested 128"):
        load_checkpoint(tmp_path / "ckpt", expect={"d_model": 128})

    # strict: weights from another architecture are refused; a changed file fails its hash
    other = build_model(config.replace(n_layers=2).with_vocab(run.vocab))
    save_checkpoint(tmp_path / "other", other, run.vocab, corpus_id="toy", corpus_hash="0", steps=0, seed=0,
                    final_loss=None, git_commit=None)
    card = json.loads((tmp_path / "other.json").read_text())
    card["config"]["n_layers"] = 1
    card["weights_sha256"] = None
    (tmp_path / "other.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "other")
    (tmp_path / "ckpt.safetensors").write_bytes((tmp_path / "ckpt.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "ckpt")


# --------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_gpu_fast_paths_match_math_in_bf16(encoding):
    a = _toy(n_cells=32, n_genes=300)
    config, _, cells = _cells(encoding, a=a, context_length=128)
    model = build_model(config, seed=0).cuda().eval()
    padded, full = cells.batch(np.arange(16)).to("cuda"), cells.batch([int(np.argmax(cells.lengths))]).to("cuda")
    results = {}
    choices = ["math", "sdpa"] + (["flash_varlen"] if model_mod.flash_attn_available() else [])
    for choice in choices:
        model.attention = choice
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            results[choice] = (model.forward_batch(padded).cell_embedding.float(),
                               model.forward_batch(full).cell_embedding.float(), model.last_attention_backend)
    assert results["sdpa"][2] == "sdpa-flash"  # no padding in the last batch: FlashAttention
    if "flash_varlen" in results:
        assert results["flash_varlen"][2] == "flash-attn-varlen"
    for choice in choices[1:]:
        for i in range(2):
            torch.testing.assert_close(results[choice][i], results["math"][i], atol=3e-2, rtol=3e-2)
