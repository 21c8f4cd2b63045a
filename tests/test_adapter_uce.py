"""UCE adapter: a small random release in the published file layout, loaded strictly and run."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cellarena.zoo.adapters import random_weights, uce
from cellarena.run.embedding import embed_cells
from cellarena.run.setup import Job

REPO = Path(__file__).resolve().parent.parent
S = random_weights.UCE_TEST_SIZES
PARAMS = {"sample_size": 64}  # the full 1,024 genes per cell cost minutes of attention on 2 cores


@pytest.fixture
def release_dir(tmp_path, release_genes):
    return random_weights.write_uce(tmp_path / "checkpoints" / "uce", release_genes)


def test_loads_strictly_and_names_the_unused_heads(release_dir):
    release = uce.Release(release_dir)
    assert release.unused == ["binary_decoder", "gene_embedding_layer"]
    assert release.sizes == S
    # 4 special tokens, 5 frog genes, 400 human, 400 mouse: then the chromosome tokens
    assert release.offsets == {"frog": 4, "human": 9, "mouse": 409} and release.chrom_offset == 809


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"transformer_encoder.layers.0.extra.weight": torch.zeros(2)}), "unexpected"),
    (lambda s: s.pop("decoder.3.bias"), "missing"),  # the decoder makes the embedding: it is not optional
    (lambda s: s.pop("pos_encoder.pe"), "missing"),
    (lambda s: s.update({"encoder.2.weight": torch.zeros(S.d_model + 1)}), "shape mismatches"),
])
def test_any_other_layout_is_refused(release_dir, edit, message):
    state = torch.load(release_dir / uce.WEIGHTS, weights_only=True)
    edit(state)
    torch.save(state, release_dir / uce.WEIGHTS)
    with pytest.raises(ValueError, match=message):
        uce.Release(release_dir)


def test_a_token_file_of_another_size_is_refused(release_dir):
    tokens = torch.load(release_dir / uce.TOKENS_FILE, weights_only=True)
    torch.save(tokens[:-1], release_dir / uce.TOKENS_FILE)
    with pytest.raises(ValueError, match="token table has 809"):
        uce.Release(release_dir)


class _Block(nn.Sequential):
    def __init__(self, n_in, n_out):
        super().__init__(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU(), nn.Dropout(0.0))


class _Positions(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.register_buffer("pe", torch.zeros(n, 1, d))


class _OriginalLayout(nn.Module):
    """The module tree of snap-stanford/UCE's TransformerModel (model.py@8ead6e0) with its pe_embedding set,
    built from torch.nn blocks: sequence-first nn.TransformerEncoder, the decoder heads, the token table."""

    def __init__(self, n_tokens):
        super().__init__()
        d = S.d_model
        self.pos_encoder = _Positions(uce.POSITIONS, d)
        self.encoder = nn.Sequential(nn.Linear(S.token_dim, d), nn.GELU(), nn.LayerNorm(d))
        self.transformer_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, uce.N_HEADS, S.d_hid, dropout=0.0), S.n_layers, enable_nested_tensor=False)
        self.decoder = nn.Sequential(_Block(d, S.decoder_hidden), _Block(S.decoder_hidden, S.output_dim),
                                     _Block(S.output_dim, S.output_dim), nn.Linear(S.output_dim, S.output_dim))
        b = S.binary_hidden
        self.binary_decoder = nn.Sequential(_Block(S.output_dim + d, b[0]), _Block(b[0], b[1]), _Block(b[1], b[2]),
                                            nn.Linear(b[2], 1))
        self.gene_embedding_layer = nn.Sequential(nn.Linear(S.token_dim, d), nn.GELU(), nn.LayerNorm(d))
        self.pe_embedding = nn.Embedding.from_pretrained(torch.zeros(n_tokens, S.token_dim))

    def embed(self, ids, mask, boolean=False):
        """The original's inference: ids (B, L), mask (B, L) float, 1 on the sentence, 0 on padding.
        ``boolean``: what masking the padding would give instead."""
        x = nn.functional.normalize(self.pe_embedding(ids.t()), dim=2)
        x = self.encoder(x) * math.sqrt(S.d_model)
        x = x + self.pos_encoder.pe[: x.shape[0]]
        out = self.transformer_encoder(x, src_key_padding_mask=mask == 0 if boolean else 1 - mask)  # float: added
        return out, nn.functional.normalize(self.decoder(out)[0], dim=1)


def _reference(release_dir):
    state = torch.load(release_dir / uce.WEIGHTS, weights_only=True)
    reference = _OriginalLayout(state["pe_embedding.weight"].shape[0]).eval()
    reference.load_state_dict(state, strict=True)  # the file has exactly the original module's keys
    return reference


def test_embedding_equals_the_original_built_from_torch_blocks(release_dir):
    release, reference = uce.Release(release_dir), _reference(release_dir)
    torch.manual_seed(0)
    ids = torch.randint(4, release.chrom_offset + 8, (3, 11))
    ids[:, 0] = uce.CLS_ID
    ids[1, 7:] = uce.PAD_ID
    ids[2, 9:] = uce.PAD_ID
    padding = ids.eq(uce.PAD_ID)
    with torch.no_grad():
        hidden, expected = reference.embed(ids, (~padding).float())
        ours = release.model(ids, padding)
        assert torch.allclose(release.model.hidden(ids, padding), hidden.transpose(0, 1), atol=1e-5)
        masked = reference.embed(ids, (~padding).float(), boolean=True)[1]
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours[1:], masked[1:], atol=1e-4)  # the padded cells: biased, not masked
    assert torch.allclose(ours[0], masked[0], atol=1e-5)  # the longest cell has no padding


def test_padding_is_biased_not_masked_as_in_the_original(release_dir):
    """The float mask 1 - mask adds +1 to padded keys: a cell's embedding depends on its batch's longest cell."""
    release = uce.Release(release_dir)
    short = torch.tensor([[uce.CLS_ID, release.chrom_offset + 3, 20, 21, uce.CHROM_CLOSE_ID]])
    padded = torch.cat([short, torch.full((1, 4), uce.PAD_ID)], dim=1)
    with torch.no_grad():
        alone = release.model(short, short.eq(-1))
        in_batch = release.model(padded, padded.eq(uce.PAD_ID))
    assert not torch.allclose(alone, in_batch, atol=1e-4)


def test_cell_sentence_hand_example():
    # genes A, B, C, D with counts 2, 1, 4, 0; A and B on chromosome code 5 (starts 300 and 100), C and D on
    # code 9 (starts 50 and 10); tokens 100..103; chromosome tokens start at 1000
    counts = np.array([2, 1, 4, 0])
    token_ids, chroms, starts = np.array([100, 101, 102, 103]), np.array([5, 5, 9, 9]), np.array([300, 100, 50, 10])
    orders = set()
    for seed in range(20):
        s = uce.cell_sentence(counts, token_ids, chroms, starts, np.random.default_rng(seed), 8, 1000).tolist()
        # CLS, then two chromosome groups of "chromosome token, genes, closing token 2": 1 + 8 + 2 * 2 tokens
        assert s[0] == uce.CLS_ID and len(s) == 13 and s.count(uce.CHROM_CLOSE_ID) == 2
        assert 103 not in s  # D has no count: never drawn (its weight log1p(0) is 0)
        opened = [i for i, t in enumerate(s) if t >= 1000]
        assert sorted(s[i] for i in opened) == [1005, 1009] and opened[0] == 1
        for i in opened:
            group = s[i + 1: s.index(uce.CHROM_CLOSE_ID, i)]
            if s[i] == 1005:  # B (start 100) comes before A (start 300) however often each was drawn
                assert set(group) <= {100, 101} and group == sorted(group, key=lambda t: {101: 0, 100: 1}[t])
            else:
                assert set(group) == {102}
        orders.add(s[1])
    assert orders == {1005, 1009}  # the chromosome order is shuffled per cell
    # draws are proportional to log1p(count): log 3, log 2, log 5 over their sum
    many = uce.cell_sentence(counts, token_ids, chroms, starts, np.random.default_rng(0), 30000, 1000)
    freq = np.array([(many == t).sum() for t in (100, 101, 102)]) / 30000
    assert np.allclose(freq, np.log1p([2, 1, 4]) / np.log1p([2, 1, 4]).sum(), atol=0.01)
    # a cell without counts is its CLS alone
    assert uce.cell_sentence(np.zeros(4), token_ids, chroms, starts, np.random.default_rng(0), 8, 1000).tolist() == [3]


def test_gene_tokens_follow_the_offsets_files_and_chromosome_codes(release_dir, release_genes):
    table = uce.Release(release_dir).gene_table("human")
    # human's offset is 9 (4 special tokens + 5 frog genes); a gene's token is offset + its position in the
    # protein-embedding file
    assert table.index[release_genes[0].upper()] == 0 and table.token_ids[0] == 9 and table.token_ids[399] == 408
    # codes of the sorted "species_chromosome" strings: frog_1 frog_2 human_1 human_10 human_2 human_X
    # mouse_1 mouse_X; human genes go round 1, 10, 2, X, so gene 1 is on "10", code 3 (10 sorts before 2)
    assert table.chroms[:5].tolist() == [2, 3, 4, 5, 2]
    mouse = uce.Release(release_dir).gene_table("mouse")
    assert mouse.token_ids[0] == 409 and mouse.chroms[:3].tolist() == [6, 7, 6]
    # a gene without a chromosome row is left out
    csv = pd.read_csv(release_dir / uce.CHROM_FILE)
    csv[csv["gene_symbol"] != release_genes[0].upper()].to_csv(release_dir / uce.CHROM_FILE, index=False)
    table = uce.Release(release_dir).gene_table("human")
    assert release_genes[0].upper() not in table.index and table.token_ids[0] == 10 and len(table.index) == 399


def test_offsets_file_may_hold_only_plain_values(release_dir):
    with open(release_dir / uce.OFFSETS_FILE, "wb") as f:
        pickle.dump({"human": np.int64(4)}, f)
    with pytest.raises(pickle.UnpicklingError, match="only plain values"):
        uce.Release(release_dir)


def _embed(tiny, checkpoints_dir, seed=0):
    return embed_cells(Job.of(tiny.prepared, tiny.splits["all"], REPO / "models" / "uce", seed=seed, params=PARAMS,
                              options={"batch_role": "condition"}, checkpoints_dir=checkpoints_dir))


def test_runner_embeds_deterministically_and_records_the_kernel(release_dir, tiny, release_genes):
    first, second = _embed(tiny, release_dir.parent), _embed(tiny, release_dir.parent)
    assert first.status == "ok", first.columns["status_reason"]
    assert first.embedding.shape == (200, S.output_dim) and np.array_equal(first.embedding, second.embedding)
    assert np.allclose(np.linalg.norm(first.embedding, axis=1), 1.0, atol=1e-5)
    runtime = json.loads(first.columns["runtime_json"])
    assert runtime["attention"].startswith("sdpa") and runtime["genes_matched"] == "400/500"
    assert runtime["species"] == "human" and runtime["unused_heads"] == ["binary_decoder", "gene_embedding_layer"]
    counts = ad.read_h5ad(tiny.prepared)[:, release_genes].layers["counts"]
    assert runtime["genes_used"] == int(((counts > 0).sum(axis=0) >= 10).sum())  # filter_genes(min_cells=10)
    assert first.columns["leakage"] == "unknown"  # the Census corpus is not resolved to datasets yet
    other_seed = _embed(tiny, release_dir.parent, seed=1)
    assert not np.allclose(other_seed.embedding, first.embedding)  # the gene draws follow the run's seed
