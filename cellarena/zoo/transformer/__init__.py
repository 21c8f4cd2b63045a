"""In-suite single-cell transformers: three input encodings (rank, bin, projection) on one model.

- :mod:`.tokenize`: gene vocabulary, gene medians, the three encoders, padded batches
- :mod:`.model`: :class:`TransformerConfig`, presets, :class:`CellTransformer` (math / SDPA /
  flash-attn varlen attention)
- :mod:`.train`: masked pretraining, embedding, fine-tuning for annotation
- :mod:`.checkpoint`: safetensors + JSON card, checked on load
- :mod:`.api`: AnnData-level functions for model plug-ins
"""

from cellarena.zoo.transformer.checkpoint import (CheckpointError, CheckpointMismatch, LoadedCheckpoint,
                                              load_checkpoint, read_card, save_checkpoint)
from cellarena.zoo.transformer.model import (PRESETS, CellTransformer, ModelOutput, TransformerConfig,
                                         flash_attn_available, preset)
from cellarena.zoo.transformer.tokenize import (CLS, ENCODINGS, MASK, PAD, Batch, CellTokenizer, GeneVocab,
                                            TokenizedCells, compute_gene_medians, corpus_hash)
from cellarena.zoo.transformer.train import (CellClassifier, FinetunedClassifier, PretrainResult, build_model,
                                         embed, finetune_and_predict, finetune_classifier, predict_labels,
                                         pretrain)

__all__ = [
    "PAD", "CLS", "MASK", "ENCODINGS", "GeneVocab", "CellTokenizer", "TokenizedCells", "Batch",
    "compute_gene_medians", "corpus_hash", "TransformerConfig", "CellTransformer", "ModelOutput",
    "PRESETS", "preset", "flash_attn_available", "build_model", "pretrain", "PretrainResult", "embed",
    "CellClassifier", "FinetunedClassifier", "finetune_classifier", "predict_labels",
    "finetune_and_predict", "save_checkpoint", "load_checkpoint", "read_card", "LoadedCheckpoint",
    "CheckpointError", "CheckpointMismatch",
]
