"""A pre-LN transformer encoder over tokenized cells, with three input encodings and three
attention paths.

Input embedding per token (see :mod:`cellarena.zoo.transformer.tokenize` for the encodings):

- ``rank``: gene-ID embedding + learned positional embedding (the position is the rank).
- ``bin``: gene-ID embedding + expression-bin embedding (no positional embedding: a cell is a set).
- ``projection``: gene-ID embedding + a learned projection (MLP or linear) of the continuous
  log-normalized value, added on gene tokens only (no positional embedding).

Attention paths (``TransformerConfig.attention``):

- ``"math"``: softmax attention written out with matmuls (the reference).
- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`. The kernel is chosen
  explicitly, in the order flash → memory-efficient → math, taking the first one that accepts the
  inputs (on CUDA with bf16/fp16 and no padding mask that is FlashAttention), and the choice is
  recorded. A batch without padding is passed with no mask at all, so it stays flash-eligible.
- ``"flash_varlen"``: ``flash_attn.flash_attn_varlen_func`` from the ``flash-attn`` package (CUDA
  only). The whole encoder then runs unpadded: tokens of all cells are packed into one
  ``(n_tokens, d)`` tensor with ``cu_seqlens`` boundaries, so no FLOPs are spent on padding.
- ``"sdpa_packed"``: the encoder runs unpadded as with ``flash_varlen``, and attention goes through
  ``scaled_dot_product_attention`` cell group by cell group: the cells sorted by length,
  ``PACKED_GROUP`` at a time, each group padded only to its own longest cell (no cell attends to
  another). Same numbers as ``sdpa`` up to float rounding; on the CPU it saves the FLOPs of padding
  (a cell has at most ``context_length`` tokens, often far fewer).
- ``"auto"``: ``flash_varlen`` on CUDA when ``flash-attn`` imports and the forward runs in
  bf16/fp16 (autocast or half weights); on the CPU ``sdpa_packed`` when the batch has padding;
  otherwise ``sdpa``.

After each forward, :attr:`CellTransformer.last_attention_backend` (and the output's
``attention_backend``) says what actually ran: ``"math"``, ``"sdpa-flash"``, ``"sdpa-efficient"``,
``"sdpa-math"``, the same with ``"-packed"`` appended, or ``"flash-attn-varlen"``. On CPU, ``"sdpa-flash"`` is PyTorch's CPU
flash-attention kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cellarena.zoo.transformer.tokenize import ENCODINGS, MASK, PAD, Batch, GeneVocab

AttentionChoice = Literal["auto", "math", "sdpa", "sdpa_packed", "flash_varlen"]
ATTENTION_CHOICES = ("auto", "math", "sdpa", "sdpa_packed", "flash_varlen")

__all__ = ["TransformerConfig", "CellTransformer", "ModelOutput", "PRESETS", "preset",
           "flash_attn_available", "ARCHITECTURE_FIELDS", "RUNTIME_FIELDS"]


# --------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything that defines a model. ``vocab_size``, ``gene_offset`` and ``n_genes`` come from the
    vocabulary (:meth:`with_vocab`); a model cannot be built before they are set.

    ``dropout``, ``attention`` and ``gradient_checkpointing`` change how a model runs, not its
    weights (:data:`RUNTIME_FIELDS`); all other fields must match when a checkpoint is loaded.
    """

    encoding: str = "bin"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    context_length: int = 256
    n_bins: int = 51
    bin_mode: str = "quantile"
    pooling: str = "cls"  # "cls" or "mean" (mean over gene tokens)
    value_projection: str = "mlp"  # projection encoding: "mlp" or "linear"
    attention: str = "auto"
    gradient_checkpointing: bool = False
    layer_norm_eps: float = 1e-5
    vocab_size: int | None = None
    gene_offset: int | None = None
    n_genes: int | None = None

    def __post_init__(self):
        problems = []
        if self.encoding not in ENCODINGS:
            problems.append(f"encoding {self.encoding!r} not in {ENCODINGS}")
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.attention not in ATTENTION_CHOICES:
            problems.append(f"attention {self.attention!r} not in {ATTENTION_CHOICES}")
        if self.pooling not in ("cls", "mean"):
            problems.append(f"pooling {self.pooling!r} not in ('cls', 'mean')")
        if self.value_projection not in ("mlp", "linear"):
            problems.append(f"value_projection {self.value_projection!r} not in ('mlp', 'linear')")
        if self.bin_mode not in ("quantile", "equal_width"):
            problems.append(f"bin_mode {self.bin_mode!r} not in ('quantile', 'equal_width')")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout {self.dropout} not in [0, 1)")
        if min(self.n_layers, self.d_model, self.n_heads, self.d_ff, self.context_length, self.n_bins) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ValueError("invalid TransformerConfig: " + "; ".join(problems))

    def with_vocab(self, vocab: GeneVocab) -> "TransformerConfig":
        return dataclasses.replace(self, vocab_size=len(vocab), gene_offset=vocab.gene_offset,
                                   n_genes=vocab.n_genes)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields {sorted(unknown)}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


