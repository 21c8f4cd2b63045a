"""Geneformer (Theodoris et al. 2023, V1; Chen et al. 2024, V2): the BERT encoder of the released
checkpoints, the rank-value tokenization and the cell embedding.

Facts below were read from the Hugging Face repository ``ctheodoris/Geneformer`` at commit
ff551ee40322e9f58bd86ca867d76cf78f26e41b (2025-06-27; its full history is mirrored on GitHub as
haroonshakeel/Geneformer), files ``geneformer/tokenizer.py``, ``geneformer/emb_extractor.py``,
``geneformer/perturber_utils.py``, ``geneformer/__init__.py`` and the model folders' ``config.json``.

A release folder here holds one model folder of that repository with the package's dictionaries
copied next to it:

- ``config.json``: a Hugging Face ``BertConfig`` (``BertForMaskedLM``): ``hidden_size``,
  ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``hidden_act`` ("relu" in
  every released model, V2 included), ``max_position_embeddings`` (the input size: 2048 for V1,
  4096 for V2), ``vocab_size``, ``layer_norm_eps`` (1e-12), ``pad_token_id`` (0),
  ``position_embedding_type`` "absolute", ``type_vocab_size`` 2;
- ``model.safetensors`` and/or ``pytorch_model.bin``: the ``BertForMaskedLM`` state dict, keys
  ``bert.embeddings.{word,position,token_type}_embeddings.weight``, ``bert.embeddings.LayerNorm.*``,
  ``bert.encoder.layer.N.attention.self.{query,key,value}.*``, ``...attention.output.dense.*``,
  ``...attention.output.LayerNorm.*``, ``...intermediate.dense.*``, ``...output.dense.*``,
  ``...output.LayerNorm.*``; the masked-LM head ``cls.predictions.*`` is not used. Files written
  by transformers < 4.31 also hold the buffer ``bert.embeddings.position_ids`` (0..L-1): accepted
  and checked, not required. The released files themselves were not read here, but
  :func:`cellarena.zoo.adapters.random_weights.write_geneformer` at the published sizes writes
  safetensors files of exactly the sizes their Git LFS pointers publish: 41,183,536 B for
  Geneformer-V1-10M (with ``position_ids``), 417,571,156 B for Geneformer-V2-104M (without); a
  safetensors header lists every key with its dtype and shape, so this pins the key sets. Very old
  files name LayerNorm parameters ``gamma``/``beta``; they are renamed as transformers does;
- ``token_dictionary_<corpus>.pkl`` (Ensembl id -> token id; ``<pad>`` and ``<mask>``, V2 also
  ``<cls>`` and ``<eos>``), ``gene_median_dictionary_<corpus>.pkl`` (Ensembl id -> non-zero
  median of the gene's normalised expression over the pretraining corpus),
  ``ensembl_mapping_dict_<corpus>.pkl`` (Ensembl id -> the id it is collapsed to) and
  ``gene_name_id_dict_<corpus>.pkl`` (gene symbol -> Ensembl id); ``<corpus>`` is ``gc30M``
  for V1 (package folder ``geneformer/gene_dictionaries_30m/``), ``gc104M`` for V2.

The tokenization is the package's ``TranscriptomeTokenizer`` (model_version V1: no special tokens,
input size 2048; V2: special tokens, input size 4096):

- the dataset's genes are symbols: each is mapped to an Ensembl id with the release's
  ``gene_name_id_dict`` (a name that already is an Ensembl id is kept; this step is ours, the
  original expects Ensembl ids), then upper-cased and mapped with ``ensembl_mapping_dict``
  restricted to ids in the token dictionary; unmapped genes are dropped;
- when two of the dataset's distinct Ensembl ids map to the same id, the counts of all columns
  sharing an id are summed and those summed columns move after the others (in order of first
  appearance); otherwise every column keeps its place (``sum_ensembl_ids``);
- a cell's value for gene g is ``count / n_counts * 10000 / median[g]``, ``n_counts`` the
  cell's total over all genes of the dataset (the original reads a user-supplied ``n_counts``,
  "total read counts in that cell"), computed in float64;
- the genes with a non-zero value, in column order, are ordered by ``np.argsort(-value)`` with
  numpy's default (not stable) sort, exactly the original's call: the order within exact ties
  is numpy's, which may differ between numpy builds and CPUs, as it does for the original (the
  original computes in float32 where the data are float32; values closer than float32's
  precision may then rank differently);
- V1: the first 2048 tokens; V2: ``<cls>``, the first 4094 genes, ``<eos>``. The input size is
  the release's ``max_position_embeddings``.

The cell embedding is the package's ``EmbExtractor`` (``emb_layer=-1``, its default): the hidden
states after ``num_hidden_layers + emb_layer`` layers (-1: the output of the second-to-last layer,
0: of the last), padding masked, token type 0, absolute positions 0..L-1, BERT post-norm layers
(self-attention, dense, residual, LayerNorm; dense, activation, dense, residual, LayerNorm).
``emb_mode`` "cell": the mean over the cell's tokens, ``<cls>`` and ``<eos>`` excluded when the
dictionary has them; "cls" (the package's default for V2; V1 falls back to "cell"): the
``<cls>`` output. Cells with no gene token to average get a zero vector (the original divides by
zero there); their number is reported. Nothing is random.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from torch import nn

from cellarena.zoo.adapters.layers import attend, split_state
from cellarena.zoo.adapters.plugin import AdapterPlugin
from cellarena.zoo.adapters.releases import match_genes

TARGET_SUM = 10_000.0
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
# heads of a released file that the cell embedding does not use
UNUSED_PREFIXES = ("cls.", "bert.pooler.")
POSITION_IDS = "bert.embeddings.position_ids"
ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu,
               "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh")}
# the globals a release's dictionaries may reference (numpy scalars hold the medians); anything
# else in a pickle is refused rather than executed
_PICKLE_GLOBALS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                   ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "dtype"), ("numpy", "ndarray"), ("collections", "OrderedDict"),
                   ("builtins", "set"), ("builtins", "frozenset")}


class Embeddings(nn.Module):
    def __init__(self, vocab: int, d: int, max_positions: int, type_vocab: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(max_positions, d)
        self.token_type_embeddings = nn.Embedding(type_vocab, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)  # the released parameter name

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]  # token type 0 everywhere
        return self.LayerNorm(x + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def forward(self, x, key_mask, how):
        b, length, d = x.shape

        def heads(t):
            return t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)

        out, label = attend(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), key_mask, how)
        return out.transpose(1, 2).reshape(b, length, d), label


class DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's attention output and layer output blocks."""

    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, eps: float):
        super().__init__()
        self.add_module("self", SelfAttention(d, n_heads))  # the released name, ``attention.self``
        self.output = DenseNorm(d, d, eps)

    def forward(self, x, key_mask, how):
        attended, label = self._modules["self"](x, key_mask, how)
        return self.output(attended, x), label


