"""Masked pretraining, embedding and fine-tuning for annotation.

Determinism: every entry point takes a ``seed``; model initialization, shuffling, mask choice and
dropout all derive from it, inside :func:`torch.random.fork_rng` so the caller's global RNG state is
left alone. On CPU the same seed (and thread count) gives identical numbers.

Memory: on CUDA, a batch that runs out of memory is retried at half the batch size (again and again
down to 1; at 1 a clear error says what to change). The size that worked is reported. On CPU an
out-of-memory error is not caught.

Mixed precision: on CUDA the forward runs under ``torch.autocast`` in bf16 (``amp=True``, default);
on CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from cellarena.zoo.transformer.model import CellTransformer, TransformerConfig
from cellarena.zoo.transformer.tokenize import Batch, TokenizedCells

__all__ = ["build_model", "pretrain", "PretrainResult", "embed", "choose_masked", "CellClassifier",
           "FinetunedClassifier", "finetune_classifier", "predict_labels", "finetune_and_predict",
           "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to use: the CPU unless one is named (numbers on a GPU differ in their last digits,
    so a GPU is never chosen implicitly); "auto" opts in to CUDA when it is available."""
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Seed torch inside a forked RNG state (CPU, and the CUDA device in use)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def amp_autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: TransformerConfig, seed: int = 0) -> CellTransformer:
    """A freshly initialized model; same config and seed -> same weights."""
    with seeded_rng(seed, torch.device("cpu")):
        return CellTransformer(config)


# devices on which an out-of-memory error halves the batch instead of ending the run
_RECOVER_OOM_ON = ("cuda",)


