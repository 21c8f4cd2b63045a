"""UCE, Universal Cell Embeddings (Rosen, Roohani et al. 2023): the released model, its cell sentences and its
cell embedding.

Facts taken from snap-stanford/UCE@8ead6e07af0c80f75653598138bb704e865b45c8 (model.py, evaluate.py,
eval_data.py, eval_single_anndata.py, data_proc/data_utils.py, data_proc/gene_embeddings.py,
data_proc/generate_reduced_chrom_files.py, "data_proc/Create New Species Files.ipynb").

The release (figshare article 24320806, the files ``evaluate.py`` downloads into ``model_files/``):

- ``4layer_model.torch`` (``33l_8ep_1024t_1280.torch`` for the paper's 33-layer model): a plain state dict
  of ``TransformerModel``, loaded with ``strict=True`` after the model's ``pe_embedding`` was set to an
  ``nn.Embedding`` of 145,469 x 5,120 zeros, so the file holds the whole token table
  (``pe_embedding.weight``) as well as the sinusoidal position table (the buffer ``pos_encoder.pe``,
  1,536 x 1 x 1,280). Keys: ``encoder.{0,2}`` (Linear token_dim->1280, GELU, LayerNorm),
  ``transformer_encoder.layers.<i>.*`` (``nn.TransformerEncoderLayer(1280, 20 heads, d_hid 5120)``: ReLU,
  post-norm, sequence-first), ``decoder.{0,1,2}.{0,1}`` + ``decoder.3`` (three Linear -> LayerNorm -> GELU
  blocks 1280->1024->1280->1280, then Linear 1280->1280), and two heads the embedding does not use:
  ``binary_decoder.*`` (expression prediction) and ``gene_embedding_layer.*``. 20 heads and d_model 1280
  are written in ``evaluate.py``, not stored in the file.
- ``all_tokens.torch``: one tensor, rows 0-3 the special tokens (0 padding, a zero row in
  generate_reduced_chrom_files.py; 1 and 2 chromosome brackets; 3 CLS), then each species' protein
  embeddings, species in name order. With 143,574 rows, ``evaluate.py`` appends 1,895 chromosome rows
  drawn with ``torch.manual_seed(23)``; a table that then has 145,469 rows, the size of the state dict's,
  is *not* used: the weights' own ``pe_embedding.weight`` is. Only a table of another size (a new
  species' token file) replaces it; this module refuses such a file.
- ``species_offsets.pkl``: a pickled dict, species -> row of its first gene in the token table.
- ``species_chrom.csv``: columns ``gene_symbol, chromosome, start, species``; a gene's chromosome token
  is ``CHROM_TOKEN_OFFSET`` (143,574 = 145,469 - 1,895) plus the code of ``"<species>_<chromosome>"``
  among the sorted distinct such strings of the whole file (pandas ``Categorical`` codes; 1,895 of them).
- ``protein_embeddings/<Species>.<assembly>.gene_symbol_to_embedding_ESM2.pt``: a dict gene symbol ->
  ESM2 embedding (5,120 values). A gene's token is the species offset plus the position of its
  upper-cased symbol among the file's upper-cased symbols (first occurrence).

The offsets and the 1,895 chromosome strings were checked on the copies of species_offsets.pkl and
species_chrom.csv in helicalAI/helical@c6de712e71dc1b8a114f07fa2ec52a3f9b730261 (helical/models/uce/
model_files/): offsets frog 4, human 13,466, ..., mouse 65,206, zebrafish 117,844; every chromosome a string.

The cell embedding (``eval_single_anndata.py`` defaults): the dataset's genes are matched
case-insensitively to the species' protein embeddings and chromosome table; genes expressed in fewer
than 10 cells are dropped (``sc.pp.filter_genes(min_cells=10)``). Per cell, 1,024 genes are drawn with
replacement with probability proportional to ``log1p(count)`` (so unexpressed genes are never drawn); the
sentence is CLS, then for each chromosome present, in a random order, that chromosome's token, its drawn
genes in order of genomic start, and the closing token (index 2; index 1 is never used). A batch (25
cells) is cut to its longest sentence and padded with token 0. Tokens are looked up in the table,
L2-normalised, encoded (Linear, GELU, LayerNorm), multiplied by sqrt(1280), the position table added,
then run through the encoder layers. The padding mask is passed as the *float* ``1 - mask``, which
PyTorch adds to the attention logits: padded keys are not masked, they get +1 (``PAD_BIAS``), so a cell's
embedding depends on the longest sentence of its batch. This module does the same. The embedding is
``decoder`` applied to the CLS output, L2-normalised (``X_uce``).

Where this module differs from the original: random draws come from one generator seeded with the run's
seed (the original uses numpy's global state, unseeded); the sort by genomic start is stable (the
original's quicksort leaves equal starts, 5 human gene pairs, in any order); cells are never dropped
(the original also drops cells with fewer than 25 genes) and a cell with no counts on the used genes
embeds its CLS alone (the original fails on it); a gene missing from the chromosome table is left out
(the original fails on it).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cellarena.errors import NotApplicable
from cellarena.zoo.adapters.layers import PostNormLayer, split_state
from cellarena.zoo.adapters.plugin import AdapterPlugin
from cellarena.zoo.adapters.releases import match_genes

WEIGHTS = "4layer_model.torch"
TOKENS_FILE = "all_tokens.torch"
CHROM_FILE = "species_chrom.csv"
OFFSETS_FILE = "species_offsets.pkl"
PROTEIN_DIR = "protein_embeddings"
PROTEIN_FILES = {  # data_proc/gene_embeddings.py
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
}
SPECIES = {"homo_sapiens": "human", "mus_musculus": "mouse"}  # cellarena organism -> UCE species name
PAD_ID, CHROM_OPEN_ID, CHROM_CLOSE_ID, CLS_ID = 0, 1, 2, 3  # CHROM_OPEN_ID is defined but never placed
N_HEADS = 20  # evaluate.py's nhead; not recorded in the weights
SAMPLE_SIZE = 1024
BATCH_SIZE = 25
MIN_CELLS_PER_GENE = 10
PAD_BIAS = 1.0  # what the original's float key-padding mask (1 - mask) adds to a padded key's logits
UNUSED_PREFIXES = ("binary_decoder.", "gene_embedding_layer.")


class Sizes(NamedTuple):
    """A UCE model's sizes, as read from its state dict (:func:`sizes_of`)."""

    token_dim: int
    d_model: int
    d_hid: int
    n_layers: int
    decoder_hidden: int
    output_dim: int
    binary_hidden: tuple[int, int, int]  # the expression head: in the file, not run


