"""scFoundation (Hao et al. 2024): the encoder of the released checkpoint, its input and its cell embedding.

A release folder holds the two files the original's inference script reads:

- ``models.ckpt`` (from the SharePoint folder linked in the repository's README): a ``torch.save``
  dict with one entry per use, ``"gene"``, ``"cell"`` (``get_embedding.py --version ce``) and
  ``"rde"`` (``--version rde``, read-depth enhancement). Each entry is ``{"config": ..., "state_dict":
  ...}``; ``config["model"]`` names the architecture (``"mae_autobin"``) and the hyper-parameters are
  ``config["model_config"]["mae_autobin"]`` updated with ``config["dataset_config"]["rnaseq"]``. Each
  state-dict key carries a prefix ending in ``model.``; the parameter name is what follows the first
  ``model.`` (and must match MaeAutobin's ``state_dict()`` exactly: the original loads strictly).
- ``OS_scRNA_gene_index.19264.tsv`` (in the GitHub repository): tab-separated, header ``gene_name``,
  ``index``; the ``gene_name`` column, in file order, is the model's gene order (19,264 symbols).

The released configuration of the ``"cell"`` entry, as ``load_model_frommmf`` prints it (quoted in a
third-party run log on GitHub, not read from the file here): ``seq_len`` 19266 (the genes plus two
tokens), encoder ``hidden_dim`` 768, ``depth`` 12, ``heads`` 12, ``module_type`` transformer; decoder
512 / 6 / 8, ``dim_head`` 64, performer; ``bin_num`` 100, ``bin_alpha`` 1.0, ``pad_token_id`` 103,
``mask_token_id`` 102. The encoder half then has 99.9M parameters (the README's "100M").

What runs here is the encoder half of MaeAutobin, named so that ``state_dict()`` keys equal the
released ones:

- ``token_emb`` (the "auto-discretization" value embedding): a value ``v`` becomes
  ``softmax(bin_alpha * h + mlp2(h)) @ emb.weight`` with ``h = LeakyReLU_0.1(mlp(v))``
  (``mlp``: Linear 1 -> bin_num, ``mlp2``: Linear bin_num -> bin_num, ``emb``: bin_num x d); a value
  equal to ``mask_token_id`` takes the ``emb_mask`` row instead, one equal to ``pad_token_id`` the
  ``emb_pad`` row (mask replaced first, then pad);
- ``pos_emb``: Embedding(seq_len + 1, d), indexed by the gene's position in the gene list (the two
  extra tokens at ``n_genes`` and ``n_genes + 1``), added to the value embedding;
- ``encoder``: ``transformer_encoder.<i>`` are PyTorch ``nn.TransformerEncoderLayer`` s
  (``batch_first``, post-norm, ReLU, feed-forward 4 d, eps 1e-5; ``norm_first`` in the config is
  never passed on), then ``encoder.norm`` (LayerNorm). The padding mask is the key-padding mask.
  Here the same weights run through :func:`cellarena.zoo.adapters.layers.attend`.

The decoder (``decoder.`` Performer, ``decoder_embed.``, ``norm.``, ``to_final.``) is not used by
cell embeddings; it is checked to be there only by prefix.

The cell embedding is ``get_embedding.py --input_type singlecell --output_type cell --pool_type
all --pre_normalized F``:

- the data's genes are matched by symbol to the gene list; list genes the data lacks are zeros
  (``main_gene_selection``), genes not in the list are dropped;
- per cell, ``total`` = sum of its counts over the list's genes, values ``log1p(count / total * 1e4)``;
  two tokens are appended: T (``tgthighres``: ``t<x>`` -> x, ``f<x>`` -> log10(total * x), ``a<x>``
  -> log10(total) + x) at index ``n_genes`` and S = log10(total) at ``n_genes + 1``;
- the encoder sees the entries > 0 of that vector (T and S included only when > 0), in index order,
  with their indices as position ids;
- the embedding is [output of the last token (S), of the second-to-last (T), max over the other
  tokens, mean over the other tokens], 4 d = 3,072 floats, not normalised.

The original embeds one cell at a time (no padding). Here cells are batched, ordered by length,
padded (value ``pad_token_id``, position ``seq_len``, masked as keys) and pooled per cell over its
own tokens only, which gives the same numbers up to float rounding. No step is random. Two more
differences, neither changing a real input: the normalisation is computed in float64 (the original
in the dtype of its data frame) and cast to float32 as the original's tensor is; and the original
selects the gene list's columns only when the input has fewer than 19,264 columns (a wider input
would be fed unaligned), while here the data is always matched to the list. A cell with fewer than
three tokens, which the original cannot pool, makes the run not applicable.

Sources (biomap-research/scFoundation@d09626a5c1bc30b9c6227378677b61e0b987fe8b): model/load.py
(convertconfig, load_model_frommmf, gatherData, main_gene_selection), model/get_embedding.py
(cell path), model/pretrainmodels/select_model.py, mae_autobin.py, transformer.py, performer.py,
reversible.py (decoder parameter names), model/OS_scRNA_gene_index.19264.tsv, model/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from cellarena.errors import NotApplicable
from cellarena.zoo.adapters.layers import PostNormLayer, split_state, torch_load
from cellarena.zoo.adapters.plugin import AdapterPlugin
from cellarena.zoo.adapters.releases import match_genes

CHECKPOINT, GENE_LIST = FILES = ("models.ckpt", "OS_scRNA_gene_index.19264.tsv")
ARCHITECTURE = "mae_autobin"
VERSIONS = {"ce": "cell", "rde": "rde"}  # get_embedding.py --version -> entry of models.ckpt
# MaeAutobin's decoder half: in the released state dict, unused by cell embeddings
UNUSED_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
SCALE = 1e4  # counts per cell after normalisation


class Sizes(NamedTuple):
    """MaeAutobin's sizes: the encoder's, the decoder's (left at 0 where only the encoder is built) and the
    value embedding's bins."""

    dim: int
    heads: int
    depth: int
    decoder_dim: int
    decoder_heads: int
    decoder_depth: int
    decoder_dim_head: int
    bin_num: int