def _halve_or_fail(batch_size: int, what: str, batch: Batch | None, config: TransformerConfig) -> int:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if batch_size <= 1:
        length = int(batch.tokens.shape[1]) if batch is not None else config.context_length
        raise RuntimeError(
            f"{what}: out of GPU memory even with batch size 1 (sequence length {length}, "
            f"d_model {config.d_model}, {config.n_layers} layers). Use a smaller context_length or "
            f"model, set gradient_checkpointing=True, or use a GPU with more memory.") from None
    new = max(1, batch_size // 2)
    warnings.warn(f"{what}: CUDA out of memory at batch size {batch_size}; retrying with {new}",
                  RuntimeWarning, stacklevel=3)
    return new


# --------------------------------------------------------------------------------------------
# masking


def choose_masked(batch: Batch, gene_offset: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(B, L) bool: each gene token is masked with probability ``fraction``; a cell that would get
    none has its gene with the smallest draw masked, so every cell with genes contributes."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"mask fraction must be in (0, 1), got {fraction}")
    is_gene = batch.tokens >= gene_offset
    draw = torch.rand(batch.tokens.shape, generator=generator)
    masked = is_gene & (draw < fraction)
    none = is_gene.any(1) & ~masked.any(1)
    if bool(none.any()):
        pick = draw.masked_fill(~is_gene, 2.0).argmin(1)
        rows = none.nonzero().squeeze(1)
        masked[rows, pick[rows]] = True
    return masked


# --------------------------------------------------------------------------------------------
# pretraining


@dataclasses.dataclass
class PretrainResult:
    steps: int
    cells_seen: int
    losses: list[float]  # one per optimizer step
    final_loss: float  # mean of the last min(20, max(1, steps // 5)) step losses
    batch_size: int  # the batch size in use at the end (smaller than asked after CUDA OOM)
    attention_backend: str | None
    seconds: float
    device: str


def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction, then cosine decay to 10 %."""
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    p = (progress - warmup) / max(1e-12, 1.0 - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def pretrain(model: CellTransformer, cells: TokenizedCells, *, epochs: float = 1.0, batch_size: int = 64,
             lr: float = 1e-3, weight_decay: float = 0.01, mask_fraction: float = 0.15,
             warmup_fraction: float = 0.05, max_steps: int | None = None, grad_clip: float = 1.0,
             seed: int = 0, device: str | torch.device | None = None, amp: bool = True,
             callback: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Masked-token pretraining with AdamW, in place on ``model``.

    Runs ``epochs`` passes (fractions allowed) over ``cells`` in a seeded random order, or stops
    after ``max_steps`` optimizer steps if that comes first. ``callback(step, loss)`` is called
    after each step.
    """
    dev = resolve_device(device)
    cfg = model.config
    n = len(cells)
    if n == 0:
        raise ValueError("no cells to pretrain on")
    total_cells = int(math.ceil(epochs * n))
    if max_steps is not None:
        total_cells = min(total_cells, int(max_steps) * batch_size)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                            betas=(0.9, 0.98), eps=1e-8)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    losses: list[float] = []
    seen = 0
    bs = int(batch_size)
    t0 = time.perf_counter()
    with seeded_rng(seed, dev):
        order = np.zeros(0, dtype=np.int64)
        pos = 0
        while seen < total_cells and (max_steps is None or len(losses) < max_steps):
            if pos >= order.size:
                order, pos = rng.permutation(n), 0
            take = min(bs, order.size - pos, total_cells - seen)
            idx = order[pos:pos + take]
            batch = cells.batch(idx)
            masked = choose_masked(batch, cfg.gene_offset, mask_fraction, gen)
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(seen / total_cells, warmup_fraction)
            try:
                loss = _train_step(model, opt, batch.to(dev), masked.to(dev), dev, amp, grad_clip)
            except torch.OutOfMemoryError:
                if dev.type not in _RECOVER_OOM_ON:
                    raise
                oom = True
            else:
                oom = False
            if oom:
                opt.zero_grad(set_to_none=True)
                bs = _halve_or_fail(bs, "pretraining", batch, cfg)
                continue
            losses.append(loss)
            pos += take
            seen += take
            if callback is not None:
                callback(len(losses), loss)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    tail = min(20, max(1, len(losses) // 5))
    return PretrainResult(steps=len(losses), cells_seen=seen, losses=losses,
                          final_loss=float(np.mean(losses[-tail:])) if losses else float("nan"),
                          batch_size=bs, attention_backend=model.last_attention_backend,
                          seconds=time.perf_counter() - t0, device=str(dev))


def _train_step(model, opt, batch: Batch, masked: torch.Tensor, dev, amp, grad_clip) -> float:
    opt.zero_grad(set_to_none=True)
    with amp_autocast(dev, amp):
        out = model.forward_batch(batch, masked=masked)
        loss = model.mlm_loss(out.hidden, batch, masked)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# embedding


def embed(model: CellTransformer, batches: TokenizedCells | Iterable[Batch], *, batch_size: int = 64,
          device: str | torch.device | None = None, amp: bool = True) -> np.ndarray:
    """Cell embeddings ``(n_cells, d_model)`` as float32 numpy, in the order of the cells.

    ``batches`` is either :class:`TokenizedCells` (batched here: cells sorted by length so little is
    padded, halving the batch on CUDA OOM) or an iterable of ready :class:`Batch` objects.
    """
    dev = resolve_device(device)
    model.to(dev).eval()
    if not isinstance(batches, TokenizedCells):
        outs = []
        with torch.inference_mode(), amp_autocast(dev, amp):
            for b in batches:
                outs.append(model.forward_batch(b.to(dev)).cell_embedding.float().cpu())
        return torch.cat(outs).numpy() if outs else np.zeros((0, model.config.d_model), np.float32)
    out = np.zeros((len(batches), model.config.d_model), dtype=np.float32)
    return batched_inference(
        batches, out, lambda b: model.forward_batch(b).cell_embedding.float().cpu().numpy(),
        dev=dev, amp=amp, batch_size=batch_size, what="embedding", config=model.config)


def batched_inference(cells: TokenizedCells, out: np.ndarray, step, *, dev, amp: bool, batch_size: int,
                       what: str, config) -> np.ndarray:
    """Run ``step`` on length-sorted batches of ``cells`` and write each result into ``out``.

    On a device listed in ``_RECOVER_OOM_ON`` an out-of-memory batch halves the batch size and is
    retried (a clear error once even one cell does not fit).
    """
    order = np.argsort(-cells.lengths, kind="stable")
    pos, bs = 0, int(batch_size)
    with torch.inference_mode(), amp_autocast(dev, amp):
        while pos < order.size:
            idx = order[pos:pos + bs]
            batch = cells.batch(idx)
            try:
                result = step(batch.to(dev))
            except torch.OutOfMemoryError:
                if dev.type not in _RECOVER_OOM_ON:
                    raise
                bs = _halve_or_fail(bs, what, batch, config)
                continue
            out[idx] = result
            pos += idx.size
    return out


# --------------------------------------------------------------------------------------------
# fine-tuning for annotation


class CellClassifier(nn.Module):
    """The encoder plus a linear head on its cell embedding (CLS output, or mean per config)."""

    def __init__(self, encoder: CellTransformer, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.config.d_model, n_classes))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.encoder.forward_batch(batch).cell_embedding)


@dataclasses.dataclass
class FinetunedClassifier:
    module: CellClassifier
    classes: np.ndarray  # label of each output unit
    losses: list[float]
    batch_size: int
    seconds: float

    def predict(self, cells: TokenizedCells, *, batch_size: int, device=None, amp: bool = True) -> np.ndarray:
        return predict_labels(self, cells, batch_size=batch_size, device=device, amp=amp)


def finetune_classifier(model: CellTransformer, cells: TokenizedCells, labels: Sequence, *, epochs: int,
                        batch_size: int, lr: float, seed: int = 0, weight_decay: float = 0.01,
                        head_dropout: float = 0.1, freeze_encoder: bool = False,
                        device: str | torch.device | None = None, amp: bool = True) -> FinetunedClassifier:
    """Fine-tune a *copy* of ``model`` with a classification head (cross-entropy, AdamW, constant lr).

    ``freeze_encoder=True`` trains the head alone (a linear probe). ``model`` is not modified.
    """
    labels = np.asarray(labels)
    if labels.shape[0] != len(cells):
        raise ValueError(f"{labels.shape[0]} labels for {len(cells)} cells")
    classes, y = np.unique(labels.astype(str) if labels.dtype == object else labels, return_inverse=True)
    dev = resolve_device(device)
    n = len(cells)
    t0 = time.perf_counter()
    with seeded_rng(seed, dev):
        clf = CellClassifier(copy.deepcopy(model), len(classes), head_dropout).to(dev)
        if freeze_encoder:
            clf.encoder.requires_grad_(False)
        params = [p for p in clf.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        rng = np.random.default_rng(seed)
        y_t = torch.as_tensor(y, dtype=torch.long)
        losses: list[float] = []
        bs = int(batch_size)
        for _ in range(int(epochs)):
            clf.train()
            if freeze_encoder:
                clf.encoder.eval()
            order, pos = rng.permutation(n), 0
            while pos < n:
                idx = order[pos:pos + bs]
                batch = cells.batch(idx)
                try:
                    opt.zero_grad(set_to_none=True)
                    with amp_autocast(dev, amp):
                        logits = clf(batch.to(dev))
                    loss = nn.functional.cross_entropy(logits.float(), y_t[idx].to(dev))
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    value = float(loss.detach())
                except torch.OutOfMemoryError:
                    if dev.type not in _RECOVER_OOM_ON:
                        raise
                    value = None
                if value is None:
                    opt.zero_grad(set_to_none=True)
                    bs = _halve_or_fail(bs, "fine-tuning", batch, model.config)
                    continue
                losses.append(value)
                pos += idx.size
    clf.eval()
    return FinetunedClassifier(module=clf, classes=classes, losses=losses, batch_size=bs,
                               seconds=time.perf_counter() - t0)


def predict_labels(classifier: FinetunedClassifier, cells: TokenizedCells, *, batch_size: int,
                   device: str | torch.device | None = None, amp: bool = True) -> np.ndarray:
    """Predicted label per cell (the class with the highest logit)."""
    dev = resolve_device(device)
    clf = classifier.module.to(dev).eval()
    pred = batched_inference(
        cells, np.zeros(len(cells), dtype=np.int64), lambda b: clf(b).argmax(-1).cpu().numpy(),
        dev=dev, amp=amp, batch_size=batch_size, what="prediction", config=clf.encoder.config)
    return classifier.classes[pred]


def finetune_and_predict(model: CellTransformer, train_cells: TokenizedCells, train_labels: Sequence,
                         test_cells: TokenizedCells, *, epochs: int, batch_size: int, lr: float,
                         seed: int = 0, device=None, **kwargs) -> np.ndarray:
    """Fine-tune on the training cells, then predict the test cells' labels."""
    clf = finetune_classifier(model, train_cells, train_labels, epochs=epochs, batch_size=batch_size,
                              lr=lr, seed=seed, device=device, **kwargs)
    return predict_labels(clf, test_cells, batch_size=batch_size, device=device)
