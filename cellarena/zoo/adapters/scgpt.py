"""scGPT (Cui et al. 2024): the encoder of the released checkpoints, its tokenization and its cell embedding.

A release folder holds ``best_model.pt`` (a PyTorch state dict), ``vocab.json`` (gene symbol ->
token id, special tokens ``<pad>``, ``<cls>``, ``<eoc>``) and ``args.json`` (``embsize``,
``nheads``, ``d_hid``, ``nlayers``, ``pad_token``, ``pad_value``, ...).

The cell embedding is the original zero-shot procedure:

- a cell's tokens are ``<cls>`` then its genes with a non-zero count (in the vocabulary); the
  ``<cls>`` value is ``pad_value``;
- the counts of each cell are binned into 51 bins: edges are the 50 quantiles (0 to 1) of the
  cell's non-zero values, a value gets ``np.digitize``'s index, and a value equal to several edges
  gets a uniformly random index between the two ends (the original's tie spreading);
- a cell with more than ``max_length`` tokens keeps ``<cls>`` and a random sample of the rest;
- every position embeds as LayerNorm(gene embedding) + value MLP (Linear 1->d, ReLU, Linear d->d,
  LayerNorm, values clipped at 512), then the post-norm transformer encoder (ReLU feed-forward),
  padding masked;
- the cell's embedding is the ``<cls>`` output, L2-normalised.

Every random choice uses a generator seeded from the run's seed. The released weights were trained
with flash-attn's ``MHA`` (``self_attn.Wqkv``: q, k and v stacked, heads inside); here the same
weights run through :func:`cellarena.zoo.adapters.layers.attend`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellarena.zoo.adapters.layers import PostNormLayer, split_state
from cellarena.zoo.adapters.plugin import AdapterPlugin
from cellarena.zoo.adapters.releases import match_genes

FILES = ("best_model.pt", "vocab.json", "args.json")
N_BINS = 51  # the original's data collator bins into 51 whatever args.json says
MAX_VALUE = 512.0
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
# heads of the released file that the cell embedding does not use
UNUSED_PREFIXES = ("decoder.", "cls_decoder.", "mvc_decoder.", "grad_reverse_discriminator.", "flag_encoder.",
                   "batch_encoder.", "dsbn.", "bn.", "sim.", "creterion_cce.")
# the names flash-attn (and its compatibility layers) give the attention weights -> PyTorch's, which
# PostNormLayer uses
_RENAMES = ((re.compile(r"self_attn\.(_impl\.)?Wqkv\.weight$"), "self_attn.in_proj_weight"),
            (re.compile(r"self_attn\.(_impl\.)?Wqkv\.bias$"), "self_attn.in_proj_bias"),
            (re.compile(r"self_attn\._impl\.out_proj\."), "self_attn.out_proj."))


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids):
        return self.enc_norm(self.embedding(ids))


class ValueEncoder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, values):
        x = torch.clamp(values.unsqueeze(-1), max=MAX_VALUE)
        return self.norm(self.linear2(torch.relu(self.linear1(x))))


class Layers(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_hid: int):
        super().__init__()
        self.layers = nn.ModuleList(PostNormLayer(d_model, n_heads, d_hid) for _ in range(n_layers))


class ScGPTEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, n_heads: int, d_hid: int, n_layers: int, pad_id: int):
        super().__init__()
        self.encoder = GeneEncoder(n_tokens, d_model, pad_id)
        self.value_encoder = ValueEncoder(d_model)
        self.transformer_encoder = Layers(n_layers, d_model, n_heads, d_hid)
        self.attention_kernel = None

    def forward(self, ids, values, padding, how: str = "sdpa"):
        """Outputs (B, L, d). ``padding``: (B, L) bool, True at padding positions."""
        x = self.encoder(ids) + self.value_encoder(values)
        key_mask = None if not padding.any() else (~padding)[:, None, None, :]
        for layer in self.transformer_encoder.layers:
            x, self.attention_kernel = layer(x, key_mask, how)
        return x


class Release:
    """A loaded release: vocabulary, hyper-parameters and the encoder with its weights."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        self.folder = folder
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text())
        for token in SPECIAL_TOKENS:  # the original appends missing special tokens at the end
            self.vocab.setdefault(token, len(self.vocab))
        self.args = json.loads((folder / "args.json").read_text())
        self.pad_id = self.vocab[self.args.get("pad_token", "<pad>")]
        self.cls_id = self.vocab["<cls>"]
        self.pad_value = float(self.args.get("pad_value", -2))
        state = torch.load(folder / "best_model.pt", map_location="cpu", weights_only=True)
        state = {_rename(k): v for k, v in state.items()}
        n_tokens = state["encoder.embedding.weight"].shape[0]
        if n_tokens != len(self.vocab):
            raise ValueError(f"{folder / 'vocab.json'} has {len(self.vocab)} tokens, the weights {n_tokens}")
        self.model = ScGPTEncoder(n_tokens, int(self.args["embsize"]), int(self.args["nheads"]),
                                  int(self.args["d_hid"]), int(self.args["nlayers"]), self.pad_id)
        self.model.load_state_dict(split_state(state, self.model, UNUSED_PREFIXES, str(folder / "best_model.pt")))
        self.model.to(device).eval()
        self.device = device
        self.unused = sorted({k.split(".")[0] for k in state if k.startswith(UNUSED_PREFIXES)})

    @property
    def genes(self) -> dict[str, int]:
        return {g: i for g, i in self.vocab.items() if g not in SPECIAL_TOKENS}