RUNTIME_FIELDS = ("dropout", "attention", "gradient_checkpointing")
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig) if f.name not in RUNTIME_FIELDS)

PRESETS: dict[str, dict[str, Any]] = {
    # pretraining + tasks in minutes on 2 CPU cores
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, d_ff=256, dropout=0.0, context_length=256, n_bins=51),
    # a GPU-sized model (about 40M parameters in the encoder plus the gene embeddings)
    "base": dict(n_layers=12, d_model=512, n_heads=8, d_ff=2048, dropout=0.1, context_length=2048, n_bins=51),
}


def preset(name: str, encoding: str, **overrides) -> TransformerConfig:
    """``TransformerConfig`` of a named preset (``tiny`` or ``base``) for an encoding."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TransformerConfig(encoding=encoding, **{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# attention kernels


@functools.cache
def _flash_varlen_fn():
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: PLC0415
    except Exception:  # ImportError, or a broken CUDA extension
        return None
    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    """True when the ``flash-attn`` package imports and a CUDA device is present."""
    return torch.cuda.is_available() and _flash_varlen_fn() is not None


def math_attention(q, k, v, key_mask=None, dropout_p: float = 0.0):
    """Softmax attention written out. ``q, k, v``: (B, H, L, Dh); ``key_mask``: (B, 1, 1, L) bool,
    True where a key may be attended to. The softmax is taken in float32."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


_SDPA_ORDER = None
_SDPA_CHOICE: dict[tuple, tuple[Any, str]] = {}


def _sdpa_order():
    global _SDPA_ORDER
    if _SDPA_ORDER is None:
        from torch.nn.attention import SDPBackend  # noqa: PLC0415

        _SDPA_ORDER = [(SDPBackend.FLASH_ATTENTION, "sdpa-flash"),
                       (SDPBackend.EFFICIENT_ATTENTION, "sdpa-efficient"),
                       (SDPBackend.MATH, "sdpa-math")]
    return _SDPA_ORDER


def sdpa_attention(q, k, v, key_mask=None, dropout_p: float = 0.0):
    """``scaled_dot_product_attention`` with an explicitly chosen kernel; returns (output, label).

    The first kernel (flash, memory-efficient, math) that accepts this kind of input is remembered
    per (device, dtype, mask present, head size, dropout, grad), so later calls do not probe again;
    should the remembered kernel refuse a later input (a shape it does not support), the kernels
    are probed again for that call.
    """
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    key = (q.device.type, q.dtype, key_mask is None, q.shape[-1], dropout_p > 0.0,
           torch.is_grad_enabled() and q.requires_grad)
    choice = _SDPA_CHOICE.get(key)
    if choice is not None:
        try:
            with sdpa_kernel([choice[0]]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p), choice[1]
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
    last_error = None
    for backend, label in _sdpa_order():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kernel not used because ..." notes while probing
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            last_error = exc
            continue
        _SDPA_CHOICE.setdefault(key, (backend, label))
        return out, label
    raise RuntimeError(f"no scaled_dot_product_attention kernel accepted the inputs: {last_error}")