class Intermediate(nn.Module):
    def __init__(self, d: int, d_ff: int, activation: str):
        super().__init__()
        self.dense = nn.Linear(d, d_ff)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        return self.activation(self.dense(x))


class Layer(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int, activation: str, eps: float):
        super().__init__()
        self.attention = Attention(d, n_heads, eps)
        self.intermediate = Intermediate(d, d_ff, activation)
        self.output = DenseNorm(d_ff, d, eps)

    def forward(self, x, key_mask, how):
        x, label = self.attention(x, key_mask, how)  # post-norm
        return self.output(self.intermediate(x), x), label


class Encoder(nn.Module):
    def __init__(self, n_layers: int, *args):
        super().__init__()
        self.layer = nn.ModuleList(Layer(*args) for _ in range(n_layers))


class Bert(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        d, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-12))
        self.embeddings = Embeddings(int(config["vocab_size"]), d, int(config["max_position_embeddings"]),
                                     int(config.get("type_vocab_size", 2)), eps)
        self.encoder = Encoder(int(config["num_hidden_layers"]), d, int(config["num_attention_heads"]),
                               int(config["intermediate_size"]), config.get("hidden_act", "gelu"), eps)


class GeneformerEncoder(nn.Module):
    """The ``bert.`` part of ``BertForMaskedLM``; ``state_dict()`` keys are the released ones."""

    def __init__(self, config: dict):
        super().__init__()
        self.bert = Bert(config)
        self.attention_kernel = None

    @property
    def n_layers(self) -> int:
        return len(self.bert.encoder.layer)

    def forward(self, ids, padding, n_layers: int | None = None, how: str = "sdpa"):
        """Hidden states (B, L, d) after the embeddings and the first ``n_layers`` layers (all by
        default): the original's ``hidden_states[n_layers]``. ``padding``: (B, L) bool, True at padding."""
        x = self.bert.embeddings(ids)
        key_mask = None if not padding.any() else (~padding)[:, None, None, :]
        for layer in self.bert.encoder.layer[:n_layers]:
            x, self.attention_kernel = layer(x, key_mask, how)
        return x


