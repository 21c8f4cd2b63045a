"""Geneformer V2 cell embeddings from the released Geneformer-V2-104M checkpoint (cellarena/zoo/adapters/geneformer.py)."""

from pathlib import Path

from cellarena.zoo.adapters import geneformer


class Model(geneformer.Plugin):
    card_dir = Path(__file__).parent
    version = "V2"