# cells per attention group of the packed path. Measured on one CPU core (tiny preset, fine-tuning
# steps of 64 cross-study PBMCs of 148 tokens on average, at most 257): 0.45 s a step padded; packed
# in groups of 4, 8, 16, 32 cells: 0.43, 0.32-0.38, 0.40, 0.43 s
PACKED_GROUP = 8


def packed_groups(lens: torch.Tensor, cu_seqlens: torch.Tensor, group: int | None = None):
    """How attention runs over packed cells: the cells sorted by length, ``group`` at a time.

    Returns ``(plans, inverse)``. Each plan is ``(index, key_mask, real)``: ``index`` (g, Lg) the
    positions of the group's tokens in the packed tensor, each cell padded to the group's longest
    (a padded slot points at the cell's first token), ``key_mask`` (g, 1, 1, Lg) bool (None when
    the group has no padding) and ``real`` (g, Lg) bool, the slots that are tokens. ``inverse``
    puts the groups' real slots, concatenated, back in packed order.
    """
    group = group or PACKED_GROUP
    order = torch.argsort(lens, descending=True, stable=True)
    plans, gathered = [], []
    for start in range(0, order.numel(), group):
        cells = order[start:start + group]
        glen = lens[cells].long()
        pos = torch.arange(int(glen.max()), device=lens.device)
        real = pos[None, :] < glen[:, None]
        index = cu_seqlens[cells].long()[:, None] + torch.where(real, pos[None, :], 0)
        plans.append((index, None if bool(real.all()) else real[:, None, None, :], real))
        gathered.append(index[real])
    return plans, torch.argsort(torch.cat(gathered))


def packed_attention(q, k, v, plans, inverse, dropout_p: float = 0.0):
    """Attention of packed cells (``q, k, v``: (n_tokens, H, Dh)) within each cell: a group of cells
    of similar length is padded to its longest cell and goes through ``scaled_dot_product_attention``
    with the padded keys masked, so no cell sees another and little compute goes to padding.
    Returns the packed output and the kernel label."""
    pieces, label = [], None
    for index, mask, real in plans:
        qg, kg, vg = (t[index].transpose(1, 2) for t in (q, k, v))  # (g, H, Lg, Dh)
        og, label = sdpa_attention(qg, kg, vg, mask, dropout_p)
        pieces.append(og.transpose(1, 2)[real])  # (real tokens, H, Dh)
    return torch.cat(pieces).index_select(0, inverse), label


@dataclasses.dataclass
class _AttnContext:
    """How the blocks of one forward attend: padded (math/sdpa) or packed (flash varlen)."""

    mode: str  # "math", "sdpa", "packed" or "varlen"
    key_mask: torch.Tensor | None = None  # (B, 1, 1, L) bool, padded modes
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32, varlen
    max_seqlen: int = 0
    plans: list | None = None  # packed: the length groups (packed_groups)
    inverse: torch.Tensor | None = None
    label: str | None = None  # what ran (set by the first attention call)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, ctx: _AttnContext) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if ctx.mode == "packed":
            n = x.shape[0]
            q, k, v = self.qkv(x).view(n, 3, self.n_heads, self.head_dim).unbind(1)
            o, label = packed_attention(q, k, v, ctx.plans, ctx.inverse, p)
            ctx.label = ctx.label or f"{label}-packed"
            return self.out(o.reshape(n, -1))
        if ctx.mode == "varlen":
            n = x.shape[0]
            qkv = self.qkv(x).view(n, 3, self.n_heads, self.head_dim)
            q, k, v = qkv.unbind(1)
            fn = _flash_varlen_fn()
            dtype = q.dtype
            if q.is_cuda and dtype not in (torch.float16, torch.bfloat16):  # flash takes half precision only
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            o = fn(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                   dropout_p=p, causal=False)
            ctx.label = ctx.label or "flash-attn-varlen"
            return self.out(o.to(dtype).reshape(n, -1))
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, Dh)
        if ctx.mode == "math":
            o, label = math_attention(q, k, v, ctx.key_mask, p), "math"
        else:
            o, label = sdpa_attention(q, k, v, ctx.key_mask, p)
        ctx.label = ctx.label or label
        return self.out(o.transpose(1, 2).reshape(b, length, -1))