class ValueEmbedding(nn.Module):
    """``token_emb``: a scalar value -> a softmax-weighted mix of ``bin_num`` learned vectors."""

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_value: float, pad_value: float):
        super().__init__()
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.bin_alpha, self.mask_value, self.pad_value = float(bin_alpha), float(mask_value), float(pad_value)

    def forward(self, values):
        """``values``: (B, L) float -> (B, L, d)."""
        v = values.unsqueeze(-1)
        hidden = nn.functional.leaky_relu(self.mlp(v), 0.1)
        weights = torch.softmax(self.bin_alpha * hidden + self.mlp2(hidden), dim=-1)
        out = weights @ self.emb.weight
        out = torch.where(v == self.mask_value, self.emb_mask.weight[0].to(out.dtype), out)
        return torch.where(v == self.pad_value, self.emb_pad.weight[0].to(out.dtype), out)


class Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.transformer_encoder = nn.ModuleList(PostNormLayer(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, padding, how):
        key_mask = None if not padding.any() else (~padding)[:, None, None, :]
        label = None
        for layer in self.transformer_encoder:
            x, label = layer(x, key_mask, how)
        return self.norm(x), label


class ScFoundationEncoder(nn.Module):
    """Value embedding + gene-position embedding + transformer encoder (MaeAutobin without its decoder)."""

    def __init__(self, n_positions: int, sizes: Sizes, bin_alpha: float, mask_token_id: float, pad_token_id: float):
        super().__init__()
        self.token_emb = ValueEmbedding(sizes.dim, sizes.bin_num, bin_alpha, mask_token_id, pad_token_id)
        self.pos_emb = nn.Embedding(n_positions, sizes.dim)
        self.encoder = Encoder(sizes.dim, sizes.heads, sizes.depth)
        self.attention_kernel = None

    def forward(self, values, positions, padding, how: str = "sdpa"):
        """Outputs (B, L, d). ``values`` (B, L) float, ``positions`` (B, L) long, ``padding`` (B, L)
        bool, True at padding."""
        x = self.token_emb(values) + self.pos_emb(positions)
        x, self.attention_kernel = self.encoder(x, padding, how)
        return x


def merged_config(config: dict) -> dict:
    """The flat hyper-parameters of one entry: the architecture's model config, then the rnaseq
    dataset config over it (the original's convertconfig)."""
    name = config["model"]
    merged = {**config["model_config"][name], **config["dataset_config"]["rnaseq"]}
    merged.setdefault("model", name)
    return merged


def parameter_name(key: str) -> str:
    """A released state-dict key -> the model's parameter name: the text after the first ``model.``
    (up to a second one, as the original's ``split('model.')[1]``)."""
    parts = str(key).split("model.")
    if len(parts) < 2:
        raise ValueError(f"state-dict key {key!r} has no 'model.' prefix")
    return parts[1]


def read_gene_list(path: str | Path) -> list[str]:
    """The ``gene_name`` column of the gene-index TSV, in file order."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    if "gene_name" not in header:
        raise ValueError(f"{path}: no gene_name column in the header {header}")
    col = header.index("gene_name")
    return [line.split("\t")[col] for line in lines[1:] if line.strip()]


class Release:
    """A loaded release: the gene list, one entry's configuration and the encoder with its weights."""

    def __init__(self, folder: str | Path, device: str = "cpu", version: str = "ce"):
        folder = Path(folder)
        self.folder = folder
        if version not in VERSIONS:
            raise ValueError(f"unknown version {version!r}: one of {sorted(VERSIONS)}")
        self.entry = VERSIONS[version]
        where = f"{folder / CHECKPOINT} [{self.entry!r}]"
        released, self.unpickler = torch_load(folder / CHECKPOINT)
        if not isinstance(released, dict) or self.entry not in released:
            found = sorted(released) if isinstance(released, dict) else type(released).__name__
            raise ValueError(f"{folder / CHECKPOINT} has no entry {self.entry!r} (found {found})")
        self.config = merged_config(released[self.entry]["config"])
        c = self.config
        if c["model"] != ARCHITECTURE or c["encoder"]["module_type"] != "transformer":
            raise ValueError(f"{where} is a {c['model']} model with a {c['encoder']['module_type']} encoder; "
                             f"this adapter runs {ARCHITECTURE} with a transformer encoder")
        self.gene_list = read_gene_list(folder / GENE_LIST)
        self.n_genes = len(self.gene_list)
        self.seq_len = int(c["seq_len"])
        if self.seq_len != self.n_genes + 2:
            raise ValueError(f"{folder / GENE_LIST} lists {self.n_genes} genes; {where} expects seq_len - 2 = "
                             f"{self.seq_len - 2}")
        self.pad_token_id, self.mask_token_id = c["pad_token_id"], c["mask_token_id"]
        sizes = Sizes(int(c["encoder"]["hidden_dim"]), int(c["encoder"]["heads"]), int(c["encoder"]["depth"]),
                      0, 0, 0, 0, int(c["bin_num"]))
        state = {}
        for key, value in released[self.entry]["state_dict"].items():
            name = parameter_name(key)
            if name in state:
                raise ValueError(f"{where}: two keys give the parameter {name!r}")
            state[name] = value
        self.model = ScFoundationEncoder(self.seq_len + 1, sizes, float(c["bin_alpha"]), self.mask_token_id,
                                         self.pad_token_id)
        self.model.load_state_dict(split_state(state, self.model, UNUSED_PREFIXES, where))
        self.model.to(device).eval()
        self.device = device
        self.dim = sizes.dim
        self.unused = sorted({k.split(".")[0] for k in state if k.startswith(UNUSED_PREFIXES)})

    @property
    def genes(self) -> dict[str, int]:
        """Gene symbol -> position in the gene list (the first, should a symbol repeat)."""
        out: dict[str, int] = {}
        for i, g in enumerate(self.gene_list):
            out.setdefault(g, i)
        return out


def resolution_tokens(total: float, tgthighres: str) -> tuple[float, float]:
    """(T, S) of a cell with ``total`` counts: S = log10(total); T from ``tgthighres``."""
    kind, amount = tgthighres[:1], tgthighres[1:]
    try:
        x = float(amount)
    except ValueError:
        x = None
    if kind not in ("t", "f", "a") or x is None:
        raise ValueError(f"tgthighres {tgthighres!r} must be t, f or a followed by a number (e.g. t4, f1, a5)")
    with np.errstate(divide="ignore", invalid="ignore"):
        s = float(np.log10(total))
        t = {"t": x, "f": float(np.log10(total * x)), "a": s + x}[kind]
    return t, s


def input_vector(counts: np.ndarray, gene_index: np.ndarray, n_genes: int, tgthighres: str) -> np.ndarray:
    """The original's input of one cell: ``n_genes + 2`` float32 values, the normalised genes in
    gene-list order (zeros where the data has no such gene), then T and S. ``counts``: the cell's
    counts of the matched genes, ``gene_index``: their positions in the gene list."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    vector = np.zeros(n_genes + 2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        vector[np.asarray(gene_index)] = np.log1p(counts / total * SCALE)
    vector[n_genes:] = resolution_tokens(total, tgthighres)
    return vector.astype(np.float32)


def gather_tokens(vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, position ids) of the encoder's tokens: the entries > 0, in index order."""
    positions = np.flatnonzero(vector > 0)
    return vector[positions], positions.astype(np.int64)


def pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, 4 d): [last token, second-to-last token, max and mean over the tokens before them] of
    each cell, whose ``lengths`` first positions are its tokens."""
    b, length, _ = hidden.shape
    rows = torch.arange(b, device=hidden.device)
    last, second = hidden[rows, lengths - 1], hidden[rows, lengths - 2]
    inner = (torch.arange(length, device=hidden.device)[None, :] < (lengths - 2)[:, None]).unsqueeze(-1)
    top = hidden.masked_fill(~inner, float("-inf")).amax(dim=1)
    mean = hidden.masked_fill(~inner, 0.0).sum(dim=1) / (lengths - 2).unsqueeze(-1).to(hidden.dtype)
    return torch.cat([last, second, top, mean], dim=1)


@torch.no_grad()
def embed(counts, gene_index: np.ndarray, release: Release, *, tgthighres: str = "t4", batch_size: int = 8,
          attention: str = "sdpa") -> np.ndarray:
    """(cells, 4 d) float32 embeddings of the rows of ``counts`` (cells x matched genes; column j is
    gene-list position ``gene_index[j]``)."""
    gene_index = np.asarray(gene_index, dtype=np.int64)
    if np.unique(gene_index).size != gene_index.size:
        raise ValueError("two of the data's genes match the same gene of the gene list")
    n = counts.shape[0]
    cells = []
    for start in range(0, n, 256):
        block = counts[start:start + 256]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        cells.extend(gather_tokens(input_vector(row, gene_index, release.n_genes, tgthighres)) for row in block)
    lengths = np.array([values.size for values, _ in cells], dtype=np.int64)
    short = np.flatnonzero(lengths < 3)
    if short.size:
        raise NotApplicable(f"{short.size} of {n} cells (the first: row {int(short[0])}) have fewer than 3 tokens "
                            "(their genes of the gene list with a count, plus T and S where positive); the "
                            "original cannot pool such a cell")
    out = np.zeros((n, 4 * release.dim), dtype=np.float32)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        width = int(lengths[idx].max())
        values = np.full((idx.size, width), release.pad_token_id, dtype=np.float32)
        positions = np.full((idx.size, width), release.seq_len, dtype=np.int64)
        for row, i in enumerate(idx):
            values[row, :lengths[i]], positions[row, :lengths[i]] = cells[i]
        cell_lengths = torch.from_numpy(lengths[idx]).to(release.device)
        padding = torch.arange(width, device=release.device)[None, :] >= cell_lengths[:, None]
        hidden = release.model(torch.from_numpy(values).to(release.device),
                               torch.from_numpy(positions).to(release.device), padding, attention)
        out[idx] = pool(hidden, cell_lengths).float().cpu().numpy()
    return out


class Plugin(AdapterPlugin):
    """scFoundation's cell embedding as a plug-in (``models/scfoundation``)."""

    def embed(self, adata, *, solution=None):
        p = self.params
        release = Release(self.release_folder(), device=self.context.device, version=str(p["version"]))
        found, ids = match_genes(adata.var_names, release.genes, min_fraction=float(p["min_gene_fraction"]),
                                 what="scFoundation gene list")
        emb = embed(adata.layers["counts"].tocsr()[:, found], ids, release, tgthighres=str(p["tgthighres"]),
                    batch_size=int(p["batch_size"]))
        self.record(release, found, adata, attention=release.model.attention_kernel, checkpoint_entry=release.entry,
                    unpickler=release.unpickler)
        return emb
