"""AnnData-level entry points for model plug-ins.

Typical use in a plug-in (``models/<id>/model.py``)::

    from cellarena.zoo.transformer import api

    ckpt = api.load(path, expect=api.preset("tiny", "rank"), device=ctx.device)
    z = api.embed_adata(ckpt.model, ckpt.vocab, adata, batch_size=128, device=ctx.device)
    pred = api.annotate(ckpt.model, ckpt.vocab, train, labels, test, epochs=5, batch_size=32,
                        lr=1e-4, seed=ctx.seed, device=ctx.device)
    # or, split across a plug-in's fit and predict:
    clf = api.fit_classifier(ckpt.model, ckpt.vocab, train, labels, epochs=5, batch_size=32, lr=1e-4)
    pred = api.predict_adata(clf, ckpt.vocab, test, batch_size=128)

and, to make the checkpoint from a corpus::

    vocab = api.build_vocab(corpus, sample_keys=("batch",))
    run = api.pretrain_on_adata(corpus, api.preset("tiny", "rank"), vocab=vocab, corpus_id="...",
                                epochs=1, batch_size=64, lr=1e-3, seed=0,
                                checkpoint_path="work/rank_tiny", git_commit="abc123")

All counts are read from ``layers["counts"]`` (or ``X`` when that layer is absent); gene symbols
are the ``var`` index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellarena.zoo.transformer.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from cellarena.zoo.transformer.model import CellTransformer, TransformerConfig, preset
from cellarena.zoo.transformer.tokenize import CellTokenizer, GeneVocab, TokenizedCells, corpus_hash
from cellarena.zoo.transformer.train import (FinetunedClassifier, PretrainResult, build_model, embed,
                                         finetune_classifier, predict_labels, pretrain)

__all__ = ["build_vocab", "tokenize", "pretrain_on_adata", "Pretrained", "load", "embed_adata",
           "fit_classifier", "predict_adata", "annotate", "preset"]


def build_vocab(adata, *, sample_keys: Sequence[str] = (), layer: str | None = "counts",
                sample_slots: int = 64, target_sum: float = 1e4, min_cells: int = 1) -> GeneVocab:
    """Vocabulary (and gene medians) of a corpus of counts; see :meth:`GeneVocab.from_adata`."""
    return GeneVocab.from_adata(adata, layer=layer, sample_keys=sample_keys, sample_slots=sample_slots,
                                target_sum=target_sum, min_cells=min_cells)


def tokenize(adata, vocab: GeneVocab, config: TransformerConfig, *, layer: str | None = "counts") -> TokenizedCells:
    return CellTokenizer.from_config(vocab, config).encode_adata(adata, layer=layer)


@dataclasses.dataclass
class Pretrained:
    model: CellTransformer
    vocab: GeneVocab
    result: PretrainResult
    checkpoint: Path | None  # the weights file, when a checkpoint_path was given


def pretrain_on_adata(corpus, config: TransformerConfig, *, corpus_id: str, vocab: GeneVocab | None = None,
                      sample_keys: Sequence[str] = (), epochs: float = 1.0, batch_size: int = 64,
                      lr: float = 1e-3, mask_fraction: float = 0.15, max_steps: int | None = None,
                      seed: int = 0, device=None, layer: str | None = "counts",
                      checkpoint_path: str | Path | None = None, git_commit: str | None = None,
                      card_extra: dict | None = None, **pretrain_kwargs) -> Pretrained:
    """Build the vocabulary (unless given), tokenize, initialize (seeded), pretrain, and save a
    checkpoint when ``checkpoint_path`` is given (``card_extra`` is added to its card's ``extra``).
    Extra keywords go to :func:`pretrain`."""
    if vocab is None:
        vocab = build_vocab(corpus, sample_keys=sample_keys, layer=layer)
    config = config.with_vocab(vocab)
    cells = CellTokenizer.from_config(vocab, config).encode_adata(corpus, layer=layer)
    model = build_model(config, seed=seed)
    result = pretrain(model, cells, epochs=epochs, batch_size=batch_size, lr=lr,
                      mask_fraction=mask_fraction, max_steps=max_steps, seed=seed, device=device,
                      **pretrain_kwargs)
    weights = None
    if checkpoint_path is not None:
        weights = save_checkpoint(
            checkpoint_path, model, vocab, corpus_id=corpus_id, corpus_hash=corpus_hash(corpus, layer),
            steps=result.steps, seed=seed, final_loss=result.final_loss, git_commit=git_commit,
            extra={"epochs": epochs, "batch_size": batch_size, "batch_size_used": result.batch_size,
                   "lr": lr, "mask_fraction": mask_fraction, "n_cells": len(cells),
                   "seconds": round(result.seconds, 3), "device": result.device,
                   "attention_backend": result.attention_backend, **(card_extra or {})})
    return Pretrained(model=model, vocab=vocab, result=result, checkpoint=weights)


def load(path: str | Path, *, expect: TransformerConfig | dict | None = None, device="cpu") -> LoadedCheckpoint:
    """Load a checkpoint (refused when its card does not match ``expect``)."""
    return load_checkpoint(path, expect=expect, device=device)


def embed_adata(model: CellTransformer, vocab: GeneVocab, adata, *, batch_size: int = 64, device=None,
                layer: str | None = "counts") -> np.ndarray:
    """Cell embeddings ``(n_obs, d_model)``. Raises ``NotApplicable`` if no gene is in the vocabulary."""
    return embed(model, tokenize(adata, vocab, model.config, layer=layer), batch_size=batch_size, device=device)


def fit_classifier(model: CellTransformer, vocab: GeneVocab, train, labels: Sequence, *, epochs: int,
                   batch_size: int, lr: float, seed: int = 0, device=None, layer: str | None = "counts",
                   **finetune_kwargs) -> FinetunedClassifier:
    """Fine-tune a copy of ``model`` with a classification head (for a plug-in's ``fit``)."""
    cells = tokenize(train, vocab, model.config, layer=layer)
    return finetune_classifier(model, cells, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                               device=device, **finetune_kwargs)


def predict_adata(classifier: FinetunedClassifier, vocab: GeneVocab, adata, *, batch_size: int, device=None,
                  layer: str | None = "counts") -> np.ndarray:
    """Predicted labels of the cells of ``adata`` (for a plug-in's ``predict``)."""
    cells = tokenize(adata, vocab, classifier.module.encoder.config, layer=layer)
    return predict_labels(classifier, cells, batch_size=batch_size, device=device)


def annotate(model: CellTransformer, vocab: GeneVocab, train, labels: Sequence, test, *, epochs: int,
             batch_size: int, lr: float, seed: int = 0, device=None, layer: str | None = "counts",
             **finetune_kwargs) -> np.ndarray:
    """Fine-tune a copy of ``model`` on ``train`` with ``labels``; return predicted labels of ``test``."""
    clf = fit_classifier(model, vocab, train, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         device=device, layer=layer, **finetune_kwargs)
    return predict_adata(clf, vocab, test, batch_size=batch_size, device=device, layer=layer)
