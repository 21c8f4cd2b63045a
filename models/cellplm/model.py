"""CellPLM cell embeddings from the released pretrained checkpoint (cellarena/zoo/adapters/cellplm.py)."""

from pathlib import Path

from cellarena.zoo.adapters import cellplm


class Model(cellplm.Plugin):
    card_dir = Path(__file__).parent
