"""Checkpoints: weights in safetensors plus a JSON card beside them.

``model.safetensors`` holds the state dict; ``model.json`` (same stem) is the card::

    format, encoding, config, vocab (genes, sample groups, gene medians, target sum),
    corpus_id, corpus_hash, steps, seed, final_loss, git_commit, created (UTC), torch,
    n_parameters, weights_sha256, extra

Loading checks the card against what the caller expects (refusing, with the file named, any
architecture field that differs), verifies the weights' sha256 and loads the state dict strictly.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cellarena.errors import CellarenaError
from cellarena.zoo.transformer.model import (ARCHITECTURE_FIELDS, RUNTIME_FIELDS, CellTransformer,
                                         TransformerConfig)
from cellarena.zoo.transformer.tokenize import GeneVocab

CARD_FORMAT = 1
_VOCAB_FIELDS = ("vocab_size", "gene_offset", "n_genes")

__all__ = ["save_checkpoint", "load_checkpoint", "read_card", "checkpoint_paths", "LoadedCheckpoint",
           "CheckpointError", "CheckpointMismatch"]


class CheckpointError(CellarenaError):
    """A checkpoint is missing, damaged or inconsistent."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint does not match the configuration it was requested for."""


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, card) for a checkpoint path given with or without its suffix."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, model: CellTransformer, vocab: GeneVocab, *, corpus_id: str,
                    corpus_hash: str, steps: int, seed: int, final_loss: float | None,
                    git_commit: str | None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the weights path."""
    from safetensors.torch import save_file  # noqa: PLC0415

    cfg = model.config
    if cfg.vocab_size != len(vocab) or cfg.n_genes != vocab.n_genes or cfg.gene_offset != vocab.gene_offset:
        raise CheckpointError("the vocabulary does not belong to this model "
                              f"(model: {cfg.vocab_size} tokens, vocabulary: {len(vocab)})")
    weights, card_path = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(weights, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    card = {
        "format": CARD_FORMAT,
        "encoding": cfg.encoding,
        "config": cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "corpus_id": corpus_id,
        "corpus_hash": corpus_hash,
        "steps": int(steps),
        "seed": int(seed),
        "final_loss": None if final_loss is None else float(final_loss),
        "git_commit": git_commit,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "n_parameters": model.n_parameters(),
        "weights_file": weights.name,
        "weights_sha256": _sha256(weights),
        "extra": dict(extra or {}),
    }
    text = json.dumps(card, indent=1, sort_keys=False)
    _atomic_write_bytes(card_path, lambda p: p.write_text(text))
    return weights


def read_card(path: str | Path) -> dict:
    """The JSON card of a checkpoint."""
    _, card_path = checkpoint_paths(path)
    if not card_path.is_file():
        raise CheckpointError("checkpoint card not found", where=card_path,
                              fix="a checkpoint is <name>.safetensors plus <name>.json; save with save_checkpoint")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint card is not valid JSON: {exc}", where=card_path) from None
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"card format {card.get('format')!r}, this code reads {CARD_FORMAT}",
                              where=card_path)
    return card


@dataclasses.dataclass
class LoadedCheckpoint:
    model: CellTransformer
    vocab: GeneVocab
    card: dict
    path: Path

    @property
    def config(self) -> TransformerConfig:
        return self.model.config


def _expected_fields(expect: TransformerConfig | Mapping[str, Any] | None) -> tuple[dict, dict]:
    """Split an expectation into (architecture fields to check, runtime fields to apply)."""
    if expect is None:
        return {}, {}
    items = expect.to_dict() if isinstance(expect, TransformerConfig) else dict(expect)
    known = set(ARCHITECTURE_FIELDS) | set(RUNTIME_FIELDS)
    unknown = set(items) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    arch = {k: v for k, v in items.items() if k in ARCHITECTURE_FIELDS
            and not (k in _VOCAB_FIELDS and v is None)}
    runtime = {k: v for k, v in items.items() if k in RUNTIME_FIELDS}
    return arch, runtime


def load_checkpoint(path: str | Path, *, expect: TransformerConfig | Mapping[str, Any] | None = None,
                    device: str | torch.device = "cpu", verify_hash: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint, refusing it if its card does not match ``expect``.

    ``expect`` is the configuration the caller asks for (a :class:`TransformerConfig` or a mapping
    of some of its fields). Every architecture field given must equal the card's (vocabulary sizes
    left as ``None`` are not compared); runtime fields (dropout, attention, gradient checkpointing)
    are applied to the loaded model instead.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    weights, card_path = checkpoint_paths(path)
    card = read_card(card_path)
    try:
        saved = TransformerConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"card has no valid config: {exc}", where=card_path) from None
    arch, runtime = _expected_fields(expect)
    diffs = [f"{k}: checkpoint has {getattr(saved, k)!r}, requested {v!r}"
             for k, v in arch.items() if getattr(saved, k) != v]
    if diffs:
        raise CheckpointMismatch("checkpoint does not match the requested configuration:\n  "
                                 + "\n  ".join(diffs), where=card_path,
                                 fix="load a checkpoint pretrained with this configuration, or pretrain one")
    config = saved.replace(**runtime) if runtime else saved
    vocab = GeneVocab.from_dict(card["vocab"])
    if (len(vocab), vocab.gene_offset, vocab.n_genes) != (config.vocab_size, config.gene_offset, config.n_genes):
        raise CheckpointError("the card's vocabulary does not match its config's sizes", where=card_path)
    if not weights.is_file():
        raise CheckpointError("checkpoint weights not found", where=weights)
    if verify_hash and card.get("weights_sha256") and _sha256(weights) != card["weights_sha256"]:
        raise CheckpointError("weights do not match the sha256 in the card (file changed or damaged)",
                              where=weights)
    with torch.random.fork_rng(devices=[]):  # the throw-away initialization leaves the caller's RNG alone
        model = CellTransformer(config)
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit the model of the card: {exc}", where=weights) from None
    model.to(device).eval()
    return LoadedCheckpoint(model=model, vocab=vocab, card=card, path=weights)