class _DictionaryUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"a Geneformer dictionary should hold only strings and numbers; it "
                                         f"references {module}.{name}, which is not loaded")
        return super().find_class(module, name)


def _read_dictionary(path: Path) -> dict:
    with open(path, "rb") as f:
        out = _DictionaryUnpickler(f).load()
    if not isinstance(out, dict):
        raise TypeError(f"{path} holds a {type(out).__name__}, not a dictionary")
    return out


def _one(folder: Path, stem: str, required: bool = True) -> Path | None:
    """The release's ``<stem>*.pkl`` (``<stem>_gc30M.pkl``, ``<stem>_gc104M.pkl``, or the
    un-suffixed name of early releases)."""
    found = sorted(folder.glob(f"{stem}*.pkl"))
    if len(found) > 1:
        raise ValueError(f"{folder} holds {len(found)} files {stem}*.pkl ({', '.join(p.name for p in found)}); "
                         "keep the one of this model's version")
    if not found and required:
        raise FileNotFoundError(f"{folder} has no {stem}*.pkl")
    return found[0] if found else None


def _fix_key(key: str) -> str:
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def read_weights(folder: Path) -> tuple[dict, Path]:
    """The released state dict: ``model.safetensors`` if present, else ``pytorch_model.bin``."""
    if (path := folder / "model.safetensors").is_file():
        state = load_file(path)
    elif (path := folder / "pytorch_model.bin").is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    return {_fix_key(k): v for k, v in state.items()}, path


class Release:
    """A loaded release: configuration, dictionaries and the encoder with its weights."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        if self.config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{folder / 'config.json'}: position_embedding_type "
                             f"{self.config['position_embedding_type']!r}; Geneformer releases use 'absolute'")
        if self.config.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"{folder / 'config.json'}: hidden_act {self.config['hidden_act']!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        self.token_dict = {str(k): int(v) for k, v in _read_dictionary(_one(folder, "token_dictionary")).items()}
        medians = _read_dictionary(_one(folder, "gene_median_dictionary"))
        self.name_to_id = {str(k): str(v) for k, v in _read_dictionary(_one(folder, "gene_name_id_dict")).items()
                           if v is not None}
        mapping_file = _one(folder, "ensembl_mapping_dict", required=False)
        mapping = (_read_dictionary(mapping_file) if mapping_file else {k: k for k in self.token_dict})
        # as the tokenizer: only mappings onto ids that have a token
        self.mapping = {str(k): str(v) for k, v in mapping.items() if v in self.token_dict}
        self.pad_id = self.token_dict["<pad>"]
        self.special = "<cls>" in self.token_dict and "<eos>" in self.token_dict  # V2: <cls> genes <eos>
        self.cls_id = self.token_dict.get("<cls>")
        self.eos_id = self.token_dict.get("<eos>")
        self.input_size = int(self.config["max_position_embeddings"])
        n_tokens = int(self.config["vocab_size"])
        if max(self.token_dict.values()) >= n_tokens:
            raise ValueError(f"the token dictionary of {folder} has ids up to {max(self.token_dict.values())}, "
                             f"the model's vocabulary {n_tokens}")
        self.medians = np.full(n_tokens, np.nan)  # by token; NaN: special tokens, genes without a median
        for gene, token in self.token_dict.items():
            if gene not in SPECIAL_TOKENS and gene in medians:
                self.medians[token] = float(medians[gene])

        state, self.weights_file = read_weights(folder)
        self.model = GeneformerEncoder(self.config)
        if POSITION_IDS in state:  # a persistent buffer in files of transformers < 4.31
            ids = state.pop(POSITION_IDS)
            if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
                raise ValueError(f"{self.weights_file}: {POSITION_IDS} is not 0..{ids.numel() - 1}")
        self.model.load_state_dict(split_state(state, self.model, UNUSED_PREFIXES, str(self.weights_file)))
        self.model.to(device).eval()
        self.device = device
        self.unused = sorted({".".join(k.split(".")[:2]) for k in state if k.startswith(UNUSED_PREFIXES)})

    @property
    def version(self) -> str:
        return "V2" if self.special else "V1"

    def ensembl_id(self, gene: str) -> str | None:
        """The Ensembl id of a dataset gene: its symbol's, or the name itself when it is an id."""
        found = self.name_to_id.get(gene)
        if found is None and gene.upper() in self.mapping:
            found = gene
        return found

    def token_of(self, ensembl: str | None) -> int:
        collapsed = self.mapping.get(ensembl.upper()) if ensembl is not None else None
        return self.token_dict[collapsed] if collapsed is not None else -1