POSITIONS = 1536  # rows of pos_encoder.pe (PositionalEncoding's max_len, also the default pad_length)


def _block(n_in: int, n_out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU (the original's dropout after it is a no-op in inference)."""
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU())


class PositionTable(nn.Module):
    def __init__(self, n_positions: int, d_model: int):
        super().__init__()
        self.register_buffer("pe", torch.zeros(n_positions, 1, d_model))


class Layers(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_hid: int):
        super().__init__()
        self.layers = nn.ModuleList(PostNormLayer(d_model, n_heads, d_hid) for _ in range(n_layers))


class UCEEncoder(nn.Module):
    """The parts of the released ``TransformerModel`` the cell embedding uses, under the released names."""

    def __init__(self, n_tokens: int, sizes: Sizes, n_positions: int = POSITIONS, n_heads: int = N_HEADS):
        super().__init__()
        d = sizes.d_model
        self.d_model = d
        self.pos_encoder = PositionTable(n_positions, d)
        self.encoder = nn.Sequential(nn.Linear(sizes.token_dim, d), nn.GELU(), nn.LayerNorm(d))
        self.transformer_encoder = Layers(sizes.n_layers, d, n_heads, sizes.d_hid)
        self.decoder = nn.Sequential(_block(d, sizes.decoder_hidden), _block(sizes.decoder_hidden, sizes.output_dim),
                                     _block(sizes.output_dim, sizes.output_dim),
                                     nn.Linear(sizes.output_dim, sizes.output_dim))
        self.pe_embedding = nn.Embedding(n_tokens, sizes.token_dim)
        self.pe_embedding.weight.requires_grad_(False)  # the frozen token table
        self.attention_kernel = None

    def hidden(self, ids, padding, how: str = "sdpa"):
        """Encoder outputs (B, L, d) of token ids (B, L); ``padding`` (B, L) bool, True at padding,
        which is biased by :data:`PAD_BIAS`, not masked, as in the original."""
        x = F.normalize(self.pe_embedding(ids), dim=-1)
        x = self.encoder(x) * math.sqrt(self.d_model) + self.pos_encoder.pe[: ids.shape[1], 0]
        bias = None if not padding.any() else (padding.to(x.dtype) * PAD_BIAS)[:, None, None, :]
        if bias is not None and how == "math":  # the suite's math path takes boolean masks only
            raise ValueError("UCE's padding is an additive bias: use the sdpa attention path")
        for layer in self.transformer_encoder.layers:
            x, self.attention_kernel = layer(x, bias, how)
        return x

    def forward(self, ids, padding, how: str = "sdpa"):
        """The cell embeddings (B, output_dim): the decoded CLS output, L2-normalised."""
        return F.normalize(self.decoder(self.hidden(ids, padding, how)[:, 0]), dim=-1)


def sizes_of(state: dict, where: str) -> tuple[Sizes, int]:
    """(sizes, token rows) of a released state dict, read from its shapes."""
    try:
        d, token_dim = state["encoder.0.weight"].shape
        n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer_encoder.layers."))
        sizes = Sizes(token_dim=int(token_dim), d_model=int(d),
                      d_hid=int(state["transformer_encoder.layers.0.linear1.weight"].shape[0]), n_layers=n_layers,
                      decoder_hidden=int(state["decoder.0.0.weight"].shape[0]),
                      output_dim=int(state["decoder.3.weight"].shape[0]),
                      binary_hidden=tuple(int(state[f"binary_decoder.{j}.0.weight"].shape[0])
                                          if f"binary_decoder.{j}.0.weight" in state else 0 for j in range(3)))
        n_tokens = int(state["pe_embedding.weight"].shape[0])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where} is not a UCE state dict: {exc!r}") from None
    if sizes.d_model % N_HEADS:
        raise ValueError(f"{where}: d_model {sizes.d_model} is not a multiple of UCE's {N_HEADS} heads")
    return sizes, n_tokens