def _rename(key: str) -> str:
    for pattern, new in _RENAMES:
        key = pattern.sub(new, key)
    return key


def bin_values(values: np.ndarray, rng: np.random.Generator, n_bins: int = N_BINS) -> np.ndarray:
    """The original's per-cell binning of positive values: index among the ``n_bins - 1`` quantile
    edges, ties between equal edges spread uniformly at random. Returns int64 in [1, n_bins - 1]."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    return np.ceil(rng.random(values.size) * (right - left) + left).astype(np.int64)


def tokenize_cell(counts: np.ndarray, token_ids: np.ndarray, release: Release, rng: np.random.Generator,
                  max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, values) of one cell: ``<cls>`` first, then its non-zero genes, binned; sampled
    down to ``max_length`` tokens."""
    nonzero = np.flatnonzero(counts > 0)
    ids = np.concatenate([[release.cls_id], token_ids[nonzero]])
    values = np.concatenate([[release.pad_value], bin_values(counts[nonzero], rng).astype(np.float64)])
    if ids.size > max_length:
        keep = np.concatenate([[0], 1 + rng.permutation(ids.size - 1)[: max_length - 1]])
        ids, values = ids[keep], values[keep]
    return ids, values


@torch.no_grad()
def embed(counts, token_ids: np.ndarray, release: Release, *, seed: int, max_length: int = 1200,
          batch_size: int = 64, attention: str = "sdpa") -> np.ndarray:
    """L2-normalised ``<cls>`` embeddings of the cells (rows) of ``counts`` (cells x matched genes)."""
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    out = np.zeros((n, release.model.encoder.embedding.embedding_dim), dtype=np.float32)
    for start in range(0, n, batch_size):
        block = counts[start:start + batch_size]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        cells = [tokenize_cell(row, token_ids, release, rng, max_length) for row in block]
        length = max(ids.size for ids, _ in cells)
        ids = np.full((len(cells), length), release.pad_id, dtype=np.int64)
        values = np.full((len(cells), length), release.pad_value, dtype=np.float32)
        for i, (cell_ids, cell_values) in enumerate(cells):
            ids[i, :cell_ids.size] = cell_ids
            values[i, :cell_values.size] = cell_values
        ids_t = torch.from_numpy(ids).to(release.device)
        hidden = release.model(ids_t, torch.from_numpy(values).to(release.device), ids_t.eq(release.pad_id),
                               attention)
        out[start:start + len(cells)] = hidden[:, 0, :].float().cpu().numpy()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


class Plugin(AdapterPlugin):
    """scGPT's zero-shot cell embedding as a plug-in (``models/scgpt``)."""

    def embed(self, adata, *, solution=None):
        p = self.params
        release = Release(self.release_folder(), device=self.context.device)
        found, ids = match_genes(adata.var_names, release.genes, min_fraction=float(p["min_gene_fraction"]),
                                 what="scGPT vocabulary")
        emb = embed(adata.layers["counts"].tocsr()[:, found], ids, release, seed=self.context.seed,
                    max_length=int(p["max_length"]), batch_size=int(p["batch_size"]))
        self.record(release, found, adata, attention=release.model.attention_kernel)
        return emb