def collapse_columns(ensembl_ids, token_ids) -> tuple[sp.csr_matrix, np.ndarray]:
    """The original's handling of genes that map to one id (``sum_ensembl_ids``): an (n_matched x
    n_columns) 0/1 matrix taking matched genes to model columns, and each column's token.

    If the genes' distinct Ensembl ids are as many as their distinct mapped ids, every gene is its
    own column in its place (two columns may then share a token, as in the original). Otherwise the
    genes whose mapped id is unique keep their order and each group sharing an id becomes one summed
    column, after them, in order of first appearance."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    n = token_ids.size
    if len(set(ensembl_ids)) == len(set(token_ids.tolist())):
        return sp.identity(n, dtype=np.float64, format="csr"), token_ids
    unique, first, counts = np.unique(token_ids, return_index=True, return_counts=True)
    shared = unique[counts > 1][np.argsort(first[counts > 1], kind="stable")]
    single = np.flatnonzero(~np.isin(token_ids, shared))
    columns = np.empty(n, dtype=np.int64)
    columns[single] = np.arange(single.size)
    for j, token in enumerate(shared):
        columns[token_ids == token] = single.size + j
    out_tokens = np.concatenate([token_ids[single], shared])
    return sp.csr_matrix((np.ones(n), (np.arange(n), columns)), shape=(n, out_tokens.size)), out_tokens


def gene_columns(genes, release: Release, *, min_fraction: float) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """The dataset genes the release has a token for (positions), the matrix taking them to the
    model's columns (:func:`collapse_columns`) and the columns' tokens; fewer than ``min_fraction``
    of the genes matched: :class:`NotApplicable` with the fraction."""
    genes = [str(g) for g in genes]
    vocabulary = {g: t for g in set(genes) if (t := release.token_of(release.ensembl_id(g))) >= 0}
    found, ids = match_genes(genes, vocabulary, min_fraction=min_fraction,
                             what=f"Geneformer {release.version} dictionaries (symbol -> Ensembl id -> token)")
    aggregate, tokens = collapse_columns([release.ensembl_id(genes[i]) for i in found], ids)
    if np.isnan(release.medians[tokens]).any():  # the original fails on such a gene too (KeyError)
        names = {t: g for g, t in release.token_dict.items()}
        missing = sorted({names[t] for t in tokens if np.isnan(release.medians[t])})
        raise ValueError(f"{len(missing)} of the dataset's genes have a token but no median in "
                         f"{release.folder}: {missing[:5]}")
    return found, aggregate, tokens


def rank_tokens(values: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Tokens of the genes with a non-zero value, highest value first: ``np.argsort(-value)`` on
    the non-zero values in column order, the original's exact call (default kind, not stable)."""
    nonzero = np.flatnonzero(values)
    return tokens[nonzero][np.argsort(-values[nonzero])]


def tokenize_cell(counts: np.ndarray, total: float, tokens: np.ndarray, medians: np.ndarray,
                  release: Release) -> np.ndarray:
    """Token ids of one cell: counts (of the model's columns) scaled by the cell's total and the
    genes' medians, ranked, truncated to the input size; V2 framed by ``<cls>`` and ``<eos>``."""
    counts = np.asarray(counts, dtype=np.float64)
    values = counts / total * TARGET_SUM / medians if total > 0 else np.zeros_like(counts)
    ranked = rank_tokens(values, tokens)
    if release.special:
        return np.concatenate([[release.cls_id], ranked[: release.input_size - 2], [release.eos_id]]).astype(np.int64)
    return ranked[: release.input_size].astype(np.int64)


