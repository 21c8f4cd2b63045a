"""Gene vocabulary and the three ways of turning an expression profile into transformer input.

An expression profile is a set of (gene, count) pairs with no natural order, so every single-cell
transformer has to decide how a cell becomes a token sequence. This module implements the three
families found in the literature, on one shared footing so that they can be compared fairly:

``rank`` (Geneformer, tGPT)
    Each count is normalized by the cell's total (to ``target_sum``) and then divided by the gene's
    median non-zero normalized expression over the pretraining corpus. Genes are sorted by that
    ratio, highest first; the tokens are gene IDs and the *position* carries the expression
    information (the model adds a learned positional embedding).
``bin`` (scGPT, scBERT)
    Tokens are gene IDs; each token also carries an expression bin. Bins are adaptive per cell by
    default: the edges are quantiles of the cell's own non-zero log-normalized values, so every
    cell spreads over the same ``n_bins`` levels. Equal-width bins between the cell's smallest and
    largest non-zero value are an option.
``projection`` (scFoundation, CellPLM)
    Tokens are gene IDs; each token also carries the continuous value ``log1p(count / total *
    target_sum)``, which the model projects into the embedding space. No discretization.

Shared conventions:

- Only non-zero genes that are in the vocabulary become tokens. When a cell has more of them than
  fit in the context, the top ones are kept: by the rank ratio for ``rank``, by log-normalized value
  otherwise. Ties are broken by vocabulary index (lower first), so encoding is deterministic.
- Gene tokens are ordered by decreasing score (the same score used for truncation). For ``bin``
  and ``projection`` the model has no positional embedding, so the order only matters for rank.
- Every sequence starts with a prefix: ``CLS`` followed by one token per sample-level group of the
  vocabulary (batch, condition, perturbation, ...), in the vocabulary's group order. A cell whose
  group value is unknown gets that group's ``unknown`` token, so the prefix length is constant.
- Library size is the cell's total over *all* genes of the matrix, not only vocabulary genes.

Bins: value tokens use bins ``1..n_bins``; bin ``0`` means "no value" (CLS, sample tokens, padding)
and bin ``n_bins + 1`` is the mask bin used during pretraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from cellarena.errors import NotApplicable

Encoding = Literal["rank", "bin", "projection"]
ENCODINGS: tuple[str, ...] = ("rank", "bin", "projection")
BinMode = Literal["quantile", "equal_width"]

PAD, CLS, MASK = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<cls>", "<mask>")
NO_VALUE_BIN = 0  # bin index of tokens that carry no expression value

__all__ = [
    "PAD", "CLS", "MASK", "ENCODINGS", "GeneVocab", "CellTokenizer", "TokenizedCells", "Batch",
    "compute_gene_medians", "counts_matrix", "normalize_counts", "corpus_hash",
]


# --------------------------------------------------------------------------------------------
# counts helpers


def counts_matrix(adata, layer: str | None = "counts") -> sp.csr_matrix:
    """The raw-count matrix of an AnnData as float32 CSR: ``layers[layer]`` if present, else ``X``."""
    if layer is not None and layer in adata.layers:
        mat = adata.layers[layer]
    elif adata.X is not None:
        mat = adata.X
    else:
        raise ValueError(f"AnnData has neither layers[{layer!r}] nor X")
    mat = sp.csr_matrix(mat, dtype=np.float32)
    mat.sum_duplicates()
    mat.sort_indices()
    return mat


def normalize_counts(counts: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """Counts scaled so that each cell sums to ``target_sum`` (float64; empty cells stay empty)."""
    m = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    m.data *= np.repeat(scale, np.diff(m.indptr))
    return m


def compute_gene_medians(counts: sp.csr_matrix, target_sum: float = 1e4) -> np.ndarray:
    """Per gene (column): the median of its non-zero total-normalized values over all cells.

    Genes that are zero in every cell get NaN. This is the normalization factor of the rank encoding
    (Geneformer divides each cell's normalized expression by these corpus-wide medians, which
    lifts informative, lowly expressed genes above ubiquitous highly expressed ones).
    """
    norm = normalize_counts(counts, target_sum).tocsc()
    norm.eliminate_zeros()
    out = np.full(norm.shape[1], np.nan)
    ptr, data = norm.indptr, norm.data
    for j in np.flatnonzero(np.diff(ptr)):
        out[j] = np.median(data[ptr[j]:ptr[j + 1]])
    return out


def corpus_hash(adata, layer: str | None = "counts") -> str:
    """sha256 over gene names, shape and the CSR arrays of the counts: identifies a corpus exactly."""
    mat = counts_matrix(adata, layer)
    h = hashlib.sha256()
    h.update(json.dumps([list(map(str, adata.var_names)), list(mat.shape)]).encode())
    for arr in (mat.indptr.astype(np.int64), mat.indices.astype(np.int64), mat.data.astype(np.float32)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# vocabulary


@dataclasses.dataclass
class GeneVocab:
    """Gene symbol -> token id, with special tokens and reserved ranges for sample-level tokens.

    Layout of ids: ``0 <pad>``, ``1 <cls>``, ``2 <mask>``; then, for each sample group in order, a
    block of ``sample_slots`` ids whose first slot is the group's ``unknown`` token and whose other
    slots are assigned to the group's values in registration order; then the genes, in the order of
    ``genes`` (``gene_offset + i`` is gene ``i``).

    ``medians`` (aligned to ``genes``) are the corpus medians used by the rank encoding;
    ``target_sum`` is the library size every cell is normalized to (also used for the medians).
    """

    genes: list[str]
    sample_groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    sample_slots: int = 64
    medians: np.ndarray | None = None
    target_sum: float = 1e4

    def __post_init__(self):
        self.genes = [str(g) for g in self.genes]
        if len(set(self.genes)) != len(self.genes):
            dup = sorted({g for g in self.genes if self.genes.count(g) > 1})[:5]
            raise ValueError(f"duplicate gene symbols in vocabulary, e.g. {dup}")
        if not self.genes:
            raise ValueError("a vocabulary needs at least one gene")
        if self.sample_slots < 1:
            raise ValueError("sample_slots must be >= 1 (slot 0 is the unknown token)")
        self.sample_groups = {str(k): [str(v) for v in vals] for k, vals in self.sample_groups.items()}
        for group, vals in self.sample_groups.items():
            if len(vals) > self.sample_slots - 1:
                raise ValueError(f"sample group {group!r} has {len(vals)} values but only "
                                 f"{self.sample_slots - 1} slots")
        if self.medians is not None:
            self.medians = np.asarray(self.medians, dtype=np.float64)
            if self.medians.shape != (len(self.genes),):
                raise ValueError("medians must have one entry per gene")
        self._index = {g: i for i, g in enumerate(self.genes)}

    # ---- construction

    @classmethod
    def from_adata(cls, adata, *, layer: str | None = "counts", sample_keys: Sequence[str] = (),
                   sample_slots: int = 64, target_sum: float = 1e4, min_cells: int = 1) -> "GeneVocab":
        """Build from a corpus: genes (var index = symbols) expressed in >= ``min_cells`` cells.

        Genes are sorted by symbol, so the vocabulary does not depend on the corpus's column order.
        ``sample_keys`` name obs columns that become sample-token groups; their observed values are
        registered (sorted). A key missing from ``obs`` still gets a group (only its unknown token).
        Gene medians are computed on the same corpus.
        """
        counts = counts_matrix(adata, layer)
        symbols = np.asarray(adata.var_names.astype(str))
        n_cells_per_gene = np.diff(sp.csc_matrix(counts > 0).indptr)
        medians_all = compute_gene_medians(counts, target_sum)
        keep = n_cells_per_gene >= max(1, int(min_cells))
        # duplicated symbols: keep the first column of each
        _, first = np.unique(symbols, return_index=True)
        is_first = np.zeros(symbols.size, dtype=bool)
        is_first[first] = True
        keep &= is_first
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(symbols[idx], kind="stable")]
        groups: dict[str, list[str]] = {}
        for key in sample_keys:
            vals = []
            if key in adata.obs:
                col = adata.obs[key]
                vals = sorted({str(v) for v in col[col.notna()].astype(str)})
            if len(vals) > sample_slots - 1:
                raise ValueError(f"obs[{key!r}] has {len(vals)} distinct values; raise sample_slots "
                                 f"above {len(vals)}")
            groups[str(key)] = vals
        return cls(genes=symbols[idx].tolist(), sample_groups=groups, sample_slots=sample_slots,
                   medians=medians_all[idx], target_sum=target_sum)

    # ---- ids

    @property
    def n_groups(self) -> int:
        return len(self.sample_groups)

    @property
    def gene_offset(self) -> int:
        return len(SPECIAL_TOKENS) + self.n_groups * self.sample_slots

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def __len__(self) -> int:
        return self.gene_offset + self.n_genes

    @property
    def n_prefix(self) -> int:
        """Tokens before the genes: CLS plus one per sample group."""
        return 1 + self.n_groups

    def gene_token_ids(self, symbols: Iterable[str]) -> np.ndarray:
        """Token id per symbol, -1 for symbols not in the vocabulary."""
        off = self.gene_offset
        return np.array([self._index[s] + off if s in self._index else -1 for s in map(str, symbols)],
                        dtype=np.int64)

    def group_base(self, group: str) -> int:
        names = list(self.sample_groups)
        if group not in self.sample_groups:
            raise KeyError(f"no sample group {group!r} (have {names})")
        return len(SPECIAL_TOKENS) + names.index(group) * self.sample_slots

    def sample_token_ids(self, group: str, values: Iterable[Any]) -> np.ndarray:
        """Token id per value of a sample group; unknown or missing values get the unknown slot."""
        base = self.group_base(group)
        lookup = {v: base + 1 + i for i, v in enumerate(self.sample_groups[group])}
        out = []
        for v in values:
            missing = v is None or (isinstance(v, float) and np.isnan(v))
            out.append(base if missing else lookup.get(str(v), base))
        return np.asarray(out, dtype=np.int64)

    def add_sample_values(self, group: str, values: Iterable[Any]) -> list[str]:
        """Register new values of a group in free slots (sorted, for determinism); returns those added.

        Values beyond the group's capacity stay unknown. New tokens start from their random
        initialization, so this is for fine-tuning, not for zero-shot embedding.
        """
        known = set(self.sample_groups[group])
        new = sorted({str(v) for v in values if v is not None and str(v) not in known and str(v) != "nan"})
        room = self.sample_slots - 1 - len(self.sample_groups[group])
        added = new[: max(0, room)]
        self.sample_groups[group].extend(added)
        return added

    def token_name(self, token_id: int) -> str:
        if token_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token_id]
        if token_id >= self.gene_offset:
            return self.genes[token_id - self.gene_offset]
        rel = token_id - len(SPECIAL_TOKENS)
        group = list(self.sample_groups)[rel // self.sample_slots]
        slot = rel % self.sample_slots
        vals = self.sample_groups[group]
        if slot == 0:
            return f"<{group}:unknown>"
        return f"<{group}:{vals[slot - 1]}>" if slot - 1 < len(vals) else f"<{group}:free{slot}>"

    # ---- serialization

    def to_dict(self) -> dict:
        med = None
        if self.medians is not None:
            med = [None if not np.isfinite(m) else float(m) for m in self.medians]
        return {"genes": list(self.genes), "sample_groups": {k: list(v) for k, v in self.sample_groups.items()},
                "sample_slots": int(self.sample_slots), "target_sum": float(self.target_sum),
                "medians": med, "special_tokens": list(SPECIAL_TOKENS)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "GeneVocab":
        if list(d.get("special_tokens", SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary has special tokens {d.get('special_tokens')}, "
                             f"this code expects {list(SPECIAL_TOKENS)}")
        med = d.get("medians")
        if med is not None:
            med = np.array([np.nan if m is None else m for m in med], dtype=np.float64)
        return cls(genes=list(d["genes"]), sample_groups=dict(d.get("sample_groups", {})),
                   sample_slots=int(d.get("sample_slots", 64)), medians=med,
                   target_sum=float(d.get("target_sum", 1e4)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "GeneVocab":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------
# tokenized cells and padded batches


@dataclasses.dataclass
class Batch:
    """A padded batch of cells (torch tensors, all ``(B, L)``).

    ``tokens``: token ids (``PAD`` beyond each cell's length). ``values``: log-normalized expression
    (0 where a token has no value). ``bins``: expression bins (bin encoding; 0 elsewhere).
    ``attention_mask``: True for real tokens, False for padding.
    """

    tokens: Any
    values: Any
    bins: Any
    attention_mask: Any

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.tokens, self.values, self.bins, self.attention_mask)))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclasses.dataclass
class TokenizedCells:
    """Variable-length token sequences of many cells, stored flat (like CSR rows).

    The gene part of cell ``i`` is ``genes[offsets[i]:offsets[i+1]]`` (with matching ``values`` and
    ``bins``); ``prefix[i]`` holds its CLS and sample tokens. ``n_expressed`` counts the cell's
    non-zero vocabulary genes before truncation.
    """

    offsets: np.ndarray
    genes: np.ndarray
    values: np.ndarray
    bins: np.ndarray
    prefix: np.ndarray
    n_expressed: np.ndarray

    def __len__(self) -> int:
        return int(self.prefix.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Full sequence length of each cell (prefix + genes)."""
        return self.prefix.shape[1] + np.diff(self.offsets)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "TokenizedCells":
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        sel = _ranges(starts, ends)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return TokenizedCells(offsets, self.genes[sel], self.values[sel], self.bins[sel],
                              self.prefix[idx], self.n_expressed[idx])

    def batch(self, idx: Sequence[int] | np.ndarray, pad_to: int | None = None) -> Batch:
        """Pad the cells ``idx`` to the longest among them (or to ``pad_to``)."""
        import torch  # noqa: PLC0415

        idx = np.asarray(idx, dtype=np.int64)
        n_pre = self.prefix.shape[1]
        lens = np.diff(self.offsets)[idx]
        width = n_pre + (int(lens.max()) if idx.size else 0)
        if pad_to is not None:
            if pad_to < width:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest cell ({width})")
            width = pad_to
        b = idx.size
        tokens = np.full((b, width), PAD, dtype=np.int64)
        values = np.zeros((b, width), dtype=np.float32)
        bins = np.zeros((b, width), dtype=np.int64)
        mask = np.zeros((b, width), dtype=bool)
        tokens[:, :n_pre] = self.prefix[idx]
        mask[:, :n_pre] = True
        rows = np.repeat(np.arange(b), lens)
        starts = self.offsets[idx]
        src = _ranges(starts, starts + lens)
        cols = n_pre + (np.arange(src.size) - np.repeat(np.cumsum(lens) - lens, lens))
        tokens[rows, cols] = self.genes[src]
        values[rows, cols] = self.values[src]
        bins[rows, cols] = self.bins[src]
        mask[rows, cols] = True
        return Batch(torch.from_numpy(tokens), torch.from_numpy(values), torch.from_numpy(bins),
                     torch.from_numpy(mask))

    def iter_batches(self, batch_size: int, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Batch]]:
        """``(cell indices, Batch)`` in ``order`` (default: by cell index)."""
        order = np.arange(len(self)) if order is None else np.asarray(order)
        for s in range(0, order.size, batch_size):
            sel = order[s:s + batch_size]
            yield sel, self.batch(sel)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair, vectorized."""
    lens = (ends - starts).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts.astype(np.int64) - (np.cumsum(lens) - lens), lens)
    return base + np.arange(total, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# encoders


def quantile_bins(values: np.ndarray, n_bins: int, mode: BinMode = "quantile",
                  reference: np.ndarray | None = None) -> np.ndarray:
    """Bins ``1..n_bins`` for positive ``values`` of one cell.

    The edges come from ``reference`` (default: ``values``), i.e. all of the cell's non-zero values.
    ``quantile``: the ``n_bins - 1`` inner edges are the ``k / n_bins`` quantiles (linear
    interpolation); ``equal_width``: evenly spaced between the smallest and largest value. A value
    equal to an edge goes to the lower bin, so the cell's smallest value is always in bin 1.
    """
    ref = values if reference is None else reference
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if n_bins == 1:
        return np.ones(values.size, dtype=np.int64)
    if mode == "quantile":
        # linear interpolation between order statistics (numpy's default quantile method)
        srt = np.sort(ref)
        pos = (np.arange(1, n_bins) / n_bins) * (srt.size - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, srt.size - 1)
        edges = srt[lo] + (srt[hi] - srt[lo]) * (pos - lo)
    elif mode == "equal_width":
        edges = np.linspace(ref.min(), ref.max(), n_bins + 1)[1:-1]
    else:
        raise ValueError(f"unknown bin mode {mode!r} (quantile or equal_width)")
    return 1 + np.searchsorted(edges, values, side="left").astype(np.int64)


def _no_vocabulary_gene(n_cols: int, vocab: GeneVocab) -> NotApplicable:
    return NotApplicable(f"none of the {n_cols} genes of this data is in the model's "
                         f"vocabulary of {vocab.n_genes} genes (are they gene symbols?)")


class CellTokenizer:
    """Turns cells (CSR counts with gene symbols) into :class:`TokenizedCells` for one encoding.

    ``context_length`` counts every token, the CLS and sample tokens included, so at most
    ``context_length - vocab.n_prefix`` genes are kept per cell.
    """

    def __init__(self, vocab: GeneVocab, encoding: Encoding, context_length: int, n_bins: int = 51,
                 bin_mode: BinMode = "quantile"):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
        if context_length <= vocab.n_prefix:
            raise ValueError(f"context_length {context_length} leaves no room for genes after "
                             f"{vocab.n_prefix} prefix tokens")
        if encoding == "rank" and vocab.medians is None:
            raise ValueError("the rank encoding needs gene medians; build the vocabulary with "
                             "GeneVocab.from_adata on the pretraining corpus")
        if bin_mode not in ("quantile", "equal_width"):
            raise ValueError(f"unknown bin mode {bin_mode!r} (quantile or equal_width)")
        self.vocab, self.encoding = vocab, encoding
        self.context_length, self.n_bins, self.bin_mode = int(context_length), int(n_bins), bin_mode

    @classmethod
    def from_config(cls, vocab: GeneVocab, config) -> "CellTokenizer":
        return cls(vocab, config.encoding, config.context_length, config.n_bins, config.bin_mode)

    @property
    def max_genes(self) -> int:
        return self.context_length - self.vocab.n_prefix

    def _inputs(self, adata, layer: str | None):
        """What :meth:`encode` reads of an AnnData: counts, gene symbols, and per vocabulary group
        ``obs[group]`` (None where the AnnData has no such column)."""
        sample_values = {g: (adata.obs[g].to_numpy(dtype=object) if g in adata.obs else None)
                         for g in self.vocab.sample_groups}
        return counts_matrix(adata, layer), adata.var_names.astype(str), sample_values

    def encode_adata(self, adata, *, layer: str | None = "counts") -> TokenizedCells:
        """Tokenize an AnnData of counts; sample tokens read ``obs[group]`` for each vocabulary group."""
        return self.encode(*self._inputs(adata, layer))

    def on_demand(self, adata, *, layer: str | None = "counts") -> "CellsOnDemand":
        """The cells of an AnnData, tokenized only when a subset or batch of them is asked for."""
        return CellsOnDemand(self, *self._inputs(adata, layer))

    def encode(self, counts, genes: Sequence[str],
               sample_values: Mapping[str, Sequence[Any] | None] | None = None) -> TokenizedCells:
        """Tokenize a cells x genes count matrix whose columns are the symbols ``genes``.

        ``sample_values`` maps a vocabulary group to one value per cell (absent or None: unknown).
        Raises :class:`~cellarena.errors.NotApplicable` when no column is a vocabulary gene.
        """
        vocab = self.vocab
        counts = sp.csr_matrix(counts, dtype=np.float32)
        counts.sum_duplicates()
        n_cells, n_cols = counts.shape
        genes = list(map(str, genes))
        if len(genes) != n_cols:
            raise ValueError(f"{len(genes)} gene names for {n_cols} columns")
        col_tok = vocab.gene_token_ids(genes)
        # a symbol appearing in several columns: only its first column is used
        seen: set[int] = set()
        for j, t in enumerate(col_tok):
            if t >= 0:
                if t in seen:
                    col_tok[j] = -1
                seen.add(int(t))
        if not (col_tok >= 0).any():
            raise _no_vocabulary_gene(n_cols, vocab)

        # library size over all genes, then keep the positive entries of vocabulary genes
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        row = np.repeat(np.arange(n_cells), np.diff(counts.indptr))
        tok = col_tok[counts.indices]
        keep = (tok >= 0) & (counts.data > 0)
        row, tok, cnt = row[keep], tok[keep], counts.data[keep].astype(np.float64)
        norm = cnt / totals[row] * vocab.target_sum
        logv = np.log1p(norm)
        if self.encoding == "rank":
            med = vocab.medians[tok - vocab.gene_offset]
            med = np.where(np.isfinite(med) & (med > 0), med, 1.0)  # genes unseen in the corpus
            score = norm / med
        else:
            score = logv
        # entries are grouped by cell (CSR order); sort each cell by descending score, ties by
        # token id, keep the first max_genes
        n_expr = np.bincount(row, minlength=n_cells).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(n_expr)]).astype(np.int64)
        kept = np.minimum(n_expr, self.max_genes)
        offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        out_tok = np.empty(int(offsets[-1]), dtype=np.int64)
        out_val = np.empty(out_tok.size, dtype=np.float32)
        out_bin = np.zeros(out_tok.size, dtype=np.int64)
        for i in np.flatnonzero(n_expr):
            s, e, o = starts[i], starts[i + 1], offsets[i]
            t_i, v_i = tok[s:e], logv[s:e]
            order = np.lexsort((t_i, -score[s:e]))[: kept[i]]
            out_tok[o:o + kept[i]] = t_i[order]
            out_val[o:o + kept[i]] = v_i[order]
            if self.encoding == "bin":  # edges from all of the cell's values, not only the kept ones
                out_bin[o:o + kept[i]] = quantile_bins(v_i[order], self.n_bins, self.bin_mode, reference=v_i)

        prefix = np.empty((n_cells, vocab.n_prefix), dtype=np.int64)
        prefix[:, 0] = CLS
        sample_values = dict(sample_values or {})
        for j, group in enumerate(vocab.sample_groups):
            vals = sample_values.get(group)
            if vals is None:
                prefix[:, 1 + j] = vocab.group_base(group)
            else:
                if len(vals) != n_cells:
                    raise ValueError(f"sample values of {group!r}: {len(vals)} for {n_cells} cells")
                prefix[:, 1 + j] = vocab.sample_token_ids(group, vals)
        return TokenizedCells(offsets=offsets, genes=out_tok, values=out_val, bins=out_bin, prefix=prefix,
                              n_expressed=n_expr)


class CellsOnDemand:
    """Cells of a count matrix, tokenized when asked for.

    ``subset(idx)`` and ``batch(idx)`` give exactly what they give on
    :meth:`CellTokenizer.encode` of all the cells (a cell's tokens depend on that cell's counts
    alone), at a cost that follows ``idx``: for callers that read few cells of many, such as the
    perturbation fine-tuning, which draws a few hundred control cells of a training set of 14,000.
    """

    def __init__(self, tokenizer: CellTokenizer, counts: sp.csr_matrix, genes: Sequence[str],
                 sample_values: Mapping[str, Sequence[Any] | None]):
        self.tokenizer, self.counts, self.genes = tokenizer, counts, list(map(str, genes))
        self.sample_values = {g: (None if v is None else np.asarray(v, dtype=object))
                              for g, v in sample_values.items()}
        if not (tokenizer.vocab.gene_token_ids(self.genes) >= 0).any():  # what encode() would say, now
            raise _no_vocabulary_gene(len(self.genes), tokenizer.vocab)

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray) -> TokenizedCells:
        idx = np.asarray(idx, dtype=np.int64)
        return self.tokenizer.encode(self.counts[idx], self.genes,
                                     {g: (None if v is None else v[idx]) for g, v in self.sample_values.items()})

    def batch(self, idx: Sequence[int] | np.ndarray, pad_to: int | None = None) -> Batch:
        idx = np.asarray(idx, dtype=np.int64)
        return self.subset(idx).batch(np.arange(idx.size), pad_to=pad_to)