def _load_tensors(path: Path):
    """``torch.load`` of tensors only, memory-mapped where the file's format allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file in the pre-1.6 format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


class _PlainUnpickler(pickle.Unpickler):
    """Builtin containers and scalars only: species_offsets.pkl is a dict of str -> int."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{OFFSETS_FILE} may hold only plain values, not {module}.{name}")


def read_offsets(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        offsets = _PlainUnpickler(f).load()
    if not isinstance(offsets, dict) or not all(isinstance(v, int) for v in offsets.values()):
        raise ValueError(f"{path} is not a dict of species -> token offset")
    return {str(k): int(v) for k, v in offsets.items()}


def read_chromosomes(path: Path) -> pd.DataFrame:
    """species_chrom.csv with ``code``: the chromosome's index among the file's sorted "species_chromosome"."""
    table = pd.read_csv(path, dtype={"chromosome": str})
    missing = {"gene_symbol", "chromosome", "start", "species"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    table["code"] = pd.Categorical(table["species"] + "_" + table["chromosome"]).codes.astype(np.int64)
    return table


@dataclasses.dataclass(frozen=True)
class GeneTable:
    """One species' genes that have both a protein embedding and a chromosome position."""

    index: dict[str, int]  # upper-cased symbol -> row
    token_ids: np.ndarray
    chroms: np.ndarray  # chromosome codes
    starts: np.ndarray


class Release:
    """A loaded release: token offsets, chromosome table and the encoder with its weights."""

    def __init__(self, folder: str | Path, device: str = "cpu", weights: str = WEIGHTS):
        folder = Path(folder)
        self.folder, self.weights, self.device = folder, weights, device
        self.offsets = read_offsets(folder / OFFSETS_FILE)
        self.chromosomes = read_chromosomes(folder / CHROM_FILE)
        path = folder / weights
        state = _load_tensors(path)
        self.sizes, n_tokens = sizes_of(state, str(path))
        n_positions = int(state["pos_encoder.pe"].shape[0]) if "pos_encoder.pe" in state else POSITIONS
        with torch.device("meta"):  # the token table is GBs: take the loaded tensors, allocate nothing
            self.model = UCEEncoder(n_tokens, self.sizes, n_positions)
        self.model.load_state_dict(split_state(state, self.model, UNUSED_PREFIXES, str(path)), assign=True)
        self.unused = sorted({k.split(".")[0] for k in state if k.startswith(UNUSED_PREFIXES)})
        n_chrom = int(self.chromosomes["code"].max()) + 1
        self.chrom_offset = n_tokens - n_chrom  # CHROM_TOKEN_OFFSET: 145,469 - 1,895 = 143,574 in the release
        if self.chrom_offset <= max(self.offsets.values(), default=0):
            raise ValueError(f"{path} has {n_tokens} tokens, too few for {n_chrom} chromosomes of {CHROM_FILE} "
                             f"after the genes of {OFFSETS_FILE}")
        tokens = _load_tensors(folder / TOKENS_FILE)
        if not (isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and tokens.shape[1] == self.sizes.token_dim
                and tokens.shape[0] in (self.chrom_offset, n_tokens)):
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{folder / TOKENS_FILE} is {shape}; the release's token table has {self.chrom_offset} "
                             f"(or {n_tokens}) rows of {self.sizes.token_dim}. A token file of other species "
                             "is not supported")
        del tokens  # of the release's size: the original keeps the weights' own table (see the docstring)
        self.model.float().to(device).eval()  # the original copies the file into float32 modules

    def gene_table(self, species: str) -> GeneTable:
        """The species' genes: token = offset + position in its protein-embedding file (upper-cased,
        first occurrence), with chromosome code and start; genes without a chromosome row are left out."""
        if species not in self.offsets or species not in PROTEIN_FILES:
            raise ValueError(f"UCE has no protein embeddings for {species!r} in {self.folder}")
        symbols = list(dict.fromkeys(str(k).upper() for k in _load_tensors(self.folder / PROTEIN_DIR /
                                                                             PROTEIN_FILES[species])))
        rows = self.chromosomes[self.chromosomes["species"] == species].drop_duplicates("gene_symbol")
        located = {str(g): (c, start) for g, c, start in rows[["gene_symbol", "code", "start"]].itertuples(index=False)}
        kept = [(i, s) for i, s in enumerate(symbols) if s in located]
        return GeneTable(index={s: j for j, (_, s) in enumerate(kept)},
                         token_ids=np.array([self.offsets[species] + i for i, _ in kept], dtype=np.int64),
                         chroms=np.array([located[s][0] for _, s in kept], dtype=np.int64),
                         starts=np.array([located[s][1] for _, s in kept], dtype=np.int64))


def cell_sentence(counts: np.ndarray, token_ids: np.ndarray, chroms: np.ndarray, starts: np.ndarray,
                  rng: np.random.Generator, sample_size: int, chrom_offset: int) -> np.ndarray:
    """One cell's tokens: CLS, then per chromosome (random order) its token, its drawn genes by start,
    and the closing token. Genes are drawn with replacement, probability proportional to log1p(count)."""
    weights = np.log1p(np.asarray(counts, dtype=np.float64))
    total = weights.sum()
    if not total > 0:
        return np.array([CLS_ID], dtype=np.int64)
    drawn = rng.choice(weights.size, size=sample_size, p=weights / total)
    drawn = drawn[np.lexsort((drawn, starts[drawn], chroms[drawn]))]  # by chromosome, then start
    present = np.unique(chroms[drawn])
    rng.shuffle(present)
    parts = [np.array([CLS_ID])]
    for chrom in present:
        parts += [np.array([chrom + chrom_offset]), token_ids[drawn[chroms[drawn] == chrom]],
                  np.array([CHROM_CLOSE_ID])]
    return np.concatenate(parts).astype(np.int64)


def expressed_in(counts, min_cells: int) -> np.ndarray:
    """Genes (columns) with a count in at least ``min_cells`` cells (scanpy's filter_genes(min_cells))."""
    return np.asarray((counts > 0).sum(axis=0)).ravel() >= min_cells


@torch.no_grad()
def embed(counts, token_ids: np.ndarray, chroms: np.ndarray, starts: np.ndarray, release: Release, *, seed: int,
          sample_size: int = SAMPLE_SIZE, batch_size: int = BATCH_SIZE, attention: str = "sdpa") -> np.ndarray:
    """UCE embeddings of the cells (rows) of ``counts`` (cells x used genes, raw counts)."""
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    out = np.zeros((n, release.sizes.output_dim), dtype=np.float32)
    limit = release.model.pos_encoder.pe.shape[0]
    for start in range(0, n, batch_size):
        block = counts[start:start + batch_size]
        block = (block.toarray() if hasattr(block, "toarray") else np.asarray(block)).astype(np.int64)
        cells = [cell_sentence(row, token_ids, chroms, starts, rng, sample_size, release.chrom_offset)
                 for row in block]
        length = max(c.size for c in cells)
        if length > limit:
            raise ValueError(f"a cell sentence has {length} tokens, more than the {limit} positions of the model; "
                             "lower sample_size")
        ids = np.full((len(cells), length), PAD_ID, dtype=np.int64)
        padding = np.ones((len(cells), length), dtype=bool)
        for i, cell in enumerate(cells):
            ids[i, :cell.size] = cell
            padding[i, :cell.size] = False
        emb = release.model(torch.from_numpy(ids).to(release.device), torch.from_numpy(padding).to(release.device),
                            attention)
        out[start:start + len(cells)] = emb.float().cpu().numpy()
    return out


def weights_file(card) -> str:
    """The state dict among the card's files (a 33-layer card lists 33l_8ep_1024t_1280.torch instead)."""
    return next(f.name for f in card.checkpoint.files if f.name.endswith(".torch") and f.name != TOKENS_FILE)


def _organism(adata, card) -> str:
    """The dataset's organism where the view carries it; otherwise the card's only one."""
    organism = adata.uns.get("cellarena", {}).get("organism")
    if organism is None:
        if len(card.organisms) != 1:
            raise RuntimeError("the data passed to the plug-in does not say its organism (uns['cellarena']"
                               "['organism']), and the card lists several: the species' tokens cannot be chosen")
        organism = card.organisms[0]
    if organism not in SPECIES:
        raise NotApplicable(f"UCE's release has no protein embeddings for {organism}")
    return organism


class Plugin(AdapterPlugin):
    """UCE's cell embedding as a plug-in (``models/uce``)."""

    def embed(self, adata, *, solution=None):
        p = self.params
        species = SPECIES[_organism(adata, self.card)]
        release = Release(self.release_folder(), device=self.context.device, weights=weights_file(self.card))
        table = release.gene_table(species)
        found, rows = match_genes([str(g).upper() for g in adata.var_names], table.index,
                                  min_fraction=float(p["min_gene_fraction"]),
                                  what=f"UCE {species} protein embeddings with a chromosome position")
        counts = adata.layers["counts"].tocsr()[:, found]
        keep = expressed_in(counts, int(p["min_cells_per_gene"]))
        if not keep.any():
            raise NotApplicable(f"none of the {found.size} matched genes has a count in at least "
                                f"{p['min_cells_per_gene']} of the {adata.n_obs} cells")
        counts, rows = counts[:, keep], rows[keep]
        emb = embed(counts, table.token_ids[rows], table.chroms[rows], table.starts[rows], release,
                    seed=self.context.seed, sample_size=int(p["sample_size"]), batch_size=int(p["batch_size"]))
        self.record(release, found, adata, attention=release.model.attention_kernel, weights=release.weights,
                    species=species, genes_used=int(keep.sum()),
                    cells_without_counts=int((counts.sum(axis=1) == 0).sum()))
        return emb