def pool(hidden: torch.Tensor, lengths: torch.Tensor, release: Release, emb_mode: str) -> torch.Tensor:
    """The cell embedding from one batch's hidden states: the ``<cls>`` output, or the mean over
    the gene tokens (``<cls>``/``<eos>`` excluded when the dictionary has them)."""
    if emb_mode == "cls":
        return hidden[:, 0, :]
    start = 1 if release.cls_id is not None else 0
    stop = lengths - (1 if release.eos_id is not None else 0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    keep = (positions >= start) & (positions < stop.unsqueeze(1))
    n = (stop - start).clamp(min=1).unsqueeze(1).to(hidden.dtype)
    return hidden.masked_fill(~keep.unsqueeze(2), 0.0).sum(1) / n


@torch.no_grad()
def embed(counts, totals: np.ndarray, tokens: np.ndarray, release: Release, *, emb_mode: str = "cell",
          emb_layer: int = -1, batch_size: int = 32, attention: str = "sdpa") -> tuple[np.ndarray, dict]:
    """Cell embeddings (float32, cells x hidden size) of ``counts`` (cells x model columns, whose
    tokens are ``tokens``); ``totals``: each cell's count over all genes. Returns the embeddings
    and a summary (cells truncated, cells without genes)."""
    if emb_mode not in ("cell", "cls"):
        raise ValueError(f"emb_mode must be 'cell' or 'cls', not {emb_mode!r}")
    if emb_layer not in (-1, 0):
        raise ValueError(f"emb_layer must be -1 (second-to-last layer) or 0 (last layer), not {emb_layer!r}")
    if emb_mode == "cls" and not release.special:
        emb_mode = "cell"  # as the original: V1 has no <cls>
    counts = sp.csr_matrix(counts, dtype=np.float64)
    counts.sum_duplicates()
    counts.sort_indices()  # genes in column order, as the original
    counts.eliminate_zeros()
    tokens = np.asarray(tokens, dtype=np.int64)
    medians = release.medians[tokens]
    cells = []
    for i in range(counts.shape[0]):
        lo, hi = counts.indptr[i], counts.indptr[i + 1]
        idx = counts.indices[lo:hi]
        cells.append(tokenize_cell(counts.data[lo:hi], float(totals[i]), tokens[idx], medians[idx], release))
    n_expressed = np.diff(counts.indptr) * (np.asarray(totals) > 0)
    empty = n_expressed == 0 if emb_mode == "cell" else np.zeros(len(cells), dtype=bool)  # <cls> always there
    out = np.zeros((len(cells), int(release.config["hidden_size"])), dtype=np.float32)
    n_layers = release.model.n_layers + emb_layer
    todo = np.flatnonzero(~empty)
    todo = todo[np.argsort(-np.array([cells[i].size for i in todo]), kind="stable")]  # longest first
    for start in range(0, todo.size, batch_size):
        rows = todo[start:start + batch_size]
        lengths = np.array([cells[i].size for i in rows])
        ids = np.full((rows.size, lengths.max()), release.pad_id, dtype=np.int64)
        for j, i in enumerate(rows):
            ids[j, :lengths[j]] = cells[i]
        ids_t = torch.from_numpy(ids).to(release.device)
        lengths_t = torch.from_numpy(lengths).to(release.device)
        padding = torch.arange(ids.shape[1], device=release.device) >= lengths_t.unsqueeze(1)
        hidden = release.model(ids_t, padding, n_layers, attention)
        out[rows] = pool(hidden, lengths_t, release, emb_mode).float().cpu().numpy()
    summary = {"emb_mode": emb_mode, "emb_layer": emb_layer, "layers_run": n_layers,
               "cells_truncated": int((n_expressed > release.input_size - (2 if release.special else 0)).sum()),
               "cells_without_genes": int(empty.sum())}
    return out, summary


class Plugin(AdapterPlugin):
    """The plug-in of both versions: ``models/geneformer*/model.py`` sets the ``version`` its
    release must be."""

    version: ClassVar[str]

    def embed(self, adata, *, solution=None):
        p = self.params
        release = Release(self.release_folder(), device=self.context.device)
        if release.version != self.version:
            raise ValueError(f"{release.folder} holds a Geneformer {release.version} release; this model is "
                             f"{self.version}")
        counts = adata.layers["counts"].tocsr()
        found, aggregate, tokens = gene_columns(adata.var_names, release, min_fraction=float(p["min_gene_fraction"]))
        totals = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()  # the cell's n_counts: all its genes
        emb, summary = embed(counts[:, found] @ aggregate, totals, tokens, release, emb_mode=str(p["emb_mode"]),
                             emb_layer=int(p["emb_layer"]), batch_size=int(p["batch_size"]))
        self.record(release, found, adata, attention=release.model.attention_kernel,
                    weights=release.weights_file.name, model_columns=int(tokens.size), **summary)
        return emb