class EncoderBlock(nn.Module):
    """Pre-LN: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: _AttnContext) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), ctx))
        return x + self.drop(self.ff(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# the model


@dataclasses.dataclass
class ModelOutput:
    hidden: torch.Tensor  # (B, L, d) after the final LayerNorm (zeros at padding in varlen mode)
    cell_embedding: torch.Tensor  # (B, d): the CLS output, or the mean over gene tokens
    attention_backend: str


class CellTransformer(nn.Module):
    """Encoder + MLM head for one encoding. Build with a config that has its vocabulary fields set."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.vocab_size is None or config.gene_offset is None or config.n_genes is None:
            raise ValueError("config has no vocabulary sizes; use config.with_vocab(vocab)")
        self.config = config
        d = config.d_model
        self.token_emb = nn.Embedding(config.vocab_size, d)
        if config.encoding == "rank":
            self.pos_emb = nn.Embedding(config.context_length, d)
            out = config.n_genes
        elif config.encoding == "bin":
            self.bin_emb = nn.Embedding(config.n_bins + 2, d)  # 0 none, 1..n_bins, n_bins+1 mask
            out = config.n_bins
        else:
            if config.value_projection == "mlp":
                self.value_proj = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
            else:
                self.value_proj = nn.Linear(1, d)
            self.mask_value = nn.Parameter(torch.zeros(d))
            out = 1
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=config.layer_norm_eps),
                                      nn.Linear(d, out))
        self.attention = config.attention  # runtime settings: may be changed on a built model
        self.gradient_checkpointing = config.gradient_checkpointing
        self.last_attention_backend: str | None = None
        self.apply(self._init_weights)
        if config.encoding == "projection":
            nn.init.normal_(self.mask_value, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    # ---- embedding of the input

    def _embed(self, tokens, values, bins, masked):
        cfg = self.config
        is_gene = tokens >= cfg.gene_offset
        if masked is not None and cfg.encoding == "rank":
            tokens = torch.where(masked, torch.full_like(tokens, MASK), tokens)
        x = self.token_emb(tokens)
        if cfg.encoding == "rank":
            length = tokens.shape[1]
            if length > cfg.context_length:
                raise ValueError(f"sequence of {length} tokens exceeds the context length {cfg.context_length}")
            x = x + self.pos_emb(torch.arange(length, device=tokens.device))[None]
        elif cfg.encoding == "bin":
            if masked is not None:
                bins = torch.where(masked, torch.full_like(bins, cfg.n_bins + 1), bins)
            x = x + self.bin_emb(bins)
        else:
            v = self.value_proj(values.to(x.dtype).unsqueeze(-1))
            if masked is not None:
                v = torch.where(masked.unsqueeze(-1), self.mask_value.to(v.dtype), v)
            x = x + v * is_gene.unsqueeze(-1).to(v.dtype)
        return self.emb_drop(x), is_gene

    def _resolve_attention(self, x: torch.Tensor, padded: bool = True) -> str:
        choice = self.attention
        if choice not in ATTENTION_CHOICES:
            raise ValueError(f"attention {choice!r} not in {ATTENTION_CHOICES}")
        on_cuda = x.device.type == "cuda"
        if choice == "flash_varlen":
            if not on_cuda:
                raise RuntimeError("attention='flash_varlen' needs a CUDA device")
            if _flash_varlen_fn() is None:
                raise RuntimeError("attention='flash_varlen' needs the flash-attn package "
                                   "(pip install 'cellarena[gpu]')")
            return "varlen"
        if choice == "sdpa_packed":
            return "packed"
        if choice == "auto":
            half = x.dtype in (torch.float16, torch.bfloat16) or (
                on_cuda and torch.is_autocast_enabled("cuda")
                and torch.get_autocast_dtype("cuda") in (torch.float16, torch.bfloat16))
            if on_cuda and half and _flash_varlen_fn() is not None:
                return "varlen"
            # on the CPU a batch of cells of unequal length runs packed (fewer FLOPs than padded)
            return "packed" if padded and not on_cuda else "sdpa"
        return choice

    # ---- forward

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                values: torch.Tensor | None = None, bins: torch.Tensor | None = None,
                masked: torch.Tensor | None = None) -> ModelOutput:
        """``tokens`` (B, L); ``attention_mask`` (B, L) True for real tokens; ``values``/``bins`` as
        from the tokenizer; ``masked`` (B, L) bool: positions whose input is hidden for MLM (gene
        token for rank, bin for bin, value for projection)."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = tokens != PAD
        if cfg.encoding == "bin" and bins is None:
            raise ValueError("the bin encoding needs bins")
        if cfg.encoding == "projection" and values is None:
            raise ValueError("the projection encoding needs values")
        x, is_gene = self._embed(tokens, values, bins, masked)
        b, length, d = x.shape
        padded = not bool(attention_mask.all())
        mode = self._resolve_attention(x, padded)
        if mode in ("varlen", "packed"):
            flat_mask = attention_mask.reshape(-1)
            idx = flat_mask.nonzero().squeeze(1)
            lens = attention_mask.sum(1, dtype=torch.int32)
            cu = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
            ctx = _AttnContext(mode, cu_seqlens=cu, max_seqlen=int(lens.max()))
            if mode == "packed":
                ctx.plans, ctx.inverse = packed_groups(lens, cu)
            h = x.reshape(b * length, d).index_select(0, idx)
        else:
            key_mask = attention_mask[:, None, None, :] if padded else None
            ctx = _AttnContext(mode, key_mask=key_mask)
            h = x
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, ctx, use_reentrant=False) if use_ckpt else block(h, ctx)
        h = self.final_norm(h)
        if mode in ("varlen", "packed"):
            h = h.new_zeros(b * length, d).index_copy(0, idx, h).view(b, length, d)
        if cfg.pooling == "cls":
            cell = h[:, 0]
        else:
            w = (is_gene & attention_mask).unsqueeze(-1).to(h.dtype)
            cell = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        self.last_attention_backend = ctx.label
        return ModelOutput(hidden=h, cell_embedding=cell, attention_backend=ctx.label)

    def forward_batch(self, batch: Batch, masked: torch.Tensor | None = None) -> ModelOutput:
        return self(batch.tokens, batch.attention_mask, values=batch.values, bins=batch.bins, masked=masked)

    # ---- masked-token objective

    def mlm_loss(self, hidden: torch.Tensor, batch: Batch, masked: torch.Tensor) -> torch.Tensor:
        """Loss at the masked positions: cross-entropy over genes (rank) or bins (bin), MSE of the
        log-normalized value (projection)."""
        cfg = self.config
        if not bool(masked.any()):  # e.g. a batch of cells without vocabulary genes
            return hidden.sum() * 0.0
        pred = self.mlm_head(hidden[masked]).float()
        if cfg.encoding == "rank":
            return F.cross_entropy(pred, batch.tokens[masked] - cfg.gene_offset)
        if cfg.encoding == "bin":
            return F.cross_entropy(pred, batch.bins[masked] - 1)
        return F.mse_loss(pred.squeeze(-1), batch.values[masked].float())

    def n_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
