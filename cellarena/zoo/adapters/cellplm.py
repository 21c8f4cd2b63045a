"""CellPLM (Wen et al., ICLR 2024): the released pretrained model's cell-embedding path, its input and its loader.

Sources: OmicsML/CellPLM@b59ee7688b1bd2a745856a610248b46f15019a22 (the PyPI package cellplm
0.1.0.post2 holds the same Python files): README.md, ckpt/README.md, ckpt/20230926_85M.config.json,
CellPLM/pipeline/__init__.py (load_pretrain, common_preprocess), pipeline/cell_embedding.py
(CellEmbeddingPipeline), pipeline/experimental.py, model/cellformer.py (OmicsFormer),
embedder/omics.py, encoder/__init__.py, encoder/transformer.py, layer/flowformer.py,
latent/__init__.py, latent/autoencoders.py, head/downstream.py (EmbedderHead), decoder/zinb.py,
utils/__init__.py (create_norm), utils/data.py (TranscriptomicDataset), utils/pe.py, utils/mask.py,
and the printed model of tutorials/cell_embedding.ipynb.

The release (the authors' Dropbox folder linked from the README) is two files sharing a prefix,
``<prefix>.config.json`` and ``<prefix>.best.ckpt``; the README names ``20230926_85M`` the latest
(its config is also committed in the repository), the tutorials load ``20231027_85M`` (same
folder). ``load_pretrain``:

- the config JSON holds OmicsFormer's keyword arguments, ``gene_list`` included (19,374 human
  Ensembl gene ids for 20230926_85M); the cell-embedding pipeline sets ``head_type="embedder"``;
- ``torch.load(ckpt)["model_state_dict"]`` is the pretraining model's state dict (unprefixed
  keys: the tutorials' results need the weights to load, and with a ``module.`` prefix nothing
  would). The original copies only the entries whose name and shape the embedding model has and
  silently keeps its random initialisation for any other; here every parameter the embedding
  uses must be there with its shape, and the only other entries allowed are the pretraining
  decoder (``decoder.``) and two embedder modules the forward pass never reads
  (``embedder.pe_enc.``, the spatial positional table, and ``embedder.norm0.``).

What the released configuration selects (20230926_85M: ``enc_mod`` flowformer, ``enc_hid``
1024, ``enc_layers`` 4, no ``enc_head`` so 8 heads, ``norm`` groupnorm, ``latent_mod`` gmvae,
``post_latent_dim`` 512, ``num_clusters`` 16, ``cat_pe`` false, ``dsbn``/``dar``/``ecs``/
``input_covariate`` false):

- input: the raw counts of the data's genes found in ``gene_list`` (others dropped; genes of the
  list the data lacks simply contribute nothing); per cell ``log1p(count)`` in float32, no
  library-size normalisation;
- embedder: ``log1p(x) @ feat_enc.emb[genes]`` (sparse product with the genes' rows of the
  gene-embedding table, ``enc_hid`` wide), then ``extra_linear``: Linear, ReLU, (dropout),
  ``create_norm(norm)`` = GroupNorm(4 groups) for groupnorm. The positional encoding is
  replaced by the constant 0 in the original's forward (``cat_pe`` false: added), so coordinates
  never matter and ``norm0`` is never applied;
- encoder: ``enc_layers`` pre-norm Flowformer layers (LayerNorm eps 1e-5; ``norm`` is not passed
  to them): ``x + attn(norm1(x))`` then ``x + ff(norm2(x))``, ff = Linear(d, 2d), exact GELU,
  Linear(2d, d). The attention is Flow-Attention (Wu et al. 2022, non-causal, eps 1e-6): sigmoid
  feature maps of the query and key projections, incoming/outgoing flow normalisers, a sigmoid
  "allocation" per query and a softmax "competition" over the keys times their number, computed
  in linear time. **Its sequence is the cells, not the genes**: a chunk of cells is one sequence,
  so a cell's embedding depends on the other cells of its chunk. It is not softmax attention and
  cannot go through :func:`cellarena.zoo.adapters.layers.attend`; the run records ``flow_attention``;
- ``pre_latent_norm``: LayerNorm(d);
- latent, ``gmvae`` (GMVAELatentLayer at eval): cluster logits Linear(d, K); a Gumbel-softmax
  sample with temperature 1 made hard (one-hot of the arg-max of softmax(logits + g), g =
  -log(-log(u + 1e-20) + 1e-20), u uniform, written as (one_hot - soft) + soft); then
  Linear(d + K, 512), ReLU, and the Gaussian mean Linear(512, latent) is the embedding. So the
  original embedding of 20230926_85M is random: the cluster fed to the mean is sampled at
  inference. ``vae`` (20231027_85M, as printed by the tutorial): the mean ``hid_2mu(h)``,
  deterministic;
- the head (``EmbedderHead``) returns the latent unchanged: ``post_latent_dim`` floats, not
  normalised.

The pipeline's batching (``CellEmbeddingPipeline.predict``): the data's genes are Ensembl ids,
or else symbols converted on line through MyGene.info (``symbol_to_ensembl``); cells are grouped
by ``obs["batch"]`` when present (groups in sorted label order), each group is cut into chunks of
``batch_size`` cells in data order (default 0: the whole group in one chunk), one forward pass per
chunk, and the outputs are put back in data order. Random draws come from torch's global
generator in this order: one int64 when the DataLoader starts, then per chunk the uniforms of the
Gumbel sample (cells x K) and the normals of the unused reparameterisation (cells x latent;
``vae``: only those normals).

Here:

- cells, groups and chunks as the original; the draws come from a CPU ``torch.Generator`` seeded
  with the run's seed, in the original's order, so a CPU run equals the original's ``predict`` on
  CPU right after ``torch.manual_seed(seed)`` (on a GPU the original would draw from the CUDA
  generator instead);
- gene symbols: nothing goes on line at run time. The release folder holds one more file that
  is not part of the published release, ``<prefix>.gene_symbols.tsv`` (columns ``ensembl_id``,
  ``symbol``), written once with the original package's own ``ensembl_to_symbol`` (MyGene.info)
  over the config's gene list. As in the original, data whose names include any id of the gene
  list are matched by id; otherwise each name is looked up as a symbol in that table (a symbol
  that the table gives to several ids of the gene list is left out). The original's forward
  lookup (symbol -> Ensembl id, first hit) can differ from this inverse table for a few genes.

Checked against the original package (cellplm 0.1.0.post2 from PyPI, run on CPU, not a dependency
of the suite): ``OmicsFormer(**config).state_dict()`` has exactly the keys, order and shapes
:func:`cellarena.zoo.adapters.random_weights.write_cellplm` writes (test and published sizes, both
latent kinds; 82,402,543 values for 20230926_85M), and ``CellEmbeddingPipeline.predict`` after ``torch.manual_seed(s)``
on such a release gives this module's embeddings up to float rounding (largest difference 7e-5 on
values up to 95 at published sizes, with and without batch groups and chunks). The real released
files were not read here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from cellarena.zoo.adapters.layers import split_state, torch_load
from cellarena.zoo.adapters.plugin import AdapterPlugin
from cellarena.zoo.adapters.releases import match_genes

PREFIX = "20230926_85M"
ATTENTION = "flow_attention"  # the run's attention label: Flow-Attention over cells, not SDPA
# modules of the released state dict the cell embedding does not use
UNUSED_PREFIXES = ("decoder.", "embedder.pe_enc.", "embedder.norm0.")
LATENT_KINDS = ("gmvae", "vae")
DEFAULT_HEADS = 8  # OmicsFormer's enc_head default; the released config does not set it
QZYX_HIDDEN = 512  # the GMVAE inference network's fixed hidden width
FLOW_EPS = 1e-6
GUMBEL_EPS = 1e-20
NO_SYMBOL = ("", "0", "nan", "NaN", "None")  # what ensembl_to_symbol writes for an id without a symbol


def release_files(prefix: str = PREFIX) -> tuple[str, str, str]:
    """(checkpoint, config, symbol table) file names of a release."""
    return f"{prefix}.best.ckpt", f"{prefix}.config.json", f"{prefix}.gene_symbols.tsv"


FILES = release_files()


def make_norm(kind: str, dim: int) -> nn.Module:
    """The original's ``create_norm`` for the kinds a release may name."""
    if kind == "groupnorm":
        return nn.GroupNorm(4, dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"norm {kind!r} is not supported here (groupnorm or layernorm)")


class GeneFeatures(nn.Module):
    """``feat_enc``: one learned row per gene of the gene list."""

    def __init__(self, n_genes: int, dim: int):
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(n_genes, dim))


class Embedder(nn.Module):
    def __init__(self, n_genes: int, dim: int, norm: str):
        super().__init__()
        self.feat_enc = GeneFeatures(n_genes, dim)
        self.extra_linear = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Identity(), make_norm(norm, dim))

    def forward(self, log_counts, genes):
        """``log_counts``: (cells, genes of the data) sparse or dense; ``genes``: their rows in the table."""
        return self.extra_linear(log_counts @ self.feat_enc.emb.index_select(0, genes))


class FlowAttention(nn.Module):
    """Non-causal Flow-Attention over one sequence ``x`` (length, d): here the cells of a chunk."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query_projection = nn.Linear(dim, dim)
        self.key_projection = nn.Linear(dim, dim)
        self.value_projection = nn.Linear(dim, dim)
        self.out_projection = nn.Linear(dim, dim)

    def forward(self, x):
        length, dim = x.shape

        def split(t):  # (length, d) -> (heads, length, d / heads)
            return t.view(length, self.heads, dim // self.heads).transpose(0, 1)

        q = torch.sigmoid(split(self.query_projection(x)))
        k = torch.sigmoid(split(self.key_projection(x)))
        v = split(self.value_projection(x))
        eps = FLOW_EPS

        def against(rows, vector):  # (H, L, Dh) . (H, Dh) -> (H, L)
            return (rows @ vector.unsqueeze(-1)).squeeze(-1)

        incoming = 1.0 / against(q + eps, k.sum(1) + eps)
        outgoing = 1.0 / against(k + eps, q.sum(1) + eps)
        sink = against(q + eps, (k * outgoing.unsqueeze(-1)).sum(1) + eps)
        source = against(k + eps, (q * incoming.unsqueeze(-1)).sum(1) + eps).clamp(-1.0, 1.0)
        allocation = torch.sigmoid(sink)  # queries and keys are the same cells: the length ratio is 1
        competition = torch.softmax(source, dim=-1) * float(length)
        context = k.transpose(1, 2) @ (v * competition.unsqueeze(-1))  # (H, Dh, Dh)
        out = ((q * incoming.unsqueeze(-1)) @ context) * allocation.unsqueeze(-1)
        return self.out_projection(out.transpose(0, 1).reshape(length, dim))


class FlowformerLayer(nn.Module):
    """Pre-norm: attention then a GELU feed-forward of width 2 d, each added to its input."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = FlowAttention(dim, heads)
        self._ff_block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Identity(), nn.Linear(2 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self._ff_block(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(FlowformerLayer(dim, heads) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class PreLatentNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class ClusterLogits(nn.Module):
    def __init__(self, dim: int, clusters: int):
        super().__init__()
        self.logits = nn.Linear(dim, clusters)


class GaussianParams(nn.Module):
    def __init__(self, dim: int, latent: int):
        super().__init__()
        self.mu = nn.Linear(dim, latent)
        self.var = nn.Linear(dim, latent)


class GMVAEInference(nn.Module):
    def __init__(self, dim: int, latent: int, clusters: int):
        super().__init__()
        self.inference_qyx = nn.ModuleList([ClusterLogits(dim, clusters)])
        self.inference_qzyx = nn.ModuleList([nn.Linear(dim + clusters, QZYX_HIDDEN), nn.ReLU(),
                                             GaussianParams(QZYX_HIDDEN, latent)])
        self.y_mu = nn.Linear(clusters, latent)  # the prior's parameters: loaded, unused by the embedding
        self.y_var = nn.Linear(clusters, latent)


class GMVAELatent(nn.Module):
    def __init__(self, dim: int, latent: int, clusters: int):
        super().__init__()
        self.inference = GMVAEInference(dim, latent, clusters)

    def forward(self, h, uniforms):
        """The mean of q(z | h, y) for a hard Gumbel-softmax sample y drawn with ``uniforms``."""
        logits = self.inference.inference_qyx[0].logits(h)
        gumbel = -torch.log(-torch.log(uniforms + GUMBEL_EPS) + GUMBEL_EPS)
        soft = torch.softmax(logits + gumbel, dim=-1)  # temperature 1
        hard = torch.zeros_like(soft).scatter_(1, soft.max(dim=-1).indices.unsqueeze(1), 1.0)
        y = (hard - soft) + soft  # the straight-through form, kept for its rounding
        hidden, relu, gaussian = self.inference.inference_qzyx
        return gaussian.mu(relu(hidden(torch.cat([h, y], dim=1))))


class VAELatent(nn.Module):
    def __init__(self, dim: int, latent: int):
        super().__init__()
        self.hid_2mu = nn.Linear(dim, latent)
        self.hid_2sigma = nn.Linear(dim, latent)  # the variance: loaded, unused by the embedding

    def forward(self, h, uniforms=None):
        return self.hid_2mu(h)


class Latent(nn.Module):
    """``layers[0]`` is the original's parameter-free placeholder; ``layers[1]`` the latent layer."""

    def __init__(self, kind: str, dim: int, latent: int, clusters: int):
        super().__init__()
        layer = GMVAELatent(dim, latent, clusters) if kind == "gmvae" else VAELatent(dim, latent)
        self.layers = nn.ModuleList([nn.Identity(), layer])


class CellPLMEncoder(nn.Module):
    """Everything of OmicsFormer that a cell embedding runs, named as the released state dict."""

    def __init__(self, n_genes: int, dim: int, heads: int, n_layers: int, norm: str, latent_kind: str,
                 latent: int, clusters: int):
        super().__init__()
        self.embedder = Embedder(n_genes, dim, norm)
        self.encoder = Encoder(dim, heads, n_layers)
        self.pre_latent_norm = PreLatentNorm(dim)
        self.latent = Latent(latent_kind, dim, latent, clusters)
        self.latent_kind, self.latent_dim, self.clusters = latent_kind, latent, clusters

    def forward(self, log_counts, genes, uniforms=None):
        """(cells, latent) for one chunk: ``log_counts`` (cells, data genes), ``genes`` their rows in
        the gene table, ``uniforms`` (cells, clusters) for the GMVAE's Gumbel sample."""
        h = self.encoder(self.embedder(log_counts, genes))
        return self.latent.layers[1](self.pre_latent_norm.norm(h), uniforms)

    def draw(self, n_cells: int, generator: torch.Generator) -> torch.Tensor | None:
        """The original's draws for a chunk of ``n_cells``, in its order; the uniforms the output uses."""
        uniforms = torch.rand(n_cells, self.clusters, generator=generator) if self.latent_kind == "gmvae" else None
        torch.randn(n_cells, self.latent_dim, generator=generator)  # the reparameterisation noise, unused
        return uniforms


def check_config(config: dict, where: str) -> None:
    """Refuse configurations this adapter does not run (other encoders, latent layers, options)."""
    problems = []
    if config.get("enc_mod") != "flowformer":
        problems.append(f"enc_mod {config.get('enc_mod')!r} (only flowformer)")
    if config.get("latent_mod", "vae") not in LATENT_KINDS:
        problems.append(f"latent_mod {config.get('latent_mod')!r} (only {', '.join(LATENT_KINDS)})")
    for flag in ("cat_pe", "dsbn", "dar", "ecs", "input_covariate"):
        if config.get(flag, flag == "cat_pe"):  # OmicsFormer's defaults: cat_pe true, the others false
            problems.append(f"{flag} true")
    if problems:
        raise ValueError(f"{where}: this adapter runs the released configuration; unsupported: {'; '.join(problems)}")


def read_symbol_table(path: str | Path) -> list[tuple[str, str]]:
    """(Ensembl id, symbol) rows of a ``gene_symbols.tsv``; ids without a symbol are left out."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t") if lines else []
    if "ensembl_id" not in header or "symbol" not in header:
        raise ValueError(f"{path}: the header must name the columns ensembl_id and symbol (tab-separated), "
                         f"found {header}")
    i, j = header.index("ensembl_id"), header.index("symbol")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return [(r[i].strip(), r[j].strip()) for r in rows if len(r) > max(i, j) and r[j].strip() not in NO_SYMBOL]


class Release:
    """A loaded release: configuration, gene list, symbol table and the embedding model."""

    def __init__(self, folder: str | Path, device: str = "cpu", prefix: str = PREFIX):
        folder = Path(folder)
        self.folder, self.prefix = folder, prefix
        ckpt_name, config_name, symbols_name = release_files(prefix)
        self.config = json.loads((folder / config_name).read_text())
        c = self.config
        check_config(c, str(folder / config_name))
        self.gene_list = [str(g) for g in c["gene_list"]]
        self.gene_index = {g: i for i, g in enumerate(self.gene_list)}
        if len(self.gene_index) != len(self.gene_list):
            raise ValueError(f"{folder / config_name}: gene_list repeats a gene")
        self.symbols_file = symbols_name
        self.symbol_index, self.ambiguous_symbols = self._symbols(folder / symbols_name)
        released, self.unpickler = torch_load(folder / ckpt_name)
        if not isinstance(released, dict) or "model_state_dict" not in released:
            found = sorted(map(str, released))[:10] if isinstance(released, dict) else type(released).__name__
            raise ValueError(f"{folder / ckpt_name} has no 'model_state_dict' entry (found {found})")
        state = released["model_state_dict"]
        self.latent_kind = c.get("latent_mod", "vae")
        self.model = CellPLMEncoder(len(self.gene_list), int(c["enc_hid"]), int(c.get("enc_head", DEFAULT_HEADS)),
                                    int(c["enc_layers"]), str(c.get("norm", "layernorm")), self.latent_kind,
                                    int(c["post_latent_dim"]), int(c.get("num_clusters", 16)))
        self.model.load_state_dict(split_state(state, self.model, UNUSED_PREFIXES, str(folder / ckpt_name)))
        self.model.to(device).eval()
        self.device = device
        self.dim = int(c["post_latent_dim"])
        self.unused = sorted(p.rstrip(".") for p in UNUSED_PREFIXES if any(str(k).startswith(p) for k in state))

    def _symbols(self, path: Path) -> tuple[dict[str, int], int]:
        """Symbol -> position in the gene list, from the table's rows whose id is in the list; a
        symbol given to several ids of the list is left out (their number is returned)."""
        owners: dict[str, set[int]] = {}
        for ensembl, symbol in read_symbol_table(path):
            if ensembl in self.gene_index:
                owners.setdefault(symbol, set()).add(self.gene_index[ensembl])
        unique = {s: next(iter(ids)) for s, ids in owners.items() if len(ids) == 1}
        return unique, len(owners) - len(unique)

    def vocabulary(self, names) -> tuple[dict[str, int], str]:
        """(name -> position in the gene list, how names were read): by id when any of ``names`` is
        an id of the gene list (the original's rule), by symbol otherwise."""
        if any(str(n) in self.gene_index for n in names):
            return self.gene_index, "Ensembl ids"
        return self.symbol_index, f"symbols via {self.symbols_file}"


def chunks(n_cells: int, batch, batch_size: int) -> list[np.ndarray]:
    """The original's forward passes: cells grouped by ``batch`` (sorted labels; None: one group),
    each group cut in data order into chunks of ``batch_size`` (0: the whole group)."""
    if batch is None:
        groups = [np.arange(n_cells)]
    else:
        batch = np.asarray(batch)
        groups = [np.flatnonzero(batch == label) for label in np.unique(batch)]
    out = []
    for cells in groups:
        size = batch_size if batch_size > 0 else max(cells.size, 1)
        out.extend(cells[start:start + size] for start in range(0, cells.size, size))
    return out


def _log_counts(block: sp.csr_matrix, device: str) -> torch.Tensor:
    """A chunk's counts as a torch sparse (COO, as the original's) float32 tensor of ``log1p(count)``."""
    block = sp.csr_matrix(block, dtype=np.float32, copy=True)
    block.sum_duplicates()  # sorted, unique indices: a coalesced tensor
    rows = np.repeat(np.arange(block.shape[0], dtype=np.int64), np.diff(block.indptr))
    indices = torch.from_numpy(np.stack([rows, block.indices.astype(np.int64)]))
    values = torch.log1p(torch.from_numpy(block.data))
    return torch.sparse_coo_tensor(indices, values, block.shape, device=device, check_invariants=True,
                                   is_coalesced=True)


@torch.no_grad()
def embed(counts, genes: np.ndarray, release: Release, *, seed: int, batch=None,
          batch_size: int = 0) -> tuple[np.ndarray, list[int]]:
    """(cells, latent) float32 embeddings of the rows of ``counts`` (cells x matched genes; column j
    is gene-list position ``genes[j]``), and the size of each forward pass."""
    counts = sp.csr_matrix(counts)
    n = counts.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's draw
    gene_rows = torch.as_tensor(np.asarray(genes, dtype=np.int64), device=release.device)
    out = np.zeros((n, release.dim), dtype=np.float32)
    passes = []
    for cells in chunks(n, batch, batch_size):
        uniforms = release.model.draw(cells.size, generator)
        if uniforms is not None:
            uniforms = uniforms.to(release.device)
        hidden = release.model(_log_counts(counts[cells], release.device), gene_rows, uniforms)
        out[cells] = hidden.float().cpu().numpy()
        passes.append(int(cells.size))
    return out, passes


class Plugin(AdapterPlugin):
    """CellPLM's cell embedding as a plug-in (``models/cellplm``)."""

    def embed(self, adata, *, solution=None):
        p = self.params
        release = Release(self.release_folder(), device=self.context.device)
        vocabulary, how = release.vocabulary(adata.var_names)
        found, ids = match_genes(adata.var_names, vocabulary, min_fraction=float(p["min_gene_fraction"]),
                                 what=f"CellPLM gene list (matched as {how})")
        batch = adata.obs["batch"].astype(str).to_numpy() if p["group_by_batch"] and "batch" in adata.obs else None
        emb, passes = embed(adata.layers["counts"].tocsr()[:, found], ids, release, seed=self.context.seed,
                            batch=batch, batch_size=int(p["batch_size"]))
        self.record(release, found, adata, attention=ATTENTION, latent=release.latent_kind, gene_ids=how,
                    forward_passes=len(passes), largest_pass=max(passes, default=0),
                    grouped_by_batch=batch is not None, unpickler=release.unpickler)
        return emb
